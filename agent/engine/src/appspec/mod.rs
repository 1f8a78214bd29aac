//! The AppSpec: CodeDeploy's `appspec.yml` for EC2/on-premises, parsed and validated into
//! typed values that `install`, `hooks` and `deploy` consume.
//!
//! This module owns the meaning of every key and every validation rule, and reports each
//! problem (all of them, not the first) as a [`Diagnostic`] located at `FILE:LINE:COL`, naming
//! the key and saying how to fix it. It does no I/O: callers hand it the text, and the checks
//! that need the bundle or the host ([`check_environment`], [`check_file_objects`]) take
//! callbacks. Reading files, archives and the user database is `validate`'s and `deploy`'s job.

mod check;
mod tree;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::PathBuf;

use std::time::Duration;

use pier_protocol::ErrorCode;
use serde::Serialize;

pub use check::{check_environment, check_file_objects};

/// A position in the AppSpec text, both counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub struct Span {
    /// Line, from 1.
    pub(crate) line: usize,
    /// Column in characters, from 1.
    pub(crate) col: usize,
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// The `os` key. Only Linux deploys here (`os: windows` is refused with its own message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Os {
    /// `os: linux`, the only one pier deploys.
    Linux,
}

pub use pier_protocol::{
    FileExistsBehavior, LifecycleEvent, UnknownFileExistsBehavior, UnknownLifecycleEvent,
};

/// One `files` entry: copy `source` (a file, or a directory's contents) under `destination`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileMapping {
    /// Relative to the bundle root, normalized (no `.`, `..`, or leading `/`); "" is the root.
    pub source: String,
    /// Absolute and normalized (no trailing `/`, no `.`).
    pub destination: PathBuf,
    /// Where the entry starts in the AppSpec.
    pub span: Span,
}

/// The object kinds a `permissions` entry's `type` list can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectType {
    /// Regular files (and symlinks) under a directory object.
    File,
    /// Directories under a directory object.
    Directory,
}

/// A `permissions` entry's SELinux `context`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeLinuxContext {
    /// The SELinux user (`name` in the AppSpec), e.g. `system_u`.
    pub user: Option<String>,
    /// The SELinux type (`type` in the AppSpec), e.g. `httpd_sys_content_t`.
    pub kind: String,
    /// The MLS/MCS range, e.g. `s0` or `s0-s0:c0.c255`.
    pub range: Option<String>,
}

/// One `permissions` entry: ownership, mode, ACLs and SELinux context for an installed path
/// or, for a directory, the objects under it that `pattern` matches and `except` does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Permission {
    /// Absolute, normalized.
    pub object: PathBuf,
    /// A glob on names under `object`; None means every object (`**`, the default).
    pub pattern: Option<String>,
    /// Globs of names under `object` to leave alone.
    pub except: Vec<String>,
    /// User to `chown` to.
    pub owner: Option<String>,
    /// Group to `chgrp` to.
    pub group: Option<String>,
    /// Permission bits, e.g. 0o644 (set-id and sticky bits allowed with four digits).
    pub mode: Option<u32>,
    /// setfacl entries such as `u:bob:rw` or `d:g:staff:rx`, validated.
    pub acls: Vec<String>,
    /// SELinux context to set (`chcon`).
    pub context: Option<SeLinuxContext>,
    /// Which kinds of object this entry applies to; empty means both.
    pub types: Vec<ObjectType>,
    /// Where the entry starts in the AppSpec.
    pub span: Span,
}

/// One script under a lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Hook {
    /// Relative to the bundle root, normalized.
    pub(crate) location: String,
    /// How long the script may run before its process group is stopped (default 3600 s).
    pub(crate) timeout: Duration,
    /// The user to run as; None runs as the agent's user.
    pub(crate) runas: Option<String>,
    /// Where the entry starts in the AppSpec.
    pub(crate) span: Span,
}

/// A validated AppSpec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppSpec {
    /// Always "0.0" once validated.
    pub(crate) version: String,
    /// Always [`Os::Linux`] once validated.
    pub(crate) os: Os,
    /// What Install copies, in the order written.
    pub(crate) files: Vec<FileMapping>,
    /// None when the AppSpec leaves it to the deployment (codedeploy-local `-b`).
    pub(crate) file_exists_behavior: Option<FileExistsBehavior>,
    /// What Install applies to the placed objects, in the order written.
    pub(crate) permissions: Vec<Permission>,
    /// Only hookable events appear; an event listed with no scripts is absent.
    pub(crate) hooks: BTreeMap<LifecycleEvent, Vec<Hook>>,
}

impl AppSpec {
    /// The scripts for `ev` in the order written; empty when there are none.
    pub(crate) fn hooks_for(&self, ev: LifecycleEvent) -> &[Hook] {
        self.hooks.get(&ev).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether any event runs a script: if not, nothing ever reads the revision's files
    /// after Install (not this deployment, not the next one's ApplicationStop).
    pub(crate) fn runs_scripts(&self) -> bool {
        self.hooks.values().any(|h| !h.is_empty())
    }
}

/// How bad a finding is: errors make the AppSpec invalid, warnings do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The AppSpec cannot be deployed as written.
    Error,
    /// Deployable, but probably not what was meant, or not portable to CodeDeploy.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One finding, located. Displayed as
/// `FILE:LINE:COL: error: KEY: MESSAGE; HINT` on one line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The label the caller gave for the AppSpec (usually its path).
    pub(crate) file: String,
    /// Where the value concerned starts.
    pub span: Span,
    /// The key concerned, as a path: `files[1].destination`, `hooks.ApplicationStart[0]`;
    /// empty for problems with the document as a whole.
    pub(crate) key: String,
    /// What is wrong.
    pub(crate) message: String,
    /// What to do about it.
    pub(crate) hint: Option<String>,
}

impl Diagnostic {
    /// True for an error (the AppSpec cannot be deployed).
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}: ", self.file, self.span, self.severity)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

/// The one size limit on an AppSpec, wherever it is read (validate, deploy-local, the
/// daemon, an archive member): anything larger is surely not one, and is never read whole.
pub const MAX_APPSPEC_BYTES: u64 = 4 * 1024 * 1024;

/// Why an opened AppSpec file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A FIFO, device, directory or socket: never read (a device may never end).
    #[error("it is {0}, not a regular file")]
    NotRegular(&'static str),
    /// Past [`MAX_APPSPEC_BYTES`].
    #[error("it is over {MAX_APPSPEC_BYTES} bytes; an AppSpec is a small YAML file")]
    TooLarge,
    /// The read itself failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads an opened AppSpec: only a regular file, only up to [`MAX_APPSPEC_BYTES`] (the one
/// check every reader uses; a file that grows while read is still cut at the limit).
pub fn read_bounded(file: std::fs::File) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let ft = file.metadata()?.file_type();
    if !ft.is_file() {
        return Err(ReadError::NotRegular(if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a file"
        }));
    }
    let mut bytes = Vec::new();
    file.take(MAX_APPSPEC_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_APPSPEC_BYTES {
        return Err(ReadError::TooLarge);
    }
    Ok(bytes)
}

/// Why a revision's AppSpec cannot be used for a deployment: it cannot be read (usually: it
/// is not in the bundle), or it has errors, its own or against the bundle and the host.
#[derive(Debug, thiserror::Error)]
pub enum AppSpecError {
    /// It could not be opened beneath the revision root: missing, not a regular file, or a
    /// link that leads out of the bundle (then nothing of it was read).
    #[error(
        "cannot use the AppSpec {name} at the bundle root: {source}{}",
        open_hint(.source)
    )]
    Open {
        /// The AppSpec's file name in the bundle.
        name: String,
        /// Why.
        #[source]
        source: crate::bundle::ConfinedError,
    },
    /// It was opened but refused unread (not a regular file, too large) or the read failed.
    #[error("cannot read the AppSpec {name}: {source}")]
    Read {
        /// The AppSpec's file name in the bundle.
        name: String,
        /// Why.
        #[source]
        source: ReadError,
    },
    /// Hook locations or `files` sources that lead out of the bundle through a symlink.
    #[error("refused bundle: {}", .entries.join("; "))]
    Refused {
        /// One line per refused path, naming the AppSpec key and the entry.
        entries: Vec<String>,
    },
    /// Every finding that makes it invalid (a parse failure also lists its warnings).
    #[error("{}", join_diagnostics(.diagnostics))]
    Invalid {
        /// The findings, in the order of the text.
        diagnostics: Vec<Diagnostic>,
    },
}

/// The hint for an AppSpec that cannot be opened: naming another file helps only when this
/// one is missing, not when it leads out of the bundle or is not a file.
fn open_hint(source: &crate::bundle::ConfinedError) -> &'static str {
    if matches!(source, crate::bundle::ConfinedError::Missing { .. }) {
        " (use -A to name another file)"
    } else {
        ""
    }
}

impl AppSpecError {
    /// The code a failed event carries: [`ErrorCode::BundleRefused`] when the AppSpec, a hook
    /// location or a `files` source leads out of the bundle through a symlink (a refused
    /// bundle, like an archive entry that escapes); [`ErrorCode::AppSpecInvalid`] for the
    /// rest, also an AppSpec that is missing, too large or not a regular file, and a hook
    /// script or `runas` user the check finds missing before any hook runs.
    pub(crate) fn error_code(&self) -> ErrorCode {
        match self {
            AppSpecError::Open { source, .. } if source.is_escape() => ErrorCode::BundleRefused,
            AppSpecError::Refused { .. } => ErrorCode::BundleRefused,
            AppSpecError::Open { .. }
            | AppSpecError::Read { .. }
            | AppSpecError::Invalid { .. } => ErrorCode::AppSpecInvalid,
        }
    }
}

fn join_diagnostics(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A valid AppSpec and the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The typed AppSpec.
    pub spec: AppSpec,
    /// Findings that do not stop a deployment.
    pub warnings: Vec<Diagnostic>,
}

/// Parse and validate text read from `file` (the label used in messages).
///
/// `Err` holds every finding, errors and warnings, in the order of the text.
pub(crate) fn parse(file: &str, text: &str) -> Result<Parsed, Vec<Diagnostic>> {
    check::parse(file, text)
}

/// Like [`parse`], for raw bytes: text that is not UTF-8 is reported at the line and column
/// of the first bad byte. A leading byte-order mark is ignored.
pub fn parse_bytes(file: &str, bytes: &[u8]) -> Result<Parsed, Vec<Diagnostic>> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse(file, text),
        Err(e) => {
            let good = &bytes[..e.valid_up_to()];
            let line = 1 + good.iter().filter(|&&b| b == b'\n').count();
            let line_start = good.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            let col = 1 + String::from_utf8_lossy(&good[line_start..]).chars().count();
            Err(vec![Diagnostic {
                severity: Severity::Error,
                file: file.to_string(),
                span: Span { line, col },
                key: String::new(),
                message: "the AppSpec is not UTF-8 text".to_string(),
                hint: Some("save the file as UTF-8".to_string()),
            }])
        }
    }
}

#[cfg(test)]
mod tests;
