//! The local spool queue: a directory that commands are dropped into, for a single host with
//! no cloud (the default transport when no queue is configured).
//!
//! A writer creates the command file elsewhere (or as a dotfile / `*.tmp` in the spool) and
//! renames it in, so the agent never reads half a file; [`Spool::submit`] does exactly that.
//! Every regular file in the spool directory that is not a dotfile or `*.tmp` is a command,
//! taken oldest first. Taking one renames it into `processing/` (atomic, so two agents cannot
//! both take it, and a restarted agent finds it again); [`Queue::ack`] moves it to `done/`,
//! [`Queue::reject`] to `rejected/` beside a `NAME.reason` file saying why.
//!
//! A receive that finds nothing waits for the kernel to say the directory changed (inotify,
//! through [`crate::dirwatch`]), not for a timer: an idle agent on a spool does nothing
//! until a command arrives, and takes it the moment it is renamed in. The watch is armed
//! before the directory is scanned, so a command that arrives in between is not missed; it
//! also covers `processing/`, so that a command waiting for a same-named one to finish is
//! taken when that one leaves; and a spool directory deleted or replaced under its path is
//! recreated and watched again. Every receive starts with a scan, so a change inotify cannot
//! see (a spool on a network filesystem written from another machine) is still found within
//! one receive's wait. Where inotify is unavailable (no kernel support, the user's limit of
//! instances or watches reached) the spool says so once and scans every
//! [`FALLBACK_POLL`] instead.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::dirwatch::{may_be_command, Change, DirWatch};
use super::{
    atomic_write, blocking, requests, sync_dir, BoxFuture, Queue, Received, TransportError,
};

/// How often the spool directory is scanned while a receive waits, when inotify is
/// unavailable.
pub const FALLBACK_POLL: Duration = Duration::from_secs(5);
/// At most this many commands per receive, like SQS.
const MAX_MESSAGES: usize = 10;
/// The spool's subdirectories.
const SUBDIRS: [&str; 3] = ["processing", "done", "rejected"];

/// A spool directory and its `processing/`, `done/` and `rejected/` subdirectories.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    /// Files found in `processing/` at open: taken before a restart, handed out again first.
    recovered: Mutex<VecDeque<PathBuf>>,
    /// What wakes a receive that found nothing. An async lock: a receive holds it while it
    /// waits (the daemon has one receive at a time; a second waits its turn).
    waker: tokio::sync::Mutex<Waker>,
    /// How often to scan when inotify cannot be used.
    fallback_poll: Duration,
}

/// How a waiting receive learns that the spool changed.
#[derive(Debug)]
enum Waker {
    /// No watch yet (one is armed by the next receive, inside the runtime), or the last one
    /// was lost with its directory.
    Unarmed,
    /// The kernel tells.
    Watching(DirWatch),
    /// A timer: inotify is unavailable, or turned off ([`Spool::without_inotify`]).
    Polling,
}

impl Spool {
    /// Opens (creating if needed) the spool at `dir`. Commands left in `processing/` by an
    /// earlier run are returned by the first [`Queue::receive`] calls.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Spool, TransportError> {
        let dir = dir.into();
        create_dirs(&dir)?;
        let recovered = commands_in(&dir.join("processing"))?;
        if !recovered.is_empty() {
            log::warn!(
                "spool {}: {} command(s) were being processed when the agent stopped; \
                 taking them again",
                dir.display(),
                recovered.len()
            );
        }
        Ok(Spool {
            dir,
            recovered: Mutex::new(recovered.into()),
            waker: tokio::sync::Mutex::new(Waker::Unarmed),
            fallback_poll: FALLBACK_POLL,
        })
    }

    /// Sets how often a waiting receive scans when inotify is unavailable (default
    /// [`FALLBACK_POLL`]).
    pub fn with_fallback_poll(mut self, every: Duration) -> Spool {
        self.fallback_poll = every;
        self
    }

    /// Never uses inotify: a waiting receive scans every fallback interval, as it does where
    /// inotify is unavailable. For tests of that path.
    pub fn without_inotify(self) -> Spool {
        Spool {
            waker: tokio::sync::Mutex::new(Waker::Polling),
            ..self
        }
    }

    /// Drops a command into the spool at `dir` as `NAME` (a temp file renamed in, so the agent
    /// never sees it half-written). `name` is `ID.json`, where `ID` (the deployment id, by
    /// the controller's convention) follows the one id rule ([`pier_protocol::check_id`]).
    pub fn submit(dir: &Path, name: &str, body: &[u8]) -> Result<PathBuf, TransportError> {
        let id = name.strip_suffix(".json").unwrap_or("");
        if let Err(e) = pier_protocol::check_id(id) {
            return Err(TransportError::Config(format!(
                "spool file name must be ID.json with a valid id: {e}"
            )));
        }
        requests::record("Spool.Submit");
        let path = dir.join(name);
        atomic_write(&path, body)?;
        Ok(path)
    }

    fn take_recovered(&self) -> Result<Vec<Received>, TransportError> {
        let mut q = self.recovered.lock().expect("spool lock poisoned");
        let mut out = Vec::new();
        while out.len() < MAX_MESSAGES {
            let Some(path) = q.pop_front() else { break };
            match std::fs::read(&path) {
                Ok(body) => out.push(received(&path, body, 2)),
                // Acked or rejected in the meantime by another handle: nothing to redo.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(TransportError::io("read", &path, e)),
            }
        }
        Ok(out)
    }

    fn finish(&self, msg: &Received, sub: &str) -> Result<PathBuf, TransportError> {
        let from = PathBuf::from(&msg.receipt);
        let to_dir = self.dir.join(sub);
        let to = to_dir.join(&msg.id);
        std::fs::rename(&from, &to).map_err(|e| TransportError::io("move", &from, e))?;
        sync_dir(&to_dir)?;
        Ok(to)
    }
}

/// Creates the spool directory and its subdirectories where missing.
fn create_dirs(dir: &Path) -> Result<(), TransportError> {
    std::fs::create_dir_all(dir).map_err(|e| TransportError::io("create", dir, e))?;
    for sub in SUBDIRS {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| TransportError::io("create", &d, e))?;
    }
    Ok(())
}

impl Spool {
    /// Makes `waker` ready for a scan: a watch armed on the directory that is at the spool's
    /// path now (recreating the directories when they were deleted), or the timer when
    /// inotify cannot be used. Events already queued are dropped: the scan that follows sees
    /// what they were about.
    fn arm(&self, waker: &mut Waker) -> Result<(), TransportError> {
        if let Waker::Watching(watch) = waker {
            let lost = !watch.is_current()
                || watch
                    .drain()
                    .map_err(|e| TransportError::io("read inotify events of", &self.dir, e))?
                    == Some(Change::Lost);
            if !lost {
                return Ok(());
            }
            log::warn!(
                "spool {}: the directory was removed or replaced; watching the one there now",
                self.dir.display()
            );
            *waker = Waker::Unarmed;
        }
        if !matches!(waker, Waker::Unarmed) {
            return Ok(());
        }
        // A missing spool directory is not made again here: whoever removed it may be about
        // to put another in its place. Until then a receive fails (the daemon retries it).
        std::fs::metadata(&self.dir).map_err(|e| TransportError::io("find", &self.dir, e))?;
        create_dirs(&self.dir)?;
        match DirWatch::arm(&self.dir, &[self.dir.join("processing")]) {
            Ok(watch) => *waker = Waker::Watching(watch),
            Err(e) => {
                log::warn!(
                    "spool {}: cannot watch it with inotify ({e}); scanning it every {}s instead",
                    self.dir.display(),
                    self.fallback_poll.as_secs_f64()
                );
                *waker = Waker::Polling;
            }
        }
        Ok(())
    }
}

impl Spool {
    /// Takes the commands ready in the spool. Listing an empty directory is a few system
    /// calls, made here; taking what it found (renames, an fsync) goes to the blocking pool,
    /// so an idle receive starts no thread.
    async fn scan(&self) -> Result<Vec<Received>, TransportError> {
        if commands_in(&self.dir)?.is_empty() {
            return Ok(Vec::new());
        }
        let dir = self.dir.clone();
        blocking(move || take_new(&dir)).await
    }
}

/// Takes the ready commands: each renamed into `processing/`, then read.
fn take_new(dir: &Path) -> Result<Vec<Received>, TransportError> {
    let processing = dir.join("processing");
    let mut out = Vec::new();
    for path in commands_in(dir)? {
        if out.len() >= MAX_MESSAGES {
            break;
        }
        let name = path.file_name().expect("a listed file has a name");
        let target = processing.join(name);
        // Never over a command of the same name still in processing/: that one is running,
        // and replacing its file would lose it. The new one waits until the name is free.
        match nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &path,
            nix::fcntl::AT_FDCWD,
            &target,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => {}
            // Another agent on the same spool took it first.
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(nix::errno::Errno::EEXIST) => {
                // Checked at every poll: debug, not to flood the log.
                log::debug!(
                    "spool: {} waits: a command of the same name is still in processing/",
                    path.display()
                );
                continue;
            }
            Err(e) => {
                return Err(TransportError::io(
                    "move into processing/",
                    &path,
                    std::io::Error::from(e),
                ))
            }
        }
        sync_dir(&processing)?;
        let body = std::fs::read(&target).map_err(|e| TransportError::io("read", &target, e))?;
        out.push(received(&target, body, 1));
    }
    Ok(out)
}

fn received(path: &Path, body: Vec<u8>, receive_count: u32) -> Received {
    Received {
        id: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        body,
        receive_count,
        receipt: path.to_string_lossy().into_owned(),
    }
}

/// The command files directly in `dir`, oldest first (then by name): regular files that are
/// not dotfiles and not `*.tmp`.
fn commands_in(dir: &Path) -> Result<Vec<PathBuf>, TransportError> {
    let entries = std::fs::read_dir(dir).map_err(|e| TransportError::io("list", dir, e))?;
    let mut found: Vec<(SystemTime, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| TransportError::io("list", dir, e))?;
        if !may_be_command(&entry.file_name()) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        found.push((
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            entry.path(),
        ));
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

impl Queue for Spool {
    fn receive(&self, wait: Duration) -> BoxFuture<'_, Vec<Received>> {
        Box::pin(async move {
            let recovered = self.take_recovered()?;
            if !recovered.is_empty() {
                return Ok(recovered);
            }
            let deadline = tokio::time::Instant::now() + wait;
            let mut waker = self.waker.lock().await;
            loop {
                // Arm, then scan: a command renamed in after the scan wakes the wait below.
                self.arm(&mut waker)?;
                let found = self.scan().await?;
                if !found.is_empty() {
                    return Ok(found);
                }
                let woken = match &*waker {
                    Waker::Watching(watch) => tokio::select! {
                        change = watch.wait() => Some(change),
                        _ = tokio::time::sleep_until(deadline) => None,
                    },
                    Waker::Polling => {
                        let next = tokio::time::Instant::now() + self.fallback_poll;
                        tokio::time::sleep_until(deadline.min(next)).await;
                        Some(Ok(Change::Changed))
                    }
                    Waker::Unarmed => Some(Ok(Change::Lost)),
                };
                match woken {
                    // Nothing arrived in time; the next receive starts with a scan.
                    None => return Ok(Vec::new()),
                    Some(Ok(Change::Lost)) => *waker = Waker::Unarmed,
                    Some(Ok(Change::Changed)) => {}
                    Some(Err(e)) => {
                        // The watch is unusable: a new one is armed after a pause (a
                        // failing one must not make this loop spin).
                        log::warn!("spool {}: inotify: {e}", self.dir.display());
                        *waker = Waker::Unarmed;
                        let next = tokio::time::Instant::now() + self.fallback_poll;
                        tokio::time::sleep_until(deadline.min(next)).await;
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    // One more scan at the deadline, for what the wake-up was about.
                    self.arm(&mut waker)?;
                    return self.scan().await;
                }
            }
        })
    }

    fn extend<'a>(&'a self, msg: &'a Received, _visibility: Duration) -> BoxFuture<'a, ()> {
        // Nothing expires in a spool: a file in processing/ stays taken until acked. Check it
        // is still there so a daemon notices if someone removed it.
        Box::pin(async move {
            let path = PathBuf::from(&msg.receipt);
            std::fs::metadata(&path)
                .map(|_| ())
                .map_err(|e| TransportError::io("find", &path, e))
        })
    }

    fn ack<'a>(&'a self, msg: &'a Received) -> BoxFuture<'a, ()> {
        Box::pin(async move { self.finish(msg, "done").map(|_| ()) })
    }

    fn reject<'a>(&'a self, msg: &'a Received, reason: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            log::warn!(
                "rejecting spool command {} in {}: {reason}; moved to rejected/",
                msg.id,
                self.dir.display()
            );
            // The reason first, so a reader who sees the command in rejected/ finds it.
            let reason_path = self.dir.join("rejected").join(format!("{}.reason", msg.id));
            let text = format!("{reason}\n");
            blocking(move || atomic_write(&reason_path, text.as_bytes())).await?;
            self.finish(msg, "rejected").map(|_| ())
        })
    }

    fn describe(&self) -> String {
        format!("spool {}", self.dir.display())
    }
}
