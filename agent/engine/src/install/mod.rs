//! Install: copy an unpacked revision's files where the AppSpec's `files` section says, with
//! the CodeDeploy agent's semantics, as a plan that can be printed (dry run) and then applied.
//!
//! [`plan`] looks at the revision, the previous install's [`Manifest`] and the disk, and decides
//! everything up front: what of the previous install to remove, which directories to make,
//! which files to create, replace, keep (RETAIN) or leave as they are (unchanged since the last
//! install), and which permissions to set. Every refusal (DISALLOW, two sources for one
//! destination, unknown owner, missing `setfacl`, ...) happens here, before anything changed.
//! [`apply`] then carries the plan out in three phases: stage everything new beside its
//! destination (synced), switch each path by rename, then remove what the new revision lacks,
//! so that a stop at any point leaves each path old or new. The result is the manifest of what
//! this install placed, which the `state` module stores for the next install's cleanup; the
//! `intent` module records each phase so the next start can finish or undo a stopped install.
//!
//! The file steps of a plan are independent of one another once their directories exist, so a
//! later change can apply them in parallel without touching these semantics. Knows nothing of
//! queues or hooks; the deploy engine calls it.

mod intent;
mod permissions;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use pier_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::appspec::{FileExistsBehavior, FileMapping, Permission};
use crate::bundle::confined::{self, Confined, ConfinedError};
use crate::bundle::unpack::{Digest as SourceDigest, FileIdent, Walked};

pub(crate) use intent::{recover as recover_intent, InstallLog, Intent, Outcome};
pub use permissions::check_setid;
pub(crate) use permissions::PermissionStep;

/// A hash map for the plan's many path lookups: foldhash, fast on short keys and seeded at
/// random per process (so a bundle's paths are not chosen against a known seed; foldhash
/// claims only minimal resistance to that), where the standard SipHash was a tenth of an
/// unchanged redeploy of 10,000 files.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// The set of [`FastMap`].
type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Mode of directories Install has to make that the bundle says nothing about (the missing
/// ancestors of a destination, a destination directory itself).
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// What an install placed: the input of the next install's cleanup and of "unchanged" checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Everything placed, parents before children.
    pub entries: Vec<ManifestEntry>,
    /// The revision directory the install read its files from (canonical), whose hard links
    /// to a directory bundle's files keep those inodes alive: see [`SourceStat`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<PathBuf>,
}

/// The kind of a placed object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (recreated as a link, never followed).
    Symlink,
}

/// One object an install placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Absolute destination.
    pub path: PathBuf,
    /// What it is.
    pub kind: EntryKind,
    /// Size in bytes (files only; 0 otherwise).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) size: u64,
    /// Permission bits on disk once the install finished (after `permissions`).
    pub(crate) mode: u32,
    /// Hex sha256 of the content (files only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sha256: Option<String>,
    /// The link's target (symlinks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) link_target: Option<PathBuf>,
    /// true when this install created the directory (so cleanup may remove it if empty)
    #[serde(default, skip_serializing_if = "is_false")]
    pub created: bool,
    /// The file as the install left it (files only): what lets the next install trust it
    /// unchanged without reading it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) disk: Option<Box<DiskStat>>,
    /// The revision file it came from (files only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) source: Option<Box<SourceStat>>,
    /// That file's ctime, when it was settled as the install looked at it: see
    /// [`SourceStat`]. A field of its own (not in the `source` array, whose length an agent
    /// of an earlier version checks), so that such an agent still reads this manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) source_ctime: Option<(i64, i64)>,
}

impl ManifestEntry {
    /// Records the revision file behind this entry as a manifest stores it: the ctime in
    /// [`ManifestEntry::source_ctime`], none in the record itself, exactly as a manifest read
    /// back holds it (so that an install that changed nothing compares equal to the manifest
    /// it started from, and leaves the file alone).
    fn set_source(&mut self, source: Option<&SourceStat>) {
        let mut source = source.cloned();
        self.source_ctime = source.as_mut().and_then(|s| s.ctime.take());
        self.source = source.map(Box::new);
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A placed file as the install that placed or kept it left it, permissions applied. Equal
/// to what is on disk now (same inode, size, mtime and ctime, which every write, rename,
/// chmod, chown and ACL change moves forward and nothing can set back), the file is still
/// exactly what the manifest says: its content need not be read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "DiskStatRecord", into = "DiskStatRecord")]
pub(crate) struct DiskStat {
    pub(crate) ident: FileIdent,
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Whether the install's `permissions` gave it an ACL (else it has none: setting one
    /// since would have moved the ctime).
    pub(crate) acl: bool,
}

/// [`DiskStat`] as stored: an array, as a manifest holds one per file.
type DiskStatRecord = (FileIdent, u32, u32, u32, bool);

impl From<DiskStatRecord> for DiskStat {
    fn from((ident, mode, uid, gid, acl): DiskStatRecord) -> Self {
        DiskStat {
            ident,
            mode,
            uid,
            gid,
            acl,
        }
    }
}

impl From<DiskStat> for DiskStatRecord {
    fn from(d: DiskStat) -> Self {
        (d.ident, d.mode, d.uid, d.gid, d.acl)
    }
}

/// Which revision file a placed file was copied from, by path beneath the revision root and
/// inode. Two ways prove the revision's file of the next install unchanged without reading
/// it. A directory bundle's files are hard-linked into the revision, so the next revision of
/// the same bundle holds the very same inode while the file is unchanged; the previous
/// revision's link to it (checked, not assumed) proves the inode was never freed and reused in
/// between. A revision installed from where it lies (no snapshot: see the deploy engine) links
/// nothing, so its files' change times stay still: the same inode with the same ctime (which
/// no system call sets back, and which a new inode takes from the clock) was not touched since
/// it was recorded. The ctime is recorded only when it was settled before the install looked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "SourceStatRecord", into = "SourceStatRecord")]
pub(crate) struct SourceStat {
    pub(crate) rel: PathBuf,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime: (i64, i64),
    /// Stored beside the record, as [`ManifestEntry::source_ctime`].
    pub(crate) ctime: Option<(i64, i64)>,
}

/// [`SourceStat`] as stored: an array, `[rel, dev, ino, size, mtime]`.
type SourceStatRecord = (PathBuf, u64, u64, u64, (i64, i64));

impl From<SourceStatRecord> for SourceStat {
    fn from((rel, dev, ino, size, mtime): SourceStatRecord) -> Self {
        SourceStat {
            rel,
            dev,
            ino,
            size,
            mtime,
            ctime: None,
        }
    }
}

impl From<SourceStat> for SourceStatRecord {
    fn from(s: SourceStat) -> Self {
        (s.rel, s.dev, s.ino, s.size, s.mtime)
    }
}

impl SourceStat {
    /// The record of `ident` at `rel`, its ctime kept when `settled` (taken before the file
    /// was looked at) says it cannot move again unseen.
    fn of(rel: PathBuf, ident: &FileIdent, settled: &Settled) -> SourceStat {
        SourceStat {
            rel,
            dev: ident.dev,
            ino: ident.ino,
            size: ident.size,
            mtime: ident.mtime,
            ctime: settled.before(ident.ctime).then_some(ident.ctime),
        }
    }

    /// Whether `ident` at `rel` is the file recorded, by inode, size and mtime (the ctime
    /// is not compared: see [`SourceStat::untouched`]).
    fn same_inode(&self, rel: &Path, ident: &FileIdent) -> bool {
        self.rel == rel
            && self.dev == ident.dev
            && self.ino == ident.ino
            && self.size == ident.size
            && self.mtime == ident.mtime
    }

    /// Whether `ident` at `rel` is the file recorded and untouched since: same inode and
    /// the very ctime recorded (`ctime`, settled when recorded).
    fn untouched(&self, ctime: Option<(i64, i64)>, rel: &Path, ident: &FileIdent) -> bool {
        self.same_inode(rel, ident) && ctime == Some(ident.ctime)
    }
}

/// File times come from the kernel's coarse clock: a file changed within a tick of the moment
/// its times were read may change again without its times moving (Git's "racy" entries). A
/// time is settled when it lies safely before such a moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settled {
    /// Times strictly before this (seconds, nanoseconds) are settled.
    limit: (i64, i64),
}

impl Settled {
    /// Settled relative to now: two ticks of the coarse clock back (at least 2 ms, at most 100).
    pub(crate) fn now() -> Settled {
        use std::sync::OnceLock;
        use std::time::{Duration, SystemTime, UNIX_EPOCH};
        static MARGIN: OnceLock<Duration> = OnceLock::new();
        let margin = *MARGIN.get_or_init(|| {
            let tick = nix::time::clock_getres(nix::time::ClockId::CLOCK_REALTIME_COARSE)
                .map(Duration::from)
                .unwrap_or(Duration::from_millis(10));
            (tick * 2).clamp(Duration::from_millis(2), Duration::from_millis(100))
        });
        let limit = SystemTime::now()
            .checked_sub(margin)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        Settled {
            limit: (limit.as_secs() as i64, i64::from(limit.subsec_nanos())),
        }
    }

    /// Whether a file time is settled. A time of a whole second may come from a filesystem
    /// that keeps only seconds (ext4 with small inodes, or two seconds: FAT), where every
    /// change within that second or two leaves the same time: it is settled only once they
    /// are over.
    pub(crate) fn before(&self, t: (i64, i64)) -> bool {
        if t.1 == 0 {
            return (t.0.saturating_add(2), 0) < self.limit;
        }
        t < self.limit
    }
}

/// How an install decides that a file it placed before is unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verify {
    /// Trust what the manifest recorded while the disk still matches it (inode, size, mtime,
    /// ctime); read and hash a file only when it does not.
    #[default]
    Metadata,
    /// Hash the revision's file and the destination every time (for the paranoid; costs a
    /// read of both sides of every unchanged file).
    Content,
}

/// Everything [`plan`] needs.
#[derive(Debug, Clone, Copy)]
pub struct InstallInput<'a> {
    /// The unpacked revision (bundle root).
    pub revision_root: &'a Path,
    /// The AppSpec's `files`.
    pub files: &'a [FileMapping],
    /// The AppSpec's `permissions`.
    pub permissions: &'a [Permission],
    /// The manifest of the previous successful install of this deployment group, if any.
    pub previous: Option<&'a Manifest>,
    /// The effective behavior (AppSpec value first, then the command's).
    pub file_exists_behavior: FileExistsBehavior,
    /// The digests the unpack took while it wrote the revision's files (relative paths).
    pub source_digests: Option<&'a HashMap<PathBuf, SourceDigest>>,
    /// How unchanged files are recognised.
    pub verify: Verify,
    /// Whether `revision_root` is the agent's own snapshot of the revision, kept with the
    /// deployment (its hard links hold a directory bundle's inodes: see [`SourceStat`]);
    /// false for a bundle installed from where it lies. Only a snapshot is named in the
    /// manifest as evidence for the next install.
    pub snapshot: bool,
    /// The survey's listing of a bundle read where it lies, whose directories the plan takes
    /// from there instead of reading them again.
    pub walked: Option<&'a Walked>,
    /// `revision_root` is the agent's own unpack and nothing reads its files once Install is
    /// done (the AppSpec runs no hooks): a file the unpack wrote itself (its digest still
    /// matching), with one link, and one destination, is moved into place rather than
    /// copied. The revision keeps what was not moved, and always the files named in `keep`.
    pub consume_revision: bool,
    /// Revision files never moved, by (device, inode): the AppSpec, which the next deployment
    /// reads (found through any link to it).
    pub keep: &'a [(u64, u64)],
}

/// Why an install was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A `files` source that is not in the revision.
    #[error(
        "files: source {} does not exist in the revision at {revision_root}; fix \
         the source in appspec.yml or add it to the bundle", q(.source_path)
    )]
    SourceMissing {
        /// The mapping's source.
        source_path: String,
        /// The revision root it was looked up in.
        revision_root: PathBuf,
    },
    /// A `files` source whose path leads out of the bundle through a symlink.
    #[error("files: source {source_path:?}: {source}")]
    Refused {
        /// The mapping's source.
        source_path: String,
        /// What leads out.
        source: ConfinedError,
    },
    /// A revision file whose name is not UTF-8: the install manifest and the journal hold
    /// paths as text, so it is refused (unpacking refuses such names first; this guards a
    /// revision directory changed after its unpack).
    #[error(
        "cannot install {path}: its name is not UTF-8 (shown escaped); pier installs UTF-8 \
         names only, rename the file"
    )]
    NotUtf8 {
        /// The revision path, quoted, escaped and cut.
        path: String,
    },
    /// A bundle entry Install cannot place (device, FIFO, socket).
    #[error("cannot install {path}: it is neither a file, a directory nor a symlink")]
    Unplaceable {
        /// The object in the revision.
        path: PathBuf,
    },
    /// Two `files` entries place something at one destination.
    #[error(
        "files: two sources place {dest}: {} and {}; remove one of them from \
         appspec.yml", q(.first), q(.second)
    )]
    TwoSources {
        /// The destination.
        dest: PathBuf,
        /// The first source (revision-relative).
        first: String,
        /// The second source (revision-relative).
        second: String,
    },
    /// DISALLOW and files in the way; nothing was changed.
    #[error(
        "a file already exists at {} {}and file_exists_behavior is DISALLOW; nothing was \
         changed. Remove it, or deploy with file_exists_behavior OVERWRITE or RETAIN",
        .paths[0].display(),
        more(.paths.len())
    )]
    Disallowed {
        /// Every existing file in the way (at least one).
        paths: Vec<PathBuf>,
    },
    /// A directory stands where a file or link is to be placed.
    #[error(
        "cannot place {dest}: a directory is there; remove it or change the destination in \
         appspec.yml"
    )]
    DirectoryInTheWay {
        /// The destination.
        dest: PathBuf,
    },
    /// Something was put at a destination between plan and apply, where the plan expected
    /// nothing; it is left alone (the CodeDeploy agent checks at copy time too).
    #[error(
        "{dest} appeared after the install was planned and was left alone; find what wrote \
         it, then deploy again"
    )]
    AppearedSincePlan {
        /// The destination.
        dest: PathBuf,
    },
    /// A file stands where a directory is needed, and the behavior does not allow replacing it.
    #[error(
        "cannot make directory {dest}: a file is there and file_exists_behavior is {behavior}; \
         remove it, or deploy with OVERWRITE"
    )]
    FileInTheWay {
        /// The destination.
        dest: PathBuf,
        /// The behavior in force.
        behavior: &'static str,
    },
    /// A `permissions` owner that does not exist on this host.
    #[error("permissions for {object}: user {} does not exist on this host; create it (e.g. in a BeforeInstall hook) or fix owner in appspec.yml", q(.name))]
    UnknownUser {
        /// The permission's object.
        object: PathBuf,
        /// The user name.
        name: String,
    },
    /// A `permissions` group that does not exist on this host.
    #[error("permissions for {object}: group {} does not exist on this host; create it (e.g. in a BeforeInstall hook) or fix group in appspec.yml", q(.name))]
    UnknownGroup {
        /// The permission's object.
        object: PathBuf,
        /// The group name.
        name: String,
    },
    /// A `pattern` or `except` glob that does not compile.
    #[error("permissions for {object}: pattern {} is not a valid glob ({detail}); fix it in appspec.yml", q(.pattern))]
    BadPattern {
        /// The permission's object.
        object: PathBuf,
        /// The glob.
        pattern: String,
        /// What the glob parser said.
        detail: String,
    },
    /// Two permission entries select the same object (CodeDeploy refuses this too).
    #[error(
        "permissions: {path} is selected by the entries for both {first} and {second}; make \
         them disjoint (pattern, except, type) in appspec.yml"
    )]
    PermissionTwice {
        /// The object selected twice.
        path: PathBuf,
        /// The first entry's object.
        first: PathBuf,
        /// The second entry's object.
        second: PathBuf,
    },
    /// `acls` or `context` asked for and the tool is not installed.
    #[error(
        "permissions for {object}: {what} need the `{tool}` command, which is not installed on \
         this host; install the {package} package or remove {what} from appspec.yml"
    )]
    MissingTool {
        /// The permission's object.
        object: PathBuf,
        /// "acls" or "context".
        what: &'static str,
        /// The command.
        tool: &'static str,
        /// The package that provides it.
        package: &'static str,
    },
    /// setfacl / chcon failed.
    #[error("permissions: `{command}` failed for {path}: {detail}")]
    ToolFailed {
        /// The command line run.
        command: String,
        /// The object.
        path: PathBuf,
        /// Exit status and stderr.
        detail: String,
    },
    /// A set-uid/set-gid bit in the bundle that no `permissions` entry grants.
    #[error(
        "bundle entry {} has set-id mode {mode:o}, and no permissions entry sets that \
         mode on {dest}; add a permissions entry with that mode, or rebuild the bundle without \
         set-uid/set-gid bits", q(.entry)
    )]
    SetidNotGranted {
        /// The bundle entry (revision-relative).
        entry: String,
        /// Its mode as the bundle gave it.
        mode: u32,
        /// Where it would be installed.
        dest: PathBuf,
    },
    /// Reading the revision or the destination failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// What was being read.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Changing the destination failed.
    #[error("cannot {action} {path}: {source}")]
    Write {
        /// What was being done ("create", "remove", "rename into place", ...).
        action: &'static str,
        /// The object.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl InstallError {
    /// The code a failed event carries: [`ErrorCode::FileExists`] when Install met something
    /// at a destination it may not replace (`file_exists_behavior` DISALLOW, or RETAIN where a
    /// directory is needed, or a file that appeared after the plan);
    /// [`ErrorCode::BundleRefused`] for a set-id bit the AppSpec does not grant (checked when
    /// the bundle is unpacked) and a source that leads out of the bundle; [`ErrorCode::InstallFailed`] for everything else.
    pub(crate) fn error_code(&self) -> ErrorCode {
        match self {
            InstallError::Disallowed { .. }
            | InstallError::FileInTheWay { .. }
            | InstallError::AppearedSincePlan { .. } => ErrorCode::FileExists,
            InstallError::SetidNotGranted { .. }
            | InstallError::Refused { .. }
            | InstallError::NotUtf8 { .. } => ErrorCode::BundleRefused,
            InstallError::SourceMissing { .. }
            | InstallError::Unplaceable { .. }
            | InstallError::TwoSources { .. }
            | InstallError::DirectoryInTheWay { .. }
            | InstallError::UnknownUser { .. }
            | InstallError::UnknownGroup { .. }
            | InstallError::BadPattern { .. }
            | InstallError::PermissionTwice { .. }
            | InstallError::MissingTool { .. }
            | InstallError::ToolFailed { .. }
            | InstallError::Read { .. }
            | InstallError::Write { .. } => ErrorCode::InstallFailed,
        }
    }
}

/// A name from the AppSpec or the bundle, fit for a message.
fn q(s: &str) -> String {
    pier_protocol::quote::quote(s)
}

fn more(n: usize) -> String {
    match n {
        1 => String::new(),
        2 => "(and 1 more file) ".to_string(),
        n => format!("(and {} more files) ", n - 1),
    }
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Read {
        path: path.to_path_buf(),
        source,
    }
}

fn write_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |source| InstallError::Write {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// One thing the previous install placed that this one takes away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Removal {
    /// A file or symlink (the link itself, never its target).
    File(PathBuf),
    /// A directory the previous install created; removed only when empty.
    DirIfEmpty(PathBuf),
}

impl Removal {
    fn path(&self) -> &Path {
        match self {
            Removal::File(p) | Removal::DirIfEmpty(p) => p,
        }
    }
}

/// What to do at one destination path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Make a new directory.
    Mkdir {
        /// Its mode.
        mode: u32,
    },
    /// A directory already there, used as it is. `created` carries over from the previous
    /// install, so that a directory it made stays removable by a later cleanup.
    KeepDir {
        /// Whether a pier install made it.
        created: bool,
    },
    /// OVERWRITE: a file or link stands where a directory is needed; replace it.
    ReplaceWithDir {
        /// The new directory's mode.
        mode: u32,
    },
    /// Copy a file where nothing is.
    Create {
        /// The file in the revision.
        source: PathBuf,
        /// Its mode (the bundle's).
        mode: u32,
    },
    /// OVERWRITE: copy a file over what is there.
    Replace {
        /// The file in the revision.
        source: PathBuf,
        /// Its mode (the bundle's).
        mode: u32,
    },
    /// Same size and sha256 in the revision, the previous manifest and on disk: not rewritten.
    Unchanged {
        /// The previous manifest's entry.
        previous: Box<ManifestEntry>,
        /// The bundle's mode, set again in case only the mode changed.
        mode: u32,
        /// The destination still matches the previous manifest's [`DiskStat`]: its mode,
        /// owner and ACLs are the ones recorded there.
        trusted: bool,
    },
    /// RETAIN: the existing file is kept, and is not part of this install.
    Retain,
    /// Place a symlink (replacing what is there under OVERWRITE).
    Link {
        /// The link's target, as the bundle has it.
        target: PathBuf,
        /// Whether something is in the way (OVERWRITE).
        replace: bool,
    },
}

/// One destination and what to do there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    /// Absolute destination.
    pub(crate) dest: PathBuf,
    /// What to do.
    pub(crate) action: Action,
}

/// What an install will do, decided before anything is changed. `Display` prints it as a dry
/// run, one line per action.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The previous install's files, then its directories deepest first.
    pub(crate) removals: Vec<Removal>,
    /// Destinations in path order (parents before children).
    pub(crate) steps: Vec<Step>,
    /// Permissions to set once everything is placed.
    pub(crate) permissions: Vec<PermissionStep>,
    /// The revision's file behind each file destination.
    pub(crate) sources: FastMap<PathBuf, SourceStat>,
    /// The revision root, canonical.
    pub(crate) revision: Option<PathBuf>,
    /// Destinations whose revision file is moved into place, not copied
    /// ([`InstallInput::consume_revision`]), with its size and sha256 from the unpack.
    pub(crate) moves: FastMap<PathBuf, (u64, String)>,
}

impl Plan {
    /// What the previous install placed and this plan removes, plus everything this plan may
    /// place (the staging intent records it). Should apply fail half-way or the process die,
    /// handing this to the next install as `previous` makes its cleanup cover the partial
    /// install too, as the CodeDeploy agent's cleanup file does (the next DISALLOW install
    /// must not trip over files a failed one left); recovery narrows it to what is on disk.
    /// Files not yet written carry no hash, so none of them can pass for unchanged.
    pub fn pending_manifest(&self) -> Manifest {
        // Steps are in path order, each destination once: with nothing to remove they are
        // the manifest's order already.
        let mut in_order: Vec<ManifestEntry> = if self.removals.is_empty() {
            Vec::with_capacity(self.steps.len())
        } else {
            Vec::new()
        };
        let mut entries: BTreeMap<PathBuf, ManifestEntry> = BTreeMap::new();
        let mut add = |path: &Path, e: ManifestEntry| {
            if self.removals.is_empty() {
                in_order.push(e);
            } else {
                entries.insert(path.to_path_buf(), e);
            }
        };
        for r in &self.removals {
            let (path, kind) = match r {
                Removal::File(p) => (p, EntryKind::File),
                Removal::DirIfEmpty(p) => (p, EntryKind::Dir),
            };
            let mut e = dir_entry(path, true);
            e.kind = kind;
            add(path, e);
        }
        for s in &self.steps {
            let entry = match &s.action {
                Action::Mkdir { .. } | Action::ReplaceWithDir { .. } => dir_entry(&s.dest, true),
                Action::KeepDir { created } => dir_entry(&s.dest, *created),
                // A file OVERWRITE replaces was not placed by pier; until the replacement has
                // landed it stays the operator's, and a failed install must not hand it to
                // the next one's cleanup. (Once applied, the final manifest lists it.)
                Action::Replace { .. } => continue,
                Action::Create { mode, .. } => ManifestEntry {
                    path: s.dest.clone(),
                    kind: EntryKind::File,
                    size: 0,
                    mode: *mode,
                    sha256: None,
                    link_target: None,
                    created: false,
                    disk: None,
                    source: None,
                    source_ctime: None,
                },
                Action::Unchanged { previous, .. } => (**previous).clone(),
                Action::Link { .. } => ManifestEntry {
                    path: s.dest.clone(),
                    kind: EntryKind::Symlink,
                    size: 0,
                    mode: 0o777,
                    sha256: None,
                    // Unknown until placed: a half-made link must not pass for unchanged.
                    link_target: None,
                    created: false,
                    disk: None,
                    source: None,
                    source_ctime: None,
                },
                Action::Retain => continue,
            };
            add(&s.dest, entry);
        }
        if self.removals.is_empty() {
            debug_assert!(in_order.windows(2).all(|w| w[0].path < w[1].path));
            return Manifest {
                entries: in_order,
                revision: None,
            };
        }
        Manifest {
            entries: entries.into_values().collect(),
            revision: None,
        }
    }
}

impl Action {
    /// The word that starts this action's line of a dry run (`None`: no line).
    fn verb(&self) -> Option<&'static str> {
        Some(match self {
            Action::Mkdir { .. } => "mkdir",
            Action::KeepDir { .. } => return None,
            Action::ReplaceWithDir { .. } | Action::Replace { .. } => "replace",
            Action::Create { .. } => "create",
            Action::Unchanged { .. } => "unchanged",
            Action::Retain => "keep",
            Action::Link { replace: true, .. } => "relink",
            Action::Link { replace: false, .. } => "link",
        })
    }
}

impl Plan {
    /// The plan's dry-run lines counted by their first word, in order of first appearance
    /// ("remove 1, create 2, unchanged 1"; "nothing to do"), without printing the plan: the
    /// note of every Install, where a whole dry run of a large tree would be megabytes.
    pub fn summary(&self) -> String {
        let verbs = self
            .removals
            .iter()
            .map(|r| match r {
                Removal::File(_) => "remove",
                Removal::DirIfEmpty(_) => "rmdir",
            })
            .chain(self.steps.iter().filter_map(|s| s.action.verb()))
            .chain(self.permissions.iter().map(|_| "permission"));
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for verb in verbs {
            match counts.iter_mut().find(|(w, _)| *w == verb) {
                Some((_, n)) => *n += 1,
                None => counts.push((verb, 1)),
            }
        }
        if counts.is_empty() {
            return "nothing to do".to_string();
        }
        counts
            .iter()
            .map(|(w, n)| format!("{w} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.removals {
            match r {
                Removal::File(p) => writeln!(f, "remove     {}", p.display())?,
                Removal::DirIfEmpty(p) => writeln!(f, "rmdir      {} (if empty)", p.display())?,
            }
        }
        for s in &self.steps {
            let d = s.dest.display();
            // Each line starts with the action's verb (`Action::verb`), which `summary` counts.
            match &s.action {
                Action::Mkdir { mode } => writeln!(f, "mkdir      {d} ({mode:04o})")?,
                Action::KeepDir { .. } => {}
                Action::ReplaceWithDir { mode } => {
                    writeln!(f, "replace    {d} with a directory ({mode:04o})")?
                }
                Action::Create { source, mode } => {
                    writeln!(f, "create     {d} ({mode:04o}) from {}", source.display())?
                }
                Action::Replace { source, mode } => {
                    writeln!(f, "replace    {d} ({mode:04o}) from {}", source.display())?
                }
                Action::Unchanged { .. } => writeln!(f, "unchanged  {d}")?,
                Action::Retain => writeln!(f, "keep       {d} (RETAIN: existing file kept)")?,
                Action::Link { target, replace } => writeln!(
                    f,
                    "{}{d} -> {}",
                    if *replace {
                        "relink     "
                    } else {
                        "link       "
                    },
                    target.display()
                )?,
            }
        }
        for p in &self.permissions {
            writeln!(f, "{p}")?;
        }
        Ok(())
    }
}

/// What the bundle wants at one destination, before looking at the disk.
#[derive(Debug, Clone)]
enum Want {
    Dir {
        mode: u32,
    },
    File {
        source: PathBuf,
        size: u64,
        mode: u32,
        /// The revision file as the layout saw it.
        ident: FileIdent,
        /// Its hard links.
        links: u64,
    },
    Link {
        target: PathBuf,
    },
}

/// A wanted destination and the `files` source it came from (for messages).
#[derive(Debug, Clone)]
struct Wanted<'a> {
    want: Want,
    from: &'a str,
}

/// Builds the set of destinations the `files` section asks for.
struct Layout<'a> {
    root: &'a Path,
    /// The same root, held open: sources are resolved beneath it.
    revision: Confined,
    /// Every destination as it was added; sorted and merged by [`Layout::into_wanted`].
    wanted: Vec<(PathBuf, Wanted<'a>)>,
    /// Directories the previous install created: kept as "ours" when needed again.
    prev_created_dirs: BTreeSet<PathBuf>,
    /// Directories already listed by the bundle's survey.
    walked: Option<&'a Walked>,
}

impl<'a> Layout<'a> {
    /// Adds a destination; [`Layout::into_wanted`] merges or refuses the repeated ones.
    fn add(&mut self, dest: PathBuf, want: Want, from: &'a str) {
        self.wanted.push((dest, Wanted { want, from }));
    }

    /// The destinations in path order (parents before children), each once. Two directory
    /// sources may share a destination directory (CodeDeploy merges them), a mode from the
    /// bundle beating an implicit one; any other destination named twice is refused, naming
    /// the first source that asked for it and the next. (Collected first and sorted once: a
    /// walk adds its entries in this very order, which the sort finds in one pass, where a
    /// tree keyed by path compared them component by component on every insert.)
    fn into_wanted(self) -> Result<Vec<(PathBuf, Wanted<'a>)>, InstallError> {
        let mut all = self.wanted;
        // Stable: the sources of one destination stay in the order they were added.
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(PathBuf, Wanted<'a>)> = Vec::with_capacity(all.len());
        for (dest, w) in all {
            match out.last_mut() {
                Some((last, first)) if *last == dest => match (&first.want, &w.want) {
                    (Want::Dir { .. }, Want::Dir { mode }) => {
                        if *mode != IMPLICIT_DIR_MODE {
                            first.want = w.want;
                        }
                    }
                    _ => {
                        return Err(InstallError::TwoSources {
                            dest,
                            first: first.from.to_string(),
                            second: w.from.to_string(),
                        })
                    }
                },
                _ => out.push((dest, w)),
            }
        }
        Ok(out)
    }

    /// Adds the missing ancestors of `path` (and those a previous install made, so that they
    /// are kept rather than removed and made again).
    fn ancestors(&mut self, path: &Path, from: &'a str) {
        let mut missing = Vec::new();
        let mut at = path.parent();
        while let Some(dir) = at {
            if dir.parent().is_none() {
                break;
            }
            if dir.exists() && !self.prev_created_dirs.contains(dir) {
                break;
            }
            missing.push(dir.to_path_buf());
            at = dir.parent();
        }
        for dir in missing.into_iter().rev() {
            self.add(
                dir,
                Want::Dir {
                    mode: IMPLICIT_DIR_MODE,
                },
                from,
            );
        }
    }

    fn mapping(&mut self, m: &'a FileMapping) -> Result<(), InstallError> {
        let src = if m.source.is_empty() {
            self.root.to_path_buf()
        } else {
            // The directories on the way are resolved beneath the root (an in-bundle link is
            // followed, one leading out is refused); the source itself is not followed: a
            // link is installed as a link. Everything below uses this link-free path.
            let (parent, name) = m.source.rsplit_once('/').unwrap_or(("", &m.source));
            match self.revision.real_path(parent) {
                Ok(dir) => dir.join(name),
                Err(ConfinedError::Missing { .. }) => {
                    return Err(InstallError::SourceMissing {
                        source_path: m.source.clone(),
                        revision_root: self.root.to_path_buf(),
                    })
                }
                Err(source) => {
                    return Err(InstallError::Refused {
                        source_path: m.source.clone(),
                        source,
                    })
                }
            }
        };
        let meta = match fs::symlink_metadata(&src) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(InstallError::SourceMissing {
                    source_path: m.source.clone(),
                    revision_root: self.root.to_path_buf(),
                })
            }
            Err(e) => return Err(read_err(&src)(e)),
        };
        if meta.is_dir() {
            // A directory source: its contents go under the destination.
            self.ancestors(&m.destination, &m.source);
            self.add(
                m.destination.clone(),
                Want::Dir {
                    mode: IMPLICIT_DIR_MODE,
                },
                &m.source,
            );
            self.tree(&src, &m.destination, &m.source)
        } else {
            // A file (or link) source lands as destination/<name>.
            let name = src.file_name().unwrap_or_default();
            let dest = m.destination.join(name);
            self.ancestors(&dest, &m.source);
            let want = want_of(&src, &meta)?;
            self.add(dest, want, &m.source);
            Ok(())
        }
    }

    fn tree(&mut self, src: &Path, dest: &Path, from: &'a str) -> Result<(), InstallError> {
        let listed;
        let entries = match self.walked.and_then(|w| w.dirs.get(src)) {
            Some(entries) => entries,
            None => {
                listed = crate::bundle::unpack::read_dir_sorted(src).map_err(read_err(src))?;
                &listed
            }
        };
        for (n, meta) in entries {
            let s = src.join(n);
            if n.to_str().is_none() {
                return Err(InstallError::NotUtf8 {
                    path: pier_protocol::quote::quote_bytes(
                        std::os::unix::ffi::OsStrExt::as_bytes(s.as_os_str()),
                    ),
                });
            }
            let d = dest.join(n);
            let meta = meta.as_ref().map_err(|e| read_err(&s)(copy_of(e)))?;
            let want = want_of(&s, meta)?;
            if matches!(want, Want::Dir { .. }) {
                self.add(d.clone(), want, from);
                self.tree(&s, &d, from)?;
            } else {
                self.add(d, want, from);
            }
        }
        Ok(())
    }
}

/// The same error again (an `io::Error` is not `Clone`), its OS error code kept.
fn copy_of(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

fn want_of(src: &Path, meta: &fs::Metadata) -> Result<Want, InstallError> {
    let ft = meta.file_type();
    if ft.is_dir() {
        Ok(Want::Dir {
            mode: meta.mode() & 0o7777,
        })
    } else if ft.is_symlink() {
        Ok(Want::Link {
            target: fs::read_link(src).map_err(read_err(src))?,
        })
    } else if ft.is_file() {
        Ok(Want::File {
            source: src.to_path_buf(),
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            ident: FileIdent::of(meta),
            links: meta.nlink(),
        })
    } else {
        Err(InstallError::Unplaceable {
            path: src.to_path_buf(),
        })
    }
}

/// Hex sha256 of a file's content.
fn sha256_file(path: &Path) -> Result<String, InstallError> {
    let mut f = confined::open_planned(path).map_err(read_err(path))?;
    let mut h = Sha256::new();
    crate::buffer::with(|buf| loop {
        let n = f.read(buf).map_err(read_err(path))?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    })?;
    Ok(hex::encode(h.finalize()))
}

/// What an unchanged check may rely on besides the disk.
struct Evidence<'a> {
    verify: Verify,
    /// The unpack's digests, by path beneath the revision root.
    digests: Option<&'a HashMap<PathBuf, SourceDigest>>,
    /// The revision root as given and canonical, to turn a source into its relative path.
    roots: [&'a Path; 2],
    /// The previous install's revision root (holding its hard links to the bundle's inodes).
    previous_revision: Option<&'a Path>,
}

impl Evidence<'_> {
    fn rel<'p>(&self, source: &'p Path) -> Option<&'p Path> {
        self.roots.iter().find_map(|r| source.strip_prefix(r).ok())
    }

    /// Whether the revision's `source` holds the content `prev` recorded, read only when
    /// neither the unpack's digest nor the inode the previous revision shares with it says.
    fn source_is(
        &self,
        prev: &ManifestEntry,
        prev_sha: &str,
        source: &Path,
        ident: &FileIdent,
    ) -> Result<bool, InstallError> {
        if self.verify == Verify::Metadata {
            if let Some(rel) = self.rel(source) {
                // Extracted or copied by the unpack: its digest, while the file is as it was
                // then (a BeforeInstall hook may have edited the revision since).
                if let Some(d) = self.digests.and_then(|m| m.get(rel)) {
                    if d.settled && d.ident == *ident {
                        return Ok(d.sha256 == prev_sha);
                    }
                }
                // Installed from where it lies before and now: the very inode, untouched.
                if prev
                    .source
                    .as_ref()
                    .is_some_and(|ps| ps.untouched(prev.source_ctime, rel, ident))
                {
                    return Ok(true);
                }
                // Hard-linked from a directory bundle: the same inode, unwritten, that the
                // previous revision still links (so it cannot have been freed and reused).
                if let (Some(ps), Some(prev_root)) = (&prev.source, self.previous_revision) {
                    if ps.same_inode(rel, ident) {
                        let linked = fs::symlink_metadata(prev_root.join(rel))
                            .is_ok_and(|m| m.dev() == ident.dev && m.ino() == ident.ino);
                        if linked {
                            return Ok(true);
                        }
                    }
                }
            }
        }
        Ok(sha256_file(source)? == prev_sha)
    }
}

/// Whether `dest` can be left as the previous install put it: same size and content in the
/// revision, the previous manifest and on disk. `Some(true)` when the destination also still
/// matches the manifest's record of it (mode, owner and ACLs as recorded, content not read).
fn unchanged(
    prev: &ManifestEntry,
    want: &Want,
    dest: &Path,
    ev: &Evidence,
) -> Result<Option<bool>, InstallError> {
    match (prev.kind, want) {
        (
            EntryKind::File,
            Want::File {
                source,
                size,
                ident,
                ..
            },
        ) => {
            let Some(prev_sha) = prev.sha256.as_deref() else {
                return Ok(None);
            };
            if prev.size != *size {
                return Ok(None);
            }
            let on_disk = match fs::symlink_metadata(dest) {
                Ok(m) if m.file_type().is_file() && m.len() == *size => m,
                _ => return Ok(None),
            };
            let trusted = ev.verify == Verify::Metadata
                && prev.disk.as_deref().is_some_and(|d| {
                    d.ident == FileIdent::of(&on_disk)
                        && d.mode == on_disk.mode() & 0o7777
                        && d.uid == on_disk.uid()
                        && d.gid == on_disk.gid()
                });
            // Cheap checks passed: now the content, revision side first.
            if !ev.source_is(prev, prev_sha, source, ident)? {
                return Ok(None);
            }
            if trusted || sha256_file(dest)? == prev_sha {
                Ok(Some(trusted))
            } else {
                Ok(None)
            }
        }
        (EntryKind::Symlink, Want::Link { target }) => Ok((prev.link_target.as_ref()
            == Some(target)
            && fs::read_link(dest).ok().as_ref() == Some(target))
        .then_some(false)),
        _ => Ok(None),
    }
}

/// Decides everything an install will do, changing nothing.
pub fn plan(input: &InstallInput) -> Result<Plan, InstallError> {
    // Before any file is looked at: a source ctime settled by now cannot move unseen. (A
    // survey's listing was taken earlier: its own moment.)
    let settled = input.walked.map_or_else(Settled::now, |w| w.since);
    let prev_entries: &[ManifestEntry] = input.previous.map_or(&[], |m| &m.entries);
    let canonical_root = fs::canonicalize(input.revision_root).ok();
    let mut layout = Layout {
        root: input.revision_root,
        revision: Confined::open(input.revision_root).map_err(read_err(input.revision_root))?,
        // As many as the survey listed, when there was one (no growth by doubling).
        wanted: Vec::with_capacity(
            input
                .walked
                .map_or(0, |w| w.dirs.values().map(Vec::len).sum::<usize>()),
        ),
        prev_created_dirs: prev_entries
            .iter()
            .filter(|e| e.kind == EntryKind::Dir && e.created)
            .map(|e| e.path.clone())
            .collect(),
        walked: input.walked,
    };
    for m in input.files {
        layout.mapping(m)?;
    }
    let mut wanted = layout.into_wanted()?;
    if !input.snapshot {
        // A bundle read where it lies was surveyed without a set-id bit; one set since is
        // cleared, as an unpack clears it, never carried to the destination.
        for (_, w) in wanted.iter_mut() {
            if let Want::Dir { mode } | Want::File { mode, .. } = &mut w.want {
                *mode &= !0o6000;
            }
        }
    }
    let wanted = wanted;
    // The previous install's entries are looked up here three times each: by hash, not by the
    // tree's component-by-component path comparisons.
    let wanted_at: FastMap<&Path, &Wanted> = wanted.iter().map(|(p, w)| (p.as_path(), w)).collect();

    // Cleanup of the previous install, except what would be placed again unchanged.
    let mut plan = Plan {
        steps: Vec::with_capacity(wanted.len()),
        ..Plan::default()
    };
    plan.sources.reserve(wanted.len());
    let mut removed: BTreeSet<PathBuf> = BTreeSet::new();
    let mut kept: FastMap<&Path, (&ManifestEntry, bool)> = FastMap::default();
    let mut carried_dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut dirs_to_remove = Vec::new();
    // Which of the previous install's files would be placed again unchanged: the content
    // checks hash both sides, so they run on a few threads when there are many.
    let candidates: Vec<usize> = (0..prev_entries.len())
        .filter(|&i| {
            matches!(prev_entries[i].kind, EntryKind::File | EntryKind::Symlink)
                && wanted_at.contains_key(prev_entries[i].path.as_path())
        })
        .collect();
    let evidence = Evidence {
        verify: input.verify,
        digests: input.source_digests,
        roots: [
            input.revision_root,
            canonical_root.as_deref().unwrap_or(input.revision_root),
        ],
        // A file read where it lies may share its inode with the previous snapshot and still
        // have been rewritten in place with its mtime put back: only its ctime tells.
        previous_revision: input
            .previous
            .and_then(|m| m.revision.as_deref())
            .filter(|_| input.snapshot),
    };
    let same: FastMap<usize, bool> = in_parallel(&candidates, |i| {
        let e = &prev_entries[i];
        unchanged(e, &wanted_at[e.path.as_path()].want, &e.path, &evidence)
    })?
    .into_iter()
    .filter_map(|(i, same)| same.map(|trusted| (i, trusted)))
    .collect();
    for (i, e) in prev_entries.iter().enumerate() {
        let want = wanted_at.get(e.path.as_path()).map(|w| &w.want);
        match e.kind {
            EntryKind::File | EntryKind::Symlink => {
                if let Some(&trusted) = same.get(&i) {
                    kept.insert(&e.path, (e, trusted));
                    continue;
                }
                match fs::symlink_metadata(&e.path) {
                    // Someone put a directory there since: not ours to remove.
                    Ok(m) if m.file_type().is_dir() => {
                        log::warn!(
                            "not removing {}: the previous install placed a file there, now it \
                             is a directory",
                            e.path.display()
                        );
                    }
                    Ok(_) => {
                        plan.removals.push(Removal::File(e.path.clone()));
                        removed.insert(e.path.clone());
                    }
                    Err(_) => {}
                }
            }
            EntryKind::Dir if e.created => {
                let still_dir = fs::symlink_metadata(&e.path)
                    .map(|m| m.file_type().is_dir())
                    .unwrap_or(false);
                if matches!(want, Some(Want::Dir { .. })) && still_dir {
                    carried_dirs.insert(e.path.clone());
                } else if still_dir {
                    dirs_to_remove.push(e.path.clone());
                }
            }
            EntryKind::Dir => {}
        }
    }
    dirs_to_remove.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    plan.removals
        .extend(dirs_to_remove.into_iter().map(Removal::DirIfEmpty));

    // What is in the way of each destination, once the cleanup has run.
    // Half-written files a killed install left beside their destinations.
    for (dest, w) in &wanted {
        if matches!(w.want, Want::Dir { .. }) {
            plan.removals
                .extend(stale_temps(dest).into_iter().map(Removal::File));
        }
    }

    let behavior = input.file_exists_behavior;
    // How many destinations each revision file has (by inode: one file may be reached by two
    // spellings of the root): only a file with one may be moved.
    let mut uses: FastMap<(u64, u64), usize> = FastMap::default();
    if input.consume_revision {
        for (_, w) in &wanted {
            if let Want::File { ident, .. } = &w.want {
                *uses.entry((ident.dev, ident.ino)).or_default() += 1;
            }
        }
    }
    let movable = |source: &Path, ident: &FileIdent, links: u64| -> Option<(u64, String)> {
        let inode = (ident.dev, ident.ino);
        if !input.consume_revision
            || links != 1
            || uses.get(&inode) != Some(&1)
            || input.keep.contains(&inode)
        {
            return None;
        }
        let d = input.source_digests?.get(evidence.rel(source)?)?;
        (d.ident == *ident).then(|| (ident.size, d.sha256.clone()))
    };
    let mut disallowed = Vec::new();
    // Wanted directories found absent: nothing beneath them needs a look either.
    let mut absent: FastSet<&Path> = FastSet::default();
    for (dest, w) in &wanted {
        // Nothing is in the way of a path the cleanup removes, nor of one beneath it (a file
        // or link of the last revision that this one turns into a directory); a path beneath
        // a file (ENOTDIR) does not exist either.
        let existing = if dest.parent().is_some_and(|p| absent.contains(p)) {
            None
        } else if dest.ancestors().any(|a| removed.contains(a)) || kept.contains_key(dest.as_path())
        {
            // Removed by the cleanup, or kept as it is (then not looked at again).
            None
        } else {
            match fs::symlink_metadata(dest) {
                Ok(m) => Some(m),
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(libc::ENOTDIR) =>
                {
                    None
                }
                Err(e) => return Err(read_err(dest)(e)),
            }
        };
        if existing.is_none() && matches!(w.want, Want::Dir { .. }) {
            absent.insert(dest);
        }
        let action = match &w.want {
            Want::Dir { mode } => match existing {
                None => Action::Mkdir { mode: *mode },
                // A symlink to a directory (e.g. /var/www -> /srv/www) is a directory here.
                Some(m) if m.is_dir() || dest.is_dir() => Action::KeepDir {
                    created: carried_dirs.contains(dest),
                },
                Some(_) => match behavior {
                    FileExistsBehavior::Overwrite => Action::ReplaceWithDir { mode: *mode },
                    FileExistsBehavior::Disallow => {
                        disallowed.push(dest.clone());
                        continue;
                    }
                    FileExistsBehavior::Retain => {
                        return Err(InstallError::FileInTheWay {
                            dest: dest.clone(),
                            behavior: "RETAIN",
                        })
                    }
                },
            },
            Want::File {
                source,
                mode,
                ident,
                links,
                ..
            } => {
                if let Some(rel) = evidence.rel(source) {
                    plan.sources.insert(
                        dest.clone(),
                        SourceStat::of(rel.to_path_buf(), ident, &settled),
                    );
                }
                if let Some((previous, trusted)) = kept.get(dest.as_path()) {
                    Action::Unchanged {
                        previous: Box::new((*previous).clone()),
                        mode: *mode,
                        trusted: *trusted,
                    }
                } else {
                    if let Some(moved) = movable(source, ident, *links) {
                        plan.moves.insert(dest.clone(), moved);
                    }
                    match existing {
                        None => Action::Create {
                            source: source.clone(),
                            mode: *mode,
                        },
                        Some(m) => match behavior {
                            FileExistsBehavior::Retain => Action::Retain,
                            _ if m.is_dir() => {
                                return Err(InstallError::DirectoryInTheWay { dest: dest.clone() })
                            }
                            FileExistsBehavior::Overwrite => Action::Replace {
                                source: source.clone(),
                                mode: *mode,
                            },
                            FileExistsBehavior::Disallow => {
                                disallowed.push(dest.clone());
                                continue;
                            }
                        },
                    }
                }
            }
            Want::Link { target } => {
                if let Some((previous, _)) = kept.get(dest.as_path()) {
                    Action::Unchanged {
                        previous: Box::new((*previous).clone()),
                        mode: previous.mode,
                        trusted: false,
                    }
                } else {
                    match existing {
                        None => Action::Link {
                            target: target.clone(),
                            replace: false,
                        },
                        Some(m) => match behavior {
                            FileExistsBehavior::Retain => Action::Retain,
                            _ if m.is_dir() => {
                                return Err(InstallError::DirectoryInTheWay { dest: dest.clone() })
                            }
                            FileExistsBehavior::Overwrite => Action::Link {
                                target: target.clone(),
                                replace: true,
                            },
                            FileExistsBehavior::Disallow => {
                                disallowed.push(dest.clone());
                                continue;
                            }
                        },
                    }
                }
            }
        };
        plan.steps.push(Step {
            dest: dest.clone(),
            action,
        });
    }
    if !disallowed.is_empty() {
        return Err(InstallError::Disallowed { paths: disallowed });
    }
    plan.permissions = permissions::plan(input.permissions, &plan.steps)?;
    plan.revision = canonical_root.filter(|_| input.snapshot);
    Ok(plan)
}

/// Carries out a plan; returns the manifest of what this install placed. Stops at the first
/// failure (the deploy engine fails the Install event; the next deployment's plan starts from
/// what is on disk and the manifest). Records nothing on disk besides the install itself;
/// the deploy engine uses [`apply_logged`], which also keeps the group's install intent and
/// manifest up to date.
pub fn apply(plan: &Plan) -> Result<Manifest, InstallError> {
    apply_logged(plan, None, None)
}

/// Carries out a plan in three phases, so that however it stops (a crash, a full disk, a
/// failing rename or permission) each destination path holds its old or its new content,
/// never neither:
///
/// 1. **Staging.** New directories are made; every new file and link is written beside its
///    destination under a temp name (files on a few threads when there are many), and the
///    data is made durable with one syncfs per filesystem instead of an fsync per file.
///    Nothing of the previous install has changed; a failure removes the temps.
/// 2. **Switching.** Each temp is renamed over its destination (a changed file of the
///    previous install is replaced by the rename, not removed first). A path that turns
///    from a file or link into a directory cannot be one rename: it and what goes beneath
///    it are placed here, after the renames.
/// 3. **Removing.** What the previous install placed and this revision lacks goes.
///
/// With `log`, the [`Intent`] of each phase is written before it starts and the manifest
/// once the files are placed, so that [`intent::recover`] can roll back (staging) or forward
/// (switching, removing) an install this process did not finish. `previous` is the manifest
/// the plan was made against.
pub(crate) fn apply_logged(
    plan: &Plan,
    previous: Option<&Manifest>,
    log: Option<InstallLog>,
) -> Result<Manifest, InstallError> {
    use intent::{IntentRef, Phase, Rename};
    // An install that writes, renames, makes and removes nothing (a redeploy of an unchanged
    // revision: at most modes and owners set again, which a rerun repeats) has nothing a stop
    // could leave half done, so it records no intent; only its manifest at the end.
    let quiet = plan.removals.is_empty()
        && plan.steps.iter().all(|s| {
            matches!(
                s.action,
                Action::KeepDir { .. } | Action::Unchanged { .. } | Action::Retain
            )
        });
    let record = |i: &IntentRef| match log {
        Some(l) if !quiet => intent::write_json(l.intent, i),
        _ => Ok(()),
    };
    let save_manifest = |m: &Manifest| log.map_or(Ok(()), |l| intent::write_json(l.manifest, m));
    let clear = || log.map_or(Ok(()), |l| intent::clear(l.intent));
    // The test hook only fires in a logged install (the deploy engine's), never in unit tests.
    let fp = |phase: &str, n: usize| {
        if log.is_some() {
            intent::failpoint(phase, n)
        }
    };
    let pending = if quiet {
        Manifest::default()
    } else {
        plan.pending_manifest()
    };
    let no_manifest = Manifest::default();
    // What describes the disk if the install stops before the switch: the previous install,
    // plus the directories this one made.
    let rolled_back = || intent::reconcile(previous.unwrap_or(&no_manifest), Some(&pending));

    // A path that turns into a directory while something else stands there cannot be staged
    // beside itself: it and everything beneath it are placed during the switch.
    let mut deferred = vec![false; plan.steps.len()];
    let mut deferred_dirs: Vec<&Path> = Vec::new();
    for (i, s) in plan.steps.iter().enumerate() {
        let kind_change = match s.action {
            Action::ReplaceWithDir { .. } => true,
            Action::Mkdir { .. } => fs::symlink_metadata(&s.dest).is_ok_and(|m| !m.is_dir()),
            _ => false,
        };
        if kind_change || deferred_dirs.iter().any(|d| s.dest.starts_with(d)) {
            deferred[i] = true;
            if is_dir_action(&s.action) {
                deferred_dirs.push(&s.dest);
            }
        }
    }
    // A previous-install file that this install places again with new content is switched
    // by the rename over it; only what the revision lacks is removed, after the switch.
    let step_dests: BTreeSet<&Path> = if plan.removals.is_empty() {
        BTreeSet::new()
    } else {
        plan.steps.iter().map(|s| s.dest.as_path()).collect()
    };
    let removals: Vec<Removal> = plan
        .removals
        .iter()
        .filter(|r| !step_dests.contains(r.path()))
        .cloned()
        .collect();
    let replaced: BTreeSet<&Path> = plan
        .removals
        .iter()
        .map(Removal::path)
        .filter(|p| step_dests.contains(p))
        .collect();

    // 1. Staging.
    let to_stage: Vec<usize> = (0..plan.steps.len())
        .filter(|&i| !deferred[i] && is_staged_action(&plan.steps[i].action))
        .collect();
    let tag = temp_tag();
    let temp_dirs: BTreeSet<PathBuf> = parents_of(to_stage.iter().map(|&i| &*plan.steps[i].dest))
        .into_iter()
        .map(Path::to_path_buf)
        .collect();
    let made_dirs: Vec<PathBuf> = (0..plan.steps.len())
        .filter(|&i| !deferred[i] && matches!(plan.steps[i].action, Action::Mkdir { .. }))
        .map(|i| plan.steps[i].dest.clone())
        .collect();
    // Each phase's intent borrows what it names: a large install's lists are not copied.
    let record_phase = |phase, renames: &[Rename], manifest: &[&ManifestEntry]| {
        record(&IntentRef {
            phase,
            tag,
            temp_dirs: &temp_dirs,
            made_dirs: &made_dirs,
            renames,
            removals: &removals,
            // Not written: it is the group's manifest file, which stays as it is while this
            // intent exists, and which recovery reads instead (`Intent::previous`).
            previous: None,
            manifest,
        })
    };
    // A file left in place unchanged is the previous install's entry as it was, which
    // recovery has from the group's manifest: the intents leave those out.
    let unchanged_dests: FastSet<&Path> = plan
        .steps
        .iter()
        .filter(|s| matches!(s.action, Action::Unchanged { .. }))
        .map(|s| s.dest.as_path())
        .collect();
    let changing = |e: &&ManifestEntry| !unchanged_dests.contains(e.path.as_path());
    record_phase(
        Phase::Staging,
        &[],
        &pending.entries.iter().filter(changing).collect::<Vec<_>>(),
    )?;
    fp("stage", 0);
    let mut results: Vec<Option<ManifestEntry>> = vec![None; plan.steps.len()];
    let staged_temps: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let written = std::sync::atomic::AtomicUsize::new(0);
    let staged = (|| {
        for (i, s) in plan.steps.iter().enumerate() {
            if !deferred[i] && matches!(s.action, Action::Mkdir { .. } | Action::KeepDir { .. }) {
                results[i] = place(s)?;
            }
        }
        // Where a moved file would not come out as a copy would (see `moves_keep_copy_result`),
        // it is copied after all.
        let move_into: FastMap<&Path, bool> = if plan.moves.is_empty() {
            FastMap::default()
        } else {
            parents_of(plan.moves.keys().map(PathBuf::as_path))
                .into_iter()
                .map(|d| (d, moves_keep_copy_result(d)))
                .collect()
        };
        let staged = in_parallel(&to_stage, |i| {
            let dest = &plan.steps[i].dest;
            let moved = plan.moves.get(dest).filter(|_| {
                dest.parent()
                    .is_some_and(|d| move_into.get(d) == Some(&true))
            });
            let staged = stage(&plan.steps[i], moved, &staged_temps)?;
            fp("stage", written.fetch_add(1, Ordering::Relaxed) + 1);
            Ok(staged)
        })?;
        sync_filesystems(&staged_temps.lock().unwrap_or_else(|e| e.into_inner()))?;
        Ok(staged)
    })();
    let mut staged = match staged {
        Ok(staged) => staged,
        Err(e) => {
            remove_all(&staged_temps.lock().unwrap_or_else(|e| e.into_inner()));
            save_manifest(&rolled_back())?;
            clear()?;
            return Err(e);
        }
    };
    drop(staged_temps);
    staged.sort_by_key(|(i, _)| *i);

    // 2. Switching. The intent names every rename, so a stop from here on rolls forward.
    // What is in place: the directories staging made, then each step as the switch goes.
    let mut placed: Vec<bool> = results.iter().map(Option::is_some).collect();
    let mut renames = Vec::with_capacity(staged.len());
    let mut staged_at = Vec::with_capacity(staged.len());
    for (i, (entry, temp)) in staged {
        let s = &plan.steps[i];
        renames.push(Rename {
            temp,
            dest: s.dest.clone(),
            replace: may_replace(&s.action) || replaced.contains(s.dest.as_path()),
        });
        results[i] = Some(entry);
        staged_at.push(i);
    }
    {
        let pending_by_path: FastMap<&Path, &ManifestEntry> = pending
            .entries
            .iter()
            .map(|e| (e.path.as_path(), e))
            .collect();
        let entries: Vec<&ManifestEntry> = (0..plan.steps.len())
            .filter(|&i| !matches!(plan.steps[i].action, Action::Unchanged { .. }))
            .filter_map(|i| {
                results[i]
                    .as_ref()
                    .or_else(|| pending_by_path.get(plan.steps[i].dest.as_path()).copied())
            })
            .collect();
        record_phase(Phase::Switching, &renames, &entries)?;
    }
    fp("switch", 0);
    let switch = (|| {
        for (k, (&i, r)) in staged_at.iter().zip(&renames).enumerate() {
            fp("switch", k + 1);
            rename_into_place(&r.temp, &r.dest, r.replace)?;
            placed[i] = true;
        }
        for (i, s) in plan.steps.iter().enumerate() {
            if deferred[i] {
                if matches!(s.action, Action::Mkdir { .. })
                    && fs::symlink_metadata(&s.dest).is_ok_and(|m| !m.is_dir())
                {
                    fs::remove_file(&s.dest).map_err(write_err("remove", &s.dest))?;
                }
                results[i] = place(s)?;
                placed[i] = true;
            } else if matches!(s.action, Action::Unchanged { .. }) {
                results[i] = place(s)?;
                placed[i] = true;
            }
        }
        // Renames and new entries are durable only once their directories are synced.
        let touched_dirs = parents_of(
            plan.steps
                .iter()
                .filter(|s| {
                    !matches!(
                        s.action,
                        Action::KeepDir { .. } | Action::Unchanged { .. } | Action::Retain
                    )
                })
                .map(|s| s.dest.as_path()),
        );
        for d in touched_dirs {
            sync_dir(d)?;
        }
        Ok(())
    })();
    let in_place = |results: Vec<Option<ManifestEntry>>| Manifest {
        entries: results
            .into_iter()
            .zip(&placed)
            .filter_map(|(r, &p)| r.filter(|_| p))
            .collect(),
        revision: None,
    };
    if let Err(e) = switch {
        // What was switched is new, the rest old; the temps not renamed go.
        intent::sweep(tag, &temp_dirs);
        let done = in_place(results);
        save_manifest(&intent::reconcile(&done, Some(&rolled_back())))?;
        clear()?;
        return Err(e);
    }
    drop(renames);

    // 3. Removing what the new revision no longer has.
    let mut manifest = in_place(results);
    record_phase(
        Phase::Removing,
        &[],
        &manifest.entries.iter().filter(changing).collect::<Vec<_>>(),
    )?;
    fp("remove", 0);
    let removed = intent::remove_all_of(&removals, log.is_some());
    let parents = parents_of(removals.iter().map(Removal::path));
    for d in parents {
        let _ = File::open(d).and_then(|f| f.sync_all());
    }
    if let Err(e) = removed {
        save_manifest(&intent::reconcile(&manifest, previous))?;
        clear()?;
        return Err(e);
    }
    // The removing intent stays until the final manifest is saved: a stop while permissions
    // are set rolls forward to this manifest (its removals are done again, harmlessly), as a
    // saved manifest would, with one manifest write fewer.

    let unchanged_files: Vec<(PathBuf, u32)> = plan
        .steps
        .iter()
        .filter(|s| match &s.action {
            // A trusted file has exactly the ACLs the manifest recorded.
            Action::Unchanged {
                previous, trusted, ..
            } => {
                previous.kind == EntryKind::File
                    && !(*trusted && previous.disk.as_deref().is_some_and(|d| !d.acl))
            }
            _ => false,
        })
        .filter_map(|s| match &s.action {
            Action::Unchanged { mode, .. } => Some((s.dest.clone(), *mode)),
            _ => None,
        })
        .collect();
    reset_acls(&unchanged_files);

    if let Err(e) = permissions::apply(&plan.permissions) {
        save_manifest(&manifest)?;
        clear()?;
        return Err(e);
    }

    // Record the files as they ended up, so the manifest describes the disk and the next
    // install can trust what still looks so.
    let with_acl: BTreeSet<&Path> = plan
        .permissions
        .iter()
        .filter(|p| !p.acls.is_empty() && !p.is_link)
        .map(|p| p.path.as_path())
        .collect();
    manifest.revision = plan.revision.clone();
    // Files left exactly as recorded (trusted, not reset, no permission touching them) keep
    // their record without a second look.
    let permitted: BTreeSet<&Path> = plan.permissions.iter().map(|p| p.path.as_path()).collect();
    let as_recorded: FastMap<&Path, &ManifestEntry> = plan
        .steps
        .iter()
        .filter_map(|s| match &s.action {
            Action::Unchanged {
                previous,
                mode,
                trusted: true,
            } if previous.kind == EntryKind::File
                && !permitted.contains(s.dest.as_path())
                && previous
                    .disk
                    .as_deref()
                    .is_some_and(|d| d.mode == *mode && (d.uid, d.gid) == agent_ids()) =>
            {
                Some((s.dest.as_path(), &**previous))
            }
            _ => None,
        })
        .collect();
    // The rest are looked at again, on a few threads when there are many.
    let to_stat: Vec<usize> = (0..manifest.entries.len())
        .filter(|&i| {
            let e = &manifest.entries[i];
            e.kind != EntryKind::Symlink && !as_recorded.contains_key(e.path.as_path())
        })
        .collect();
    // Each as a record (its `acl` told below) and whether it is a regular file.
    let mut looked: Vec<Option<(DiskStat, bool)>> = vec![None; manifest.entries.len()];
    for (i, m) in in_parallel(&to_stat, |i| {
        Ok(fs::symlink_metadata(&manifest.entries[i].path)
            .ok()
            .map(|m| {
                let disk = DiskStat {
                    ident: FileIdent::of(&m),
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    acl: false,
                };
                (disk, m.file_type().is_file())
            }))
    })? {
        looked[i] = m;
    }
    for (e, looked) in manifest.entries.iter_mut().zip(looked) {
        if e.kind == EntryKind::Symlink {
            continue;
        }
        if let Some(prev) = as_recorded.get(e.path.as_path()) {
            e.disk = prev.disk.clone();
            e.set_source(plan.sources.get(&e.path));
            continue;
        }
        let Some((disk, is_file)) = looked else {
            continue;
        };
        e.mode = disk.mode;
        if e.kind == EntryKind::File && is_file {
            e.disk = Some(Box::new(DiskStat {
                acl: with_acl.contains(e.path.as_path()),
                ..disk
            }));
            e.set_source(plan.sources.get(&e.path));
        }
    }
    // A record taken within a clock tick of the file's last change cannot vouch for it: a
    // change in the same tick would leave the times as recorded. Such files are read next time.
    let settled = Settled::now();
    for e in &mut manifest.entries {
        if e.disk
            .as_deref()
            .is_some_and(|d| !settled.before(d.ident.ctime))
        {
            e.disk = None;
        }
        if e.source.as_ref().is_some_and(|s| !settled.before(s.mtime)) {
            e.source = None;
            e.source_ctime = None;
        }
    }
    // The very manifest the install started from (an unchanged redeploy of a bundle read
    // where it lies, every record as it was): the file already holds it.
    if previous != Some(&manifest) {
        save_manifest(&manifest)?;
    }
    clear()?;
    Ok(manifest)
}

/// Steps whose new content is written beside the destination and renamed over it.
fn is_staged_action(a: &Action) -> bool {
    matches!(
        a,
        Action::Create { .. } | Action::Replace { .. } | Action::Link { .. }
    )
}

/// Whether a step's rename may replace what is at its destination.
fn may_replace(a: &Action) -> bool {
    match a {
        Action::Replace { .. } => true,
        Action::Link { replace, .. } => *replace,
        _ => false,
    }
}

fn is_dir_action(a: &Action) -> bool {
    matches!(
        a,
        Action::Mkdir { .. } | Action::KeepDir { .. } | Action::ReplaceWithDir { .. }
    )
}

/// Removes what the previous install placed: files and links, then its directories if empty.
fn remove_previous(removals: &[Removal]) -> Result<(), InstallError> {
    for r in removals {
        match r {
            Removal::File(p) => match fs::remove_file(p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(write_err("remove", p)(e))
                }
                _ => {}
            },
            Removal::DirIfEmpty(p) => match fs::remove_dir(p) {
                Err(e)
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
                    ) =>
                {
                    return Err(write_err("remove directory", p)(e))
                }
                _ => {}
            },
        }
    }
    Ok(())
}

/// Carries out one step; returns its manifest entry (none for RETAIN).
fn place(s: &Step) -> Result<Option<ManifestEntry>, InstallError> {
    let dest = &s.dest;
    Ok(match &s.action {
        Action::Mkdir { mode } => match fs::create_dir(dest) {
            Ok(()) => {
                set_dir_mode(dest, *mode)?;
                Some(dir_entry(dest, true))
            }
            // Made since the plan by someone else (another group's install into a shared
            // parent): a real directory is as good, but it is not ours to remove later.
            Err(e)
                if e.kind() == io::ErrorKind::AlreadyExists
                    && fs::symlink_metadata(dest).is_ok_and(|m| m.file_type().is_dir()) =>
            {
                Some(dir_entry(dest, false))
            }
            Err(e) => return Err(write_err("create directory", dest)(e)),
        },
        Action::ReplaceWithDir { mode } => {
            fs::remove_file(dest).map_err(write_err("remove", dest))?;
            make_dir(dest, *mode)?;
            Some(dir_entry(dest, true))
        }
        Action::KeepDir { created } => Some(dir_entry(dest, *created)),
        Action::Create { source, mode } | Action::Replace { source, mode } => {
            let replace = matches!(s.action, Action::Replace { .. });
            let (size, sha) = place_file(source, dest, *mode, replace)?;
            Some(ManifestEntry {
                path: dest.clone(),
                kind: EntryKind::File,
                size,
                mode: *mode,
                sha256: Some(sha),
                link_target: None,
                created: false,
                disk: None,
                source: None,
                source_ctime: None,
            })
        }
        Action::Unchanged {
            previous,
            mode,
            trusted,
        } => {
            // Trusted and recorded with the bundle's mode and the agent's ownership: already
            // what a fresh copy would have.
            let fresh = *trusted
                && previous
                    .disk
                    .as_deref()
                    .is_some_and(|d| d.mode == *mode && (d.uid, d.gid) == agent_ids());
            if previous.kind == EntryKind::File && !fresh {
                // Not rewritten, but reset to what a fresh copy would have: the bundle's mode
                // and the agent's ownership (permissions set theirs again afterwards).
                // Through a descriptor opened without following links: the file sits where
                // an application user may be able to swap it for a symlink.
                // A file that already has them is left untouched: a chown or chmod to the
                // same values would still move its ctime, and a file whose ctime keeps moving
                // is never settled enough to be trusted next time.
                // A chown also drops file capabilities (`setcap`, by an earlier hook): a file
                // that has some gets one, as a fresh copy has none.
                let file = permissions::open_no_follow(dest)?;
                let now = file.metadata().map_err(write_err("look at", dest))?;
                let caps = {
                    use xattr::FileExt;
                    file.get_xattr("security.capability")
                        .ok()
                        .flatten()
                        .is_some()
                };
                let reset = caps || (now.uid(), now.gid()) != agent_ids();
                if reset {
                    nix::unistd::fchown(
                        &file,
                        Some(nix::unistd::geteuid()),
                        Some(nix::unistd::getegid()),
                    )
                    .map_err(|e| write_err("change the owner of", dest)(e.into()))?;
                }
                // After a chown, which may have cleared set-id bits.
                if reset || now.mode() & 0o7777 != *mode {
                    file.set_permissions(fs::Permissions::from_mode(*mode))
                        .map_err(write_err("change the mode of", dest))?;
                }
            }
            Some((**previous).clone())
        }
        Action::Retain => None,
        Action::Link { target, replace } => {
            place_link(target, dest, *replace)?;
            Some(ManifestEntry {
                path: dest.clone(),
                kind: EntryKind::Symlink,
                size: 0,
                mode: 0o777,
                sha256: None,
                link_target: Some(target.clone()),
                created: false,
                disk: None,
                source: None,
                source_ctime: None,
            })
        }
    })
}

/// The agent's effective uid and gid: what a freshly copied file belongs to.
pub(crate) fn agent_ids() -> (u32, u32) {
    static IDS: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *IDS.get_or_init(|| {
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    })
}

/// The distinct parents of `paths`. Paths in path order share their parents in runs: a
/// parent equal to the one before is not inserted again (each insert compares paths
/// component by component).
fn parents_of<'p>(paths: impl Iterator<Item = &'p Path>) -> BTreeSet<&'p Path> {
    let mut out = BTreeSet::new();
    let mut last: Option<&Path> = None;
    for parent in paths.filter_map(Path::parent) {
        if last != Some(parent) {
            out.insert(parent);
            last = Some(parent);
        }
    }
    out
}

/// Below this many file steps, threads cost more than they save.
const PARALLEL_MIN_STEPS: usize = 64;
/// [`crate::parallel::in_parallel`] for install's file steps.
fn in_parallel<T: Send>(
    items: &[usize],
    f: impl Fn(usize) -> Result<T, InstallError> + Sync,
) -> Result<Vec<(usize, T)>, InstallError> {
    crate::parallel::in_parallel(items, PARALLEL_MIN_STEPS, f)
}

/// Drops ACLs an earlier install (or anyone since) set on files it now leaves in place, as a
/// fresh copy would not have them; `permissions` sets this install's ACLs afterwards. Best
/// effort: a filesystem without ACL support has none to drop.
///
/// Only files that carry an extended ACL (the `system.posix_acl_access` attribute, read with one
/// `fgetxattr` each) are handed to setfacl, in batches, so an unchanged file with no ACL, the
/// usual case, costs one syscall and no process. Each file is opened without following a
/// symlink (like every other permission change, [`permissions::open_no_follow`]) and setfacl
/// gets `/proc/PID/fd/N`, so a file swapped for a symlink since the install is skipped, not
/// followed; each run is time-limited. Dropping an ACL leaves the group bits at the ACL's
/// group entry, not at the mask a chmod set, so each file gets its `mode` again afterwards.
fn reset_acls(files: &[(PathBuf, u32)]) {
    use std::os::fd::AsRawFd;
    use xattr::FileExt;
    if files.is_empty() {
        return;
    }
    let mut with_acl = Vec::new();
    for (path, mode) in files {
        let file = match permissions::open_no_follow(path) {
            Ok(file) => file,
            Err(e) => {
                log::warn!("not dropping ACLs of {}: {e}", path.display());
                continue;
            }
        };
        match file.get_xattr(ACL_XATTR) {
            Ok(Some(_)) => with_acl.push((path, *mode)),
            Ok(None) => {}
            // No xattrs or no ACLs on this filesystem: nothing to drop.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP)) => return,
            Err(e) => log::warn!("not dropping ACLs of {}: {e}", path.display()),
        }
    }
    if with_acl.is_empty() {
        return;
    }
    let Some(setfacl) = permissions::find_tool("setfacl") else {
        log::warn!(
            "{} unchanged file(s) keep an ACL an earlier install left ({} first): setfacl is \
             not installed",
            with_acl.len(),
            with_acl[0].0.display()
        );
        return;
    };
    // Reopened per batch: at most 256 descriptors held at once.
    for chunk in with_acl.chunks(256) {
        let mut open = Vec::with_capacity(chunk.len());
        for (path, mode) in chunk {
            match permissions::open_no_follow(path) {
                Ok(file) => open.push((file, *mode, path)),
                Err(e) => log::warn!("not dropping ACLs of {}: {e}", path.display()),
            }
        }
        if open.is_empty() {
            continue;
        }
        let pid = std::process::id();
        let mut cmd = std::process::Command::new(&setfacl);
        cmd.arg("-b").arg("--");
        for (file, _, _) in &open {
            cmd.arg(format!("/proc/{pid}/fd/{}", file.as_raw_fd()));
        }
        if let Err(e) = crate::tool::run(&mut cmd, crate::tool::TOOL_TIME_LIMIT) {
            log::warn!(
                "dropping ACLs of unchanged files ({} first): {e}",
                chunk[0].0.display()
            );
        }
        for (file, mode, path) in &open {
            if let Err(e) = file.set_permissions(fs::Permissions::from_mode(*mode)) {
                log::warn!("setting the mode of {} again: {e}", path.display());
            }
        }
    }
}

/// The extended attribute that holds a file's POSIX access ACL (present only when the ACL has
/// more than the owner/group/other entries of the mode).
const ACL_XATTR: &str = "system.posix_acl_access";
/// The attribute holding a directory's default ACL, which new files in it inherit.
const ACL_DEFAULT_XATTR: &str = "system.posix_acl_default";

fn dir_entry(path: &Path, created: bool) -> ManifestEntry {
    ManifestEntry {
        path: path.to_path_buf(),
        kind: EntryKind::Dir,
        size: 0,
        mode: 0,
        sha256: None,
        link_target: None,
        created,
        disk: None,
        source: None,
        source_ctime: None,
    }
}

fn make_dir(path: &Path, mode: u32) -> Result<(), InstallError> {
    fs::create_dir(path).map_err(write_err("create directory", path))?;
    set_dir_mode(path, mode)
}

/// Sets a new directory's mode explicitly, so the umask does not decide.
fn set_dir_mode(path: &Path, mode: u32) -> Result<(), InstallError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(write_err("change the mode of", path))
}

fn sync_dir(path: &Path) -> Result<(), InstallError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(write_err("sync directory", path))
}

/// Prefix of the names files are written under before their rename into place.
const TEMP_PREFIX: &str = ".pier-tmp-";

/// A name beside `dest` for writing it before the rename: hidden, unique to this process, and
/// recognisable (`.pier-tmp-<pid>-<n>-<name>`) so that one left by a killed agent can be swept.
fn temp_beside(dest: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    // Keep the whole name within NAME_MAX; uniqueness comes from pid and counter.
    let name: String = name.chars().take(64).collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dest.with_file_name(format!("{TEMP_PREFIX}{}-{n}-{name}", temp_tag()))
}

/// A random tag for this process's temp names: a pid can come back (an agent that is PID 1
/// in a container restarts as PID 1), the tag does not.
fn process_nonce() -> u32 {
    static NONCE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *NONCE.get_or_init(rand::random::<u32>)
}

/// Temp files in `dir` left by an agent that died before renaming them: their pid is not a
/// live process (a live one may be another install writing there right now), or it is this
/// process's pid with another process's tag (the pid came back after a crash).
fn stale_temps(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name();
            let rest = name.to_str()?.strip_prefix(TEMP_PREFIX)?;
            let mut parts = rest.split('-');
            let pid: u32 = parts.next()?.parse().ok()?;
            let nonce: Option<u32> = parts.next().and_then(|n| n.parse().ok());
            // Another live process's temp may be in use right now; one with this process's
            // pid but not its tag was left by an earlier life of the same pid.
            let ours = pid == std::process::id();
            let alive = Path::new("/proc").join(pid.to_string()).exists();
            let stale = if ours {
                nonce != Some(process_nonce())
            } else {
                !alive
            };
            stale.then(|| e.path())
        })
        .collect()
}

/// Writes a new file or link of a step under a temp name beside its destination (recorded in
/// `temps` for cleanup) and leaves it there for the switch; returns its manifest entry and the
/// temp.
fn stage(
    s: &Step,
    moved: Option<&(u64, String)>,
    temps: &Mutex<Vec<PathBuf>>,
) -> Result<(ManifestEntry, PathBuf), InstallError> {
    let tmp = temp_beside(&s.dest);
    temps
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(tmp.clone());
    let entry = match &s.action {
        Action::Create { source, mode } | Action::Replace { source, mode } => {
            let (size, sha) = match moved {
                Some((size, sha)) if move_to_temp(source, &tmp) => (*size, sha.clone()),
                _ => write_temp(source, &tmp, *mode)?,
            };
            ManifestEntry {
                path: s.dest.clone(),
                kind: EntryKind::File,
                size,
                mode: *mode,
                sha256: Some(sha),
                link_target: None,
                created: false,
                disk: None,
                source: None,
                source_ctime: None,
            }
        }
        Action::Link { target, .. } => {
            std::os::unix::fs::symlink(target, &tmp).map_err(write_err("create symlink", &tmp))?;
            ManifestEntry {
                path: s.dest.clone(),
                kind: EntryKind::Symlink,
                size: 0,
                mode: 0o777,
                sha256: None,
                link_target: Some(target.clone()),
                created: false,
                disk: None,
                source: None,
                source_ctime: None,
            }
        }
        _ => unreachable!("only steps that is_staged_action admits are staged"),
    };
    Ok((entry, tmp))
}

/// Moves a revision file the plan found movable (the unpack's own, one link, one destination;
/// its mode is the one the plan read from it) to the temp beside its destination. False when
/// it could not be moved (another filesystem, a directory the agent may not change, ...):
/// a failed rename leaves the file where it was, and it is copied instead.
fn move_to_temp(source: &Path, tmp: &Path) -> bool {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    renameat2(
        AT_FDCWD,
        source,
        AT_FDCWD,
        tmp,
        RenameFlags::RENAME_NOREPLACE,
    )
    .is_ok()
}

/// Whether a file moved into `dir` ends up as a copy made there would: a new file takes its
/// group from a set-group-id directory, its ACL from the directory's default ACL, and its
/// security label (SELinux, Smack) from the policy for where it is made, none of which a
/// rename gives it. Where any of those applies, files are copied.
fn moves_keep_copy_result(dir: &Path) -> bool {
    use xattr::FileExt;
    static LABELLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let labelled = *LABELLED.get_or_init(|| {
        Path::new("/sys/fs/selinux/enforce").exists() || Path::new("/sys/fs/smackfs").is_dir()
    });
    if labelled {
        return false;
    }
    let Ok(d) = File::open(dir) else {
        return false;
    };
    let setgid = d.metadata().map_or(true, |m| m.mode() & 0o2000 != 0);
    let default_acl = match d.get_xattr(ACL_DEFAULT_XATTR) {
        Ok(None) => false,
        // No ACLs on this filesystem: none to inherit.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => false,
        Ok(Some(_)) | Err(_) => true,
    };
    !setgid && !default_acl
}

/// The tag in this process's temp names (`<pid>-<nonce>`), recorded in the install intent
/// so that recovery removes exactly the temps of the install it recovers.
fn temp_tag() -> &'static str {
    // Made once: a getpid per staged file showed in the syscall count of a large install.
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| format!("{}-{}", std::process::id(), process_nonce()))
}

/// Flushes the filesystems holding `paths` to disk: one syncfs for each, however many files.
fn sync_filesystems(paths: &[PathBuf]) -> Result<(), InstallError> {
    // A new file is on its directory's filesystem: one stat per directory, not per file.
    let dirs = parents_of(paths.iter().map(PathBuf::as_path));
    let mut seen: BTreeSet<u64> = BTreeSet::new();
    for dir in dirs {
        // Followed, as the open below follows it (a destination's parent may be a link).
        let Ok(meta) = fs::metadata(dir) else {
            continue;
        };
        if seen.insert(meta.dev()) {
            // Through the directory: a temp may be a symlink, and a directory is never a FIFO
            // someone put in a temp's place.
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK)
                .open(dir)
                .map_err(write_err("open for sync", dir))?;
            nix::unistd::syncfs(&f)
                .map_err(|e| write_err("sync the filesystem of", dir)(e.into()))?;
        }
    }
    Ok(())
}

fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        let _ = fs::remove_file(p);
    }
}

/// Writes `source` to the new file `tmp` with `mode`, without syncing it. Returns the size and
/// the hex sha256 of what was written. On failure nothing is left at `tmp`.
fn write_temp(source: &Path, tmp: &Path, mode: u32) -> Result<(u64, String), InstallError> {
    let result = (|| {
        let mut input = confined::open_planned(source).map_err(read_err(source))?;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)
            .map_err(write_err("create", tmp))?;
        let mut h = Sha256::new();
        let mut size = 0u64;
        crate::buffer::with(|buf| loop {
            let n = input.read(buf).map_err(read_err(source))?;
            if n == 0 {
                return Ok(());
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(write_err("write", tmp))?;
            size += n as u64;
        })?;
        // Private until written, then exactly `mode`: neither the umask nor a default ACL of
        // the directory (which overrides the umask) decides it.
        out.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(write_err("change the mode of", tmp))?;
        Ok((size, hex::encode(h.finalize())))
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Copies `source` to `dest` so that `dest` is never seen half-written: write beside, fsync,
/// rename over. Returns the size and the hex sha256 of what was written. (`apply` stages many
/// files at once instead, with one sync for all; this is the one-file path.)
fn place_file(
    source: &Path,
    dest: &Path,
    mode: u32,
    replace: bool,
) -> Result<(u64, String), InstallError> {
    let tmp = temp_beside(dest);
    let written = write_temp(source, &tmp, mode)?;
    let result = File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(write_err("sync", &tmp))
        .and_then(|()| rename_into_place(&tmp, dest, replace));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| written)
}

/// Places a symlink atomically (a new link renamed into place).
fn place_link(target: &Path, dest: &Path, replace: bool) -> Result<(), InstallError> {
    let tmp = temp_beside(dest);
    std::os::unix::fs::symlink(target, &tmp).map_err(write_err("create symlink", &tmp))?;
    rename_into_place(&tmp, dest, replace).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Renames `tmp` to `dest`. Unless `replace`, a `dest` that appeared since the plan is not
/// clobbered: renameat2(RENAME_NOREPLACE) where the kernel and filesystem have it, a check
/// before the rename elsewhere.
fn rename_into_place(tmp: &Path, dest: &Path, replace: bool) -> Result<(), InstallError> {
    if !replace {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            use nix::errno::Errno;
            use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
            match renameat2(AT_FDCWD, tmp, AT_FDCWD, dest, RenameFlags::RENAME_NOREPLACE) {
                Ok(()) => return Ok(()),
                Err(Errno::EEXIST) => {
                    return Err(InstallError::AppearedSincePlan {
                        dest: dest.to_path_buf(),
                    })
                }
                // Not supported here: fall back to check-then-rename.
                Err(Errno::EINVAL | Errno::ENOSYS) => {}
                Err(e) => return Err(write_err("rename into place", dest)(e.into())),
            }
        }
        if fs::symlink_metadata(dest).is_ok() {
            return Err(InstallError::AppearedSincePlan {
                dest: dest.to_path_buf(),
            });
        }
    }
    fs::rename(tmp, dest).map_err(write_err("rename into place", dest))
}

#[cfg(test)]
mod tests;
