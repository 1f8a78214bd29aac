//! Deployment group definitions: which hosts a deployment goes to and how it rolls out there.
//!
//! An operator writes a group as YAML, reviews it in git and stores it with
//! `pier group put FILE.yml` (see `docs/examples/groups/web.yml`). The file is read in two
//! steps, as the agent's configuration is: deserialized into a raw form (every field optional,
//! unknown keys collected), then checked into a [`GroupDefinition`] with every problem reported
//! at once, each naming its key (`tag_filters[1].type`). A syntax or type error that stops the
//! YAML parser is reported as `file:line:col: message`.
//!
//! The stored form is the same document as JSON ([`GroupDefinition::to_json`]), read back
//! through the same checks ([`GroupDefinition::from_json`]), so a stored group is never trusted
//! more than a written one. [`select_hosts`] resolves a group against the host registry;
//! whether a selected host is healthy, and what the rules, alarms and notifications do during a
//! rollout, is the rollout's business, not this module's.

use std::collections::{BTreeMap, BTreeSet};

use pier_protocol::quote::{bounded, quote};
use pier_protocol::record::MinimumHealthyHosts;
use pier_protocol::registry::RegistryEntry;
use serde::{Deserialize, Serialize};

use crate::rules::{DeploymentConfig, ZonalConfig};

/// The group definition version this controller writes and reads.
pub const GROUP_VERSION: u32 = 1;

/// The longest CloudWatch alarm name.
const MAX_ALARM_NAME: usize = 255;

/// How much of a YAML parser's message (which may echo the input) reaches an error.
const MAX_PARSER_MESSAGE: usize = 300;

/// One problem found in a group definition, under its key (`tag_filters[1].type`), or empty
/// for the group as a whole.
pub use pier_protocol::problems::Problem as GroupProblem;
use pier_protocol::problems::{ProblemList, Problems};

/// Why a group definition cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The YAML (or JSON) does not parse, or a value has the wrong type.
    #[error("{source_name}:{line}:{col}: {message}")]
    Syntax {
        /// The file name (or `s3://...` location) the text came from.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// The parser's message.
        message: String,
    },
    /// The document parses but breaks rules; every problem is listed.
    #[error("{source_name}: {} problem(s):\n{}", problems.len(), ProblemList(problems))]
    Invalid {
        /// The file name (or location) the text came from.
        source_name: String,
        /// Every problem, in the order of the document.
        problems: Vec<GroupProblem>,
    },
}

/// A deployment group, checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupDefinition {
    /// Always [`GROUP_VERSION`].
    pub version: u32,
    /// The group's id (the id rule, [`pier_protocol::check_id`]).
    pub name: String,
    /// The application its deployments belong to.
    pub application: String,
    /// Hosts named explicitly; they are targets whether or not they are registered.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// A registered host whose tags match any of these is a target too.
    #[serde(default)]
    pub tag_filters: Vec<TagFilter>,
    /// How many hosts stay healthy while it rolls out; `OneAtATime` unless given.
    pub deployment_config: DeploymentConfig,
    /// How commands reach the hosts.
    pub transport: GroupTransport,
    /// CloudWatch alarms watched during a rollout.
    #[serde(default)]
    pub alarms: Vec<String>,
    /// When a failed rollout is rolled back by itself.
    #[serde(default)]
    pub auto_rollback: AutoRollback,
    /// Deployments wait in `PendingApproval` until someone approves them.
    #[serde(default)]
    pub require_approval: bool,
    /// A failing ApplicationStop hook does not fail a host (CodeDeploy's option).
    #[serde(default)]
    pub ignore_application_stop_failures: bool,
    /// An HTTP(S) URL that must answer 2xx while the rollout runs, for fleets without
    /// CloudWatch; a failing check counts as an alarm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_url: Option<String>,
    /// Where deployment and host events are announced.
    #[serde(default)]
    pub notifications: Vec<Notification>,
    /// How long `health_url` must keep failing (three checks in a row at least) before the
    /// rollout stops: a restart that takes the service down for a moment is not a failure.
    #[serde(default = "default_health_grace")]
    pub health_grace_seconds: u64,
    /// One availability zone at a time, with a bake after each (CodeDeploy's zonal
    /// configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zonal: Option<ZonalConfig>,
}

/// How a tag filter compares a host's tags (CodeDeploy's `EC2TagFilter` types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TagFilterType {
    /// The host has the tag `key` with exactly `value`.
    KeyAndValue,
    /// The host has the tag `key`, whatever its value.
    KeyOnly,
    /// Some tag of the host has exactly `value`, whatever its key.
    ValueOnly,
}

impl TagFilterType {
    const ALL: [TagFilterType; 3] = [
        TagFilterType::KeyAndValue,
        TagFilterType::KeyOnly,
        TagFilterType::ValueOnly,
    ];

    /// The name written in a group file.
    pub fn as_str(self) -> &'static str {
        match self {
            TagFilterType::KeyAndValue => "KEY_AND_VALUE",
            TagFilterType::KeyOnly => "KEY_ONLY",
            TagFilterType::ValueOnly => "VALUE_ONLY",
        }
    }

    fn parse(s: &str) -> Option<TagFilterType> {
        TagFilterType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// One tag filter. A checked filter has exactly the parts its type compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagFilter {
    /// The tag key (`KEY_AND_VALUE`, `KEY_ONLY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The tag value (`KEY_AND_VALUE`, `VALUE_ONLY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// How to compare.
    #[serde(rename = "type")]
    pub kind: TagFilterType,
}

impl TagFilter {
    /// Whether a host with `tags` matches. A part the type needs but the filter lacks matches
    /// nothing.
    pub fn matches(&self, tags: &BTreeMap<String, String>) -> bool {
        match (self.kind, &self.key, &self.value) {
            (TagFilterType::KeyAndValue, Some(k), Some(v)) => tags.get(k) == Some(v),
            (TagFilterType::KeyOnly, Some(k), _) => tags.contains_key(k),
            (TagFilterType::ValueOnly, _, Some(v)) => tags.values().any(|t| t == v),
            _ => false,
        }
    }
}

/// How commands reach the group's hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum GroupTransport {
    /// Each host's SQS queue.
    Sqs {
        /// `https://.../pier-{host}`, `{host}` replaced by the host id; without it the queue
        /// named `pier-{host}` is looked up (the name an agent with `create_queue` makes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        queue_url_template: Option<String>,
    },
    /// Spool directories on this machine.
    Spool {
        /// An absolute directory; `{host}` in it is replaced by the host id (required when
        /// the group can have more than one host, since hosts cannot share a spool).
        spool_dir: String,
    },
}

impl Default for GroupTransport {
    fn default() -> Self {
        GroupTransport::Sqs {
            queue_url_template: None,
        }
    }
}

/// When a failed rollout is rolled back without anyone asking.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoRollback {
    /// When the deployment fails.
    #[serde(default)]
    pub on_failure: bool,
    /// When a watched alarm (or the health URL) goes bad during the rollout.
    #[serde(default)]
    pub on_alarm: bool,
}

/// The events a notification can be sent for (CodeDeploy's trigger events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TriggerEvent {
    /// A deployment started sending.
    DeploymentStart,
    /// A deployment succeeded.
    DeploymentSuccess,
    /// A deployment failed.
    DeploymentFailure,
    /// A deployment was stopped by an operator.
    DeploymentStop,
    /// A deployment was rolled back.
    DeploymentRollback,
    /// A host started deploying.
    InstanceStart,
    /// A host succeeded.
    InstanceSuccess,
    /// A host failed.
    InstanceFailure,
}

impl TriggerEvent {
    /// Every event, in the order they are listed to people.
    pub const ALL: [TriggerEvent; 8] = [
        TriggerEvent::DeploymentStart,
        TriggerEvent::DeploymentSuccess,
        TriggerEvent::DeploymentFailure,
        TriggerEvent::DeploymentStop,
        TriggerEvent::DeploymentRollback,
        TriggerEvent::InstanceStart,
        TriggerEvent::InstanceSuccess,
        TriggerEvent::InstanceFailure,
    ];

    /// The name written in a group file and sent in a notification.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerEvent::DeploymentStart => "DeploymentStart",
            TriggerEvent::DeploymentSuccess => "DeploymentSuccess",
            TriggerEvent::DeploymentFailure => "DeploymentFailure",
            TriggerEvent::DeploymentStop => "DeploymentStop",
            TriggerEvent::DeploymentRollback => "DeploymentRollback",
            TriggerEvent::InstanceStart => "InstanceStart",
            TriggerEvent::InstanceSuccess => "InstanceSuccess",
            TriggerEvent::InstanceFailure => "InstanceFailure",
        }
    }

    /// The event named `s`, if any.
    pub fn parse(s: &str) -> Option<TriggerEvent> {
        TriggerEvent::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// Whether the event is about one host (`Instance*`) rather than the whole deployment.
    pub fn is_instance(self) -> bool {
        matches!(
            self,
            TriggerEvent::InstanceStart
                | TriggerEvent::InstanceSuccess
                | TriggerEvent::InstanceFailure
        )
    }
}

/// Where one set of notifications goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotificationTarget {
    /// An SNS topic (`arn:aws:sns:REGION:ACCOUNT:NAME`).
    #[serde(rename = "sns_topic_arn")]
    Sns(String),
    /// An HTTP(S) POST of a JSON document.
    #[serde(rename = "webhook")]
    Webhook(Webhook),
}

/// A webhook target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    /// Where the JSON document is posted.
    pub url: String,
    /// The environment variable of the controller holding the shared secret the document is
    /// signed with (the secret itself never sits in the group, which lives in git and S3).
    pub secret_env: String,
}

/// One notification entry: a target and the events it is told about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// Where to send.
    #[serde(flatten)]
    pub target: NotificationTarget,
    /// What to send; every event unless the file lists some.
    pub events: Vec<TriggerEvent>,
}

impl GroupDefinition {
    /// The stored form: the same document as the YAML, as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a group definition always serialises")
    }

    /// Reads a stored group through the same checks as a written one (JSON is YAML too).
    pub fn from_json(source_name: &str, bytes: &[u8]) -> Result<GroupDefinition, GroupError> {
        let text = std::str::from_utf8(bytes).map_err(|e| GroupError::Syntax {
            source_name: source_name.to_string(),
            line: 1,
            col: 1,
            message: format!("not UTF-8 text: {e}"),
        })?;
        parse_group(source_name, text)
    }
}

/// Reads a group definition from YAML `text`; `source_name` (the file name) is used in
/// messages only.
pub fn parse_group(source_name: &str, text: &str) -> Result<GroupDefinition, GroupError> {
    let raw: RawGroup = if text.trim().is_empty() {
        RawGroup::default()
    } else {
        serde_yaml::from_str(text).map_err(|e| {
            let (line, col) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            GroupError::Syntax {
                source_name: source_name.to_string(),
                line,
                col,
                message: bounded(&plain_types(&e.to_string()), MAX_PARSER_MESSAGE),
            }
        })?
    };
    from_raw(raw).map_err(|problems| GroupError::Invalid {
        source_name: source_name.to_string(),
        problems,
    })
}

/// The group's target hosts: the explicit hosts (registered or not), every registered host
/// matching any tag filter, and every registered host that names the group among its own
/// (`daemon.deployment_groups`, which `scripts/install.sh --group` writes), sorted, each once.
/// Whether they are healthy is for the caller.
pub fn select_hosts(def: &GroupDefinition, registry: &[RegistryEntry]) -> Vec<String> {
    let mut hosts: BTreeSet<String> = def.hosts.iter().cloned().collect();
    hosts.extend(
        registry
            .iter()
            .filter(|entry| {
                def.tag_filters.iter().any(|f| f.matches(&entry.tags))
                    || entry.deployment_groups.contains(&def.name)
            })
            .map(|entry| entry.host_id.clone()),
    );
    hosts.into_iter().collect()
}

type Unknown = BTreeMap<String, serde_yaml::Value>;

/// The file as written: every field optional, unknown keys kept so they can be reported.
#[derive(Debug, Default, Deserialize)]
struct RawGroup {
    version: Option<i64>,
    name: Option<String>,
    application: Option<String>,
    hosts: Option<Vec<String>>,
    tag_filters: Option<Vec<RawTagFilter>>,
    /// Kept as YAML so a bad value is a problem under its key, not a parse failure.
    deployment_config: Option<serde_yaml::Value>,
    transport: Option<RawTransport>,
    alarms: Option<Vec<String>>,
    auto_rollback: Option<RawAutoRollback>,
    require_approval: Option<bool>,
    ignore_application_stop_failures: Option<bool>,
    health_url: Option<String>,
    health_grace_seconds: Option<i64>,
    notifications: Option<Vec<RawNotification>>,
    zonal: Option<RawZonal>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
struct RawZonal {
    first_zone_monitor_seconds: Option<i64>,
    monitor_seconds: Option<i64>,
    /// Kept as YAML so a bad value is a problem under its key.
    minimum_healthy_hosts_per_zone: Option<serde_yaml::Value>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
struct RawTagFilter {
    /// Any scalar: `value: 1` means the tag value "1".
    key: Option<serde_yaml::Value>,
    value: Option<serde_yaml::Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
struct RawTransport {
    #[serde(rename = "type")]
    kind: Option<String>,
    queue_url_template: Option<String>,
    spool_dir: Option<String>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
struct RawAutoRollback {
    on_failure: Option<bool>,
    on_alarm: Option<bool>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
struct RawNotification {
    sns_topic_arn: Option<String>,
    webhook: Option<RawWebhook>,
    events: Option<Vec<String>>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
struct RawWebhook {
    url: Option<String>,
    secret_env: Option<String>,
    #[serde(flatten)]
    unknown: Unknown,
}

/// Builds the checked definition, collecting every problem.
/// Unknown keys, with where the known ones are shown.
trait UnknownKeys {
    fn unknown_key(&mut self, section: &str, keys: &Unknown);
}

impl UnknownKeys for Problems {
    fn unknown_key(&mut self, section: &str, keys: &Unknown) {
        self.unknown(
            section,
            keys.keys(),
            "see docs/examples/groups/web.yml for the keys a group has",
        );
    }
}

fn from_raw(raw: RawGroup) -> Result<GroupDefinition, Vec<GroupProblem>> {
    let mut p = Problems::default();
    p.unknown_key("", &raw.unknown);

    if let Some(v) = raw.version {
        if v != i64::from(GROUP_VERSION) {
            p.push(
                "version",
                format!("this controller reads group version {GROUP_VERSION}, not {v}"),
            );
        }
    }
    let name = match raw.name {
        None => {
            p.push("name", "is required: the group's id");
            String::new()
        }
        Some(name) => {
            if let Err(e) = pier_protocol::check_id(&name) {
                p.push("name", e.to_string());
            }
            name
        }
    };
    let application = match raw.application {
        None => {
            p.push("application", "is required: the application deployed");
            String::new()
        }
        Some(app) => {
            if app.trim().is_empty() || app.chars().any(char::is_control) {
                p.push(
                    "application",
                    format!("{} is not an application name", quote(&app)),
                );
            }
            app
        }
    };

    let hosts = raw.hosts.unwrap_or_default();
    let mut seen = BTreeSet::new();
    for (i, host) in hosts.iter().enumerate() {
        if let Err(e) = pier_protocol::check_id(host) {
            p.push(format!("hosts[{i}]"), e.to_string());
        } else if !seen.insert(host) {
            p.push(format!("hosts[{i}]"), format!("{host} is listed twice"));
        }
    }
    let tag_filters: Vec<TagFilter> = raw
        .tag_filters
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, f)| tag_filter(&mut p, &format!("tag_filters[{i}]"), f))
        .collect();
    // Neither `hosts` nor `tag_filters` is fine: the group is then the registered hosts that
    // name it themselves (`daemon.deployment_groups`); a rollout that finds none fails with
    // "no hosts match the deployment group".

    let deployment_config = match raw.deployment_config {
        None => DeploymentConfig::OneAtATime,
        Some(value) => serde_yaml::from_value(value).unwrap_or_else(|e| {
            p.push(
                "deployment_config",
                bounded(&e.to_string(), MAX_PARSER_MESSAGE),
            );
            DeploymentConfig::OneAtATime
        }),
    };

    let transport = transport(
        &mut p,
        raw.transport,
        hosts.len() > 1 || !tag_filters.is_empty(),
    );

    let alarms = raw.alarms.unwrap_or_default();
    let mut seen = BTreeSet::new();
    for (i, alarm) in alarms.iter().enumerate() {
        let key = format!("alarms[{i}]");
        if alarm.trim().is_empty() {
            p.push(key, "an alarm name must not be empty");
        } else if alarm.chars().count() > MAX_ALARM_NAME || alarm.chars().any(char::is_control) {
            p.push(
                key,
                format!(
                    "{} is not a CloudWatch alarm name (at most {MAX_ALARM_NAME} characters, no \
                     control characters)",
                    quote(alarm)
                ),
            );
        } else if !seen.insert(alarm) {
            p.push(key, format!("{} is listed twice", quote(alarm)));
        }
    }

    if let Some(url) = &raw.health_url {
        if !is_http_url(url) {
            p.push(
                "health_url",
                format!("{} must be an http:// or https:// URL", quote(url)),
            );
        }
    }

    let rollback_raw = raw.auto_rollback.unwrap_or_default();
    p.unknown_key("auto_rollback", &rollback_raw.unknown);
    let auto_rollback = AutoRollback {
        on_failure: rollback_raw.on_failure.unwrap_or(false),
        on_alarm: rollback_raw.on_alarm.unwrap_or(false),
    };
    if auto_rollback.on_alarm && alarms.is_empty() && raw.health_url.is_none() {
        p.push(
            "auto_rollback.on_alarm",
            "there is nothing to watch: list `alarms` or give a `health_url`",
        );
    }

    let zonal = raw.zonal.map(|z| zonal(&mut p, z));
    let health_grace_seconds = match raw.health_grace_seconds {
        None => default_health_grace(),
        Some(n) if (0..=3600).contains(&n) => n as u64,
        Some(n) => {
            p.push(
                "health_grace_seconds",
                format!("{n} is not a number of seconds from 0 to 3600"),
            );
            0
        }
    };

    let notifications = raw
        .notifications
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, n)| notification(&mut p, &format!("notifications[{i}]"), n))
        .collect();

    p.into_result()?;
    Ok(GroupDefinition {
        version: GROUP_VERSION,
        name,
        application,
        hosts,
        tag_filters,
        deployment_config,
        transport,
        alarms,
        auto_rollback,
        require_approval: raw.require_approval.unwrap_or(false),
        ignore_application_stop_failures: raw.ignore_application_stop_failures.unwrap_or(false),
        health_url: raw.health_url,
        notifications,
        health_grace_seconds,
        zonal,
    })
}

/// 30 s: longer than a service restart, short enough to catch a broken release early.
fn default_health_grace() -> u64 {
    30
}

/// The longest bake CodeDeploy allows after a zone: two days.
const MAX_MONITOR_SECONDS: i64 = 2 * 24 * 3600;

/// The zonal configuration, every problem under `zonal.`.
fn zonal(p: &mut Problems, raw: RawZonal) -> ZonalConfig {
    p.unknown_key("zonal", &raw.unknown);
    let mut seconds = |key: &str, v: Option<i64>| match v {
        None => 0,
        Some(n) if (0..=MAX_MONITOR_SECONDS).contains(&n) => n as u64,
        Some(n) => {
            p.push(
                format!("zonal.{key}"),
                format!("{n} is not a number of seconds from 0 to {MAX_MONITOR_SECONDS}"),
            );
            0
        }
    };
    let monitor = seconds("monitor_seconds", raw.monitor_seconds);
    let first = match raw.first_zone_monitor_seconds {
        None => monitor,
        v => seconds("first_zone_monitor_seconds", v),
    };
    let per_zone = raw.minimum_healthy_hosts_per_zone.and_then(|v| {
        // `{type: HOST_COUNT, value: 1}` (also the stored form), `HOST_COUNT:1`, or
        // `{minimum_healthy_hosts: {type, value}}`.
        let direct = serde_yaml::from_value::<MinimumHealthyHosts>(v.clone())
            .map(DeploymentConfig::Custom)
            .map_err(|e| e.to_string());
        let parsed = direct
            .or_else(|_| serde_yaml::from_value::<DeploymentConfig>(v).map_err(|e| e.to_string()));
        match parsed {
            Ok(DeploymentConfig::Custom(MinimumHealthyHosts::FleetPercent(n))) if n >= 100 => {
                p.push(
                    "zonal.minimum_healthy_hosts_per_zone",
                    format!("FLEET_PERCENT {n} leaves no host of a zone to deploy to"),
                );
                None
            }
            Ok(DeploymentConfig::Custom(m)) => Some(m),
            Ok(other) => {
                p.push(
                    "zonal.minimum_healthy_hosts_per_zone",
                    format!("{other} is not a minimum: write HOST_COUNT:N or FLEET_PERCENT:N"),
                );
                None
            }
            Err(e) => {
                p.push(
                    "zonal.minimum_healthy_hosts_per_zone",
                    bounded(e.as_str(), MAX_PARSER_MESSAGE),
                );
                None
            }
        }
    });
    ZonalConfig {
        first_zone_monitor_seconds: first,
        monitor_seconds: monitor,
        minimum_healthy_hosts_per_zone: per_zone,
    }
}

/// One tag filter, its type inferred from the parts given when not written.
fn tag_filter(p: &mut Problems, at: &str, raw: RawTagFilter) -> Option<TagFilter> {
    let before = p.len();
    p.unknown_key(at, &raw.unknown);
    let key = scalar(p, &format!("{at}.key"), raw.key);
    let value = scalar(p, &format!("{at}.value"), raw.value);
    let kind = match raw.kind.as_deref() {
        Some(t) => TagFilterType::parse(t).or_else(|| {
            p.push(
                format!("{at}.type"),
                format!(
                    "unknown filter type {}: use KEY_AND_VALUE, KEY_ONLY or VALUE_ONLY",
                    quote(t)
                ),
            );
            None
        }),
        None => match (&key, &value) {
            (Some(_), Some(_)) => Some(TagFilterType::KeyAndValue),
            (Some(_), None) => Some(TagFilterType::KeyOnly),
            (None, Some(_)) => Some(TagFilterType::ValueOnly),
            (None, None) => {
                p.push(at, "needs a key, a value or both");
                None
            }
        },
    };
    if let Some(kind) = kind {
        let (needs_key, needs_value) = match kind {
            TagFilterType::KeyAndValue => (true, true),
            TagFilterType::KeyOnly => (true, false),
            TagFilterType::ValueOnly => (false, true),
        };
        for (part, given, needed) in [("key", &key, needs_key), ("value", &value, needs_value)] {
            match (given, needed) {
                (None, true) => p.push(
                    format!("{at}.{part}"),
                    format!("is required with type {}", kind.as_str()),
                ),
                (Some(_), false) => p.push(
                    format!("{at}.{part}"),
                    format!("is not compared by type {}; remove it", kind.as_str()),
                ),
                (Some(s), true) if s.is_empty() => {
                    p.push(format!("{at}.{part}"), "must not be empty")
                }
                _ => {}
            }
        }
    }
    if p.len() > before {
        return None;
    }
    Some(TagFilter {
        key,
        value,
        kind: kind?,
    })
}

/// A scalar YAML value as text (tags are strings, but `value: 1` means "1").
fn scalar(p: &mut Problems, at: &str, value: Option<serde_yaml::Value>) -> Option<String> {
    use serde_yaml::Value;
    match value? {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => {
            p.push(at, "must be a string");
            None
        }
    }
}

/// The transport; `shared` when the group may have more than one host.
fn transport(p: &mut Problems, raw: Option<RawTransport>, shared: bool) -> GroupTransport {
    let Some(raw) = raw else {
        return GroupTransport::default();
    };
    p.unknown_key("transport", &raw.unknown);
    match raw.kind.as_deref().unwrap_or("sqs") {
        "sqs" => {
            if raw.spool_dir.is_some() {
                p.push(
                    "transport.spool_dir",
                    "applies only to `type: spool`; remove it",
                );
            }
            if let Some(t) = &raw.queue_url_template {
                if !is_http_url(t) || !t.contains("{host}") {
                    p.push(
                        "transport.queue_url_template",
                        format!(
                            "{} must be an http:// or https:// queue URL containing {{host}}, \
                             e.g. https://sqs.REGION.amazonaws.com/ACCOUNT/pier-{{host}}",
                            quote(t)
                        ),
                    );
                }
            }
            GroupTransport::Sqs {
                queue_url_template: raw.queue_url_template,
            }
        }
        "spool" => {
            if raw.queue_url_template.is_some() {
                p.push(
                    "transport.queue_url_template",
                    "applies only to `type: sqs`; remove it",
                );
            }
            let spool_dir = raw.spool_dir.unwrap_or_default();
            if spool_dir.is_empty() {
                p.push(
                    "transport.spool_dir",
                    "is required with `type: spool`, e.g. /srv/{host}/spool",
                );
            } else if !spool_dir.starts_with('/') {
                p.push(
                    "transport.spool_dir",
                    format!("{} must be an absolute path", quote(&spool_dir)),
                );
            } else if shared && !spool_dir.contains("{host}") {
                p.push(
                    "transport.spool_dir",
                    "several hosts cannot share one spool directory (each would take the \
                     others' commands): use a template such as /srv/{host}/spool",
                );
            }
            GroupTransport::Spool { spool_dir }
        }
        other => {
            p.push(
                "transport.type",
                format!("unknown transport {}: use `sqs` or `spool`", quote(other)),
            );
            GroupTransport::default()
        }
    }
}

/// One notification entry.
fn notification(p: &mut Problems, at: &str, raw: RawNotification) -> Option<Notification> {
    let before = p.len();
    p.unknown_key(at, &raw.unknown);
    let target = match (raw.sns_topic_arn, raw.webhook) {
        (Some(arn), None) => {
            if !is_sns_arn(&arn) {
                p.push(
                    format!("{at}.sns_topic_arn"),
                    format!(
                        "{} is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)",
                        quote(&arn)
                    ),
                );
            }
            Some(NotificationTarget::Sns(arn))
        }
        (None, Some(hook)) => {
            let at = format!("{at}.webhook");
            p.unknown_key(&at, &hook.unknown);
            let url = hook.url.unwrap_or_default();
            if url.is_empty() {
                p.push(format!("{at}.url"), "is required");
            } else if !is_http_url(&url) {
                p.push(
                    format!("{at}.url"),
                    format!("{} must be an http:// or https:// URL", quote(&url)),
                );
            }
            let secret_env = hook.secret_env.unwrap_or_default();
            if secret_env.is_empty() {
                p.push(
                    format!("{at}.secret_env"),
                    "is required: the environment variable holding the secret the webhook \
                     documents are signed with",
                );
            } else if !is_env_name(&secret_env) {
                p.push(
                    format!("{at}.secret_env"),
                    format!(
                        "{} is not an environment variable name (A-Z a-z 0-9 _, not starting \
                         with a digit)",
                        quote(&secret_env)
                    ),
                );
            }
            Some(NotificationTarget::Webhook(Webhook { url, secret_env }))
        }
        (Some(_), Some(_)) => {
            p.push(
                at,
                "give either sns_topic_arn or webhook, not both (use two entries)",
            );
            None
        }
        (None, None) => {
            p.push(at, "needs sns_topic_arn or webhook");
            None
        }
    };
    let events = match raw.events {
        None => TriggerEvent::ALL.to_vec(),
        Some(names) if names.is_empty() => {
            p.push(
                format!("{at}.events"),
                "lists no events: remove the key to be told of every event",
            );
            Vec::new()
        }
        Some(names) => {
            let mut events = Vec::new();
            for (j, name) in names.iter().enumerate() {
                match TriggerEvent::parse(name) {
                    Some(e) if !events.contains(&e) => events.push(e),
                    Some(_) => {}
                    None => p.push(
                        format!("{at}.events[{j}]"),
                        format!(
                            "unknown event {}: use {}",
                            quote(name),
                            TriggerEvent::ALL.map(TriggerEvent::as_str).join(", ")
                        ),
                    ),
                }
            }
            events
        }
    };
    if p.len() > before {
        return None;
    }
    Some(Notification {
        target: target?,
        events,
    })
}

/// The parser's message with this module's raw struct names (`expected struct RawTagFilter`)
/// said as a person writing the file would: `expected a mapping`.
fn plain_types(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("struct Raw") {
        out.push_str(&rest[..at]);
        out.push_str("a mapping");
        rest =
            rest[at + "struct Raw".len()..].trim_start_matches(|c: char| c.is_ascii_alphanumeric());
    }
    out.push_str(rest);
    out
}

fn is_http_url(s: &str) -> bool {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    matches!(rest, Some(r) if !r.is_empty() && !r.chars().any(|c| c.is_whitespace() || c.is_control()))
}

/// `arn:PARTITION:sns:REGION:ACCOUNT:NAME`, every part present.
fn is_sns_arn(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts[0] == "arn"
        && parts[2] == "sns"
        && parts.iter().all(|p| !p.is_empty())
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use pier_protocol::record::MinimumHealthyHosts;
    use pier_protocol::registry::{HostState, REGISTRY_VERSION};

    const EXAMPLE: &str = include_str!("../../../docs/examples/groups/web.yml");

    fn parse(text: &str) -> Result<GroupDefinition, GroupError> {
        parse_group("web.yml", text)
    }

    /// The keys of the problems `text` has, in order.
    fn problem_keys(text: &str) -> Vec<String> {
        match parse(text) {
            Err(GroupError::Invalid { problems, .. }) => {
                problems.into_iter().map(|p| p.key).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn entry(host: &str, pairs: &[(&str, &str)]) -> RegistryEntry {
        RegistryEntry {
            version: REGISTRY_VERSION,
            host_id: host.to_string(),
            tags: tags(pairs),
            availability_zone: None,
            agent_version: "0.1.0".into(),
            queue: None,
            deployment_groups: Vec::new(),
            started_at: Utc::now(),
            heartbeat_at: Utc::now(),
            heartbeat_interval_seconds: 30,
            state: HostState::Running,
        }
    }

    #[test]
    fn the_example_group_parses() {
        let g = parse_group("docs/examples/groups/web.yml", EXAMPLE).unwrap();
        assert_eq!(g.name, "web-prod");
        assert_eq!(g.application, "shop");
        assert_eq!(g.deployment_config, DeploymentConfig::HalfAtATime);
        assert!(!g.tag_filters.is_empty());
        assert!(g.auto_rollback.on_failure && g.auto_rollback.on_alarm);
        assert_eq!(g.notifications.len(), 2);
        assert_eq!(g.notifications[0].events, TriggerEvent::ALL);
    }

    #[test]
    fn a_minimal_group_gets_the_defaults() {
        let g = parse("name: web\napplication: shop\nhosts: [web-1]\n").unwrap();
        assert_eq!(g.version, GROUP_VERSION);
        assert_eq!(g.deployment_config, DeploymentConfig::OneAtATime);
        assert_eq!(g.transport, GroupTransport::default());
        assert_eq!(g.auto_rollback, AutoRollback::default());
        assert!(!g.require_approval && !g.ignore_application_stop_failures);
        assert!(g.alarms.is_empty() && g.notifications.is_empty() && g.health_url.is_none());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "\
version: 2
name: ../web
colour: blue
hosts: [web-1, 'a b', web-1]
tag_filters:
  - {key: role, value: web, type: KEY_AND_VALUE}
  - {key: role, type: BOTH}
  - {value: web, type: KEY_ONLY}
  - {}
  - {key: '', shape: round}
deployment_config: HOST_COUNT:many
transport: {type: sqs, queue_url_template: 'ftp://q/pier', spool_dir: /x}
alarms: [High, '', High]
auto_rollback: {on_failure: true, on_alarms: true}
health_url: 'localhost:8080/health'
notifications:
  - sns_topic_arn: 'arn:aws:s3:::bucket'
    events: [DeploymentStart, DeploymentEnd]
  - webhook: {url: 'https://example.com/hook', secret_env: '1SECRET', method: POST}
  - sns_topic_arn: 'arn:aws:sns:eu-west-1:123456789012:deploys'
    webhook: {url: 'https://example.com/hook', secret_env: SECRET}
  - events: []
";
        assert_eq!(
            problem_keys(text),
            [
                "colour",
                "version",
                "name",
                "application",
                "hosts[1]",
                "hosts[2]",
                "tag_filters[1].type",
                "tag_filters[2].key",
                "tag_filters[2].value",
                "tag_filters[3]",
                "tag_filters[4].shape",
                "tag_filters[4].key",
                "deployment_config",
                "transport.spool_dir",
                "transport.queue_url_template",
                "alarms[1]",
                "alarms[2]",
                "health_url",
                "auto_rollback.on_alarms",
                "notifications[0].sns_topic_arn",
                "notifications[0].events[1]",
                "notifications[1].webhook.method",
                "notifications[1].webhook.secret_env",
                "notifications[2]",
                "notifications[3]",
                "notifications[3].events",
            ]
        );
        let msg = parse(text).unwrap_err().to_string();
        assert!(msg.starts_with("web.yml: 26 problem(s):\n"), "{msg}");
        assert!(
            msg.contains("  - tag_filters[1].type: unknown filter type \"BOTH\""),
            "{msg}"
        );
        assert!(msg.contains("HOST_COUNT needs a whole number"), "{msg}");
        assert!(
            msg.contains("unknown event \"DeploymentEnd\": use DeploymentStart"),
            "{msg}"
        );
    }

    #[test]
    fn an_empty_file_names_what_is_required() {
        let err = parse("").unwrap_err();
        let GroupError::Invalid { problems, .. } = err else {
            panic!("expected problems, got {err}")
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["name", "application"]);
    }

    #[test]
    fn a_group_without_selectors_is_the_hosts_that_name_it() {
        let g = parse("name: web\napplication: shop\n").unwrap();
        let mut member = entry("h-2", &[]);
        member.deployment_groups = vec!["api".into(), "web".into()];
        let mut other = entry("h-3", &[]);
        other.deployment_groups = vec!["api".into()];
        let registry = [entry("h-1", &[("role", "web")]), member, other];
        assert_eq!(select_hosts(&g, &registry), ["h-2"]);

        // With selectors, a host that names the group is still one of it.
        let g = parse(
            "name: web\napplication: shop\nhosts: [h-9]\ntag_filters: [{key: role, value: web, type: KEY_AND_VALUE}]\n",
        )
        .unwrap();
        assert_eq!(select_hosts(&g, &registry), ["h-1", "h-2", "h-9"]);
        assert_eq!(
            problem_keys("name: web\napplication: shop\ntag_filters: [{type: KEY_ONLY}]\n"),
            ["tag_filters[0].key"]
        );
    }

    #[test]
    fn deployment_configs_in_both_forms() {
        let with = |cfg: &str| {
            parse(&format!(
                "name: w\napplication: a\nhosts: [h]\ndeployment_config: {cfg}\n"
            ))
        };
        assert_eq!(
            with("HOST_COUNT:6").unwrap().deployment_config,
            DeploymentConfig::Custom(MinimumHealthyHosts::HostCount(6))
        );
        assert_eq!(
            with("CodeDeployDefault.AllAtOnce")
                .unwrap()
                .deployment_config,
            DeploymentConfig::AllAtOnce
        );
        assert_eq!(
            with("{minimum_healthy_hosts: {type: FLEET_PERCENT, value: 40}}")
                .unwrap()
                .deployment_config,
            DeploymentConfig::Custom(MinimumHealthyHosts::FleetPercent(40))
        );
        for bad in [
            "Sometimes",
            "FLEET_PERCENT:100",
            "{minimum_healthy_hosts: {type: FLEET_PERCENT}}",
            "{minimum_healthy_hosts: {type: PERCENT, value: 4}}",
            "[OneAtATime]",
        ] {
            let err = with(bad).unwrap_err();
            let GroupError::Invalid { problems, .. } = &err else {
                panic!("{bad}: expected problems, got {err}")
            };
            assert_eq!(problems.len(), 1, "{bad}: {err}");
            assert_eq!(problems[0].key, "deployment_config", "{bad}: {err}");
        }
    }

    #[test]
    fn transports_are_checked_for_their_type() {
        let with = |t: &str, hosts: &str| {
            parse(&format!(
                "name: w\napplication: a\nhosts: {hosts}\ntransport: {t}\n"
            ))
        };
        assert_eq!(
            with("{type: spool, spool_dir: /srv/spool}", "[h]")
                .unwrap()
                .transport,
            GroupTransport::Spool {
                spool_dir: "/srv/spool".into()
            }
        );
        assert_eq!(
            with(
                "{queue_url_template: 'https://sqs.x/1/pier-{host}'}",
                "[h1, h2]"
            )
            .unwrap()
            .transport,
            GroupTransport::Sqs {
                queue_url_template: Some("https://sqs.x/1/pier-{host}".into())
            }
        );
        let keys = |t: &str, hosts: &str| match with(t, hosts) {
            Err(GroupError::Invalid { problems, .. }) => {
                problems.into_iter().map(|p| p.key).collect::<Vec<_>>()
            }
            other => panic!("{t}: {other:?}"),
        };
        assert_eq!(
            keys("{type: spool, spool_dir: /srv/spool}", "[h1, h2]"),
            ["transport.spool_dir"]
        );
        assert_eq!(
            keys("{type: spool, spool_dir: 'srv/{host}'}", "[h]"),
            ["transport.spool_dir"]
        );
        assert_eq!(
            keys(
                "{type: spool, queue_url_template: 'https://q/{host}'}",
                "[h]"
            ),
            ["transport.queue_url_template", "transport.spool_dir"]
        );
        assert_eq!(
            keys("{queue_url_template: 'https://sqs.x/1/pier'}", "[h]"),
            ["transport.queue_url_template"]
        );
        assert_eq!(
            keys("{type: carrier-pigeon, speed: 3}", "[h]"),
            ["transport.speed", "transport.type"]
        );
    }

    #[test]
    fn rollback_on_alarm_needs_something_to_watch() {
        let base = "name: w\napplication: a\nhosts: [h]\nauto_rollback: {on_alarm: true}\n";
        assert_eq!(problem_keys(base), ["auto_rollback.on_alarm"]);
        parse(&format!("{base}alarms: [HighErrorRate]\n")).unwrap();
        parse(&format!(
            "{base}health_url: 'http://127.0.0.1:8080/health'\n"
        ))
        .unwrap();
    }

    #[test]
    fn notifications_default_to_every_event() {
        let g = parse(
            "name: w\napplication: a\nhosts: [h]\nnotifications:\n  - webhook: {url: 'http://127.0.0.1:9/hook', secret_env: PIER_WEBHOOK_SECRET}\n  - sns_topic_arn: 'arn:aws:sns:us-east-1:123456789012:t'\n    events: [InstanceFailure, DeploymentFailure, InstanceFailure]\n",
        )
        .unwrap();
        assert_eq!(
            g.notifications[0].target,
            NotificationTarget::Webhook(Webhook {
                url: "http://127.0.0.1:9/hook".into(),
                secret_env: "PIER_WEBHOOK_SECRET".into()
            })
        );
        assert_eq!(g.notifications[0].events, TriggerEvent::ALL);
        assert_eq!(
            g.notifications[1].events,
            [
                TriggerEvent::InstanceFailure,
                TriggerEvent::DeploymentFailure
            ]
        );
        for e in TriggerEvent::ALL {
            assert_eq!(TriggerEvent::parse(e.as_str()), Some(e));
        }
    }

    #[test]
    fn syntax_and_type_errors_are_located() {
        let err = parse("name: web\napplication: [shop\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("web.yml:"), "{msg}");
        let GroupError::Syntax { line, .. } = err else {
            panic!("expected Syntax, got {msg}")
        };
        assert!(line >= 2, "{msg}");
        let err = parse("name: web\napplication: shop\nhosts: [h]\nrequire_approval: sometimes\n")
            .unwrap_err();
        let GroupError::Syntax { line, .. } = err else {
            panic!("expected Syntax, got {err}")
        };
        assert_eq!(line, 4, "{err}");
        // Not a mapping at all: said without the parser's internal type names.
        for text in ["- web\n", "name: w\napplication: a\ntag_filters: [role]\n"] {
            let msg = parse(text).unwrap_err().to_string();
            assert!(msg.contains("expected a mapping"), "{msg}");
            assert!(!msg.contains("Raw"), "{msg}");
        }
    }

    #[test]
    fn tag_filter_types_match_as_codedeploys() {
        let host = tags(&[("role", "web"), ("env", "prod")]);
        let filter = |key: Option<&str>, value: Option<&str>, kind| TagFilter {
            key: key.map(str::to_string),
            value: value.map(str::to_string),
            kind,
        };
        use TagFilterType::*;
        assert!(filter(Some("role"), Some("web"), KeyAndValue).matches(&host));
        assert!(!filter(Some("role"), Some("db"), KeyAndValue).matches(&host));
        assert!(!filter(Some("env"), Some("web"), KeyAndValue).matches(&host));
        assert!(filter(Some("env"), None, KeyOnly).matches(&host));
        assert!(!filter(Some("zone"), None, KeyOnly).matches(&host));
        assert!(filter(None, Some("prod"), ValueOnly).matches(&host));
        assert!(!filter(None, Some("role"), ValueOnly).matches(&host));
        // A filter missing the part its type compares matches nothing.
        assert!(!filter(None, Some("web"), KeyAndValue).matches(&host));
        assert!(!filter(None, None, KeyOnly).matches(&host));

        // The type is inferred from the parts given; scalar values are text.
        let g = parse(
            "name: w\napplication: a\ntag_filters:\n  - {key: role, value: web}\n  - {key: canary}\n  - {value: 1}\n",
        )
        .unwrap();
        let kinds: Vec<TagFilterType> = g.tag_filters.iter().map(|f| f.kind).collect();
        assert_eq!(kinds, [KeyAndValue, KeyOnly, ValueOnly]);
        assert_eq!(g.tag_filters[2].value.as_deref(), Some("1"));
    }

    #[test]
    fn selection_is_explicit_hosts_and_any_matching_tag() {
        let g = parse(
            "name: w\napplication: a\nhosts: [web-9, web-2]\ntag_filters:\n  - {key: role, value: web}\n  - {key: canary, type: KEY_ONLY}\n",
        )
        .unwrap();
        let registry = [
            entry("web-2", &[("role", "web")]),
            entry("web-1", &[("role", "web")]),
            entry("db-1", &[("role", "db")]),
            entry("db-2", &[("role", "db"), ("canary", "")]),
            entry("cache-1", &[]),
        ];
        // web-9 is not registered but named; web-2 both named and matched, listed once.
        assert_eq!(
            select_hosts(&g, &registry),
            ["db-2", "web-1", "web-2", "web-9"]
        );
        let g = parse("name: w\napplication: a\nhosts: [web-1]\n").unwrap();
        assert_eq!(select_hosts(&g, &registry), ["web-1"]);
    }

    #[test]
    fn the_stored_form_reads_back_through_the_same_checks() {
        let g = parse(EXAMPLE).unwrap();
        let json = g.to_json();
        assert_eq!(GroupDefinition::from_json("stored", &json).unwrap(), g);
        let stored: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(stored["deployment_config"], "HalfAtATime");
        assert_eq!(stored["version"], GROUP_VERSION);
        // A hand-edited stored group is checked like a written one.
        let mut bad = stored.clone();
        bad["hosts"] = serde_json::json!(["../etc"]);
        let err = GroupDefinition::from_json("stored", bad.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("hosts[0]"), "{err}");
    }
}
