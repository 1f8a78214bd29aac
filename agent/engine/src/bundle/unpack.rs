//! Safe unpacking of a revision bundle (tar, tgz, zip, or a directory) into a fresh directory.
//!
//! A bundle is untrusted input: this module decides what may land on disk and refuses, naming
//! the entry, anything that could write outside the destination (`..`, absolute paths, writing
//! *through* a symlink, hard links to outside), special nodes (devices, FIFOs, sockets) and
//! bundles past a size or entry cap. Set-uid/set-gid bits are cleared and reported so that the
//! deploy engine can refuse them unless the AppSpec grants them. It knows nothing of AppSpec
//! semantics and never shells out. On any refusal the destination is removed again.
//!
//! Directory bundles are reproduced by hard-linking each file (copying across filesystems), so a
//! directory bundle's data is written once, by Install, on its way to its destination.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pier_protocol::quote::quote_bytes;
use pier_protocol::ErrorCode;
use sha2::{Digest as _, Sha256};

use super::tar_stream::{self, TarError, MAX_NAME_BYTES};
use crate::install::Settled;

/// How much of an archive reader's own message an error keeps.
const MAX_DETAIL_CHARS: usize = 300;
/// Cap on one zip entry's extra field (the format allows 64 KiB; real ones are a few dozen
/// bytes).
pub const MAX_ZIP_EXTRA_BYTES: u64 = 4096;

/// File-type bits as found in `st_mode` and in zip "external attributes".
const S_IFMT: u32 = 0o170_000;
const S_IFSOCK: u32 = 0o140_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFREG: u32 = 0o100_000;
const S_IFBLK: u32 = 0o060_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFIFO: u32 = 0o010_000;
/// Set-uid and set-gid: cleared on disk, reported in [`Unpacked::setid_entries`].
const SETID_BITS: u32 = 0o6000;
/// Permission bits kept from the bundle (sticky included, set-id never).
const KEPT_BITS: u32 = 0o1777;
/// Opens a directory bundle's file for copying, without following a symlink and only if it is
/// still the file that was checked (same device and inode): the bundle's owner cannot swap it
/// for a link to a file only root may read between the check and the copy.
fn open_same_file(path: &Path, checked: &fs::Metadata) -> Result<File, UnpackError> {
    use std::os::unix::fs::OpenOptionsExt;
    let read_err = |source| UnpackError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(read_err)?;
    let now = f.metadata().map_err(read_err)?;
    if now.dev() != checked.dev() || now.ino() != checked.ino() || !now.is_file() {
        return Err(read_err(io::Error::other(
            "the file changed while the bundle was being read",
        )));
    }
    Ok(f)
}

/// What a [`CappedReader`] says when its budget is spent.
const CAP_MESSAGE: &str = "archive stream passes the bundle size cap";

/// A reader that fails once more than `left` bytes have been read through it.
struct CappedReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::new(io::ErrorKind::FileTooLarge, CAP_MESSAGE));
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Longest symlink target accepted from a zip (where the target is the entry's data).
const MAX_LINK_TARGET: u64 = 4096;

pub use pier_protocol::BundleType;

/// Tells the type of the bundle at `path`: a directory, then by name (`.tar`, `.tar.gz` or
/// `.tgz`, `.zip`), then by the file's first bytes.
pub fn detect_bundle_type(path: &Path) -> Result<BundleType, UnpackError> {
    let read_err = |source| UnpackError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(read_err)?;
    if meta.is_dir() {
        return Ok(BundleType::Directory);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(t) = BundleType::from_file_name(&name) {
        return Ok(t);
    }
    let mut head = [0u8; pier_protocol::MAGIC_LEN];
    let mut f = File::open(path).map_err(read_err)?;
    let n = read_up_to(&mut f, &mut head).map_err(read_err)?;
    BundleType::from_magic(&head[..n]).ok_or_else(|| UnpackError::Undetectable {
        path: path.to_path_buf(),
    })
}

/// Reads until `buf` is full or the file ends; returns how much was read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Limits that keep a hostile or broken bundle from filling the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackPolicy {
    /// Cap on the total size of the files in the bundle (declared and actually written).
    pub max_total_bytes: u64,
    /// Cap on the number of entries (files, directories, links).
    pub max_entries: u64,
}

impl Default for UnpackPolicy {
    fn default() -> Self {
        UnpackPolicy {
            max_total_bytes: 4 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// What an unpack placed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Regular files placed (hard links included).
    pub files: u64,
    /// Bytes of file data placed.
    pub bytes: u64,
    /// Entries that carried set-uid/set-gid bits; the bits were cleared on disk. Each is the
    /// entry's path relative to the bundle root (normalized like `FileMapping::source`) and its
    /// mode as the bundle gave it, file-type bits included (`S_IFREG | 0o4755`), so a reader
    /// can tell files from directories.
    pub setid_entries: Vec<(String, u32)>,
    /// The sha256 of every regular file the unpack wrote itself (extracted or copied, not
    /// hard-linked from a directory bundle), computed while it was written, keyed by its path
    /// relative to the bundle root, with what the file looked like once written. Install
    /// trusts a digest only while the file still looks so (a hook may edit the revision).
    pub digests: HashMap<PathBuf, Digest>,
}

/// A file's content hash and the on-disk identity it was taken at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// Hex sha256 of the content.
    pub sha256: String,
    /// The file when hashed.
    pub ident: FileIdent,
    /// Whether `ident`'s times were settled when the unpack ended: only then can they tell
    /// that the file was not changed since (install::Settled). An unsettled digest still
    /// describes the file for as long as nothing else writes the revision.
    pub settled: bool,
}

/// Who a file is on disk and when it last changed: equal identities mean the same inode,
/// not written (mtime) and not touched at all (ctime, which no system call can set back)
/// since the first was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(from = "IdentRecord", into = "IdentRecord")]
pub struct FileIdent {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

/// [`FileIdent`] as stored: `[dev, ino, size, mtime s, mtime ns, ctime s, ctime ns]`.
type IdentRecord = (u64, u64, u64, i64, i64, i64, i64);

impl From<IdentRecord> for FileIdent {
    fn from((dev, ino, size, ms, mns, cs, cns): IdentRecord) -> Self {
        FileIdent {
            dev,
            ino,
            size,
            mtime: (ms, mns),
            ctime: (cs, cns),
        }
    }
}

impl From<FileIdent> for IdentRecord {
    fn from(i: FileIdent) -> Self {
        (
            i.dev, i.ino, i.size, i.mtime.0, i.mtime.1, i.ctime.0, i.ctime.1,
        )
    }
}

impl FileIdent {
    /// The identity of what `meta` describes.
    pub fn of(meta: &fs::Metadata) -> FileIdent {
        FileIdent {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Why a bundle was refused or could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// Neither name nor content tells the type.
    #[error(
        "cannot tell what kind of bundle {path} is: name it .tar, .tgz/.tar.gz or .zip, \
         or give the type (-t directory|tar|tgz|zip)"
    )]
    Undetectable {
        /// The bundle.
        path: PathBuf,
    },
    /// Unpacking only goes into a fresh directory.
    #[error(
        "cannot unpack into {dest}: it already exists; unpack into a path that does not exist"
    )]
    DestExists {
        /// The destination given.
        dest: PathBuf,
    },
    /// A directory bundle asked to unpack into itself (it would copy itself forever).
    #[error(
        "cannot unpack the directory bundle {src} into {dest}, which is inside it; choose a \
         deployment root outside the bundle"
    )]
    DestInsideSource {
        /// The bundle directory.
        src: PathBuf,
        /// The destination.
        dest: PathBuf,
    },
    /// An entry with an absolute path.
    #[error(
        "refused bundle: entry {entry} has an absolute path; a bundle may hold relative \
         paths only, rebuild it from inside its root directory"
    )]
    AbsolutePath {
        /// The entry as named in the bundle.
        entry: String,
    },
    /// An entry with a `..` component.
    #[error(
        "refused bundle: entry {entry} climbs out of the bundle with '..'; rebuild it \
         without parent-directory components"
    )]
    ParentDir {
        /// The entry as named in the bundle.
        entry: String,
    },
    /// A name that cannot be a path (NUL byte, empty).
    #[error("refused bundle: entry {entry} has a name that cannot be a file path")]
    BadName {
        /// The entry as named in the bundle (quoted, escaped, cut).
        entry: String,
    },
    /// A name that is not UTF-8. The journal, the install manifest and status records hold
    /// paths as text, so such a name is refused rather than installed under another name.
    #[error(
        "refused bundle: entry {entry} has a name that is not UTF-8 (the bytes that are not \
         are shown as \\xNN); pier installs UTF-8 names only, rename the file"
    )]
    NotUtf8 {
        /// The entry, quoted with its bytes escaped.
        entry: String,
    },
    /// The tar stream broke a cap on its metadata or used what a bundle may not.
    #[error("refused bundle {path}: {source}")]
    Tar {
        /// The bundle.
        path: PathBuf,
        /// What the tar reader refused.
        source: super::tar_stream::TarError,
    },
    /// A zip entry's name or extra field is larger than its cap.
    #[error(
        "refused bundle: zip entry {entry} has a {what} of {len} bytes, over the cap of \
         {limit} bytes"
    )]
    ZipField {
        /// The entry, quoted and cut.
        entry: String,
        /// "name" or "extra field".
        what: &'static str,
        /// Its length.
        len: usize,
        /// The cap.
        limit: u64,
    },
    /// An entry that would be written beneath a symlink from the bundle.
    #[error(
        "refused bundle: entry {entry} would be written through the symlink {symlink}; \
         a bundle may contain symlinks, but nothing may be placed beneath one"
    )]
    ThroughSymlink {
        /// The entry as named in the bundle.
        entry: String,
        /// The bundle symlink on its way.
        symlink: String,
    },
    /// A hard link to outside the bundle or to something not (yet) extracted as a file.
    #[error(
        "refused bundle: entry {entry} is a hard link to {target}, which is outside the \
         bundle or not a file extracted before it; replace the link with a copy of the file"
    )]
    HardLink {
        /// The entry as named in the bundle.
        entry: String,
        /// The link's target as named in the bundle.
        target: String,
    },
    /// Device, FIFO or socket nodes.
    #[error(
        "refused bundle: entry {entry} is a {kind}; a bundle may contain only files, \
         directories and symlinks"
    )]
    SpecialFile {
        /// The entry as named in the bundle.
        entry: String,
        /// What it is ("character device", "FIFO", ...).
        kind: &'static str,
    },
    /// Past the byte cap (declared or actually written).
    #[error(
        "refused bundle: it is larger than the cap of {limit} bytes (entry {entry} brings it \
         to {total} bytes or more); raise the bundle size cap if this bundle is trusted"
    )]
    TooLarge {
        /// The entry that passed the cap.
        entry: String,
        /// The total reached.
        total: u64,
        /// The cap.
        limit: u64,
    },
    /// Past the entry cap.
    #[error(
        "refused bundle: it has more than {limit} entries (at {entry}); raise the entry cap \
         if this bundle is trusted"
    )]
    TooManyEntries {
        /// The entry that passed the cap.
        entry: String,
        /// The cap.
        limit: u64,
    },
    /// Two entries of different kinds at one path (a file where a directory is, ...).
    #[error(
        "refused bundle: entry {entry} conflicts with an earlier entry of another kind at \
         {path}; rebuild the bundle without the duplicate"
    )]
    Conflict {
        /// The entry as named in the bundle.
        entry: String,
        /// The bundle path in conflict.
        path: String,
    },
    /// The bundle could not be read.
    #[error("cannot read bundle {path}: {source}")]
    Read {
        /// The bundle or the file in it.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The archive is malformed.
    #[error("bundle {path} is not a readable {kind} archive: {detail}")]
    Corrupt {
        /// The bundle.
        path: PathBuf,
        /// Its type.
        kind: BundleType,
        /// What the archive reader said.
        detail: String,
    },
    /// Writing into the destination failed.
    #[error("cannot write {path} while unpacking the bundle: {source}")]
    Write {
        /// What was being written.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl From<TarError> for UnpackError {
    /// The bundle path is filled in by the caller, which knows it.
    fn from(source: TarError) -> Self {
        UnpackError::Tar {
            path: PathBuf::new(),
            source,
        }
    }
}

impl UnpackError {
    /// The code a failed DownloadBundle carries: [`ErrorCode::BundleRefused`] for anything
    /// about the bundle itself (its type, an entry, its size, a damaged or unreadable
    /// archive); [`ErrorCode::UnknownError`] for the agent's side (a destination that exists
    /// or lies in the bundle, a write on this host that failed, such as a full disk), which
    /// rebuilding the bundle would not fix.
    pub(crate) fn error_code(&self) -> ErrorCode {
        match self {
            UnpackError::Undetectable { .. }
            | UnpackError::AbsolutePath { .. }
            | UnpackError::ParentDir { .. }
            | UnpackError::BadName { .. }
            | UnpackError::NotUtf8 { .. }
            | UnpackError::Tar { .. }
            | UnpackError::ZipField { .. }
            | UnpackError::ThroughSymlink { .. }
            | UnpackError::HardLink { .. }
            | UnpackError::SpecialFile { .. }
            | UnpackError::TooLarge { .. }
            | UnpackError::TooManyEntries { .. }
            | UnpackError::Conflict { .. }
            | UnpackError::Read { .. }
            | UnpackError::Corrupt { .. } => ErrorCode::BundleRefused,
            UnpackError::DestExists { .. }
            | UnpackError::DestInsideSource { .. }
            | UnpackError::Write { .. } => ErrorCode::UnknownError,
        }
    }
}

/// Unpack `src` into `dest` (must not exist; created). On any refusal `dest` is removed and
/// nothing was written outside it.
pub fn unpack(
    src: &Path,
    kind: BundleType,
    dest: &Path,
    policy: &UnpackPolicy,
) -> Result<Unpacked, UnpackError> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(UnpackError::DestExists {
            dest: dest.to_path_buf(),
        });
    }
    if kind == BundleType::Directory {
        if let (Ok(src), Some(dest)) = (fs::canonicalize(src), resolve_missing(dest)) {
            if dest.starts_with(&src) {
                return Err(UnpackError::DestInsideSource { src, dest });
            }
        }
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(|source| UnpackError::Write {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    // create_dir (not _all) so that a racing creator makes us fail rather than share.
    fs::create_dir(dest).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => UnpackError::DestExists {
            dest: dest.to_path_buf(),
        },
        _ => UnpackError::Write {
            path: dest.to_path_buf(),
            source,
        },
    })?;
    let mut x = Extractor::new(src, kind, dest, *policy);
    let result = match kind {
        BundleType::Directory => x.directory(),
        BundleType::Tar => open(src).and_then(|f| x.tar(BufReader::new(f))),
        BundleType::Tgz => {
            open(src).and_then(|f| x.tar(flate2::read::MultiGzDecoder::new(BufReader::new(f))))
        }
        BundleType::Zip => open(src).and_then(|f| x.zip(f)),
    }
    .and_then(|()| x.finish_dirs());
    match result {
        Ok(()) => {
            // A digest vouches for a file only while its times say it is untouched, and times
            // read within a clock tick of a change cannot say so (install::Settled).
            let settled = crate::install::Settled::now();
            for d in x.out.digests.values_mut() {
                d.settled = settled.before(d.ident.ctime);
            }
            Ok(x.out)
        }
        Err(e) => {
            // Best effort: the refusal is what the caller needs to see, not a cleanup hiccup.
            if let Err(rm) = fs::remove_dir_all(dest) {
                log::warn!(
                    "could not remove {} after refusing the bundle: {rm}",
                    dest.display()
                );
            }
            Err(e)
        }
    }
}

/// What [`survey_directory`] found a directory bundle to be.
#[derive(Debug)]
pub enum Survey {
    /// Only the agent's user can change it, and a snapshot would be nothing but hard links
    /// to its own files: it can be read where it lies. Holds its canonical path, what an
    /// unpack would have placed (no set-id entries, no digests), and every directory as the
    /// survey listed it.
    InPlace {
        root: PathBuf,
        unpacked: Unpacked,
        walked: Walked,
    },
    /// It must be unpacked (snapshotted) first; why, for the log.
    Snapshot(String),
}

/// Whether a directory bundle can be read where it lies instead of being reproduced by
/// [`unpack`]: its path and every entry in it can be changed by nobody but the agent's user
/// (or root), and it holds only directories and regular files, none with a set-id bit, none
/// writable by group or others. Such a bundle's snapshot would hard-link every file (the
/// same inodes) and copy nothing, so reading it in place reads exactly what the snapshot
/// would hold. Refuses, with the same error, what [`unpack`] would refuse (entry and size
/// caps, names that are not UTF-8, devices and other special nodes); anything else it does
/// not vouch for (a symlink, a file another user owns) is left to [`unpack`].
pub fn survey_directory(src: &Path, policy: &UnpackPolicy) -> Result<Survey, UnpackError> {
    match trusted_root(src)? {
        Ok(root) => survey_tree(root, policy),
        Err(why) => Ok(Survey::Snapshot(why)),
    }
}

/// The first half of [`survey_directory`], for a caller with something to read before the
/// rest: the real path of the bundle `src` when nobody but the agent's user (or root) can
/// change the way to it or the directory itself, and it lies on a filesystem mounted
/// read-write; else why not.
pub fn trusted_root(src: &Path) -> Result<Result<PathBuf, String>, UnpackError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| UnpackError::Read { path, source }
    };
    let root = fs::canonicalize(src).map_err(read_err(src))?;
    if let Some(why) = changeable_path(&root) {
        return Ok(Err(why));
    }
    let meta = fs::metadata(&root).map_err(read_err(&root))?;
    if !meta.is_dir() {
        return Ok(Err("not a directory".into()));
    }
    if let Some(why) = not_agents_own(&meta) {
        return Ok(Err(format!("the bundle directory {why}")));
    }
    // The next install trusts a file whose ctime has not moved: only where this kernel sets
    // the ctimes, not in an image (squashfs, erofs, ISO) whose times were fixed when it was
    // built, nor one mounted anew with the same numbers.
    use nix::sys::statvfs::{statvfs, FsFlags};
    match statvfs(&root) {
        Ok(v) if v.flags().contains(FsFlags::ST_RDONLY) => {
            Ok(Err("it lies on a read-only filesystem".into()))
        }
        Ok(_) => Ok(Ok(root)),
        Err(e) => Ok(Err(format!("statvfs: {e}"))),
    }
}

/// The directories of a bundle a survey listed, each as [`read_dir_sorted`] returned it
/// (keyed by its full path beneath the survey's root), and a [`Settled`] taken before the
/// first was read. Install's plan takes a directory's entries from here rather than listing
/// and stat-ing the same tree a second time; a file time it records from these stats must
/// have been settled before they were taken, hence `since`.
#[derive(Debug)]
pub struct Walked {
    pub(crate) since: Settled,
    pub(crate) dirs: HashMap<PathBuf, Listing>,
}

/// The second half of [`survey_directory`]: the walk of every entry beneath `root`, a path
/// [`trusted_root`] returned.
pub fn survey_tree(root: PathBuf, policy: &UnpackPolicy) -> Result<Survey, UnpackError> {
    // Before anything of the tree is looked at (see [`Walked`]).
    let since = Settled::now();
    let dev = fs::metadata(&root)
        .map_err(|source| UnpackError::Read {
            path: root.clone(),
            source,
        })?
        .dev();
    let mut x = Extractor::new(&root, BundleType::Directory, &root, *policy);
    x.survey_dev = dev;
    x.prefetched = prefetch_listings(&root, dev, policy.max_entries);
    let why = x.survey(&root, PathBuf::new())?;
    let (unpacked, dirs) = (x.out, x.walked);
    Ok(match why {
        Some(why) => Survey::Snapshot(why),
        None => Survey::InPlace {
            root,
            unpacked,
            walked: Walked { since, dirs },
        },
    })
}

/// Why the agent is not the only one who can change what `meta` describes (None when it is):
/// owned by another user, writable by group or others, or carrying a set-id bit.
fn not_agents_own(meta: &fs::Metadata) -> Option<String> {
    let agent = crate::install::agent_ids().0;
    if meta.uid() != agent {
        return Some(format!("is owned by uid {}", meta.uid()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Some(format!("is writable by group or others (mode {mode:04o})"));
    }
    if mode & SETID_BITS != 0 {
        return Some(format!("has a set-id bit (mode {mode:04o})"));
    }
    None
}

/// Why someone besides the agent's user and root could rename or replace something on the
/// way to `canonical` (None when nobody can): an ancestor owned by another user, or writable
/// by group or others without the sticky bit that keeps others' entries theirs.
fn changeable_path(canonical: &Path) -> Option<String> {
    let agent = crate::install::agent_ids().0;
    let trusted = |uid: u32| uid == 0 || uid == agent;
    // A sticky directory open to all (/tmp) is fine: its entries that matter here are the
    // next ancestor or the bundle itself, each checked to be the agent's or root's.
    for dir in canonical.ancestors().skip(1) {
        let m = match fs::metadata(dir) {
            Ok(m) => m,
            Err(e) => return Some(format!("{}: {e}", dir.display())),
        };
        if !trusted(m.uid()) {
            return Some(format!("{} is owned by uid {}", dir.display(), m.uid()));
        }
        let open_to_others = m.mode() & 0o022 != 0;
        let sticky = m.mode() & 0o1000 != 0;
        if open_to_others && !sticky {
            return Some(format!(
                "{} is writable by group or others (mode {:04o})",
                dir.display(),
                m.mode() & 0o7777
            ));
        }
    }
    None
}

/// A directory's entries: each name with its metadata, or why it could not be had.
pub(crate) type Listing = Vec<(std::ffi::OsString, io::Result<fs::Metadata>)>;

/// The entries of `dir` sorted by name, each with its metadata (not following a symlink),
/// taken beside the directory's open descriptor (`DirEntry::metadata`) rather than by a walk
/// of its whole path. The directory is closed again before this returns: a walk that recurses
/// holds no descriptor per level.
pub(crate) fn read_dir_sorted(dir: &Path) -> io::Result<Listing> {
    let mut entries = fs::read_dir(dir)?
        .map(|e| e.map(|e| (e.file_name(), e.metadata())))
        .collect::<Result<Vec<_>, _>>()?;
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// The listings of the directories beneath `root` (by relative path, `""` for the root),
/// taken one depth at a time with the directories of each depth spread over a few threads: the
/// statx of every entry is most of a survey's time. Only what a survey would descend into is
/// listed (directories on `dev`, never through a symlink), and listing stops once more than
/// `max_entries` entries are seen, when the survey is bound to refuse the bundle anyway. A
/// directory that cannot be listed is left out, for the survey to list and report.
fn prefetch_listings(root: &Path, dev: u64, max_entries: u64) -> HashMap<PathBuf, Listing> {
    /// Directories per thread below which one thread lists them all.
    const MIN_DIRS_EACH: usize = 4;
    let mut out = HashMap::new();
    let mut depth = vec![PathBuf::new()];
    let mut seen = 0u64;
    while !depth.is_empty() && seen <= max_entries {
        let all: Vec<usize> = (0..depth.len()).collect();
        let listed = crate::parallel::in_parallel(&all, MIN_DIRS_EACH, |i| {
            Ok::<_, std::convert::Infallible>(read_dir_sorted(&root.join(&depth[i])).ok())
        });
        let Ok(listed) = listed;
        let mut next = Vec::new();
        for (i, items) in listed {
            let Some(items) = items else { continue };
            seen = seen.saturating_add(items.len() as u64);
            for (name, meta) in &items {
                if meta
                    .as_ref()
                    .is_ok_and(|m| m.file_type().is_dir() && m.dev() == dev)
                {
                    next.push(depth[i].join(name));
                }
            }
            out.insert(std::mem::take(&mut depth[i]), items);
        }
        depth = next;
    }
    out
}

/// [`read_dir_sorted`] of `rel_dir` beneath a directory bundle's `root`.
fn listing(root: &Path, rel_dir: &Path) -> Result<Listing, UnpackError> {
    let dir = root.join(rel_dir);
    read_dir_sorted(&dir).map_err(|source| UnpackError::Read { path: dir, source })
}

/// The refusal of a node that is neither file, directory nor symlink.
fn special_file(entry: String, m: &fs::Metadata) -> UnpackError {
    let kind = match m.mode() & S_IFMT {
        S_IFCHR => "character device",
        S_IFBLK => "block device",
        S_IFIFO => "FIFO",
        S_IFSOCK => "socket",
        _ => "node of a type bundles may not hold",
    };
    UnpackError::SpecialFile { entry, kind }
}

/// The canonical form of a path that does not exist yet: its nearest existing ancestor
/// resolved, the rest appended.
fn resolve_missing(path: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(path).ok()?;
    let mut rest = Vec::new();
    let mut at = abs.as_path();
    loop {
        if let Ok(real) = fs::canonicalize(at) {
            return Some(rest.iter().rev().fold(real, |p, c| p.join(c)));
        }
        rest.push(at.file_name()?);
        at = at.parent()?;
    }
}

fn open(src: &Path) -> Result<File, UnpackError> {
    File::open(src).map_err(|source| UnpackError::Read {
        path: src.to_path_buf(),
        source,
    })
}

/// A bundle entry's path, checked and normalized: relative, no `..`, no `.`, no empty parts.
/// `None` is the bundle root itself (`./`).
fn entry_rel(raw: &[u8]) -> Result<Option<PathBuf>, UnpackError> {
    let name = || quote_bytes(raw);
    if raw.contains(&0) {
        return Err(UnpackError::BadName { entry: name() });
    }
    if std::str::from_utf8(raw).is_err() {
        return Err(UnpackError::NotUtf8 { entry: name() });
    }
    if raw.first() == Some(&b'/') {
        return Err(UnpackError::AbsolutePath { entry: name() });
    }
    let mut rel = PathBuf::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(UnpackError::ParentDir { entry: name() }),
            p => rel.push(OsStr::from_bytes(p)),
        }
    }
    Ok(if rel.as_os_str().is_empty() {
        None
    } else {
        Some(rel)
    })
}

/// A bundle path fit for a message: quoted, escaped, cut.
fn display(rel: &Path) -> String {
    quote_bytes(rel.as_os_str().as_bytes())
}

/// What an archive entry is, once its type is known.
enum Kind {
    File,
    Dir,
    Symlink(Vec<u8>),
    HardLink(Vec<u8>),
    Special(&'static str),
}

/// The state of one unpack: counters, what was extracted, directory modes to set last.
struct Extractor<'a> {
    src: &'a Path,
    kind: BundleType,
    dest: &'a Path,
    policy: UnpackPolicy,
    out: Unpacked,
    entries: u64,
    declared: u64,
    /// Regular files extracted so far (relative), the only valid hard-link targets.
    files: HashSet<PathBuf>,
    /// Directories with their modes, set once everything is in (a read-only directory in the
    /// bundle must not stop its own contents from being written).
    dirs: Vec<(PathBuf, u32)>,
    /// Every path this unpack has placed something at. `dest` was made empty by this unpack
    /// and nothing else writes beneath it, so a path not in here is free without a look.
    placed: HashSet<PathBuf>,
    /// Directories known to be real directories (made or checked), whose contents need no
    /// second check of the way to them: a directory is never replaced (`clear_slot`).
    known_dirs: HashSet<PathBuf>,
    /// The device of the bundle a survey walks: an entry on another (a mount inside the
    /// bundle) needs a snapshot.
    survey_dev: u64,
    /// The directories a survey listed, by full path ([`Walked`]).
    walked: HashMap<PathBuf, Listing>,
    /// Listings a survey has taken ahead, on several threads, by path relative to the bundle
    /// ([`prefetch_listings`]); a directory not in here is listed when the survey reaches it.
    prefetched: HashMap<PathBuf, Listing>,
}

impl<'a> Extractor<'a> {
    fn new(src: &'a Path, kind: BundleType, dest: &'a Path, policy: UnpackPolicy) -> Self {
        Extractor {
            src,
            kind,
            dest,
            policy,
            out: Unpacked::default(),
            entries: 0,
            declared: 0,
            files: HashSet::new(),
            dirs: Vec::new(),
            placed: HashSet::new(),
            known_dirs: HashSet::new(),
            survey_dev: 0,
            prefetched: HashMap::new(),
            walked: HashMap::new(),
        }
    }

    fn corrupt(&self, detail: impl fmt::Display) -> UnpackError {
        // A cap hit deep inside a read surfaces as an I/O error; name it for what it is.
        if detail.to_string().contains(CAP_MESSAGE) {
            return UnpackError::TooLarge {
                entry: "(the archive stream)".to_string(),
                total: self.policy.max_total_bytes,
                limit: self.policy.max_total_bytes,
            };
        }
        UnpackError::Corrupt {
            path: self.src.to_path_buf(),
            kind: self.kind,
            detail: pier_protocol::quote::bounded(&detail.to_string(), MAX_DETAIL_CHARS),
        }
    }

    fn count_entry(&mut self, entry: &str) -> Result<(), UnpackError> {
        self.entries += 1;
        if self.entries > self.policy.max_entries {
            return Err(UnpackError::TooManyEntries {
                entry: entry.to_string(),
                limit: self.policy.max_entries,
            });
        }
        Ok(())
    }

    /// Adds a size the archive declares before any of it is written.
    fn declare(&mut self, entry: &str, size: u64) -> Result<(), UnpackError> {
        self.declared = self.declared.saturating_add(size);
        if self.declared > self.policy.max_total_bytes {
            return Err(UnpackError::TooLarge {
                entry: entry.to_string(),
                total: self.declared,
                limit: self.policy.max_total_bytes,
            });
        }
        Ok(())
    }

    /// Makes sure every ancestor of `rel` under `dest` is a real directory (creating missing
    /// ones), never a symlink; returns the full path of `rel`.
    fn parents(&mut self, rel: &Path, entry: &str) -> Result<PathBuf, UnpackError> {
        let mut at = self.dest.to_path_buf();
        let mut sofar = PathBuf::new();
        let comps: Vec<_> = rel.components().collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            at.push(c);
            sofar.push(c);
            if self.known_dirs.contains(&sofar) {
                continue;
            }
            if !self.placed.contains(&sofar) {
                // Nothing was put here yet: make it.
                fs::create_dir(&at).map_err(|source| UnpackError::Write {
                    path: at.clone(),
                    source,
                })?;
                self.dirs.push((at.clone(), 0o755));
                self.placed.insert(sofar.clone());
                self.known_dirs.insert(sofar.clone());
                continue;
            }
            match fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(UnpackError::ThroughSymlink {
                        entry: entry.to_string(),
                        symlink: display(&sofar),
                    })
                }
                Ok(_) => {
                    return Err(UnpackError::Conflict {
                        entry: entry.to_string(),
                        path: display(&sofar),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&at).map_err(|source| UnpackError::Write {
                        path: at.clone(),
                        source,
                    })?;
                    self.dirs.push((at.clone(), 0o755));
                }
                Err(source) => return Err(UnpackError::Write { path: at, source }),
            }
            self.known_dirs.insert(sofar.clone());
        }
        Ok(self.dest.join(rel))
    }

    /// Frees the final path for a new entry: a later non-directory entry replaces an earlier
    /// one (the old link itself is removed, never followed); kinds may not change to or from a
    /// directory. Returns whether a directory is already there.
    fn clear_slot(
        &mut self,
        full: &Path,
        rel: &Path,
        entry: &str,
        want_dir: bool,
    ) -> Result<bool, UnpackError> {
        // The caller places `rel` next.
        if self.placed.insert(rel.to_path_buf()) {
            return Ok(false);
        }
        match fs::symlink_metadata(full) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(UnpackError::Write {
                path: full.to_path_buf(),
                source,
            }),
            Ok(m) if m.file_type().is_dir() && want_dir => Ok(true),
            Ok(m) if m.file_type().is_dir() || want_dir => Err(UnpackError::Conflict {
                entry: entry.to_string(),
                path: display(rel),
            }),
            Ok(_) => {
                fs::remove_file(full).map_err(|source| UnpackError::Write {
                    path: full.to_path_buf(),
                    source,
                })?;
                self.files.remove(rel);
                self.out.digests.remove(rel);
                Ok(false)
            }
        }
    }

    /// Clears set-id bits from `mode`, reporting them; returns the bits to put on disk.
    fn strip_setid(&mut self, rel: &Path, mode: u32, type_bits: u32) -> u32 {
        if mode & SETID_BITS != 0 {
            self.out.setid_entries.push((
                rel.to_string_lossy().into_owned(),
                type_bits | (mode & 0o7777),
            ));
        }
        mode & KEPT_BITS
    }

    fn make_dir(&mut self, rel: &Path, entry: &str, mode: u32) -> Result<(), UnpackError> {
        let full = self.parents(rel, entry)?;
        if !self.clear_slot(&full, rel, entry, true)? {
            fs::create_dir(&full).map_err(|source| UnpackError::Write {
                path: full.clone(),
                source,
            })?;
        }
        let mode = self.strip_setid(rel, mode, S_IFDIR);
        self.dirs.push((full, mode));
        self.known_dirs.insert(rel.to_path_buf());
        Ok(())
    }

    fn make_symlink(&mut self, rel: &Path, entry: &str, target: &[u8]) -> Result<(), UnpackError> {
        if target.is_empty() || target.contains(&0) {
            return Err(UnpackError::BadName {
                entry: entry.to_string(),
            });
        }
        let full = self.parents(rel, entry)?;
        self.clear_slot(&full, rel, entry, false)?;
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &full).map_err(|source| {
            UnpackError::Write {
                path: full.clone(),
                source,
            }
        })
    }

    fn make_hardlink(&mut self, rel: &Path, entry: &str, target: &[u8]) -> Result<(), UnpackError> {
        let refused = || UnpackError::HardLink {
            entry: entry.to_string(),
            target: quote_bytes(target),
        };
        let trel = match entry_rel(target) {
            Ok(Some(t)) => t,
            _ => return Err(refused()),
        };
        if !self.files.contains(&trel) {
            return Err(refused());
        }
        let tfull = self.dest.join(&trel);
        // The set only holds paths whose ancestors were checked to be real directories, and a
        // directory can never be replaced later (clear_slot), so tfull resolves inside dest.
        match fs::symlink_metadata(&tfull) {
            Ok(m) if m.file_type().is_file() => {}
            _ => return Err(refused()),
        }
        let full = self.parents(rel, entry)?;
        if full == tfull {
            return Ok(());
        }
        self.clear_slot(&full, rel, entry, false)?;
        fs::hard_link(&tfull, &full).map_err(|source| UnpackError::Write {
            path: full.clone(),
            source,
        })?;
        self.files.insert(rel.to_path_buf());
        self.out.files += 1;
        // The link changed the inode's ctime: both names get the identity it has now.
        if let Some(mut d) = self.out.digests.get(&trel).cloned() {
            if let Ok(m) = fs::symlink_metadata(&full) {
                d.ident = FileIdent::of(&m);
                self.out.digests.insert(trel, d.clone());
                self.out.digests.insert(rel.to_path_buf(), d);
            }
        }
        Ok(())
    }

    /// Writes a regular file from `data`, counting the real bytes against the cap whatever the
    /// archive declared (a zip bomb lies about its sizes).
    fn make_file(
        &mut self,
        rel: &Path,
        entry: &str,
        mode: u32,
        data: &mut dyn Read,
    ) -> Result<(), UnpackError> {
        let full = self.parents(rel, entry)?;
        self.clear_slot(&full, rel, entry, false)?;
        let werr = |source| UnpackError::Write {
            path: full.clone(),
            source,
        };
        // create_new: O_EXCL never follows a symlink, so nothing is written through one.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&full)
            .map_err(werr)?;
        let mut hash = Sha256::new();
        crate::buffer::with(|buf| loop {
            let n = match data.read(buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.corrupt(format_args!("entry {entry}: {e}"))),
            };
            self.out.bytes += n as u64;
            if self.out.bytes > self.policy.max_total_bytes {
                return Err(UnpackError::TooLarge {
                    entry: entry.to_string(),
                    total: self.out.bytes,
                    limit: self.policy.max_total_bytes,
                });
            }
            f.write_all(&buf[..n]).map_err(werr)?;
            hash.update(&buf[..n]);
        })?;
        let mode = self.strip_setid(rel, mode, S_IFREG);
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(werr)?;
        let meta = f.metadata().map_err(werr)?;
        self.out.digests.insert(
            rel.to_path_buf(),
            Digest {
                sha256: hex::encode(hash.finalize()),
                ident: FileIdent::of(&meta),
                settled: false,
            },
        );
        self.files.insert(rel.to_path_buf());
        self.out.files += 1;
        Ok(())
    }

    /// Sets directory modes, deepest first, now that nothing more is written into them.
    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (p, mode) in dirs {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                .map_err(|source| UnpackError::Write { path: p, source })?;
        }
        Ok(())
    }

    fn tar<R: Read>(&mut self, reader: R) -> Result<(), UnpackError> {
        // Every byte the tar reader pulls is counted, not only file data: the tar crate reads
        // GNU long-name and pax headers whole into memory, so a small tgz declaring a huge one
        // would otherwise make the agent allocate gigabytes before any entry is seen.
        let cap = self
            .policy
            .max_total_bytes
            .saturating_add(self.policy.max_entries.saturating_mul(1024))
            .saturating_add(1 << 20);
        let capped = CappedReader {
            inner: reader,
            left: cap,
        };
        let src = self.src.to_path_buf();
        tar_stream::for_each_member(capped, |m| {
            let name = quote_bytes(m.name);
            let link = || m.link.unwrap_or_default().to_vec();
            let kind = match m.entry_type {
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse => Kind::File,
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Symlink => Kind::Symlink(link()),
                tar::EntryType::Link => Kind::HardLink(link()),
                tar::EntryType::Char => Kind::Special("character device"),
                tar::EntryType::Block => Kind::Special("block device"),
                tar::EntryType::Fifo => Kind::Special("FIFO"),
                _ => Kind::Special("node of a type bundles may not hold"),
            };
            self.count_entry(&name)?;
            self.entry(m.name, &name, kind, m.mode, m.size, m.data)
        })
        .map_err(|e| match e {
            UnpackError::Tar {
                source: TarError::Read(io),
                ..
            } => self.corrupt(io),
            e => e,
        })
        .map_err(|e| match e {
            UnpackError::Tar { source, .. } => UnpackError::Tar { path: src, source },
            e => e,
        })
    }

    /// Places one archive entry after its path and kind have been checked.
    fn entry(
        &mut self,
        raw: &[u8],
        name: &str,
        kind: Kind,
        mode: u32,
        size: u64,
        data: &mut dyn Read,
    ) -> Result<(), UnpackError> {
        if let Kind::Special(what) = kind {
            return Err(UnpackError::SpecialFile {
                entry: name.to_string(),
                kind: what,
            });
        }
        let Some(rel) = entry_rel(raw)? else {
            // The root itself ("./"): nothing to place; its mode is ours to choose.
            return Ok(());
        };
        match kind {
            Kind::File => {
                self.declare(name, size)?;
                self.make_file(&rel, name, mode, data)
            }
            Kind::Dir => self.make_dir(&rel, name, mode),
            Kind::Symlink(target) => self.make_symlink(&rel, name, &target),
            Kind::HardLink(target) => self.make_hardlink(&rel, name, &target),
            Kind::Special(_) => Ok(()),
        }
    }

    fn zip(&mut self, file: File) -> Result<(), UnpackError> {
        let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| self.corrupt(e))?;
        // The central directory declares every size up front: refuse before writing anything.
        let mut total = 0u64;
        for i in 0..zip.len() {
            let f = zip.by_index_raw(i).map_err(|e| self.corrupt(e))?;
            let name = quote_bytes(f.name_raw());
            let extra = f.extra_data().map_or(0, |d| d.len());
            for (what, len, limit) in [
                ("name", f.name_raw().len(), MAX_NAME_BYTES),
                ("extra field", extra, MAX_ZIP_EXTRA_BYTES),
            ] {
                if len as u64 > limit {
                    return Err(UnpackError::ZipField {
                        entry: name,
                        what,
                        len,
                        limit,
                    });
                }
            }
            if i as u64 >= self.policy.max_entries {
                return Err(UnpackError::TooManyEntries {
                    entry: name,
                    limit: self.policy.max_entries,
                });
            }
            total = total.saturating_add(f.size());
            if total > self.policy.max_total_bytes {
                return Err(UnpackError::TooLarge {
                    entry: name,
                    total,
                    limit: self.policy.max_total_bytes,
                });
            }
        }
        for i in 0..zip.len() {
            let mut f = zip.by_index(i).map_err(|e| self.corrupt(e))?;
            let raw = f.name().map_err(|e| self.corrupt(e))?.into_owned();
            let name = quote_bytes(raw.as_bytes());
            // The raw unix mode: the zip crate's unix_mode() drops set-id bits silently, and
            // they must be reported, not just lost.
            let unix = match (f.system(), f.external_attributes() >> 16) {
                (zip::System::Unix, raw) if raw != 0 => Some(raw),
                _ => f.unix_mode(),
            };
            let is_dir = f.is_dir();
            let size = f.size();
            let kind = match unix.map(|m| m & S_IFMT) {
                Some(S_IFLNK) => {
                    let mut target = Vec::new();
                    (&mut f)
                        .take(MAX_LINK_TARGET + 1)
                        .read_to_end(&mut target)
                        .map_err(|e| self.corrupt(format_args!("entry {name}: {e}")))?;
                    if target.len() as u64 > MAX_LINK_TARGET {
                        return Err(UnpackError::BadName { entry: name });
                    }
                    Kind::Symlink(target)
                }
                Some(S_IFDIR) => Kind::Dir,
                Some(S_IFCHR) => Kind::Special("character device"),
                Some(S_IFBLK) => Kind::Special("block device"),
                Some(S_IFIFO) => Kind::Special("FIFO"),
                Some(S_IFSOCK) => Kind::Special("socket"),
                _ if is_dir => Kind::Dir,
                _ => Kind::File,
            };
            let default_mode = if matches!(kind, Kind::Dir) {
                0o755
            } else {
                0o644
            };
            let mode = unix.map(|m| m & 0o7777).unwrap_or(default_mode);
            self.count_entry(&name)?;
            self.entry(raw.as_bytes(), &name, kind, mode, size, &mut f)?;
        }
        Ok(())
    }

    /// Reproduces a directory tree: hard links for files (a copy when linking fails, e.g.
    /// across filesystems, and for set-id files, whose bits must not be cleared on the source),
    /// never following a symlink.
    fn directory(&mut self) -> Result<(), UnpackError> {
        let meta = fs::metadata(self.src).map_err(|source| UnpackError::Read {
            path: self.src.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(self.corrupt("not a directory"));
        }
        let mut links = Vec::new();
        self.walk(PathBuf::new(), &mut links)?;
        self.link_all(links)
    }

    /// Makes the hard links the walk collected (their directories exist), on a few threads when
    /// there are many: each is one `linkat`, independent of the others. A file that cannot be
    /// linked (another filesystem) is copied instead, here, after the others.
    fn link_all(&mut self, links: Vec<(PathBuf, fs::Metadata)>) -> Result<(), UnpackError> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        const PER_WORKER: usize = 256;
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(4)
            .min(links.len() / PER_WORKER + 1);
        let (src, dest) = (self.src, self.dest);
        let link = |(rel, _): &(PathBuf, fs::Metadata)| {
            fs::hard_link(src.join(rel), dest.join(rel)).is_ok()
        };
        let linked: Vec<bool> = if workers <= 1 {
            links.iter().map(link).collect()
        } else {
            let next = AtomicUsize::new(0);
            let done: Vec<std::sync::atomic::AtomicBool> =
                links.iter().map(|_| Default::default()).collect();
            std::thread::scope(|scope| {
                for _ in 0..workers {
                    scope.spawn(|| loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(l) = links.get(k) else { break };
                        done[k].store(link(l), Ordering::Relaxed);
                    });
                }
            });
            done.into_iter().map(|d| d.into_inner()).collect()
        };
        for ((rel, m), ok) in links.into_iter().zip(linked) {
            if !ok {
                let name = display(&rel);
                let mut f = open_same_file(&self.src.join(&rel), &m)?;
                // The walk claimed the slot and counted the file; the copy does both again.
                self.placed.remove(&rel);
                self.out.bytes -= m.len();
                self.out.files -= 1;
                self.make_file(&rel, &name, m.mode() & 0o7777, &mut f)?;
            }
        }
        Ok(())
    }

    /// One entry of a directory bundle's listing, checked as both walks check it, in this
    /// order: a UTF-8 name, its metadata, the entry cap. Returns its path beneath the bundle
    /// root, its name for messages and its metadata.
    fn entry_of(
        &mut self,
        root: &Path,
        rel_dir: &Path,
        (n, meta): (std::ffi::OsString, io::Result<fs::Metadata>),
    ) -> Result<(PathBuf, String, fs::Metadata), UnpackError> {
        let rel = rel_dir.join(&n);
        let name = display(&rel);
        if n.to_str().is_none() {
            return Err(UnpackError::NotUtf8 { entry: name });
        }
        let m = meta.map_err(|source| UnpackError::Read {
            path: root.join(&rel),
            source,
        })?;
        self.count_entry(&name)?;
        Ok((rel, name, m))
    }

    /// The checks [`Extractor::walk`] makes of a directory bundle, in the same order with the
    /// same refusals, placing nothing: counts what it would place into `self.out`. Some(why)
    /// at the first entry that needs a snapshot ([`survey_directory`]).
    fn survey(&mut self, root: &Path, rel_dir: PathBuf) -> Result<Option<String>, UnpackError> {
        let items = match self.prefetched.remove(&rel_dir) {
            Some(items) => items,
            None => listing(root, &rel_dir)?,
        };
        let mut kept: Listing = Vec::with_capacity(items.len());
        for item in items {
            let file_name = item.0.clone();
            let (rel, name, m) = self.entry_of(root, &rel_dir, item)?;
            kept.push((file_name, Ok(m.clone())));
            let ft = m.file_type();
            if m.dev() != self.survey_dev && (ft.is_dir() || ft.is_file()) {
                return Ok(Some(format!("{name} is on another filesystem")));
            }
            if ft.is_dir() {
                if let Some(why) = not_agents_own(&m) {
                    return Ok(Some(format!("{name} {why}")));
                }
                if let Some(why) = self.survey(root, rel)? {
                    return Ok(Some(why));
                }
            } else if ft.is_symlink() {
                return Ok(Some(format!("{name} is a symlink")));
            } else if ft.is_file() {
                self.declare(&name, m.len())?;
                if let Some(why) = not_agents_own(&m) {
                    return Ok(Some(format!("{name} {why}")));
                }
                self.out.bytes += m.len();
                self.out.files += 1;
            } else {
                return Err(special_file(name, &m));
            }
        }
        let dir = if rel_dir.as_os_str().is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel_dir)
        };
        self.walked.insert(dir, kept);
        Ok(None)
    }

    fn walk(
        &mut self,
        rel_dir: PathBuf,
        links: &mut Vec<(PathBuf, fs::Metadata)>,
    ) -> Result<(), UnpackError> {
        let rerr = |path: &Path| {
            let path = path.to_path_buf();
            move |source| UnpackError::Read { path, source }
        };
        for item in listing(self.src, &rel_dir)? {
            let (rel, name, m) = self.entry_of(self.src, &rel_dir, item)?;
            let path = self.src.join(&rel);
            let ft = m.file_type();
            let mode = m.mode() & 0o7777;
            if ft.is_dir() {
                self.make_dir(&rel, &name, mode)?;
                self.walk(rel, links)?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(rerr(&path))?;
                self.make_symlink(&rel, &name, target.as_os_str().as_bytes())?;
            } else if ft.is_file() {
                self.declare(&name, m.len())?;
                // A hard link shares the inode with the bundle: only for a file nobody but
                // the agent's user can change afterwards (owned by it, not group- or
                // world-writable); any other is copied, so a script checked now is the script
                // run later.
                let linkable = mode & SETID_BITS == 0
                    && mode & 0o022 == 0
                    && m.uid() == crate::install::agent_ids().0;
                if !linkable {
                    let mut f = open_same_file(&path, &m)?;
                    self.make_file(&rel, &name, mode, &mut f)?;
                } else {
                    // Linked once the walk is done (link_all); counted now, so the caps hold
                    // before anything is linked.
                    let full = self.parents(&rel, &name)?;
                    self.clear_slot(&full, &rel, &name, false)?;
                    self.out.bytes += m.len();
                    if self.out.bytes > self.policy.max_total_bytes {
                        return Err(UnpackError::TooLarge {
                            entry: name,
                            total: self.out.bytes,
                            limit: self.policy.max_total_bytes,
                        });
                    }
                    self.files.insert(rel.clone());
                    self.out.files += 1;
                    links.push((rel, m));
                }
            } else {
                return Err(special_file(name, &m));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_bundle_refused_and_host_failures_are_not() {
        for bad in [&b"a/../../x"[..], b"/etc/passwd", b"a\0b"] {
            let err = entry_rel(bad).unwrap_err();
            assert_eq!(err.error_code(), ErrorCode::BundleRefused, "{err}");
        }
        let full = UnpackError::Write {
            path: "/x".into(),
            source: io::Error::other("No space left on device"),
        };
        assert_eq!(full.error_code(), ErrorCode::UnknownError);
        let exists = UnpackError::DestExists { dest: "/x".into() };
        assert_eq!(exists.error_code(), ErrorCode::UnknownError);
    }

    #[test]
    fn entry_paths_are_normalized_and_checked() {
        assert_eq!(
            entry_rel(b"./a//b/./c").unwrap(),
            Some(PathBuf::from("a/b/c"))
        );
        assert_eq!(entry_rel(b"./").unwrap(), None);
        assert!(matches!(
            entry_rel(b"a/../../x"),
            Err(UnpackError::ParentDir { .. })
        ));
        assert!(matches!(
            entry_rel(b"/etc/passwd"),
            Err(UnpackError::AbsolutePath { .. })
        ));
        assert!(matches!(
            entry_rel(b"a\0b"),
            Err(UnpackError::BadName { .. })
        ));
    }

    #[test]
    fn bundle_type_names_round_trip() {
        for t in [
            BundleType::Directory,
            BundleType::Tar,
            BundleType::Tgz,
            BundleType::Zip,
        ] {
            assert_eq!(t.to_string().parse::<BundleType>().unwrap(), t);
        }
        assert!("rar".parse::<BundleType>().is_err());
    }
}
