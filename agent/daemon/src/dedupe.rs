//! The dedupe store: which deployments this host has already taken, persisted, so that a
//! redelivered or duplicated command (SQS delivers at least once) never runs twice, even
//! across restarts.
//!
//! One small file per deployment id under a directory, holding `in-progress` or `done`,
//! written atomically; one file per id keeps every update atomic without rewriting a shared
//! set. [`Dedupe::begin`] claims an id; a claim is exclusive within the process (a mutex) and
//! on disk (the file), so two deliveries of one command racing each other run it once.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use pier_protocol::InvalidId;

/// Why the dedupe store could not answer or record.
#[derive(Debug, thiserror::Error)]
pub enum DedupeError {
    /// A file operation on the store failed.
    #[error("dedupe store: cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The deployment id is not one the id rule allows, so it cannot name a file.
    #[error("deployment id cannot be recorded: {0}")]
    Id(#[from] InvalidId),
}

impl DedupeError {
    fn io(op: &'static str, path: &Path, source: std::io::Error) -> DedupeError {
        DedupeError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), DedupeError> {
    pier_sys::atomic_write(path, bytes).map_err(|e| DedupeError::io("write", path, e))
}

/// What the store knows about a deployment id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Taken and not finished (running now, or the agent stopped while it ran).
    InProgress,
    /// Finished, whatever the outcome.
    Done,
}

/// A persisted set of deployment ids.
#[derive(Debug)]
pub struct Dedupe {
    dir: PathBuf,
    lock: Mutex<()>,
}

impl Dedupe {
    /// Opens (creating) the store at `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Dedupe, DedupeError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| DedupeError::io("create", &dir, e))?;
        Ok(Dedupe {
            dir,
            lock: Mutex::new(()),
        })
    }

    fn path(&self, deployment_id: &str) -> Result<PathBuf, DedupeError> {
        // Ids are checked by the protocol, but this store must not trust its callers with
        // paths: the one id rule keeps every name a plain file name.
        pier_protocol::check_id(deployment_id)?;
        Ok(self.dir.join(deployment_id))
    }

    /// What is recorded for `deployment_id`, if anything.
    pub(crate) fn get(&self, deployment_id: &str) -> Result<Option<Seen>, DedupeError> {
        read_state(&self.path(deployment_id)?)
    }

    /// Claims `deployment_id`: records it in progress and returns `None` when it was never
    /// seen; otherwise leaves the store alone and returns what was recorded (the caller must
    /// not run it again).
    pub fn begin(&self, deployment_id: &str) -> Result<Option<Seen>, DedupeError> {
        let path = self.path(deployment_id)?;
        let _guard = self.lock.lock().expect("dedupe lock poisoned");
        if let Some(seen) = read_state(&path)? {
            return Ok(Some(seen));
        }
        atomic_write(&path, b"in-progress\n")?;
        Ok(None)
    }

    /// Records `deployment_id` as finished.
    pub fn finish(&self, deployment_id: &str) -> Result<(), DedupeError> {
        let path = self.path(deployment_id)?;
        let _guard = self.lock.lock().expect("dedupe lock poisoned");
        atomic_write(&path, b"done\n")
    }

    /// Forgets finished deployments recorded at least `older_than` ago, so the store stays
    /// small on a host that deploys for years; in-progress entries are always kept. A
    /// redelivery older than SQS's retention (at most 14 days) cannot happen, so a month is
    /// a safe age. Returns how many were removed.
    pub(crate) fn prune_done(&self, older_than: Duration) -> Result<usize, DedupeError> {
        let _guard = self.lock.lock().expect("dedupe lock poisoned");
        let now = SystemTime::now();
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| DedupeError::io("list", &self.dir, e))?;
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| DedupeError::io("list", &self.dir, e))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.')
                || read_state(&path)? != Some(Seen::Done)
            {
                continue;
            }
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            if age >= older_than {
                std::fs::remove_file(&path).map_err(|e| DedupeError::io("remove", &path, e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The ids recorded in progress (for the daemon at start: deployments a previous run did
    /// not finish).
    pub fn in_progress(&self) -> Result<Vec<String>, DedupeError> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| DedupeError::io("list", &self.dir, e))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| DedupeError::io("list", &self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if read_state(&entry.path())? == Some(Seen::InProgress) {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }
}

fn read_state(path: &Path) -> Result<Option<Seen>, DedupeError> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim() == "done" => Ok(Some(Seen::Done)),
        // Anything else written there means it was at least taken.
        Ok(_) => Ok(Some(Seen::InProgress)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DedupeError::io("read", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_once_and_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let d = Dedupe::open(tmp.path()).unwrap();
        assert_eq!(d.begin("d-1").unwrap(), None);
        assert_eq!(d.begin("d-1").unwrap(), Some(Seen::InProgress));
        assert_eq!(d.in_progress().unwrap(), vec!["d-1".to_string()]);
        d.finish("d-1").unwrap();
        drop(d);
        let d = Dedupe::open(tmp.path()).unwrap();
        assert_eq!(d.begin("d-1").unwrap(), Some(Seen::Done));
        assert_eq!(d.get("d-2").unwrap(), None);
        assert!(d.in_progress().unwrap().is_empty());
        assert!(d.begin("../x").is_err());
        d.begin("d-3").unwrap();
        assert_eq!(
            d.prune_done(Duration::ZERO).unwrap(),
            1,
            "only the finished one"
        );
        assert_eq!(d.get("d-1").unwrap(), None);
        assert_eq!(d.get("d-3").unwrap(), Some(Seen::InProgress));
        assert_eq!(d.prune_done(Duration::from_secs(3600)).unwrap(), 0);
    }
}
