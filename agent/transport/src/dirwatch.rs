//! Waiting for files to arrive in a directory, woken by the kernel (inotify) instead of a
//! timer, so that a process waiting on an empty directory costs nothing until something
//! happens there.
//!
//! A [`DirWatch`] watches one directory for entries that arrive (renamed in, or written and
//! closed) and any number of others for entries that leave (renamed out, deleted). It says
//! only *that* something may have changed, never what: its user scans the directory, which
//! stays the truth. The order that loses nothing is arm first, then scan, then wait: an entry
//! that arrives after the watch is armed either is seen by the scan or wakes the wait.
//! Whether the watched directory is still the one at its path ([`DirWatch::is_current`]) is
//! for the caller to check before each scan, so that a directory deleted, moved away or
//! replaced under the same path gets a new watch.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InotifyEvent, WatchDescriptor};
use pier_sys::inotify::AsyncInotify;

/// What a wait saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Something may have arrived or left: scan.
    Changed,
    /// A watched directory itself was deleted, moved or unmounted: arm a new watch.
    Lost,
}

/// An inotify instance with its watches, registered with the tokio reactor.
#[derive(Debug)]
pub(crate) struct DirWatch {
    inotify: AsyncInotify,
    /// The directory entries arrive in.
    dir: PathBuf,
    /// Its watch descriptor (events on the other watches are departures).
    arrivals: WatchDescriptor,
    /// `(device, inode)` of `dir` when armed: a directory replaced under the same path
    /// has another.
    identity: (u64, u64),
}

impl DirWatch {
    /// Watches `dir` for arrivals and each of `departures` for entries that leave. Must be
    /// called within a tokio runtime with I/O enabled. Fails when inotify is unavailable
    /// (no kernel support, or the user's limit of instances or watches is reached) or a
    /// directory does not exist.
    pub(crate) fn arm(dir: &Path, departures: &[PathBuf]) -> std::io::Result<DirWatch> {
        let inotify = AsyncInotify::new()?;
        let gone = AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF;
        let arrivals = inotify.add_watch(
            dir,
            AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_ONLYDIR
                | gone,
        )?;
        for d in departures {
            inotify.add_watch(
                d,
                AddWatchFlags::IN_MOVED_FROM
                    | AddWatchFlags::IN_DELETE
                    | AddWatchFlags::IN_ONLYDIR
                    | gone,
            )?;
        }
        // The identity is taken after the watch: if the directory was replaced in between,
        // the next is_current says so and the caller arms again.
        let identity = identity_of(dir)?;
        Ok(DirWatch {
            inotify,
            dir: dir.to_path_buf(),
            arrivals,
            identity,
        })
    }

    /// Whether the directory at the watched path is still the one watched.
    pub(crate) fn is_current(&self) -> bool {
        identity_of(&self.dir).is_ok_and(|id| id == self.identity)
    }

    /// Reads the events queued so far without waiting: `Some(Lost)` when one says a watched
    /// directory is gone, else `Some(Changed)` when any matters, `None` when none does.
    pub(crate) fn drain(&self) -> std::io::Result<Option<Change>> {
        let mut seen = None;
        loop {
            let events = self.inotify.read_now()?;
            if events.is_empty() {
                return Ok(seen);
            }
            seen = worst(seen, self.classify(&events));
        }
    }

    /// Waits until an event that matters arrives.
    pub(crate) async fn wait(&self) -> std::io::Result<Change> {
        loop {
            let events = self.inotify.read().await?;
            if let Some(change) = self.classify(&events) {
                // Whatever else is queued is covered by the scan that follows.
                return Ok(worst(Some(change), self.drain()?).unwrap_or(change));
            }
        }
    }

    /// What a batch of events means for the scan: a name that is not a command (a dotfile,
    /// a `*.tmp` being written) arriving changes nothing.
    fn classify(&self, events: &[InotifyEvent]) -> Option<Change> {
        let lost = AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_IGNORED
            | AddWatchFlags::IN_UNMOUNT;
        let mut seen = None;
        for e in events {
            let change = if e.mask.intersects(lost) {
                Some(Change::Lost)
            } else if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                // Events were dropped: only a scan can tell what happened.
                Some(Change::Changed)
            } else if e.wd == self.arrivals {
                e.name
                    .as_deref()
                    .is_some_and(may_be_command)
                    .then_some(Change::Changed)
            } else {
                Some(Change::Changed)
            };
            seen = worst(seen, change);
        }
        seen
    }
}

/// Whether an entry of this name may be a command (the spool's rule: not a dotfile, not a
/// `*.tmp`).
pub(crate) fn may_be_command(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    !name.starts_with('.') && !name.ends_with(".tmp")
}

fn worst(a: Option<Change>, b: Option<Change>) -> Option<Change> {
    match (a, b) {
        (Some(Change::Lost), _) | (_, Some(Change::Lost)) => Some(Change::Lost),
        (Some(c), _) | (_, Some(c)) => Some(c),
        (None, None) => None,
    }
}

fn identity_of(dir: &Path) -> std::io::Result<(u64, u64)> {
    let meta = std::fs::metadata(dir)?;
    Ok((meta.dev(), meta.ino()))
}
