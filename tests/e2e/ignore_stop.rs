//! `--ignore-application-stop-failures` with a real agent on the spool: revision A's
//! ApplicationStop script exits 1, which only shows when the next revision, B, is deployed
//! (ApplicationStop runs the previous successful revision's scripts). Without the option B
//! fails there and installs nothing; with it (from `pier deploy --hosts`, from the flag on a
//! stored group, or from the group's own setting) B succeeds and its status record says
//! ApplicationStop failed and was ignored.

use std::path::{Path, PathBuf};

use pier_protocol::{DeploymentStatus, ErrorCode, EventState, EventStatus, StatusRecord};

use crate::daemon::local_record;
use crate::support::{pier, Agent, Run, Scratch};

/// A directory revision installing `site/index.html` (saying `rel`) into `dest`; with
/// `stop_fails`, its ApplicationStop script prints a line and exits 1.
fn revision(s: &Scratch, rel: &str, dest: &Path, stop_fails: bool) -> PathBuf {
    let hooks = if stop_fails {
        "hooks:\n  ApplicationStop:\n    - location: scripts/stop.sh\n      timeout: 30\n"
    } else {
        ""
    };
    s.write(
        &format!("{rel}/appspec.yml"),
        &format!(
            "version: 0.0\nos: linux\nfiles:\n  - source: site\n    destination: {}\n{hooks}",
            dest.display()
        ),
    );
    s.write(&format!("{rel}/site/index.html"), &format!("{rel}\n"));
    s.script(
        &format!("{rel}/scripts/stop.sh"),
        "#!/bin/sh\necho 'cannot stop: no pid file' >&2\nexit 1\n",
    );
    s.path().join(rel)
}

fn application_stop(rec: &StatusRecord) -> &EventStatus {
    rec.events
        .iter()
        .find(|e| e.name == "ApplicationStop")
        .unwrap_or_else(|| panic!("no ApplicationStop in {rec:?}"))
}

/// The record of a B deployed with the option: succeeded, its ApplicationStop failed with
/// A's script as the cause and ignored, every other event fine.
fn assert_ignored(rec: &StatusRecord, context: &dyn Fn() -> String) {
    assert_eq!(rec.status, DeploymentStatus::Succeeded, "{}", context());
    assert_eq!(rec.error, None);
    let stop = application_stop(rec);
    assert_eq!(stop.status, EventState::Failed, "{stop:?}");
    assert!(stop.ignored, "{stop:?}");
    assert_eq!(stop.exit_code, Some(1));
    assert_eq!(stop.failing_script.as_deref(), Some("scripts/stop.sh"));
    let d = stop
        .diagnostics
        .as_ref()
        .expect("diagnostics on the ignored event");
    assert_eq!(d.error_code, ErrorCode::ScriptFailed);
    assert!(
        stop.log_tail
            .as_deref()
            .unwrap_or("")
            .contains("cannot stop: no pid file"),
        "{stop:?}"
    );
    for e in rec.events.iter().filter(|e| e.name != "ApplicationStop") {
        assert!(
            matches!(e.status, EventState::Succeeded | EventState::Skipped) && !e.ignored,
            "{e:?}"
        );
    }
}

#[test]
fn a_failing_stop_script_blocks_the_next_revision_unless_ignored() {
    let s = Scratch::new();
    let dest = s.path().join("dest");
    let agent = Agent::builder(s.path().join("web-1"))
        .host("web-1")
        .spool()
        .spawn();
    let spool = s.path().join("web-1/root/spool");
    let status = s.path().join("status");
    let a = revision(&s, "a", &dest, true);
    let b = revision(&s, "b", &dest, false);
    let deploy = |rev: &Path, extra: &[&str]| -> Run {
        let mut args = vec![
            "deploy",
            "--application",
            "web",
            "--deployment-group",
            "prod",
            "--revision",
            rev.to_str().unwrap(),
            "--hosts",
            "web-1",
            "--spool-dir",
            spool.to_str().unwrap(),
            "--status-dir",
            status.to_str().unwrap(),
            "--wait",
            "--timeout",
            "60",
            "--poll-interval",
            "0.2",
        ];
        args.extend_from_slice(extra);
        pier(&args)
    };
    let index = || std::fs::read_to_string(dest.join("index.html")).unwrap();

    // A installs; its broken stop script does not run yet.
    let run = deploy(&a, &[]);
    assert_eq!(run.code, 0, "{}\n--- agent\n{}", run.all(), agent.log());
    assert_eq!(index(), "a\n");

    // B without the option: A's stop script fails the host, and B is not installed.
    let run = deploy(&b, &[]);
    assert_eq!(run.code, 1, "{}\n--- agent\n{}", run.all(), agent.log());
    assert!(
        run.stderr.contains(
            "web-1: deployment failed in ApplicationStop (Failed), script scripts/stop.sh, \
             exit code 1 [ScriptFailed]\n"
        ),
        "{}",
        run.stderr
    );
    let rec = local_record(&status, run.stdout.trim(), "web-1").expect("a status record");
    assert_eq!(rec.status, DeploymentStatus::Failed);
    assert!(!application_stop(&rec).ignored);
    assert_eq!(index(), "a\n");

    // B with it: the failure is recorded as ignored and B goes on to install.
    let run = deploy(&b, &["--ignore-application-stop-failures"]);
    let context = || format!("{}\n--- agent\n{}", run.all(), agent.log());
    assert_eq!(run.code, 0, "{}", context());
    let id = run.stdout.trim().to_string();
    let rec = local_record(&status, &id, "web-1").expect("a status record");
    assert_ignored(&rec, &context);
    assert_eq!(index(), "b\n");
    assert!(
        run.stderr
            .lines()
            .any(|l| l.starts_with("web-1: ApplicationStop")
                && l.contains("Failed (ignored)")
                && l.ends_with("[ScriptFailed]")),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("web-1: Succeeded"), "{}", run.stderr);
    let table = pier(&["status", &id, "--status-dir", status.to_str().unwrap()]).success();
    assert!(
        table.stdout.lines().any(|l| l.starts_with("web-1")
            && l.split_whitespace().nth(1) == Some("ApplicationStop")
            && l.contains(" Failed (ignored) ")),
        "{}",
        table.stdout
    );
    assert!(
        table.stdout.contains("web-1: Succeeded\n"),
        "{}",
        table.stdout
    );
}

#[test]
fn a_stored_group_ignores_stop_failures_from_the_flag_or_its_own_setting() {
    let s = Scratch::new();
    let agent = Agent::builder(s.path().join("h1"))
        .host("h1")
        .spool()
        .spawn();
    let status = s.path().join("status");
    // Each group installs into a directory of its own (Install refuses another group's files).
    let revisions = |group: &str| {
        let dest = s.path().join(format!("dest-{group}"));
        (
            revision(&s, &format!("{group}-a"), &dest, true),
            revision(&s, &format!("{group}-b"), &dest, false),
        )
    };
    let put_group = |name: &str, extra: &str| {
        let file = s.write(
            &format!("{name}.yml"),
            &format!(
                "name: {name}\napplication: shop\nhosts: [h1]\ndeployment_config: AllAtOnce\n\
                 transport:\n  type: spool\n  spool_dir: \"{}/{{host}}/root/spool\"\n{extra}",
                s.path().display()
            ),
        );
        pier(&[
            "group",
            "put",
            file.to_str().unwrap(),
            "--status-dir",
            status.to_str().unwrap(),
        ])
        .success();
    };
    let deploy = |group: &str, rev: &Path, extra: &[&str]| -> (String, StatusRecord) {
        let mut args = vec![
            "deploy",
            "--application",
            "shop",
            "--deployment-group",
            group,
            "--revision",
            rev.to_str().unwrap(),
            "--status-dir",
            status.to_str().unwrap(),
            "--poll-interval",
            "0.2",
        ];
        args.extend_from_slice(extra);
        let run = pier(&args);
        let context = format!("{}\n--- agent\n{}", run.all(), agent.log());
        assert_eq!(run.code, 0, "{context}");
        let id = run.stdout.lines().next().unwrap().trim().to_string();
        let rec = local_record(&status, &id, "h1")
            .unwrap_or_else(|| panic!("no status record\n{context}"));
        (context, rec)
    };

    // The flag, on a group that does not say.
    put_group("plain", "");
    let (a, b) = revisions("plain");
    let (_, rec) = deploy("plain", &a, &[]);
    assert!(!application_stop(&rec).ignored);
    let (context, rec) = deploy("plain", &b, &["--ignore-application-stop-failures"]);
    assert_ignored(&rec, &|| context.clone());

    // The group's own setting, without the flag.
    put_group("lenient", "ignore_application_stop_failures: true\n");
    let (a, b) = revisions("lenient");
    deploy("lenient", &a, &[]);
    let (context, rec) = deploy("lenient", &b, &[]);
    assert_ignored(&rec, &|| context.clone());
}
