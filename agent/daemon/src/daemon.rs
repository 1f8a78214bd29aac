//! `pier-agent run`: the long-running agent. It polls this host's queue, turns each valid
//! command into a deployment on the [`pier_engine::deploy::Engine`], keeps the message invisible while
//! the deployment runs, writes a status record at every event, and acknowledges the message
//! only once the final record is durably written.
//!
//! Guarantees: a malformed or unknown-version message is never run and never deleted (it is
//! rejected, logged with its reason and counted, and the queue's dead-letter policy keeps it);
//! a command whose deployment id this host has already taken is never run twice (the dedupe
//! store is on disk); different deployment groups deploy at once, up to
//! `daemon.concurrency`, one group one deployment at a time (the engine's group lock).
//!
//! Signals: SIGTERM/SIGINT stop polling, give running hooks `daemon.shutdown_grace_seconds`
//! to finish, then stop them; the interrupted deployment's status is written as failed, its
//! message is left in the queue, and the next start reports it and acknowledges it. SIGHUP
//! reloads the configuration. Under systemd the agent sends READY/STOPPING and watchdog pings.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, TransportConfig, DEFAULT_CONFIG_PATH};
use crate::dedupe::{Dedupe, Seen};
use crate::fetch::{FetchOptions, Fetcher};
use pier_engine::appspec::{FileExistsBehavior, LifecycleEvent};
use pier_engine::deploy::{Engine, Observer, Request, Source};
use pier_engine::state::{self, Journal};
use pier_protocol::{self, Command, Revision, StatusRecord};
use pier_transport::aws::{aws_clients, AwsClients, AwsSettings};
use pier_transport::backoff::Backoff;
use pier_transport::spool::Spool;
use pier_transport::sqs::{QueueSpec, SqsQueue};
use pier_transport::{self, keep_invisible, open_status_sink, Queue, Received, StatusSink};

/// Exit code for a configuration error.
pub const EXIT_CONFIG: i32 = 64;

/// How long a received message is kept invisible at a time while its deployment runs (it is
/// renewed every third of this).
const VISIBILITY: Duration = Duration::from_secs(300);

/// Deployments remembered as done (against redelivery) and their saved commands are
/// forgotten after this: SQS keeps a message at most 14 days.
const FORGET_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

/// First delay before a left message is handled again in this process; it doubles each time
/// up to [`RETRY_MAX`].
const RETRY_BASE: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// Long-poll wait for the queue.
const POLL_WAIT: Duration = Duration::from_secs(20);

/// How much longer than the long poll a receive may take before it is given up as hung.
const RECEIVE_SLACK: Duration = Duration::from_secs(30);

/// Flags of `pier-agent run`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The agent configuration file (a missing default file means all defaults).
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Setup(String),
}

/// Runs the daemon until a shutdown signal; returns the process exit code.
pub fn run(args: &Args) -> i32 {
    pier_sys::logging::init(log::LevelFilter::Info);
    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let config = match Config::load(&path, required) {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}");
            eprintln!("pier-agent: {e}");
            return EXIT_CONFIG;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pier-agent: cannot start the runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let force = CancellationToken::new();
        let reload = Arc::new(tokio::sync::Notify::new());
        if let Err(e) = spawn_signal_handlers(shutdown.clone(), force.clone(), reload.clone()) {
            eprintln!("pier-agent: cannot install signal handlers: {e}");
            return 1;
        }
        match Daemon::start(path, required, config).await {
            Ok(daemon) => {
                daemon.serve(shutdown, force, reload).await;
                0
            }
            Err(e) => {
                log::error!("cannot start: {e}");
                eprintln!("pier-agent: {e}");
                match e {
                    DaemonError::Config(_) => EXIT_CONFIG,
                    DaemonError::Setup(_) => 1,
                }
            }
        }
    })
}

/// SIGTERM/SIGINT fire `shutdown`; a second one fires `force` (stop hooks now, no grace).
/// SIGHUP wakes `reload`.
fn spawn_signal_handlers(
    shutdown: CancellationToken,
    force: CancellationToken,
    reload: Arc<tokio::sync::Notify>,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: shutting down"),
            _ = int.recv() => log::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        log::warn!("second stop signal: stopping running hooks now");
        force.cancel();
    });
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            reload.notify_one();
        }
    });
    Ok(())
}

/// The running agent's parts.
pub struct Daemon {
    config_path: PathBuf,
    config_required: bool,
    host_id: String,
    queue: Arc<dyn Queue>,
    aws: Option<AwsClients>,
    fetcher: Arc<Fetcher>,
    /// The running configuration, swapped whole on SIGHUP; the engine gets its part.
    config: std::sync::RwLock<Arc<Config>>,
    dedupe: Arc<Dedupe>,
    engine: Arc<Engine>,
    /// Fired when running hooks must stop (after the shutdown grace).
    hook_cancel: CancellationToken,
    /// Deployment ids running in this process.
    running: Arc<Mutex<HashSet<String>>>,
    /// Messages rejected as malformed or of an unknown version since start.
    rejected: Arc<AtomicU64>,
    slots: Arc<Semaphore>,
    /// How many times each deployment's message was left and retried in this process.
    retries: Arc<Mutex<std::collections::HashMap<String, u32>>>,
}

impl Daemon {
    /// Builds every part; fails on a configuration that cannot work (no region for SQS, a
    /// queue that does not exist and may not be created, an unwritable root).
    pub async fn start(
        config_path: PathBuf,
        config_required: bool,
        config: Config,
    ) -> Result<Daemon, DaemonError> {
        let config = Arc::new(config);
        let host_id = resolve_host_id(&config).await;
        let aws_settings = AwsSettings {
            region: config.aws.region.clone(),
            endpoint_url: config.aws.endpoint_url.clone(),
            profile: None,
            credentials: None,
        };
        // AWS clients are built when the queue needs them, and otherwise tried so that S3
        // revisions and S3 status sinks work on a spool host too; a host with no region at all
        // simply cannot use them.
        let aws = match aws_settings_usable(&config) {
            Err(why) if matches!(config.transport, TransportConfig::Spool { .. }) => {
                log::info!("no AWS access ({why}); S3 revisions and status sinks are unavailable");
                Ok(None)
            }
            Err(why) => Err(why),
            Ok(()) => aws_clients(&aws_settings)
                .await
                .map(Some)
                .map_err(|e| e.to_string()),
        };
        let aws = match aws {
            Ok(c) => c,
            Err(e) => {
                if matches!(config.transport, TransportConfig::Sqs { .. }) {
                    return Err(DaemonError::Setup(e));
                }
                log::info!("no AWS access ({e}); S3 revisions and status sinks are unavailable");
                None
            }
        };
        let queue: Arc<dyn Queue> = match &config.transport {
            TransportConfig::Spool { spool_dir } => Arc::new(
                Spool::open(spool_dir.clone()).map_err(|e| DaemonError::Setup(e.to_string()))?,
            ),
            TransportConfig::Sqs {
                queue_url,
                queue_name,
                create_queue,
            } => {
                let mut spec = QueueSpec::for_host(&host_id);
                spec.url = queue_url.clone();
                if let Some(n) = queue_name {
                    spec.name = n.clone();
                }
                spec.create = *create_queue;
                let client = aws.as_ref().expect("built above for sqs").sqs.clone();
                Arc::new(
                    SqsQueue::open(client, &spec)
                        .await
                        .map_err(|e| DaemonError::Setup(e.to_string()))?,
                )
            }
        };
        let fetcher = Fetcher::new(
            aws.as_ref().map(|a| a.s3.clone()),
            FetchOptions {
                github_api_url: config.github.api_url.clone(),
                github_token: config.github.token.clone(),
                ..FetchOptions::default()
            },
        )
        .map_err(|e| DaemonError::Setup(e.to_string()))?;
        let dedupe = Dedupe::open(config.root_dir.join("dedupe"))
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        std::fs::create_dir_all(commands_dir(&config.root_dir))
            .map_err(|e| DaemonError::Setup(format!("{}: {e}", config.root_dir.display())))?;
        let hook_cancel = CancellationToken::new();
        let engine = Engine::new(Arc::new(config.engine_settings()), hook_cancel.clone())
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        Ok(Daemon {
            config_path,
            config_required,
            host_id,
            queue,
            aws,
            fetcher: Arc::new(fetcher),
            config: std::sync::RwLock::new(config.clone()),
            dedupe: Arc::new(dedupe),
            engine: Arc::new(engine),
            hook_cancel,
            running: Arc::new(Mutex::new(HashSet::new())),
            rejected: Arc::new(AtomicU64::new(0)),
            slots: Arc::new(Semaphore::new(config.daemon.concurrency)),
            retries: Arc::new(Mutex::new(std::collections::HashMap::new())),
        })
    }

    /// This host's id as the agent uses it.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// Polls and deploys until `shutdown` fires, then drains within the configured grace.
    pub async fn serve(
        self,
        shutdown: CancellationToken,
        force: CancellationToken,
        reload: Arc<tokio::sync::Notify>,
    ) {
        let this = Arc::new(self);
        let forcer = {
            let hooks = this.hook_cancel.clone();
            tokio::spawn(async move {
                force.cancelled().await;
                hooks.cancel();
            })
        };
        this.report_interrupted().await;
        this.housekeeping();
        log::info!(
            HOST_ID = this.host_id.as_str();
            "pier-agent {} ready: host {} polling {}",
            env!("CARGO_PKG_VERSION"),
            this.host_id,
            this.queue.describe()
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        // The watchdog is fed only while the poll loop goes round (or the agent is stopping),
        // so a loop stuck on a dead connection gets the agent restarted by systemd.
        let heartbeat = Arc::new(Mutex::new(std::time::Instant::now()));
        let watchdog = spawn_watchdog(shutdown.clone(), heartbeat.clone());

        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut backoff = Backoff::unbounded(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            while tasks.try_join_next().is_some() {}
            *heartbeat.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
            let received = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = reload.notified() => {
                    this.reload();
                    continue;
                }
                r = tokio::time::timeout(POLL_WAIT + RECEIVE_SLACK, this.queue.receive(POLL_WAIT)) => {
                    r.unwrap_or_else(|_| Err(pier_transport::TransportError::Config(format!(
                        "no answer within {}s", (POLL_WAIT + RECEIVE_SLACK).as_secs()
                    ))))
                }
            };
            let messages = match received {
                Ok(m) => {
                    backoff.reset();
                    m
                }
                Err(e) => {
                    let delay = backoff.next_delay().unwrap_or(Duration::from_secs(30));
                    log::warn!(
                        "receiving from {}: {e}; retrying in {delay:?}",
                        this.queue.describe()
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            for msg in messages {
                let me = this.clone();
                tasks.spawn(async move { me.handle(msg).await });
            }
        }

        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        // Received commands still waiting for a slot or their group's lock must not start now.
        this.engine.stop_new_deployments();
        let grace = this.config().daemon.shutdown_grace;
        if !tasks.is_empty() {
            log::info!(
                "stopping: waiting up to {}s for {} running deployment task(s)",
                grace.as_secs(),
                tasks.len()
            );
        }
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            log::warn!("shutdown grace over: stopping running hooks");
            this.hook_cancel.cancel();
            // Hooks get TERM, their kill grace, then KILL; the tasks then record the state.
            let bound = this.engine.config().hooks.kill_grace + Duration::from_secs(30);
            if tokio::time::timeout(bound, async { while tasks.join_next().await.is_some() {} })
                .await
                .is_err()
            {
                log::error!("deployment tasks did not finish after their hooks were stopped");
                tasks.abort_all();
            }
        }
        watchdog.abort();
        forcer.abort();
        log::info!("pier-agent stopped");
    }

    /// The running configuration.
    fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn reload(&self) {
        match Config::load(&self.config_path, self.config_required) {
            Ok(new) => {
                if new.transport != self.config().transport {
                    log::warn!("reload: transport changes take effect at the next restart");
                }
                match self.engine.set_config(Arc::new(new.engine_settings())) {
                    Ok(()) => {
                        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
                        log::info!(
                            "reload: configuration {} applied",
                            self.config_path.display()
                        )
                    }
                    Err(e) => log::warn!("reload refused: {e}"),
                }
            }
            Err(e) => log::error!("reload failed, keeping the running configuration: {e}"),
        }
    }

    /// Keeps the dedupe store and the saved commands from growing for ever on a host that
    /// deploys for years.
    fn housekeeping(&self) {
        match self.dedupe.prune_done(FORGET_AFTER) {
            Ok(0) => {}
            Ok(n) => log::info!("forgot {n} deployment(s) finished more than 30 days ago"),
            Err(e) => log::warn!("pruning the dedupe store: {e}"),
        }
        let dir = commands_dir(self.engine.root().dir());
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= FORGET_AFTER);
            if old {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Deployments a dead or stopped agent left unfinished: close them as failed and write
    /// their status, so that a controller sees what happened.
    async fn report_interrupted(&self) {
        let closed = match self.engine.recover_all().await {
            Ok(c) => c,
            Err(e) => {
                log::error!("recovering interrupted deployments: {e}");
                return;
            }
        };
        for journal in closed {
            log::warn!(
                DEPLOYMENT_ID = journal.deployment_id.as_str(),
                DEPLOYMENT_GROUP = journal.deployment_group_id.as_str();
                "deployment {} was interrupted: {}",
                journal.deployment_id,
                journal.error.as_deref().unwrap_or("")
            );
            if let Some(cmd) = self.saved_command(&journal.deployment_id) {
                if let Err(e) = self.write_final(&cmd, &journal).await {
                    log::error!(
                        "status of interrupted deployment {}: {e}",
                        journal.deployment_id
                    );
                }
            }
        }
    }

    async fn handle(self: Arc<Self>, msg: Received) {
        let cmd = match Command::from_json(&msg.body) {
            Ok(c) => c,
            Err(e) => {
                let n = self.rejected.fetch_add(1, Ordering::Relaxed) + 1;
                log::error!(
                    MESSAGE_ID = msg.id.as_str();
                    "rejected message {} ({n} since start): {e}; left for the dead-letter queue",
                    msg.id
                );
                if let Err(e) = self.queue.reject(&msg, &e.to_string()).await {
                    log::error!("rejecting message {}: {e}", msg.id);
                }
                return;
            }
        };
        let id = cmd.deployment_id.clone();
        // Claim the id in this process first, atomically: two deliveries of one command in the
        // same batch must not both get past this point. The claim is released however this
        // task ends, a panic included.
        let Some(_claim) = Claim::take(&self.running, &id) else {
            self.hold_duplicate(&id, &msg).await;
            return;
        };
        match self.dedupe.begin(&id) {
            Err(e) => {
                // Without the dedupe store the agent cannot promise "once": leave the message.
                log::error!(DEPLOYMENT_ID = id.as_str(); "dedupe store: {e}; message left in the queue");
            }
            Ok(Some(Seen::Done)) => {
                log::info!(DEPLOYMENT_ID = id.as_str(); "deployment {id} already done here: duplicate acknowledged, not run");
                self.ack(&msg).await;
            }
            Ok(Some(Seen::InProgress)) => self.clone().take_over(cmd, msg).await,
            Ok(None) => self.clone().deploy(cmd, msg).await,
        }
    }

    /// A second delivery of a deployment running in this process: not run, and not deleted
    /// while the first might still fail to finish (deleting it could lose the only copy). It is
    /// kept invisible until the running one ends, then acknowledged if that one is done.
    async fn hold_duplicate(&self, id: &str, msg: &Received) {
        log::info!(DEPLOYMENT_ID = id; "duplicate command for running deployment {id}: held, not run");
        let running = self.running.clone();
        keep_invisible(&*self.queue, msg, VISIBILITY, async move {
            while running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(id)
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await;
        if matches!(self.dedupe.get(id), Ok(Some(Seen::Done))) {
            log::info!(DEPLOYMENT_ID = id; "duplicate command for deployment {id} acknowledged");
            self.ack(msg).await;
        }
    }

    /// A command this host had started before it stopped: if its journal is final, report it
    /// and acknowledge; if it never got as far as a journal, run it now.
    async fn take_over(self: Arc<Self>, cmd: Command, msg: Received) {
        let id = cmd.deployment_id.clone();
        // The group the deployment really ran in is the one of the command saved when it
        // started, whatever a replay says.
        let group_id = self
            .saved_command(&id)
            .map(|c| c.deployment_group_id)
            .unwrap_or_else(|| cmd.deployment_group_id.clone());
        let journal = self
            .engine
            .root()
            .group(&group_id)
            .and_then(|g| g.journal(&id));
        match journal {
            Ok(Some(j)) if j.status != state::DeploymentStatus::InProgress => {
                log::warn!(
                    DEPLOYMENT_ID = id.as_str();
                    "deployment {id} was interrupted by an earlier stop; reporting it as {:?}",
                    j.status
                );
                if self.write_final(&cmd, &j).await.is_ok() {
                    self.finish_and_ack(&id, &msg).await;
                }
            }
            Ok(None) => self.deploy(cmd, msg).await,
            Ok(Some(_)) => log::warn!(
                DEPLOYMENT_ID = id.as_str();
                "deployment {id} is still in progress elsewhere on this host; message left"
            ),
            Err(e) => log::error!(DEPLOYMENT_ID = id.as_str(); "deployment {id}: {e}"),
        }
    }

    /// Records the deployment as done, then deletes its message; if the record cannot be
    /// written the message stays, so that a redelivery cannot run it again.
    async fn finish_and_ack(&self, id: &str, msg: &Received) {
        match self.dedupe.finish(id) {
            Ok(()) => self.ack(msg).await,
            Err(e) => {
                log::error!(DEPLOYMENT_ID = id; "dedupe store: {e}; message {} left in the queue", msg.id)
            }
        }
    }

    async fn deploy(self: Arc<Self>, cmd: Command, msg: Received) {
        let id = cmd.deployment_id.clone();
        let result = keep_invisible(
            &*self.queue,
            &msg,
            VISIBILITY,
            self.clone().run_command(&cmd),
        )
        .await;
        match result {
            Outcome::Finished(status) => {
                if self.hook_cancel.is_cancelled() {
                    // Stopped by shutdown: the status says so now, and the message stays so
                    // that the next start reports the interruption and acknowledges it.
                    log::warn!(DEPLOYMENT_ID = id.as_str(); "deployment {id} stopped by shutdown; message left for the next start");
                    return;
                }
                self.finish_and_ack(&id, &msg).await;
                log::info!(
                    DEPLOYMENT_ID = id.as_str();
                    "deployment {id} finished: {status:?}"
                );
            }
            Outcome::Left(why) => {
                log::warn!(DEPLOYMENT_ID = id.as_str(); "deployment {id}: {why}; message left in the queue");
                self.retry_later(id, msg);
            }
            Outcome::Refused(why) => {
                log::error!(DEPLOYMENT_ID = id.as_str(); "deployment {id} cannot run on this host: {why}; message rejected");
                if let Err(e) = self.queue.reject(&msg, &why).await {
                    log::error!("rejecting message {}: {e}", msg.id);
                }
            }
        }
    }

    /// Handles a message that was left (its final status not written, say) again after a
    /// growing delay, so that it is not stuck until the next restart (a spool keeps it in
    /// `processing/`; SQS would also offer it again once its visibility lapses, and the
    /// dedupe store makes the two meet safely). Not while the agent is stopping.
    fn retry_later(self: &Arc<Self>, id: String, msg: Received) {
        if self.hook_cancel.is_cancelled() || self.engine.is_stopping() {
            return;
        }
        let attempt = {
            let mut r = self.retries.lock().unwrap_or_else(|e| e.into_inner());
            let n = r.entry(id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let delay = RETRY_BASE
            .saturating_mul(1 << attempt.min(5))
            .min(RETRY_MAX);
        log::info!(DEPLOYMENT_ID = id.as_str(); "deployment {id}: trying its message again in {}s", delay.as_secs());
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if !me.engine.is_stopping() {
                me.clone().handle(msg).await;
            }
        });
    }

    /// Runs one command to its end and writes its final status.
    async fn run_command(self: Arc<Self>, cmd: &Command) -> Outcome {
        let _slot = match self.slots.clone().acquire_owned().await {
            Ok(s) => s,
            Err(e) => return Outcome::Left(e.to_string()),
        };
        if let Err(e) = self.save_command(cmd) {
            return Outcome::Left(format!("saving the command: {e}"));
        }
        // A sink this host cannot reach (S3 status without AWS access) will not appear by
        // retrying: such a command goes to the dead-letter queue with the reason.
        let sink: Arc<dyn StatusSink> = match open_status_sink(&cmd.status, self.aws.as_ref()) {
            Ok(s) => Arc::from(s),
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        let req = match self.request(cmd) {
            Ok(r) => r,
            Err(e) => return Outcome::Refused(e),
        };

        // Each journal update becomes a status record; a writer task sends the latest one,
        // so a slow sink never holds up the deployment.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<StatusRecord>();
        let writer_sink = sink.clone();
        let writer = tokio::spawn(async move {
            while let Some(mut rec) = rx.recv().await {
                while let Ok(newer) = rx.try_recv() {
                    rec = newer;
                }
                if let Err(e) = writer_sink.write(&rec).await {
                    log::warn!("status write for {}: {e}", rec.deployment_id);
                }
            }
        });
        let observer = StatusObserver {
            host_id: self.host_id.clone(),
            tx,
        };
        let outcome = self.engine.deploy(&req, &observer).await;
        drop(observer);
        let _ = writer.await;
        let rec = match outcome {
            Ok(journal) => status_record(&self.host_id, &journal),
            // Already on disk from an earlier delivery: its own status stands, and a later
            // delivery finds its journal and reports it. Not started because the agent is
            // stopping: the next start runs it.
            Err(
                e @ (pier_engine::deploy::DeployError::Duplicate(_)
                | pier_engine::deploy::DeployError::ShuttingDown(_)),
            ) => return Outcome::Left(e.to_string()),
            Err(e) => {
                // It will fail the same way every time, so once that is reported the message
                // has been processed.
                log::error!(DEPLOYMENT_ID = cmd.deployment_id.as_str(); "deployment {} cannot start: {e}", cmd.deployment_id);
                let mut rec = StatusRecord::new(&self.host_id, &cmd.deployment_id);
                rec.status = pier_protocol::DeploymentStatus::Failed;
                rec.error = Some(e.to_string());
                rec
            }
        };
        match write_with_retry(&*sink, &rec).await {
            Ok(()) => Outcome::Finished(rec.status),
            Err(e) => Outcome::Left(e),
        }
    }

    fn request(&self, cmd: &Command) -> Result<Request, String> {
        let events = match &cmd.events {
            None => None,
            Some(names) => Some(
                names
                    .iter()
                    .map(|n| n.parse::<LifecycleEvent>().map_err(|e| e.to_string()))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let file_exists_behavior = cmd
            .file_exists_behavior
            .as_deref()
            .map(|b| b.parse::<FileExistsBehavior>().map_err(|e| e.to_string()))
            .transpose()?;
        Ok(Request {
            deployment_id: cmd.deployment_id.clone(),
            application_name: cmd.application_name.clone(),
            deployment_group_name: cmd.deployment_group_name.clone(),
            deployment_group_id: cmd.deployment_group_id.clone(),
            source: Source::Remote {
                revision: cmd.revision.clone(),
                fetcher: self.fetcher.clone(),
            },
            events,
            file_exists_behavior,
            appspec_filename: None,
            bundle_env: bundle_env(&cmd.revision),
        })
    }

    async fn write_final(&self, cmd: &Command, journal: &Journal) -> Result<(), String> {
        let sink = open_status_sink(&cmd.status, self.aws.as_ref()).map_err(|e| e.to_string())?;
        write_with_retry(&*sink, &status_record(&self.host_id, journal)).await
    }

    async fn ack(&self, msg: &Received) {
        if let Err(e) = self.queue.ack(msg).await {
            log::error!("acknowledging message {}: {e}", msg.id);
        }
    }

    fn save_command(&self, cmd: &Command) -> std::io::Result<()> {
        let dir = commands_dir(self.engine.root().dir());
        pier_sys::atomic_write(
            &dir.join(format!("{}.json", cmd.deployment_id)),
            &cmd.to_json(),
        )
    }

    fn saved_command(&self, deployment_id: &str) -> Option<Command> {
        let dir = commands_dir(self.engine.root().dir());
        let bytes = std::fs::read(dir.join(format!("{deployment_id}.json"))).ok()?;
        Command::from_json(&bytes).ok()
    }
}

/// How a command's processing ended, which decides what happens to its message.
enum Outcome {
    /// The final status is written: acknowledge.
    Finished(pier_protocol::DeploymentStatus),
    /// Not finished here (shutting down, status not written, ...): leave the message.
    Left(String),
    /// Can never run on this host: reject it to the dead-letter queue with the reason.
    Refused(String),
}

/// A deployment id claimed by this process; released when dropped, however the task ends.
struct Claim {
    running: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Claim {
    /// Claims `id`, or `None` when a task of this process already holds it.
    fn take(running: &Arc<Mutex<HashSet<String>>>, id: &str) -> Option<Claim> {
        let fresh = running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string());
        fresh.then(|| Claim {
            running: running.clone(),
            id: id.to_string(),
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Where the daemon keeps the command of each deployment it started, so that after a crash it
/// still knows where that deployment's status goes.
fn commands_dir(root: &Path) -> PathBuf {
    root.join("commands")
}

/// Writes a final status record, retrying transient failures with backoff.
async fn write_with_retry(sink: &dyn StatusSink, rec: &StatusRecord) -> Result<(), String> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10), 8);
    loop {
        match sink.write(rec).await {
            Ok(()) => return Ok(()),
            Err(e) => match backoff.next_delay() {
                Some(d) if e.is_transient() => {
                    log::warn!("status write for {}: {e}; retrying", rec.deployment_id);
                    tokio::time::sleep(d).await;
                }
                _ => return Err(format!("final status for {}: {e}", rec.deployment_id)),
            },
        }
    }
}

/// Turns journal updates into status records for the writer task.
struct StatusObserver {
    host_id: String,
    tx: tokio::sync::mpsc::UnboundedSender<StatusRecord>,
}

impl Observer for StatusObserver {
    fn update(&self, journal: &Journal) {
        let _ = self.tx.send(status_record(&self.host_id, journal));
    }
}

/// The status record of a deployment on this host, from its journal.
pub fn status_record(host_id: &str, journal: &Journal) -> StatusRecord {
    let mut rec = StatusRecord::new(host_id, &journal.deployment_id);
    rec.status = journal.status;
    rec.error = journal.error.clone();
    rec.events = journal
        .events
        .iter()
        .map(|e| pier_protocol::EventStatus {
            name: e.event.clone(),
            status: e.status,
            started: e.started_at,
            ended: e.ended_at,
            exit_code: e.exit_code,
            failing_script: e.script.clone(),
            log_tail: e.tail.clone(),
            diagnostics: e.diagnostics(),
        })
        .collect();
    rec
}

/// The `BUNDLE_*` variables CodeDeploy gives hooks for a revision.
fn bundle_env(revision: &Revision) -> Vec<(String, String)> {
    let mut env = Vec::new();
    match revision {
        Revision::S3 {
            bucket,
            key,
            version_id,
            etag,
            ..
        } => {
            env.push(("BUNDLE_BUCKET".to_string(), bucket.clone()));
            env.push(("BUNDLE_KEY".to_string(), key.clone()));
            if let Some(v) = version_id {
                env.push(("BUNDLE_VERSION".to_string(), v.clone()));
            }
            if let Some(e) = etag {
                env.push(("BUNDLE_ETAG".to_string(), e.clone()));
            }
        }
        Revision::Github { commit, .. } => {
            env.push(("BUNDLE_COMMIT".to_string(), commit.clone()));
        }
        Revision::Http { .. } | Revision::Local { .. } => {}
    }
    env
}

/// Pings the systemd watchdog at half its interval when the unit asks for one, as long as the
/// poll loop went round recently (or the agent is stopping, when the loop has ended).
fn spawn_watchdog(
    shutdown: CancellationToken,
    heartbeat: Arc<Mutex<std::time::Instant>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(interval) = sd_notify::watchdog_enabled() else {
            return;
        };
        let stale_after = (POLL_WAIT + RECEIVE_SLACK) * 2;
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tick.tick().await;
            let last = *heartbeat.lock().unwrap_or_else(|e| e.into_inner());
            if shutdown.is_cancelled() || last.elapsed() < stale_after {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            } else {
                log::error!(
                    "poll loop silent for {:?}: not feeding the watchdog",
                    last.elapsed()
                );
            }
        }
    })
}

/// The host id: configured, else the EC2 instance id (asked of IMDS only on a machine whose
/// firmware says it is EC2, so no other host ever sends that request), else the machine id,
/// else the hostname.
pub async fn resolve_host_id(config: &Config) -> String {
    if let Some(id) = &config.host_id {
        return id.clone();
    }
    if pier_transport::aws::looks_like_ec2() {
        if let Some(id) = pier_transport::aws::ec2_instance_id().await {
            return id;
        }
    }
    if let Ok(id) = std::fs::read_to_string("/etc/machine-id") {
        let id = id.trim();
        if pier_protocol::is_valid_id(id) {
            return id.to_string();
        }
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| pier_protocol::is_valid_id(h))
        .unwrap_or_else(|| "localhost".to_string())
}

/// Whether AWS clients can be built without guessing: a region must come from the config,
/// the environment or a profile, or the host must be EC2 (where IMDS answers). Off EC2 this
/// keeps the SDK from probing the instance metadata address at all.
fn aws_settings_usable(config: &Config) -> Result<(), String> {
    let env = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let profile_file = std::env::var_os("HOME")
        .map(|h| Path::new(&h).join(".aws/config").exists())
        .unwrap_or(false);
    if config.aws.region.is_some()
        || env("AWS_REGION")
        || env("AWS_DEFAULT_REGION")
        || env("AWS_PROFILE")
        || profile_file
        || pier_transport::aws::looks_like_ec2()
    {
        Ok(())
    } else {
        Err("no AWS region: set aws.region in the agent config or AWS_REGION".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_revisions_give_codedeploy_bundle_variables() {
        let env = bundle_env(&Revision::S3 {
            bucket: "b".into(),
            key: "k.tgz".into(),
            version_id: Some("v1".into()),
            etag: None,
            bundle_type: pier_protocol::BundleType::Tgz,
            sha256: "0".repeat(64),
        });
        assert_eq!(
            env,
            vec![
                ("BUNDLE_BUCKET".to_string(), "b".to_string()),
                ("BUNDLE_KEY".to_string(), "k.tgz".to_string()),
                ("BUNDLE_VERSION".to_string(), "v1".to_string()),
            ]
        );
    }

    #[test]
    fn status_record_carries_the_failing_event() {
        let mut j = Journal {
            deployment_id: "d-1".into(),
            application_name: "a".into(),
            deployment_group_name: "g".into(),
            deployment_group_id: "g".into(),
            status: state::DeploymentStatus::Failed,
            started_at: chrono::Utc::now(),
            ended_at: None,
            events: vec![state::EventRecord::pending("ValidateService")],
            error: Some("ValidateService: script x exited with code 3".into()),
            recovered: false,
        };
        j.events[0].status = state::EventState::Failed;
        j.events[0].exit_code = Some(3);
        j.events[0].script = Some("x".into());
        j.events[0].tail = Some("boom".into());
        j.events[0].message = Some("script x exited with code 3".into());
        j.events[0].code = Some(pier_protocol::ErrorCode::ScriptFailed);
        let rec = status_record("h1", &j);
        let d = rec.events[0].diagnostics.as_ref().expect("diagnostics");
        assert_eq!(d.error_code, pier_protocol::ErrorCode::ScriptFailed);
        assert_eq!(d.script_name.as_deref(), Some("x"));
        assert_eq!(d.message, "script x exited with code 3");
        assert_eq!(d.log_tail.as_deref(), Some("boom"));
        assert_eq!(rec.status, pier_protocol::DeploymentStatus::Failed);
        assert_eq!(rec.events[0].status, pier_protocol::EventState::Failed);
        assert_eq!(rec.events[0].exit_code, Some(3));
        assert_eq!(rec.events[0].failing_script.as_deref(), Some("x"));
        assert_eq!(rec.events[0].log_tail.as_deref(), Some("boom"));
        // A record the controller can parse back.
        StatusRecord::from_json(&rec.to_json()).unwrap();
    }
}
