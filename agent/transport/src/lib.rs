//! How deployment commands reach a host and how its status leaves it.
//!
//! A [`Queue`] is what the daemon polls for commands: [`sqs::SqsQueue`] for fleets (one SQS
//! queue per host) or [`spool::Spool`], a local directory, for a single host with no cloud.
//! A [`StatusSink`] is where each deployment's [`StatusRecord`] is durably written:
//! [`s3::S3StatusSink`] or [`local::LocalStatusSink`], optionally wrapped in
//! [`notify::NotifyingSink`] to tell a queue after each write, and [`aws::aws_clients`] builds the AWS clients from the standard credential chain.
//! [`requests`] counts what this process asked of them, by operation.
//!
//! The rules the daemon follows with these parts: extend a message's visibility while its
//! deployment runs, [`Queue::ack`] only once the final status is written, and
//! [`Queue::reject`] (never ack) a message that is not a valid command, so the queue's
//! dead-letter policy keeps it for a human. A valid command whose deployment id the agent's
//! dedupe store has already seen (done, or running from another delivery) is a duplicate: ack
//! it without running it. This crate knows nothing of AppSpec or installs.
//!
//! A daemon's loop, in short:
//!
//! ```text
//! for msg in queue.receive(20 s):
//!     cmd = Command::from_json(msg.body)   else queue.reject(msg, reason); count it; continue
//!     dedupe.begin(cmd.deployment_id)      if Some(_): queue.ack(msg); continue
//!     sink = open_status_sink(&cmd.status, aws)
//!     keep_invisible(queue, msg, 5 min, deploy(cmd, sink))   // writes status at each event
//!     dedupe.finish(id); queue.ack(msg)    // only after the final status write returned
//! ```

pub mod aws;
pub(crate) mod dirwatch;
/// The one retry schedule, defined in `pier-sys` so the engine (which knows no transport) uses
/// it too.
pub use pier_sys::backoff;
pub mod local;
pub(crate) mod notify;
pub mod requests;
pub mod s3;
pub mod spool;
pub mod sqs;
pub mod store;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use pier_protocol::{StatusRecord, StatusSinkSpec, StatusTarget};

/// The future every transport operation returns (boxed so the traits can be used as
/// `dyn Queue` / `dyn StatusSink`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, TransportError>> + Send + 'a>>;

/// What went wrong talking to a queue or a status store.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// An AWS call failed.
    #[error("{op} on {target} failed: {message}{hint}", hint = if *.transient { " (transient; will retry)" } else { "" })]
    Aws {
        /// The API operation, e.g. `ReceiveMessage`.
        op: &'static str,
        /// The queue URL, bucket/key or queue name concerned.
        target: String,
        /// The SDK's full error chain.
        message: String,
        /// Whether retrying may help (network trouble, throttling, a 5xx).
        transient: bool,
    },
    /// A file operation failed (spool, local status, dedupe store).
    #[error("cannot {op} {path}: {source}; check that the directory exists and is writable by the agent")]
    Io {
        /// What was being done, e.g. `rename`.
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A stored status record could not be parsed.
    #[error("status record {location} is unreadable: {reason}; delete or rewrite it")]
    Corrupt {
        /// File path or `s3://bucket/key`.
        location: String,
        /// The parse error.
        reason: String,
    },
    /// The transport is not configured so that it can work.
    #[error("{0}")]
    Config(String),
}

impl TransportError {
    /// Whether the operation may succeed if retried (the daemon retries these with
    /// [`crate::backoff::Backoff`]).
    pub fn is_transient(&self) -> bool {
        match self {
            TransportError::Aws { transient, .. } => *transient,
            TransportError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut
            ),
            _ => false,
        }
    }

    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> TransportError {
        TransportError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A message taken from a [`Queue`], invisible to other receivers until acked, rejected, or
/// its visibility runs out.
#[derive(Debug, Clone)]
pub struct Received {
    /// The queue's id for the message (SQS message id, or the spool file name).
    pub id: String,
    /// The message body (a JSON [`pier_protocol::Command`] if well-formed).
    pub body: Vec<u8>,
    /// How many times the message has been received, this time included (SQS
    /// `ApproximateReceiveCount`; 2 for a spool file found in `processing/` after a restart).
    pub receive_count: u32,
    /// The handle the queue needs to act on this delivery (SQS receipt handle, spool path).
    pub(crate) receipt: String,
}

/// A source of deployment commands that the daemon polls.
pub trait Queue: Send + Sync {
    /// Waits up to `wait` (long poll; SQS caps it at 20 s) for messages and returns those that
    /// arrived, possibly none.
    fn receive(&self, wait: Duration) -> BoxFuture<'_, Vec<Received>>;
    /// Keeps `msg` invisible to other receivers for `visibility` from now (call it
    /// periodically while its deployment runs).
    fn extend<'a>(&'a self, msg: &'a Received, visibility: Duration) -> BoxFuture<'a, ()>;
    /// Deletes `msg` for good. Only once the deployment's final status is durably written.
    fn ack<'a>(&'a self, msg: &'a Received) -> BoxFuture<'a, ()>;
    /// Gives up on a malformed or unsupported `msg` without deleting it, so the dead-letter
    /// policy keeps it (SQS: visible again shortly, until maxReceiveCount moves it to the
    /// DLQ; spool: moved to `rejected/` beside a `.reason` file).
    fn reject<'a>(&'a self, msg: &'a Received, reason: &'a str) -> BoxFuture<'a, ()>;
    /// A short description for logs, e.g. the queue URL or spool directory.
    fn describe(&self) -> String;
}

/// Runs `work` while keeping `msg` invisible on `queue`: its visibility is set to
/// `visibility` now and renewed every third of it until `work` ends, so a deployment that runs
/// longer than the queue's visibility timeout is not handed to another receiver. A failed
/// renewal is logged and retried at the next tick (the work is not interrupted: the dedupe
/// store still stops a second run). Returns `work`'s output.
pub async fn keep_invisible<T>(
    queue: &dyn Queue,
    msg: &Received,
    visibility: Duration,
    work: impl Future<Output = T>,
) -> T {
    let visibility = visibility.max(Duration::from_secs(3));
    keep_invisible_renewing(queue, msg, visibility, visibility / 3, work).await
}

/// [`keep_invisible`] with the renewal interval chosen by the caller (it should be well
/// under `visibility`, or the message may become visible between two renewals).
pub async fn keep_invisible_renewing<T>(
    queue: &dyn Queue,
    msg: &Received,
    visibility: Duration,
    every: Duration,
    work: impl Future<Output = T>,
) -> T {
    let every = every.max(Duration::from_millis(10));
    let renew = async {
        loop {
            if let Err(e) = queue.extend(msg, visibility).await {
                log::warn!(
                    "cannot keep message {} invisible on {}: {e}",
                    msg.id,
                    queue.describe()
                );
            }
            tokio::time::sleep(every).await;
        }
    };
    tokio::pin!(work);
    tokio::select! {
        out = &mut work => out,
        never = renew => never,
    }
}

/// A durable store of [`StatusRecord`]s, one per deployment and host.
pub trait StatusSink: Send + Sync {
    /// Writes (replaces) the record for its deployment and host; durable when it returns.
    fn write<'a>(&'a self, record: &'a StatusRecord) -> BoxFuture<'a, ()>;
    /// Reads the record of `deployment_id` on `host_id`, `None` if none was written.
    fn read<'a>(
        &'a self,
        deployment_id: &'a str,
        host_id: &'a str,
    ) -> BoxFuture<'a, Option<StatusRecord>>;
    /// The hosts that have written a record for `deployment_id`, sorted.
    fn list_hosts<'a>(&'a self, deployment_id: &'a str) -> BoxFuture<'a, Vec<String>>;
}

/// Opens the status sink a command names (with its notification queue, if any). AWS
/// clients are needed only for S3 sinks and notifications; pass `None` on a host without AWS
/// access and such a command fails with a [`TransportError::Config`] that says so.
pub fn open_status_sink(
    target: &StatusTarget,
    aws: Option<&aws::AwsClients>,
) -> Result<Box<dyn StatusSink>, TransportError> {
    let need_aws = || {
        aws.ok_or_else(|| {
            TransportError::Config(
                "the command asks for S3 status or an SQS notification but this agent has no \
                 AWS access configured; configure the SQS transport or use a local status sink"
                    .to_string(),
            )
        })
    };
    let sink: Box<dyn StatusSink> = match &target.sink {
        StatusSinkSpec::S3 { bucket, prefix } => Box::new(s3::S3StatusSink::new(
            need_aws()?.s3.clone(),
            bucket,
            prefix,
        )),
        StatusSinkSpec::Local { dir } => Box::new(local::LocalStatusSink::new(dir)),
    };
    Ok(match &target.notify_queue_url {
        Some(url) => Box::new(notify::NotifyingSink::new(
            sink,
            need_aws()?.sqs.clone(),
            url,
        )),
        None => sink,
    })
}

/// Opens the shared object store at the place a status sink spec names: the controller keeps
/// its records beside the hosts' status records, so one bucket and prefix (or one directory)
/// holds a deployment's whole story.
pub fn open_store(
    spec: &StatusSinkSpec,
    aws: Option<&aws::AwsClients>,
) -> Result<Box<dyn store::ObjectStore>, TransportError> {
    Ok(match spec {
        StatusSinkSpec::S3 { bucket, prefix } => {
            let aws = aws.ok_or_else(|| {
                TransportError::Config(
                    "an S3 store needs AWS access; configure it or use a local directory"
                        .to_string(),
                )
            })?;
            Box::new(store::S3Store::new(aws.s3.clone(), bucket, prefix))
        }
        StatusSinkSpec::Local { dir } => Box::new(store::DirStore::new(dir)),
    })
}

/// The relative key/path of a status record: `deployments/{id}/hosts/{host}.json`.
pub(crate) fn status_record_path(deployment_id: &str, host_id: &str) -> String {
    format!("deployments/{deployment_id}/hosts/{host_id}.json")
}

/// Writes `bytes` to `path` so that readers see the old content or the new, never a part:
/// a temp file in the same directory, fsync, rename over, fsync of the directory.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), TransportError> {
    pier_sys::atomic_write(path, bytes).map_err(|e| TransportError::io("write", path, e))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), TransportError> {
    pier_sys::sync_dir(dir).map_err(|e| TransportError::io("fsync directory", dir, e))
}

/// Runs blocking file work off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransportError> + Send + 'static,
) -> Result<T, TransportError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}
