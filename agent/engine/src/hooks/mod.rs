//! The hook runner: runs ONE lifecycle hook script and says how it ended. It knows nothing of
//! deployments; the `deploy` module decides which scripts run, when, and with what
//! environment, and calls [`run`] for each.
//!
//! A script runs in its own session and process group (so the whole tree it starts can be
//! signalled), in the revision root, with stdin on `/dev/null` and an environment built from
//! nothing: only [`HookRun::env`], the identity of the user it runs as (HOME, USER, LOGNAME,
//! SHELL) and a PATH, so the agent's own credentials (`AWS_*` and the like) never reach it.
//! A script without the executable bit, or one the kernel refuses to exec for this user or
//! mount (EACCES: the bit is only the owner's, or the root is mounted noexec), runs through
//! the interpreter its `#!` line names; with no `#!` line it is an error, not a guess.
//! `runas` switches user natively in the child (supplementary groups as initgroups would set
//! them, then setgid, then setuid); never through `su` or `sudo`.
//!
//! Both output streams are read concurrently, line by line, into the [`ScriptLog`] and a
//! bounded tail (see `output`). Every process the script starts, one that leaves its session
//! (`setsid`) included, is kept where it can be found: the hook's own cgroup, or the
//! process-group fallback (see `contain`). On timeout or cancellation all of them get SIGTERM,
//! then after [`HookRun::kill_grace`] SIGKILL. [`run_traced`] also records where the hook's
//! processes are ([`HookTrace`]) before the script starts, so that after an agent crash
//! [`stop_leftovers`] can stop what an interrupted hook left.
//!
//! **When is a hook over?** When the script process exits — not when its output pipes reach
//! EOF. A script that starts a server in the background (`./server &`) leaves that child
//! holding stdout/stderr; waiting for EOF is the classic CodeDeploy hang. So the runner waits
//! on the script's exit, then gives the readers [`DRAIN_AFTER_EXIT`] to take what is already
//! buffered, and returns. The background child is left alone, and so is its pipe: the reader
//! task is detached rather than stopped, and keeps copying what the child prints into the log
//! (marked `after exit`) until EOF, because closing the pipe would kill the child with SIGPIPE
//! on its next write. Every other wait is bounded too, and the script is always reaped.

mod command;
mod contain;
mod output;
mod scriptlog;
mod spawn;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use pier_protocol::ErrorCode;
use tokio::process::Child;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use self::command::DEFAULT_PATH;
pub use self::contain::{stop_leftovers, CgroupMode, Containment, HookLimits, HookTrace};
use self::contain::{Active, Cell, Watch};
use self::output::{Pump, Stream, Tail};
pub use self::scriptlog::ScriptLog;

/// How long the output readers may keep reading after the script has exited before the hook
/// is declared over (the output the script wrote itself is already in the pipe by then).
pub(crate) const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// How long to wait for the script to be reaped after SIGKILL; only a process stuck in the
/// kernel (uninterruptible I/O) takes longer, and then the runtime reaps it later.
const REAP_AFTER_KILL: Duration = Duration::from_secs(5);

/// How often the group is checked for survivors while waiting out the grace period.
const GROUP_POLL: Duration = Duration::from_millis(50);

/// How often the process-group fallback looks through /proc for the hook's descendants while
/// it runs (a descendant that detaches and loses every parent between two looks escapes).
const SCAN_EVERY: Duration = Duration::from_millis(100);

/// Where [`run_traced`] records the running hook (`Some`) and that it is over (`None`):
/// durably, before the script starts and once it has ended. The engine writes it to the
/// deployment's journal.
pub type TraceSink =
    Arc<dyn Fn(Option<HookTrace>) -> Result<(), crate::state::StateError> + Send + Sync>;

/// One script to run, with everything needed to run it.
#[derive(Debug, Clone)]
pub struct HookRun {
    /// Absolute path of the script in the unpacked revision: beneath `working_dir`, and opened
    /// confined to it (a link out of the revision is refused, never run).
    pub script: PathBuf,
    /// The script's location as written in the AppSpec, for messages and the log.
    pub location: String,
    /// The working directory: the revision root.
    pub working_dir: PathBuf,
    /// How long the script may run before its group is stopped.
    pub timeout: Duration,
    /// User to run as; `None` runs as the agent's user.
    pub runas: Option<String>,
    /// The only environment the script gets, besides the runas user's HOME, USER, LOGNAME,
    /// SHELL and a PATH ([`DEFAULT_PATH`] unless `env` sets one).
    pub env: Vec<(String, String)>,
    /// Time between SIGTERM and SIGKILL when the script is stopped.
    pub kill_grace: Duration,
    /// Lifecycle event name, for log lines.
    pub event: String,
    /// Caps on the hook's tasks and memory, enforced through its cgroup where there is one.
    pub limits: HookLimits,
    /// How the hook's processes are kept together ([`Containment::host`] unless a test or
    /// the operator wants otherwise).
    pub containment: Containment,
}

/// How a script that did start ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookResult {
    /// Exited with status 0.
    Succeeded,
    /// Exited non-zero (`exit_code`) or was killed by a signal it did not expect (`signal`).
    Failed {
        exit_code: Option<i32>,
        signal: Option<i32>,
    },
    /// Ran past its timeout and was stopped.
    TimedOut,
    /// Stopped because the caller cancelled (agent shutdown).
    Cancelled,
}

impl HookResult {
    /// The code a failed event carries for this ending; `None` for success.
    pub(crate) fn error_code(&self) -> Option<ErrorCode> {
        match self {
            HookResult::Succeeded => None,
            HookResult::Failed { .. } => Some(ErrorCode::ScriptFailed),
            HookResult::TimedOut => Some(ErrorCode::ScriptTimedOut),
            // Only the agent stopping cancels a hook.
            HookResult::Cancelled => Some(ErrorCode::AgentInterrupted),
        }
    }
}

impl fmt::Display for HookResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookResult::Succeeded => f.write_str("succeeded"),
            HookResult::Failed {
                exit_code: Some(c), ..
            } => write!(f, "failed with exit code {c}"),
            HookResult::Failed {
                signal: Some(s), ..
            } => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "was killed by signal {s} ({sig})"),
                Err(_) => write!(f, "was killed by signal {s}"),
            },
            HookResult::Failed { .. } => f.write_str("failed (exit status unknown)"),
            HookResult::TimedOut => f.write_str("timed out"),
            HookResult::Cancelled => f.write_str("was cancelled"),
        }
    }
}

/// What the runner observed of one script.
#[derive(Debug, Clone)]
pub struct HookOutcome {
    /// How it ended.
    pub result: HookResult,
    /// When it was started.
    pub started: DateTime<Utc>,
    /// When the runner considered it over (exit plus the bounded drain).
    pub ended: DateTime<Utc>,
    /// The last few KiB (at most 4 KiB) of its output, both streams, ANSI stripped, each line
    /// prefixed `[stdout] ` or `[stderr] `.
    pub tail: String,
}

/// Why a script could not be started at all. Each names the script as the AppSpec does.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The script is not in the revision.
    #[error("hook script {location} not found at {}: check the hook's location in appspec.yml against the bundle", script.display())]
    ScriptMissing { location: String, script: PathBuf },
    /// The location names a directory or something else that cannot run.
    #[error("hook script {location} at {} is not a regular file: point the hook's location at a script", script.display())]
    NotAFile { location: String, script: PathBuf },
    /// The location is, or passes through, a symlink that leads out of the revision.
    #[error("hook script {location}: {source}")]
    Refused {
        location: String,
        #[source]
        source: crate::bundle::ConfinedError,
    },
    /// The script could not be inspected.
    #[error("hook script {location} at {} cannot be read: {source}", script.display())]
    Unreadable {
        location: String,
        script: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No executable bit and no `#!` line to say what should run it.
    #[error("hook script {location} at {} is not executable and has no #! line: add a #! line (e.g. #!/bin/bash) or make it executable in the bundle (chmod +x)", script.display())]
    NotExecutable { location: String, script: PathBuf },
    /// `runas` names a user this host does not have.
    #[error("hook script {location}: runas user {user:?} does not exist on this host: create it or fix runas in appspec.yml")]
    UnknownUser { user: String, location: String },
    /// The user database could not be read.
    #[error("hook script {location}: cannot look up runas user {user:?}: {source}")]
    UserLookup {
        user: String,
        location: String,
        #[source]
        source: io::Error,
    },
    /// Switching to another user needs root.
    #[error("hook script {location}: runas user {user:?} needs the agent to run as root (it runs as uid {}); run the agent as root or remove runas", nix::unistd::Uid::effective())]
    NotRoot { user: String, location: String },
    /// Where the hook's processes are could not be recorded, so it is not started: after a
    /// crash nothing could find them.
    #[error("hook script {location}: cannot record the hook in the journal before starting it: {source}")]
    Trace {
        location: String,
        #[source]
        source: crate::state::StateError,
    },
    /// fork/exec (or the user switch in the child) failed.
    #[error("hook script {location}: cannot start {}: {source}", script.display())]
    Spawn {
        location: String,
        script: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl HookError {
    /// The code a failed event carries when its script could not be started: missing from
    /// the revision, or there but not runnable (not a file, unreadable, no `#!` line and no
    /// executable bit, a `runas` user that does not exist or cannot be switched to, exec
    /// refused).
    pub(crate) fn error_code(&self) -> ErrorCode {
        match self {
            HookError::ScriptMissing { .. } => ErrorCode::ScriptMissing,
            HookError::Refused { .. } => ErrorCode::BundleRefused,
            HookError::NotAFile { .. }
            | HookError::Unreadable { .. }
            | HookError::NotExecutable { .. }
            | HookError::UnknownUser { .. }
            | HookError::UserLookup { .. }
            | HookError::NotRoot { .. }
            | HookError::Spawn { .. } => ErrorCode::ScriptNotExecutable,
            HookError::Trace { .. } => ErrorCode::UnknownError,
        }
    }
}

/// Runs one hook script to its end (exit, timeout or cancellation) and reports how it ended.
///
/// Output goes line by line to `log` as `TIME [EVENT] [stdout] LOCATION: text`; the runner
/// also logs when the script starts and how it ended. Returns `Err` only when the script
/// could not be started; everything that happens after it started is in the
/// [`HookOutcome`]. If the returned future is dropped while the script runs, every process of
/// the hook is killed.
pub async fn run(
    run: &HookRun,
    log: &ScriptLog,
    cancel: &CancellationToken,
) -> Result<HookOutcome, HookError> {
    run_traced(run, log, cancel, None).await
}

/// [`run`], recording the hook through `trace` first (see [`TraceSink`]), in a cgroup of its
/// own that is removed (if empty) and cleared from the trace when it ends.
pub async fn run_traced(
    run: &HookRun,
    log: &ScriptLog,
    cancel: &CancellationToken,
    trace: Option<TraceSink>,
) -> Result<HookOutcome, HookError> {
    let mut slot = HookSlot::new();
    let outcome = run_in(&mut slot, run, log, cancel, trace.as_ref()).await;
    if slot.close() {
        clear_trace(&trace);
    }
    outcome
}

/// Where the hooks of one deployment run, one after another: one cgroup, made for the first
/// hook and reused by the next as long as each leaves it empty, so a hook costs no cgroup to
/// make and remove and no journal write (the cgroup is recorded once, before the first hook
/// starts). A hook that leaves something running (a service ApplicationStart starts in the
/// background) keeps that cgroup for what it left; the next hook gets a new one, recorded
/// before it starts. So one hook's leftovers are never counted in, or stopped with, another
/// hook's processes. In the process-group fallback every hook is recorded on its own.
pub struct HookSlot {
    cell: Option<(Cell, Active)>,
    /// The cell's trace is in the journal (cgroup modes).
    recorded: bool,
}

impl Default for HookSlot {
    fn default() -> Self {
        HookSlot::new()
    }
}

impl HookSlot {
    /// A slot with no cgroup yet (made by the first hook that needs one).
    pub fn new() -> HookSlot {
        HookSlot {
            cell: None,
            recorded: false,
        }
    }

    /// Removes the slot's cgroup if it is empty (the hooks are over). Returns true when a
    /// trace was recorded for it, which the caller clears with its next journal write.
    pub fn close(&mut self) -> bool {
        if let Some((cell, _active)) = self.cell.take() {
            cell.release();
        }
        std::mem::take(&mut self.recorded)
    }

    /// Hands the cgroup to what a hook left in it: kept (removed by a later sweep once empty),
    /// no longer used by this slot.
    fn retire(&mut self) {
        if let Some((cell, _active)) = self.cell.take() {
            cell.release();
        }
    }

    /// The cell the next hook runs in: the current one if it is empty and made for the same
    /// set-up, else a new one (`None` in the process-group fallback, or if making it failed).
    fn cell_for(&mut self, run: &HookRun) -> Option<&Cell> {
        let Containment::Cgroup(cgroups) = &run.containment else {
            self.retire();
            return None;
        };
        let reusable = self
            .cell
            .as_ref()
            .is_some_and(|(c, _)| c.serves(cgroups, run.limits) && c.is_empty());
        if !reusable {
            self.retire();
            self.recorded = false;
            match Cell::create(cgroups, run.limits) {
                Ok(cell) => {
                    let active = Active::hold(&cell);
                    self.cell = Some((cell, active));
                }
                Err(e) => log::warn!(
                    "hook {}: cannot create its cgroup ({e}); it runs in its process group only",
                    run.location
                ),
            }
        }
        self.cell.as_ref().map(|(c, _)| c)
    }
}

impl Drop for HookSlot {
    fn drop(&mut self) {
        self.close();
    }
}

/// [`run_traced`] for one hook of a deployment, in `slot` (see [`HookSlot`]). `trace` is
/// written only when what it must say changes: in the cgroup modes when the hook gets a new
/// cgroup (before it starts) and when a hook leaves something running (cleared, after it
/// ended); in the process-group fallback before and after each hook starts and once it ended.
pub async fn run_in(
    slot: &mut HookSlot,
    run: &HookRun,
    log: &ScriptLog,
    cancel: &CancellationToken,
    trace: Option<&TraceSink>,
) -> Result<HookOutcome, HookError> {
    // The hook's cgroups exist before the script does: it is created inside them.
    let cell = slot.cell_for(run);
    let join = cell.map(Cell::join_fds).unwrap_or_default();
    let mut record = HookTrace {
        script: run.location.clone(),
        cgroups: cell.map(|c| c.dirs().to_vec()).unwrap_or_default(),
        pgid: None,
        start_ticks: None,
        boot_id: contain::boot_id(),
    };
    let in_cell = cell.is_some();

    // Preparing reads the script's head and looks its user up. A runas user may take NSS to
    // the network: that lookup goes to the blocking pool; the agent's own user is cached.
    let mut prepared = prepare(run, false, join.clone()).await?;
    // What a crash must find is durable before the script exists: the cgroup (once per
    // cell), or in the fallback that a hook is starting.
    let wrote_before = if in_cell { !slot.recorded } else { true };
    if let (Some(sink), true) = (trace, wrote_before) {
        if let Err(source) = write_trace(sink, Some(record.clone())).await {
            return Err(HookError::Trace {
                location: run.location.clone(),
                source,
            });
        }
        if in_cell {
            slot.recorded = true;
        }
    }
    let cell = slot.cell.as_ref().map(|(c, _)| c);
    let started = Utc::now();
    let spawned = match start(&mut prepared, cell) {
        // The executable bit is not for this user, or the revision sits on a noexec mount:
        // run it the way a script without the bit runs, through its `#!` line, if it has one.
        Err(e) if prepared.direct && e.kind() == io::ErrorKind::PermissionDenied => {
            match prepare(run, true, join).await {
                Ok(retry) => {
                    prepared = retry;
                    start(&mut prepared, cell)
                }
                Err(HookError::NotExecutable { .. }) => Err(e),
                Err(other) => {
                    if !in_cell {
                        clear_trace_ref(trace).await;
                    }
                    return Err(other);
                }
            }
        }
        spawned => spawned,
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(source) => {
            if !in_cell {
                clear_trace_ref(trace).await;
            }
            return Err(HookError::Spawn {
                location: run.location.clone(),
                script: run.script.clone(),
                source,
            });
        }
    };
    // The child is its own session leader, so its pid is its process group id.
    let pid = child.id();
    let pgid = Pid::from_raw(pid as i32);
    let mut guard = GroupGuard {
        pgid,
        cgroup: cell.map(Cell::kill_handle),
        armed: true,
    };
    let mut tracked = match cell {
        Some(c) => Tracked::Cell(c),
        None => match Watch::new(pid as i32) {
            Some(w) => Tracked::Watch(w),
            // Already gone: only its group can be left.
            None => Tracked::Group,
        },
    };
    // In the fallback the process group is all a crash can find: recorded as soon as known.
    if let (Some(sink), false) = (trace, in_cell) {
        record.pgid = Some(pgid.as_raw());
        record.start_ticks = contain::proc_info(pgid.as_raw()).map(|p| p.start);
        if let Err(e) = write_trace(sink, Some(record)).await {
            log::warn!(
                "hook {}: cannot record its process group: {e}",
                run.location
            );
        }
    }

    let event: Arc<str> = Arc::from(run.event.as_str());
    let location: Arc<str> = Arc::from(run.location.as_str());
    let as_user = prepared
        .user
        .as_deref()
        .map(|u| format!(" as {u}"))
        .unwrap_or_default();
    write_log(
        log,
        &format!("[{event}] [pier] {location}: started{as_user}, pid {pgid}"),
    );

    let tail = Arc::new(Mutex::new(Tail::default()));
    let attached = Arc::new(AtomicBool::new(true));
    let pump = |stream| Pump {
        stream,
        event: event.clone(),
        location: location.clone(),
        log: log.clone(),
        tail: tail.clone(),
        attached: attached.clone(),
    };
    let mut readers = Vec::new();
    match &mut child {
        Started::Forked(c) => {
            if let Some(out) = c.stdout.take() {
                readers.push(tokio::spawn(pump(Stream::Stdout).run(out)));
            }
            if let Some(err) = c.stderr.take() {
                readers.push(tokio::spawn(pump(Stream::Stderr).run(err)));
            }
        }
        Started::Cloned(c) => {
            if let Some(out) = c.stdout.take() {
                readers.push(tokio::spawn(pump(Stream::Stdout).run(out)));
            }
            if let Some(err) = c.stderr.take() {
                readers.push(tokio::spawn(pump(Stream::Stderr).run(err)));
            }
        }
    }

    let result = supervise(
        &mut child,
        pgid,
        &mut tracked,
        run.timeout,
        run.kill_grace,
        cancel,
    )
    .await;
    guard.armed = false;
    let stopped = !matches!(result, HookResult::Succeeded | HookResult::Failed { .. });
    // A script that ended on its own keeps what it left running (a service started in the
    // background); a stopped one has nothing left by now.
    let left_something = match tracked {
        Tracked::Cell(c) => {
            if stopped {
                c.thaw();
            }
            !c.is_empty()
        }
        other => {
            other.release();
            true
        }
    };
    if in_cell && left_something {
        // The cgroup now belongs to what the hook left: out of the journal, out of the slot.
        slot.retire();
        if std::mem::take(&mut slot.recorded) {
            clear_trace_ref(trace).await;
        }
    } else if !in_cell {
        clear_trace_ref(trace).await;
    }

    // Take what is already buffered, but never wait for EOF: a background child may hold the
    // pipes for as long as it lives. Readers still running are detached, not aborted.
    let drained = tokio::time::timeout(DRAIN_AFTER_EXIT, async {
        for r in &mut readers {
            let _ = r.await;
        }
    })
    .await;
    attached.store(false, Ordering::Release);
    let ended = Utc::now();

    let took = (ended - started).to_std().unwrap_or_default();
    let note = if drained.is_err() {
        "; output still open (a background process holds it), no longer waited for"
    } else {
        ""
    };
    write_log(
        log,
        &format!("[{event}] [pier] {location}: {result} after {took:.1?}{note}"),
    );
    let tail = tail.lock().unwrap_or_else(PoisonError::into_inner).render();
    Ok(HookOutcome {
        result,
        started,
        ended,
        tail,
    })
}

async fn write_trace(
    sink: &TraceSink,
    trace: Option<HookTrace>,
) -> Result<(), crate::state::StateError> {
    let sink = sink.clone();
    match tokio::task::spawn_blocking(move || sink(trace)).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Records that the hook is over, so a later recovery leaves what it started alone.
async fn clear_trace_ref(trace: Option<&TraceSink>) {
    if let Some(sink) = trace {
        if let Err(e) = write_trace(sink, None).await {
            log::warn!("cannot record in the journal that a hook ended: {e}");
        }
    }
}

/// [`clear_trace_ref`] from a synchronous context (a slot closed after its last hook).
fn clear_trace(trace: &Option<TraceSink>) {
    if let Some(sink) = trace {
        if let Err(e) = sink(None) {
            log::warn!("cannot record in the journal that a hook ended: {e}");
        }
    }
}

/// The script process, started by `clone3` into its cgroup or by the fork path.
enum Started {
    Cloned(spawn::Script),
    Forked(Child),
}

impl Started {
    fn id(&self) -> u32 {
        match self {
            Started::Cloned(s) => s.id(),
            // A pid is always there before the first wait.
            Started::Forked(c) => c.id().unwrap_or(0),
        }
    }

    async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        match self {
            Started::Cloned(s) => s.wait().await,
            Started::Forked(c) => c.wait().await,
        }
    }
}

/// Starts the prepared script: created inside the cell's cgroup by `clone3` where the kernel
/// allows it, else forked, joining the cell (if any) before exec.
fn start(prepared: &mut command::Prepared, cell: Option<&Cell>) -> io::Result<Started> {
    if let (Some(cell), Some(exec), false) = (cell, &prepared.exec, spawn::unavailable()) {
        match spawn::spawn(exec, cell.dir_fd(), &cell.join_fds()[1..]) {
            Ok(s) => return Ok(Started::Cloned(s)),
            Err(spawn::SpawnError::Failed(e)) => return Err(e),
            Err(spawn::SpawnError::Unsupported) => {}
        }
    }
    let child = spawn(prepared)?;
    if child.id().is_none() {
        return Err(io::Error::other("the started process has no pid"));
    }
    Ok(Started::Forked(child))
}

fn spawn(prepared: &mut command::Prepared) -> io::Result<Child> {
    prepared
        .command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
}

/// Where the hook's processes are kept: its cgroup, the fallback's /proc watch, or (a script
/// already gone when the watch began) its process group alone.
enum Tracked<'a> {
    Cell(&'a Cell),
    Watch(Watch),
    Group,
}

impl Tracked<'_> {
    fn signal_all(&mut self, pgid: Pid, signal: Signal) {
        signal_group(pgid, signal);
        match self {
            Tracked::Cell(c) if signal == Signal::SIGKILL => c.kill_all(),
            Tracked::Cell(c) => c.signal_all(signal),
            Tracked::Watch(w) => w.signal_all(signal),
            Tracked::Group => {}
        }
    }

    fn is_empty(&mut self, pgid: Pid) -> bool {
        match self {
            Tracked::Cell(c) => c.is_empty(),
            Tracked::Watch(w) => w.is_empty() && group_is_empty(pgid),
            Tracked::Group => group_is_empty(pgid),
        }
    }

    fn scan(&mut self) {
        if let Tracked::Watch(w) = self {
            w.scan();
        }
    }

    /// The fallback's end of a hook: what is still running is adopted (reaped later).
    fn release(self) {
        if let Tracked::Watch(w) = self {
            w.release();
        }
    }
}

/// Waits for the script to exit, its timeout, or cancellation, whichever comes first; in the
/// last two cases stops every process of the hook. Returns once the script has been reaped
/// (or, if even SIGKILL did not end it in time, once it has been given up on).
async fn supervise(
    child: &mut Started,
    pgid: Pid,
    tracked: &mut Tracked<'_>,
    timeout: Duration,
    grace: Duration,
    cancel: &CancellationToken,
) -> HookResult {
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let watching = matches!(tracked, Tracked::Watch(_));
    let stopped = loop {
        tokio::select! {
            status = child.wait() => match status {
                Ok(status) => return exit_result(status),
                Err(e) => {
                    log::warn!("waiting for hook process {pgid} failed: {e}; stopping its group");
                    break HookResult::Failed { exit_code: None, signal: None };
                }
            },
            _ = &mut deadline => break HookResult::TimedOut,
            _ = cancel.cancelled() => break HookResult::Cancelled,
            _ = tokio::time::sleep(SCAN_EVERY), if watching => tracked.scan(),
        }
    };
    stop_all(child, pgid, tracked, grace).await;
    stopped
}

/// SIGTERM to every process of the hook; wait until the script has exited and nothing of the
/// hook is left, at most `grace`; then SIGKILL to all of them (again until none is left,
/// bounded) and reap the script.
async fn stop_all(child: &mut Started, pgid: Pid, tracked: &mut Tracked<'_>, grace: Duration) {
    tracked.signal_all(pgid, Signal::SIGTERM);
    // A grace too large to add is as good as "a year".
    let deadline = Instant::now()
        .checked_add(grace)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
    let mut reaped = false;
    loop {
        let next = (Instant::now() + GROUP_POLL).min(deadline);
        if reaped {
            tokio::time::sleep_until(next).await;
        } else {
            tokio::select! {
                _ = child.wait() => reaped = true,
                _ = tokio::time::sleep_until(next) => {}
            }
        }
        if reaped && tracked.is_empty(pgid) {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let kill_deadline = Instant::now() + REAP_AFTER_KILL;
    loop {
        tracked.signal_all(pgid, Signal::SIGKILL);
        if !reaped {
            tokio::select! {
                _ = child.wait() => reaped = true,
                _ = tokio::time::sleep(GROUP_POLL) => {}
            }
        } else {
            tokio::time::sleep(GROUP_POLL).await;
        }
        if reaped && tracked.is_empty(pgid) {
            return;
        }
        if Instant::now() >= kill_deadline {
            // Dropping the Child hands it to tokio's orphan reaper.
            log::warn!("hook process {pgid} or its children did not exit {REAP_AFTER_KILL:?} after SIGKILL");
            return;
        }
    }
}

fn signal_group(pgid: Pid, signal: Signal) {
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => log::warn!("cannot send {signal} to hook process group {pgid}: {e}"),
    }
}

fn group_is_empty(pgid: Pid) -> bool {
    matches!(killpg(pgid, None), Err(Errno::ESRCH))
}

fn exit_result(status: std::process::ExitStatus) -> HookResult {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => HookResult::Succeeded,
        (exit_code, signal) => HookResult::Failed { exit_code, signal },
    }
}

async fn prepare(
    run: &HookRun,
    via_shebang: bool,
    join: Vec<std::os::fd::RawFd>,
) -> Result<command::Prepared, HookError> {
    if run.runas.is_none() {
        // A local open and read of the script, and the agent's own user from a cache.
        return command::prepare(run, via_shebang, join);
    }
    let run = run.clone();
    match tokio::task::spawn_blocking(move || command::prepare(&run, via_shebang, join)).await {
        Ok(prepared) => prepared,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// One line to the script log, written in place: an append of a short line to a local file.
fn write_log(log: &ScriptLog, line: &str) {
    if let Err(e) = log.line(line) {
        log::warn!("cannot write to script log {}: {e}", log.path().display());
    }
}

/// Kills the script's process group and cgroup if [`run`] is abandoned (its future dropped)
/// while the script is still running, so that no hook outlives an agent that stopped caring
/// about it.
struct GroupGuard {
    pgid: Pid,
    cgroup: Option<(PathBuf, bool)>,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, Signal::SIGKILL);
            if let Some(h) = &self.cgroup {
                contain::kill_handle_once(h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn hook(dir: &Path, location: &str, timeout: Duration) -> HookRun {
        HookRun {
            script: dir.join(location),
            location: location.to_string(),
            working_dir: dir.to_path_buf(),
            timeout,
            runas: None,
            env: Vec::new(),
            kill_grace: Duration::from_millis(100),
            event: "AfterInstall".to_string(),
            limits: HookLimits::default(),
            containment: Containment::host(),
        }
    }

    fn script(dir: &Path, name: &str, body: &str, mode: u32) {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    async fn code_of(run_spec: &HookRun, cancel: &CancellationToken) -> Option<ErrorCode> {
        let log = ScriptLog::open(&run_spec.working_dir.join("scripts.log"), 1 << 20, 1).unwrap();
        match run(run_spec, &log, cancel).await {
            Ok(o) => o.result.error_code(),
            Err(e) => Some(e.error_code()),
        }
    }

    #[tokio::test]
    async fn each_way_a_script_ends_has_its_code() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let none = CancellationToken::new();
        let long = Duration::from_secs(30);
        script(dir, "ok.sh", "#!/bin/sh\nexit 0\n", 0o755);
        script(dir, "fail.sh", "#!/bin/sh\nexit 3\n", 0o755);
        script(dir, "killed.sh", "#!/bin/sh\nkill -KILL $$\n", 0o755);
        script(dir, "hang.sh", "#!/bin/sh\nsleep 30\n", 0o755);
        script(dir, "plain.txt", "echo no interpreter line\n", 0o644);
        std::fs::create_dir(dir.join("adir")).unwrap();

        assert_eq!(code_of(&hook(dir, "ok.sh", long), &none).await, None);
        assert_eq!(
            code_of(&hook(dir, "fail.sh", long), &none).await,
            Some(ErrorCode::ScriptFailed)
        );
        assert_eq!(
            code_of(&hook(dir, "killed.sh", long), &none).await,
            Some(ErrorCode::ScriptFailed)
        );
        assert_eq!(
            code_of(&hook(dir, "hang.sh", Duration::from_millis(200)), &none).await,
            Some(ErrorCode::ScriptTimedOut)
        );
        assert_eq!(
            code_of(&hook(dir, "missing.sh", long), &none).await,
            Some(ErrorCode::ScriptMissing)
        );
        assert_eq!(
            code_of(&hook(dir, "plain.txt", long), &none).await,
            Some(ErrorCode::ScriptNotExecutable)
        );
        assert_eq!(
            code_of(&hook(dir, "adir", long), &none).await,
            Some(ErrorCode::ScriptNotExecutable)
        );
        let mut as_nobody = hook(dir, "ok.sh", long);
        as_nobody.runas = Some("pier-no-such-user".to_string());
        assert_eq!(
            code_of(&as_nobody, &none).await,
            Some(ErrorCode::ScriptNotExecutable)
        );

        let cancel = CancellationToken::new();
        cancel.cancel();
        assert_eq!(
            code_of(&hook(dir, "hang.sh", long), &cancel).await,
            Some(ErrorCode::AgentInterrupted)
        );
    }
}
