//! The deployment controller behind the `pier` CLI: [`push`] archives a directory and uploads
//! it as a revision (to S3, or to a local path for the spool transport), [`deploy`] turns a
//! revision into one [`pier_protocol::Command`] per host, drops each into that host's queue
//! and can follow the hosts' status records to the end, and [`status`] prints a deployment's
//! per-host, per-event table from the records the agents wrote, and [`hosts`] lists the hosts
//! that announced themselves in the registry, with their health. [`signing`] makes and reads
//! the ed25519 keys `deploy --signing-key` signs commands with.
//!
//! The fleet side: [`group`] reads the deployment group definitions operators write and picks
//! a group's hosts from the registry; [`rules`] is CodeDeploy's minimum-healthy-hosts
//! arithmetic; [`rollout`] drives one deployment batch by batch with all state in a record in
//! the shared store (conditional writes, a lease, resume, rollback); [`fleet`] is the
//! commands over that store (`group`, `deploy` to a group, `stop`, `approve`, `reject`,
//! `rollback`). [`history`] loads the deployment records (`pier history`) and [`dora`] computes the DORA
//! metrics from them (`pier dora`, and the dashboard). [`notify`] tells a group's SNS topics
//! and webhooks about its deployments.
//!
//! The controller only speaks the wire protocol: it knows where a host's queue and status
//! records are ([`pier_transport`]), never how the host runs a deployment. Errors are
//! [`ControllerError`]s that name the flag or field at fault; [`ControllerError::exit_code`]
//! maps them to the CLI's exit codes (64 for usage and configuration mistakes, 1 for
//! failures), so the binary stays a thin layer of argument parsing.

pub mod dashboard;
pub mod deploy;
pub mod dora;
pub mod environments;
pub mod fleet;
pub mod group;
mod health;
pub mod history;
pub mod hosts;
pub mod index;
pub mod notify;
pub mod push;
pub mod revision;
pub mod rollout;
pub mod rules;
pub mod signing;
pub mod status;

use std::path::{Path, PathBuf};

use pier_transport::aws::{aws_clients, AwsClients, AwsSettings};
use pier_transport::TransportError;

/// Exit code for a usage or configuration error (BSD `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;
/// Exit code for a failure: a failed deployment, an unreachable service, a broken file.
pub(crate) const EXIT_FAILURE: i32 = 1;

/// Why a controller command could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A flag is missing, malformed, or contradicts another one.
    #[error("{flag}: {message}")]
    Usage {
        /// The flag (e.g. `--s3-location`) or argument concerned.
        flag: String,
        /// What is wrong and what to pass instead.
        message: String,
    },
    /// A local file operation failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done, e.g. `read`.
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The source directory could not be archived.
    #[error("cannot archive {path}: {reason}")]
    Archive {
        /// The file or directory that could not be added.
        path: PathBuf,
        /// Why, and what to do about it.
        reason: String,
    },
    /// An S3 call failed.
    #[error("{op} {location} failed: {message}; check the bucket, your credentials and AWS_ENDPOINT_URL")]
    S3 {
        /// The API operation, e.g. `PutObject`.
        op: &'static str,
        /// `s3://bucket/key`.
        location: String,
        /// The SDK's error chain.
        message: String,
        /// Whether it may go away on retry (a timeout, a broken connection, throttling, 5xx).
        transient: bool,
    },
    /// The revision lacks something a command needs (its sha256, its bundle type).
    #[error("revision {revision}: {message}")]
    Revision {
        /// The revision as given on the command line.
        revision: String,
        /// What is missing and how to supply it.
        message: String,
    },
    /// Talking to a host's queue or the status store failed.
    #[error("{context}: {source}")]
    Transport {
        /// What was being done, naming the host or sink.
        context: String,
        /// The transport's error.
        #[source]
        source: TransportError,
    },
    /// The signing key file cannot be used.
    #[error("signing key {path}: {message}")]
    SigningKey {
        /// The key file (`--signing-key` or `PIER_SIGNING_KEY`).
        path: PathBuf,
        /// What is wrong with it and what to do.
        message: String,
    },
    /// The command built from the flags is not a valid protocol command.
    #[error("the deployment command would be invalid: {0}; fix the corresponding flag")]
    Protocol(#[from] pier_protocol::ProtocolError),
    /// A stored deployment record or group definition cannot be read.
    #[error("{location} is unreadable: {message}; fix or delete it")]
    Record {
        /// Where it is (`s3://bucket/key` or a path).
        location: String,
        /// What is wrong.
        message: String,
    },
    /// Notifications cannot be set up (the HTTP client webhooks are posted with).
    #[error("cannot set up notifications: {0}")]
    Notify(String),
    /// No host has written a status record for the deployment.
    #[error("no status records for deployment {deployment_id} in {sink}; check the deployment id and the status flags (--status-bucket/--status-prefix or --status-dir)")]
    NoStatus {
        /// The deployment asked about.
        deployment_id: String,
        /// The sink that was searched, e.g. `s3://bucket/prefix` or a directory.
        sink: String,
    },
}

impl ControllerError {
    /// The CLI exit code for this error: [`EXIT_USAGE`] for mistakes in the flags or the
    /// revision given, [`EXIT_FAILURE`] for everything else.
    pub(crate) fn exit_code(&self) -> i32 {
        match self {
            ControllerError::Usage { .. }
            | ControllerError::Revision { .. }
            | ControllerError::SigningKey { .. }
            | ControllerError::Protocol(_) => EXIT_USAGE,
            ControllerError::Transport {
                source: TransportError::Config(_),
                ..
            } => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }

    /// Whether the failed call may succeed if made again: a network fault or a 5xx, not a
    /// mistake in the flags or a missing object.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            ControllerError::S3 { transient, .. } => *transient,
            ControllerError::Transport { source, .. } => source.is_transient(),
            _ => false,
        }
    }

    pub(crate) fn usage(flag: impl Into<String>, message: impl Into<String>) -> ControllerError {
        ControllerError::Usage {
            flag: flag.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> ControllerError {
        ControllerError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn transport(context: impl Into<String>, source: TransportError) -> ControllerError {
        ControllerError::Transport {
            context: context.into(),
            source,
        }
    }
}

/// How the controller reaches AWS; empty fields fall back to the standard chain
/// (`AWS_REGION`, `AWS_PROFILE`, `AWS_ENDPOINT_URL`, ...).
#[derive(Debug, Clone, Default)]
pub struct AwsOptions {
    /// Region override.
    pub region: Option<String>,
    /// Endpoint override for S3 and SQS (moto, MinIO, ...).
    pub endpoint_url: Option<String>,
    /// Named profile.
    pub profile: Option<String>,
    /// A role to assume with the credentials found (another account's deployer role).
    pub role_arn: Option<String>,
}

impl AwsOptions {
    /// Builds the clients; only called by commands that need AWS, so a spool-only
    /// deployment works on a machine with no AWS configuration at all.
    pub(crate) async fn clients(&self) -> Result<AwsClients, ControllerError> {
        let settings = AwsSettings {
            region: self.region.clone(),
            endpoint_url: self.endpoint_url.clone(),
            profile: self.profile.clone(),
            credentials: None,
            role_arn: self.role_arn.clone(),
        };
        aws_clients(&settings).await.map_err(|e| {
            ControllerError::transport(
                "cannot set up AWS access (pier takes --region or AWS_REGION, --profile, \
                     --endpoint-url or AWS_ENDPOINT_URL)",
                e,
            )
        })
    }
}

/// Parses `s3://BUCKET/KEY[?versionId=V]` into its parts; `flag` names the flag in errors.
pub(crate) fn parse_s3_url(
    flag: &str,
    url: &str,
) -> Result<(String, String, Option<String>), ControllerError> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        ControllerError::usage(flag, format!("`{url}` is not an s3://BUCKET/KEY location"))
    })?;
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let (bucket, key) = path.split_once('/').unwrap_or((path, ""));
    if bucket.is_empty() || key.is_empty() || key.ends_with('/') {
        return Err(ControllerError::usage(
            flag,
            format!("`{url}` needs both a bucket and an object key: s3://BUCKET/KEY"),
        ));
    }
    let mut version_id = None;
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("versionId", v)) if !v.is_empty() => version_id = Some(v.to_string()),
                _ => {
                    return Err(ControllerError::usage(
                        flag,
                        format!("`{url}`: the only query parameter understood is versionId=ID"),
                    ))
                }
            }
        }
    }
    Ok((bucket.to_string(), key.to_string(), version_id))
}

/// `path` made absolute against the current directory (without resolving symlinks, so the
/// path a host sees is the one the operator typed).
pub(crate) fn absolute(path: &Path) -> Result<PathBuf, ControllerError> {
    std::path::absolute(path).map_err(|e| ControllerError::io("make absolute", path, e))
}

/// A spinner-free progress bar on stderr when it is a terminal, hidden otherwise (so
/// scripts and CI logs get plain lines only).
pub(crate) fn progress_bar(len: u64, message: &str, bytes: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let template = if bytes {
        "{msg:>10} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})"
    } else {
        "{msg:>10} [{bar:40}] {pos}/{len} files"
    };
    let style = indicatif::ProgressStyle::with_template(template)
        .expect("the template is valid")
        .progress_chars("=> ");
    let bar = indicatif::ProgressBar::new(len).with_style(style);
    bar.set_message(message.to_string());
    bar
}

/// Rows as text columns, each but the last padded to its widest cell and two spaces apart,
/// one line a row (trailing spaces trimmed): the tables of `status`, `hosts` and `history`.
pub(crate) fn aligned<R: AsRef<[String]>>(rows: &[R]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.as_ref().iter().enumerate() {
            if widths.len() <= i {
                widths.push(0);
            }
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let row = row.as_ref();
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Runs a controller future on a fresh runtime and turns its result into an exit code,
/// printing the error (prefixed `pier: `) on stderr. The binary's `main` is this call.
pub fn run<F>(work: F) -> i32
where
    F: std::future::Future<Output = Result<i32, ControllerError>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pier: cannot start the async runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    match rt.block_on(work) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pier: {e}");
            e.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls() {
        assert_eq!(
            parse_s3_url("--x", "s3://b/k/x.tgz").unwrap(),
            ("b".into(), "k/x.tgz".into(), None)
        );
        assert_eq!(
            parse_s3_url("--x", "s3://b/k.tgz?versionId=v1").unwrap(),
            ("b".into(), "k.tgz".into(), Some("v1".into()))
        );
        for bad in ["b/k", "s3://b", "s3://b/", "s3:///k", "s3://b/k?x=1"] {
            let e = parse_s3_url("--x", bad).unwrap_err();
            assert!(e.to_string().starts_with("--x:"), "{e}");
            assert_eq!(e.exit_code(), EXIT_USAGE);
        }
    }
}
