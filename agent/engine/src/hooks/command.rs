//! Building the command line and process attributes for one hook script: how it is executed
//! (directly, or through its `#!` interpreter when it lacks the executable bit), as whom
//! (`runas`, switched natively in the child before exec), in which environment (cleared, then
//! only what the caller gives plus the user's identity), and in its own session so that the
//! whole process group can be signalled.

use std::ffi::{CString, OsString};
use std::io::{self, Read};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid, User};
use tokio::process::Command;

use super::spawn;
use super::{HookError, HookRun};
use crate::bundle::confined::{self, Confined, ConfinedError};

/// PATH given to a script when the caller's environment has none: the usual system
/// directories, so that scripts written for CodeDeploy (which run with a login-like PATH) find
/// their tools.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How far into a script the `#!` line is looked for; Linux itself reads 256 bytes.
const SHEBANG_MAX: usize = 512;

/// The credentials a child switches to before exec, resolved in the parent because looking up
/// users and groups is not safe between fork and exec.
#[derive(Debug, Clone)]
struct Switch {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
}

/// A command ready to spawn, and what it will run as (for the log).
pub(crate) struct Prepared {
    /// For the fork path: std/tokio's spawn, the child joining its cgroups before exec.
    pub(crate) command: Command,
    /// For `clone3` into the hook's cgroup (see `spawn`); `None` when the program must be
    /// looked up in PATH, which only the fork path does.
    pub(crate) exec: Option<spawn::Exec>,
    /// The user name the script runs as, when known.
    pub(crate) user: Option<String>,
    /// True when the script itself is exec'd (not its `#!` interpreter).
    pub(crate) direct: bool,
}

/// Checks the script and the user and builds the command; nothing is started yet.
/// `via_shebang` forces running the `#!` interpreter even when the script has an executable
/// bit (for a retry when exec'ing it was refused).
/// `join` are `cgroup.procs` descriptors the child writes `0` to, joining the hook's cgroups
/// before it execs anything.
pub(crate) fn prepare(
    run: &HookRun,
    via_shebang: bool,
    join: Vec<RawFd>,
) -> Result<Prepared, HookError> {
    let (program, args) = program_for(run, via_shebang)?;
    let direct = args.is_empty();
    let (switch, user) = resolve_user(run)?;

    // The environment, in the order it is set: later entries win, as with Command::env.
    let mut env: Vec<(OsString, OsString)> = run
        .env
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect();
    if !run.env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    // The identity must describe the user the script really runs as, so it wins over `env`.
    let name = user.as_ref().map(|u| u.name.clone());
    if let Some(u) = user {
        let shell = if u.shell.as_os_str().is_empty() {
            PathBuf::from("/bin/sh")
        } else {
            u.shell
        };
        env.push(("HOME".into(), u.dir.into_os_string()));
        env.push(("USER".into(), u.name.clone().into()));
        env.push(("LOGNAME".into(), u.name.into()));
        env.push(("SHELL".into(), shell.into_os_string()));
    }

    let exec = raw_exec(run, &program, &args, &env, switch.as_ref());
    let mut command = Command::new(&program);
    command
        .args(&args)
        .current_dir(&run.working_dir)
        .env_clear();
    for (k, v) in &env {
        command.env(k, v);
    }
    isolate(&mut command, switch, join);
    Ok(Prepared {
        command,
        exec,
        user: name,
        direct,
    })
}

/// The same command for `clone3`: C strings, the environment deduplicated (last wins), the
/// program's own path as argv[0]. `None` when the program has no `/` (a PATH lookup) or a
/// string holds a NUL (the fork path reports that).
fn raw_exec(
    run: &HookRun,
    program: &Path,
    args: &[OsString],
    env: &[(OsString, OsString)],
    switch: Option<&Switch>,
) -> Option<spawn::Exec> {
    use std::os::unix::ffi::OsStrExt;
    let c = |b: &[u8]| CString::new(b).ok();
    let program_bytes = program.as_os_str().as_bytes();
    if !program_bytes.contains(&b'/') {
        return None;
    }
    let mut argv = vec![c(program_bytes)?];
    for a in args {
        argv.push(c(a.as_bytes())?);
    }
    let mut envp: Vec<CString> = Vec::with_capacity(env.len());
    for (i, (k, v)) in env.iter().enumerate() {
        if env[i + 1..].iter().any(|(later, _)| later == k) {
            continue;
        }
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp.push(CString::new(kv).ok()?);
    }
    Some(spawn::Exec {
        program: c(program_bytes)?,
        argv,
        envp,
        cwd: c(run.working_dir.as_os_str().as_bytes())?,
        creds: switch.map(|s| spawn::Creds {
            uid: s.uid.as_raw(),
            gid: s.gid.as_raw(),
            groups: s.groups.iter().map(|g| g.as_raw()).collect(),
        }),
    })
}

/// Decides how the script is executed: itself when it has an executable bit, else its `#!`
/// interpreter with the optional argument and the script's path.
///
/// The script is first opened beneath the revision root ([`Confined`]): a location that is,
/// or passes through, a symlink leading out of the bundle is refused here, right before the
/// spawn, and its `#!` line is read from that same open file. The script is then exec'd by
/// its path in the revision, not through `/proc/self/fd/N` or `fexecve`: the script sees the
/// `$0` CodeDeploy gives it (scripts do `cd "$(dirname "$0")"`), where an fd path would
/// break them, and an interpreter cannot reopen a close-on-exec fd. The window between the
/// check and the exec only matters to someone who can already rewrite the revision.
fn program_for(run: &HookRun, via_shebang: bool) -> Result<(PathBuf, Vec<OsString>), HookError> {
    let refused = |source| HookError::Refused {
        location: run.location.clone(),
        source,
    };
    let unreadable = |source| HookError::Unreadable {
        location: run.location.clone(),
        script: run.script.clone(),
        source,
    };
    let Some(rel) = run
        .script
        .strip_prefix(&run.working_dir)
        .ok()
        .and_then(Path::to_str)
    else {
        return Err(refused(ConfinedError::Escapes {
            entry: confined::show(&run.script.to_string_lossy()),
            why: "it is not beneath the revision root",
        }));
    };
    let revision = Confined::open(&run.working_dir).map_err(unreadable)?;
    let file = revision.open_file(rel).map_err(|e| match e {
        ConfinedError::Missing { .. } => HookError::ScriptMissing {
            location: run.location.clone(),
            script: run.script.clone(),
        },
        ConfinedError::NotRegular { .. } => HookError::NotAFile {
            location: run.location.clone(),
            script: run.script.clone(),
        },
        ConfinedError::Io { source, .. } => unreadable(source),
        escape @ ConfinedError::Escapes { .. } => refused(escape),
    })?;
    let meta = file.metadata().map_err(unreadable)?;
    if !via_shebang && meta.permissions().mode() & 0o111 != 0 {
        return Ok((run.script.clone(), Vec::new()));
    }
    let mut head = Vec::with_capacity(SHEBANG_MAX);
    file.take(SHEBANG_MAX as u64)
        .read_to_end(&mut head)
        .map_err(unreadable)?;
    match parse_shebang(&head) {
        Some((interpreter, arg)) => {
            let mut args: Vec<OsString> = arg.into_iter().collect();
            args.push(run.script.clone().into_os_string());
            Ok((interpreter, args))
        }
        None => Err(HookError::NotExecutable {
            location: run.location.clone(),
            script: run.script.clone(),
        }),
    }
}

/// Parses a `#!` line as Linux does: the interpreter is the first word, everything after it
/// (trimmed) is one optional argument. A trailing `\r` (a script saved with CRLF) is dropped,
/// which is kinder than the kernel's "bad interpreter".
pub(crate) fn parse_shebang(head: &[u8]) -> Option<(PathBuf, Option<OsString>)> {
    let rest = head.strip_prefix(b"#!")?;
    let line = rest.split(|&b| b == b'\n').next()?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let is_space = |b: &u8| *b == b' ' || *b == b'\t';
    let start = line.iter().position(|b| !is_space(b))?;
    let line = &line[start..];
    let end = line.iter().position(is_space).unwrap_or(line.len());
    let interpreter = PathBuf::from(OsString::from_vec(line[..end].to_vec()));
    let arg = line[end..].iter().position(|b| !is_space(b)).map(|s| {
        let a = &line[end + s..];
        let e = a.iter().rposition(|b| !is_space(b)).map_or(0, |e| e + 1);
        OsString::from_vec(a[..e].to_vec())
    });
    Some((interpreter, arg))
}

/// Resolves `runas` (or the agent's own user) to a passwd entry, and to the credentials the
/// child must switch to when that user is not the one the agent runs as.
fn resolve_user(run: &HookRun) -> Result<(Option<Switch>, Option<User>), HookError> {
    let me = Uid::effective();
    let Some(name) = &run.runas else {
        // Unknown to passwd (e.g. a bare uid in a container): run without identity variables.
        // Looked up once per process: the agent's own account does not change under it.
        static OWN: std::sync::OnceLock<Option<User>> = std::sync::OnceLock::new();
        return Ok((
            None,
            OWN.get_or_init(|| User::from_uid(me).ok().flatten())
                .clone(),
        ));
    };
    let user = match User::from_name(name) {
        Ok(Some(u)) => u,
        Ok(None) => {
            return Err(HookError::UnknownUser {
                user: name.clone(),
                location: run.location.clone(),
            })
        }
        Err(e) => {
            return Err(HookError::UserLookup {
                user: name.clone(),
                location: run.location.clone(),
                source: io::Error::from(e),
            })
        }
    };
    if user.uid == me {
        return Ok((None, Some(user)));
    }
    if !me.is_root() {
        return Err(HookError::NotRoot {
            user: name.clone(),
            location: run.location.clone(),
        });
    }
    let cname = CString::new(name.as_bytes()).map_err(|_| HookError::UnknownUser {
        user: name.clone(),
        location: run.location.clone(),
    })?;
    // Same list initgroups(3) would install, computed here rather than in the child.
    let groups =
        nix::unistd::getgrouplist(&cname, user.gid).map_err(|e| HookError::UserLookup {
            user: name.clone(),
            location: run.location.clone(),
            source: io::Error::from(e),
        })?;
    let switch = Switch {
        uid: user.uid,
        gid: user.gid,
        groups,
    };
    Ok((Some(switch), Some(user)))
}

/// Makes the child a session (and process group) leader with no controlling terminal, moves
/// it into the hook's cgroups (while still root), then drops to the `runas` user:
/// supplementary groups, then group, then user, so that no root privilege survives into the
/// script.
#[allow(unsafe_code)]
fn isolate(command: &mut Command, switch: Option<Switch>, join: Vec<RawFd>) {
    let hook = move || -> io::Result<()> {
        nix::unistd::setsid()?;
        for &fd in &join {
            // SAFETY: write(2) on a descriptor the parent opened (close-on-exec) and a static
            // buffer: async-signal-safe, no allocation.
            let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(s) = &switch {
            nix::unistd::setgroups(&s.groups)?;
            nix::unistd::setgid(s.gid)?;
            nix::unistd::setuid(s.uid)?;
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec. It only makes system calls
    // that are async-signal-safe (setsid, write, setgroups, setgid, setuid) on data allocated before
    // the fork, allocates nothing, and takes no lock; errors become io::Error from a raw errno
    // (no allocation) and are reported by std to the parent as a spawn failure.
    unsafe {
        command.pre_exec(hook);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(s: &str) -> Option<(String, Option<String>)> {
        parse_shebang(s.as_bytes()).map(|(i, a)| {
            (
                i.to_string_lossy().into_owned(),
                a.map(|a| a.to_string_lossy().into_owned()),
            )
        })
    }

    #[test]
    fn shebangs() {
        assert_eq!(sb("#!/bin/sh\necho"), Some(("/bin/sh".into(), None)));
        assert_eq!(
            sb("#! /bin/bash -e \n"),
            Some(("/bin/bash".into(), Some("-e".into())))
        );
        assert_eq!(
            sb("#!/usr/bin/env python3 -u\n"),
            Some(("/usr/bin/env".into(), Some("python3 -u".into())))
        );
        assert_eq!(sb("#!/bin/sh\r\n"), Some(("/bin/sh".into(), None)));
        assert_eq!(sb("echo hi\n"), None);
        assert_eq!(sb("#!   \n"), None);
        assert_eq!(sb(""), None);
    }
}
