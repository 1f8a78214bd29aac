//! The agent's configuration file (`/etc/pier/agent.yml` by default).
//!
//! Read in two steps: the YAML is deserialized into a plain [`RawConfig`] (every field
//! optional, unknown keys collected rather than refused), then [`Config::from_raw`] builds the
//! validated [`Config`] and reports every problem at once. A syntax or type error that stops
//! the YAML parser is reported with its `file:line:col`. Every key is documented in
//! `docs/configuration.md`; keep the two in step.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pier_protocol::signature::{PublicKey, SignaturePolicy};
use serde::Deserialize;

pub(crate) use pier_engine::hooks::HookLimits;
pub(crate) use pier_engine::settings::{BundleLimits, EngineSettings, HookEnvPolicy, HookSettings};

/// Where the agent looks for its configuration when `-c` is not given.
pub(crate) const DEFAULT_CONFIG_PATH: &str = "/etc/pier/agent.yml";

/// Host tag bounds (those of EC2 tags, which CodeDeploy's tag filters match).
const MAX_TAGS: usize = 50;
const MAX_TAG_KEY_LEN: usize = 128;
const MAX_TAG_VALUE_LEN: usize = 256;
/// The longest availability zone name accepted (real ones are about 15 characters).
const MAX_ZONE_LEN: usize = 64;
/// The shortest heartbeat interval: each one is a write to the registry store.
const MIN_HEARTBEAT: Duration = Duration::from_secs(5);

/// The longest public key file read (a key is 45 bytes of text).
const MAX_KEY_FILE: u64 = 4096;

/// Environment variables that never reach a hook, whatever `hooks.env.pass` says: the agent's
/// own credentials and the knobs that would point a script's AWS tools at them.
const NEVER_PASSED_PREFIXES: &[&str] = &["AWS_", "PIER_AGENT_"];

/// One problem found in the configuration, under its dotted key
/// (`hooks.kill_grace_seconds`), or empty for the file.
pub use pier_protocol::problems::Problem as ConfigProblem;
use pier_protocol::problems::ProblemList;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{path}: {} problem(s):\n{}", problems.len(), ProblemList(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<ConfigProblem>,
    },
}

/// The file as written: every field optional, unknown keys kept so they can be reported.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawConfig {
    pub(crate) root_dir: Option<PathBuf>,
    pub(crate) max_revisions: Option<i64>,
    pub(crate) host_id: Option<String>,
    pub(crate) hooks: Option<RawHooks>,
    pub(crate) bundle: Option<RawBundle>,
    pub(crate) install: Option<RawInstall>,
    pub(crate) daemon: Option<RawDaemon>,
    pub(crate) transport: Option<RawTransport>,
    pub(crate) aws: Option<RawAws>,
    pub(crate) github: Option<RawGithub>,
    pub(crate) trusted_keys: Option<Vec<RawTrustedKey>>,
    pub(crate) signature_max_age_seconds: Option<i64>,
    pub(crate) tags: Option<BTreeMap<String, serde_yaml::Value>>,
    pub(crate) availability_zone: Option<String>,
    pub(crate) registry: Option<RawRegistry>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

/// `registry:` as written: an S3 place, a directory, or `enabled: false`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawRegistry {
    pub(crate) enabled: Option<bool>,
    pub(crate) bucket: Option<String>,
    pub(crate) prefix: Option<String>,
    pub(crate) dir: Option<PathBuf>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

/// One `trusted_keys` entry: a public key given inline or in a file, and optionally its id
/// (checked against the key, so a key pasted under the wrong id is caught).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawTrustedKey {
    pub(crate) id: Option<String>,
    pub(crate) public_key: Option<String>,
    pub(crate) file: Option<PathBuf>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawHooks {
    pub(crate) kill_grace_seconds: Option<i64>,
    pub(crate) log_max_bytes: Option<i64>,
    pub(crate) log_keep: Option<i64>,
    pub(crate) tasks_max: Option<i64>,
    pub(crate) memory_max_bytes: Option<i64>,
    pub(crate) env: Option<RawHookEnv>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawHookEnv {
    pub(crate) pass: Option<Vec<String>>,
    pub(crate) set: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawBundle {
    pub(crate) max_bytes: Option<i64>,
    pub(crate) max_entries: Option<i64>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

/// `install:` as written.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawInstall {
    pub(crate) verify: Option<String>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawDaemon {
    pub(crate) deployment_groups: Option<Vec<String>>,
    pub(crate) concurrency: Option<i64>,
    pub(crate) shutdown_grace_seconds: Option<i64>,
    pub(crate) poll_wait_seconds: Option<i64>,
    pub(crate) visibility_timeout_seconds: Option<i64>,
    pub(crate) retry_base_seconds: Option<i64>,
    pub(crate) retry_max_seconds: Option<i64>,
    pub(crate) heartbeat_seconds: Option<i64>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawTransport {
    #[serde(rename = "type")]
    pub(crate) kind: Option<String>,
    pub(crate) spool_dir: Option<PathBuf>,
    pub(crate) queue_url: Option<String>,
    pub(crate) queue_name: Option<String>,
    pub(crate) create_queue: Option<bool>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawAws {
    pub(crate) region: Option<String>,
    pub(crate) endpoint_url: Option<String>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawGithub {
    pub(crate) token: Option<String>,
    pub(crate) api_url: Option<String>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

/// Where commands come from and where status goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TransportConfig {
    /// Commands are JSON files renamed into `spool_dir`.
    Spool { spool_dir: PathBuf },
    /// Commands arrive on this host's SQS queue.
    Sqs {
        queue_url: Option<String>,
        queue_name: Option<String>,
        create_queue: bool,
    },
}

/// Daemon settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DaemonSettings {
    /// Deployment group names this host belongs to (announced in the registry; groups select
    /// the hosts that name them).
    pub(crate) deployment_groups: Vec<String>,
    /// How many deployments (of different groups) may run at once.
    pub(crate) concurrency: usize,
    /// How long a running hook may go on after SIGTERM before it is stopped.
    pub(crate) shutdown_grace: Duration,
    /// Long-poll wait of one receive (SQS allows at most 20 s).
    pub(crate) poll_wait: Duration,
    /// How long a received message is kept invisible at a time while its deployment runs
    /// (renewed every third of it).
    pub(crate) visibility_timeout: Duration,
    /// First delay before a left message is handled again in this process; it doubles (with
    /// jitter) up to `retry_max`.
    pub(crate) retry_base: Duration,
    pub(crate) retry_max: Duration,
    /// How often the registry entry is refreshed.
    pub(crate) heartbeat: Duration,
}

/// Where the agent announces itself (its registry entry, `hosts/{host_id}.json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RegistryConfig {
    /// Write the entry to this store (an S3 bucket and prefix, or a directory).
    Announce(pier_protocol::StatusSinkSpec),
    /// `registry: {enabled: false}`.
    Disabled,
    /// The SQS transport and no `registry:` given: there is no place every controller would
    /// look, so the agent does not guess one.
    NotConfigured,
}

/// AWS access overrides; everything else comes from the standard credential chain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct AwsSettings {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

/// GitHub revision access.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct GithubSettings {
    pub(crate) token: Option<String>,
    pub(crate) api_url: String,
}

impl fmt::Debug for GithubSettings {
    // The token never reaches a log line, not even a debug one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GithubSettings")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("api_url", &self.api_url)
            .finish()
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The deployment root: revisions, logs, journals, per-group state.
    pub(crate) root_dir: PathBuf,
    /// Deployments kept per deployment group (the last successful and the running one are
    /// always kept on top of this).
    pub(crate) max_revisions: usize,
    /// Configured host id; when absent the daemon asks IMDS, then uses the machine id.
    pub(crate) host_id: Option<String>,
    pub(crate) hooks: HookSettings,
    pub(crate) bundle: BundleLimits,
    /// How Install recognises a file it placed before as unchanged.
    pub(crate) install_verify: pier_engine::install::Verify,
    pub(crate) daemon: DaemonSettings,
    pub(crate) transport: TransportConfig,
    pub(crate) aws: AwsSettings,
    pub(crate) github: GithubSettings,
    /// The trusted keys (none: the agent runs open) and the replay window.
    pub(crate) signing: SignaturePolicy,
    /// Host tags announced in the registry (what deployment groups select hosts by).
    pub(crate) tags: BTreeMap<String, String>,
    /// Configured availability zone; when absent the daemon asks IMDS on EC2.
    pub(crate) availability_zone: Option<String>,
    pub(crate) registry: RegistryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config::from_raw(RawConfig::default()).expect("the defaults are valid")
    }
}

impl Config {
    /// `pier-agent check-config`: loads the file (which must exist) and prints what the agent
    /// would run with, or every problem; 0 when valid, 78 (EX_CONFIG) when not.
    pub fn check(path: &Path) -> i32 {
        match Config::load(path, true) {
            Ok(config) => {
                print!("{}", config.summary(path));
                0
            }
            Err(e) => {
                eprintln!("pier-agent: {e}");
                78
            }
        }
    }

    /// A few lines saying what matters most of this configuration, for an operator checking
    /// what an installer or a hand edit produced.
    fn summary(&self, path: &Path) -> String {
        let transport = match &self.transport {
            TransportConfig::Spool { spool_dir } => format!("spool {}", spool_dir.display()),
            TransportConfig::Sqs {
                queue_url,
                queue_name,
                ..
            } => format!(
                "sqs {}",
                queue_url
                    .as_deref()
                    .or(queue_name.as_deref())
                    .unwrap_or("(queue named after the host id)")
            ),
        };
        let list = |items: Vec<String>| {
            if items.is_empty() {
                "none".to_string()
            } else {
                items.join(", ")
            }
        };
        let tags = list(self.tags.iter().map(|(k, v)| format!("{k}={v}")).collect());
        let groups = list(self.daemon.deployment_groups.clone());
        let keys = self.signing.key_ids().len();
        let signing = if keys == 0 {
            "none: the agent runs OPEN (any command is run)".to_string()
        } else {
            format!("{keys} trusted key(s)")
        };
        let registry = match &self.registry {
            RegistryConfig::Announce(pier_protocol::StatusSinkSpec::S3 { bucket, prefix }) => {
                format!("s3://{bucket}/{prefix}")
            }
            RegistryConfig::Announce(pier_protocol::StatusSinkSpec::Local { dir }) => dir.clone(),
            RegistryConfig::Disabled => "disabled".to_string(),
            RegistryConfig::NotConfigured => {
                "not configured (pier hosts will not list this host)".to_string()
            }
        };
        format!(
            "{}: valid\n  root_dir: {}\n  transport: {transport}\n  region: {}\n  tags: {tags}\n  deployment groups: {groups}\n  registry: {registry}\n  signing: {signing}\n",
            path.display(),
            self.root_dir.display(),
            self.aws.region.as_deref().unwrap_or("(from the environment or instance metadata)"),
        )
    }

    /// What the engine is told of this configuration.
    pub fn engine_settings(&self) -> EngineSettings {
        EngineSettings {
            root_dir: self.root_dir.clone(),
            max_revisions: self.max_revisions,
            hooks: self.hooks.clone(),
            bundle: self.bundle,
            install_verify: self.install_verify,
        }
    }

    /// Loads `path`. When `required` is false and the file does not exist, the defaults are used
    /// (so `deploy-local` works on a host that was never configured).
    pub(crate) fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Config::parse(path, &text)
    }

    /// Parses configuration text; `path` is used in messages only.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| {
                let (line, col) = e
                    .location()
                    .map(|l| (l.line(), l.column()))
                    .unwrap_or((1, 1));
                ConfigError::Syntax {
                    path: path.to_path_buf(),
                    line,
                    col,
                    message: e.to_string(),
                }
            })?
        };
        Config::from_raw(raw).map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }

    /// Builds the validated configuration, collecting every problem.
    pub(crate) fn from_raw(raw: RawConfig) -> Result<Config, Vec<ConfigProblem>> {
        let mut p = Problems::default();
        p.unknown("", &raw.unknown);

        let root_dir = raw
            .root_dir
            .unwrap_or_else(|| PathBuf::from(pier_protocol::DEFAULT_ROOT_DIR));
        if !root_dir.is_absolute() {
            p.push("root_dir", "must be an absolute path");
        }
        let max_revisions = p.positive("max_revisions", raw.max_revisions, 5);
        if let Some(id) = &raw.host_id {
            if let Err(e) = pier_protocol::check_id(id) {
                p.push("host_id", &e.to_string());
            }
        }

        let hooks_raw = raw.hooks.unwrap_or_default();
        p.unknown("hooks", &hooks_raw.unknown);
        let env_raw = hooks_raw.env.unwrap_or_default();
        p.unknown("hooks.env", &env_raw.unknown);
        let pass = env_raw.pass.unwrap_or_else(|| {
            ["LANG", "LC_ALL", "TZ"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        });
        for name in &pass {
            if NEVER_PASSED_PREFIXES
                .iter()
                .any(|pre| name.starts_with(pre))
            {
                p.push(
                    "hooks.env.pass",
                    &format!(
                        "{name} is never passed to hooks (the agent's credentials stay with the agent)"
                    ),
                );
            }
        }
        let set = env_raw.set.unwrap_or_default();
        for name in set.keys() {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                p.push("hooks.env.set", &format!("{name:?} is not a variable name"));
            }
        }
        let hooks = HookSettings {
            kill_grace: Duration::from_secs(p.positive(
                "hooks.kill_grace_seconds",
                hooks_raw.kill_grace_seconds,
                10,
            ) as u64),
            log_max_bytes: p.positive("hooks.log_max_bytes", hooks_raw.log_max_bytes, 10 << 20)
                as u64,
            log_keep: p.positive("hooks.log_keep", hooks_raw.log_keep, 5),
            env: HookEnvPolicy { pass, set },
            limits: HookLimits {
                pids_max: p.optional_positive("hooks.tasks_max", hooks_raw.tasks_max),
                memory_max: p
                    .optional_positive("hooks.memory_max_bytes", hooks_raw.memory_max_bytes),
            },
        };

        let tags = host_tags(&mut p, raw.tags.unwrap_or_default());
        if let Some(zone) = &raw.availability_zone {
            if zone.is_empty()
                || zone.len() > MAX_ZONE_LEN
                || !zone
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                p.push(
                    "availability_zone",
                    &format!(
                        "must be 1 to {MAX_ZONE_LEN} letters, digits, `-` or `_` (e.g. us-east-1a)"
                    ),
                );
            }
        }

        let bundle_raw = raw.bundle.unwrap_or_default();
        p.unknown("bundle", &bundle_raw.unknown);
        let bundle = BundleLimits {
            max_bytes: p.positive("bundle.max_bytes", bundle_raw.max_bytes, 4 << 30) as u64,
            max_entries: p.positive("bundle.max_entries", bundle_raw.max_entries, 1_000_000) as u64,
        };

        let install_raw = raw.install.unwrap_or_default();
        p.unknown("install", &install_raw.unknown);
        let install_verify = match install_raw.verify.as_deref() {
            None | Some("metadata") => pier_engine::install::Verify::Metadata,
            Some("content") => pier_engine::install::Verify::Content,
            Some(other) => {
                p.push(
                    "install.verify",
                    &format!(
                        "must be metadata (trust a file pier placed while its inode, size, \
                         mtime and ctime are unchanged) or content (hash both sides of every \
                         unchanged file), not {:?}",
                        pier_protocol::quote::bounded(other, 64)
                    ),
                );
                pier_engine::install::Verify::Metadata
            }
        };

        let daemon_raw = raw.daemon.unwrap_or_default();
        p.unknown("daemon", &daemon_raw.unknown);
        let daemon = DaemonSettings {
            deployment_groups: daemon_raw.deployment_groups.unwrap_or_default(),
            concurrency: p.positive("daemon.concurrency", daemon_raw.concurrency, 4),
            shutdown_grace: Duration::from_secs(p.positive(
                "daemon.shutdown_grace_seconds",
                daemon_raw.shutdown_grace_seconds,
                60,
            ) as u64),
            poll_wait: Duration::from_secs(p.positive(
                "daemon.poll_wait_seconds",
                daemon_raw.poll_wait_seconds,
                20,
            ) as u64),
            visibility_timeout: Duration::from_secs(p.positive(
                "daemon.visibility_timeout_seconds",
                daemon_raw.visibility_timeout_seconds,
                300,
            ) as u64),
            retry_base: Duration::from_secs(p.positive(
                "daemon.retry_base_seconds",
                daemon_raw.retry_base_seconds,
                5,
            ) as u64),
            retry_max: Duration::from_secs(p.positive(
                "daemon.retry_max_seconds",
                daemon_raw.retry_max_seconds,
                300,
            ) as u64),
            heartbeat: Duration::from_secs(p.positive(
                "daemon.heartbeat_seconds",
                daemon_raw.heartbeat_seconds,
                60,
            ) as u64),
        };
        if daemon.heartbeat < MIN_HEARTBEAT {
            p.push(
                "daemon.heartbeat_seconds",
                &format!(
                    "must be at least {} (every heartbeat is a write to the registry)",
                    MIN_HEARTBEAT.as_secs()
                ),
            );
        }
        if daemon.poll_wait > Duration::from_secs(20) {
            p.push(
                "daemon.poll_wait_seconds",
                "must be at most 20 (the longest SQS long poll)",
            );
        }
        if daemon.visibility_timeout < Duration::from_secs(3)
            || daemon.visibility_timeout > Duration::from_secs(12 * 3600)
        {
            p.push(
                "daemon.visibility_timeout_seconds",
                "must be from 3 to 43200 (SQS allows at most 12 hours)",
            );
        }
        if daemon.retry_max < daemon.retry_base {
            p.push(
                "daemon.retry_max_seconds",
                "must not be less than daemon.retry_base_seconds",
            );
        }

        let t = raw.transport.unwrap_or_default();
        p.unknown("transport", &t.unknown);
        // Where status goes is not the agent's choice: each command names its status sink.
        let transport = match t.kind.as_deref().unwrap_or("spool") {
            "spool" => {
                for (key, set) in [
                    ("queue_url", t.queue_url.is_some()),
                    ("queue_name", t.queue_name.is_some()),
                    ("create_queue", t.create_queue.is_some()),
                ] {
                    if set {
                        p.push(
                            &format!("transport.{key}"),
                            "applies only to `type: sqs`; remove it or set transport.type: sqs",
                        );
                    }
                }
                if t.spool_dir.as_ref().is_some_and(|d| !d.is_absolute()) {
                    p.push("transport.spool_dir", "must be an absolute path");
                }
                TransportConfig::Spool {
                    spool_dir: t
                        .spool_dir
                        .unwrap_or_else(|| root_dir.join(pier_protocol::SPOOL_DIR_NAME)),
                }
            }
            "sqs" => {
                if t.spool_dir.is_some() {
                    p.push(
                        "transport.spool_dir",
                        "applies only to `type: spool`; remove it",
                    );
                }
                if t.queue_url.is_none() && t.create_queue != Some(true) {
                    p.push(
                        "transport.queue_url",
                        "is required with `type: sqs` unless create_queue: true (the agent then \
                         finds or creates `queue_name`, default pier-HOST_ID)",
                    );
                }
                if let Some(url) = &t.queue_url {
                    let scheme_ok = ["https://", "http://"].iter().any(|scheme| {
                        url.strip_prefix(scheme).is_some_and(|rest| {
                            !rest.is_empty() && !rest.contains(char::is_whitespace)
                        })
                    });
                    if !scheme_ok {
                        p.push(
                            "transport.queue_url",
                            "must be an SQS queue URL, https://sqs.REGION.amazonaws.com/ACCOUNT/NAME                              (http:// for a local test endpoint)",
                        );
                    }
                }
                TransportConfig::Sqs {
                    queue_url: t.queue_url,
                    queue_name: t.queue_name,
                    create_queue: t.create_queue.unwrap_or(false),
                }
            }
            other => {
                p.push(
                    "transport.type",
                    &format!("unknown transport {other:?}; use `spool` or `sqs`"),
                );
                TransportConfig::Spool {
                    spool_dir: root_dir.join(pier_protocol::SPOOL_DIR_NAME),
                }
            }
        };

        let registry = registry_config(&mut p, raw.registry, &transport, &root_dir);

        let aws_raw = raw.aws.unwrap_or_default();
        p.unknown("aws", &aws_raw.unknown);
        if let Some(url) = &aws_raw.endpoint_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                p.push("aws.endpoint_url", "must start with http:// or https://");
            }
        }
        let aws = AwsSettings {
            region: aws_raw.region,
            endpoint_url: aws_raw.endpoint_url,
        };

        let gh = raw.github.unwrap_or_default();
        p.unknown("github", &gh.unknown);
        let github = GithubSettings {
            token: gh.token,
            api_url: gh
                .api_url
                .unwrap_or_else(|| "https://api.github.com".to_string()),
        };

        let signing = signing_policy(
            &mut p,
            raw.trusted_keys.unwrap_or_default(),
            raw.signature_max_age_seconds,
        );

        p.0.into_result()?;
        Ok(Config {
            root_dir,
            max_revisions,
            host_id: raw.host_id,
            hooks,
            bundle,
            install_verify,
            daemon,
            transport,
            aws,
            github,
            signing,
            tags,
            availability_zone: raw.availability_zone,
            registry,
        })
    }
}

/// Checks `tags:`: string keys and values, bounded like EC2 tags, at most [`MAX_TAGS`].
fn host_tags(
    p: &mut Problems,
    raw: BTreeMap<String, serde_yaml::Value>,
) -> BTreeMap<String, String> {
    if raw.len() > MAX_TAGS {
        p.push(
            "tags",
            &format!("has {} tags; at most {MAX_TAGS} are allowed", raw.len()),
        );
    }
    let mut tags = BTreeMap::new();
    for (key, value) in raw {
        let at = format!("tags.{key}");
        let bad_key = key.is_empty()
            || key.trim() != key
            || key.chars().count() > MAX_TAG_KEY_LEN
            || key.contains('=')
            || key.chars().any(char::is_control);
        if bad_key {
            p.push(
                &at,
                &format!(
                    "a tag key must be 1 to {MAX_TAG_KEY_LEN} characters, without `=`, control \
                     characters or spaces at either end"
                ),
            );
            continue;
        }
        let serde_yaml::Value::String(value) = value else {
            p.push(
                &at,
                "a tag value must be a string; quote it (e.g. `version: \"2\"`)",
            );
            continue;
        };
        if value.is_empty()
            || value.chars().count() > MAX_TAG_VALUE_LEN
            || value.chars().any(char::is_control)
        {
            p.push(
                &at,
                &format!(
                    "a tag value must be 1 to {MAX_TAG_VALUE_LEN} characters, without control \
                     characters"
                ),
            );
            continue;
        }
        tags.insert(key, value);
    }
    tags
}

/// Builds `registry:`: a place named explicitly, switched off, or the default for the
/// transport (the spool host's local status directory; nothing with SQS).
fn registry_config(
    p: &mut Problems,
    raw: Option<RawRegistry>,
    transport: &TransportConfig,
    root_dir: &Path,
) -> RegistryConfig {
    use pier_protocol::StatusSinkSpec;
    let Some(r) = raw else {
        return match transport {
            TransportConfig::Spool { .. } => RegistryConfig::Announce(StatusSinkSpec::Local {
                dir: default_status_dir(root_dir).display().to_string(),
            }),
            TransportConfig::Sqs { .. } => RegistryConfig::NotConfigured,
        };
    };
    p.unknown("registry", &r.unknown);
    if r.enabled == Some(false) {
        for (key, set) in [
            ("bucket", r.bucket.is_some()),
            ("prefix", r.prefix.is_some()),
            ("dir", r.dir.is_some()),
        ] {
            if set {
                p.push(
                    &format!("registry.{key}"),
                    "is ignored with `enabled: false`; remove one or the other",
                );
            }
        }
        return RegistryConfig::Disabled;
    }
    match (r.bucket, r.dir) {
        (Some(_), Some(_)) => {
            p.push(
                "registry",
                "give either bucket (S3) or dir (a directory), not both",
            );
            RegistryConfig::Disabled
        }
        (Some(bucket), None) => {
            if bucket.trim().is_empty() {
                p.push("registry.bucket", "must not be empty");
            }
            RegistryConfig::Announce(StatusSinkSpec::S3 {
                bucket,
                prefix: r
                    .prefix
                    .as_deref()
                    .unwrap_or(pier_protocol::DEFAULT_STATUS_PREFIX)
                    .trim_matches('/')
                    .to_string(),
            })
        }
        (None, dir) => {
            if r.prefix.is_some() {
                p.push(
                    "registry.prefix",
                    "applies only with registry.bucket; remove it or give the bucket",
                );
            }
            if dir.as_ref().is_some_and(|d| !d.is_absolute()) {
                p.push("registry.dir", "must be an absolute path");
            }
            match (dir, transport) {
                (Some(dir), _) => RegistryConfig::Announce(StatusSinkSpec::Local {
                    dir: dir.display().to_string(),
                }),
                // `registry: {}` or `{enabled: true}`: the transport's default, which SQS
                // does not have.
                (None, TransportConfig::Spool { .. }) => {
                    RegistryConfig::Announce(StatusSinkSpec::Local {
                        dir: default_status_dir(root_dir).display().to_string(),
                    })
                }
                (None, TransportConfig::Sqs { .. }) => {
                    p.push(
                        "registry",
                        "with `transport.type: sqs` name the place: registry: {bucket: B, \
                         prefix: P} (the bucket and prefix `pier hosts --status-bucket` reads)",
                    );
                    RegistryConfig::Disabled
                }
            }
        }
    }
}

/// The local status directory under a deployment root (`ROOT/status`): where `pier deploy`
/// asks spool hosts to write status by default, and so where a spool host announces itself.
pub(crate) fn default_status_dir(root_dir: &Path) -> PathBuf {
    root_dir.join(pier_protocol::STATUS_DIR_NAME)
}

/// Builds the signature policy from `trusted_keys` and `signature_max_age_seconds`, reading key
/// files, and reports every entry's problems.
fn signing_policy(
    p: &mut Problems,
    entries: Vec<RawTrustedKey>,
    max_age: Option<i64>,
) -> SignaturePolicy {
    let mut policy = SignaturePolicy::default();
    policy.max_age = Duration::from_secs(p.positive(
        "signature_max_age_seconds",
        max_age,
        pier_protocol::signature::DEFAULT_MAX_AGE.as_secs() as usize,
    ) as u64);
    for (i, entry) in entries.into_iter().enumerate() {
        let at = format!("trusted_keys[{i}]");
        p.unknown(&at, &entry.unknown);
        let key = match (&entry.public_key, &entry.file) {
            (Some(text), None) => PublicKey::from_base64(text)
                .map_err(|e| p.push(&format!("{at}.public_key"), &e.to_string()))
                .ok(),
            (None, Some(file)) => match read_public_key(file) {
                Ok(k) => Some(k),
                Err(why) => {
                    p.push(&format!("{at}.file"), &why);
                    None
                }
            },
            (Some(_), Some(_)) => {
                p.push(&at, "give either public_key or file, not both");
                None
            }
            (None, None) => {
                p.push(
                    &at,
                    "needs public_key (the base64 `pier keygen` prints) or file (a NAME.pub)",
                );
                None
            }
        };
        let Some(key) = key else { continue };
        if let Some(id) = &entry.id {
            if *id != key.key_id() {
                p.push(
                    &format!("{at}.id"),
                    &format!(
                        "`{id}` is not this key's id, which is `{}`: correct the id or the key",
                        key.key_id()
                    ),
                );
                continue;
            }
        }
        if !policy.trust(key) {
            p.push(
                &at,
                &format!(
                    "key {} is already trusted by an earlier entry",
                    key.key_id()
                ),
            );
        }
    }
    policy
}

/// Reads a `.pub` file: an absolute path to a regular file no other user may write (who could
/// write it could make the agent trust their key).
fn read_public_key(path: &Path) -> Result<PublicKey, String> {
    use std::os::unix::fs::PermissionsExt;
    if !path.is_absolute() {
        return Err(format!("`{}` must be an absolute path", path.display()));
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() || meta.len() > MAX_KEY_FILE {
        return Err(format!(
            "{} is not a public key file (one line of base64)",
            path.display()
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}: other users could replace the trusted key; run `chmod \
             644 {}`",
            path.display(),
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    PublicKey::from_base64(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The shared problem list, with the checks this file's values need.
#[derive(Default)]
struct Problems(pier_protocol::problems::Problems);

impl Problems {
    fn push(&mut self, key: &str, message: &str) {
        self.0.push(key, message);
    }

    fn unknown(&mut self, section: &str, keys: &BTreeMap<String, serde_yaml::Value>) {
        self.0.unknown(
            section,
            keys.keys(),
            "see docs/configuration.md for the keys pier reads",
        );
    }

    /// A cap that is off unless set; when set it must be a positive integer.
    fn optional_positive(&mut self, key: &str, value: Option<i64>) -> Option<u64> {
        match value {
            None => None,
            Some(v) if v > 0 => Some(v as u64),
            Some(v) => {
                self.push(key, &format!("must be a positive integer, not {v}"));
                None
            }
        }
    }

    fn positive(&mut self, key: &str, value: Option<i64>, default: usize) -> usize {
        match value {
            None => default,
            Some(v) if v > 0 => v as usize,
            Some(v) => {
                self.push(key, &format!("must be a positive integer, not {v}"));
                default
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("agent.yml"), text)
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.root_dir, PathBuf::from("/var/lib/pier"));
        assert_eq!(c.max_revisions, 5);
        assert_eq!(c.hooks.kill_grace, Duration::from_secs(10));
        assert_eq!(
            c.transport,
            TransportConfig::Spool {
                spool_dir: "/var/lib/pier/spool".into(),
            }
        );
    }

    #[test]
    fn hook_caps_are_off_by_default_and_must_be_positive() {
        let c = parse("").unwrap();
        assert_eq!(c.hooks.limits, HookLimits::default());
        let c = parse("hooks:\n  tasks_max: 64\n  memory_max_bytes: 268435456\n").unwrap();
        assert_eq!(c.hooks.limits.pids_max, Some(64));
        assert_eq!(c.hooks.limits.memory_max, Some(256 << 20));
        let err = parse("hooks:\n  tasks_max: 0\n  memory_max_bytes: -5\n").unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("expected Invalid, got {err}")
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["hooks.tasks_max", "hooks.memory_max_bytes"]);
    }

    #[test]
    fn install_verify_is_metadata_by_default_and_takes_content() {
        use pier_engine::install::Verify;
        assert_eq!(parse("").unwrap().install_verify, Verify::Metadata);
        let c = parse("install:\n  verify: content\n").unwrap();
        assert_eq!(c.install_verify, Verify::Content);
        assert_eq!(c.engine_settings().install_verify, Verify::Content);
        let err = parse("install:\n  verify: sometimes\n  colour: red\n").unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("expected Invalid, got {err}")
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"install.verify"), "{keys:?}");
        assert!(keys.iter().any(|k| k.contains("colour")), "{keys:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = parse(
            "root_dir: relative\nmax_revisions: 0\nbogus: 1\nhooks:\n  kill_grace_seconds: -1\n  env:\n    pass: [AWS_SECRET_ACCESS_KEY]\n",
        )
        .unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("expected Invalid, got {err}")
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "bogus",
                "root_dir",
                "max_revisions",
                "hooks.env.pass",
                "hooks.kill_grace_seconds"
            ]
        );
    }

    #[test]
    fn daemon_timings_are_read_and_checked_together() {
        let c = parse("daemon:\n  poll_wait_seconds: 1\n  retry_base_seconds: 1\n  retry_max_seconds: 2\n  visibility_timeout_seconds: 30\n").unwrap();
        assert_eq!(c.daemon.poll_wait, Duration::from_secs(1));
        assert_eq!(c.daemon.retry_base, Duration::from_secs(1));
        assert_eq!(c.daemon.retry_max, Duration::from_secs(2));
        assert_eq!(c.daemon.visibility_timeout, Duration::from_secs(30));
        let err = parse("daemon:\n  poll_wait_seconds: 21\n  retry_base_seconds: 10\n  retry_max_seconds: 2\n  visibility_timeout_seconds: 1\n").unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("expected Invalid, got {err}")
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "daemon.poll_wait_seconds",
                "daemon.visibility_timeout_seconds",
                "daemon.retry_max_seconds"
            ]
        );
    }

    #[test]
    fn syntax_errors_are_located() {
        let err = parse("root_dir: /x\nmax_revisions: [1\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("agent.yml:"), "{msg}");
        let ConfigError::Syntax { line, .. } = err else {
            panic!("expected Syntax")
        };
        assert!(line >= 2);
    }

    #[test]
    fn type_errors_are_located() {
        let err = parse("root_dir: /x\nmax_revisions: many\n").unwrap_err();
        let ConfigError::Syntax { line, col, .. } = err else {
            panic!("expected Syntax, got {err}")
        };
        assert_eq!((line, col), (2, 16));
    }

    #[test]
    fn sqs_needs_a_queue_or_leave_to_create_one() {
        let err = parse("transport:\n  type: sqs\n  spool_dir: /x\n").unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!()
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["transport.spool_dir", "transport.queue_url"]);
        parse("transport:\n  type: sqs\n  create_queue: true\n").unwrap();
    }

    #[test]
    fn hook_env_policy_never_leaks_and_set_wins() {
        let policy = HookEnvPolicy {
            pass: vec!["LANG".into(), "MISSING".into()],
            set: [("LANG".to_string(), "C.UTF-8".to_string())].into(),
        };
        let env = policy.resolve(|k| (k == "LANG").then(|| "en_US.UTF-8".to_string()));
        assert_eq!(env, vec![("LANG".to_string(), "C.UTF-8".to_string())]);
    }

    #[test]
    fn github_token_is_not_debug_printed() {
        let c = parse("github:\n  token: ghp_secret\n").unwrap();
        assert!(!format!("{c:?}").contains("ghp_secret"));
    }

    #[test]
    fn trusted_keys_are_read_inline_or_from_files_and_checked_together() {
        use pier_protocol::signature::SecretKey;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            SecretKey::from_seed(&[1; 32]).public_key(),
            SecretKey::from_seed(&[2; 32]).public_key(),
        );
        let file = dir.path().join("b.pub");
        std::fs::write(&file, format!("{}\n", b.to_base64())).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();

        let c = parse("").unwrap();
        assert!(c.signing.is_open());
        assert_eq!(c.signing.max_age, Duration::from_secs(3600));
        let c = parse(&format!(
            "trusted_keys:\n  - id: {}\n    public_key: {}\n  - file: {}\nsignature_max_age_seconds: 600\n",
            a.key_id(),
            a.to_base64(),
            file.display()
        ))
        .unwrap();
        let mut ids = vec![a.key_id(), b.key_id()];
        ids.sort();
        assert_eq!(c.signing.key_ids(), ids);
        assert_eq!(c.signing.max_age, Duration::from_secs(600));

        let writable = dir.path().join("w.pub");
        std::fs::write(&writable, b.to_base64()).unwrap();
        std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = parse(&format!(
            "trusted_keys:\n  - id: 0000000000000000\n    public_key: {a}\n  - public_key: nope\n  \
             - file: relative.pub\n  - file: {w}\n  - {{}}\n  - public_key: {a}\n    file: {f}\n  \
             - public_key: {a}\n  - public_key: {a}\n    colour: red\nsignature_max_age_seconds: 0\n",
            a = a.to_base64(),
            w = writable.display(),
            f = file.display()
        ))
        .unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("expected Invalid, got {err}")
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "signature_max_age_seconds",
                "trusted_keys[0].id",
                "trusted_keys[1].public_key",
                "trusted_keys[2].file",
                "trusted_keys[3].file",
                "trusted_keys[4]",
                "trusted_keys[5]",
                "trusted_keys[7].colour",
                "trusted_keys[7]",
            ],
            "{problems:?}"
        );
        assert!(problems[1].message.contains(&a.key_id()), "{problems:?}");
        assert!(problems[4].message.contains("chmod"), "{problems:?}");
        assert!(
            problems[8].message.contains("already trusted"),
            "{problems:?}"
        );
    }

    #[test]
    fn registry_defaults_to_the_spool_hosts_status_dir_and_to_nothing_with_sqs() {
        let c = parse("root_dir: /srv/pier\n").unwrap();
        assert_eq!(
            c.registry,
            RegistryConfig::Announce(pier_protocol::StatusSinkSpec::Local {
                dir: "/srv/pier/status".into()
            })
        );
        assert_eq!(c.daemon.heartbeat, Duration::from_secs(60));
        assert!(c.tags.is_empty() && c.availability_zone.is_none());
        let c = parse("transport:\n  type: sqs\n  create_queue: true\n").unwrap();
        assert_eq!(c.registry, RegistryConfig::NotConfigured);
        let c = parse("transport:\n  type: sqs\n  create_queue: true\nregistry:\n  bucket: b\n")
            .unwrap();
        assert_eq!(
            c.registry,
            RegistryConfig::Announce(pier_protocol::StatusSinkSpec::S3 {
                bucket: "b".into(),
                prefix: "pier".into()
            })
        );
        let c = parse("registry:\n  enabled: false\n").unwrap();
        assert_eq!(c.registry, RegistryConfig::Disabled);
        let c = parse("registry:\n  dir: /reg\n").unwrap();
        assert_eq!(
            c.registry,
            RegistryConfig::Announce(pier_protocol::StatusSinkSpec::Local { dir: "/reg".into() })
        );
    }

    #[test]
    fn a_queue_url_must_be_http_and_tag_keys_untrimmed_are_refused() {
        for bad in [
            "ftp://nowhere/q",
            "sqs.eu-west-1.amazonaws.com/1/q",
            "https://",
            "https://a b",
        ] {
            let err =
                parse(&format!("transport: {{type: sqs, queue_url: '{bad}'}}\n")).unwrap_err();
            let ConfigError::Invalid { problems, .. } = err else {
                panic!("expected Invalid for {bad}, got {err}")
            };
            assert_eq!(
                problems[0].key, "transport.queue_url",
                "{bad}: {problems:?}"
            );
        }
        for good in [
            "https://sqs.eu-west-1.amazonaws.com/1/q",
            "http://127.0.0.1:5000/1/q",
        ] {
            parse(&format!("transport: {{type: sqs, queue_url: '{good}'}}\n")).unwrap();
        }
        let err = parse("tags:\n  ' role': web\n  ' ': x\n").unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("expected Invalid, got {err}")
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["tags. ", "tags. role"], "{problems:?}");
        assert!(problems[0].message.contains("spaces at either end"));
    }

    #[test]
    fn tags_zone_registry_and_heartbeat_problems_come_together() {
        let c = parse(
            "tags:\n  role: web\n  env: prod\navailability_zone: us-east-1a\ndaemon:\n  heartbeat_seconds: 5\n",
        )
        .unwrap();
        assert_eq!(c.tags.get("role").map(String::as_str), Some("web"));
        assert_eq!(c.availability_zone.as_deref(), Some("us-east-1a"));
        assert_eq!(c.daemon.heartbeat, Duration::from_secs(5));

        let err = parse(&format!(
            "tags:\n  role: ''\n  version: 2\n  {long}: x\n  'a=b': x\navailability_zone: 'us east'\n\
             registry:\n  dir: relative\n  prefix: p\n  colour: red\ndaemon:\n  heartbeat_seconds: 4\n",
            long = "k".repeat(129)
        ))
        .unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("expected Invalid, got {err}")
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "tags.a=b",
                &format!("tags.{}", "k".repeat(129)),
                "tags.role",
                "tags.version",
                "availability_zone",
                "daemon.heartbeat_seconds",
                "registry.colour",
                "registry.prefix",
                "registry.dir",
            ],
            "{problems:?}"
        );
        assert!(problems[3].message.contains("quote"), "{problems:?}");

        let err =
            parse("transport:\n  type: sqs\n  create_queue: true\nregistry:\n  enabled: true\n")
                .unwrap_err();
        assert!(err.to_string().contains("registry: {bucket: B"), "{err}");
        let err = parse("registry:\n  enabled: false\n  dir: /x\n").unwrap_err();
        assert!(err.to_string().contains("registry.dir"), "{err}");
        let err = parse("registry:\n  bucket: b\n  dir: /x\n").unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
    }

    #[test]
    fn ids_that_could_escape_a_directory_are_unsafe() {
        assert!(pier_protocol::is_valid_id("d-ABC123_x.y"));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(!pier_protocol::is_valid_id(bad), "{bad:?}");
        }
    }
}
