//! The local spool queue: a directory that commands are dropped into, for a single host with
//! no cloud (the default transport when no queue is configured).
//!
//! A writer creates the command file elsewhere (or as a dotfile / `*.tmp` in the spool) and
//! renames it in, so the agent never reads half a file; [`Spool::submit`] does exactly that.
//! Every regular file in the spool directory that is not a dotfile or `*.tmp` is a command,
//! taken oldest first. Taking one renames it into `processing/` (atomic, so two agents cannot
//! both take it, and a restarted agent finds it again); [`Queue::ack`] moves it to `done/`,
//! [`Queue::reject`] to `rejected/` beside a `NAME.reason` file saying why. The directory is
//! polled every 200 ms, which is prompt enough for a human and costs nothing.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::{
    atomic_write, blocking, requests, sync_dir, BoxFuture, Queue, Received, TransportError,
};

/// How often the spool directory is scanned while a receive waits.
const POLL: Duration = Duration::from_millis(200);
/// At most this many commands per receive, like SQS.
const MAX_MESSAGES: usize = 10;

/// A spool directory and its `processing/`, `done/` and `rejected/` subdirectories.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    /// Files found in `processing/` at open: taken before a restart, handed out again first.
    recovered: Mutex<VecDeque<PathBuf>>,
}

impl Spool {
    /// Opens (creating if needed) the spool at `dir`. Commands left in `processing/` by an
    /// earlier run are returned by the first [`Queue::receive`] calls.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Spool, TransportError> {
        let dir = dir.into();
        for sub in ["", "processing", "done", "rejected"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| TransportError::io("create", &d, e))?;
        }
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
        })
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
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name.ends_with(".tmp") {
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
            loop {
                let dir = self.dir.clone();
                let found = blocking(move || take_new(&dir)).await?;
                if !found.is_empty() || tokio::time::Instant::now() >= deadline {
                    return Ok(found);
                }
                tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + POLL)).await;
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
