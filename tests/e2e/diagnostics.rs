//! Typed failures on the wire: a real `pier-agent run` on a spool deploys bundles that fail
//! in each way a program may want to tell apart, and the status record it writes must name
//! the cause in `diagnostics.error_code` (with the script and the log tail where a script
//! ran). Each test asserts the exact code, so a mapping that drifts fails here.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pier_protocol::{
    BundleType, Command, DeploymentStatus, ErrorCode, EventState, EventStatus, Revision,
    StatusRecord, StatusSinkSpec,
};

use crate::daemon::{command, local_command, local_record, sha256_file, wait_for};
use crate::support::{Agent, Scratch};

/// A tgz bundle of `(path, contents, mode)` entries, written with raw tar headers so that a
/// hostile name (`../x`) goes in as it is.
fn tgz(scratch: &Scratch, name: &str, entries: &[(&str, &str, u32)]) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    for (path, contents, mode) in entries {
        let mut h = tar::Header::new_gnu();
        // Bypass set_path, which (rightly) refuses `..`.
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(contents.len() as u64);
        h.set_mode(*mode);
        h.set_cksum();
        b.append(&h, contents.as_bytes()).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&b.into_inner().unwrap()).unwrap();
    let out = scratch.path().join(format!("{name}.tgz"));
    std::fs::write(&out, gz.finish().unwrap()).unwrap();
    out
}

/// An AppSpec that copies `app/` to `dest`, then `hooks` (YAML under `hooks:`, may be empty).
fn appspec(dest: &Path, hooks: &str) -> String {
    let mut s = format!(
        "version: 0.0\nos: linux\nfiles:\n  - source: app\n    destination: {}\n",
        dest.display()
    );
    if !hooks.is_empty() {
        s.push_str("hooks:\n");
        s.push_str(hooks);
    }
    s
}

/// Starts an agent on a spool of its own, hands it `cmd`, and returns the final status record
/// once written; the agent is then stopped.
fn final_record(scratch: &Scratch, host: &str, cmd: &Command, status: &Path) -> StatusRecord {
    let host_agent = Agent::builder(scratch.path().join(host))
        .host(host)
        .spool()
        .build();
    host_agent.submit(cmd);
    let mut agent = host_agent.start();
    let rec = wait_for(
        Duration::from_secs(60),
        "final status",
        &|| agent.log(),
        || local_record(status, &cmd.deployment_id, host).filter(|r| r.status.is_final()),
    );
    assert_eq!(
        agent.terminate(Duration::from_secs(30)),
        0,
        "{}",
        agent.log()
    );
    rec
}

/// The one failed (or timed-out) event of a failed record; every other event carries no
/// diagnostics.
#[track_caller]
fn failed_event(rec: &StatusRecord) -> &EventStatus {
    assert_eq!(rec.status, DeploymentStatus::Failed, "{rec:#?}");
    let failed: Vec<&EventStatus> = rec
        .events
        .iter()
        .filter(|e| matches!(e.status, EventState::Failed | EventState::TimedOut))
        .collect();
    assert_eq!(failed.len(), 1, "{rec:#?}");
    for e in &rec.events {
        if !std::ptr::eq(e, failed[0]) {
            assert!(e.diagnostics.is_none(), "{e:#?}");
        }
    }
    failed[0]
}

/// The event's code, checking that its diagnostics are there and say something.
#[track_caller]
fn code_of(e: &EventStatus) -> ErrorCode {
    let d = e
        .diagnostics
        .as_ref()
        .unwrap_or_else(|| panic!("no diagnostics on {e:#?}"));
    assert!(!d.message.is_empty(), "{e:#?}");
    d.error_code
}

#[test]
fn a_script_exiting_non_zero_is_script_failed_with_its_name_and_output() {
    let s = Scratch::new();
    let dest = s.path().join("www");
    let bundle = tgz(
        &s,
        "fail",
        &[
            (
                "appspec.yml",
                &appspec(
                    &dest,
                    "  ValidateService:\n    - location: scripts/check.sh\n",
                ),
                0o644,
            ),
            ("app/index.html", "v1", 0o644),
            (
                "scripts/check.sh",
                "#!/bin/sh\necho 'service is down: 503'\nexit 7\n",
                0o755,
            ),
        ],
    );
    let status = s.path().join("status");
    let cmd = local_command("d-DIAGFAIL1", &bundle, &status);
    let rec = final_record(&s, "h-fail", &cmd, &status);
    let e = failed_event(&rec);
    assert_eq!(e.name, "ValidateService");
    assert_eq!(code_of(e), ErrorCode::ScriptFailed);
    let d = e.diagnostics.as_ref().unwrap();
    assert_eq!(d.script_name.as_deref(), Some("scripts/check.sh"));
    assert!(
        d.log_tail
            .as_deref()
            .unwrap_or("")
            .contains("service is down: 503"),
        "{d:#?}"
    );
    assert!(d.message.contains("code 7"), "{d:#?}");
    assert_eq!(e.exit_code, Some(7));
    // The record as written on disk spells the code as CodeDeploy does.
    let raw: serde_json::Value = serde_json::from_slice(
        &std::fs::read(status.join("deployments/d-DIAGFAIL1/hosts/h-fail.json")).unwrap(),
    )
    .unwrap();
    let on_disk = raw["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "ValidateService")
        .unwrap();
    assert_eq!(on_disk["diagnostics"]["error_code"], "ScriptFailed");
    assert_eq!(on_disk["diagnostics"]["script_name"], "scripts/check.sh");
}

#[test]
fn a_script_past_its_timeout_is_script_timed_out() {
    let s = Scratch::new();
    let dest = s.path().join("www");
    let bundle = tgz(
        &s,
        "slow",
        &[
            (
                "appspec.yml",
                &appspec(
                    &dest,
                    "  BeforeInstall:\n    - location: scripts/slow.sh\n      timeout: 1\n",
                ),
                0o644,
            ),
            ("app/index.html", "v1", 0o644),
            (
                "scripts/slow.sh",
                "#!/bin/sh\necho waiting\nsleep 60\n",
                0o755,
            ),
        ],
    );
    let status = s.path().join("status");
    let cmd = local_command("d-DIAGSLOW1", &bundle, &status);
    let rec = final_record(&s, "h-slow", &cmd, &status);
    let e = failed_event(&rec);
    assert_eq!(
        (e.name.as_str(), e.status),
        ("BeforeInstall", EventState::TimedOut)
    );
    assert_eq!(code_of(e), ErrorCode::ScriptTimedOut);
    let d = e.diagnostics.as_ref().unwrap();
    assert_eq!(d.script_name.as_deref(), Some("scripts/slow.sh"));
    assert!(
        d.log_tail.as_deref().unwrap_or("").contains("waiting"),
        "{d:#?}"
    );
}

/// The AppSpec check at DownloadBundle finds a hook script the bundle lacks before any hook
/// runs: that is AppSpecInvalid. A script that disappears after that check (here an earlier
/// hook removes it) reaches the hook runner: ScriptMissing, naming the script.
#[test]
fn a_missing_script_is_appspec_invalid_up_front_and_script_missing_at_run_time() {
    let s = Scratch::new();
    let dest = s.path().join("www");
    let status = s.path().join("status");

    let absent = tgz(
        &s,
        "absent",
        &[
            (
                "appspec.yml",
                &appspec(
                    &dest,
                    "  AfterInstall:\n    - location: scripts/nowhere.sh\n",
                ),
                0o644,
            ),
            ("app/index.html", "v1", 0o644),
        ],
    );
    let cmd = local_command("d-DIAGABSENT", &absent, &status);
    let rec = final_record(&s, "h-absent", &cmd, &status);
    let e = failed_event(&rec);
    assert_eq!(e.name, "DownloadBundle");
    assert_eq!(code_of(e), ErrorCode::AppSpecInvalid);
    let d = e.diagnostics.as_ref().unwrap();
    assert!(d.message.contains("scripts/nowhere.sh"), "{d:#?}");

    let vanishing = tgz(
        &s,
        "vanishing",
        &[
            (
                "appspec.yml",
                &appspec(
                    &dest,
                    "  BeforeInstall:\n    - location: scripts/rm.sh\n  AfterInstall:\n    - location: scripts/later.sh\n",
                ),
                0o644,
            ),
            ("app/index.html", "v1", 0o644),
            ("scripts/rm.sh", "#!/bin/sh\nrm scripts/later.sh\n", 0o755),
            ("scripts/later.sh", "#!/bin/sh\necho never\n", 0o755),
        ],
    );
    let cmd = local_command("d-DIAGGONE1", &vanishing, &status);
    let rec = final_record(&s, "h-gone", &cmd, &status);
    let e = failed_event(&rec);
    assert_eq!(e.name, "AfterInstall");
    assert_eq!(code_of(e), ErrorCode::ScriptMissing);
    assert_eq!(
        e.diagnostics.as_ref().unwrap().script_name.as_deref(),
        Some("scripts/later.sh")
    );
}

#[test]
fn a_bundle_whose_sha256_differs_is_checksum_mismatch() {
    let s = Scratch::new();
    let dest = s.path().join("www");
    let bundle = tgz(
        &s,
        "b",
        &[
            ("appspec.yml", &appspec(&dest, ""), 0o644),
            ("app/index.html", "v1", 0o644),
        ],
    );
    let status = s.path().join("status");
    let mut wrong = sha256_file(&bundle);
    // Flip the last digit: a hash of the right shape, not this bundle's.
    let last = if wrong.ends_with('0') { "1" } else { "0" };
    wrong.replace_range(63.., last);
    let cmd = command(
        "d-DIAGSUM01",
        Revision::Local {
            path: bundle.display().to_string(),
            bundle_type: BundleType::Tgz,
            sha256: Some(wrong),
        },
        StatusSinkSpec::Local {
            dir: status.display().to_string(),
        },
    );
    let rec = final_record(&s, "h-sum", &cmd, &status);
    let e = failed_event(&rec);
    assert_eq!(e.name, "DownloadBundle");
    assert_eq!(code_of(e), ErrorCode::ChecksumMismatch);
    assert!(
        !dest.exists(),
        "nothing may be installed from an unverified bundle"
    );
}

#[test]
fn a_bundle_with_a_dot_dot_entry_is_bundle_refused() {
    let s = Scratch::new();
    let dest = s.path().join("www");
    let bundle = tgz(
        &s,
        "evil",
        &[
            ("appspec.yml", &appspec(&dest, ""), 0o644),
            ("app/index.html", "v1", 0o644),
            ("app/../../escape.txt", "pwned", 0o644),
        ],
    );
    let status = s.path().join("status");
    let cmd = local_command("d-DIAGEVIL1", &bundle, &status);
    let rec = final_record(&s, "h-evil", &cmd, &status);
    let e = failed_event(&rec);
    assert_eq!(e.name, "DownloadBundle");
    assert_eq!(code_of(e), ErrorCode::BundleRefused);
    assert!(
        e.diagnostics
            .as_ref()
            .unwrap()
            .message
            .contains("escape.txt"),
        "{e:#?}"
    );
}

#[test]
fn an_agent_killed_mid_hook_reports_agent_interrupted_when_restarted() {
    let s = Scratch::new();
    let dest = s.path().join("www");
    let started = s.path().join("started");
    let bundle = tgz(
        &s,
        "long",
        &[
            (
                "appspec.yml",
                &appspec(
                    &dest,
                    "  ApplicationStart:\n    - location: scripts/start.sh\n      timeout: 600\n",
                ),
                0o644,
            ),
            ("app/index.html", "v1", 0o644),
            (
                "scripts/start.sh",
                &format!(
                    "#!/bin/sh\necho $$ > {}\nexec sleep 600\n",
                    started.display()
                ),
                0o755,
            ),
        ],
    );
    let status = s.path().join("status");
    let cmd = local_command("d-DIAGKILL1", &bundle, &status);
    let host_agent = Agent::builder(s.path().join("h-kill"))
        .host("h-kill")
        .spool()
        .build();
    host_agent.submit(&cmd);

    let agent = host_agent.start();
    let hook_pid = wait_for(
        Duration::from_secs(60),
        "the hook to start",
        &|| agent.log(),
        || {
            std::fs::read_to_string(&started)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
        },
    );
    // The record of ApplicationStart running is written asynchronously: wait for it, so
    // that the kill lands in the middle of the hook as the record says.
    wait_for(
        Duration::from_secs(30),
        "ApplicationStart recorded as running",
        &|| agent.log(),
        || {
            local_record(&status, "d-DIAGKILL1", "h-kill").filter(|r| {
                r.events
                    .iter()
                    .any(|e| e.name == "ApplicationStart" && e.status == EventState::InProgress)
            })
        },
    );
    // SIGKILL: no chance to write a final status.
    agent.signal(nix::sys::signal::Signal::SIGKILL);
    drop(agent);
    // The orphaned hook (its own process group) is still sleeping; end it for tidiness.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(hook_pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let before = local_record(&status, "d-DIAGKILL1", "h-kill").expect("progress was written");
    assert_eq!(before.status, DeploymentStatus::InProgress, "{before:#?}");

    let mut agent = host_agent.start();
    let rec = wait_for(
        Duration::from_secs(60),
        "the restarted agent's final status",
        &|| agent.log(),
        || local_record(&status, "d-DIAGKILL1", "h-kill").filter(|r| r.status.is_final()),
    );
    assert_eq!(
        agent.terminate(Duration::from_secs(30)),
        0,
        "{}",
        agent.log()
    );
    let e = failed_event(&rec);
    assert_eq!(e.name, "ApplicationStart");
    assert_eq!(code_of(e), ErrorCode::AgentInterrupted);
}
