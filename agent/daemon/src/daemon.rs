//! `pier-agent run`: the long-running agent. It polls this host's queue, turns each valid
//! command into a deployment on the [`pier_engine::deploy::Engine`], keeps the message invisible while
//! the deployment runs, writes a status record at every event, and acknowledges the message
//! only once the final record is durably written.
//!
//! Guarantees: a malformed or unknown-version message is never run and never deleted (it is
//! rejected, logged with its reason and counted, and the queue's dead-letter policy keeps it);
//! so is, on an agent with `trusted_keys`, an unsigned command, one whose signature does not
//! verify or whose key is not trusted, and a new deployment created outside the replay window
//! (an agent without keys says at start, loudly, that it runs open);
//! a command whose deployment id this host has already taken is never run twice (the dedupe
//! store is on disk); different deployment groups deploy at once, up to
//! `daemon.concurrency`, one group one deployment at a time (the engine's group lock).
//!
//! Signals: SIGTERM/SIGINT stop polling, give running hooks `daemon.shutdown_grace_seconds`
//! to finish, then stop them; the interrupted deployment's status is written as failed, its
//! message is left in the queue, and the next start reports it and acknowledges it. SIGHUP
//! reloads the configuration. Under systemd the agent sends READY/STOPPING and watchdog pings.
//!
//! The host announces itself in the registry while it runs (a [`Registrar`] part: entry at
//! start, a heartbeat every `daemon.heartbeat_seconds`, `Stopped` when polling ends on a
//! clean shutdown).
//!
//! The daemon is built from [`Parts`] (queue, status-sink opener, fetcher, engine, registrar,
//! [`Timings`]): [`Daemon::start`] builds them from `agent.yml`, a test builds its own and
//! calls [`Daemon::from_parts`]. Every task it spawns is tracked, so the drain (grace, then
//! hooks stopped, then [`Timings::drain_bound`], then whatever is left dropped) ends with
//! nothing of the daemon running. Blocking file work runs on tokio's blocking pool; the rest
//! runs on one thread ([`runtime`]), so an idle agent has one thread for the kernel to wake:
//! at the end of each long poll (SQS) or receive wait (spool), at each registry heartbeat,
//! and at each watchdog ping under systemd. glibc's malloc arenas are capped and what a
//! deployment freed is handed back once no other runs ([`pier_sys::memory`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, RegistryConfig, TransportConfig, DEFAULT_CONFIG_PATH};
use crate::dedupe::{Dedupe, Seen};
use crate::fetch::{FetchOptions, Fetcher};
use crate::registry::{Announcement, Registrar};
use pier_engine::appspec::{FileExistsBehavior, LifecycleEvent};
use pier_engine::deploy::{Engine, Observer, Request, Source};
use pier_engine::state::{self, Journal};
use pier_protocol::signature::{self, Origin};
use pier_protocol::StatusTarget;
use pier_protocol::{self, Command, Revision, StatusRecord};
use pier_transport::aws::{aws_clients, AwsClients, AwsSettings};
use pier_transport::backoff::Backoff;
use pier_transport::spool::Spool;
use pier_transport::sqs::{QueueSpec, SqsQueue};
use pier_transport::{
    self, keep_invisible_renewing, open_status_sink, Queue, Received, StatusSink, TransportError,
};

/// Exit code for a configuration error.
pub(crate) const EXIT_CONFIG: i32 = 64;

/// Deployments remembered as done (against redelivery) and their saved commands are
/// forgotten after this: SQS keeps a message at most 14 days.
const FORGET_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

/// How much longer than the long poll a receive may take before it is given up as hung.
const RECEIVE_SLACK: Duration = Duration::from_secs(30);

/// At most this many deployments wait for an in-process retry at once.
const RETRY_CAP: usize = 1024;

/// Every delay and bound the daemon waits on, in one place, so a test can make them small
/// (or drive them with a paused `tokio::time` clock). [`Timings::from_config`] gives the
/// production values.
#[derive(Debug, Clone)]
pub struct Timings {
    /// Long-poll wait of one receive.
    pub poll_wait: Duration,
    /// How much longer than `poll_wait` a receive may take before it is given up as hung.
    pub receive_slack: Duration,
    /// Pauses between receives that failed.
    pub receive_retry: Backoff,
    /// How long a received message is kept invisible at a time while its deployment runs.
    pub visibility: Duration,
    /// How often that invisibility is renewed (well under `visibility`).
    pub visibility_renewal: Duration,
    /// First and longest delay before a left message is handled again in this process.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How many deployments may wait for such a retry at once (the bookkeeping's bound).
    pub retry_cap: usize,
    /// Retries of a final status write that failed transiently.
    pub status_write_retry: Backoff,
    /// How a duplicate delivery checks whether the running one has ended.
    pub duplicate_hold: Backoff,
    /// On shutdown, how long running hooks may finish before they are stopped.
    pub shutdown_grace: Duration,
    /// After hooks are stopped, how long their deployments may take to record it before
    /// their tasks are dropped.
    pub drain_bound: Duration,
}

impl Timings {
    /// The timings `config` asks for.
    pub(crate) fn from_config(config: &Config) -> Timings {
        let d = &config.daemon;
        Timings {
            poll_wait: d.poll_wait,
            receive_slack: RECEIVE_SLACK,
            receive_retry: Backoff::unbounded(Duration::from_millis(500), Duration::from_secs(30)),
            visibility: d.visibility_timeout,
            visibility_renewal: d.visibility_timeout / 3,
            retry_base: d.retry_base,
            retry_max: d.retry_max,
            retry_cap: RETRY_CAP,
            status_write_retry: Backoff::new(
                Duration::from_millis(200),
                Duration::from_secs(10),
                8,
            ),
            duplicate_hold: Backoff::unbounded(Duration::from_millis(100), Duration::from_secs(2)),
            shutdown_grace: d.shutdown_grace,
            // Hooks get TERM, their kill grace, then KILL; the tasks then record the state.
            drain_bound: config.hooks.kill_grace + Duration::from_secs(30),
        }
    }
}

/// Opens the status sink a command names. The daemon's parts include one so that a test can
/// put a faulty store behind it.
pub trait SinkOpener: Send + Sync {
    fn open(&self, target: &StatusTarget) -> Result<Arc<dyn StatusSink>, TransportError>;
}

/// The production opener: S3 or local sinks, with AWS clients when the host has them.
pub(crate) struct CommandSinks {
    pub(crate) aws: Option<AwsClients>,
}

impl SinkOpener for CommandSinks {
    fn open(&self, target: &StatusTarget) -> Result<Arc<dyn StatusSink>, TransportError> {
        open_status_sink(target, self.aws.as_ref()).map(Arc::from)
    }
}

/// Everything the daemon runs with, built from the configuration by [`Daemon::start`] or
/// by a test that wants its own queue, sinks or timings ([`Daemon::from_parts`]).
pub struct Parts {
    pub host_id: String,
    pub queue: Arc<dyn Queue>,
    pub sinks: Arc<dyn SinkOpener>,
    pub fetcher: Arc<Fetcher>,
    pub engine: Arc<Engine>,
    /// The token the engine's hooks were built with: fired when running hooks must stop.
    pub hook_cancel: CancellationToken,
    pub dedupe: Arc<Dedupe>,
    /// Writes this host's registry entry; `None`: the host is not registered.
    pub registry: Option<Arc<Registrar>>,
    /// The running configuration (concurrency, and what a reload compares against).
    pub config: Config,
    pub timings: Timings,
}

/// Flags of `pier-agent run`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The agent configuration file (a missing default file means all defaults).
    #[arg(short = 'c', long = "config")]
    pub(crate) config: Option<PathBuf>,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DaemonError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Setup(String),
}

/// Runs the daemon until a shutdown signal; returns the process exit code.
pub fn run(args: &Args) -> i32 {
    pier_sys::logging::init(log::LevelFilter::Info);
    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let config = match Config::load(&path, required) {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}");
            eprintln!("pier-agent: {e}");
            return EXIT_CONFIG;
        }
    };
    // Few arenas: the heap of a burst of deployment work is not kept per thread for ever.
    pier_sys::memory::limit_arenas(MALLOC_ARENAS);
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pier-agent: cannot start the runtime: {e}");
            return 1;
        }
    };
    let code = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let force = CancellationToken::new();
        let reload = Arc::new(tokio::sync::Notify::new());
        if let Err(e) = spawn_signal_handlers(shutdown.clone(), force.clone(), reload.clone()) {
            eprintln!("pier-agent: cannot install signal handlers: {e}");
            return 1;
        }
        match Daemon::start(path, required, config).await {
            Ok(daemon) => {
                Arc::new(daemon).serve(shutdown, force, reload).await;
                0
            }
            Err(e) => {
                log::error!("cannot start: {e}");
                eprintln!("pier-agent: {e}");
                match e {
                    DaemonError::Config(_) => EXIT_CONFIG,
                    DaemonError::Setup(_) => 1,
                }
            }
        }
    });
    // Blocking work still running after the drain (an fsync on a hung filesystem) must not
    // keep the process: the runtime gets a few seconds, then the process exits anyway.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    code
}

/// How long the runtime's own shutdown may wait for blocking work left after the drain.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(5);

/// glibc malloc arenas the agent may use (`MALLOC_ARENA_MAX` in its environment wins).
pub(crate) const MALLOC_ARENAS: usize = 2;

/// The agent's runtime. The agent mostly waits, so one thread runs its loop, its timers and
/// its sockets: an idle agent has one thread to wake, once per long poll, and no worker
/// threads to wake one another. What takes time in a deployment (file work, unpacking,
/// hashing, fsyncs, the blocking parts of hooks) runs on tokio's blocking pool, which
/// grows while a deployment needs it and lets its threads go 10 s after.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// SIGTERM/SIGINT fire `shutdown`; a second one fires `force` (stop hooks now, no grace).
/// SIGHUP wakes `reload`.
fn spawn_signal_handlers(
    shutdown: CancellationToken,
    force: CancellationToken,
    reload: Arc<tokio::sync::Notify>,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: shutting down"),
            _ = int.recv() => log::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        log::warn!("second stop signal: stopping running hooks now");
        force.cancel();
    });
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            reload.notify_one();
        }
    });
    Ok(())
}

/// The running agent.
pub struct Daemon {
    /// Where a reload reads the configuration from (none: reload is refused).
    config_source: Option<(PathBuf, bool)>,
    host_id: String,
    queue: Arc<dyn Queue>,
    sinks: Arc<dyn SinkOpener>,
    fetcher: Arc<Fetcher>,
    /// The running configuration, swapped whole on SIGHUP; the engine gets its part.
    config: std::sync::RwLock<Arc<Config>>,
    /// Swapped with the configuration on SIGHUP.
    timings: std::sync::RwLock<Arc<Timings>>,
    dedupe: Arc<Dedupe>,
    engine: Arc<Engine>,
    registry: Option<Arc<Registrar>>,
    /// Fired when running hooks must stop (after the shutdown grace).
    hook_cancel: CancellationToken,
    /// Fired when the agent starts stopping: pending retries give up.
    stopping: CancellationToken,
    /// Fired when the drain is over: every task still running is dropped.
    abort: CancellationToken,
    /// Every task this daemon spawns (deployments, retries, status writers); shutdown
    /// waits for it, with a bound.
    tasks: TaskTracker,
    /// Deployment ids running in this process.
    running: Arc<Mutex<HashSet<String>>>,
    /// Messages rejected as malformed or of an unknown version since start.
    rejected: Arc<AtomicU64>,
    slots: Arc<Semaphore>,
    /// The retry schedule of each deployment whose message was left in this process; an
    /// entry goes when its deployment finishes, is dropped, or the agent stops, and there are
    /// at most `timings.retry_cap` of them.
    retries: Mutex<HashMap<String, Backoff>>,
}

impl Daemon {
    /// Builds every part; fails on a configuration that cannot work (no region for SQS, a
    /// queue that does not exist and may not be created, an unwritable root).
    pub(crate) async fn start(
        config_path: PathBuf,
        config_required: bool,
        config: Config,
    ) -> Result<Daemon, DaemonError> {
        let host_id = resolve_host_id(&config).await;
        let aws_settings = AwsSettings {
            region: config.aws.region.clone(),
            endpoint_url: config.aws.endpoint_url.clone(),
            profile: None,
            credentials: None,
            role_arn: None,
        };
        // AWS clients are built when the queue needs them, and otherwise tried so that S3
        // revisions and S3 status sinks work on a spool host too; a host with no region at all
        // simply cannot use them.
        let aws = match aws_settings_usable(&config) {
            Err(why) if matches!(config.transport, TransportConfig::Spool { .. }) => {
                log::info!("no AWS access ({why}); S3 revisions and status sinks are unavailable");
                Ok(None)
            }
            Err(why) => Err(why),
            Ok(()) => aws_clients(&aws_settings)
                .await
                .map(Some)
                .map_err(|e| e.to_string()),
        };
        let aws = match aws {
            Ok(c) => c,
            Err(e) => {
                if matches!(config.transport, TransportConfig::Sqs { .. }) {
                    return Err(DaemonError::Setup(e));
                }
                log::info!("no AWS access ({e}); S3 revisions and status sinks are unavailable");
                None
            }
        };
        let (queue, queue_address): (Arc<dyn Queue>, String) = match &config.transport {
            TransportConfig::Spool { spool_dir } => (
                Arc::new(
                    Spool::open(spool_dir.clone())
                        .map_err(|e| DaemonError::Setup(e.to_string()))?,
                ),
                spool_dir.display().to_string(),
            ),
            TransportConfig::Sqs {
                queue_url,
                queue_name,
                create_queue,
            } => {
                let mut spec = QueueSpec::for_host(&host_id);
                spec.url = queue_url.clone();
                if let Some(n) = queue_name {
                    spec.name = n.clone();
                }
                spec.create = *create_queue;
                let client = aws.as_ref().expect("built above for sqs").sqs.clone();
                let queue = SqsQueue::open(client, &spec)
                    .await
                    .map_err(|e| DaemonError::Setup(e.to_string()))?;
                let url = queue.url().to_string();
                (Arc::new(queue), url)
            }
        };
        let registry = registrar(&config, &host_id, queue_address, aws.as_ref()).await?;
        let fetcher = Fetcher::new(
            aws.as_ref().map(|a| a.s3.clone()),
            FetchOptions {
                github_api_url: config.github.api_url.clone(),
                github_token: config.github.token.clone(),
                ..FetchOptions::default()
            },
        )
        .map_err(|e| DaemonError::Setup(e.to_string()))?;
        let dedupe = Dedupe::open(config.root_dir.join("dedupe"))
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        std::fs::create_dir_all(commands_dir(&config.root_dir))
            .map_err(|e| DaemonError::Setup(format!("{}: {e}", config.root_dir.display())))?;
        let hook_cancel = CancellationToken::new();
        let engine = Engine::new(Arc::new(config.engine_settings()), hook_cancel.clone())
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        // Detected and logged at start, so the log says what hooks will get before any runs.
        let _ = pier_engine::hooks::Containment::host();
        let timings = Timings::from_config(&config);
        let mut daemon = Daemon::from_parts(Parts {
            host_id,
            queue,
            sinks: Arc::new(CommandSinks { aws }),
            fetcher: Arc::new(fetcher),
            engine: Arc::new(engine),
            hook_cancel,
            dedupe: Arc::new(dedupe),
            registry,
            config,
            timings,
        });
        daemon.config_source = Some((config_path, config_required));
        Ok(daemon)
    }

    /// A daemon over parts the caller built (a test's queue, a faulty sink, short timings).
    /// It cannot reload: it knows no configuration file.
    pub fn from_parts(parts: Parts) -> Daemon {
        Daemon {
            config_source: None,
            host_id: parts.host_id,
            queue: parts.queue,
            sinks: parts.sinks,
            fetcher: parts.fetcher,
            slots: Arc::new(Semaphore::new(parts.config.daemon.concurrency)),
            config: std::sync::RwLock::new(Arc::new(parts.config)),
            timings: std::sync::RwLock::new(Arc::new(parts.timings)),
            dedupe: parts.dedupe,
            engine: parts.engine,
            registry: parts.registry,
            hook_cancel: parts.hook_cancel,
            stopping: CancellationToken::new(),
            abort: CancellationToken::new(),
            tasks: TaskTracker::new(),
            running: Arc::new(Mutex::new(HashSet::new())),
            rejected: Arc::new(AtomicU64::new(0)),
            retries: Mutex::new(HashMap::new()),
        }
    }

    /// Tasks of this daemon still running (none once [`Daemon::serve`] has returned).
    pub fn tasks_running(&self) -> usize {
        self.tasks.len()
    }

    /// Deployments waiting for an in-process retry.
    pub fn pending_retries(&self) -> usize {
        self.retries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The timings in force.
    fn timings(&self) -> Arc<Timings> {
        self.timings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Spawns `work` as a task of this daemon: shutdown waits for it, and drops it if the
    /// drain bound passes.
    fn spawn(
        &self,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let abort = self.abort.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = abort.cancelled() => {}
                _ = work => {}
            }
        })
    }

    /// Polls and deploys until `shutdown` fires, then drains: running deployments get the
    /// shutdown grace, then their hooks are stopped and they get the drain bound, then what
    /// is left is dropped. When this returns, no task of the daemon is running.
    pub async fn serve(
        self: Arc<Self>,
        shutdown: CancellationToken,
        force: CancellationToken,
        reload: Arc<tokio::sync::Notify>,
    ) {
        let this = self;
        // Helpers that live as long as the loop; dropping the set aborts them.
        let mut helpers: JoinSet<()> = JoinSet::new();
        {
            let hooks = this.hook_cancel.clone();
            helpers.spawn(async move {
                force.cancelled().await;
                hooks.cancel();
            });
        }
        this.report_interrupted().await;
        this.housekeeping().await;
        this.log_signing();
        log::info!(
            HOST_ID = this.host_id.as_str();
            "pier-agent {} ready: host {} polling {}",
            env!("CARGO_PKG_VERSION"),
            this.host_id,
            this.queue.describe()
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        // What starting took (configuration, AWS set-up, recovery) is not kept while idle.
        blocking(pier_sys::memory::release_free_memory).await;
        if let Some(registry) = &this.registry {
            helpers.spawn(registry.clone().run());
        }
        // The watchdog is fed only while the poll loop goes round (or the agent is stopping),
        // so a loop stuck on a dead connection gets the agent restarted by systemd.
        let heartbeat = Arc::new(Mutex::new(std::time::Instant::now()));
        {
            let t = this.timings();
            helpers.spawn(watchdog(
                shutdown.clone(),
                heartbeat.clone(),
                (t.poll_wait + t.receive_slack) * 2,
            ));
        }

        let mut backoff = this.timings().receive_retry.clone();
        loop {
            *heartbeat.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
            let t = this.timings();
            let bound = t.poll_wait + t.receive_slack;
            let received = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = reload.notified() => {
                    this.reload();
                    continue;
                }
                r = tokio::time::timeout(bound, this.queue.receive(t.poll_wait)) => {
                    r.unwrap_or_else(|_| Err(TransportError::Config(format!(
                        "no answer within {}s", bound.as_secs()
                    ))))
                }
            };
            let messages = match received {
                Ok(m) => {
                    backoff.reset();
                    m
                }
                Err(e) => {
                    let delay = backoff.next_delay().unwrap_or(Duration::from_secs(30));
                    log::warn!(
                        "receiving from {}: {e}; retrying in {delay:?}",
                        this.queue.describe()
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            for msg in messages {
                let me = this.clone();
                this.spawn(async move { me.handle(msg).await });
            }
        }

        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        // Polling has ended, so the host takes no more deployments: say so before the drain,
        // which may take the whole shutdown grace.
        if let Some(registry) = &this.registry {
            registry.stopped().await;
        }
        this.drain().await;
        helpers.shutdown().await;
        log::info!("pier-agent stopped");
    }

    /// Stops everything this daemon runs, within the shutdown grace plus the drain bound.
    async fn drain(&self) {
        // Received commands still waiting for a slot or their group's lock must not start
        // now, and pending retries give up.
        self.engine.stop_new_deployments();
        self.stopping.cancel();
        self.tasks.close();
        let t = self.timings();
        if !self.tasks.is_empty() {
            log::info!(
                "stopping: waiting up to {}s for {} running task(s)",
                t.shutdown_grace.as_secs(),
                self.tasks.len()
            );
        }
        if tokio::time::timeout(t.shutdown_grace, self.tasks.wait())
            .await
            .is_err()
        {
            log::warn!("shutdown grace over: stopping running hooks");
            self.hook_cancel.cancel();
            if tokio::time::timeout(t.drain_bound, self.tasks.wait())
                .await
                .is_err()
            {
                log::error!(
                    "{} task(s) did not finish within {}s after their hooks were stopped; dropping them",
                    self.tasks.len(),
                    t.drain_bound.as_secs()
                );
                self.abort.cancel();
                // Dropping a task's future is immediate unless it is stuck in a blocking
                // call; do not wait for ever on such a one.
                let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
            }
        }
        self.retries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The running configuration.
    fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Says which commands this agent accepts: at start, and after a reload that changed it.
    fn log_signing(&self) {
        let signing = self.config().signing.clone();
        if signing.is_open() {
            log::warn!(
                "RUNNING OPEN: no trusted_keys are configured, so this agent runs any command \
                 that reaches {}, signed or not; configure trusted_keys (docs/operations.md, \
                 Signing commands) so that only your controller's commands run",
                self.queue.describe()
            );
        } else {
            log::info!(
                "accepting only commands signed by trusted key(s) {} created within the last {}s",
                signing.key_ids().join(", "),
                signing.max_age.as_secs()
            );
        }
    }

    fn reload(&self) {
        let Some((path, required)) = &self.config_source else {
            log::warn!("reload: this agent was not started from a configuration file");
            return;
        };
        match Config::load(path, *required) {
            Ok(new) => {
                if new.transport != self.config().transport {
                    log::warn!("reload: transport changes take effect at the next restart");
                }
                let old = self.config();
                if new.registry != old.registry
                    || new.tags != old.tags
                    || new.availability_zone != old.availability_zone
                    || new.daemon.heartbeat != old.daemon.heartbeat
                    || new.daemon.deployment_groups != old.daemon.deployment_groups
                {
                    log::warn!(
                        "reload: registry, tags, availability_zone, daemon.heartbeat_seconds and \
                         daemon.deployment_groups changes are announced at the next restart"
                    );
                }
                if new.daemon.concurrency != self.config().daemon.concurrency {
                    log::warn!(
                        "reload: daemon.concurrency changes take effect at the next restart"
                    );
                }
                match self.engine.set_config(Arc::new(new.engine_settings())) {
                    Ok(()) => {
                        *self.timings.write().unwrap_or_else(|e| e.into_inner()) =
                            Arc::new(Timings::from_config(&new));
                        let signing_changed = new.signing != self.config().signing;
                        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
                        log::info!("reload: configuration {} applied", path.display());
                        if signing_changed {
                            self.log_signing();
                        }
                    }
                    Err(e) => log::warn!("reload refused: {e}"),
                }
            }
            Err(e) => log::error!("reload failed, keeping the running configuration: {e}"),
        }
    }

    /// Keeps the dedupe store and the saved commands from growing for ever on a host that
    /// deploys for years. File removals: on the blocking pool.
    async fn housekeeping(&self) {
        let dedupe = self.dedupe.clone();
        let dir = commands_dir(self.engine.root().dir());
        blocking(move || {
            match dedupe.prune_done(FORGET_AFTER) {
                Ok(0) => {}
                Ok(n) => log::info!("forgot {n} deployment(s) finished more than 30 days ago"),
                Err(e) => log::warn!("pruning the dedupe store: {e}"),
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                return;
            };
            for entry in entries.flatten() {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= FORGET_AFTER);
                if old {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        })
        .await
    }

    /// Deployments a dead or stopped agent left unfinished: close them as failed and write
    /// their status, so that a controller sees what happened.
    async fn report_interrupted(&self) {
        let closed = match self.engine.recover_all().await {
            Ok(c) => c,
            Err(e) => {
                log::error!("recovering interrupted deployments: {e}");
                return;
            }
        };
        for journal in closed {
            log::warn!(
                DEPLOYMENT_ID = journal.deployment_id.as_str(),
                DEPLOYMENT_GROUP = journal.deployment_group_id.as_str();
                "deployment {} was interrupted: {}",
                journal.deployment_id,
                journal.error.as_deref().unwrap_or("")
            );
            if let Some(cmd) = self.saved_command(&journal.deployment_id).await {
                if let Err(e) = self.write_final(&cmd, &journal).await {
                    log::error!(
                        "status of interrupted deployment {}: {e}",
                        journal.deployment_id
                    );
                }
            }
        }
    }

    async fn handle(self: Arc<Self>, msg: Received) {
        let policy = self.config().signing.clone();
        let opened = match signature::open(&msg.body, &policy) {
            Ok(o) => o,
            Err(e) => return self.refuse(&msg, &e.to_string()).await,
        };
        let cmd = match opened.origin {
            Origin::Verified { ref key_id } => {
                log::info!(
                    DEPLOYMENT_ID = opened.command.deployment_id.as_str(), KEY_ID = key_id.as_str();
                    "command for deployment {} signed by trusted key {key_id}",
                    opened.command.deployment_id
                );
                // The replay window applies to a deployment this host meets for the first
                // time; a redelivery of one it took is the dedupe store's (never run twice).
                // A store that cannot answer does not let a stale command through.
                let dedupe = self.dedupe.clone();
                let id = opened.command.deployment_id.clone();
                if !matches!(blocking(move || dedupe.get(&id)).await, Ok(Some(_))) {
                    if let Err(e) = signature::check_fresh(&opened, &policy, chrono::Utc::now()) {
                        return self.refuse(&msg, &e.to_string()).await;
                    }
                }
                opened.command
            }
            Origin::Unchecked { ref key_id } => {
                log::warn!(
                    DEPLOYMENT_ID = opened.command.deployment_id.as_str();
                    "command for deployment {} claims key {key_id}; not checked, this agent has no trusted_keys",
                    opened.command.deployment_id
                );
                opened.command
            }
            Origin::Unsigned => opened.command,
        };
        let id = cmd.deployment_id.clone();
        // Claim the id in this process first, atomically: two deliveries of one command in the
        // same batch must not both get past this point. The claim is released however this
        // task ends, a panic included.
        let Some(_claim) = Claim::take(&self.running, &id) else {
            self.hold_duplicate(&id, &msg).await;
            return;
        };
        let dedupe = self.dedupe.clone();
        let claim_id = id.clone();
        match blocking(move || dedupe.begin(&claim_id)).await {
            Err(e) => {
                // Without the dedupe store the agent cannot promise "once": leave the message,
                // and try it again here (the store may come back: a full disk freed).
                log::error!(DEPLOYMENT_ID = id.as_str(); "dedupe store: {e}; message left in the queue");
                self.retry_later(id, msg);
            }
            Ok(Some(Seen::Done)) => {
                log::info!(DEPLOYMENT_ID = id.as_str(); "deployment {id} already done here: duplicate acknowledged, not run");
                self.forget_retry(&id);
                self.ack(&msg).await;
            }
            Ok(Some(Seen::InProgress)) => self.clone().take_over(cmd, msg).await,
            Ok(None) => self.clone().deploy(cmd, msg).await,
        }
    }

    /// Refuses a message that is not a command this agent may run (malformed, of an unknown
    /// version, unsigned, badly signed or stale): logged with the reason, never run, never
    /// deleted (the queue's dead-letter policy keeps it; the spool moves it to `rejected/`).
    async fn refuse(&self, msg: &Received, why: &str) {
        let n = self.rejected.fetch_add(1, Ordering::Relaxed) + 1;
        log::error!(
            MESSAGE_ID = msg.id.as_str();
            "rejected message {} ({n} since start): {why}; left for the dead-letter queue",
            msg.id
        );
        if let Err(e) = self.queue.reject(msg, why).await {
            log::error!("rejecting message {}: {e}", msg.id);
        }
    }

    /// A second delivery of a deployment running in this process: not run, and not deleted
    /// while the first might still fail to finish (deleting it could lose the only copy). It is
    /// kept invisible until the running one ends, then acknowledged if that one is done.
    async fn hold_duplicate(&self, id: &str, msg: &Received) {
        log::info!(DEPLOYMENT_ID = id; "duplicate command for running deployment {id}: held, not run");
        let running = self.running.clone();
        let t = self.timings();
        let mut backoff = t.duplicate_hold.clone();
        keep_invisible_renewing(
            &*self.queue,
            msg,
            t.visibility,
            t.visibility_renewal,
            async move {
                while running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(id)
                {
                    let pause = backoff.next_delay().unwrap_or(Duration::from_secs(2));
                    tokio::time::sleep(pause).await;
                }
            },
        )
        .await;
        let dedupe = self.dedupe.clone();
        let owned = id.to_string();
        if matches!(
            blocking(move || dedupe.get(&owned)).await,
            Ok(Some(Seen::Done))
        ) {
            log::info!(DEPLOYMENT_ID = id; "duplicate command for deployment {id} acknowledged");
            self.ack(msg).await;
        }
    }

    /// A command this host had started before it stopped: if its journal is final, report it
    /// and acknowledge; if it never got as far as a journal, run it now.
    async fn take_over(self: Arc<Self>, cmd: Command, msg: Received) {
        self.take_over_once(cmd, msg, true).await
    }

    async fn take_over_once(self: Arc<Self>, cmd: Command, msg: Received, may_recover: bool) {
        let id = cmd.deployment_id.clone();
        // The group the deployment really ran in is the one of the command saved when it
        // started, whatever a replay says.
        let group_id = self
            .saved_command(&id)
            .await
            .map(|c| c.deployment_group_id)
            .unwrap_or_else(|| cmd.deployment_group_id.clone());
        let root = self.engine.root().clone();
        let journal_id = id.clone();
        let group_for_recovery = group_id.clone();
        let journal =
            blocking(move || root.group(&group_id).and_then(|g| g.journal(&journal_id))).await;
        match journal {
            Ok(Some(j)) if j.status != state::DeploymentStatus::InProgress => {
                log::warn!(
                    DEPLOYMENT_ID = id.as_str();
                    "deployment {id} was interrupted by an earlier stop; reporting it as {:?}",
                    j.status
                );
                match self.write_final(&cmd, &j).await {
                    Ok(()) => self.finish_and_ack(&id, &msg).await,
                    Err(e) => {
                        // Not written yet: the message stays, and is tried again here.
                        log::warn!(DEPLOYMENT_ID = id.as_str(); "deployment {id}: {e}; message left in the queue");
                        self.retry_later(id, msg);
                    }
                }
            }
            Ok(None) => self.deploy(cmd, msg).await,
            Ok(Some(_)) => {
                // Not running in this process, yet not closed: interrupted in a group whose
                // lock was busy at start. Close it now if the group is free; else try again
                // later, so that it is reported once whoever holds the group lets go.
                let recovered = if may_recover {
                    self.engine.recover_group(&group_for_recovery).await
                } else {
                    Ok(false)
                };
                match recovered {
                    Ok(true) => Box::pin(self.clone().take_over_once(cmd, msg, false)).await,
                    Ok(false) => {
                        log::warn!(
                            DEPLOYMENT_ID = id.as_str();
                            "deployment {id} was interrupted and its group is busy in another process; message left"
                        );
                        self.retry_later(id, msg);
                    }
                    Err(e) => {
                        log::error!(DEPLOYMENT_ID = id.as_str(); "deployment {id}: recovering its group: {e}; message left");
                        self.retry_later(id, msg);
                    }
                }
            }
            Err(e) => {
                log::error!(DEPLOYMENT_ID = id.as_str(); "deployment {id}: {e}; message left");
                self.retry_later(id, msg);
            }
        }
    }

    /// Records the deployment as done, then deletes its message; if the record cannot be
    /// written the message stays, so that a redelivery cannot run it again.
    async fn finish_and_ack(&self, id: &str, msg: &Received) {
        self.forget_retry(id);
        let dedupe = self.dedupe.clone();
        let owned = id.to_string();
        match blocking(move || dedupe.finish(&owned)).await {
            Ok(()) => self.ack(msg).await,
            Err(e) => {
                log::error!(DEPLOYMENT_ID = id; "dedupe store: {e}; message {} left in the queue", msg.id)
            }
        }
    }

    async fn deploy(self: Arc<Self>, cmd: Command, msg: Received) {
        let id = cmd.deployment_id.clone();
        let t = self.timings();
        let result = keep_invisible_renewing(
            &*self.queue,
            &msg,
            t.visibility,
            t.visibility_renewal,
            self.clone().run_command(&cmd),
        )
        .await;
        match result {
            Outcome::Finished(status) => {
                if self.hook_cancel.is_cancelled() {
                    // Stopped by shutdown: the status says so now, and the message stays so
                    // that the next start reports the interruption and acknowledges it.
                    log::warn!(DEPLOYMENT_ID = id.as_str(); "deployment {id} stopped by shutdown; message left for the next start");
                    self.forget_retry(&id);
                    return;
                }
                self.finish_and_ack(&id, &msg).await;
                log::info!(
                    DEPLOYMENT_ID = id.as_str();
                    "deployment {id} finished: {status:?}"
                );
                self.release_memory_if_idle().await;
            }
            Outcome::Left(why) => {
                log::warn!(DEPLOYMENT_ID = id.as_str(); "deployment {id}: {why}; message left in the queue");
                self.retry_later(id, msg);
            }
            Outcome::Refused(why) => {
                log::error!(DEPLOYMENT_ID = id.as_str(); "deployment {id} cannot run on this host: {why}; message rejected");
                self.forget_retry(&id);
                if let Err(e) = self.queue.reject(&msg, &why).await {
                    log::error!("rejecting message {}: {e}", msg.id);
                }
            }
        }
    }

    /// Handles a message that was left (its final status not written, say) again after a
    /// growing, jittered delay ([`Timings::retry_base`] doubling to [`Timings::retry_max`]),
    /// so that it is not stuck until the next restart (a spool keeps it in `processing/`;
    /// SQS would also offer it again once its visibility lapses, and the dedupe store makes
    /// the two meet safely). Not while the agent is stopping, and not for more than
    /// [`Timings::retry_cap`] deployments at once (the others wait for redelivery).
    fn retry_later(self: &Arc<Self>, id: String, msg: Received) {
        if self.stopping.is_cancelled() || self.engine.is_stopping() {
            self.forget_retry(&id);
            return;
        }
        let t = self.timings();
        let delay = {
            let mut r = self.retries.lock().unwrap_or_else(|e| e.into_inner());
            if !r.contains_key(&id) && r.len() >= t.retry_cap {
                log::warn!(
                    DEPLOYMENT_ID = id.as_str();
                    "deployment {id}: {} deployments already wait for a retry; its message waits for redelivery or the next start",
                    r.len()
                );
                return;
            }
            r.entry(id.clone())
                .or_insert_with(|| Backoff::unbounded(t.retry_base, t.retry_max))
                .next_delay()
                .unwrap_or(t.retry_max)
        };
        log::info!(DEPLOYMENT_ID = id.as_str(); "deployment {id}: trying its message again in {:.1}s", delay.as_secs_f64());
        let me = self.clone();
        self.spawn(async move {
            tokio::select! {
                _ = me.stopping.cancelled() => me.forget_retry(&id),
                _ = tokio::time::sleep(delay) => {
                    if me.engine.is_stopping() {
                        me.forget_retry(&id);
                    } else {
                        me.clone().handle(msg).await;
                    }
                }
            }
        });
    }

    /// Hands the heap a deployment used back to the kernel once no other deployment runs
    /// here: an agent waits far longer than it works.
    async fn release_memory_if_idle(&self) {
        let idle = self.running.lock().unwrap_or_else(|e| e.into_inner()).len() <= 1;
        if idle {
            blocking(pier_sys::memory::release_free_memory).await;
        }
    }

    /// Drops the retry schedule of `id` (its deployment finished or was given up here).
    fn forget_retry(&self, id: &str) {
        self.retries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Runs one command to its end and writes its final status.
    async fn run_command(self: Arc<Self>, cmd: &Command) -> Outcome {
        // A command waiting for a slot stops waiting once the agent stops: it has not started.
        let _slot = tokio::select! {
            slot = self.slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(e) => return Outcome::Left(e.to_string()),
            },
            _ = self.stopping.cancelled() => {
                return Outcome::Left("the agent is stopping; not started".to_string())
            }
        };
        if let Err(e) = self.save_command(cmd).await {
            return Outcome::Left(format!("saving the command: {e}"));
        }
        // A sink this host cannot reach (S3 status without AWS access) will not appear by
        // retrying: such a command goes to the dead-letter queue with the reason.
        let sink: Arc<dyn StatusSink> = match self.sinks.open(&cmd.status) {
            Ok(s) => s,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        let req = match self.request(cmd) {
            Ok(r) => r,
            Err(e) => return Outcome::Refused(e.to_string()),
        };

        // Each journal update becomes a status record; a writer task sends the latest one,
        // so a slow sink never holds up the deployment.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<StatusRecord>();
        let writer_sink = sink.clone();
        let writer = self.spawn(async move {
            while let Some(mut rec) = rx.recv().await {
                while let Ok(newer) = rx.try_recv() {
                    rec = newer;
                }
                if let Err(e) = writer_sink.write(&rec).await {
                    log::warn!("status write for {}: {e}", rec.deployment_id);
                }
            }
        });
        let observer = StatusObserver {
            host_id: self.host_id.clone(),
            tx,
        };
        let outcome = self.engine.deploy(&req, &observer).await;
        drop(observer);
        let _ = writer.await;
        let rec = match outcome {
            Ok(journal) => status_record(&self.host_id, &journal),
            // Already on disk from an earlier delivery: its own status stands, and a later
            // delivery finds its journal and reports it. Not started because the agent is
            // stopping: the next start runs it.
            Err(
                e @ (pier_engine::deploy::DeployError::Duplicate(_)
                | pier_engine::deploy::DeployError::ShuttingDown(_)),
            ) => return Outcome::Left(e.to_string()),
            Err(e) => {
                // It will fail the same way every time, so once that is reported the message
                // has been processed.
                log::error!(DEPLOYMENT_ID = cmd.deployment_id.as_str(); "deployment {} cannot start: {e}", cmd.deployment_id);
                let mut rec = StatusRecord::new(&self.host_id, &cmd.deployment_id);
                rec.status = pier_protocol::DeploymentStatus::Failed;
                rec.error = Some(e.to_string());
                rec
            }
        };
        match write_with_retry(&*sink, &rec, &self.timings().status_write_retry).await {
            Ok(()) => Outcome::Finished(rec.status),
            Err(e) => Outcome::Left(format!("final status for {}: {e}", rec.deployment_id)),
        }
    }

    fn request(&self, cmd: &Command) -> Result<Request, RequestError> {
        let events = match &cmd.events {
            None => None,
            Some(names) => Some(
                names
                    .iter()
                    .map(|n| n.parse::<LifecycleEvent>().map_err(RequestError::event))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let file_exists_behavior = cmd
            .file_exists_behavior
            .as_deref()
            .map(|b| {
                b.parse::<FileExistsBehavior>()
                    .map_err(RequestError::file_exists_behavior)
            })
            .transpose()?;
        Ok(Request {
            deployment_id: cmd.deployment_id.clone(),
            application_name: cmd.application_name.clone(),
            deployment_group_name: cmd.deployment_group_name.clone(),
            deployment_group_id: cmd.deployment_group_id.clone(),
            source: Source::Remote {
                revision: cmd.revision.clone(),
                fetcher: self.fetcher.clone(),
            },
            events,
            file_exists_behavior,
            appspec_filename: None,
            bundle_env: bundle_env(&cmd.revision),
            ignore_application_stop_failures: cmd.ignore_application_stop_failures,
        })
    }

    async fn write_final(&self, cmd: &Command, journal: &Journal) -> Result<(), TransportError> {
        let sink = self.sinks.open(&cmd.status)?;
        write_with_retry(
            &*sink,
            &status_record(&self.host_id, journal),
            &self.timings().status_write_retry,
        )
        .await
    }

    async fn ack(&self, msg: &Received) {
        if let Err(e) = self.queue.ack(msg).await {
            log::error!("acknowledging message {}: {e}", msg.id);
        }
    }

    async fn save_command(&self, cmd: &Command) -> std::io::Result<()> {
        let path =
            commands_dir(self.engine.root().dir()).join(format!("{}.json", cmd.deployment_id));
        let bytes = cmd.to_json();
        blocking(move || pier_sys::atomic_write(&path, &bytes)).await
    }

    async fn saved_command(&self, deployment_id: &str) -> Option<Command> {
        let path = commands_dir(self.engine.root().dir()).join(format!("{deployment_id}.json"));
        let bytes = blocking(move || std::fs::read(path)).await.ok()?;
        Command::from_json(&bytes).ok()
    }
}

/// Runs blocking file work (fsyncs, removals) on the blocking pool, not an async worker.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Why a valid command cannot become a deployment request on this agent.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("events: {0}")]
    Event(String),
    #[error("file_exists_behavior: {0}")]
    FileExistsBehavior(String),
}

impl RequestError {
    fn event(e: impl std::fmt::Display) -> RequestError {
        RequestError::Event(e.to_string())
    }

    fn file_exists_behavior(e: impl std::fmt::Display) -> RequestError {
        RequestError::FileExistsBehavior(e.to_string())
    }
}

/// How a command's processing ended, which decides what happens to its message.
enum Outcome {
    /// The final status is written: acknowledge.
    Finished(pier_protocol::DeploymentStatus),
    /// Not finished here (shutting down, status not written, ...): leave the message.
    Left(String),
    /// Can never run on this host: reject it to the dead-letter queue with the reason.
    Refused(String),
}

/// A deployment id claimed by this process; released when dropped, however the task ends.
struct Claim {
    running: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Claim {
    /// Claims `id`, or `None` when a task of this process already holds it.
    fn take(running: &Arc<Mutex<HashSet<String>>>, id: &str) -> Option<Claim> {
        let fresh = running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string());
        fresh.then(|| Claim {
            running: running.clone(),
            id: id.to_string(),
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Where the daemon keeps the command of each deployment it started, so that after a crash it
/// still knows where that deployment's status goes.
fn commands_dir(root: &Path) -> PathBuf {
    root.join("commands")
}

/// Writes a final status record, retrying transient failures on `schedule`.
async fn write_with_retry(
    sink: &dyn StatusSink,
    rec: &StatusRecord,
    schedule: &Backoff,
) -> Result<(), TransportError> {
    schedule
        .retry(
            |attempt| async move {
                let written = sink.write(rec).await;
                if let Err(e) = &written {
                    if e.is_transient() {
                        log::warn!(
                            "status write for {} (attempt {attempt}): {e}; retrying",
                            rec.deployment_id
                        );
                    }
                }
                written
            },
            TransportError::is_transient,
        )
        .await
}

/// Turns journal updates into status records for the writer task.
struct StatusObserver {
    host_id: String,
    tx: tokio::sync::mpsc::UnboundedSender<StatusRecord>,
}

impl Observer for StatusObserver {
    fn update(&self, journal: &Journal) {
        let _ = self.tx.send(status_record(&self.host_id, journal));
    }
}

/// The status record of a deployment on this host, from its journal.
pub(crate) fn status_record(host_id: &str, journal: &Journal) -> StatusRecord {
    let mut rec = StatusRecord::new(host_id, &journal.deployment_id);
    rec.status = journal.status;
    rec.error = journal.error.clone();
    rec.events = journal
        .events
        .iter()
        .map(|e| pier_protocol::EventStatus {
            name: e.event.clone(),
            status: e.status,
            started: e.started_at,
            ended: e.ended_at,
            exit_code: e.exit_code,
            failing_script: e.script.clone(),
            log_tail: e.tail.clone(),
            diagnostics: e.diagnostics(),
            ignored: e.ignored,
        })
        .collect();
    rec
}

/// The `BUNDLE_*` variables CodeDeploy gives hooks for a revision.
fn bundle_env(revision: &Revision) -> Vec<(String, String)> {
    let mut env = Vec::new();
    match revision {
        Revision::S3 {
            bucket,
            key,
            version_id,
            etag,
            ..
        } => {
            env.push(("BUNDLE_BUCKET".to_string(), bucket.clone()));
            env.push(("BUNDLE_KEY".to_string(), key.clone()));
            if let Some(v) = version_id {
                env.push(("BUNDLE_VERSION".to_string(), v.clone()));
            }
            if let Some(e) = etag {
                env.push(("BUNDLE_ETAG".to_string(), e.clone()));
            }
        }
        Revision::Github { commit, .. } => {
            env.push(("BUNDLE_COMMIT".to_string(), commit.clone()));
        }
        Revision::Http { .. } | Revision::Local { .. } => {}
    }
    env
}

/// Pings the systemd watchdog at half its interval when the unit asks for one, as long as the
/// poll loop went round within `stale_after` (or the agent is stopping, when the loop has
/// ended).
async fn watchdog(
    shutdown: CancellationToken,
    heartbeat: Arc<Mutex<std::time::Instant>>,
    stale_after: Duration,
) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        let last = *heartbeat.lock().unwrap_or_else(|e| e.into_inner());
        if shutdown.is_cancelled() || last.elapsed() < stale_after {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        } else {
            log::error!(
                "poll loop silent for {:?}: not feeding the watchdog",
                last.elapsed()
            );
        }
    }
}

/// The registry writer `config` asks for, or `None` (said once in the log, with the reason).
/// An S3 registry on a host without AWS access is a configuration that cannot work.
async fn registrar(
    config: &Config,
    host_id: &str,
    queue: String,
    aws: Option<&AwsClients>,
) -> Result<Option<Arc<Registrar>>, DaemonError> {
    let spec = match &config.registry {
        RegistryConfig::Announce(spec) => spec,
        RegistryConfig::Disabled => {
            log::info!(
                "host registry off (registry.enabled: false): controllers will not list this host"
            );
            return Ok(None);
        }
        RegistryConfig::NotConfigured => {
            log::warn!(
                "this host is not registered: with the sqs transport there is no default registry; \
                 set registry: {{bucket: B, prefix: P}} (or registry: {{enabled: false}} to silence this)"
            );
            return Ok(None);
        }
    };
    let store = pier_transport::open_store(spec, aws).map_err(|e| {
        DaemonError::Setup(format!(
            "registry: {e} (or set registry: {{enabled: false}})"
        ))
    })?;
    let availability_zone = match &config.availability_zone {
        Some(zone) => Some(zone.clone()),
        None if pier_transport::aws::looks_like_ec2() => {
            pier_transport::aws::ec2_availability_zone().await
        }
        None => None,
    };
    let who = Announcement {
        host_id: host_id.to_string(),
        tags: config.tags.clone(),
        availability_zone,
        queue: Some(queue),
        deployment_groups: config.daemon.deployment_groups.clone(),
    };
    Ok(Some(Arc::new(Registrar::new(
        Arc::from(store),
        who,
        config.daemon.heartbeat,
    ))))
}

/// The host id: configured, else the EC2 instance id (asked of IMDS only on a machine whose
/// firmware says it is EC2, so no other host ever sends that request), else the machine id,
/// else the hostname.
pub(crate) async fn resolve_host_id(config: &Config) -> String {
    if let Some(id) = &config.host_id {
        return id.clone();
    }
    if pier_transport::aws::looks_like_ec2() {
        if let Some(id) = pier_transport::aws::ec2_instance_id().await {
            return id;
        }
    }
    if let Ok(id) = std::fs::read_to_string("/etc/machine-id") {
        let id = id.trim();
        if pier_protocol::is_valid_id(id) {
            return id.to_string();
        }
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| pier_protocol::is_valid_id(h))
        .unwrap_or_else(|| "localhost".to_string())
}

/// Whether AWS clients can be built without guessing: a region must come from the config,
/// the environment or a profile, or the host must be EC2 (where IMDS answers). Off EC2 this
/// keeps the SDK from probing the instance metadata address at all.
fn aws_settings_usable(config: &Config) -> Result<(), String> {
    let env = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let profile_file = std::env::var_os("HOME")
        .map(|h| Path::new(&h).join(".aws/config").exists())
        .unwrap_or(false);
    if config.aws.region.is_some()
        || env("AWS_REGION")
        || env("AWS_DEFAULT_REGION")
        || env("AWS_PROFILE")
        || profile_file
        || pier_transport::aws::looks_like_ec2()
    {
        Ok(())
    } else {
        Err("no AWS region: set aws.region in the agent config or AWS_REGION".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_revisions_give_codedeploy_bundle_variables() {
        let env = bundle_env(&Revision::S3 {
            bucket: "b".into(),
            key: "k.tgz".into(),
            version_id: Some("v1".into()),
            etag: None,
            bundle_type: pier_protocol::BundleType::Tgz,
            sha256: "0".repeat(64),
        });
        assert_eq!(
            env,
            vec![
                ("BUNDLE_BUCKET".to_string(), "b".to_string()),
                ("BUNDLE_KEY".to_string(), "k.tgz".to_string()),
                ("BUNDLE_VERSION".to_string(), "v1".to_string()),
            ]
        );
    }

    #[test]
    fn status_record_carries_the_failing_event() {
        let mut j = Journal {
            deployment_id: "d-1".into(),
            application_name: "a".into(),
            deployment_group_name: "g".into(),
            deployment_group_id: "g".into(),
            status: state::DeploymentStatus::Failed,
            started_at: chrono::Utc::now(),
            ended_at: None,
            events: vec![state::EventRecord::pending("ValidateService")],
            error: Some("ValidateService: script x exited with code 3".into()),
            recovered: false,
            running_hook: None,
        };
        j.events[0].status = state::EventState::Failed;
        j.events[0].exit_code = Some(3);
        j.events[0].script = Some("x".into());
        j.events[0].tail = Some("boom".into());
        j.events[0].message = Some("script x exited with code 3".into());
        j.events[0].code = Some(pier_protocol::ErrorCode::ScriptFailed);
        let rec = status_record("h1", &j);
        let d = rec.events[0].diagnostics.as_ref().expect("diagnostics");
        assert_eq!(d.error_code, pier_protocol::ErrorCode::ScriptFailed);
        assert_eq!(d.script_name.as_deref(), Some("x"));
        assert_eq!(d.message, "script x exited with code 3");
        assert_eq!(d.log_tail.as_deref(), Some("boom"));
        assert_eq!(rec.status, pier_protocol::DeploymentStatus::Failed);
        assert_eq!(rec.events[0].status, pier_protocol::EventState::Failed);
        assert_eq!(rec.events[0].exit_code, Some(3));
        assert_eq!(rec.events[0].failing_script.as_deref(), Some("x"));
        assert_eq!(rec.events[0].log_tail.as_deref(), Some("boom"));
        // A record the controller can parse back.
        StatusRecord::from_json(&rec.to_json()).unwrap();
        assert!(!rec.events[0].ignored);

        // A failure the deployment asked to ignore keeps its cause and says it was ignored.
        j.events[0].ignored = true;
        let rec = status_record("h1", &j);
        assert!(rec.events[0].ignored && !rec.events[0].failed_deployment());
        assert!(rec.events[0].diagnostics.is_some());
        assert_eq!(StatusRecord::from_json(&rec.to_json()).unwrap(), rec);
    }
}
