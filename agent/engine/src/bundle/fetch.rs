//! Getting a revision onto this host: the engine asks a [`RevisionFetcher`] (given by whoever
//! builds the engine; the agent's fetches from S3, HTTP(S), GitHub or a local path) to put
//! the bundle at a path, its SHA-256 verified, and then unpacks it itself. The engine knows
//! the vocabulary of fetching ([`Fetched`], [`FetchError`], [`FetchProgress`]), not how any
//! store is reached.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use pier_protocol::{BundleType, ErrorCode, Revision};

/// Fetches revisions for the engine.
pub trait RevisionFetcher: Send + Sync + std::fmt::Debug {
    /// Fetches `revision` to `dest` (a file path; its directory exists), verifies its SHA-256
    /// when the revision has one, and returns what was fetched. A local directory revision is
    /// returned in place. On a hash mismatch nothing is left at `dest`.
    fn fetch<'a>(
        &'a self,
        revision: &'a Revision,
        dest: &'a Path,
        progress: ProgressFn<'a>,
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, FetchError>> + Send + 'a>>;
}

/// The progress callback's type.
pub type ProgressFn<'a> = &'a (dyn Fn(FetchProgress) + Send + Sync);

/// Why a revision could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A local file operation failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The server answered with an error status.
    #[error("GET {url} returned HTTP {status}; check that the revision exists and is readable{hint}", hint = if *.status == 401 || *.status == 403 || *.status == 404 { " (for a private GitHub repository, configure a token)" } else { "" })]
    Http {
        /// The URL (never with a token in it).
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The request did not get an answer (DNS, connection, TLS, timeout, cut-off body).
    #[error("GET {url} failed: {reason}; check the network and proxy settings")]
    Network {
        /// The URL.
        url: String,
        /// reqwest's description.
        reason: String,
    },
    /// An S3 call failed.
    #[error("fetching {location} failed: {message}")]
    S3 {
        /// `s3://bucket/key`.
        location: String,
        /// The SDK's error chain.
        message: String,
        /// Whether a retry may help.
        transient: bool,
    },
    /// An S3 revision was asked for but no S3 client was configured.
    #[error("revision {location} is in S3 but this agent has no AWS access configured; configure AWS access or use an HTTP or local revision")]
    NoS3 {
        /// `s3://bucket/key`.
        location: String,
    },
    /// S3 returned a different object than the command expected.
    #[error("{location} has ETag {actual}, the command expects {expected}; the object was replaced after the revision was registered: push it again")]
    EtagMismatch {
        /// `s3://bucket/key`.
        location: String,
        /// The ETag in the command.
        expected: String,
        /// The ETag S3 returned.
        actual: String,
    },
    /// The bundle's SHA-256 is not the one in the command; the downloaded file was removed.
    #[error("bundle from {source_desc} has SHA-256 {actual}, the command expects {expected}; the download was removed. The revision changed or was corrupted: push it again")]
    Sha256Mismatch {
        /// Where the bundle came from.
        source_desc: String,
        /// The SHA-256 in the command.
        expected: String,
        /// The SHA-256 of what was fetched.
        actual: String,
    },
    /// The fetcher could not be built.
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
}

impl FetchError {
    /// Whether retrying may help.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Network { .. } => true,
            FetchError::Http { status, .. } => *status == 429 || *status >= 500,
            FetchError::S3 { transient, .. } => *transient,
            _ => false,
        }
    }

    /// A local file operation's failure.
    pub fn io(op: &'static str, path: &Path, source: std::io::Error) -> FetchError {
        FetchError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How far a download has got, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchProgress {
    /// Bytes written so far (starts again at 0 when a retry restarts the download).
    pub done: u64,
    /// Total size when the source says.
    pub total: Option<u64>,
}

/// A fetched revision, verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The bundle: the destination file, or for a local directory revision the directory
    /// itself (nothing is copied).
    pub path: PathBuf,
    /// The bundle's SHA-256 (lowercase hex); `None` for a directory.
    pub sha256: Option<String>,
    /// Its size in bytes (0 for a directory).
    pub bytes: u64,
    /// Its format.
    pub bundle_type: BundleType,
}

impl FetchError {
    /// The code a failed DownloadBundle carries in its diagnostics.
    pub(crate) fn error_code(&self) -> ErrorCode {
        match self {
            FetchError::EtagMismatch { .. } | FetchError::Sha256Mismatch { .. } => {
                ErrorCode::ChecksumMismatch
            }
            _ => ErrorCode::BundleDownloadFailed,
        }
    }
}
