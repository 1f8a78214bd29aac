//! The deployment root on disk: its layout, the per-group state (last successful deployment,
//! manifest of the last Install, the group lock), each deployment's journal, and retention.
//!
//! ```text
//! ROOT/groups/GROUP_ID/lock                        flock: one deployment at a time per group
//! ROOT/groups/GROUP_ID/last-successful.json        the group's last successful deployment
//! ROOT/groups/GROUP_ID/install-manifest.json       what the group's last Install placed
//! ROOT/groups/GROUP_ID/install-intent.json         only while an Install is unfinished
//! ROOT/groups/GROUP_ID/deployments/ID/journal.json event progress of one deployment
//! ROOT/groups/GROUP_ID/deployments/ID/revision/    the unpacked revision (kept once)
//! ROOT/groups/GROUP_ID/deployments/ID/logs/scripts.log
//! ```
//!
//! Every write goes through [`pier_sys::atomic_write`]: a temp file beside the target, fsync, rename,
//! fsync of the directory, so a crash leaves either the old or the new content. Knows nothing
//! of AWS or AppSpec semantics; of processes it knows only that recovery hands an interrupted
//! hook's [`HookTrace`] to [`stop_leftovers`] before anything else happens in the group.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use pier_protocol::{is_valid_id, Diagnostics, ErrorCode};

use crate::hooks::{stop_leftovers, HookTrace};
use crate::install;

/// Errors of the state store; each names the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: corrupt state file ({source}); move it aside to start that state afresh")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what} {id} is not a safe identifier (letters, digits, '.', '_', '-'; at most 128)")]
    BadId { what: &'static str, id: String },
    #[error("deployment group {group} is busy: another deployment holds {path}")]
    Busy { group: String, path: PathBuf },
    /// A value that JSON cannot hold (a path that is not UTF-8): an error, never a panic, so
    /// a bad name fails its deployment instead of the agent.
    #[error("{path}: cannot record the state: {source}")]
    Unserializable {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a JSON state file; `None` when it does not exist.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    match fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StateError::Corrupt {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes a JSON state file atomically.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| StateError::Unserializable {
        path: path.to_path_buf(),
        source,
    })?;
    pier_sys::atomic_write(path, &bytes).map_err(io_err(path))
}

pub use pier_protocol::{DeploymentStatus, EventState};

/// One lifecycle event's progress in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// The CodeDeploy event name (`ApplicationStop`, `Install`, ...).
    pub event: String,
    pub status: EventState,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// The script that failed or timed out, as written in the AppSpec.
    pub script: Option<String>,
    pub exit_code: Option<i32>,
    /// A sentence on what went wrong, for the operator.
    pub message: Option<String>,
    /// The last few KiB of the event's script output.
    pub tail: Option<String>,
    /// Why the event failed, for a program to act on: set with the failure, on failed and
    /// timed-out events only. Journals written before it existed read as `None`.
    #[serde(default)]
    pub code: Option<ErrorCode>,
    /// The event failed but the deployment went on (the deployment asked to ignore
    /// application stop failures). Journals written before it existed read as `false`.
    #[serde(default)]
    pub ignored: bool,
}

impl EventRecord {
    pub fn pending(event: &str) -> EventRecord {
        EventRecord {
            event: event.to_string(),
            status: EventState::Pending,
            started_at: None,
            ended_at: None,
            script: None,
            exit_code: None,
            message: None,
            tail: None,
            code: None,
            ignored: false,
        }
    }

    /// Why the event failed, for the status record: set for a failed or timed-out event
    /// only. An event failed by a version that did not record codes reads as
    /// [`ErrorCode::UnknownError`].
    pub fn diagnostics(&self) -> Option<Diagnostics> {
        if !matches!(self.status, EventState::Failed | EventState::TimedOut) {
            return None;
        }
        Some(Diagnostics {
            error_code: self.code.unwrap_or(ErrorCode::UnknownError),
            script_name: self.script.clone(),
            message: self
                .message
                .clone()
                .unwrap_or_else(|| format!("{} failed", self.event)),
            log_tail: self.tail.clone(),
        })
    }
}

/// The durable record of one deployment's progress, rewritten at each event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub deployment_id: String,
    pub application_name: String,
    pub deployment_group_name: String,
    pub deployment_group_id: String,
    pub status: DeploymentStatus,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub events: Vec<EventRecord>,
    /// Why the deployment failed, in one line.
    pub error: Option<String>,
    /// Set when a later run found this deployment unfinished and closed it as failed.
    #[serde(default)]
    pub recovered: bool,
    /// The hook running now, recorded before its script starts and cleared when it ends: what
    /// recovery stops if the agent dies meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_hook: Option<HookTrace>,
}

/// The group's last successful deployment: whose revision ApplicationStop runs next time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LastSuccessful {
    pub(crate) deployment_id: String,
    /// The unpacked revision of that deployment.
    pub(crate) revision_dir: PathBuf,
    /// The AppSpec file name used in that revision.
    pub(crate) appspec_file: String,
    pub(crate) ended_at: DateTime<Utc>,
}

/// The deployment root.
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    /// Opens (creating if needed) the deployment root.
    pub(crate) fn open(dir: &Path) -> Result<Root, StateError> {
        fs::create_dir_all(dir.join("groups")).map_err(io_err(dir))?;
        Ok(Root {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The state of one deployment group (its directory is created on first use).
    pub fn group(&self, group_id: &str) -> Result<Group, StateError> {
        if !is_valid_id(group_id) {
            return Err(StateError::BadId {
                what: "deployment group id",
                id: pier_protocol::quote::quote(group_id),
            });
        }
        let dir = self.dir.join("groups").join(group_id);
        fs::create_dir_all(dir.join("deployments")).map_err(io_err(&dir))?;
        Ok(Group {
            id: group_id.to_string(),
            dir,
        })
    }

    /// Every group that has state under this root.
    pub(crate) fn groups(&self) -> Result<Vec<Group>, StateError> {
        let base = self.dir.join("groups");
        let mut out = Vec::new();
        for entry in fs::read_dir(&base).map_err(io_err(&base))? {
            let entry = entry.map_err(io_err(&base))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_valid_id(&name) && entry.path().is_dir() {
                out.push(self.group(&name)?);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

/// One deployment group's state directory.
#[derive(Debug, Clone)]
pub struct Group {
    id: String,
    dir: PathBuf,
}

/// Held while a deployment of the group runs; the kernel releases it if the process dies.
#[derive(Debug)]
pub(crate) struct GroupLock {
    _lock: Flock<File>,
}

impl Group {
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }

    fn open_lock_file(&self) -> Result<File, StateError> {
        let path = self.lock_path();
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))
    }

    /// Takes the group lock if it is free.
    pub(crate) fn try_lock(&self) -> Result<GroupLock, StateError> {
        let file = self.open_lock_file()?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(GroupLock { _lock: l }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(StateError::Busy {
                group: self.id.clone(),
                path: self.lock_path(),
            }),
            Err((_, errno)) => Err(StateError::Io {
                path: self.lock_path(),
                source: io::Error::from(errno),
            }),
        }
    }

    pub(crate) fn last_successful(&self) -> Result<Option<LastSuccessful>, StateError> {
        read_json(&self.dir.join("last-successful.json"))
    }

    pub(crate) fn set_last_successful(&self, last: &LastSuccessful) -> Result<(), StateError> {
        write_json(&self.dir.join("last-successful.json"), last)
    }

    /// Path of the manifest of what the group's last Install placed.
    pub(crate) fn manifest_path(&self) -> PathBuf {
        self.dir.join("install-manifest.json")
    }

    /// Path of the intent of an unfinished Install (its phase and what it placed).
    pub(crate) fn install_intent_path(&self) -> PathBuf {
        self.dir.join("install-intent.json")
    }

    /// Finishes or undoes an Install the process did not finish (see
    /// [`crate::install::Intent`]): rolled back if it stopped while staging, forward if it
    /// stopped while switching or removing; then the manifest is made to describe the disk and
    /// the intent removed. Returns what was done, or `None` when no Install was unfinished.
    fn recover_install(&self) -> Result<Option<install::Outcome>, StateError> {
        let path = self.install_intent_path();
        let Some(mut intent) = read_json::<install::Intent>(&path)? else {
            return Ok(None);
        };
        intent.previous_from(read_json(&self.manifest_path())?);
        let (manifest, outcome) = install::recover_intent(&intent);
        write_json(&self.manifest_path(), &manifest)?;
        fs::remove_file(&path).map_err(io_err(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        log::warn!(
            "deployment group {}: an interrupted Install was {}",
            self.id,
            match outcome {
                install::Outcome::RolledBack => "rolled back (its staged files removed)",
                install::Outcome::RolledForward => "finished (rolled forward)",
            }
        );
        Ok(Some(outcome))
    }

    /// The directory of one deployment (not created).
    pub fn deployment_dir(&self, deployment_id: &str) -> Result<PathBuf, StateError> {
        if !is_valid_id(deployment_id) {
            return Err(StateError::BadId {
                what: "deployment id",
                id: pier_protocol::quote::quote(deployment_id),
            });
        }
        Ok(self.dir.join("deployments").join(deployment_id))
    }

    /// Reads one deployment's journal.
    pub fn journal(&self, deployment_id: &str) -> Result<Option<Journal>, StateError> {
        read_json(&self.deployment_dir(deployment_id)?.join("journal.json"))
    }

    /// Writes one deployment's journal atomically.
    pub(crate) fn write_journal(&self, journal: &Journal) -> Result<(), StateError> {
        let dir = self.deployment_dir(&journal.deployment_id)?;
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        write_json(&dir.join("journal.json"), journal)
    }

    /// Every deployment of the group that has a journal, oldest first.
    pub(crate) fn deployments(&self) -> Result<Vec<Journal>, StateError> {
        let base = self.dir.join("deployments");
        let mut out = Vec::new();
        for entry in fs::read_dir(&base).map_err(io_err(&base))? {
            let entry = entry.map_err(io_err(&base))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_valid_id(&name) {
                continue;
            }
            // One unreadable journal (corrupt, or from a newer version) must not stop every
            // later deployment of the group: it is reported and passed over, and retention
            // treats its directory as debris.
            match self.journal(&name) {
                Ok(Some(j)) => out.push(j),
                Ok(None) => {}
                Err(e) => log::warn!("deployment group {}: skipping {name}: {e}", self.id),
            }
        }
        out.sort_by(|a, b| {
            a.started_at
                .cmp(&b.started_at)
                .then(a.deployment_id.cmp(&b.deployment_id))
        });
        Ok(out)
    }

    /// Closes every deployment left `InProgress` by a process that died: first stops what its
    /// interrupted hook left running, then marks it failed at the event where it stopped. Call with the group lock held (so none is really running).
    /// Returns the journals it closed.
    pub(crate) fn recover_interrupted(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<Journal>, StateError> {
        // The files first: nothing else may run for the group while an install is half done.
        let install = self.recover_install()?;
        let mut closed = Vec::new();
        let last_ok = self.last_successful()?.map(|l| l.deployment_id);
        for mut j in self.deployments()? {
            if j.status != DeploymentStatus::InProgress {
                continue;
            }
            // What the interrupted hook left running is stopped first, whatever else the
            // journal says: it must never run beside the group's next deployment.
            if let Some(trace) = j.running_hook.take() {
                let n = stop_leftovers(&trace);
                if n > 0 {
                    log::warn!(
                        "deployment {} of group {}: killed {n} process(es) its interrupted hooks left running (recorded with {})",
                        j.deployment_id, self.id, trace.script
                    );
                }
                self.write_journal(&j)?;
            }
            // The process died after recording this deployment as the group's last
            // successful one but before its journal said so: it did succeed.
            if last_ok.as_deref() == Some(j.deployment_id.as_str()) {
                j.status = DeploymentStatus::Succeeded;
                j.ended_at = Some(now);
                self.write_journal(&j)?;
                continue;
            }
            // Where it stopped: the event in progress, or (when the process died between two
            // events) the next one due. That event fails with the cause; the rest are skipped.
            let at = j
                .events
                .iter()
                .position(|e| matches!(e.status, EventState::InProgress | EventState::Pending));
            let during = at
                .map(|i| j.events[i].event.as_str())
                .unwrap_or("the end of the deployment");
            let undone = match install {
                Some(_) if during != "Install" => "",
                Some(install::Outcome::RolledBack) => {
                    " (the half-done install was rolled back: the previous files stand)"
                }
                Some(install::Outcome::RolledForward) => {
                    " (the half-done install was finished: the new files are in place)"
                }
                None => "",
            };
            let message =
                format!("the agent stopped during {during}; the deployment did not finish{undone}");
            for (i, e) in j.events.iter_mut().enumerate() {
                if Some(i) == at {
                    e.status = EventState::Failed;
                    e.ended_at = Some(now);
                    e.message = Some(message.clone());
                    e.code = Some(ErrorCode::AgentInterrupted);
                } else if e.status == EventState::Pending {
                    e.status = EventState::Skipped;
                }
            }
            j.status = DeploymentStatus::Failed;
            j.ended_at = Some(now);
            j.error = Some(message);
            j.recovered = true;
            self.write_journal(&j)?;
            closed.push(j);
        }
        Ok(closed)
    }

    /// Keeps the newest `keep` deployments and removes the rest, never removing the ones in
    /// `protect` (the last successful and the running one). Returns the ids removed.
    pub(crate) fn prune(&self, keep: usize, protect: &[&str]) -> Result<Vec<String>, StateError> {
        let base = self.dir.join("deployments");
        let mut all: Vec<(DateTime<Utc>, String)> = Vec::new();
        for entry in fs::read_dir(&base).map_err(io_err(&base))? {
            let entry = entry.map_err(io_err(&base))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_valid_id(&name) {
                continue;
            }
            // A directory with no readable journal sorts as oldest: it is debris.
            let started = self
                .journal(&name)
                .ok()
                .flatten()
                .map(|j| j.started_at)
                .unwrap_or(DateTime::<Utc>::MIN_UTC);
            all.push((started, name));
        }
        all.sort();
        let excess = all.len().saturating_sub(keep);
        let mut removed = Vec::new();
        for (_, id) in all.into_iter().take(excess) {
            if protect.contains(&id.as_str()) {
                continue;
            }
            let dir = base.join(&id);
            fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            removed.push(id);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn journal(id: &str, minute: u32, status: DeploymentStatus) -> Journal {
        Journal {
            deployment_id: id.to_string(),
            application_name: "app".into(),
            deployment_group_name: "g".into(),
            deployment_group_id: "g".into(),
            status,
            started_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, minute, 0).unwrap(),
            ended_at: None,
            events: vec![],
            error: None,
            recovered: false,
            running_hook: None,
        }
    }

    #[test]
    fn atomic_write_replaces_whole_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.json");
        pier_sys::atomic_write(&p, b"old").unwrap();
        pier_sys::atomic_write(&p, b"new").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn corrupt_state_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("last-successful.json");
        fs::write(&p, "{").unwrap();
        let err = read_json::<LastSuccessful>(&p).unwrap_err();
        assert!(err.to_string().contains("last-successful.json"), "{err}");
    }

    #[test]
    fn group_lock_is_exclusive() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        let g = root.group("g1").unwrap();
        let held = g.try_lock().unwrap();
        assert!(matches!(g.try_lock(), Err(StateError::Busy { .. })));
        // Another group is independent.
        let _other = root.group("g2").unwrap().try_lock().unwrap();
        drop(held);
        g.try_lock().unwrap();
    }

    #[test]
    fn unsafe_ids_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        assert!(matches!(root.group("../x"), Err(StateError::BadId { .. })));
        let g = root.group("g").unwrap();
        assert!(g.deployment_dir("a/../../b").is_err());
    }

    #[test]
    fn recovery_fails_the_interrupted_event() {
        let d = tempfile::tempdir().unwrap();
        let g = Root::open(d.path()).unwrap().group("g").unwrap();
        let mut j = journal("d-1", 0, DeploymentStatus::InProgress);
        let mut done = EventRecord::pending("BeforeInstall");
        done.status = EventState::Succeeded;
        let mut running = EventRecord::pending("Install");
        running.status = EventState::InProgress;
        j.events = vec![done, running, EventRecord::pending("AfterInstall")];
        g.write_journal(&j).unwrap();
        g.write_journal(&journal("d-0", 0, DeploymentStatus::Succeeded))
            .unwrap();

        let closed = g.recover_interrupted(Utc::now()).unwrap();
        assert_eq!(closed.len(), 1);
        let j = g.journal("d-1").unwrap().unwrap();
        assert_eq!(j.status, DeploymentStatus::Failed);
        assert!(j.recovered);
        assert!(j.error.unwrap().contains("during Install"));
        assert_eq!(j.events[1].status, EventState::Failed);
        assert_eq!(j.events[1].code, Some(ErrorCode::AgentInterrupted));
        assert_eq!(j.events[0].code, None);
        assert_eq!(j.events[2].status, EventState::Skipped);
        assert_eq!(j.events[2].code, None);
        assert!(g.recover_interrupted(Utc::now()).unwrap().is_empty());
    }

    #[test]
    fn recovery_between_two_events_fails_the_next_one() {
        let d = tempfile::tempdir().unwrap();
        let g = Root::open(d.path()).unwrap().group("g").unwrap();
        let mut j = journal("d-1", 0, DeploymentStatus::InProgress);
        let mut done = EventRecord::pending("Install");
        done.status = EventState::Succeeded;
        j.events = vec![
            done,
            EventRecord::pending("AfterInstall"),
            EventRecord::pending("ApplicationStart"),
        ];
        g.write_journal(&j).unwrap();
        g.recover_interrupted(Utc::now()).unwrap();
        let j = g.journal("d-1").unwrap().unwrap();
        assert_eq!(j.events[1].status, EventState::Failed);
        assert_eq!(j.events[1].code, Some(ErrorCode::AgentInterrupted));
        assert!(j.error.unwrap().contains("during AfterInstall"));
        assert_eq!(j.events[2].status, EventState::Skipped);
    }

    #[test]
    fn only_failed_and_timed_out_events_have_diagnostics() {
        let mut e = EventRecord::pending("ValidateService");
        e.status = EventState::Succeeded;
        e.tail = Some("ok".into());
        assert_eq!(e.diagnostics(), None);
        e.status = EventState::TimedOut;
        e.code = Some(ErrorCode::ScriptTimedOut);
        e.script = Some("s/slow.sh".into());
        e.message = Some("script s/slow.sh timed out after 1s".into());
        assert_eq!(
            e.diagnostics(),
            Some(Diagnostics {
                error_code: ErrorCode::ScriptTimedOut,
                script_name: Some("s/slow.sh".into()),
                message: "script s/slow.sh timed out after 1s".into(),
                log_tail: Some("ok".into()),
            })
        );
        e.code = None;
        assert_eq!(e.diagnostics().unwrap().error_code, ErrorCode::UnknownError);
    }

    #[test]
    fn a_journal_written_before_codes_existed_still_reads() {
        let old = r#"{"event":"Install","status":"Failed","started_at":null,"ended_at":null,
            "script":null,"exit_code":null,"message":"boom","tail":null}"#;
        let e: EventRecord = serde_json::from_str(old).unwrap();
        assert_eq!(e.code, None);
        assert_eq!(e.message.as_deref(), Some("boom"));
    }

    #[test]
    fn a_corrupt_journal_does_not_block_the_group() {
        let d = tempfile::tempdir().unwrap();
        let g = Root::open(d.path()).unwrap().group("g").unwrap();
        g.write_journal(&journal("d-ok", 0, DeploymentStatus::InProgress))
            .unwrap();
        let bad = g.deployment_dir("d-bad").unwrap();
        fs::create_dir_all(&bad).unwrap();
        fs::write(bad.join("journal.json"), "{ not json").unwrap();
        let closed = g.recover_interrupted(Utc::now()).unwrap();
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].deployment_id, "d-ok");
    }

    #[test]
    fn recovery_keeps_a_deployment_already_recorded_as_last_successful() {
        let d = tempfile::tempdir().unwrap();
        let g = Root::open(d.path()).unwrap().group("g").unwrap();
        g.write_journal(&journal("d-1", 0, DeploymentStatus::InProgress))
            .unwrap();
        g.set_last_successful(&LastSuccessful {
            deployment_id: "d-1".into(),
            revision_dir: "/x".into(),
            appspec_file: "appspec.yml".into(),
            ended_at: Utc::now(),
        })
        .unwrap();
        assert!(g.recover_interrupted(Utc::now()).unwrap().is_empty());
        assert_eq!(
            g.journal("d-1").unwrap().unwrap().status,
            DeploymentStatus::Succeeded
        );
    }

    #[test]
    fn prune_keeps_newest_and_protected() {
        let d = tempfile::tempdir().unwrap();
        let g = Root::open(d.path()).unwrap().group("g").unwrap();
        for (i, id) in ["d-a", "d-b", "d-c", "d-d"].iter().enumerate() {
            g.write_journal(&journal(id, i as u32, DeploymentStatus::Succeeded))
                .unwrap();
        }
        let removed = g.prune(2, &["d-a"]).unwrap();
        assert_eq!(removed, vec!["d-b".to_string()]);
        let left: Vec<_> = g
            .deployments()
            .unwrap()
            .into_iter()
            .map(|j| j.deployment_id)
            .collect();
        assert_eq!(left, ["d-a", "d-c", "d-d"]);
    }
}
