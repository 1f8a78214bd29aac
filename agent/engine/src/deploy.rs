//! One deployment on this host: the ordered lifecycle events, which revision each event's
//! scripts come from, and the journal that records progress durably.
//!
//! The engine is the same for `pier-agent deploy-local` and the daemon; it does not know how a
//! deployment arrived. It takes the group lock (one deployment per group at a time), closes any
//! deployment a dead process left open, then walks the events: ApplicationStop and the
//! BlockTraffic events run the scripts of the group's last successful revision, DownloadBundle
//! materializes the new revision, Install copies its files, and the other events run its
//! scripts. The journal is rewritten after every change and handed to an [`Observer`] (the
//! daemon turns it into status records).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use pier_protocol::ErrorCode;
use pier_sys::backoff::Backoff;
use tokio_util::sync::CancellationToken;

use crate::appspec::{self, AppSpec, AppSpecError, FileExistsBehavior, LifecycleEvent};
use crate::bundle::confined::{self, Confined};
use crate::bundle::unpack::{self, BundleType, UnpackPolicy};
use crate::hooks::{self, HookResult, HookRun, ScriptLog};
use crate::install;
use crate::settings::EngineSettings as Config;
use crate::state::{
    self, DeploymentStatus, EventRecord, EventState, Group, Journal, LastSuccessful, Root,
    StateError,
};

/// How much script output an event keeps for its status record.
const TAIL_BYTES: usize = 4096;

/// The events run when none are asked for: everything but the traffic events.
pub(crate) const DEFAULT_EVENTS: [LifecycleEvent; 7] = [
    LifecycleEvent::ApplicationStop,
    LifecycleEvent::DownloadBundle,
    LifecycleEvent::BeforeInstall,
    LifecycleEvent::Install,
    LifecycleEvent::AfterInstall,
    LifecycleEvent::ApplicationStart,
    LifecycleEvent::ValidateService,
];

/// Where the revision comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A bundle already on this host: a directory or an archive.
    Local { path: PathBuf, kind: BundleType },
    /// A revision named by a command, fetched (and its sha256 verified) during DownloadBundle.
    Remote {
        revision: pier_protocol::Revision,
        fetcher: Arc<dyn crate::bundle::RevisionFetcher>,
    },
}

/// Everything one deployment needs to know.
#[derive(Debug, Clone)]
pub struct Request {
    pub deployment_id: String,
    pub application_name: String,
    pub deployment_group_name: String,
    pub deployment_group_id: String,
    pub source: Source,
    /// The events asked for; `None` runs [`DEFAULT_EVENTS`]. DownloadBundle and Install are
    /// always added.
    pub events: Option<Vec<LifecycleEvent>>,
    /// The command's file_exists_behavior; the AppSpec's own value wins over it.
    pub file_exists_behavior: Option<FileExistsBehavior>,
    /// The AppSpec file name in the bundle; `None` tries appspec.yml then appspec.yaml.
    pub appspec_filename: Option<String>,
    /// `BUNDLE_*` variables describing the revision, given to every hook.
    pub bundle_env: Vec<(String, String)>,
    /// CodeDeploy's `ignoreApplicationStopFailures`: a failure of an event that runs the
    /// previous revision's scripts is recorded as ignored, and the deployment goes on.
    pub ignore_application_stop_failures: bool,
}

/// Why a deployment could not even start (as opposed to a deployment that ran and failed,
/// which is a [`Journal`] with status Failed).
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("events: {0}")]
    Events(#[from] pier_protocol::EventOrderError),
    #[error("deployment {0} already exists on this host; deployment ids must be unique")]
    Duplicate(String),
    #[error("the deployment task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A reload asked for another deployment root, which cannot move while the agent runs.
    #[error("root_dir changed from {} to {}: restart the agent to move the deployment root", .from.display(), .to.display())]
    RootChanged { from: PathBuf, to: PathBuf },
    #[error("the agent is shutting down: deployment {0} was not started")]
    ShuttingDown(String),
}

/// Why a dry run could not plan Install.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("a dry run needs a bundle on this host")]
    NotLocal,
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot make a scratch directory in {}: {source}", .dir.display())]
    Scratch {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bundle refused: {0}")]
    Bundle(#[from] unpack::UnpackError),
    #[error(transparent)]
    AppSpec(#[from] AppSpecError),
    #[error(transparent)]
    Install(#[from] install::InstallError),
    #[error("the dry-run task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Sees each journal update of a running deployment.
pub trait Observer: Send + Sync {
    fn update(&self, journal: &Journal);
}

/// An observer that ignores updates.
#[cfg(test)]
pub(crate) struct NoObserver;

#[cfg(test)]
impl Observer for NoObserver {
    fn update(&self, _journal: &Journal) {}
}

/// First and longest pause between two tries of a busy group lock.
const LOCK_POLL_BASE: Duration = Duration::from_millis(50);
const LOCK_POLL_MAX: Duration = Duration::from_secs(1);

/// Runs blocking file work (fsyncs, removals) on the blocking pool, not an async worker.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DeployError> + Send + 'static,
) -> Result<T, DeployError> {
    // A panic in the work fails this step with an error the caller records, rather than
    // unwinding through the deployment and leaving its journal open.
    tokio::task::spawn_blocking(f).await?
}

/// Runs deployments on this host.
pub struct Engine {
    /// Swapped whole on a reload; each deployment works with the snapshot it started with.
    config: std::sync::RwLock<Arc<Config>>,
    root: Root,
    cancel: CancellationToken,
    /// Set when the agent stops: deployments not yet started are refused, not begun.
    stopping: std::sync::atomic::AtomicBool,
    /// Fired with `stopping`, so that a deployment waiting for its group's lock gives up.
    stop: CancellationToken,
}

/// Orders and completes the events asked for, refusing unknown order.
pub(crate) fn plan_events(
    asked: Option<&[LifecycleEvent]>,
) -> Result<Vec<LifecycleEvent>, DeployError> {
    let Some(asked) = asked else {
        return Ok(DEFAULT_EVENTS.to_vec());
    };
    pier_protocol::check_order(asked)?;
    let mut events: Vec<LifecycleEvent> = asked.to_vec();
    for must in [LifecycleEvent::DownloadBundle, LifecycleEvent::Install] {
        if !events.contains(&must) {
            events.push(must);
        }
    }
    events.sort_by_key(|e| e.position());
    Ok(events)
}

/// Runs from the group's last successful revision rather than the new one.
fn runs_from_previous_revision(event: LifecycleEvent) -> bool {
    matches!(
        event,
        LifecycleEvent::ApplicationStop
            | LifecycleEvent::BeforeBlockTraffic
            | LifecycleEvent::AfterBlockTraffic
    )
}

/// A revision whose AppSpec has been read.
struct Revision {
    dir: PathBuf,
    spec: AppSpec,
}

/// The failure of one event, recorded in its journal entry.
struct EventFailure {
    status: EventState,
    /// Typed where the failure was made: each error type says its own code.
    code: ErrorCode,
    script: Option<String>,
    exit_code: Option<i32>,
    message: String,
}

impl EventFailure {
    /// A failed event with no script of its own.
    fn new(code: ErrorCode, message: impl Into<String>) -> EventFailure {
        EventFailure {
            status: EventState::Failed,
            code,
            script: None,
            exit_code: None,
            message: message.into(),
        }
    }

    /// A failure of the agent's own (a task that panicked, a state file it cannot write).
    fn unknown(message: impl Into<String>) -> EventFailure {
        EventFailure::new(ErrorCode::UnknownError, message)
    }

    /// How a hook that started but did not succeed ended; `None` for a success.
    fn from_hook(result: HookResult, hook: &appspec::Hook) -> Option<EventFailure> {
        let code = result.error_code()?;
        let location = &hook.location;
        let (status, exit_code, message) = match result {
            HookResult::Succeeded => return None,
            HookResult::Failed { exit_code, signal } => (
                EventState::Failed,
                exit_code,
                match (exit_code, signal) {
                    (Some(c), _) => format!("script {location} exited with code {c}"),
                    (None, Some(s)) => format!("script {location} was killed by signal {s}"),
                    _ => format!("script {location} failed"),
                },
            ),
            HookResult::TimedOut => (
                EventState::TimedOut,
                None,
                format!(
                    "script {location} timed out after {}s",
                    hook.timeout.as_secs()
                ),
            ),
            HookResult::Cancelled => (
                EventState::Failed,
                None,
                format!("script {location} was stopped because the agent shut down"),
            ),
        };
        Some(EventFailure {
            status,
            code,
            script: Some(location.clone()),
            exit_code,
            message,
        })
    }
}

/// What the events of a running deployment share.
struct Run<'a> {
    req: &'a Request,
    /// The configuration this deployment started with.
    config: Arc<Config>,
    group: &'a Group,
    dir: PathBuf,
    log: ScriptLog,
    journal: Journal,
    observer: &'a dyn Observer,
    previous: Option<Revision>,
    previous_note: Option<String>,
    new: Option<Revision>,
    setid_entries: Vec<(String, u32)>,
    /// The unpack's digests of the revision's files (Install trusts them while they hold).
    digests: Arc<HashMap<PathBuf, unpack::Digest>>,
    /// Where Install reads the revision's files when that is not the revision directory: a
    /// directory bundle read where it lies ([`Engine::download_in_place`]).
    install_root: Option<PathBuf>,
    /// That bundle's directories as its survey listed them, for Install's plan.
    walked: Option<unpack::Walked>,
    /// The group's install manifest, read on a blocking thread while DownloadBundle works
    /// (nothing else writes it while the group's lock is held); Install awaits it.
    manifest_read: Option<tokio::task::JoinHandle<Result<Option<install::Manifest>, String>>>,
    /// The cgroup the deployment's hooks run in, one after another.
    hooks: hooks::HookSlot,
    /// What the journal records of the running hooks (`running_hook`), kept by every save
    /// until the hooks are over.
    hook_trace: Arc<std::sync::Mutex<Option<hooks::HookTrace>>>,
}

impl Engine {
    /// Opens the deployment root named by `config`.
    pub fn new(config: Arc<Config>, cancel: CancellationToken) -> Result<Engine, DeployError> {
        let root = Root::open(&config.root_dir)?;
        // Hook containment is detected (and logged) by the first hook that needs it, or by a
        // daemon at start (`hooks::Containment::host`): a deployment without hooks, and
        // recovery, never need it.
        Ok(Engine {
            config: std::sync::RwLock::new(config),
            root,
            cancel,
            stopping: std::sync::atomic::AtomicBool::new(false),
            stop: CancellationToken::new(),
        })
    }

    /// From now on, [`Engine::deploy`] starts nothing: a deployment that has not yet taken its
    /// group lock returns [`DeployError::ShuttingDown`] instead of beginning its events.
    pub fn stop_new_deployments(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.cancel();
    }

    /// Whether [`Engine::stop_new_deployments`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn check_not_stopping(&self, req: &Request) -> Result<(), DeployError> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(DeployError::ShuttingDown(req.deployment_id.clone()));
        }
        Ok(())
    }

    /// The configuration deployments start with now.
    pub(crate) fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes a reloaded configuration for the deployments that start from now on. The
    /// deployment root cannot change while the agent runs; a new `root_dir` is refused.
    pub fn set_config(&self, config: Arc<Config>) -> Result<(), DeployError> {
        if config.root_dir != self.root.dir() {
            return Err(DeployError::RootChanged {
                from: self.root.dir().to_path_buf(),
                to: config.root_dir.clone(),
            });
        }
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// Closes the unfinished deployments of group `group_id` if no other process holds the
    /// group (then true); false, changing nothing, when the group is busy.
    pub async fn recover_group(&self, group_id: &str) -> Result<bool, DeployError> {
        let group = self.root.group(group_id)?;
        blocking(move || {
            let _lock = match group.try_lock() {
                Ok(l) => l,
                Err(StateError::Busy { .. }) => return Ok(false),
                Err(e) => return Err(e.into()),
            };
            group.recover_interrupted(Utc::now())?;
            Ok(true)
        })
        .await
    }

    /// Closes deployments of every group left unfinished by a process that died; returns
    /// them so the caller can report them. Takes each group's lock briefly, and skips a group
    /// another process holds (it has a live deployment), so a start never waits on one.
    pub async fn recover_all(&self) -> Result<Vec<Journal>, DeployError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut closed = Vec::new();
            for g in root.groups()? {
                // A group locked by another process has a live deployment; its holder (or
                // the group's next deployment, which recovers first) closes what is
                // interrupted there. Waiting for it would hold up the agent's start.
                let _lock = match g.try_lock() {
                    Ok(l) => l,
                    Err(StateError::Busy { .. }) => {
                        log::info!(
                            "group {} is busy in another process: its recovery is left to it",
                            g.id()
                        );
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                closed.extend(g.recover_interrupted(Utc::now())?);
            }
            Ok(closed)
        })
        .await?
    }

    /// Runs one deployment to its end. `Ok` carries the final journal, succeeded or failed;
    /// `Err` means it could not start.
    pub async fn deploy(
        &self,
        req: &Request,
        observer: &dyn Observer,
    ) -> Result<Journal, DeployError> {
        self.check_not_stopping(req)?;
        let config = self.config();
        let events = plan_events(req.events.as_deref())?;
        let group = self.root.group(&req.deployment_group_id)?;
        let dir = group.deployment_dir(&req.deployment_id)?;

        let lock = self.lock_group(&group, req).await?;
        // The wait for the lock may have outlasted the agent's decision to stop.
        self.check_not_stopping(req)?;
        let recovering = group.clone();
        let recovered = blocking(move || Ok(recovering.recover_interrupted(Utc::now())?)).await?;
        for closed in recovered {
            log::warn!(
                "deployment {} of group {} was interrupted: {}",
                closed.deployment_id,
                group.id(),
                closed.error.as_deref().unwrap_or("")
            );
        }
        if dir.exists() {
            return Err(DeployError::Duplicate(req.deployment_id.clone()));
        }
        std::fs::create_dir_all(dir.join("logs")).map_err(|source| StateError::Io {
            path: dir.clone(),
            source,
        })?;
        let log = ScriptLog::open(
            &dir.join("logs").join("scripts.log"),
            config.hooks.log_max_bytes,
            config.hooks.log_keep,
        )
        .map_err(|source| StateError::Io {
            path: dir.join("logs"),
            source,
        })?;

        let journal = Journal {
            deployment_id: req.deployment_id.clone(),
            application_name: req.application_name.clone(),
            deployment_group_name: req.deployment_group_name.clone(),
            deployment_group_id: req.deployment_group_id.clone(),
            status: DeploymentStatus::InProgress,
            started_at: Utc::now(),
            ended_at: None,
            events: events
                .iter()
                .map(|e| EventRecord::pending(e.as_str()))
                .collect(),
            error: None,
            recovered: false,
            running_hook: None,
        };
        let mut run = Run {
            req,
            config: config.clone(),
            group: &group,
            dir,
            log,
            journal,
            observer,
            previous: None,
            previous_note: None,
            new: None,
            setid_entries: Vec::new(),
            digests: Arc::default(),
            install_root: None,
            walked: None,
            manifest_read: None,
            hooks: hooks::HookSlot::new(),
            hook_trace: Arc::default(),
        };
        run.save().await?;
        run.load_previous().await;

        for (i, event) in events.iter().copied().enumerate() {
            // An event with nothing to run changes nothing on the host: it is recorded as
            // skipped by the next write of the journal (and told to the observer then), not by
            // two writes of its own.
            if let Some(note) = run.nothing_to_run(event) {
                let rec = &mut run.journal.events[i];
                let now = Utc::now();
                rec.started_at = Some(now);
                rec.ended_at = Some(now);
                rec.status = EventState::Skipped;
                rec.message = Some(note);
                continue;
            }
            run.journal.events[i].status = EventState::InProgress;
            run.journal.events[i].started_at = Some(Utc::now());
            run.save().await?;
            log::info!(
                DEPLOYMENT_ID = req.deployment_id.as_str(),
                DEPLOYMENT_GROUP = req.deployment_group_id.as_str(),
                LIFECYCLE_EVENT = event.as_str();
                "deployment {} group {}: {} started",
                req.deployment_id,
                req.deployment_group_id,
                event
            );

            let outcome = self.run_event(&mut run, event).await;
            let rec = &mut run.journal.events[i];
            rec.ended_at = Some(Utc::now());
            match outcome {
                Ok((status, tail, note)) => {
                    rec.status = status;
                    rec.tail = tail;
                    rec.message = note;
                    run.save().await?;
                }
                Err((failure, tail)) => {
                    rec.status = failure.status;
                    rec.code = Some(failure.code);
                    rec.script = failure.script.clone();
                    rec.exit_code = failure.exit_code;
                    rec.message = Some(failure.message.clone());
                    rec.tail = tail;
                    if self.ignores(req, event, &failure) {
                        rec.ignored = true;
                        log::warn!(
                            DEPLOYMENT_ID = req.deployment_id.as_str(),
                            DEPLOYMENT_GROUP = req.deployment_group_id.as_str(),
                            LIFECYCLE_EVENT = event.as_str(),
                            SCRIPT = failure.script.as_deref().unwrap_or(""),
                            ERROR_CODE = failure.code.as_str();
                            "deployment {} group {}: {} failed [{}], ignored as the deployment \
                             asks: {}",
                            req.deployment_id,
                            req.deployment_group_id,
                            event,
                            failure.code,
                            failure.message
                        );
                        run.save().await?;
                        continue;
                    }
                    for later in run.journal.events[i + 1..].iter_mut() {
                        later.status = EventState::Skipped;
                    }
                    run.end_hooks();
                    run.journal.status = DeploymentStatus::Failed;
                    run.journal.ended_at = Some(Utc::now());
                    run.journal.error = Some(format!("{event}: {}", failure.message));
                    log::error!(
                        DEPLOYMENT_ID = req.deployment_id.as_str(),
                        DEPLOYMENT_GROUP = req.deployment_group_id.as_str(),
                        LIFECYCLE_EVENT = event.as_str(),
                        SCRIPT = failure.script.as_deref().unwrap_or(""),
                        ERROR_CODE = failure.code.as_str();
                        "deployment {} group {}: {} failed [{}]: {}",
                        req.deployment_id,
                        req.deployment_group_id,
                        event,
                        failure.code,
                        failure.message
                    );
                    run.save().await?;
                    self.prune(&config, &group, &req.deployment_id).await;
                    drop(lock);
                    return Ok(run.journal);
                }
            }
        }

        run.end_hooks();
        // Success: this revision's scripts stop the application next time.
        let new = run.new.as_ref().expect("DownloadBundle always runs");
        group.set_last_successful(&LastSuccessful {
            deployment_id: req.deployment_id.clone(),
            revision_dir: new.dir.clone(),
            appspec_file: appspec_file_name(req, &new.dir),
            ended_at: Utc::now(),
        })?;
        run.journal.status = DeploymentStatus::Succeeded;
        run.journal.ended_at = Some(Utc::now());
        run.save().await?;
        log::info!(
            DEPLOYMENT_ID = req.deployment_id.as_str(),
            DEPLOYMENT_GROUP = req.deployment_group_id.as_str();
            "deployment {} group {} succeeded",
            req.deployment_id,
            req.deployment_group_id
        );
        self.prune(&config, &group, &req.deployment_id).await;
        drop(lock);
        Ok(run.journal)
    }

    /// What Install would do for `req`, changing nothing outside a scratch directory: the
    /// bundle is unpacked under the root, its AppSpec read and checked, and Install planned
    /// against the group's manifest. The plan is returned as text, one action a line.
    pub async fn plan_install(&self, req: &Request) -> Result<String, PlanError> {
        let config = self.config();
        let Source::Local { path, kind } = &req.source else {
            return Err(PlanError::NotLocal);
        };
        let group = self.root.group(&req.deployment_group_id)?;
        let scratch = tempfile::Builder::new()
            .prefix(".dry-run-")
            .tempdir_in(self.root.dir())
            .map_err(|source| PlanError::Scratch {
                dir: self.root.dir().to_path_buf(),
                source,
            })?;
        let revision = scratch.path().join("revision");
        let (src, kind, dest) = (path.clone(), *kind, revision.clone());
        let policy = UnpackPolicy {
            max_total_bytes: config.bundle.max_bytes,
            max_entries: config.bundle.max_entries,
        };
        let unpacked =
            tokio::task::spawn_blocking(move || unpack::unpack(&src, kind, &dest, &policy))
                .await??;
        let name = appspec_file_name(req, &revision);
        let spec = read_appspec_off_thread(&revision, &name, true).await??;
        install::check_setid(&spec.files, &spec.permissions, &unpacked.setid_entries)?;
        let previous: Option<install::Manifest> = state::read_json(&group.manifest_path())?;
        let behavior = spec
            .file_exists_behavior
            .or(req.file_exists_behavior)
            .unwrap_or_default();
        let plan = install::plan(&install::InstallInput {
            revision_root: &revision,
            files: &spec.files,
            permissions: &spec.permissions,
            previous: previous.as_ref(),
            file_exists_behavior: behavior,
            source_digests: Some(&unpacked.digests),
            verify: config.install_verify,
            snapshot: true,
            walked: None,
            consume_revision: false,
            keep: &[],
        })?;
        Ok(plan.to_string())
    }

    /// Takes the group's lock, waiting while another deployment of the group holds it. The
    /// wait polls without blocking (`LOCK_NB`, with backoff), so a stopping agent gives it up
    /// at once ([`DeployError::ShuttingDown`]) and no thread is ever left blocked in `flock`
    /// to take the lock after the waiter is gone.
    async fn lock_group(
        &self,
        group: &Group,
        req: &Request,
    ) -> Result<crate::state::GroupLock, DeployError> {
        let mut backoff = Backoff::unbounded(LOCK_POLL_BASE, LOCK_POLL_MAX);
        loop {
            let g = group.clone();
            match blocking(move || Ok(g.try_lock())).await? {
                Ok(lock) => return Ok(lock),
                Err(StateError::Busy { .. }) => {
                    if backoff.retries() == 0 {
                        log::info!(
                            "waiting for deployment group {} (another deployment is running)",
                            group.id()
                        );
                    }
                }
                Err(e) => return Err(e.into()),
            }
            let delay = backoff.next_delay().unwrap_or(LOCK_POLL_MAX);
            tokio::select! {
                _ = self.stop.cancelled() => {
                    log::info!(
                        "deployment {}: no longer waiting for group {}: the agent is stopping",
                        req.deployment_id,
                        group.id()
                    );
                    return Err(DeployError::ShuttingDown(req.deployment_id.clone()));
                }
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Applies retention (directory removals) off the async worker threads.
    async fn prune(&self, config: &Config, group: &Group, current: &str) {
        let (config, group, current) = (config.max_revisions, group.clone(), current.to_string());
        let _ = blocking(move || {
            prune_group(config, &group, &current);
            Ok::<(), DeployError>(())
        })
        .await;
    }
}

/// Keeps `keep` revisions of `group`, never `current` nor the last successful one.
fn prune_group(keep: usize, group: &Group, current: &str) {
    {
        let last = group
            .last_successful()
            .ok()
            .flatten()
            .map(|l| l.deployment_id);
        let mut protect = vec![current];
        if let Some(l) = last.as_deref() {
            protect.push(l);
        }
        if let Err(e) = group.prune(keep, &protect) {
            log::warn!("retention in group {}: {e}", group.id());
        }
    }
}

impl Engine {
    /// Whether `failure` of `event` is let pass: the deployment asked to ignore application
    /// stop failures and the event ran the previous revision's scripts (CodeDeploy's rule:
    /// ApplicationStop, BeforeBlockTraffic, AfterBlockTraffic). A script stopped because the
    /// agent is shutting down is not a failure of the script, and ends the deployment as ever.
    fn ignores(&self, req: &Request, event: LifecycleEvent, failure: &EventFailure) -> bool {
        req.ignore_application_stop_failures
            && runs_from_previous_revision(event)
            && failure.code != ErrorCode::AgentInterrupted
            && !self.cancel.is_cancelled()
    }

    /// Runs one event. Ok: (status, output tail, note); Err: (failure, output tail).
    async fn run_event(
        &self,
        run: &mut Run<'_>,
        event: LifecycleEvent,
    ) -> Result<(EventState, Option<String>, Option<String>), (EventFailure, Option<String>)> {
        match event {
            LifecycleEvent::DownloadBundle => self
                .download(run)
                .await
                .map(|note| (EventState::Succeeded, None, note))
                .map_err(|f| (f, None)),
            LifecycleEvent::Install => self
                .install(run)
                .await
                .map(|note| (EventState::Succeeded, None, Some(note)))
                .map_err(|f| (f, None)),
            _ => {
                let revision = if runs_from_previous_revision(event) {
                    match &run.previous {
                        Some(r) => r,
                        None => {
                            let note = run
                                .previous_note
                                .clone()
                                .unwrap_or_else(|| "no previous successful revision".into());
                            return Ok((EventState::Skipped, None, Some(note)));
                        }
                    }
                } else {
                    run.new
                        .as_ref()
                        .expect("DownloadBundle runs before any hook")
                };
                let hooks = revision.spec.hooks_for(event);
                if hooks.is_empty() {
                    return Ok((EventState::Skipped, None, Some("no scripts".into())));
                }
                let mut tail = String::new();
                for hook in hooks {
                    let spec = HookRun {
                        script: revision.dir.join(&hook.location),
                        location: hook.location.clone(),
                        working_dir: revision.dir.clone(),
                        timeout: hook.timeout,
                        runas: hook.runas.clone(),
                        env: hook_env(&run.config, run.req, event),
                        kill_grace: run.config.hooks.kill_grace,
                        event: event.to_string(),
                        limits: run.config.hooks.limits,
                        containment: hooks::Containment::host(),
                    };
                    // The journal as saved when the event began, with the running hooks' record
                    // in it (or not): nothing else changes it while a hook runs. Later saves
                    // keep the record until the hooks are over.
                    let (group, snapshot, current) = (
                        run.group.clone(),
                        run.journal.clone(),
                        run.hook_trace.clone(),
                    );
                    let sink: hooks::TraceSink = Arc::new(move |trace| {
                        let mut j = snapshot.clone();
                        j.running_hook = trace.clone();
                        group.write_journal(&j)?;
                        *current.lock().unwrap_or_else(|e| e.into_inner()) = trace;
                        Ok(())
                    });
                    let outcome =
                        hooks::run_in(&mut run.hooks, &spec, &run.log, &self.cancel, Some(&sink))
                            .await;
                    let outcome = match outcome {
                        Ok(o) => o,
                        Err(e) => {
                            let mut f = EventFailure::new(e.error_code(), e.to_string());
                            f.script = Some(hook.location.clone());
                            return Err((f, keep_tail(tail)));
                        }
                    };
                    tail.push_str(&outcome.tail);
                    tail = keep_tail(tail).unwrap_or_default();
                    match EventFailure::from_hook(outcome.result, hook) {
                        None => continue,
                        Some(failure) => return Err((failure, keep_tail(tail))),
                    }
                }
                Ok((EventState::Succeeded, keep_tail(tail), None))
            }
        }
    }

    async fn download(&self, run: &mut Run<'_>) -> Result<Option<String>, EventFailure> {
        // Install needs the manifest; on a large group, parsing it takes about as long as
        // surveying or unpacking the bundle, so both go on at once.
        let manifest_path = run.group.manifest_path();
        run.manifest_read = Some(tokio::task::spawn_blocking(move || {
            state::read_json(&manifest_path).map_err(|e| e.to_string())
        }));
        if let Source::Local {
            path,
            kind: BundleType::Directory,
        } = &run.req.source
        {
            if let Some(note) = self.download_in_place(run, path).await? {
                return Ok(Some(note));
            }
        }
        let revision_dir = run.dir.join("revision");
        // A fetched archive is only a step on the way: once unpacked it is removed, so each
        // revision is kept on disk once.
        let mut fetched_archive: Option<PathBuf> = None;
        let (src, kind) = match &run.req.source {
            Source::Local { path, kind } => (path.clone(), *kind),
            Source::Remote { revision, fetcher } => {
                let dest = run.dir.join("bundle.download");
                let fetched = fetcher.fetch(revision, &dest, &|_| {}).await.map_err(|e| {
                    EventFailure::new(e.error_code(), format!("fetching the revision: {e}"))
                })?;
                if fetched.path == dest {
                    fetched_archive = Some(dest);
                }
                (fetched.path, fetched.bundle_type)
            }
        };
        let dest = revision_dir.clone();
        let policy = UnpackPolicy {
            max_total_bytes: run.config.bundle.max_bytes,
            max_entries: run.config.bundle.max_entries,
        };
        let unpacked =
            tokio::task::spawn_blocking(move || unpack::unpack(&src, kind, &dest, &policy))
                .await
                .map_err(|e| EventFailure::unknown(format!("unpack task failed: {e}")))?
                .map_err(|e| EventFailure::new(e.error_code(), format!("bundle refused: {e}")));
        if let Some(archive) = fetched_archive {
            let _ = std::fs::remove_file(archive);
        }
        let unpacked = unpacked?;
        run.setid_entries = unpacked.setid_entries;
        run.digests = Arc::new(unpacked.digests);

        let name = appspec_file_name(run.req, &revision_dir);
        let spec = read_appspec_off_thread(&revision_dir, &name, true)
            .await
            .map_err(|e| EventFailure::unknown(format!("reading the AppSpec: {e}")))?
            .map_err(|e| EventFailure::new(e.error_code(), e.to_string()))?;
        install::check_setid(&spec.files, &spec.permissions, &run.setid_entries)
            .map_err(|e| EventFailure::new(e.error_code(), e.to_string()))?;
        run.new = Some(Revision {
            dir: revision_dir,
            spec,
        });
        Ok(None)
    }

    /// A local directory bundle whose AppSpec runs no hooks, and which nobody but the agent's
    /// user can change ([`unpack::trusted_root`], [`unpack::survey_tree`]), is not snapshotted: its snapshot would
    /// be hard links to the very same files, and with no script of this revision ever run
    /// (now, or as the previous revision's ApplicationStop) nothing needs the revision kept
    /// whole. The revision directory keeps a copy of the AppSpec alone, and Install reads the
    /// files where they lie. Returns the event's note when it did so, None when the bundle is
    /// to be unpacked as ever (then nothing was changed). The same refusals as an unpack.
    async fn download_in_place(
        &self,
        run: &mut Run<'_>,
        src: &Path,
    ) -> Result<Option<String>, EventFailure> {
        let policy = UnpackPolicy {
            max_total_bytes: run.config.bundle.max_bytes,
            max_entries: run.config.bundle.max_entries,
        };
        let (src, revision_dir) = (src.to_path_buf(), run.dir.join("revision"));
        let (req, agent_root) = (run.req.clone(), self.root.dir().to_path_buf());
        let survey = tokio::task::spawn_blocking(move || {
            // Everything is read from one real path, and only once nobody else can change
            // the way to it: the AppSpec, the survey and Install see the same tree.
            let root = match unpack::trusted_root(&src) {
                Ok(Ok(root)) => root,
                Ok(Err(why)) => {
                    log::debug!("bundle {} is snapshotted: {why}", src.display());
                    return Ok(None);
                }
                // Whatever stops this stops the unpack too, which reports it.
                Err(_) => return Ok(None),
            };
            // A bundle holding the agent's own root is refused by the unpack.
            if std::fs::canonicalize(&agent_root).is_ok_and(|a| a.starts_with(&root)) {
                return Ok(None);
            }
            let name = appspec_file_name(&req, &root);
            // Any problem with the AppSpec is reported by the ordinary path, from the snapshot.
            let Ok(spec) = read_appspec(&root, &name, true) else {
                return Ok(None);
            };
            if spec.runs_scripts() {
                return Ok(None);
            }
            let (root, unpacked, walked) = match unpack::survey_tree(root, &policy)? {
                unpack::Survey::InPlace {
                    root,
                    unpacked,
                    walked,
                } => (root, unpacked, walked),
                unpack::Survey::Snapshot(why) => {
                    log::debug!("bundle {} is snapshotted: {why}", src.display());
                    return Ok(None);
                }
            };
            keep_appspec(&root, &name, &revision_dir)?;
            Ok(Some((root, unpacked, walked, spec)))
        })
        .await
        .map_err(|e| EventFailure::unknown(format!("bundle survey failed: {e}")))?
        .map_err(|e: unpack::UnpackError| {
            EventFailure::new(e.error_code(), format!("bundle refused: {e}"))
        })?;
        // No set-id bit was found (else the survey asks for a snapshot): nothing for
        // `check_setid` to grant, and one set since is cleared by the plan.
        let Some((root, unpacked, walked, spec)) = survey else {
            return Ok(None);
        };
        let note = format!(
            "{} files read where they lie in {} (no hooks: not snapshotted)",
            unpacked.files,
            root.display()
        );
        run.install_root = Some(root);
        run.walked = Some(walked);
        run.new = Some(Revision {
            dir: run.dir.join("revision"),
            spec,
        });
        Ok(Some(note))
    }

    async fn install(&self, run: &mut Run<'_>) -> Result<String, EventFailure> {
        let new = run
            .new
            .as_ref()
            .expect("DownloadBundle runs before Install");
        let behavior = new
            .spec
            .file_exists_behavior
            .or(run.req.file_exists_behavior)
            .unwrap_or_default();
        let manifest_path = run.group.manifest_path();
        let intent_path = run.group.install_intent_path();
        let previous: Option<install::Manifest> = match run.manifest_read.take() {
            Some(read) => read
                .await
                .map_err(|e| EventFailure::unknown(format!("reading the manifest failed: {e}")))?,
            None => state::read_json(&manifest_path).map_err(|e| e.to_string()),
        }
        .map_err(EventFailure::unknown)?;
        let snapshot = run.install_root.is_none();
        let walked = run.walked.take();
        // The agent's own unpack, and no script of this revision ever runs (now, or as the
        // next deployment's ApplicationStop): its files need not stay in the revision.
        let consume_revision = snapshot && !new.spec.runs_scripts();
        let revision_root = run.install_root.clone().unwrap_or_else(|| new.dir.clone());
        // Never moved: the AppSpec (through any link to it), which the next deployment reads.
        let keep: Vec<(u64, u64)> = ["appspec.yml", "appspec.yaml"]
            .into_iter()
            .chain(run.req.appspec_filename.as_deref())
            .filter_map(|n| std::fs::metadata(revision_root.join(n)).ok())
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            })
            .collect();
        let digests = run.digests.clone();
        let verify = run.config.install_verify;
        let files = new.spec.files.clone();
        let permissions = new.spec.permissions.clone();
        let (manifest, summary) = tokio::task::spawn_blocking(move || {
            let input = install::InstallInput {
                revision_root: &revision_root,
                files: &files,
                permissions: &permissions,
                previous: previous.as_ref(),
                file_exists_behavior: behavior,
                source_digests: Some(&digests),
                verify,
                snapshot,
                walked: walked.as_ref(),
                consume_revision,
                keep: &keep,
            };
            let installing =
                |e: install::InstallError| EventFailure::new(e.error_code(), e.to_string());
            let plan = install::plan(&input).map_err(installing)?;
            drop(walked);
            let summary = plan.summary();
            // The install records its phase before each one and the manifest as it ends
            // (failed or not), so that a stop at any point is finished or undone by the next
            // start (`state::Group::recover_interrupted`).
            let log = install::InstallLog {
                intent: &intent_path,
                manifest: &manifest_path,
            };
            let manifest =
                install::apply_logged(&plan, previous.as_ref(), Some(log)).map_err(installing)?;
            Ok::<_, EventFailure>((manifest, summary))
        })
        .await
        .map_err(|e| EventFailure::unknown(format!("install task failed: {e}")))??;
        log::info!(
            DEPLOYMENT_ID = run.req.deployment_id.as_str(),
            LIFECYCLE_EVENT = "Install";
            "deployment {} install: {summary}",
            run.req.deployment_id
        );
        Ok(format!(
            "{summary}; {} entries in the manifest",
            manifest.entries.len()
        ))
    }
}

impl Run<'_> {
    /// Why `event` has nothing to run, when it has nothing (the note its skipped record
    /// carries): a hook event without scripts, or one that runs the previous revision's when
    /// there is none. DownloadBundle and Install always run.
    fn nothing_to_run(&self, event: LifecycleEvent) -> Option<String> {
        if matches!(
            event,
            LifecycleEvent::DownloadBundle | LifecycleEvent::Install
        ) {
            return None;
        }
        let revision = if runs_from_previous_revision(event) {
            match &self.previous {
                Some(r) => r,
                None => {
                    return Some(
                        self.previous_note
                            .clone()
                            .unwrap_or_else(|| "no previous successful revision".into()),
                    )
                }
            }
        } else {
            self.new.as_ref()?
        };
        revision
            .spec
            .hooks_for(event)
            .is_empty()
            .then(|| "no scripts".into())
    }

    /// The deployment runs no more hooks: their cgroup is removed (if empty) and the journal's
    /// next save no longer records it.
    fn end_hooks(&mut self) {
        self.hooks.close();
        *self.hook_trace.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Writes the journal (fsyncs: off the async worker threads), then tells the observer.
    async fn save(&mut self) -> Result<(), DeployError> {
        self.journal.running_hook = self
            .hook_trace
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (group, journal) = (self.group.clone(), self.journal.clone());
        blocking(move || group.write_journal(&journal).map_err(DeployError::from)).await?;
        self.observer.update(&self.journal);
        Ok(())
    }

    /// Reads the last successful revision's AppSpec, for ApplicationStop and the
    /// BlockTraffic events. A revision that can no longer be read is noted and skipped: a
    /// broken old revision must not block every future deployment.
    async fn load_previous(&mut self) {
        let last = match self.group.last_successful() {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                self.previous_note = Some(format!("last successful revision unreadable: {e}"));
                return;
            }
        };
        let read = read_appspec_off_thread(&last.revision_dir, &last.appspec_file, false).await;
        match read
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            Ok(spec) => {
                self.previous = Some(Revision {
                    dir: last.revision_dir,
                    spec,
                })
            }
            Err(e) => {
                self.previous_note = Some(format!(
                    "last successful revision {} unusable, its scripts are skipped: {e}",
                    last.deployment_id
                ))
            }
        }
    }
}

/// The environment every hook of a deployment gets (the hook runner adds the runas user's
/// own variables and a default PATH). Nothing of the agent's environment leaks but what the
/// policy passes.
fn hook_env(config: &Config, req: &Request, event: LifecycleEvent) -> Vec<(String, String)> {
    let mut env = config.hooks.env.resolve(|k| std::env::var(k).ok());
    env.extend([
        ("LIFECYCLE_EVENT".to_string(), event.to_string()),
        ("DEPLOYMENT_ID".to_string(), req.deployment_id.clone()),
        ("APPLICATION_NAME".to_string(), req.application_name.clone()),
        (
            "DEPLOYMENT_GROUP_NAME".to_string(),
            req.deployment_group_name.clone(),
        ),
        (
            "DEPLOYMENT_GROUP_ID".to_string(),
            req.deployment_group_id.clone(),
        ),
    ]);
    env.extend(req.bundle_env.iter().cloned());
    env
}

/// The AppSpec file of a revision: the one asked for, else appspec.yml, else appspec.yaml.
fn appspec_file_name(req: &Request, revision_dir: &Path) -> String {
    if let Some(n) = &req.appspec_filename {
        return n.clone();
    }
    // Whether the names exist, not where they lead: a link out is refused when it is read.
    let present = |n: &str| revision_dir.join(n).symlink_metadata().is_ok();
    if !present("appspec.yml") && present("appspec.yaml") {
        return "appspec.yaml".into();
    }
    "appspec.yml".into()
}

/// [`read_appspec`] on the blocking pool: it reads files and looks up `runas` users (NSS may
/// ask the network).
async fn read_appspec_off_thread(
    dir: &Path,
    name: &str,
    check_env: bool,
) -> Result<Result<AppSpec, AppSpecError>, tokio::task::JoinError> {
    let (dir, name) = (dir.to_path_buf(), name.to_string());
    tokio::task::spawn_blocking(move || read_appspec(&dir, &name, check_env)).await
}

/// Reads and validates a revision's AppSpec; every problem in one error. Every path is
/// opened beneath the revision root ([`Confined`]): an AppSpec, hook location or `files`
/// source that leads out through a symlink is refused, and a refused AppSpec is never parsed,
/// so nothing of it reaches a message.
fn read_appspec(dir: &Path, name: &str, check_env: bool) -> Result<AppSpec, AppSpecError> {
    let open_err = |source| AppSpecError::Open {
        name: name.to_string(),
        source,
    };
    let revision = Confined::open(dir).map_err(|source| {
        open_err(crate::bundle::ConfinedError::Io {
            entry: confined::show(name),
            source,
        })
    })?;
    let file = revision.open_file(name).map_err(open_err)?;
    let bytes = appspec::read_bounded(file).map_err(|source| AppSpecError::Read {
        name: name.to_string(),
        source,
    })?;
    let parsed = appspec::parse_bytes(name, &bytes)
        .map_err(|diagnostics| AppSpecError::Invalid { diagnostics })?;
    let spec = parsed.spec;
    if check_env {
        let refused = std::cell::RefCell::new(Vec::new());
        let has = |rel: &str| match revision.check(rel) {
            Ok(()) => true,
            Err(e) if e.is_escape() => {
                refused.borrow_mut().push(e.to_string());
                true
            }
            Err(_) => false,
        };
        let user = |u: &str| matches!(nix::unistd::User::from_name(u), Ok(Some(_)));
        let problems: Vec<appspec::Diagnostic> =
            appspec::check_environment(name, &spec, &has, Some(&user))
                .into_iter()
                .filter(|d| d.severity == appspec::Severity::Error)
                .collect();
        let mut refused = refused.into_inner();
        if !refused.is_empty() {
            refused.dedup();
            return Err(AppSpecError::Refused { entries: refused });
        }
        if !problems.is_empty() {
            return Err(AppSpecError::Invalid {
                diagnostics: problems,
            });
        }
    }
    Ok(spec)
}

/// Copies the AppSpec `name` of the bundle at `root` into a new revision directory, the one
/// file of a revision read where it lies that later deployments read from it.
fn keep_appspec(root: &Path, name: &str, revision_dir: &Path) -> Result<(), unpack::UnpackError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| unpack::UnpackError::Write { path, source }
    };
    let mut from = Confined::open(root)
        .and_then(|c| c.open_file(name).map_err(std::io::Error::other))
        .map_err(|source| unpack::UnpackError::Read {
            path: root.join(name),
            source,
        })?;
    let to = revision_dir.join(name);
    let parent = to.parent().unwrap_or(revision_dir);
    std::fs::create_dir_all(parent).map_err(write_err(parent))?;
    let mut out = std::fs::File::create_new(&to).map_err(write_err(&to))?;
    std::io::copy(&mut from, &mut out).map_err(write_err(&to))?;
    Ok(())
}

/// Keeps the last [`TAIL_BYTES`] of `s`, on a character boundary; `None` when empty.
fn keep_tail(s: String) -> Option<String> {
    if s.is_empty() {
        return None;
    }
    if s.len() <= TAIL_BYTES {
        return Some(s);
    }
    let mut start = s.len() - TAIL_BYTES;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    Some(s[start..].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use LifecycleEvent::*;

    /// Runs one deployment of the directory `bundle` under `root` and returns its journal.
    async fn deploy_dir(root: &Path, id: &str, bundle: &Path) -> Journal {
        deploy_dir_with(root, id, bundle, false).await
    }

    /// [`deploy_dir`], asking to ignore application stop failures or not.
    async fn deploy_dir_with(root: &Path, id: &str, bundle: &Path, ignore_stop: bool) -> Journal {
        let settings = Config {
            root_dir: root.to_path_buf(),
            max_revisions: 5,
            hooks: crate::settings::HookSettings {
                kill_grace: std::time::Duration::from_millis(200),
                log_max_bytes: 1 << 20,
                log_keep: 1,
                env: Default::default(),
                limits: Default::default(),
            },
            bundle: crate::settings::BundleLimits {
                max_bytes: 1 << 30,
                max_entries: 10_000,
            },
            install_verify: Default::default(),
        };
        let engine = Engine::new(Arc::new(settings), CancellationToken::new()).unwrap();
        let req = Request {
            deployment_id: id.into(),
            application_name: "app".into(),
            deployment_group_name: "g".into(),
            deployment_group_id: "g".into(),
            source: Source::Local {
                path: bundle.to_path_buf(),
                kind: BundleType::Directory,
            },
            events: None,
            file_exists_behavior: None,
            appspec_filename: None,
            bundle_env: vec![],
            ignore_application_stop_failures: ignore_stop,
        };
        engine.deploy(&req, &NoObserver).await.unwrap()
    }

    fn write(path: &Path, text: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// The failed event's (name, status, code, script).
    fn failed(j: &Journal) -> (String, EventState, Option<ErrorCode>, Option<String>) {
        let e = j
            .events
            .iter()
            .find(|e| matches!(e.status, EventState::Failed | EventState::TimedOut))
            .expect("a failed event");
        assert!(j
            .events
            .iter()
            .filter(|o| o.event != e.event)
            .all(|o| o.code.is_none()));
        (e.event.clone(), e.status, e.code, e.script.clone())
    }

    #[tokio::test]
    async fn each_failure_is_journaled_with_the_code_of_its_cause() {
        let d = tempfile::tempdir().unwrap();
        let (root, dest) = (d.path().join("root"), d.path().join("dest"));
        let spec = |hooks: &str| {
            format!(
                "version: 0.0\nos: linux\nfiles:\n  - source: app\n    destination: {}\n{hooks}",
                dest.display()
            )
        };

        // A hook that exits non-zero.
        let b = d.path().join("b-fail");
        write(&b.join("app/f"), "x", 0o644);
        write(
            &b.join("s/check.sh"),
            "#!/bin/sh\necho down\nexit 3\n",
            0o755,
        );
        write(
            &b.join("appspec.yml"),
            &spec("hooks:\n  ValidateService:\n    - location: s/check.sh\n"),
            0o644,
        );
        let j = deploy_dir(&root, "d-1", &b).await;
        assert_eq!(
            failed(&j),
            (
                "ValidateService".into(),
                EventState::Failed,
                Some(ErrorCode::ScriptFailed),
                Some("s/check.sh".into())
            )
        );
        let succeeded = j.events.iter().find(|e| e.event == "Install").unwrap();
        assert_eq!(
            (succeeded.status, succeeded.code),
            (EventState::Succeeded, None)
        );

        // A hook past its timeout.
        let b = d.path().join("b-slow");
        write(&b.join("app/f"), "x", 0o644);
        write(&b.join("s/slow.sh"), "#!/bin/sh\nsleep 30\n", 0o755);
        write(
            &b.join("appspec.yml"),
            &spec("hooks:\n  BeforeInstall:\n    - location: s/slow.sh\n      timeout: 1\n"),
            0o644,
        );
        let (event, status, code, _) = failed(&deploy_dir(&root, "d-2", &b).await);
        assert_eq!(
            (event.as_str(), status, code),
            (
                "BeforeInstall",
                EventState::TimedOut,
                Some(ErrorCode::ScriptTimedOut)
            )
        );

        // A hook script an earlier hook removed from the revision: missing at run time.
        let b = d.path().join("b-gone");
        write(&b.join("app/f"), "x", 0o644);
        write(&b.join("s/rm.sh"), "#!/bin/sh\nrm s/later.sh\n", 0o755);
        write(&b.join("s/later.sh"), "#!/bin/sh\n", 0o755);
        write(
            &b.join("appspec.yml"),
            &spec(
                "hooks:\n  BeforeInstall:\n    - location: s/rm.sh\n  AfterInstall:\n    - location: s/later.sh\n",
            ),
            0o644,
        );
        let (event, _, code, script) = failed(&deploy_dir(&root, "d-3", &b).await);
        assert_eq!(
            (event.as_str(), code, script.as_deref()),
            (
                "AfterInstall",
                Some(ErrorCode::ScriptMissing),
                Some("s/later.sh")
            )
        );

        // No AppSpec in the bundle.
        let b = d.path().join("b-nospec");
        write(&b.join("app/f"), "x", 0o644);
        let (event, _, code, _) = failed(&deploy_dir(&root, "d-4", &b).await);
        assert_eq!(
            (event.as_str(), code),
            ("DownloadBundle", Some(ErrorCode::AppSpecInvalid))
        );

        // DISALLOW and a file of someone else's in the way (dest/f exists from the deployments
        // above, but the group's manifest says Install placed it: use another destination).
        let other = d.path().join("other");
        write(&other.join("f"), "mine", 0o644);
        let b = d.path().join("b-exists");
        write(&b.join("app/f"), "x", 0o644);
        write(
            &b.join("appspec.yml"),
            &format!(
                "version: 0.0\nos: linux\nfiles:\n  - source: app\n    destination: {}\nfile_exists_behavior: DISALLOW\n",
                other.display()
            ),
            0o644,
        );
        let (event, _, code, _) = failed(&deploy_dir(&root, "d-5", &b).await);
        assert_eq!(
            (event.as_str(), code),
            ("Install", Some(ErrorCode::FileExists))
        );
    }

    #[tokio::test]
    async fn a_failing_stop_script_of_the_previous_revision_is_ignored_when_asked() {
        let d = tempfile::tempdir().unwrap();
        let (root, dest) = (d.path().join("root"), d.path().join("dest"));
        let bundle = |name: &str, hooks: &str| {
            let b = d.path().join(name);
            write(&b.join("app/f"), name, 0o644);
            write(
                &b.join("s/stop.sh"),
                "#!/bin/sh\necho cannot stop\nexit 1\n",
                0o755,
            );
            write(&b.join("s/slow.sh"), "#!/bin/sh\nsleep 30\n", 0o755);
            write(
                &b.join("appspec.yml"),
                &format!(
                    "version: 0.0\nos: linux\nfiles:\n  - source: app\n    destination: {}\n{hooks}",
                    dest.display()
                ),
                0o644,
            );
            b
        };
        let stop_fails = "hooks:\n  ApplicationStop:\n    - location: s/stop.sh\n";
        let a = bundle("a", stop_fails);
        let b = bundle("b", "");
        let event = |j: &Journal, name: &str| j.events.iter().find(|e| e.event == name).cloned();

        // A's stop script only runs when the next revision is deployed.
        let j = deploy_dir(&root, "d-a", &a).await;
        assert_eq!(j.status, DeploymentStatus::Succeeded);

        // Without the option, B stops at A's ApplicationStop and installs nothing.
        let j = deploy_dir(&root, "d-b1", &b).await;
        assert_eq!(j.status, DeploymentStatus::Failed);
        let stop = event(&j, "ApplicationStop").unwrap();
        assert_eq!(
            (stop.status, stop.code, stop.ignored),
            (EventState::Failed, Some(ErrorCode::ScriptFailed), false)
        );
        assert_eq!(event(&j, "Install").unwrap().status, EventState::Skipped);
        assert_eq!(std::fs::read_to_string(dest.join("f")).unwrap(), "a");

        // With it, the failure is journaled as ignored, with its cause, and B goes on.
        let j = deploy_dir_with(&root, "d-b2", &b, true).await;
        assert_eq!(j.status, DeploymentStatus::Succeeded, "{:?}", j.error);
        assert_eq!(j.error, None);
        let stop = event(&j, "ApplicationStop").unwrap();
        assert_eq!(
            (
                stop.status,
                stop.code,
                stop.exit_code,
                stop.script.as_deref()
            ),
            (
                EventState::Failed,
                Some(ErrorCode::ScriptFailed),
                Some(1),
                Some("s/stop.sh")
            )
        );
        assert!(stop.ignored);
        assert!(stop.tail.as_deref().unwrap_or("").contains("cannot stop"));
        assert!(stop.diagnostics().is_some());
        for e in &j.events[1..] {
            assert!(!e.ignored && e.code.is_none(), "{e:?}");
        }
        assert_eq!(event(&j, "Install").unwrap().status, EventState::Succeeded);
        assert_eq!(std::fs::read_to_string(dest.join("f")).unwrap(), "b");

        // B is now the last successful revision: its (absent) stop scripts run next.
        let j = deploy_dir(&root, "d-c", &a).await;
        assert_eq!(j.status, DeploymentStatus::Succeeded);
        assert_eq!(
            event(&j, "ApplicationStop").unwrap().status,
            EventState::Skipped
        );

        // A stop script that times out is ignored too; the new revision's own failures still
        // fail the deployment.
        let slow_stop = bundle(
            "slow-stop",
            "hooks:\n  ApplicationStop:\n    - location: s/slow.sh\n      timeout: 1\n",
        );
        let j = deploy_dir_with(&root, "d-d", &slow_stop, true).await;
        assert_eq!(j.status, DeploymentStatus::Succeeded, "{:?}", j.error);
        assert!(event(&j, "ApplicationStop").unwrap().ignored);
        let fails_before = bundle(
            "fails-before",
            "hooks:\n  BeforeInstall:\n    - location: s/stop.sh\n",
        );
        let j = deploy_dir_with(&root, "d-e", &fails_before, true).await;
        let stop = event(&j, "ApplicationStop").unwrap();
        assert_eq!((stop.status, stop.ignored), (EventState::TimedOut, true));
        let before = event(&j, "BeforeInstall").unwrap();
        assert_eq!((before.status, before.ignored), (EventState::Failed, false));
        assert!(
            j.error.as_deref().unwrap().starts_with("BeforeInstall"),
            "{:?}",
            j.error
        );
        assert_eq!(j.status, DeploymentStatus::Failed);
    }

    #[test]
    fn default_events_skip_traffic() {
        assert_eq!(plan_events(None).unwrap(), DEFAULT_EVENTS.to_vec());
    }

    #[test]
    fn asked_events_gain_download_and_install() {
        let got = plan_events(Some(&[BeforeInstall, ApplicationStart])).unwrap();
        assert_eq!(
            got,
            vec![DownloadBundle, BeforeInstall, Install, ApplicationStart]
        );
    }

    #[test]
    fn events_out_of_order_are_refused() {
        let err = plan_events(Some(&[ApplicationStart, BeforeInstall]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("BeforeInstall cannot come after ApplicationStart"),
            "{err}"
        );
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        let s = format!("{}é{}", "a".repeat(10), "b".repeat(TAIL_BYTES - 1));
        let t = keep_tail(s).unwrap();
        assert!(t.len() <= TAIL_BYTES);
        assert!(t.ends_with('b'));
    }
}
