//! `pier status`: a deployment's per-host, per-event table, read from the status records the
//! agents wrote (an S3 prefix or a local directory), and the text helpers `pier deploy
//! --wait` shares with it: one line per event change, and the failure report of a host (the
//! failing event, script, exit code, error code and log tail).

use std::fmt::Write as _;
use std::path::PathBuf;

use chrono::{DateTime, Utc};

use super::{AwsOptions, ControllerError};
use pier_protocol::{
    DeploymentStatus, EventState, EventStatus, StatusRecord, StatusSinkSpec, StatusTarget,
};
use pier_transport::{open_status_sink, StatusSink};

/// Where a spool deployment asks hosts to write status, and where `pier hosts` reads the
/// registry, unless `--status-dir` says otherwise: `ROOT/status` under the agent's default
/// root, beside its default spool; the agent announces itself there by default too.
pub(crate) fn default_status_dir() -> String {
    format!(
        "{}/{}",
        pier_protocol::DEFAULT_ROOT_DIR,
        pier_protocol::STATUS_DIR_NAME
    )
}
/// The S3 key prefix the agent's status records and registry entries use by default.
pub(crate) use pier_protocol::DEFAULT_STATUS_PREFIX;

/// Where status records are, as the flags gave it (`--status-bucket`/`--status-prefix` or
/// `--status-dir`, also from `PIER_STATUS_BUCKET`, `PIER_STATUS_PREFIX`, `PIER_STATUS_DIR`).
#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    /// Bucket of the records.
    pub status_bucket: Option<String>,
    /// Key prefix within the bucket (default [`DEFAULT_STATUS_PREFIX`]).
    pub status_prefix: Option<String>,
    /// Local directory of the records.
    pub status_dir: Option<PathBuf>,
}

impl SinkOptions {
    /// The sink these flags name. With neither a bucket nor a directory, `default_local`
    /// chooses [`default_status_dir`] (the spool transport's default); otherwise it is an
    /// error that names the flags.
    pub(crate) fn spec(&self, default_local: bool) -> Result<StatusSinkSpec, ControllerError> {
        match (&self.status_bucket, &self.status_dir) {
            (Some(_), Some(_)) => Err(ControllerError::usage(
                "--status-bucket/--status-dir",
                "give one of them: status records are either in S3 or in a local directory",
            )),
            (Some(bucket), None) => {
                if bucket.trim().is_empty() {
                    return Err(ControllerError::usage(
                        "--status-bucket",
                        "must not be empty",
                    ));
                }
                Ok(StatusSinkSpec::S3 {
                    bucket: bucket.clone(),
                    prefix: self
                        .status_prefix
                        .as_deref()
                        .unwrap_or(DEFAULT_STATUS_PREFIX)
                        .trim_matches('/')
                        .to_string(),
                })
            }
            (None, Some(dir)) => Ok(StatusSinkSpec::Local {
                dir: super::absolute(dir)?.display().to_string(),
            }),
            (None, None) if default_local => Ok(StatusSinkSpec::Local {
                dir: default_status_dir(),
            }),
            (None, None) => Err(ControllerError::usage(
                "--status-bucket",
                "the sqs transport writes status to S3: pass --status-bucket BUCKET (or set \
                 PIER_STATUS_BUCKET), or --status-dir DIR for hosts that write locally",
            )),
        }
    }
}

/// A sink spec for humans: `s3://bucket/prefix` or the directory.
pub(crate) fn describe_sink(spec: &StatusSinkSpec) -> String {
    match spec {
        StatusSinkSpec::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
        StatusSinkSpec::Local { dir } => dir.clone(),
    }
}

/// Opens the store `spec` names; AWS clients are built only for S3.
pub(crate) async fn open_sink(
    spec: &StatusSinkSpec,
    aws: &AwsOptions,
) -> Result<Box<dyn StatusSink>, ControllerError> {
    let clients = match spec {
        StatusSinkSpec::S3 { .. } => Some(aws.clients().await?),
        StatusSinkSpec::Local { .. } => None,
    };
    let target = StatusTarget {
        sink: spec.clone(),
        notify_queue_url: None,
    };
    open_status_sink(&target, clients.as_ref())
        .map_err(|e| ControllerError::transport("cannot open the status store", e))
}

/// What `pier status` was asked.
#[derive(Debug, Clone)]
pub struct StatusOptions {
    /// The deployment.
    pub deployment_id: String,
    /// Where its records are.
    pub sink: SinkOptions,
    /// Hosts to show even when they have not reported (else: those that have).
    pub hosts: Vec<String>,
    /// How to reach S3.
    pub aws: AwsOptions,
}

/// Prints the table of `opts.deployment_id` on stdout. Returns the exit code: 0 when every
/// host listed succeeded, 1 when any failed or is still running or silent, so scripts can
/// ask "is it done and good?".
pub async fn status(opts: &StatusOptions) -> Result<i32, ControllerError> {
    if !pier_protocol::is_valid_id(&opts.deployment_id) {
        return Err(ControllerError::usage(
            "DEPLOYMENT_ID",
            format!(
                "`{}` is not a deployment id (letters, digits, `.`, `_`, `-`)",
                opts.deployment_id
            ),
        ));
    }
    let spec = opts.sink.spec(true)?;
    let sink = open_sink(&spec, &opts.aws).await?;
    let id = &opts.deployment_id;
    let mut hosts = sink
        .list_hosts(id)
        .await
        .map_err(|e| ControllerError::transport("cannot list the hosts' status records", e))?;
    for h in &opts.hosts {
        if !hosts.contains(h) {
            hosts.push(h.clone());
        }
    }
    if hosts.is_empty() {
        return Err(ControllerError::NoStatus {
            deployment_id: id.clone(),
            sink: describe_sink(&spec),
        });
    }
    let mut rows = Vec::new();
    for h in &hosts {
        let rec = sink
            .read(id, h)
            .await
            .map_err(|e| ControllerError::transport(format!("host {h}: cannot read status"), e))?;
        rows.push((h.clone(), rec));
    }
    print!("{}", render(&rows));
    let all_good = rows
        .iter()
        .all(|(_, r)| r.as_ref().map(|r| r.status) == Some(DeploymentStatus::Succeeded));
    Ok(if all_good { 0 } else { super::EXIT_FAILURE })
}

/// The table of events (host, event, status, duration, exit code) followed by each host's
/// overall status and error line. A host with no record yet shows as `no status yet`.
pub(crate) fn render(rows: &[(String, Option<StatusRecord>)]) -> String {
    let mut table = vec![[
        "HOST".to_string(),
        "EVENT".to_string(),
        "STATUS".to_string(),
        "DURATION".to_string(),
        "EXIT".to_string(),
    ]];
    for (host, rec) in rows {
        let Some(rec) = rec else { continue };
        for e in &rec.events {
            table.push([
                host.clone(),
                e.name.clone(),
                event_word(e),
                duration(e.started, e.ended).unwrap_or_else(|| "-".into()),
                e.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
    }
    let mut out = super::aligned(&table);
    out.push('\n');
    for (host, rec) in rows {
        match rec {
            None => {
                let _ = writeln!(out, "{host}: no status yet");
            }
            Some(rec) => {
                let _ = write!(out, "{host}: {}", overall_word(rec.status));
                if let Some(err) = &rec.error {
                    let _ = write!(out, ": {err}");
                }
                out.push('\n');
                if let Some(cause) = failing_event(rec).and_then(cause_line) {
                    let _ = writeln!(out, "  {cause}");
                }
            }
        }
    }
    out
}

/// The word shown for an event state.
pub(crate) fn state_word(s: EventState) -> &'static str {
    match s {
        EventState::Pending => "Pending",
        EventState::InProgress => "InProgress",
        EventState::Succeeded => "Succeeded",
        EventState::Failed => "Failed",
        EventState::Skipped => "Skipped",
        EventState::TimedOut => "TimedOut",
    }
}

/// How an event's state is shown: its word, and `Failed (ignored)` (or `TimedOut
/// (ignored)`) for a failure the deployment was asked to let pass.
pub(crate) fn event_word(e: &EventStatus) -> String {
    if e.ignored {
        format!("{} (ignored)", state_word(e.status))
    } else {
        state_word(e.status).to_string()
    }
}

/// The word shown for a host's overall state.
pub(crate) fn overall_word(s: DeploymentStatus) -> &'static str {
    match s {
        DeploymentStatus::InProgress => "InProgress",
        DeploymentStatus::Succeeded => "Succeeded",
        DeploymentStatus::Failed => "Failed",
    }
}

/// `1.25s`, `42s`, `3m07s` between two times, when both are known.
pub(crate) fn duration(
    started: Option<DateTime<Utc>>,
    ended: Option<DateTime<Utc>>,
) -> Option<String> {
    let ms = (ended? - started?).num_milliseconds().max(0);
    Some(if ms < 10_000 {
        format!("{:.2}s", ms as f64 / 1000.0)
    } else if ms < 60_000 {
        format!("{}s", ms / 1000)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    })
}

/// The event that failed the deployment on a host, if any (not a failure it ignored).
pub(crate) fn failing_event(rec: &StatusRecord) -> Option<&EventStatus> {
    rec.events.iter().find(|e| e.failed_deployment())
}

/// A failed event's machine-readable cause in one line, when its record has one:
/// `ValidateService failed [ScriptFailed] scripts/check.sh exit 3`.
pub(crate) fn cause_line(e: &EventStatus) -> Option<String> {
    let d = e.diagnostics.as_ref()?;
    let word = match e.status {
        EventState::TimedOut => "timed out",
        _ => "failed",
    };
    let mut out = format!("{} {word} [{}]", e.name, d.error_code);
    if let Some(s) = d.script_name.as_ref().or(e.failing_script.as_ref()) {
        let _ = write!(out, " {s}");
    }
    if let Some(c) = e.exit_code {
        let _ = write!(out, " exit {c}");
    }
    Some(out)
}

/// What went wrong on a failed host, for a human: the failing event, its script and exit
/// code, the error line, then the log tail indented.
pub(crate) fn failure_report(rec: &StatusRecord) -> String {
    let mut out = format!("{}: deployment failed", rec.host_id);
    if let Some(e) = failing_event(rec) {
        let _ = write!(out, " in {} ({})", e.name, state_word(e.status));
        if let Some(s) = &e.failing_script {
            let _ = write!(out, ", script {s}");
        }
        if let Some(c) = e.exit_code {
            let _ = write!(out, ", exit code {c}");
        }
        if let Some(d) = &e.diagnostics {
            let _ = write!(out, " [{}]", d.error_code);
        }
    }
    out.push('\n');
    if let Some(err) = &rec.error {
        let _ = writeln!(out, "  error: {err}");
    }
    if let Some(tail) = failing_event(rec).and_then(|e| e.log_tail.as_deref()) {
        let _ = writeln!(out, "  --- last output:");
        for line in tail.trim_end().lines() {
            let _ = writeln!(out, "  | {line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(host: &str, status: DeploymentStatus, events: Vec<EventStatus>) -> StatusRecord {
        let mut r = StatusRecord::new(host, "d-1");
        r.status = status;
        r.events = events;
        r
    }

    fn ev(name: &str, status: EventState, ms: i64, code: Option<i32>) -> EventStatus {
        let t: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        EventStatus {
            name: name.into(),
            status,
            started: Some(t),
            ended: Some(t + chrono::Duration::milliseconds(ms)),
            exit_code: code,
            failing_script: None,
            log_tail: None,
            diagnostics: None,
            ignored: false,
        }
    }

    #[test]
    fn table_lists_every_event_and_host() {
        let mut bad = rec(
            "h2",
            DeploymentStatus::Failed,
            vec![ev("ValidateService", EventState::Failed, 65_000, Some(3))],
        );
        bad.error = Some("ValidateService failed".into());
        bad.events[0].failing_script = Some("scripts/check.sh".into());
        bad.events[0].diagnostics = Some(pier_protocol::Diagnostics {
            error_code: pier_protocol::ErrorCode::ScriptFailed,
            script_name: Some("scripts/check.sh".into()),
            message: "script scripts/check.sh exited with code 3".into(),
            log_tail: None,
        });
        let text = render(&[
            (
                "h1".into(),
                Some(rec(
                    "h1",
                    DeploymentStatus::Succeeded,
                    vec![ev("Install", EventState::Succeeded, 1250, None)],
                )),
            ),
            ("h2".into(), Some(bad)),
            ("h3".into(), None),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "HOST  EVENT            STATUS     DURATION  EXIT");
        assert_eq!(lines[1], "h1    Install          Succeeded  1.25s     -");
        assert_eq!(lines[2], "h2    ValidateService  Failed     1m05s     3");
        assert!(text.contains("h1: Succeeded\n"));
        assert!(text.contains(
            "h2: Failed: ValidateService failed\n  ValidateService failed [ScriptFailed] scripts/check.sh exit 3\n"
        ));
        assert!(text.contains("h3: no status yet\n"));
    }

    #[test]
    fn failure_report_names_event_script_code_and_tail() {
        let mut e = ev("AfterInstall", EventState::TimedOut, 10, Some(137));
        e.failing_script = Some("scripts/slow.sh".into());
        e.log_tail = Some("one\ntwo\n".into());
        let text = failure_report(&rec("h1", DeploymentStatus::Failed, vec![e.clone()]));
        assert!(text.starts_with(
            "h1: deployment failed in AfterInstall (TimedOut), script scripts/slow.sh, exit code 137\n"
        ));
        // With the cause a newer agent records, the code follows on the same line.
        e.diagnostics = Some(pier_protocol::Diagnostics {
            error_code: pier_protocol::ErrorCode::ScriptTimedOut,
            script_name: Some("scripts/slow.sh".into()),
            message: "script scripts/slow.sh timed out after 10s".into(),
            log_tail: None,
        });
        let text = failure_report(&rec("h1", DeploymentStatus::Failed, vec![e.clone()]));
        assert!(text.starts_with(
            "h1: deployment failed in AfterInstall (TimedOut), script scripts/slow.sh, exit code 137 [ScriptTimedOut]\n"
        ), "{text}");
        assert_eq!(
            cause_line(&e).unwrap(),
            "AfterInstall timed out [ScriptTimedOut] scripts/slow.sh exit 137"
        );
        assert!(text.contains("  | one\n  | two\n"));
    }

    #[test]
    fn an_ignored_stop_failure_shows_as_such_and_is_not_the_cause() {
        let mut stop = ev("ApplicationStop", EventState::Failed, 40, Some(1));
        stop.ignored = true;
        stop.diagnostics = Some(pier_protocol::Diagnostics {
            error_code: pier_protocol::ErrorCode::ScriptFailed,
            script_name: Some("scripts/stop.sh".into()),
            message: "script scripts/stop.sh exited with code 1".into(),
            log_tail: None,
        });
        let ok = rec(
            "h1",
            DeploymentStatus::Succeeded,
            vec![stop.clone(), ev("Install", EventState::Succeeded, 10, None)],
        );
        let text = render(&[("h1".into(), Some(ok))]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "h1    ApplicationStop  Failed (ignored)  0.04s     1"
        );
        assert!(text.contains("h1: Succeeded\n"), "{text}");
        assert!(!text.contains("[ScriptFailed]"), "{text}");

        // A later failure is the one reported, not the ignored one before it.
        let bad = rec(
            "h1",
            DeploymentStatus::Failed,
            vec![stop, ev("ValidateService", EventState::Failed, 10, Some(3))],
        );
        assert_eq!(failing_event(&bad).unwrap().name, "ValidateService");
        assert!(failure_report(&bad).starts_with("h1: deployment failed in ValidateService"));
    }
}
