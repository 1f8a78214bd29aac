//! Starting a hook's script process straight inside its cgroup, with `clone3` and
//! `CLONE_INTO_CGROUP` (Linux 5.7+), so that it never has to migrate there.
//!
//! Why not fork and let the child write `0` to `cgroup.procs` before exec, as the fallback in
//! `command` does: a migration takes the kernel's cgroup threadgroup lock for writing, which
//! waits for an RCU grace period whenever the lock has been idle for one. Hooks start a few
//! milliseconds apart, so every one of them paid a whole grace period (measured 1 to 25 ms on a
//! busy 2-CPU VM, several times the cost of the fork and exec themselves). Created inside the
//! cgroup, the child is never anywhere else, and nothing it starts can be either.
//!
//! The child is a copy of the agent like a fork's (no `CLONE_VM`), and runs only raw system
//! calls on memory prepared before the clone: no allocation, no lock, and no glibc wrapper that
//! consults its own thread list (`setuid` in glibc signals every thread of the process, which
//! in this one-thread copy would wait forever), so credentials change through the raw
//! `setgroups`, `setresgid` and `setresuid` calls. The outcome of the exec comes back on a
//! close-on-exec pipe, as in std's spawn: EOF means the script runs, four bytes are the errno.
//!
//! Where the kernel or a seccomp filter refuses `clone3` (containers often answer ENOSYS so
//! that callers fall back), [`unavailable`] turns true and the caller uses the fork path.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

/// `struct clone_args` of linux/sched.h, up to `cgroup` (CLONE_ARGS_SIZE_VER2, 88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Set once `clone3` into a cgroup has been refused for a reason that will not change.
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);

/// True when this kernel (or its seccomp filter) has refused `clone3` into a cgroup: use the
/// fork path.
pub(crate) fn unavailable() -> bool {
    UNAVAILABLE.load(Ordering::Relaxed)
}

/// The credentials the child switches to before exec (resolved in the parent).
#[derive(Debug, Clone)]
pub(crate) struct Creds {
    pub(crate) uid: libc::uid_t,
    pub(crate) gid: libc::gid_t,
    pub(crate) groups: Vec<libc::gid_t>,
}

/// Everything the child needs, built before the clone.
pub(crate) struct Exec {
    pub(crate) program: CString,
    pub(crate) argv: Vec<CString>,
    pub(crate) envp: Vec<CString>,
    pub(crate) cwd: CString,
    pub(crate) creds: Option<Creds>,
}

/// What [`spawn`] could not do.
pub(crate) enum SpawnError {
    /// `clone3` into a cgroup is not available here (logged once); nothing was started: use
    /// the fork path.
    Unsupported,
    /// The script was not started (exec failed in the child, or the clone did).
    Failed(io::Error),
}

/// A running script started by [`spawn`], reaped by [`Script::wait`].
pub(crate) struct Script {
    pid: libc::pid_t,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
    pub(crate) stdout: Option<pipe::Receiver>,
    pub(crate) stderr: Option<pipe::Receiver>,
}

impl Script {
    pub(crate) fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Waits until the script has exited and reaps it (cancel-safe).
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.status {
                return Ok(s);
            }
            let mut ready = self.pidfd.readable().await?;
            let mut raw = 0;
            // SAFETY: waitpid on our own child, with a valid pointer to an int.
            #[allow(unsafe_code)]
            let r = unsafe { libc::waitpid(self.pid, &mut raw, libc::WNOHANG) };
            match r {
                0 => ready.clear_ready(),
                r if r == self.pid => self.status = Some(ExitStatus::from_raw(raw)),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if self.status.is_none() {
            // Not reaped (it outlived even SIGKILL's wait): reaped by a later spawn.
            ORPHANS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(self.pid);
        }
    }
}

/// Scripts given up on before they could be reaped.
static ORPHANS: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

fn reap_orphans() {
    let mut orphans = ORPHANS.lock().unwrap_or_else(PoisonError::into_inner);
    orphans.retain(|&pid| {
        let mut raw = 0;
        // SAFETY: waitpid on a child of ours that was never reaped.
        #[allow(unsafe_code)]
        let r = unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) };
        r == 0
    });
}

fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success.
    #[allow(unsafe_code)]
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    #[allow(unsafe_code)]
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts `exec` inside the cgroup directory `cgroup` (an `O_DIRECTORY` descriptor of a cgroup2
/// directory) with stdin on /dev/null and stdout/stderr on pipes, in its own session; the
/// child also writes `0` to each of `join` (cgroup v1 `cgroup.procs` files) before switching
/// user. Must be called inside the tokio runtime (the pipes and the pidfd register with it).
pub(crate) fn spawn(exec: &Exec, cgroup: RawFd, join: &[RawFd]) -> Result<Script, SpawnError> {
    reap_orphans();
    let failed = SpawnError::Failed;
    let devnull = std::fs::File::open("/dev/null").map_err(failed)?;
    let (out_r, out_w) = pipe_cloexec().map_err(failed)?;
    let (err_r, err_w) = pipe_cloexec().map_err(failed)?;
    let (report_r, report_w) = pipe_cloexec().map_err(failed)?;

    // Everything the child touches is made here: pointer arrays, the empty signal set.
    let argv: Vec<*const libc::c_char> = exec
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = exec
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let child = Child {
        program: &exec.program,
        argv: &argv,
        envp: &envp,
        cwd: &exec.cwd,
        creds: exec.creds.as_ref(),
        stdin: devnull.as_raw_fd(),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        report: report_w.as_raw_fd(),
        join,
    };

    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: CLONE_PIDFD | CLONE_INTO_CGROUP,
        pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 with a valid, fully initialised clone_args of the size given and no
    // CLONE_VM: the child gets a copy of this address space, as with fork, and runs only
    // `Child::exec`, which never returns.
    #[allow(unsafe_code)]
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of!(args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid == 0 {
        child.exec();
    }
    if pid < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            // Transient: the fork path would meet the same.
            Some(libc::EAGAIN | libc::ENOMEM | libc::EINTR) => SpawnError::Failed(e),
            _ => {
                if !UNAVAILABLE.swap(true, Ordering::Relaxed) {
                    log::info!(
                        "hooks: clone3 into a cgroup is not available ({e}); hook processes join their cgroup after fork"
                    );
                }
                SpawnError::Unsupported
            }
        });
    }
    let pid = pid as libc::pid_t;
    // SAFETY: with CLONE_PIDFD the kernel stored a new descriptor owned by nobody else.
    #[allow(unsafe_code)]
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop((devnull, out_w, err_w, report_w));

    // EOF: exec succeeded (the pipe closed on exec). Four bytes: the child's errno.
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: read into the rest of a local buffer.
        #[allow(unsafe_code)]
        let n = unsafe {
            libc::read(
                report_r.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
            )
        };
        match n {
            0 => break,
            n if n > 0 => got += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    break;
                }
            }
        }
    }
    if got == buf.len() {
        let mut raw = 0;
        // SAFETY: reap the child that failed before exec.
        #[allow(unsafe_code)]
        unsafe {
            libc::waitpid(pid, &mut raw, 0)
        };
        return Err(failed(io::Error::from_raw_os_error(i32::from_ne_bytes(
            buf,
        ))));
    }

    let reaping = |e: io::Error| {
        // The script runs but cannot be watched: kill and reap it rather than leave it.
        // SAFETY: our own child, signalled and reaped once.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            let mut raw = 0;
            libc::waitpid(pid, &mut raw, 0);
        }
        failed(e)
    };
    // SAFETY: an OwnedFd keeps returning the same open descriptor until the AsyncFd drops it.
    #[allow(unsafe_code)]
    let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|e| reaping(e.into()))?;
    let stdout = pipe::Receiver::from_owned_fd(out_r).map_err(reaping)?;
    let stderr = pipe::Receiver::from_owned_fd(err_r).map_err(reaping)?;
    Ok(Script {
        pid,
        pidfd,
        status: None,
        stdout: Some(stdout),
        stderr: Some(stderr),
    })
}

/// What the child runs between the clone and exec: raw pointers and descriptors only.
struct Child<'a> {
    program: &'a CStr,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    cwd: &'a CStr,
    creds: Option<&'a Creds>,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    report: RawFd,
    join: &'a [RawFd],
}

impl Child<'_> {
    /// In the cloned child: set up, exec, or report the errno and exit. Never returns.
    #[allow(unsafe_code)]
    fn exec(&self) -> ! {
        // SAFETY: every call below is a raw system call (or a thin glibc wrapper of one) on
        // memory prepared before the clone; nothing allocates or takes a lock.
        unsafe {
            let errno = self.setup();
            let e = errno.to_ne_bytes();
            libc::write(self.report, e.as_ptr().cast(), e.len());
            libc::_exit(127)
        }
    }

    /// Returns the errno of the step that failed (exec only returns on failure).
    #[allow(unsafe_code)]
    unsafe fn setup(&self) -> i32 {
        let fail = || *libc::__errno_location();
        // The agent ignores SIGPIPE and its threads may block signals; a script gets neither.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            return libc::EINVAL;
        }
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        for (from, to) in [(self.stdin, 0), (self.stdout, 1), (self.stderr, 2)] {
            // dup2 onto itself keeps close-on-exec: clear it instead.
            let r = if from == to {
                libc::fcntl(to, libc::F_SETFD, 0)
            } else {
                libc::dup2(from, to)
            };
            if r < 0 {
                return fail();
            }
        }
        if libc::chdir(self.cwd.as_ptr()) != 0 {
            return fail();
        }
        if libc::setsid() < 0 {
            return fail();
        }
        for &fd in self.join {
            if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                return fail();
            }
        }
        if let Some(c) = self.creds {
            if libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setresgid, c.gid, c.gid, c.gid) != 0
                || libc::syscall(libc::SYS_setresuid, c.uid, c.uid, c.uid) != 0
            {
                return fail();
            }
        }
        libc::execve(
            self.program.as_ptr(),
            self.argv.as_ptr(),
            self.envp.as_ptr(),
        );
        fail()
    }
}
