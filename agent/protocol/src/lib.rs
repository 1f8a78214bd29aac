//! The wire protocol shared by the agent and the controller: the deployment [`Command`] a host
//! takes from its queue, and the [`StatusRecord`] it writes back for each deployment.
//!
//! Pure types and their (de)serialisation, no I/O. Both carry a `version` so that an agent
//! refuses what it does not understand instead of guessing: [`Command::from_json`] rejects an
//! unknown version or a malformed field with a [`ProtocolError`] that names the field, and the
//! transport leaves such a message to the queue's dead-letter policy. Unknown *fields* are
//! ignored, so a newer controller may add optional fields within a version. Every field is
//! documented, with an example, in `docs/protocol.md`.
//!
//! The vocabulary both sides share is declared here once: [`LifecycleEvent`] and its order,
//! [`FileExistsBehavior`], [`BundleType`], the id rule ([`check_id`]), the event and deployment
//! states, and the [`ErrorCode`] a failed event carries.
//!
//! A command may travel signed: [`signature`] has the envelope, the keys, and the rule an
//! agent applies to every message before it parses a command out of it.

mod bundle;
mod diagnostics;
mod event;
mod id;
pub mod problems;
pub mod quote;
pub mod record;
pub mod registry;
pub mod signature;

pub use bundle::{BundleType, UnknownBundleType, MAGIC_LEN};
pub use diagnostics::{Diagnostics, ErrorCode};
pub use event::{
    check_order, parse_events, EventListError, EventOrderError, FileExistsBehavior, LifecycleEvent,
    UnknownFileExistsBehavior, UnknownLifecycleEvent,
};
pub use id::{check_id, is_valid_id, new_deployment_id, InvalidId, MAX_ID_LEN};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The only command version this agent understands.
pub const COMMAND_VERSION: u32 = 1;
/// The status record version this agent writes and reads.
pub(crate) const STATUS_VERSION: u32 = 1;

/// Why a message is not a command (or status record) this agent can act on.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The bytes are not a JSON object at all.
    #[error("message is not valid JSON ({reason}); the sender must write a JSON object")]
    NotJson {
        /// serde_json's description, with line and column.
        reason: String,
    },
    /// The object has no `version` field.
    #[error("message has no `version` field; this agent understands version {supported}")]
    MissingVersion {
        /// The version this agent understands.
        supported: u32,
    },
    /// The object's `version` is one this agent does not understand.
    #[error(
        "message has version {found}, this agent understands version {supported}; \
         upgrade the agent or send a version {supported} message"
    )]
    UnknownVersion {
        /// The `version` value as it appeared in the message.
        found: String,
        /// The version this agent understands.
        supported: u32,
    },
    /// A field is missing or has the wrong type or value.
    #[error("field `{field}`: {reason}")]
    Field {
        /// The field's path in the message, e.g. `revision.bucket`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// How much of a field path a [`ProtocolError`] shows.
const MAX_FIELD_CHARS: usize = 120;
/// How much of a parser's reason (which may quote the input) a [`ProtocolError`] shows.
const MAX_REASON_CHARS: usize = 300;

impl ProtocolError {
    /// Every part of a message that comes from the input is cut to a bounded length, so a
    /// hostile message cannot make an error (and the log line or status that carries it)
    /// grow with it.
    fn field(field: impl Into<String>, reason: impl Into<String>) -> ProtocolError {
        ProtocolError::Field {
            field: quote::bounded(&field.into(), MAX_FIELD_CHARS),
            reason: quote::bounded(&reason.into(), MAX_REASON_CHARS),
        }
    }
}

/// A deployment command: what one host is asked to deploy, and where to report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Protocol version; always [`COMMAND_VERSION`].
    pub version: u32,
    /// Unique id of the deployment (shared by all its hosts). Used in paths and object keys,
    /// so limited to `[A-Za-z0-9._-]`, not starting with a dot.
    pub deployment_id: String,
    /// The application (`APPLICATION_NAME` in hooks).
    pub application_name: String,
    /// The deployment group's name (`DEPLOYMENT_GROUP_NAME` in hooks).
    pub deployment_group_name: String,
    /// The deployment group's id (`DEPLOYMENT_GROUP_ID` in hooks).
    pub deployment_group_id: String,
    /// Where the revision bundle is.
    pub revision: Revision,
    /// A subset of lifecycle events to run; `None` runs them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    /// What Install does with a file already in the way when the AppSpec does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_exists_behavior: Option<String>,
    /// Whether this deployment rolls back to an earlier revision.
    #[serde(default)]
    pub is_rollback: bool,
    /// Who or what started the deployment (user, pipeline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<String>,
    /// The git commit the revision was built from, for history and DORA lead time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_sha: Option<String>,
    /// CodeDeploy's `ignoreApplicationStopFailures`: a failure of an event that runs the
    /// previous revision's scripts (ApplicationStop, BeforeBlockTraffic, AfterBlockTraffic)
    /// is recorded as ignored and the deployment goes on. Left out when false, so a command
    /// without it is what every agent already reads.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_application_stop_failures: bool,
    /// Where to write this deployment's status records.
    pub status: StatusTarget,
    /// When the controller created the command.
    pub created_at: DateTime<Utc>,
}

/// Where a revision bundle comes from; tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Revision {
    /// An S3 object.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Object key.
        key: String,
        /// Object version, for a versioned bucket; fetches exactly that version.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version_id: Option<String>,
        /// Expected ETag (with or without quotes); the fetch fails when S3 reports another.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        etag: Option<String>,
        /// Archive format.
        bundle_type: BundleType,
        /// Lowercase hex SHA-256 of the object; verified before anything is unpacked.
        sha256: String,
    },
    /// An HTTP(S) URL.
    Http {
        /// The URL (`http://` or `https://`).
        url: String,
        /// Archive format.
        bundle_type: BundleType,
        /// Lowercase hex SHA-256 of the body; verified before anything is unpacked.
        sha256: String,
    },
    /// A GitHub repository at a commit (fetched as the commit's tarball).
    Github {
        /// Repository owner.
        owner: String,
        /// Repository name.
        repo: String,
        /// Commit SHA (or ref) to fetch.
        commit: String,
        /// Archive format; GitHub serves `tgz`, the default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bundle_type: Option<BundleType>,
        /// Lowercase hex SHA-256 of the tarball, verified when given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
    /// A path on the host (archive or directory).
    Local {
        /// Absolute path.
        path: String,
        /// Archive format, or `directory`.
        bundle_type: BundleType,
        /// Lowercase hex SHA-256 of the archive, verified when given (not for directories).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
}

impl Revision {
    /// The expected SHA-256 of the bundle, when the command gives one.
    pub fn sha256(&self) -> Option<&str> {
        match self {
            Revision::S3 { sha256, .. } | Revision::Http { sha256, .. } => Some(sha256),
            Revision::Github { sha256, .. } | Revision::Local { sha256, .. } => sha256.as_deref(),
        }
    }

    /// Where the revision comes from, for messages: never with a token, and an HTTP(S) URL's
    /// query (a presigned URL's signature) replaced by `?…`.
    pub fn describe(&self) -> String {
        match self {
            Revision::S3 {
                bucket,
                key,
                version_id,
                ..
            } => match version_id {
                Some(v) => format!("s3://{bucket}/{key} (version {v})"),
                None => format!("s3://{bucket}/{key}"),
            },
            Revision::Http { url, .. } => match url.split_once('?') {
                Some((base, _)) => format!("{base}?…"),
                None => url.clone(),
            },
            Revision::Github {
                owner,
                repo,
                commit,
                ..
            } => format!("github.com/{owner}/{repo}@{commit}"),
            Revision::Local { path, .. } => path.clone(),
        }
    }

    /// The bundle's archive format (GitHub defaults to `tgz`).
    pub fn bundle_type(&self) -> BundleType {
        match self {
            Revision::S3 { bundle_type, .. }
            | Revision::Http { bundle_type, .. }
            | Revision::Local { bundle_type, .. } => *bundle_type,
            Revision::Github { bundle_type, .. } => bundle_type.unwrap_or(BundleType::Tgz),
        }
    }
}

/// The agent's deployment root when `root_dir` is not configured. The controller's defaults
/// (the spool it drops commands into, the directory it reads status and the registry from)
/// are the agent's defaults under this root, so both sides derive them from here.
pub const DEFAULT_ROOT_DIR: &str = "/var/lib/pier";
/// The spool transport's queue directory under the deployment root.
pub const SPOOL_DIR_NAME: &str = "spool";
/// The local status store under the deployment root: status records and, on a spool host,
/// the registry (`hosts/`).
pub const STATUS_DIR_NAME: &str = "status";
/// The S3 key prefix of status records and registry entries when none is given.
pub const DEFAULT_STATUS_PREFIX: &str = "pier";

/// Where the agent writes status for a deployment, and whom it tells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusTarget {
    /// The durable store of status records.
    pub sink: StatusSinkSpec,
    /// An SQS queue URL that gets a short notification after each status write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_queue_url: Option<String>,
}

/// A status store; tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StatusSinkSpec {
    /// Objects `{prefix}/deployments/{deployment_id}/hosts/{host_id}.json` in a bucket.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix, without a trailing slash (may be empty).
        #[serde(default)]
        prefix: String,
    },
    /// Files `{dir}/deployments/{deployment_id}/hosts/{host_id}.json` on the host.
    Local {
        /// Absolute directory.
        dir: String,
    },
}

/// Overall state of a deployment on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeploymentStatus {
    /// Events are still running.
    InProgress,
    /// Every event succeeded (or was skipped).
    Succeeded,
    /// An event failed or timed out, or the deployment could not start.
    Failed,
}

impl DeploymentStatus {
    /// Whether no further status change will follow.
    pub fn is_final(self) -> bool {
        !matches!(self, DeploymentStatus::InProgress)
    }
}

/// State of one lifecycle event on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventState {
    /// Not started yet.
    Pending,
    /// Running now.
    InProgress,
    /// Finished, every script exited 0.
    Succeeded,
    /// A script exited non-zero or could not run.
    Failed,
    /// Not run (not in the command's `events`, or an earlier event failed).
    Skipped,
    /// A script passed its timeout and was killed.
    TimedOut,
}

/// One lifecycle event's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventStatus {
    /// Lifecycle event name, e.g. `ValidateService`.
    pub name: String,
    /// Its state.
    pub status: EventState,
    /// When it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<DateTime<Utc>>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<DateTime<Utc>>,
    /// Exit code of the last script run (the failing one on failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The script (AppSpec `location`) that failed or timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_script: Option<String>,
    /// The last few KiB of the event's script output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
    /// Why the event failed, for a program to act on; set on failed and timed-out events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<Diagnostics>,
    /// The event failed or timed out but the deployment went on, because the command asked
    /// to ignore application stop failures. Left out when false, so records without it (all
    /// records of older agents) read as not ignored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignored: bool,
}

impl EventStatus {
    /// Whether this event failed the deployment: it failed or timed out, and was not ignored.
    pub fn failed_deployment(&self) -> bool {
        matches!(self.status, EventState::Failed | EventState::TimedOut) && !self.ignored
    }
}

/// The status of one deployment on one host, rewritten at each event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// Record version; always [`STATUS_VERSION`].
    pub version: u32,
    /// The host that wrote it.
    pub host_id: String,
    /// The deployment it describes.
    pub deployment_id: String,
    /// Overall state.
    pub status: DeploymentStatus,
    /// Per-event results, in lifecycle order.
    #[serde(default)]
    pub events: Vec<EventStatus>,
    /// Why the deployment failed, in a sentence, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When this record was written.
    pub updated_at: DateTime<Utc>,
}

impl StatusRecord {
    /// A fresh in-progress record with no events yet.
    pub fn new(host_id: &str, deployment_id: &str) -> StatusRecord {
        StatusRecord {
            version: STATUS_VERSION,
            host_id: host_id.to_string(),
            deployment_id: deployment_id.to_string(),
            status: DeploymentStatus::InProgress,
            events: Vec::new(),
            error: None,
            updated_at: Utc::now(),
        }
    }

    /// Parses a status record, rejecting unknown versions and malformed fields.
    pub fn from_json(bytes: &[u8]) -> Result<StatusRecord, ProtocolError> {
        let rec: StatusRecord = parse_versioned(bytes, STATUS_VERSION)?;
        check_id_field("host_id", &rec.host_id)?;
        check_id_field("deployment_id", &rec.deployment_id)?;
        Ok(rec)
    }

    /// The record as pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a status record always serialises")
    }
}

impl Command {
    /// Parses and checks a command. Rejects an unknown or missing `version`, a missing or
    /// mistyped field (naming its path, e.g. `revision.sha256`), ids that are not safe as path
    /// components, a malformed SHA-256, unknown event names and `file_exists_behavior` values.
    pub fn from_json(bytes: &[u8]) -> Result<Command, ProtocolError> {
        let cmd: Command = parse_versioned(bytes, COMMAND_VERSION)?;
        cmd.check()?;
        Ok(cmd)
    }

    /// The command as compact JSON (what the controller sends).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a command always serialises")
    }

    fn check(&self) -> Result<(), ProtocolError> {
        check_id_field("deployment_id", &self.deployment_id)?;
        check_nonempty("application_name", &self.application_name)?;
        check_nonempty("deployment_group_name", &self.deployment_group_name)?;
        check_id_field("deployment_group_id", &self.deployment_group_id)?;
        match &self.revision {
            Revision::S3 {
                bucket,
                key,
                sha256,
                ..
            } => {
                check_nonempty("revision.bucket", bucket)?;
                check_nonempty("revision.key", key)?;
                check_sha256("revision.sha256", sha256)?;
            }
            Revision::Http { url, sha256, .. } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(ProtocolError::field(
                        "revision.url",
                        format!("`{url}` is not an http:// or https:// URL"),
                    ));
                }
                check_sha256("revision.sha256", sha256)?;
            }
            Revision::Github {
                owner,
                repo,
                commit,
                sha256,
                ..
            } => {
                check_nonempty("revision.owner", owner)?;
                check_nonempty("revision.repo", repo)?;
                check_nonempty("revision.commit", commit)?;
                if let Some(s) = sha256 {
                    check_sha256("revision.sha256", s)?;
                }
            }
            Revision::Local { path, sha256, .. } => {
                if !path.starts_with('/') {
                    return Err(ProtocolError::field(
                        "revision.path",
                        format!("`{path}` is not an absolute path"),
                    ));
                }
                if let Some(s) = sha256 {
                    check_sha256("revision.sha256", s)?;
                }
            }
        }
        if let Some(events) = &self.events {
            for (i, e) in events.iter().enumerate() {
                if let Err(err) = e.parse::<LifecycleEvent>() {
                    return Err(ProtocolError::field(
                        format!("events[{i}]"),
                        err.to_string(),
                    ));
                }
            }
        }
        if let Some(b) = &self.file_exists_behavior {
            if let Err(e) = b.parse::<FileExistsBehavior>() {
                return Err(ProtocolError::field("file_exists_behavior", e.to_string()));
            }
        }
        match &self.status.sink {
            StatusSinkSpec::S3 { bucket, .. } => check_nonempty("status.sink.bucket", bucket)?,
            StatusSinkSpec::Local { dir } => {
                if !dir.starts_with('/') {
                    return Err(ProtocolError::field(
                        "status.sink.dir",
                        format!("`{dir}` is not an absolute path"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Checks `version` first (so an unknown version is reported as such, not as whichever field
/// changed shape), then deserialises with the failing field's path in the error.
fn parse_versioned<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    supported: u32,
) -> Result<T, ProtocolError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ProtocolError::NotJson {
            reason: quote::bounded(&e.to_string(), MAX_REASON_CHARS),
        })?;
    let obj = value.as_object().ok_or_else(|| ProtocolError::NotJson {
        reason: "the top level is not an object".to_string(),
    })?;
    match obj.get("version") {
        None => return Err(ProtocolError::MissingVersion { supported }),
        Some(v) if v.as_u64() == Some(u64::from(supported)) => {}
        Some(v) => {
            return Err(ProtocolError::UnknownVersion {
                found: quote::bounded(&v.to_string(), MAX_FIELD_CHARS),
                supported,
            })
        }
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "(message)".into()
        } else {
            path
        };
        ProtocolError::field(field, e.into_inner().to_string())
    })
}

fn check_nonempty(field: &str, value: &str) -> Result<(), ProtocolError> {
    if value.trim().is_empty() {
        return Err(ProtocolError::field(field, "must not be empty"));
    }
    Ok(())
}

/// Ids end up in file names and object keys: the one id rule ([`check_id`]).
fn check_id_field(field: &str, value: &str) -> Result<(), ProtocolError> {
    check_nonempty(field, value)?;
    check_id(value).map_err(|e| ProtocolError::field(field, e.to_string()))
}

fn check_sha256(field: &str, value: &str) -> Result<(), ProtocolError> {
    let ok = value.len() == 64
        && value
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    if !ok {
        return Err(ProtocolError::field(
            field,
            format!("`{value}` is not 64 lowercase hex digits"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "deployment_id": "d-0001",
            "application_name": "web",
            "deployment_group_name": "prod",
            "deployment_group_id": "g-prod",
            "revision": {
                "type": "s3", "bucket": "revs", "key": "web/1.tgz",
                "bundle_type": "tgz", "sha256": "a".repeat(64)
            },
            "events": ["ApplicationStop", "ValidateService"],
            "file_exists_behavior": "OVERWRITE",
            "creator": "ci",
            "commit_sha": "0123abc",
            "status": {"sink": {"type": "s3", "bucket": "status", "prefix": "pier"}},
            "created_at": "2026-01-02T03:04:05Z"
        })
    }

    fn parse(v: &serde_json::Value) -> Result<Command, ProtocolError> {
        Command::from_json(&serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn parses_and_round_trips() {
        let cmd = parse(&sample()).unwrap();
        assert_eq!(cmd.revision.sha256(), Some("a".repeat(64).as_str()));
        assert_eq!(cmd.revision.bundle_type(), BundleType::Tgz);
        assert!(!cmd.is_rollback);
        assert_eq!(Command::from_json(&cmd.to_json()).unwrap(), cmd);
    }

    #[test]
    fn unknown_version_is_named() {
        let mut v = sample();
        v["version"] = serde_json::json!(2);
        let e = parse(&v).unwrap_err();
        assert!(matches!(e, ProtocolError::UnknownVersion { ref found, .. } if found == "2"));
        assert!(e.to_string().contains("version 2"), "{e}");
        v.as_object_mut().unwrap().remove("version");
        assert!(matches!(
            parse(&v).unwrap_err(),
            ProtocolError::MissingVersion { .. }
        ));
    }

    #[test]
    fn malformed_field_names_its_path() {
        let mut v = sample();
        v["deployment_group_id"] = serde_json::json!(7);
        let e = parse(&v).unwrap_err();
        assert!(
            matches!(e, ProtocolError::Field { ref field, .. } if field == "deployment_group_id"),
            "{e}"
        );
        let mut v = sample();
        v["status"]["sink"] = serde_json::json!({"type": "local"});
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("status.sink") && e.contains("dir"), "{e}");
        let mut v = sample();
        v.as_object_mut().unwrap().remove("created_at");
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("created_at"), "{e}");
    }

    #[test]
    fn checks_values() {
        let mut v = sample();
        v["revision"]["sha256"] = serde_json::json!("ABC");
        assert!(parse(&v)
            .unwrap_err()
            .to_string()
            .contains("revision.sha256"));
        let mut v = sample();
        v["deployment_id"] = serde_json::json!("../etc");
        assert!(parse(&v).unwrap_err().to_string().contains("deployment_id"));
        let mut v = sample();
        v["events"] = serde_json::json!(["Install", "Deploy"]);
        assert!(parse(&v).unwrap_err().to_string().contains("events[1]"));
        let mut v = sample();
        v["file_exists_behavior"] = serde_json::json!("MERGE");
        assert!(parse(&v)
            .unwrap_err()
            .to_string()
            .contains("file_exists_behavior"));
        assert!(matches!(
            Command::from_json(b"not json").unwrap_err(),
            ProtocolError::NotJson { .. }
        ));
        assert!(matches!(
            Command::from_json(b"[1]").unwrap_err(),
            ProtocolError::NotJson { .. }
        ));
    }

    #[test]
    fn status_record_round_trips() {
        let mut r = StatusRecord::new("h1", "d-1");
        r.events.push(EventStatus {
            name: "Install".into(),
            status: EventState::TimedOut,
            started: Some(Utc::now()),
            ended: None,
            exit_code: Some(137),
            failing_script: Some("scripts/x.sh".into()),
            log_tail: Some("boom".into()),
            diagnostics: Some(Diagnostics {
                error_code: ErrorCode::ScriptTimedOut,
                script_name: Some("scripts/x.sh".into()),
                message: "scripts/x.sh timed out after 5s".into(),
                log_tail: Some("boom".into()),
            }),
            ignored: false,
        });
        let back = StatusRecord::from_json(&r.to_json()).unwrap();
        assert_eq!(back, r);
        let json = String::from_utf8(r.to_json()).unwrap();
        assert!(json.contains("\"TimedOut\"") && json.contains("\"InProgress\""));
        assert!(
            json.contains("\"error_code\": \"ScriptTimedOut\""),
            "{json}"
        );
    }

    #[test]
    fn ignore_application_stop_failures_is_left_out_unless_set() {
        let cmd = parse(&sample()).unwrap();
        assert!(!cmd.ignore_application_stop_failures);
        let json = String::from_utf8(cmd.to_json()).unwrap();
        assert!(!json.contains("ignore_application_stop_failures"), "{json}");
        let mut v = sample();
        v["ignore_application_stop_failures"] = serde_json::json!(true);
        let cmd = parse(&v).unwrap();
        assert!(cmd.ignore_application_stop_failures);
        assert_eq!(Command::from_json(&cmd.to_json()).unwrap(), cmd);
        v["ignore_application_stop_failures"] = serde_json::json!("yes");
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("ignore_application_stop_failures"), "{e}");
    }

    #[test]
    fn an_ignored_failure_does_not_fail_the_deployment() {
        // A record written before `ignored` existed reads as not ignored.
        let old = br#"{"version": 1, "host_id": "h1", "deployment_id": "d-1",
            "status": "Failed", "updated_at": "2026-01-02T03:04:05Z",
            "events": [{"name": "ApplicationStop", "status": "Failed"}]}"#;
        let rec = StatusRecord::from_json(old).unwrap();
        assert!(!rec.events[0].ignored);
        assert!(rec.events[0].failed_deployment());

        let mut e = rec.events[0].clone();
        e.ignored = true;
        assert!(!e.failed_deployment());
        let mut r = StatusRecord::new("h1", "d-1");
        r.events.push(e);
        let json = String::from_utf8(r.to_json()).unwrap();
        assert!(json.contains("\"ignored\": true"), "{json}");
        assert_eq!(StatusRecord::from_json(&r.to_json()).unwrap(), r);
        r.events[0].ignored = false;
        let json = String::from_utf8(r.to_json()).unwrap();
        assert!(!json.contains("ignored"), "{json}");
    }
}
