//! What a hook leaves running, end to end with the real agent: an interrupted hook's
//! processes (one that left its session included) are stopped before the group's next
//! deployment runs anything, and a service a successful ApplicationStart started in the
//! background keeps running.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pier_protocol::DeploymentStatus;

use crate::daemon::{local_command, local_record, spool_host, tgz_bundle, wait_for};
use crate::support::Scratch;

/// Running (or sleeping, stopped...): anything but gone or a zombie.
fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
}

fn pid_in(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Kills the given processes when dropped, so a failed assertion leaves nothing behind.
struct KillPids(Vec<i32>);

impl Drop for KillPids {
    fn drop(&mut self) {
        for &p in &self.0 {
            if p > 1 {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
    }
}

/// Regression: after `kill -9` of the agent, the hook it was running kept running while the
/// group's next deployment started. Now the restarted agent stops it (and its children, one
/// that left the session too) first; the next deployment's first hook checks.
#[test]
fn a_crashed_agents_hook_is_stopped_before_the_groups_next_deployment() {
    let scratch = Scratch::new();
    let host = spool_host(&scratch, "crashy", "daemon:\n  poll_wait_seconds: 1\n");
    let status = scratch.path().join("status");
    let marks = scratch.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let m = |name: &str| marks.join(name);
    let stuck = tgz_bundle(
        &scratch,
        "stuck",
        &scratch.path().join("www"),
        &[(
            "ApplicationStart",
            &format!(
                "#!/bin/sh\nsetsid sleep 600 >/dev/null 2>&1 &\necho $! > {}\nsleep 600 &\necho $! > {}\necho $$ > {}\nexec sleep 600\n",
                m("detached").display(),
                m("child").display(),
                m("script").display()
            ),
        )],
    );
    host.submit(&local_command("d-CRASH0001", &stuck, &status));
    let agent = host.start();
    let pids: Vec<i32> = wait_for(Duration::from_secs(60), "the hook", &|| agent.log(), || {
        ["detached", "child", "script"]
            .iter()
            .map(|n| pid_in(&m(n)))
            .collect()
    });
    let _cleanup = KillPids(pids.clone());
    agent.signal(Signal::SIGKILL);
    drop(agent);
    for &p in &pids {
        assert!(alive(p), "process {p} should outlive the killed agent");
    }

    // The next deployment's first hook fails if anything of the old hook still runs (a
    // zombie waiting for its new parent to reap it runs nothing).
    let check = pids
        .iter()
        .map(|p| {
            format!(
                "s=$(cut -d' ' -f3 /proc/{p}/stat 2>/dev/null)\nif [ -n \"$s\" ] && [ \"$s\" != Z ]; then echo old hook process {p} still running >&2; exit 1; fi\n"
            )
        })
        .collect::<String>();
    let next = tgz_bundle(
        &scratch,
        "next",
        &scratch.path().join("www"),
        &[("BeforeInstall", &format!("#!/bin/sh\n{check}echo clean\n"))],
    );
    let mut agent = host.start();
    host.submit(&local_command("d-NEXT00001", &next, &status));
    let rec = wait_for(
        Duration::from_secs(60),
        "the next deployment",
        &|| agent.log(),
        || local_record(&status, "d-NEXT00001", "crashy").filter(|r| r.status.is_final()),
    );
    assert_eq!(
        rec.status,
        DeploymentStatus::Succeeded,
        "{rec:#?}\n{}",
        agent.log()
    );
    for &p in &pids {
        assert!(
            !alive(p),
            "the interrupted hook's process {p} survived the restart"
        );
    }
    let old = wait_for(
        Duration::from_secs(30),
        "the interrupted deployment's record",
        &|| agent.log(),
        || local_record(&status, "d-CRASH0001", "crashy").filter(|r| r.status.is_final()),
    );
    assert_eq!(old.status, DeploymentStatus::Failed, "{old:#?}");
    assert_eq!(
        agent.terminate(Duration::from_secs(10)),
        0,
        "{}",
        agent.log()
    );
}

/// A service that a successful ApplicationStart starts in the background (`nohup ... &`,
/// `setsid`) keeps running through the deployment, the group's next one, and the agent's
/// stop, as with CodeDeploy.
#[test]
fn a_successful_application_starts_service_keeps_running() {
    let scratch = Scratch::new();
    let host = spool_host(&scratch, "svc", "daemon:\n  poll_wait_seconds: 1\n");
    let status = scratch.path().join("status");
    let (nohup, setsid) = (scratch.path().join("nohup"), scratch.path().join("setsid"));
    let start = tgz_bundle(
        &scratch,
        "start",
        &scratch.path().join("www"),
        &[(
            "ApplicationStart",
            &format!(
                "#!/bin/sh\nnohup sleep 600 >/dev/null 2>&1 &\necho $! > {}\nsetsid sleep 600 >/dev/null 2>&1 &\necho $! > {}\n",
                nohup.display(),
                setsid.display()
            ),
        )],
    );
    let plain = tgz_bundle(&scratch, "plain", &scratch.path().join("www"), &[]);
    let mut agent = host.start();
    host.submit(&local_command("d-SVC000001", &start, &status));
    let rec = wait_for(
        Duration::from_secs(60),
        "the deployment",
        &|| agent.log(),
        || local_record(&status, "d-SVC000001", "svc").filter(|r| r.status.is_final()),
    );
    assert_eq!(rec.status, DeploymentStatus::Succeeded, "{rec:#?}");
    let pids = vec![pid_in(&nohup).unwrap(), pid_in(&setsid).unwrap()];
    let _cleanup = KillPids(pids.clone());
    host.submit(&local_command("d-SVC000002", &plain, &status));
    let rec = wait_for(
        Duration::from_secs(60),
        "the next deployment",
        &|| agent.log(),
        || local_record(&status, "d-SVC000002", "svc").filter(|r| r.status.is_final()),
    );
    assert_eq!(rec.status, DeploymentStatus::Succeeded, "{rec:#?}");
    assert_eq!(
        agent.terminate(Duration::from_secs(10)),
        0,
        "{}",
        agent.log()
    );
    for &p in &pids {
        assert!(
            alive(p),
            "the service {p} a successful hook started was stopped"
        );
    }
}
