//! The hook runner: `pier_engine::hooks::run` on real scripts in scratch directories, as
//! real users, with real signals, checking the processes themselves (by pid, in /proc) and the
//! real script log on disk.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pier_engine::hooks::{
    self, CgroupMode, Containment, HookError, HookLimits, HookResult, HookRun, HookTrace,
    ScriptLog, TraceSink,
};
use tokio_util::sync::CancellationToken;

use crate::support::{ensure_user, skip, Scratch};

/// A hook for `rel` in `scratch` with generous limits; tests tighten what they exercise.
fn hook(scratch: &Scratch, rel: &str) -> HookRun {
    HookRun {
        script: scratch.path().join(rel),
        location: rel.to_string(),
        working_dir: scratch.path().to_path_buf(),
        timeout: Duration::from_secs(60),
        runas: None,
        env: vec![("LIFECYCLE_EVENT".into(), "ApplicationStart".into())],
        kill_grace: Duration::from_secs(5),
        event: "ApplicationStart".into(),
        limits: HookLimits::default(),
        containment: Containment::host(),
    }
}

fn log_in(scratch: &Scratch) -> ScriptLog {
    ScriptLog::open(&scratch.path().join("logs/scripts.log"), 1 << 20, 3).unwrap()
}

fn read_log(scratch: &Scratch) -> String {
    std::fs::read_to_string(scratch.path().join("logs/scripts.log")).unwrap()
}

/// Waits (bounded) for a script to write a pid into `path`.
async fn pid_from(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse() {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no pid written to {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The state letter of a process from /proc, or None when it does not exist.
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; the state follows it.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Running (or sleeping, stopped...): anything but gone or a zombie.
fn alive(pid: i32) -> bool {
    !matches!(proc_state(pid), None | Some('Z') | Some('X'))
}

/// Kills a process group when dropped, so a failed assertion leaves nothing behind.
struct KillGroup(i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        // Never 0 or 1: killpg(0) would signal the test binary's own group.
        if self.0 <= 1 {
            return;
        }
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::SIGKILL,
        );
    }
}

#[tokio::test]
async fn env_is_only_what_is_given() {
    // The agent's own credentials are in its environment; they must not reach a hook. Set once
    // for the whole test binary (std serialises this with its own environment reads).
    // Left alone when a harness already set real test credentials.
    if std::env::var_os("AWS_SECRET_ACCESS_KEY").is_none() {
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "agent-secret-do-not-leak");
    }
    let s = Scratch::new();
    s.script(
        "scripts/env.sh",
        "#!/bin/sh\necho \"event=$LIFECYCLE_EVENT deployment=$DEPLOYMENT_ID\"\n\
         echo \"secret=${AWS_SECRET_ACCESS_KEY:-unset}\"\necho \"path=$PATH\"\n\
         echo \"cwd=$(pwd)\"\necho $$ > pid\nenv | sort > env.txt\n",
    );
    let mut run = hook(&s, "scripts/env.sh");
    run.env.push(("DEPLOYMENT_ID".into(), "d-TEST1234".into()));
    let out = hooks::run(&run, &log_in(&s), &CancellationToken::new())
        .await
        .unwrap();

    assert_eq!(out.result, HookResult::Succeeded, "{}", out.tail);
    assert!(out.started <= out.ended);
    assert!(
        out.tail
            .contains("[stdout] event=ApplicationStart deployment=d-TEST1234"),
        "{}",
        out.tail
    );
    assert!(out.tail.contains("secret=unset"), "{}", out.tail);
    assert!(
        out.tail.contains(&format!("path={}", hooks::DEFAULT_PATH)),
        "{}",
        out.tail
    );
    let cwd = s.path().canonicalize().unwrap();
    assert!(
        out.tail.contains(&format!("cwd={}", cwd.display())),
        "{}",
        out.tail
    );

    let env = std::fs::read_to_string(s.path().join("env.txt")).unwrap();
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|p| p.0))
        .collect();
    for name in &names {
        assert!(
            matches!(
                *name,
                "LIFECYCLE_EVENT"
                    | "DEPLOYMENT_ID"
                    | "PATH"
                    | "HOME"
                    | "USER"
                    | "LOGNAME"
                    | "SHELL"
                    | "PWD"
                    | "SHLVL"
                    | "_"
            ),
            "unexpected variable {name} reached the hook:\n{env}"
        );
    }
    // The script was waited for, not left a zombie.
    let pid = pid_from(&s.path().join("pid")).await;
    assert_ne!(proc_state(pid), Some('Z'));
}

#[tokio::test]
async fn exit_code_is_reported() {
    let s = Scratch::new();
    s.script("fail.sh", "#!/bin/sh\necho about to fail >&2\nexit 3\n");
    let out = hooks::run(&hook(&s, "fail.sh"), &log_in(&s), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        out.result,
        HookResult::Failed {
            exit_code: Some(3),
            signal: None
        }
    );
    assert!(out.tail.contains("[stderr] about to fail"), "{}", out.tail);
    assert_eq!(out.result.to_string(), "failed with exit code 3");
}

#[tokio::test]
async fn signal_death_is_reported() {
    let s = Scratch::new();
    s.script("die.sh", "#!/bin/sh\nkill -KILL $$\n");
    let out = hooks::run(&hook(&s, "die.sh"), &log_in(&s), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        out.result,
        HookResult::Failed {
            exit_code: None,
            signal: Some(9)
        }
    );
}

#[tokio::test]
async fn timeout_kills_the_whole_group() {
    let s = Scratch::new();
    s.script(
        "hang.sh",
        "#!/bin/sh\nsleep 300 &\necho $! > bg.pid\necho $$ > pid\nsleep 300\n",
    );
    let mut run = hook(&s, "hang.sh");
    run.timeout = Duration::from_secs(1);
    run.kill_grace = Duration::from_secs(2);
    let out = hooks::run(&run, &log_in(&s), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(out.result, HookResult::TimedOut);
    let (pid, bg) = (
        pid_from(&s.path().join("pid")).await,
        pid_from(&s.path().join("bg.pid")).await,
    );
    let _cleanup = KillGroup(pid);
    assert!(!alive(pid), "script {pid} survived its timeout");
    assert!(
        !alive(bg),
        "background child {bg} survived the script's timeout"
    );
    assert!(read_log(&s).contains("hang.sh: timed out"));
}

#[tokio::test]
async fn timeout_escalates_to_sigkill_when_term_is_ignored() {
    let s = Scratch::new();
    // An ignored signal stays ignored across exec, so the background sleep ignores TERM too.
    s.script(
        "stubborn.sh",
        "#!/bin/sh\ntrap '' TERM\nsleep 300 &\necho $! > bg.pid\necho $$ > pid\nwhile :; do sleep 1; done\n",
    );
    let mut run = hook(&s, "stubborn.sh");
    run.timeout = Duration::from_secs(1);
    run.kill_grace = Duration::from_secs(1);
    let out = hooks::run(&run, &log_in(&s), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(out.result, HookResult::TimedOut);
    let (pid, bg) = (
        pid_from(&s.path().join("pid")).await,
        pid_from(&s.path().join("bg.pid")).await,
    );
    let _cleanup = KillGroup(pid);
    assert!(!alive(pid), "script {pid} ignoring TERM survived");
    assert!(!alive(bg), "background child {bg} ignoring TERM survived");
}

#[tokio::test]
async fn background_child_holding_stdout_does_not_hang_the_hook() {
    let s = Scratch::new();
    // The classic CodeDeploy hang: the child inherits stdout and outlives the script.
    s.script(
        "start.sh",
        "#!/bin/sh\n(sleep 1; echo late-line; sleep 40) &\necho $! > bg.pid\necho $$ > pid\necho started\n",
    );
    let begun = Instant::now();
    let out = hooks::run(
        &hook(&s, "start.sh"),
        &log_in(&s),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let took = begun.elapsed();
    let pgid = pid_from(&s.path().join("pid")).await;
    let _cleanup = KillGroup(pgid);

    assert_eq!(out.result, HookResult::Succeeded, "{}", out.tail);
    assert!(
        took < Duration::from_secs(20),
        "run waited {took:?} for the background child"
    );
    assert!(out.tail.contains("[stdout] started"), "{}", out.tail);
    let bg = pid_from(&s.path().join("bg.pid")).await;
    assert!(alive(bg), "the background child {bg} was not left alone");

    // Its later output still goes to the log, and writing it did not kill it (no SIGPIPE).
    let deadline = Instant::now() + Duration::from_secs(15);
    while !read_log(&s).contains("late-line") {
        assert!(
            Instant::now() < deadline,
            "late output not logged:\n{}",
            read_log(&s)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(read_log(&s).contains("[ApplicationStart] [stdout after exit] start.sh: late-line"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        alive(bg),
        "the background child {bg} died after writing to its stdout"
    );
    assert!(!out.tail.contains("late-line"));
}

#[tokio::test]
async fn script_without_exec_bit_runs_through_its_shebang() {
    let s = Scratch::new();
    s.write("plain.sh", "#!/bin/sh\necho via-shebang\n");
    let out = hooks::run(
        &hook(&s, "plain.sh"),
        &log_in(&s),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(out.result, HookResult::Succeeded, "{}", out.tail);
    assert!(out.tail.contains("via-shebang"));

    // The shebang's optional argument is passed: -e makes `false` end the script.
    s.write(
        "strict.sh",
        "#!/bin/sh -e\necho first\nfalse\necho unreachable\n",
    );
    let out = hooks::run(
        &hook(&s, "strict.sh"),
        &log_in(&s),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        out.result,
        HookResult::Failed {
            exit_code: Some(1),
            signal: None
        }
    );
    assert!(
        out.tail.contains("first") && !out.tail.contains("unreachable"),
        "{}",
        out.tail
    );
}

#[tokio::test]
async fn script_without_exec_bit_or_shebang_is_refused() {
    let s = Scratch::new();
    s.write("scripts/noshebang.sh", "echo hi\n");
    let err = hooks::run(
        &hook(&s, "scripts/noshebang.sh"),
        &log_in(&s),
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, HookError::NotExecutable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("scripts/noshebang.sh") && msg.contains("chmod +x"),
        "{msg}"
    );
}

#[tokio::test]
async fn missing_script_is_refused() {
    let s = Scratch::new();
    let err = hooks::run(
        &hook(&s, "scripts/nope.sh"),
        &log_in(&s),
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, HookError::ScriptMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("scripts/nope.sh"));
}

#[tokio::test]
async fn runas_switches_user_groups_and_identity() {
    const USER: &str = "pier-hooks-runas";
    const EXTRA: &str = "pier-hooks-extra";
    ensure_user(USER);
    // A supplementary group proves initgroups semantics, not a bare setuid.
    let st = Command::new("groupadd")
        .args(["-f", EXTRA])
        .status()
        .unwrap();
    assert!(st.success(), "groupadd failed");
    let st = Command::new("usermod")
        .args(["-a", "-G", EXTRA, USER])
        .status()
        .unwrap();
    assert!(st.success(), "usermod failed");
    let home = getent_field(USER, 5);

    let s = Scratch::new();
    // The user must be able to reach the script: tempdirs are 0700.
    set_mode(s.path(), 0o755);
    s.script(
        "whoami.sh",
        "#!/bin/sh\necho \"user=$(whoami) uid=$(id -u) home=$HOME logname=$LOGNAME usr=$USER\"\n\
         echo \"groups=$(id -Gn)\"\n",
    );
    let mut run = hook(&s, "whoami.sh");
    run.runas = Some(USER.into());
    let out = hooks::run(&run, &log_in(&s), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(out.result, HookResult::Succeeded, "{}", out.tail);
    let uid = getent_field(USER, 2);
    assert!(
        out.tail.contains(&format!(
            "user={USER} uid={uid} home={home} logname={USER} usr={USER}"
        )),
        "{}",
        out.tail
    );
    let groups = out.tail.lines().find(|l| l.contains("groups=")).unwrap();
    assert!(groups.contains(EXTRA), "{groups}");
    assert!(
        !groups.split(['=', ' ']).any(|g| g == "root"),
        "root's groups leaked: {groups}"
    );
    assert!(read_log(&s).contains(&format!("whoami.sh: started as {USER}")));
}

#[tokio::test]
async fn runas_user_without_exec_permission_runs_through_shebang() {
    const USER: &str = "pier-hooks-runas";
    ensure_user(USER);
    let s = Scratch::new();
    set_mode(s.path(), 0o755);
    // Executable for its owner (root) only: exec as the runas user fails with EACCES.
    let owner_only = s.write("owner-only.sh", "#!/bin/sh\necho ran as $(whoami)\n");
    set_mode(&owner_only, 0o744);
    let mut run = hook(&s, "owner-only.sh");
    run.runas = Some(USER.into());
    let out = hooks::run(&run, &log_in(&s), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(out.result, HookResult::Succeeded, "{}", out.tail);
    assert!(out.tail.contains(&format!("ran as {USER}")), "{}", out.tail);

    // Without a #! line there is nothing to fall back to: the exec error is reported.
    let bare = s.write("bare.sh", "echo hi\n");
    set_mode(&bare, 0o744);
    let mut run = hook(&s, "bare.sh");
    run.runas = Some(USER.into());
    let err = hooks::run(&run, &log_in(&s), &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, HookError::Spawn { .. }), "{err:?}");
    assert!(err.to_string().contains("bare.sh"), "{err}");
}

#[tokio::test]
async fn unknown_runas_user_is_refused() {
    let s = Scratch::new();
    s.script("x.sh", "#!/bin/sh\ntrue\n");
    let mut run = hook(&s, "x.sh");
    run.runas = Some("pier-no-such-user".into());
    let err = hooks::run(&run, &log_in(&s), &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, HookError::UnknownUser { .. }), "{err:?}");
    assert!(err.to_string().contains("pier-no-such-user") && err.to_string().contains("x.sh"));
}

#[tokio::test]
async fn log_lines_are_timestamped_prefixed_and_plain() {
    let s = Scratch::new();
    s.script(
        "scripts/color.sh",
        "#!/bin/sh\nprintf '\\033[1;31mred\\033[0m text\\n'\nprintf 'oops\\r\\n' >&2\n",
    );
    let out = hooks::run(
        &hook(&s, "scripts/color.sh"),
        &log_in(&s),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(out.result, HookResult::Succeeded);
    assert_eq!(out.tail, "[stdout] red text\n[stderr] oops");

    let log = read_log(&s);
    assert!(!log.contains('\x1b') && !log.contains('\r'), "{log:?}");
    let mut seen = Vec::new();
    for line in log.lines() {
        let (stamp, rest) = line.split_once(' ').unwrap();
        chrono::DateTime::parse_from_rfc3339(stamp)
            .unwrap_or_else(|e| panic!("{stamp:?} is not RFC 3339 ({e}) in {line:?}"));
        seen.push(rest.to_string());
    }
    assert!(
        seen.contains(&"[ApplicationStart] [stdout] scripts/color.sh: red text".to_string()),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"[ApplicationStart] [stderr] scripts/color.sh: oops".to_string()),
        "{seen:?}"
    );
}

#[tokio::test]
async fn log_rotates_at_max_bytes() {
    let s = Scratch::new();
    s.script(
        "chatty.sh",
        "#!/bin/sh\ni=0\nwhile [ $i -lt 300 ]; do echo \"line $i of chatty output\"; i=$((i+1)); done\n",
    );
    let path = s.path().join("logs/scripts.log");
    let log = ScriptLog::open(&path, 4096, 2).unwrap();
    let out = hooks::run(&hook(&s, "chatty.sh"), &log, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(out.result, HookResult::Succeeded);
    for name in ["scripts.log", "scripts.log.1", "scripts.log.2"] {
        let len = std::fs::metadata(s.path().join("logs").join(name))
            .unwrap()
            .len();
        assert!(len > 0 && len <= 4096, "{name} has {len} bytes");
    }
    assert!(
        !s.path().join("logs/scripts.log.3").exists(),
        "more than `keep` files"
    );
    let newest = std::fs::read_to_string(&path).unwrap();
    assert!(newest.contains("line 299 of chatty output"));
}

#[tokio::test]
async fn tail_and_lines_are_bounded() {
    let s = Scratch::new();
    // Lots of lines, then one 200 KB line with no newline at all, then a last word.
    s.script(
        "flood.sh",
        "#!/bin/sh\nseq 1 20000\nhead -c 200000 /dev/zero | tr '\\0' x\necho\necho THE-END\n",
    );
    let out = hooks::run(
        &hook(&s, "flood.sh"),
        &log_in(&s),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(out.result, HookResult::Succeeded);
    assert!(out.tail.len() <= 4096, "tail is {} bytes", out.tail.len());
    assert!(
        out.tail.ends_with("[stdout] THE-END"),
        "{}",
        &out.tail[out.tail.len().saturating_sub(100)..]
    );
    let log = read_log(&s);
    assert!(log.contains("flood.sh: 20000\n"));
    let longest = log.lines().map(str::len).max().unwrap();
    assert!(longest < 9 * 1024, "a log line of {longest} bytes");
}

#[tokio::test]
async fn cancel_stops_the_group() {
    let s = Scratch::new();
    s.script("long.sh", "#!/bin/sh\nsleep 300 &\necho $$ > pid\nwait\n");
    let run = hook(&s, "long.sh");
    let log = log_in(&s);
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { hooks::run(&run, &log, &cancel).await }
    });
    let pid = pid_from(&s.path().join("pid")).await;
    let _cleanup = KillGroup(pid);
    cancel.cancel();
    let out = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("run did not return after cancel")
        .unwrap()
        .unwrap();
    assert_eq!(out.result, HookResult::Cancelled);
    assert!(!alive(pid));
    assert!(read_log(&s).contains("long.sh: was cancelled"));
}

#[tokio::test]
async fn abandoning_the_run_kills_the_group() {
    let s = Scratch::new();
    s.script(
        "long.sh",
        "#!/bin/sh\necho $$ > pid\nsleep 300 &\necho $! > bg.pid\nwait\n",
    );
    let run = hook(&s, "long.sh");
    let log = log_in(&s);
    let cancel = CancellationToken::new();
    let pid_file = s.path().join("bg.pid");
    let abandoned = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::select! {
            _ = hooks::run(&run, &log, &cancel) => panic!("the script ended on its own"),
            _ = pid_from(&pid_file) => {}
        }
    })
    .await;
    assert!(abandoned.is_ok());
    let (pid, bg) = (
        pid_from(&s.path().join("pid")).await,
        pid_from(&pid_file).await,
    );
    let _cleanup = KillGroup(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(bg) {
        assert!(
            Instant::now() < deadline,
            "background child {bg} outlived the dropped run"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn getent_field(user: &str, field: usize) -> String {
    let out = Command::new("getent")
        .args(["passwd", user])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .split(':')
        .nth(field)
        .unwrap()
        .to_string()
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every containment this host offers, by name: its cgroups (stopped with `cgroup.kill`, and
/// again by freezing and killing pid by pid) and the process-group fallback. The cgroup mode
/// the host does not offer is counted as skipped by `cgroup_modes_this_host_cannot_offer`.
fn modes() -> Vec<(&'static str, Containment)> {
    let host = Containment::host();
    let mut out = Vec::new();
    match host.cgroup_mode() {
        Some(_) => {
            out.push(("cgroup", host.clone()));
            out.push(("cgroup, freeze and kill", host.without_cgroup_kill()));
        }
        None => skip(&format!(
            "no hook cgroups on this host: {}",
            host.describe()
        )),
    }
    out.push(("process group", Containment::process_group("test")));
    out
}

/// A process (alive or not) in the session `sid` other than a zombie.
fn session_members(sid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.first() != Some(&"Z") && f.get(3).and_then(|s| s.parse().ok()) == Some(sid) {
            out.push(pid);
        }
    }
    out
}

/// Kills single processes when dropped (detached children a test made).
struct KillPids(Vec<i32>);

impl Drop for KillPids {
    fn drop(&mut self) {
        for &p in &self.0 {
            if p > 1 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
    }
}

/// Regression: a child that left the hook's session (`setsid`) survived the timeout's kill of
/// the process group. In a cgroup even a grandchild whose parent already exited (double fork)
/// is found; the fallback finds the detached child while its parent lives.
#[tokio::test]
async fn timeout_kills_children_that_left_the_session() {
    for (mode, containment) in modes() {
        let s = Scratch::new();
        let double_fork = containment.cgroup_mode().is_some();
        let mut body = String::from("#!/bin/sh\nsetsid sleep 300 &\necho $! > detached.pid\n");
        if double_fork {
            body.push_str("( setsid sleep 300 & echo $! > orphan.pid )\n");
        }
        body.push_str("echo $$ > pid\nsleep 300\n");
        s.script("escape.sh", &body);
        let mut run = hook(&s, "escape.sh");
        run.containment = containment;
        run.timeout = Duration::from_secs(1);
        run.kill_grace = Duration::from_millis(500);
        let out = hooks::run(&run, &log_in(&s), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(out.result, HookResult::TimedOut, "{mode}");
        let mut pids = vec![
            pid_from(&s.path().join("pid")).await,
            pid_from(&s.path().join("detached.pid")).await,
        ];
        if double_fork {
            pids.push(pid_from(&s.path().join("orphan.pid")).await);
        }
        let _cleanup = KillPids(pids.clone());
        for p in pids {
            assert!(
                !alive(p),
                "{mode}: process {p} of the hook survived its timeout"
            );
        }
    }
}

/// What a successful ApplicationStart starts in the background on purpose (`nohup ... &`,
/// `setsid`) keeps running after the hook, as with CodeDeploy.
#[tokio::test]
async fn a_successful_hooks_background_service_keeps_running() {
    for (mode, containment) in modes() {
        let s = Scratch::new();
        s.script(
            "start.sh",
            "#!/bin/sh\nnohup sleep 300 >/dev/null 2>&1 &\necho $! > nohup.pid\nsetsid sleep 300 >/dev/null 2>&1 &\necho $! > setsid.pid\nexit 0\n",
        );
        let mut run = hook(&s, "start.sh");
        run.containment = containment;
        let out = hooks::run(&run, &log_in(&s), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(out.result, HookResult::Succeeded, "{mode}");
        let pids = vec![
            pid_from(&s.path().join("nohup.pid")).await,
            pid_from(&s.path().join("setsid.pid")).await,
        ];
        let _cleanup = KillPids(pids.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        for p in pids {
            assert!(
                alive(p),
                "{mode}: the service {p} a successful hook started was killed"
            );
        }
    }
}

/// The tasks cap holds a hook that tries to start 200 processes to 20: the shell's 20th fork
/// is refused (`sh` gives up with "Cannot fork"), and what it did start stays bounded.
#[tokio::test]
async fn the_tasks_cap_stops_a_fork_bomb() {
    let host = Containment::host();
    if !host.enforces_pids() {
        skip(&format!(
            "no pids controller for hook cgroups here: {}",
            host.describe()
        ));
        return;
    }
    let s = Scratch::new();
    s.script(
        "bomb.sh",
        "#!/bin/sh\necho $$ > pid\nfor i in $(seq 200); do sleep 300 & done\necho all started\n",
    );
    let mut run = hook(&s, "bomb.sh");
    run.limits.pids_max = Some(20);
    let out = hooks::run(&run, &log_in(&s), &CancellationToken::new())
        .await
        .unwrap();
    let pid = pid_from(&s.path().join("pid")).await;
    let _cleanup = KillGroup(pid);
    assert!(
        matches!(out.result, HookResult::Failed { .. }),
        "{:?}: {}",
        out.result,
        out.tail
    );
    assert!(!out.tail.contains("all started"), "{}", out.tail);
    // The script is gone; its sleeps are left (a failed hook's children are not killed).
    let started = session_members(pid).len();
    assert!(
        (5..20).contains(&started),
        "{started} processes left by a hook capped at 20 tasks"
    );
}

/// After a crash, recovery kills what the interrupted hook left, by its journal record: the
/// whole cgroup (a detached child too), or the hook's session and process group; never a
/// process that started before the hook (a recycled pid).
#[tokio::test]
async fn leftovers_of_an_interrupted_hook_are_stopped_from_its_trace() {
    for (mode, containment) in modes() {
        let s = Scratch::new();
        let detach = if containment.cgroup_mode().is_some() {
            "setsid "
        } else {
            ""
        };
        // The script ends, as if the agent had died while it ran: what it left is what a
        // crashed agent leaves behind.
        s.script(
            "leave.sh",
            &format!("#!/bin/sh\n{detach}sleep 300 >/dev/null 2>&1 &\necho $! > left.pid\n"),
        );
        let mut run = hook(&s, "leave.sh");
        run.containment = containment.clone();
        let seen: std::sync::Arc<std::sync::Mutex<Vec<Option<HookTrace>>>> = Default::default();
        let record = seen.clone();
        let sink: TraceSink = std::sync::Arc::new(move |t| {
            record.lock().unwrap().push(t);
            Ok(())
        });
        let out = hooks::run_traced(&run, &log_in(&s), &CancellationToken::new(), Some(sink))
            .await
            .unwrap();
        assert_eq!(out.result, HookResult::Succeeded, "{mode}");
        let left = pid_from(&s.path().join("left.pid")).await;
        let _cleanup = KillPids(vec![left]);
        let traces = seen.lock().unwrap().clone();
        // In a cgroup: the cgroup recorded before it started, cleared when it ended (it left
        // something running there). In the fallback: recorded before it started, again with
        // its pid, cleared when it ended.
        let expected = if containment.cgroup_mode().is_some() {
            2
        } else {
            3
        };
        assert_eq!(traces.len(), expected, "{mode}: {traces:?}");
        assert!(traces[expected - 1].is_none(), "{mode}: {traces:?}");
        let trace = traces[expected - 2].clone().unwrap();
        if containment.cgroup_mode().is_some() {
            assert!(!trace.cgroups.is_empty(), "{trace:?}");
        } else {
            assert!(
                trace.pgid.is_some() && trace.start_ticks.is_some(),
                "{trace:?}"
            );
        }

        // A trace whose hook started after the process cannot be its: left alone.
        if trace.cgroups.is_empty() {
            let mut later = trace.clone();
            later.start_ticks = Some(u64::MAX);
            hooks::stop_leftovers(&later);
            assert!(
                alive(left),
                "{mode}: a process older than the hook was killed"
            );
        }
        assert!(alive(left));
        assert!(hooks::stop_leftovers(&trace) > 0, "{mode}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(left) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !alive(left),
            "{mode}: the interrupted hook's process {left} survived recovery"
        );
    }
}

/// A journal's trace whose process group id now belongs to another process (the pid was
/// recycled after the hook's group emptied) never leads recovery to kill it.
#[tokio::test]
async fn a_recycled_pid_is_never_hit_by_recovery() {
    let mut newcomer = Command::new("setsid")
        .args(["sleep", "300"])
        .spawn()
        .unwrap();
    let pid = newcomer.id() as i32;
    let _cleanup = KillPids(vec![pid]);
    // setsid forks only when it is a group leader; here it execs sleep itself.
    let deadline = Instant::now() + Duration::from_secs(5);
    while session_members(pid).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = stat_start(pid);
    let trace = HookTrace {
        script: "scripts/old.sh".into(),
        cgroups: Vec::new(),
        pgid: Some(pid),
        // The recorded hook started earlier than the process now holding its number.
        start_ticks: Some(start - 1),
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap()
            .trim()
            .to_string(),
    };
    assert_eq!(hooks::stop_leftovers(&trace), 0);
    assert!(
        alive(pid),
        "recovery killed a process that only reuses the hook's pid"
    );
    let same = HookTrace {
        start_ticks: Some(start),
        ..trace
    };
    assert!(
        hooks::stop_leftovers(&same) > 0,
        "the real group is stopped"
    );
    let _ = newcomer.wait();
}

fn stat_start(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// The memory cap holds a hook to it: a script that tries to hold 200 MB under a 32 MiB cap
/// is killed by the kernel, in its own cgroup only.
#[tokio::test]
async fn the_memory_cap_stops_a_hook_that_grows_past_it() {
    let host = Containment::host();
    if host.cgroup_mode().is_none() {
        skip(&format!("no hook cgroups here: {}", host.describe()));
        return;
    }
    let s = Scratch::new();
    s.script(
        "grow.sh",
        "#!/bin/sh\nx=$(head -c 200000000 /dev/zero | tr '\\0' a)\necho held ${#x} bytes\n",
    );
    let mut run = hook(&s, "grow.sh");
    run.limits.memory_max = Some(32 << 20);
    let out = hooks::run(&run, &log_in(&s), &CancellationToken::new())
        .await
        .unwrap();
    assert!(
        matches!(out.result, HookResult::Failed { .. }) && !out.tail.contains("held"),
        "{:?}: {}",
        out.result,
        out.tail
    );
}

/// What `stat -fc %T` says /sys/fs/cgroup (or its `unified` mount) is.
fn fs_type(path: &str) -> String {
    let out = Command::new("stat")
        .args(["-fc", "%T", path])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The containment the agent detects is the one the host has: unified when cgroup2 is at
/// /sys/fs/cgroup, hybrid when it is beside v1 hierarchies (and writable here).
#[test]
fn the_hosts_containment_mode_is_detected() {
    let host = Containment::host();
    let expected = if fs_type("/sys/fs/cgroup") == "cgroup2fs" {
        Some(CgroupMode::Unified)
    } else if fs_type("/sys/fs/cgroup/unified") == "cgroup2fs" {
        Some(CgroupMode::Hybrid)
    } else {
        None
    };
    match (expected, host.cgroup_mode()) {
        (e, d) if e == d => {}
        // A cgroup2 tree that this process may not write: the fallback, with the reason.
        (Some(_), None) => assert!(host.describe().contains("cannot"), "{}", host.describe()),
        (e, d) => panic!("host has {e:?}, detected {d:?}: {}", host.describe()),
    }
}

/// The cgroup modes this host does not offer, counted as skipped with the reason; the tests
/// above ran every mode it does offer.
#[test]
fn cgroup_modes_this_host_cannot_offer() {
    let host = Containment::host();
    let missing: Vec<&str> = [
        (CgroupMode::Unified, "unified (cgroup2 at /sys/fs/cgroup)"),
        (
            CgroupMode::Hybrid,
            "hybrid (v1 controllers beside a cgroup2 tree)",
        ),
    ]
    .into_iter()
    .filter(|(m, _)| host.cgroup_mode() != Some(*m))
    .map(|(_, name)| name)
    .collect();
    if !missing.is_empty() {
        skip(&format!(
            "not offered here: {}; this host: {}",
            missing.join(", "),
            host.describe()
        ));
    }
}

/// The hooks of one deployment share one cgroup, recorded in the journal once, while each
/// leaves it empty. A hook that leaves a process running keeps that cgroup for it; the next
/// hook gets a new one, recorded before it starts, so the leftover is neither counted in nor
/// stopped with the next hook's processes.
#[tokio::test]
async fn a_deployments_hooks_share_a_cgroup_until_one_leaves_something() {
    let host = Containment::host();
    if host.cgroup_mode().is_none() {
        skip(&format!("no hook cgroups here: {}", host.describe()));
        return;
    }
    for (mode, containment) in [
        ("cgroup", host.clone()),
        ("cgroup, freeze and kill", host.without_cgroup_kill()),
    ] {
        let s = Scratch::new();
        let own = |name: &str| format!("grep '^0::' /proc/self/cgroup > {name}.cg\n");
        s.script("a.sh", &format!("#!/bin/sh\n{}exit 0\n", own("a")));
        s.script("b.sh", &format!("#!/bin/sh\n{}exit 0\n", own("b")));
        s.script(
            "c.sh",
            &format!(
                "#!/bin/sh\n{}setsid sleep 300 >/dev/null 2>&1 &\necho $! > left.pid\nexit 0\n",
                own("c")
            ),
        );
        s.script("d.sh", &format!("#!/bin/sh\n{}exec sleep 300\n", own("d")));
        let seen: std::sync::Arc<std::sync::Mutex<Vec<Option<HookTrace>>>> = Default::default();
        let record = seen.clone();
        let sink: TraceSink = std::sync::Arc::new(move |t| {
            record.lock().unwrap().push(t);
            Ok(())
        });
        let traces = || seen.lock().unwrap().clone();
        let cgroup_of = |name: &str| {
            std::fs::read_to_string(s.path().join(format!("{name}.cg")))
                .unwrap()
                .trim()
                .to_string()
        };
        let log = log_in(&s);
        let cancel = CancellationToken::new();
        let mut slot = hooks::HookSlot::new();
        let run_one = |rel: &str, timeout: Duration| {
            let mut run = hook(&s, rel);
            run.containment = containment.clone();
            run.timeout = timeout;
            run.kill_grace = Duration::from_millis(300);
            run
        };
        let long = Duration::from_secs(60);

        for rel in ["a.sh", "b.sh"] {
            let out = hooks::run_in(&mut slot, &run_one(rel, long), &log, &cancel, Some(&sink))
                .await
                .unwrap();
            assert_eq!(out.result, HookResult::Succeeded, "{mode} {rel}");
        }
        assert_eq!(cgroup_of("a"), cgroup_of("b"), "{mode}: not reused");
        assert!(cgroup_of("a").contains("/pier-hooks/hook-"), "{mode}");
        let t = traces();
        assert_eq!(t.len(), 1, "{mode}: recorded once for both hooks: {t:?}");
        let first = t[0].clone().unwrap();
        assert!(first.cgroups[0].ends_with(cgroup_of("a").rsplit('/').next().unwrap()));

        // c leaves a process in the shared cgroup: the cgroup is handed to it and cleared
        // from the journal.
        let out = hooks::run_in(
            &mut slot,
            &run_one("c.sh", long),
            &log,
            &cancel,
            Some(&sink),
        )
        .await
        .unwrap();
        assert_eq!(out.result, HookResult::Succeeded, "{mode}");
        assert_eq!(cgroup_of("c"), cgroup_of("a"), "{mode}");
        let left = pid_from(&s.path().join("left.pid")).await;
        let _cleanup = KillPids(vec![left]);
        let t = traces();
        assert_eq!(t.len(), 2, "{mode}: {t:?}");
        assert!(t[1].is_none(), "{mode}: not cleared: {t:?}");

        // d runs in a new cgroup, recorded before it started; its timeout stops d only.
        let out = hooks::run_in(
            &mut slot,
            &run_one("d.sh", Duration::from_millis(500)),
            &log,
            &cancel,
            Some(&sink),
        )
        .await
        .unwrap();
        assert_eq!(out.result, HookResult::TimedOut, "{mode}");
        assert_ne!(
            cgroup_of("d"),
            cgroup_of("c"),
            "{mode}: reused a busy cgroup"
        );
        let t = traces();
        assert_eq!(t.len(), 3, "{mode}: {t:?}");
        let second = t[2].clone().unwrap();
        assert_ne!(second.cgroups, first.cgroups, "{mode}");
        assert!(
            alive(left),
            "{mode}: the next hook's timeout killed what an earlier hook left"
        );
        let left_in = std::fs::read_to_string(format!("/proc/{left}/cgroup")).unwrap();
        assert!(
            left_in.lines().any(|l| l == cgroup_of("c")),
            "{mode}: {left_in}"
        );

        // The slot's (now empty) cgroup goes with it; c's stays for what it holds.
        assert!(slot.close(), "{mode}");
        assert!(!second.cgroups[0].exists(), "{mode}: empty cgroup left");
        assert!(
            first.cgroups[0].exists(),
            "{mode}: the leftover's cgroup removed"
        );
        hooks::stop_leftovers(&first);
    }
}
