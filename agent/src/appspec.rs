//! TEMPORARY stand-in for the `appspec` module, holding only the agreed types that `install`
//! consumes. The real module (parser + validator) is written on another branch; at merge the
//! lead replaces this file with it. Nothing here parses anything.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Where a value sits in the AppSpec file, for located messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
}

/// What Install does with a file already present at a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileExistsBehavior {
    /// Fail the deployment, naming the file.
    Disallow,
    /// Replace the file.
    Overwrite,
    /// Keep the existing file.
    Retain,
}

/// One `files` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMapping {
    /// Relative to the bundle root, normalized; "" is the root.
    pub source: String,
    /// Absolute destination directory.
    pub destination: PathBuf,
    /// Where the entry is in the AppSpec.
    pub span: Span,
}

/// `permissions[].type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectType {
    /// Regular files (and symlinks).
    File,
    /// Directories.
    Directory,
}

/// `permissions[].context`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeLinuxContext {
    /// SELinux user (`name`).
    pub user: Option<String>,
    /// SELinux type.
    pub kind: String,
    /// MLS/MCS range.
    pub range: Option<String>,
}

/// One `permissions` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    /// File or directory the entry applies to.
    pub object: PathBuf,
    /// Glob relative to `object` (default `**`).
    pub pattern: Option<String>,
    /// Globs relative to `object` excluded from `pattern`.
    pub except: Vec<String>,
    /// Owner user name.
    pub owner: Option<String>,
    /// Owner group name.
    pub group: Option<String>,
    /// Mode bits (may include set-id bits).
    pub mode: Option<u32>,
    /// setfacl entries.
    pub acls: Vec<String>,
    /// SELinux context.
    pub context: Option<SeLinuxContext>,
    /// Object types the entry applies to; empty means both.
    pub types: Vec<ObjectType>,
    /// Where the entry is in the AppSpec.
    pub span: Span,
}

/// Target operating system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Os {
    /// Linux.
    Linux,
    /// Windows (refused on Linux).
    Windows,
}

/// Lifecycle events that take hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LifecycleEvent {
    /// ApplicationStop.
    ApplicationStop,
}

/// One hook script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// Script path in the bundle.
    pub location: String,
}

/// A validated AppSpec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSpec {
    /// `version`.
    pub version: String,
    /// `os`.
    pub os: Os,
    /// `files`.
    pub files: Vec<FileMapping>,
    /// `file_exists_behavior`.
    pub file_exists_behavior: Option<FileExistsBehavior>,
    /// `permissions`.
    pub permissions: Vec<Permission>,
    /// `hooks`.
    pub hooks: BTreeMap<LifecycleEvent, Vec<Hook>>,
}
