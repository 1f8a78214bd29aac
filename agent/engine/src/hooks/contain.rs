//! Keeping every process a hook starts where it can be found and stopped: the hook's own
//! cgroup (v2) where this host lets the agent make one, else its process group plus the agent
//! as child subreaper and a watch over `/proc` for the hook's descendants.
//!
//! The mode is detected once per process ([`Containment::host`]):
//!
//! - **unified**: cgroup2 mounted at `/sys/fs/cgroup`. Hook cgroups go under the agent's own
//!   cgroup (`AGENT_CGROUP/pier-hooks/NAME`; under systemd the unit delegates it); `pids.max`
//!   and `memory.max` there carry the configured caps.
//! - **hybrid**: v1 controllers beside a v2 tree (e.g. `/sys/fs/cgroup/unified`). The v2 tree
//!   holds the hook for tracking and killing; the caps go to same-named cgroups in the v1
//!   `pids` and `memory` hierarchies when those are writable.
//! - **process group**: no writable cgroup2. The hook's session and process group, and every
//!   descendant seen by a `/proc` scan while it runs (orphans re-parent to the agent, which is
//!   made child subreaper), are signalled. Caps are not enforced (logged once).
//!
//! The child joins its cgroups itself, between fork and exec, by writing `0` to `cgroup.procs`
//! files the agent opened beforehand, so nothing it starts can escape in between. A stopped
//! hook is killed with `cgroup.kill` where the kernel has it, else frozen and killed pid by
//! pid until empty. A hook that ended on its own keeps whatever it left running (a service
//! started in the background by ApplicationStart); its cgroup stays until empty and is removed
//! by a later sweep. [`HookTrace`] is what the journal keeps of a running hook so that, after
//! an agent crash, [`stop_leftovers`] can stop what it left before the group runs anything.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// Name of the directory, under the agent's cgroup, that holds one cgroup per hook run.
const HOOKS_DIR: &str = "pier-hooks";

/// How long killing a hook's leftovers may take before giving up waiting (SIGKILL is sent by
/// then: a process that got it never runs user code again).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Caps on one hook run, enforced through its cgroup where the controller is available.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HookLimits {
    /// Most tasks (processes and threads) the hook may have at once (`pids.max`).
    pub pids_max: Option<u64>,
    /// Most memory the hook may use, in bytes (`memory.max` / `memory.limit_in_bytes`).
    pub memory_max: Option<u64>,
}

/// Which kind of cgroup set-up this host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// cgroup2 at /sys/fs/cgroup.
    Unified,
    /// v1 controllers beside a cgroup2 tree mounted elsewhere.
    Hybrid,
}

/// The detected cgroup set-up: where hook cgroups go and what they can do.
#[derive(Debug)]
pub struct Cgroups {
    mode: CgroupMode,
    /// `V2 MOUNT/AGENT CGROUP/pier-hooks`.
    base: PathBuf,
    /// False when the kernel lacks `cgroup.kill` (before 5.14), or a test asks for the
    /// freeze-and-kill path.
    use_kill_file: bool,
    /// The v2 controllers enabled for hook cgroups (unified mode).
    v2_pids: bool,
    v2_memory: bool,
    /// Hybrid: `MOUNT/AGENT CGROUP/pier-hooks` in the v1 `pids` and `memory` hierarchies.
    v1_pids: Option<PathBuf>,
    v1_memory: Option<PathBuf>,
}

/// How hooks' processes are kept together on this host.
#[derive(Debug, Clone)]
pub enum Containment {
    /// Each hook in its own cgroup.
    Cgroup(Arc<Cgroups>),
    /// Process group, subreaper and `/proc` scans; `reason` says why no cgroup.
    ProcessGroup { reason: Arc<str> },
}

impl Containment {
    /// This host's containment, detected on first use and shared by every hook after.
    pub fn host() -> Containment {
        static HOST: OnceLock<Containment> = OnceLock::new();
        HOST.get_or_init(|| {
            let c = detect();
            log::info!("hook containment: {}", c.describe());
            c
        })
        .clone()
    }

    /// The process-group fallback, whatever the host offers (for tests and for operators
    /// who want it).
    pub fn process_group(reason: &str) -> Containment {
        Containment::ProcessGroup {
            reason: Arc::from(reason),
        }
    }

    /// The same cgroup set-up, but stopping a hook by freezing and killing pid by pid instead
    /// of `cgroup.kill` (the path for kernels before 5.14). Unchanged for the fallback.
    pub fn without_cgroup_kill(&self) -> Containment {
        match self {
            Containment::Cgroup(c) => Containment::Cgroup(Arc::new(Cgroups {
                mode: c.mode,
                base: c.base.clone(),
                use_kill_file: false,
                v2_pids: c.v2_pids,
                v2_memory: c.v2_memory,
                v1_pids: c.v1_pids.clone(),
                v1_memory: c.v1_memory.clone(),
            })),
            other => other.clone(),
        }
    }

    /// The cgroup mode, or `None` for the process-group fallback.
    pub fn cgroup_mode(&self) -> Option<CgroupMode> {
        match self {
            Containment::Cgroup(c) => Some(c.mode),
            Containment::ProcessGroup { .. } => None,
        }
    }

    /// Whether a `pids_max` cap is enforced in this mode.
    pub fn enforces_pids(&self) -> bool {
        matches!(self, Containment::Cgroup(c) if c.v2_pids || c.v1_pids.is_some())
    }

    /// One line for the log: the mode and where hook cgroups go.
    pub fn describe(&self) -> String {
        match self {
            Containment::Cgroup(c) => format!(
                "{} cgroup v2 under {} (stop by {}; pids cap {}, memory cap {})",
                match c.mode {
                    CgroupMode::Unified => "unified",
                    CgroupMode::Hybrid => "hybrid",
                },
                c.base.display(),
                if c.use_kill_file {
                    "cgroup.kill"
                } else {
                    "freeze and kill"
                },
                on_off(c.v2_pids || c.v1_pids.is_some()),
                on_off(c.v2_memory || c.v1_memory.is_some()),
            ),
            Containment::ProcessGroup { reason } => {
                format!("process group and subreaper, no cgroup ({reason}); caps are not enforced")
            }
        }
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "enforced"
    } else {
        "not available"
    }
}

/// One mount from /proc/self/mountinfo: where, which file system, its super options.
struct Mount {
    point: PathBuf,
    fstype: String,
    options: String,
}

fn mounts() -> io::Result<Vec<Mount>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = left.split(' ').nth(4) else {
            continue;
        };
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or_default().to_string();
        let options = r.nth(1).unwrap_or_default().to_string();
        out.push(Mount {
            point: PathBuf::from(unescape_mount(point)),
            fstype,
            options,
        });
    }
    Ok(out)
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The agent's own cgroup paths from /proc/self/cgroup: the v2 one and each v1 controller's.
fn own_cgroups() -> io::Result<(Option<String>, BTreeMap<String, String>)> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    let mut v2 = None;
    let mut v1 = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && ctrls.is_empty() {
            v2 = Some(path.to_string());
        } else {
            for c in ctrls.split(',') {
                v1.insert(c.to_string(), path.to_string());
            }
        }
    }
    Ok((v2, v1))
}

fn join_cgroup(mount: &Path, path: &str) -> PathBuf {
    mount.join(path.trim_start_matches('/'))
}

fn detect() -> Containment {
    match detect_cgroups() {
        Ok(c) => Containment::Cgroup(Arc::new(c)),
        Err(reason) => Containment::ProcessGroup {
            reason: Arc::from(reason.as_str()),
        },
    }
}

fn detect_cgroups() -> Result<Cgroups, String> {
    let mounts = mounts().map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let v2_mounts: Vec<&Mount> = mounts.iter().filter(|m| m.fstype == "cgroup2").collect();
    let unified_root = Path::new("/sys/fs/cgroup");
    let (mount, mode) = if let Some(m) = v2_mounts.iter().find(|m| m.point == unified_root) {
        (m.point.clone(), CgroupMode::Unified)
    } else if let Some(m) = v2_mounts.first() {
        (m.point.clone(), CgroupMode::Hybrid)
    } else {
        return Err("no cgroup2 file system is mounted".into());
    };
    let (v2_path, v1_paths) =
        own_cgroups().map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let v2_path = v2_path.ok_or("the agent is in no cgroup2 group (/proc/self/cgroup)")?;
    let agent_dir = join_cgroup(&mount, &v2_path);

    // cgroup v2 lets a non-root cgroup either hold processes or hand controllers to its
    // children. Under systemd the agent sits in its (delegated) unit cgroup: it moves itself
    // into a leaf of it first, so the unit's cgroup can enable pids and memory for hooks.
    let mut v2_pids = false;
    let mut v2_memory = false;
    if mode == CgroupMode::Unified {
        if v2_path != "/" {
            let leaf = agent_dir.join("pier-agent");
            let moved =
                fs::create_dir_all(&leaf).and_then(|()| fs::write(leaf.join("cgroup.procs"), "0"));
            if let Err(e) = moved {
                log::warn!(
                    "cannot move the agent into {}: {e}; hook caps will not be enforced",
                    leaf.display()
                );
            }
        }
        let available =
            fs::read_to_string(agent_dir.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| available.split_whitespace().any(|a| a == c);
        v2_pids =
            has("pids") && fs::write(agent_dir.join("cgroup.subtree_control"), "+pids").is_ok();
        v2_memory =
            has("memory") && fs::write(agent_dir.join("cgroup.subtree_control"), "+memory").is_ok();
    }
    let base = agent_dir.join(HOOKS_DIR);
    fs::create_dir_all(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    if v2_pids {
        v2_pids = fs::write(base.join("cgroup.subtree_control"), "+pids").is_ok();
    }
    if v2_memory {
        v2_memory = fs::write(base.join("cgroup.subtree_control"), "+memory").is_ok();
    }
    // A trial hook cgroup proves the tree is writable for us (not read-only, not someone
    // else's), and whether the kernel has cgroup.kill.
    let trial = base.join(format!("probe-{}", std::process::id()));
    fs::create_dir(&trial)
        .or_else(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(|e| format!("cannot create a cgroup under {}: {e}", base.display()))?;
    let use_kill_file = trial.join("cgroup.kill").exists();
    let _ = fs::remove_dir(&trial);

    let v1_dir = |controller: &str| -> Option<PathBuf> {
        if mode != CgroupMode::Hybrid {
            return None;
        }
        let m = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == controller))?;
        let dir = join_cgroup(&m.point, v1_paths.get(controller)?).join(HOOKS_DIR);
        fs::create_dir_all(&dir).ok()?;
        Some(dir)
    };
    Ok(Cgroups {
        mode,
        base,
        use_kill_file,
        v2_pids,
        v2_memory,
        v1_pids: v1_dir("pids"),
        v1_memory: v1_dir("memory"),
    })
}

/// What the journal keeps of a running hook, written before the script starts (cgroups) and
/// again once it has a pid, so that a later run of the agent can stop what is left of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookTrace {
    /// The script, as the AppSpec writes it.
    pub script: String,
    /// The hook's cgroups (the v2 one first); empty in the process-group fallback.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// The script's process group (and session) id, once started.
    #[serde(default)]
    pub pgid: Option<i32>,
    /// The script's start time in clock ticks since boot (/proc/PID/stat field 22): only
    /// processes started at or after it can be the hook's, so a recycled pid is never hit.
    #[serde(default)]
    pub start_ticks: Option<u64>,
    /// The kernel's boot id: after a reboot nothing of the hook is left.
    pub boot_id: String,
}

/// The cgroups hooks run in, made before the first script starts (see `HookSlot`: one cell
/// serves the hooks of a deployment one after another while each leaves it empty).
pub(crate) struct Cell {
    cgroups: Arc<Cgroups>,
    /// The caps it was made with.
    limits: HookLimits,
    /// The hook's cgroup directories, v2 first.
    dirs: Vec<PathBuf>,
    /// The v2 directory, open for `clone3` to create the script inside it.
    dir: File,
    /// `cgroup.procs` of each, open for a forked child to join with `0`.
    procs: Vec<File>,
}

static SEQ: AtomicU64 = AtomicU64::new(0);
static CAPS_WARNED: AtomicBool = AtomicBool::new(false);

fn warn_caps_once(what: &str) {
    if !CAPS_WARNED.swap(true, Ordering::Relaxed) {
        log::warn!("hook caps: {what}; the cap is not enforced (logged once)");
    }
}

impl Cell {
    /// Makes the cgroups of one hook run and sets its caps.
    pub(crate) fn create(cgroups: &Arc<Cgroups>, limits: HookLimits) -> io::Result<Cell> {
        sweep(cgroups);
        let name = format!(
            "hook-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let v2 = cgroups.base.join(&name);
        make_dir(&v2)?;
        let dir = File::open(&v2)?;
        let mut cell = Cell {
            cgroups: cgroups.clone(),
            limits,
            dirs: Vec::new(),
            dir,
            procs: Vec::new(),
        };
        cell.add(v2.clone())?;
        if let Some(n) = limits.pids_max {
            if cgroups.v2_pids {
                fs::write(v2.join("pids.max"), n.to_string())?;
            } else if let Some(base) = &cgroups.v1_pids {
                let d = base.join(&name);
                make_dir(&d)?;
                fs::write(d.join("pids.max"), n.to_string())?;
                cell.add(d)?;
            } else {
                warn_caps_once("pids_max is set but no pids controller is available");
            }
        }
        if let Some(n) = limits.memory_max {
            if cgroups.v2_memory {
                fs::write(v2.join("memory.max"), n.to_string())?;
            } else if let Some(base) = &cgroups.v1_memory {
                let d = base.join(&name);
                make_dir(&d)?;
                fs::write(d.join("memory.limit_in_bytes"), n.to_string())?;
                cell.add(d)?;
            } else {
                warn_caps_once("memory_max is set but no memory controller is available");
            }
        }
        Ok(cell)
    }

    fn add(&mut self, dir: PathBuf) -> io::Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        self.dirs.push(dir);
        self.procs.push(f);
        Ok(())
    }

    pub(crate) fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The descriptors a forked child writes `0` to before exec (v2 first).
    pub(crate) fn join_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// The v2 directory, for `clone3(CLONE_INTO_CGROUP)`.
    pub(crate) fn dir_fd(&self) -> RawFd {
        self.dir.as_raw_fd()
    }

    /// Whether this cell was made for the same cgroup set-up and caps (so a hook with other
    /// caps never runs under this one's).
    pub(crate) fn serves(&self, cgroups: &Arc<Cgroups>, limits: HookLimits) -> bool {
        Arc::ptr_eq(&self.cgroups, cgroups) && self.limits == limits
    }

    fn v2(&self) -> &Path {
        &self.dirs[0]
    }

    /// Sends `signal` to every process in the hook's cgroup.
    pub(crate) fn signal_all(&self, signal: Signal) {
        for pid in procs_of(self.v2()) {
            let _ = kill(pid, signal);
        }
    }

    /// True when no process is left in the cgroup (or it is gone).
    pub(crate) fn is_empty(&self) -> bool {
        is_empty(self.v2())
    }

    /// One round of SIGKILL to every process in the cgroup; repeat until [`Cell::is_empty`],
    /// then [`Cell::thaw`].
    pub(crate) fn kill_all(&self) {
        kill_once(self.v2(), self.cgroups.use_kill_file);
    }

    /// Undoes the freeze of the freeze-and-kill path.
    pub(crate) fn thaw(&self) {
        thaw(self.v2());
    }

    /// What the drop guard needs to kill the cgroup without the cell.
    pub(crate) fn kill_handle(&self) -> (PathBuf, bool) {
        (self.v2().to_path_buf(), self.cgroups.use_kill_file)
    }

    /// Removes the cgroups if nothing is left in them; a background process a successful hook
    /// started keeps its cgroup until it exits, and a later sweep removes it.
    pub(crate) fn release(self) {
        if self.is_empty() {
            for d in self.dirs.iter().rev() {
                let _ = fs::remove_dir(d);
            }
        }
    }
}

fn make_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir(dir).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
}

/// Removes empty hook cgroups this agent process (or one no longer running) left behind.
/// Another live process's cgroups are left alone: one may be about to receive its hook.
fn sweep(cgroups: &Cgroups) {
    let me = std::process::id().to_string();
    let bases = [
        Some(&cgroups.base),
        cgroups.v1_pids.as_ref(),
        cgroups.v1_memory.as_ref(),
    ];
    for base in bases.into_iter().flatten() {
        let Ok(entries) = fs::read_dir(base) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(owner) = name.strip_prefix("hook-").and_then(|r| r.split('-').next()) else {
                continue;
            };
            if owner != me && Path::new("/proc").join(owner).exists() {
                continue;
            }
            if owner == me
                && ACTIVE
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .contains(&name)
            {
                continue;
            }
            if is_empty(&e.path()) {
                let _ = fs::remove_dir(e.path());
            }
        }
    }
}

/// Names of this process's hook cgroups whose script is running (the sweep leaves them).
static ACTIVE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Marks a cell's cgroup as in use until the guard drops.
pub(crate) struct Active(String);

impl Active {
    pub(crate) fn hold(cell: &Cell) -> Active {
        let name = cell
            .v2()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        ACTIVE
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.clone());
        Active(name)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        ACTIVE
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.0);
    }
}

fn procs_of(dir: &Path) -> Vec<Pid> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .map(Pid::from_raw)
        .collect()
}

fn is_empty(dir: &Path) -> bool {
    // cgroup.events' `populated` counts sub-cgroups too; cgroup.procs is the v1 fallback.
    match fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => events.lines().any(|l| l.trim() == "populated 0"),
        Err(_) => procs_of(dir).is_empty(),
    }
}

/// One round of killing everything in a v2 cgroup: `cgroup.kill`, or freeze it (so nothing in
/// it can fork meanwhile; SIGKILL still ends a frozen task) and SIGKILL each pid. Call again
/// until [`is_empty`], then [`thaw`].
fn kill_once(dir: &Path, use_kill_file: bool) {
    if use_kill_file && fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    let _ = fs::write(dir.join("cgroup.freeze"), "1");
    for pid in procs_of(dir) {
        let _ = kill(pid, Signal::SIGKILL);
    }
}

fn thaw(dir: &Path) {
    if dir.join("cgroup.freeze").exists() {
        let _ = fs::write(dir.join("cgroup.freeze"), "0");
    }
}

/// Kills everything in a cgroup and waits (bounded, blocking) until it is empty.
fn kill_cgroup(dir: &Path, use_kill_file: bool) {
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        kill_once(dir, use_kill_file);
        if is_empty(dir) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    thaw(dir);
}

/// One process as /proc shows it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcInfo {
    pub(crate) pid: i32,
    pub(crate) ppid: i32,
    pub(crate) pgid: i32,
    pub(crate) sid: i32,
    pub(crate) start: u64,
    pub(crate) zombie: bool,
}

pub(crate) fn proc_info(pid: i32) -> Option<ProcInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything; fields follow the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state), so field N is f[N - 3].
    Some(ProcInfo {
        pid,
        ppid: f.get(1)?.parse().ok()?,
        pgid: f.get(2)?.parse().ok()?,
        sid: f.get(3)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
        zombie: *f.first()? == "Z",
    })
}

fn all_procs() -> Vec<ProcInfo> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_info)
        .collect()
}

/// The kernel's boot id (read once: it cannot change while this process lives).
pub(crate) fn boot_id() -> String {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
    .clone()
}

/// The process-group fallback's view of one hook: every descendant seen so far, by pid and
/// start time, so that one that detached (`setsid`) and lost its parent is still known.
pub(crate) struct Watch {
    leader: ProcInfo,
    seen: BTreeMap<i32, u64>,
}

impl Watch {
    /// Starts watching the hook whose script is `pid`, making the agent a child subreaper
    /// first so that orphans of the hook come to it rather than to init.
    pub(crate) fn new(pid: i32) -> Option<Watch> {
        become_subreaper();
        let leader = proc_info(pid)?;
        let mut w = Watch {
            leader,
            seen: BTreeMap::new(),
        };
        w.scan();
        Some(w)
    }

    /// Adds what /proc shows now: children of anything known, and anything in the hook's
    /// session or process group started since the hook.
    pub(crate) fn scan(&mut self) {
        let procs = all_procs();
        let l = self.leader;
        loop {
            let before = self.seen.len();
            for p in &procs {
                if p.start < l.start || self.seen.contains_key(&p.pid) {
                    continue;
                }
                let related = p.pid == l.pid
                    || p.ppid == l.pid
                    || p.sid == l.pid
                    || p.pgid == l.pid
                    || self.seen.contains_key(&p.ppid);
                if related {
                    self.seen.insert(p.pid, p.start);
                }
            }
            if self.seen.len() == before {
                break;
            }
        }
        self.seen
            .retain(|&pid, &mut start| proc_info(pid).is_some_and(|p| p.start == start));
    }

    /// Sends `signal` to the hook's group and every descendant known.
    pub(crate) fn signal_all(&mut self, signal: Signal) {
        self.scan();
        let _ = killpg(Pid::from_raw(self.leader.pid), signal);
        for (&pid, &start) in &self.seen {
            if proc_info(pid).is_some_and(|p| p.start == start && !p.zombie) {
                let _ = kill(Pid::from_raw(pid), signal);
            }
        }
        self.reap();
    }

    /// True when nothing of the hook is left running.
    pub(crate) fn is_empty(&mut self) -> bool {
        self.scan();
        self.reap();
        self.seen
            .iter()
            .all(|(&pid, &start)| proc_info(pid).is_none_or(|p| p.start != start || p.zombie))
    }

    /// Hands what is still running (a successful hook's background service) to the adopted
    /// set, whose zombies the agent reaps once they exit.
    pub(crate) fn release(mut self) {
        self.scan();
        let mut adopted = ADOPTED.lock().unwrap_or_else(PoisonError::into_inner);
        for (pid, start) in self.seen {
            if pid != self.leader.pid {
                adopted.insert(pid, start);
            }
        }
        drop(adopted);
        reap_adopted();
    }

    /// Reaps the known descendants that died as the agent's children (never the script
    /// itself, which tokio reaps).
    fn reap(&mut self) {
        let me = std::process::id() as i32;
        for (&pid, &start) in &self.seen {
            if pid == self.leader.pid {
                continue;
            }
            if proc_info(pid).is_some_and(|p| p.zombie && p.ppid == me && p.start == start) {
                let _ = nix::sys::wait::waitpid(
                    Pid::from_raw(pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
            }
        }
    }
}

/// Descendants of finished hooks that re-parented to the agent, by pid and start time.
static ADOPTED: Mutex<BTreeMap<i32, u64>> = Mutex::new(BTreeMap::new());

/// Reaps adopted processes that have exited, and forgets the ones that are gone.
pub(crate) fn reap_adopted() {
    let me = std::process::id() as i32;
    let mut adopted = ADOPTED.lock().unwrap_or_else(PoisonError::into_inner);
    adopted.retain(|&pid, &mut start| match proc_info(pid) {
        Some(p) if p.start == start => {
            if p.zombie && p.ppid == me {
                let _ = nix::sys::wait::waitpid(
                    Pid::from_raw(pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
                false
            } else {
                true
            }
        }
        _ => false,
    });
}

fn become_subreaper() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integers and changes only
        // this process's attribute.
        #[allow(unsafe_code)]
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if r != 0 {
            log::warn!(
                "cannot make the agent a child subreaper: {}; a hook's orphans go to init",
                io::Error::last_os_error()
            );
        }
    });
}

/// Stops whatever an interrupted hook left running, from what the journal kept of it: its
/// cgroups are killed whole; the processes of its session or process group that started no
/// earlier than it are killed, unless the group's number now belongs to a process with
/// another start time (a recycled pid). Nothing is done after a reboot.
/// Returns how many processes were signalled.
pub fn stop_leftovers(trace: &HookTrace) -> usize {
    if trace.boot_id != boot_id() {
        return 0;
    }
    let mut count = 0;
    for dir in &trace.cgroups {
        let procs = procs_of(dir);
        if procs.is_empty() {
            let _ = fs::remove_dir(dir);
            continue;
        }
        count += procs.len();
        if fs::metadata(dir.join("cgroup.kill")).is_ok()
            || fs::metadata(dir.join("cgroup.freeze")).is_ok()
        {
            kill_cgroup(dir, true);
        } else {
            // A v1 hierarchy: kill pid by pid until empty.
            let deadline = Instant::now() + KILL_WAIT;
            while !procs_of(dir).is_empty() && Instant::now() < deadline {
                for pid in procs_of(dir) {
                    let _ = kill(pid, Signal::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = fs::remove_dir(dir);
    }
    if let (Some(pgid), Some(start)) = (trace.pgid, trace.start_ticks) {
        // The script led its session and group. While either has a member the kernel does
        // not hand its number out again, so a process now holding the number with another
        // start time means the hook's group is empty and the pid was recycled: hands off.
        if proc_info(pgid).is_some_and(|p| p.start != start) {
            return count;
        }
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let left: Vec<ProcInfo> = all_procs()
                .into_iter()
                .filter(|p| (p.pgid == pgid || p.sid == pgid) && p.start >= start && !p.zombie)
                .collect();
            if left.is_empty() || Instant::now() >= deadline {
                break;
            }
            for p in &left {
                count += 1;
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    count
}

/// One round of killing a cgroup from a drop guard (no waiting).
pub(crate) fn kill_handle_once(handle: &(PathBuf, bool)) {
    kill_once(&handle.0, handle.1);
    thaw(&handle.0);
}
