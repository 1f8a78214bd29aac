//! `pier-agent deploy-local`: one deployment on this host from a bundle, with the flags of
//! `codedeploy-local` so that operators' scripts carry over.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use pier_engine::appspec::{FileExistsBehavior, LifecycleEvent};
use pier_engine::bundle::unpack::BundleType;
use pier_engine::deploy::{Engine, Observer, Request, Source};
use pier_engine::state::{DeploymentStatus, EventState, Journal};

/// Exit code for a configuration or usage problem found after argument parsing.
pub(crate) const EXIT_CONFIG: i32 = 64;

/// The flags of `codedeploy-local`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The bundle: a directory, or a .tar, .tgz or .zip archive.
    #[arg(short = 'l', long = "bundle-location", default_value = ".")]
    pub(crate) bundle_location: PathBuf,
    /// The bundle's type; guessed from the location when not given.
    #[arg(short = 't', long = "type", value_parser = parse_bundle_type)]
    pub(crate) bundle_type: Option<BundleType>,
    /// DISALLOW, OVERWRITE or RETAIN for files already at a destination (the AppSpec's own
    /// file_exists_behavior wins).
    #[arg(short = 'b', long = "file-exists-behavior", value_parser = parse_behavior)]
    pub(crate) file_exists_behavior: Option<FileExistsBehavior>,
    /// The deployment group id: the unit of state (last revision, cleanup, lock).
    #[arg(
        short = 'g',
        long = "deployment-group",
        default_value = "default-local-deployment-group"
    )]
    pub(crate) deployment_group: String,
    /// The deployment group name given to hooks as DEPLOYMENT_GROUP_NAME.
    #[arg(
        short = 'd',
        long = "deployment-group-name",
        default_value = "LocalFleet"
    )]
    pub(crate) deployment_group_name: String,
    /// The application name given to hooks as APPLICATION_NAME (default: the bundle location).
    #[arg(short = 'a', long = "application-name")]
    pub(crate) application_name: Option<String>,
    /// Comma-separated lifecycle events to run, in lifecycle order; DownloadBundle and
    /// Install always run. Default: ApplicationStop through ValidateService.
    #[arg(short = 'e', long = "events", value_delimiter = ',', value_parser = parse_event)]
    pub(crate) events: Vec<LifecycleEvent>,
    /// The agent configuration file.
    #[arg(short = 'c', long = "agent-configuration-file")]
    pub(crate) agent_configuration_file: Option<PathBuf>,
    /// The AppSpec file name in the bundle (default appspec.yml, then appspec.yaml).
    #[arg(short = 'A', long = "appspec-filename")]
    pub(crate) appspec_filename: Option<String>,
    /// Print what Install would create, replace, keep, remove and re-permission, and change
    /// nothing (no hook runs).
    #[arg(long = "dry-run")]
    pub(crate) dry_run: bool,
}

fn parse_bundle_type(s: &str) -> Result<BundleType, String> {
    s.parse::<BundleType>().map_err(|e| e.to_string())
}

fn parse_behavior(s: &str) -> Result<FileExistsBehavior, String> {
    s.parse::<FileExistsBehavior>().map_err(|e| e.to_string())
}

fn parse_event(s: &str) -> Result<LifecycleEvent, String> {
    s.trim()
        .parse::<LifecycleEvent>()
        .map_err(|e| e.to_string())
}

/// Prints each event as it finishes (one line per event), on stderr.
struct Progress {
    printed: Mutex<usize>,
    tty: bool,
}

impl Observer for Progress {
    fn update(&self, journal: &Journal) {
        let mut printed = self.printed.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(e) = journal.events.get(*printed) {
            let (mark, word) = match e.status {
                EventState::Pending => break,
                EventState::InProgress => {
                    if self.tty {
                        eprint!("  … {}\r", e.event);
                    }
                    break;
                }
                EventState::Succeeded => ("✓", "succeeded"),
                EventState::Skipped => ("-", "skipped"),
                EventState::Failed => ("✗", "failed"),
                EventState::TimedOut => ("✗", "timed out"),
            };
            let took = match (e.started_at, e.ended_at) {
                (Some(s), Some(t)) => {
                    format!(" ({:.1}s)", (t - s).num_milliseconds() as f64 / 1000.0)
                }
                _ => String::new(),
            };
            let note = e
                .message
                .as_deref()
                .filter(|_| e.status != EventState::Failed && e.status != EventState::TimedOut)
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            eprintln!("  {mark} {} {word}{took}{note}", e.event);
            *printed += 1;
        }
    }
}

/// Runs the command; returns the process exit code.
pub fn run(args: &Args) -> i32 {
    let config = match &args.agent_configuration_file {
        Some(p) => Config::load(p, true),
        None => Config::load(std::path::Path::new(DEFAULT_CONFIG_PATH), false),
    };
    let config = match config {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("deploy-local: {e}");
            return EXIT_CONFIG;
        }
    };
    let location = match std::path::absolute(&args.bundle_location) {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "deploy-local: bundle location {}: {e}",
                args.bundle_location.display()
            );
            return EXIT_CONFIG;
        }
    };
    if !location.exists() {
        eprintln!(
            "deploy-local: bundle location {} does not exist",
            location.display()
        );
        return EXIT_CONFIG;
    }
    let kind = match args.bundle_type {
        Some(k) => k,
        None => match pier_engine::bundle::unpack::detect_bundle_type(&location) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("deploy-local: {e} (give -t directory|tar|tgz|zip)");
                return EXIT_CONFIG;
            }
        },
    };
    let req = Request {
        deployment_id: pier_protocol::new_deployment_id(),
        application_name: args
            .application_name
            .clone()
            .unwrap_or_else(|| location.display().to_string()),
        deployment_group_name: args.deployment_group_name.clone(),
        deployment_group_id: args.deployment_group.clone(),
        source: Source::Local {
            path: location.clone(),
            kind,
        },
        events: (!args.events.is_empty()).then(|| args.events.clone()),
        file_exists_behavior: args.file_exists_behavior,
        appspec_filename: args.appspec_filename.clone(),
        bundle_env: Vec::new(),
        // codedeploy-local has no such option; a stop script that fails here fails the run.
        ignore_application_stop_failures: false,
    };

    // The install's worker threads would each get a malloc arena of their own; two keep the
    // peak of a large install down (the daemon does the same).
    pier_sys::memory::limit_arenas(crate::daemon::MALLOC_ARENAS);
    // One deployment, one thread: hooks, their output and the journal's writes hand work to
    // no worker thread (file work still goes to the blocking pool), and no workers are made.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("deploy-local: cannot start the runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        // Ctrl-C stops the running hook the same way a timeout does, and the journal says so.
        let on_signal = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                on_signal.cancel();
            }
        });
        let engine = match Engine::new(Arc::new(config.engine_settings()), cancel) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("deploy-local: {e}");
                return 1;
            }
        };
        if args.dry_run {
            return match engine.plan_install(&req).await {
                Ok(plan) => {
                    print!("{plan}");
                    eprintln!("dry run: nothing was changed");
                    0
                }
                Err(e) => {
                    eprintln!("deploy-local: dry run: {e}");
                    1
                }
            };
        }
        eprintln!(
            "deployment {} of {} ({} bundle) to group {}",
            req.deployment_id,
            location.display(),
            kind,
            req.deployment_group_id
        );
        let progress = Progress {
            printed: Mutex::new(0),
            tty: std::io::stderr().is_terminal(),
        };
        let journal = match engine.deploy(&req, &progress).await {
            Ok(j) => j,
            Err(e) => {
                eprintln!("deploy-local: {e}");
                return if matches!(e, pier_engine::deploy::DeployError::Events(_)) {
                    EXIT_CONFIG
                } else {
                    1
                };
            }
        };
        let log_path = engine
            .root()
            .group(&req.deployment_group_id)
            .and_then(|g| g.deployment_dir(&req.deployment_id))
            .map(|d| d.join("logs").join("scripts.log"))
            .unwrap_or_default();
        match journal.status {
            DeploymentStatus::Succeeded => {
                println!("deployment {} succeeded", journal.deployment_id);
                0
            }
            _ => {
                let failed = journal
                    .events
                    .iter()
                    .find(|e| matches!(e.status, EventState::Failed | EventState::TimedOut));
                if let Some(tail) = failed.and_then(|e| e.tail.as_deref()) {
                    eprintln!("--- last output of the failing script:");
                    eprintln!("{}", tail.trim_end());
                    eprintln!("---");
                }
                let code = failed
                    .and_then(|e| e.code)
                    .map(|c| format!(" [{c}]"))
                    .unwrap_or_default();
                println!(
                    "deployment {} failed{code}: {}; full log: {}",
                    journal.deployment_id,
                    journal.error.as_deref().unwrap_or("unknown error"),
                    log_path.display()
                );
                1
            }
        }
    })
}
