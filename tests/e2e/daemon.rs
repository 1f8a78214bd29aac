//! `pier-agent run` end to end: real agent processes polling a spool directory or SQS queues
//! on the moto server, deploying real bundles, writing status records to local files or S3.

use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

use pier_protocol::{
    BundleType, Command, DeploymentStatus, EventState, Revision, StatusRecord, StatusSinkSpec,
    StatusTarget,
};
use pier_transport::sqs::{create_with_dlq, SqsQueue};

use crate::support::{agent_bin, moto_clients, skip, unique, Agent, Scratch};

pub(crate) fn sha256_file(p: &Path) -> String {
    crate::support::sha256(&std::fs::read(p).unwrap())
}

/// Writes a tgz bundle whose appspec copies `app/` to `dest` and runs `hooks` (event, script
/// body) from `scripts/`.
pub(crate) fn tgz_bundle(
    scratch: &Scratch,
    name: &str,
    dest: &Path,
    hooks: &[(&str, &str)],
) -> PathBuf {
    let dir = scratch.path().join(format!("{name}-src"));
    let mut spec = format!(
        "version: 0.0\nos: linux\nfiles:\n  - source: app\n    destination: {}\n",
        dest.display()
    );
    if !hooks.is_empty() {
        spec.push_str("hooks:\n");
    }
    scratch.write(&format!("{name}-src/app/index.html"), name);
    for (i, (event, body)) in hooks.iter().enumerate() {
        spec.push_str(&format!(
            "  {event}:\n    - location: scripts/h{i}.sh\n      timeout: 600\n"
        ));
        scratch.script(&format!("{name}-src/scripts/h{i}.sh"), body);
    }
    scratch.write(&format!("{name}-src/appspec.yml"), &spec);
    let out = scratch.path().join(format!("{name}.tgz"));
    let f = std::fs::File::create(&out).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all(".", &dir).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    out
}

pub(crate) fn command(id: &str, revision: Revision, sink: StatusSinkSpec) -> Command {
    Command {
        version: 1,
        deployment_id: id.into(),
        application_name: "web".into(),
        deployment_group_name: "prod".into(),
        deployment_group_id: "g-prod".into(),
        revision,
        events: None,
        file_exists_behavior: None,
        is_rollback: false,
        creator: Some("e2e".into()),
        commit_sha: Some("0123456789abcdef0123456789abcdef01234567".into()),
        ignore_application_stop_failures: false,
        status: StatusTarget {
            sink,
            notify_queue_url: None,
        },
        created_at: chrono::Utc::now(),
    }
}

/// A command for a tgz bundle on this host, reporting to a local status directory.
pub(crate) fn local_command(id: &str, bundle: &Path, status: &Path) -> Command {
    command(
        id,
        Revision::Local {
            path: bundle.display().to_string(),
            bundle_type: BundleType::Tgz,
            sha256: Some(sha256_file(bundle)),
        },
        StatusSinkSpec::Local {
            dir: status.display().to_string(),
        },
    )
}

pub(crate) fn local_record(status_dir: &Path, id: &str, host: &str) -> Option<StatusRecord> {
    let p = status_dir.join(format!("deployments/{id}/hosts/{host}.json"));
    let bytes = std::fs::read(p).ok()?;
    StatusRecord::from_json(&bytes).ok()
}

/// Polls `f` every 100 ms until it gives a value or `bound` passes.
pub(crate) fn wait_for<T>(
    bound: Duration,
    what: &str,
    agent_log: &dyn Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t.elapsed() < bound,
            "timed out waiting for {what}\n--- agent log\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An agent for host `id` taking commands from its spool, with `extra` configuration.
pub(crate) fn spool_host(scratch: &Scratch, id: &str, extra: &str) -> Agent {
    Agent::builder(scratch.path().join(id))
        .host(id)
        .spool()
        .config(extra)
        .build()
}

#[test]
fn spool_transport_end_to_end() {
    let scratch = Scratch::new();
    let host = spool_host(&scratch, "solo", "");
    let spool = host.spool();
    let status = scratch.path().join("status");
    let dest = scratch.path().join("www");
    let hook_out = scratch.path().join("hook.txt");
    let bundle = tgz_bundle(
        &scratch,
        "v1",
        &dest,
        &[(
            "AfterInstall",
            &format!(
                "#!/bin/sh\necho \"$DEPLOYMENT_ID $APPLICATION_NAME $DEPLOYMENT_GROUP_NAME\" > {}\n",
                hook_out.display()
            ),
        )],
    );
    let mut agent = host.start();
    let cmd = local_command("d-SPOOL0001", &bundle, &status);
    // The spool directory appears once the agent has started.
    wait_for(
        Duration::from_secs(30),
        "spool dir",
        &|| agent.log(),
        || spool.is_dir().then_some(()),
    );
    host.submit(&cmd);
    let rec = wait_for(
        Duration::from_secs(60),
        "final status",
        &|| agent.log(),
        || local_record(&status, "d-SPOOL0001", "solo").filter(|r| r.status.is_final()),
    );
    assert_eq!(rec.status, DeploymentStatus::Succeeded, "{rec:?}");
    assert!(rec
        .events
        .iter()
        .any(|e| e.name == "AfterInstall" && e.status == EventState::Succeeded));
    assert_eq!(
        std::fs::read_to_string(dest.join("index.html")).unwrap(),
        "v1"
    );
    assert_eq!(
        std::fs::read_to_string(&hook_out).unwrap().trim(),
        "d-SPOOL0001 web prod"
    );
    // Acknowledged only after the final status: the command file ends in done/.
    wait_for(Duration::from_secs(10), "ack", &|| agent.log(), || {
        spool.join("done/d-SPOOL0001.json").exists().then_some(())
    });
    assert_eq!(agent.terminate(Duration::from_secs(30)), 0);
}

#[test]
fn sigterm_during_a_long_hook_stops_cleanly_and_next_start_reports_it() {
    let scratch = Scratch::new();
    let host = spool_host(
        &scratch,
        "stopper",
        "daemon:\n  shutdown_grace_seconds: 1\n",
    );
    let spool = host.spool();
    let status = scratch.path().join("status");
    let dest = scratch.path().join("www");
    let started = scratch.path().join("started");
    let bundle = tgz_bundle(
        &scratch,
        "slow",
        &dest,
        &[(
            "ApplicationStart",
            &format!("#!/bin/sh\necho $$ > {}\nsleep 600\n", started.display()),
        )],
    );
    let cmd = local_command("d-STOP00001", &bundle, &status);
    std::fs::create_dir_all(spool).unwrap();
    host.submit(&cmd);
    let mut agent = host.start();
    wait_for(
        Duration::from_secs(60),
        "hook start",
        &|| agent.log(),
        || {
            std::fs::read_to_string(&started)
                .ok()
                .filter(|s| !s.trim().is_empty())
        },
    );
    let hook_pid: i32 = std::fs::read_to_string(&started)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // Grace 1 s + kill grace 1 s: well within 30 s, not the hook's 600 s.
    assert_eq!(
        agent.terminate(Duration::from_secs(30)),
        0,
        "{}",
        agent.log()
    );
    assert!(
        !Path::new(&format!("/proc/{hook_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{hook_pid}/stat"))
                .unwrap_or_default()
                .contains(") Z "),
        "hook {hook_pid} outlived the agent"
    );
    let rec = local_record(&status, "d-STOP00001", "stopper").expect("status written at stop");
    assert_eq!(rec.status, DeploymentStatus::Failed);
    assert!(
        rec.error.as_deref().unwrap_or("").contains("shut down"),
        "{rec:?}"
    );
    // The hook the shutdown stopped is the failed event, and says why.
    let stopped = rec
        .events
        .iter()
        .find(|e| e.name == "ApplicationStart")
        .unwrap();
    assert_eq!(stopped.status, EventState::Failed, "{rec:?}");
    assert_eq!(
        stopped.diagnostics.as_ref().map(|d| d.error_code),
        Some(pier_protocol::ErrorCode::AgentInterrupted),
        "{rec:?}"
    );
    // Not acknowledged: the command is still in processing/ for the next start.
    assert!(!spool.join("done/d-STOP00001.json").exists());

    let agent2 = host.start();
    wait_for(
        Duration::from_secs(30),
        "next start acknowledges",
        &|| agent2.log(),
        || spool.join("done/d-STOP00001.json").exists().then_some(()),
    );
    assert!(agent2.log().contains("d-STOP00001"), "{}", agent2.log());
    // And it did not run it again: the hook would have rewritten `started`.
    assert_eq!(
        std::fs::read_to_string(&started).unwrap().trim(),
        hook_pid.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_over_sqs_and_s3_with_failure_duplicate_and_malformed_messages() {
    let aws = moto_clients().await;
    let scratch = Scratch::new();
    let bucket = unique("pier-e2e");
    aws.s3.create_bucket().bucket(&bucket).send().await.unwrap();

    // The revisions: bundles uploaded to S3, verified by sha256 on each host. The two hosts
    // share this machine, so each gets a bundle with its own destination.
    let dest_root = scratch.path().join("dest");
    let count_file = scratch.path().join("runs.txt");
    let counting_hook = format!(
        "#!/bin/sh\necho \"$DEPLOYMENT_ID $BUNDLE_BUCKET $BUNDLE_KEY\" >> {}\n",
        count_file.display()
    );
    let good_a = tgz_bundle(
        &scratch,
        "good-a",
        &dest_root.join("host-a"),
        &[("BeforeInstall", &counting_hook)],
    );
    let good_b = tgz_bundle(
        &scratch,
        "good-b",
        &dest_root.join("host-b"),
        &[("BeforeInstall", &counting_hook)],
    );
    let bad = tgz_bundle(
        &scratch,
        "bad",
        &scratch.path().join("bad-dest"),
        &[(
            "ValidateService",
            "#!/bin/sh\necho 'service is down: 503'\nexit 7\n",
        )],
    );
    for (key, path) in [
        ("good-a.tgz", &good_a),
        ("good-b.tgz", &good_b),
        ("bad.tgz", &bad),
    ] {
        aws.s3
            .put_object()
            .bucket(&bucket)
            .key(key)
            .body(std::fs::read(path).unwrap().into())
            .send()
            .await
            .unwrap();
    }
    let s3_rev = |key: &str, path: &Path| Revision::S3 {
        bucket: bucket.clone(),
        key: key.into(),
        version_id: None,
        etag: None,
        bundle_type: BundleType::Tgz,
        sha256: sha256_file(path),
    };
    let sink = StatusSinkSpec::S3 {
        bucket: bucket.clone(),
        prefix: "pier".into(),
    };

    // Two hosts, each with its own queue (max 1 receive before the DLQ) and root.
    let mut agents = Vec::new();
    let mut queues = Vec::new();
    for host in ["host-a", "host-b"] {
        let qname = unique(&format!("pier-{host}"));
        let url = create_with_dlq(&aws.sqs, &qname, 1).await.unwrap();
        agents.push(
            Agent::builder(scratch.path().join(host))
                .host(host)
                .sqs(&url)
                .spawn(),
        );
        queues.push((host, SqsQueue::new(aws.sqs.clone(), &url), qname));
    }
    let logs = || {
        agents
            .iter()
            .map(|a| a.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };

    // A malformed message first: rejected, never run, and the agent keeps serving.
    queues[0]
        .1
        .send(b"{\"version\": 1, \"deployment_id\": 5}")
        .await
        .unwrap();

    // The good deployment to both hosts; host-a gets its command twice (a duplicate delivery).
    let good_for_a = command("d-GOOD00001", s3_rev("good-a.tgz", &good_a), sink.clone());
    let good_for_b = command("d-GOOD00001", s3_rev("good-b.tgz", &good_b), sink.clone());
    queues[0].1.send(&good_for_a.to_json()).await.unwrap();
    queues[1].1.send(&good_for_b.to_json()).await.unwrap();
    queues[0].1.send(&good_for_a.to_json()).await.unwrap();

    let s3 = aws.s3.clone();
    let read = |id: String, host: &'static str| {
        let s3 = s3.clone();
        let bucket = bucket.clone();
        async move {
            let out = s3
                .get_object()
                .bucket(&bucket)
                .key(format!("pier/deployments/{id}/hosts/{host}.json"))
                .send()
                .await
                .ok()?;
            let bytes = out.body.collect().await.ok()?.into_bytes();
            StatusRecord::from_json(&bytes).ok()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    for host in ["host-a", "host-b"] {
        loop {
            if let Some(r) = read("d-GOOD00001".into(), host).await {
                if r.status.is_final() {
                    assert_eq!(
                        r.status,
                        DeploymentStatus::Succeeded,
                        "{host}: {r:?}\n{}",
                        logs()
                    );
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no final status from {host}\n{}",
                logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for host in ["host-a", "host-b"] {
        assert_eq!(
            std::fs::read_to_string(dest_root.join(host).join("index.html")).unwrap(),
            format!("good-{}", &host[5..])
        );
    }

    // A failing deployment on host-b reports the failing event, script, exit code and tail.
    let failing = command("d-BAD000001", s3_rev("bad.tgz", &bad), sink.clone());
    queues[1].1.send(&failing.to_json()).await.unwrap();
    let rec = loop {
        if let Some(r) = read("d-BAD000001".into(), "host-b").await {
            if r.status.is_final() {
                break r;
            }
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(60),
            "no status\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(rec.status, DeploymentStatus::Failed);
    let ev = rec
        .events
        .iter()
        .find(|e| e.status == EventState::Failed)
        .expect("a failed event");
    assert_eq!(ev.name, "ValidateService");
    assert_eq!(ev.exit_code, Some(7));
    assert_eq!(ev.failing_script.as_deref(), Some("scripts/h0.sh"));
    assert!(ev
        .log_tail
        .as_deref()
        .unwrap_or("")
        .contains("service is down: 503"));

    // The malformed message ends in host-a's dead-letter queue, not deleted.
    let dlq_url = aws
        .sqs
        .get_queue_url()
        .queue_name(format!("{}-dlq", queues[0].2))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let t = Instant::now();
    let dead = loop {
        let got = aws
            .sqs
            .receive_message()
            .queue_url(&dlq_url)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        if let Some(m) = got.messages.unwrap_or_default().into_iter().next() {
            break m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "malformed message never reached the DLQ\n{}",
            logs()
        );
    };
    assert!(dead.body.unwrap().contains("deployment_id"));
    assert!(
        agents[0].log().contains("rejected message"),
        "{}",
        agents[0].log()
    );

    // Let the duplicate be consumed, then count the runs: host-a ran d-GOOD00001 once, and
    // host-b once: two BeforeInstall lines in all.
    let t = Instant::now();
    loop {
        let attrs = aws
            .sqs
            .get_queue_attributes()
            .queue_url(queues[0].1.url())
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
            .send()
            .await
            .unwrap();
        let a = attrs.attributes.unwrap_or_default();
        let n = |k: aws_sdk_sqs::types::QueueAttributeName| {
            a.get(&k).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0)
        };
        if n(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages) == 0
            && n(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible) == 0
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "host-a's queue never drained\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let runs = std::fs::read_to_string(&count_file).unwrap();
    let good_runs = runs
        .lines()
        .filter(|l| l.starts_with("d-GOOD00001 "))
        .count();
    assert_eq!(
        good_runs, 2,
        "one run per host, the duplicate not run:\n{runs}"
    );
    assert!(
        runs.contains(&format!("d-GOOD00001 {bucket} good-a.tgz")),
        "{runs}"
    );
    assert!(logs().contains("duplicate"), "{}", logs());

    for a in agents.iter_mut() {
        assert_eq!(a.terminate(Duration::from_secs(60)), 0);
    }
}

/// The agent's log lines reach journald with structured fields when the journal socket
/// exists. Runs under a private journald (../shared/tools/with-journald.sh); skipped, saying
/// so, where that cannot start.
#[test]
fn journald_gets_structured_deployment_fields() {
    // `shared/` sits beside the checkout; a git worktree is one level further down.
    let root = crate::support::repo_root();
    let Some(tool) = root
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("shared/tools/with-journald.sh"))
        .find(|tool| tool.exists())
    else {
        skip(&format!(
            "no shared/tools/with-journald.sh beside {}",
            root.display()
        ));
        return;
    };
    let scratch = Scratch::new();
    // Configured only: the agent runs inside the private journald's namespace, below.
    let host = spool_host(&scratch, "jhost", "");
    let spool = host.spool();
    let status = scratch.path().join("status");
    let bundle = tgz_bundle(
        &scratch,
        "j",
        &scratch.path().join("www"),
        &[("ValidateService", "#!/bin/sh\nexit 4\n")],
    );
    let cmd = local_command("d-JOURNAL01", &bundle, &status);
    std::fs::create_dir_all(spool).unwrap();
    host.submit(&cmd);
    let record = status.join("deployments/d-JOURNAL01/hosts/jhost.json");
    let script = scratch.write(
        "in-journal.sh",
        &format!(
            "set -u\n{agent} run -c {cfg} &\npid=$!\nfor _ in $(seq 1 600); do grep -q '\"Failed\"' {rec} 2>/dev/null && break; sleep 0.1; done\nkill -TERM $pid; wait $pid\njournalctl -o json --no-pager\n",
            agent = agent_bin().display(),
            cfg = host.config().display(),
            rec = record.display()
        ),
    );
    let out = Proc::new("unshare")
        .args(["--mount", "--propagation", "private"])
        .arg(&tool)
        .arg("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stdout.trim().is_empty() {
        skip(&format!("a private journald could not start: {stderr}"));
        return;
    }
    let entries: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &serde_json::Value| e["DEPLOYMENT_ID"] == "d-JOURNAL01")
        .collect();
    assert!(
        !entries.is_empty(),
        "no journal entry with DEPLOYMENT_ID\n{stdout}\n{stderr}"
    );
    let failed = entries
        .iter()
        .find(|e| e["LIFECYCLE_EVENT"] == "ValidateService" && e["SCRIPT"] == "scripts/h0.sh")
        .unwrap_or_else(|| panic!("no ValidateService failure entry with SCRIPT: {entries:#?}"));
    assert_eq!(failed["DEPLOYMENT_GROUP"], "g-prod");
    assert_eq!(failed["PRIORITY"], "3", "an error-level entry");
}

/// The packaged systemd unit is valid (systemd-analyze verify, with ExecStart pointing at the
/// binary this run built) and runs the agent as Type=notify with a watchdog.
#[test]
fn packaged_systemd_unit_verifies() {
    let unit = crate::support::repo_root().join("packaging/pier-agent.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(text.contains("Type=notify") && text.contains("WatchdogSec="));
    assert!(text.contains("ExecStart=/usr/bin/pier-agent run"));
    if Proc::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        skip("systemd-analyze not installed");
        return;
    }
    let scratch = Scratch::new();
    let copy = scratch.write(
        "pier-agent.service",
        &text.replace("/usr/bin/pier-agent", &agent_bin().display().to_string()),
    );
    let out = Proc::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A valid command that can never run (its events are out of lifecycle order) is reported as
/// failed with the reason and acknowledged once, not redelivered for ever.
#[test]
fn a_command_that_cannot_start_is_reported_and_acknowledged() {
    let scratch = Scratch::new();
    let host = spool_host(&scratch, "strict", "");
    let spool = host.spool();
    let status = scratch.path().join("status");
    let bundle = tgz_bundle(&scratch, "b", &scratch.path().join("www"), &[]);
    let mut cmd = local_command("d-ORDER0001", &bundle, &status);
    cmd.events = Some(vec!["ApplicationStart".into(), "BeforeInstall".into()]);
    std::fs::create_dir_all(spool).unwrap();
    host.submit(&cmd);
    let mut agent = host.start();
    let rec = wait_for(
        Duration::from_secs(60),
        "final status",
        &|| agent.log(),
        || local_record(&status, "d-ORDER0001", "strict").filter(|r| r.status.is_final()),
    );
    assert_eq!(rec.status, DeploymentStatus::Failed);
    assert!(
        rec.error
            .as_deref()
            .unwrap_or("")
            .contains("lifecycle order"),
        "{rec:?}"
    );
    wait_for(Duration::from_secs(10), "ack", &|| agent.log(), || {
        spool.join("done/d-ORDER0001.json").exists().then_some(())
    });
    assert!(
        !scratch.path().join("www").exists(),
        "nothing was installed"
    );
    assert_eq!(agent.terminate(Duration::from_secs(30)), 0);
}

/// Deployments of different groups run at once; two of the same group run one after the
/// other. Each hook proves it by what it can see of the others, not by timing: the two
/// groups' hooks each wait for the other's to have started, and the same-group hooks check
/// that the other is not running.
#[test]
fn different_groups_deploy_at_once_and_one_group_one_at_a_time() {
    let scratch = Scratch::new();
    let host = spool_host(&scratch, "conc", "daemon:\n  concurrency: 4\n");
    let spool = host.spool();
    let status = scratch.path().join("status");
    let marks = scratch.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let m = |n: &str| marks.join(n).display().to_string();
    // Groups g1 and g2: each waits (up to 30 s) for the other to have started.
    let meet = |me: &str, other: &str| {
        format!(
            "#!/bin/sh\ntouch {me}\nfor i in $(seq 1 300); do [ -e {other} ] && exit 0; sleep 0.1; done\necho 'never saw {other}'; exit 1\n",
            me = m(me),
            other = m(other)
        )
    };
    // Group g3, twice: each marks itself running, checks the other is not, and takes a while.
    let alone = |me: &str, other: &str| {
        format!(
            "#!/bin/sh\ntouch {me}.running\n[ -e {other}.running ] && {{ echo 'ran alongside {other}'; exit 1; }}\nsleep 1\nrm {me}.running\n",
            me = m(me),
            other = m(other)
        )
    };
    let jobs = [
        ("d-CONC00001", "g1", meet("g1", "g2")),
        ("d-CONC00002", "g2", meet("g2", "g1")),
        ("d-CONC00003", "g3", alone("a", "b")),
        ("d-CONC00004", "g3", alone("b", "a")),
    ];
    std::fs::create_dir_all(spool).unwrap();
    for (id, group, hook) in &jobs {
        let bundle = tgz_bundle(
            &scratch,
            id,
            &scratch.path().join("www").join(id),
            &[("AfterInstall", hook)],
        );
        let mut cmd = local_command(id, &bundle, &status);
        cmd.deployment_group_id = group.to_string();
        cmd.deployment_group_name = group.to_string();
        host.submit(&cmd);
    }
    let agent = host.start();
    for (id, _, _) in &jobs {
        let rec = wait_for(Duration::from_secs(90), id, &|| agent.log(), || {
            local_record(&status, id, "conc").filter(|r| r.status.is_final())
        });
        assert_eq!(
            rec.status,
            DeploymentStatus::Succeeded,
            "{id}: {:?}\n{}",
            rec.events
                .iter()
                .filter_map(|e| e.log_tail.clone())
                .collect::<Vec<_>>(),
            agent.log()
        );
    }
}

/// SIGHUP reloads the configuration for the deployments that start afterwards.
#[test]
fn sighup_reloads_the_configuration() {
    let scratch = Scratch::new();
    let host = spool_host(&scratch, "reload", "");
    let status = scratch.path().join("status");
    let out = scratch.path().join("env.txt");
    let agent = host.start();
    wait_for(Duration::from_secs(30), "ready", &|| agent.log(), || {
        agent.log().contains("ready").then_some(())
    });
    let text = std::fs::read_to_string(host.config()).unwrap();
    std::fs::write(
        host.config(),
        text.replace(
            "hooks:\n",
            "hooks:\n  env:\n    set:\n      RELOADED: \"yes\"\n",
        ),
    )
    .unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(30), "reload", &|| agent.log(), || {
        agent.log().contains("applied").then_some(())
    });
    let bundle = tgz_bundle(
        &scratch,
        "r",
        &scratch.path().join("www"),
        &[(
            "AfterInstall",
            &format!(
                "#!/bin/sh\necho \"${{RELOADED:-no}}\" > {}\n",
                out.display()
            ),
        )],
    );
    let cmd = local_command("d-RELOAD001", &bundle, &status);
    host.submit(&cmd);
    let rec = wait_for(
        Duration::from_secs(60),
        "final status",
        &|| agent.log(),
        || local_record(&status, "d-RELOAD001", "reload").filter(|r| r.status.is_final()),
    );
    assert_eq!(rec.status, DeploymentStatus::Succeeded, "{rec:?}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "yes");
}

/// A deployment whose final status cannot be written is not acknowledged, and not forgotten
/// either: its message is handled again (without running the deployment twice) until the
/// status lands.
#[test]
fn a_status_that_cannot_be_written_is_retried_not_lost() {
    let scratch = Scratch::new();
    // Retries after 1 s, then 2 s: the test waits seconds, not the production minutes.
    let host = spool_host(
        &scratch,
        "retry",
        "daemon:
  retry_base_seconds: 1
  retry_max_seconds: 2
",
    );
    let spool = host.spool();
    let status = scratch.path().join("status");
    // A file where the sink needs a directory: every write fails until it is removed.
    std::fs::create_dir_all(&status).unwrap();
    let blocker = status.join("deployments");
    std::fs::write(&blocker, "not a directory").unwrap();
    let runs = scratch.path().join("runs.txt");
    let bundle = tgz_bundle(
        &scratch,
        "r",
        &scratch.path().join("www"),
        &[(
            "AfterInstall",
            &format!("#!/bin/sh\necho ran >> {}\n", runs.display()),
        )],
    );
    let cmd = local_command("d-RETRY0001", &bundle, &status);
    std::fs::create_dir_all(spool).unwrap();
    host.submit(&cmd);
    let agent = host.start();
    wait_for(
        Duration::from_secs(60),
        "a retry to be planned",
        &|| agent.log(),
        || {
            agent
                .log()
                .contains("trying its message again")
                .then_some(())
        },
    );
    assert!(
        !spool.join("done/d-RETRY0001.json").exists(),
        "acknowledged without a status"
    );
    std::fs::remove_file(&blocker).unwrap();
    let rec = wait_for(
        Duration::from_secs(30),
        "final status",
        &|| agent.log(),
        || local_record(&status, "d-RETRY0001", "retry").filter(|r| r.status.is_final()),
    );
    assert_eq!(rec.status, DeploymentStatus::Succeeded, "{rec:?}");
    wait_for(Duration::from_secs(30), "ack", &|| agent.log(), || {
        spool.join("done/d-RETRY0001.json").exists().then_some(())
    });
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "ran\n", "ran once");
}

/// Takes group `group`'s lock under `root` as a deployment running in another process
/// holds it; released when the returned lock is dropped.
fn hold_group_lock(root: &Path, group: &str) -> nix::fcntl::Flock<std::fs::File> {
    let dir = root.join("groups").join(group);
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .unwrap();
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .unwrap()
}

/// A group locked by another process at start (a deploy-local running there) does not hold
/// up the agent's start: recovery skips it and the agent gets ready and stops as usual.
#[test]
fn a_group_locked_elsewhere_does_not_hold_up_the_start() {
    let scratch = Scratch::new();
    let host = spool_host(&scratch, "busy", "daemon:\n  poll_wait_seconds: 1\n");
    let _held = hold_group_lock(host.root(), "g-prod");
    let mut agent = host.start();
    wait_for(Duration::from_secs(30), "ready", &|| agent.log(), || {
        agent.log().contains("ready").then_some(())
    });
    assert!(
        agent
            .log()
            .contains("group g-prod is busy in another process"),
        "{}",
        agent.log()
    );
    assert_eq!(
        agent.terminate(Duration::from_secs(10)),
        0,
        "{}",
        agent.log()
    );
}

/// A deployment waiting for its group's lock (held here by another process, as a running
/// deployment would hold it) does not keep a stopping agent: SIGTERM ends the wait and the
/// agent exits well within its drain bound, leaving the command for the next start.
#[test]
fn sigterm_cancels_a_wait_for_the_group_lock() {
    let scratch = Scratch::new();
    let host = spool_host(
        &scratch,
        "locked",
        "daemon:\n  shutdown_grace_seconds: 1\n  poll_wait_seconds: 1\n",
    );
    let status = scratch.path().join("status");
    let bundle = tgz_bundle(&scratch, "r", &scratch.path().join("www"), &[]);
    let mut agent = host.start();
    wait_for(Duration::from_secs(30), "ready", &|| agent.log(), || {
        agent.log().contains("ready").then_some(())
    });
    // The group's lock, as a deployment of it running in another process holds it.
    let _held = hold_group_lock(host.root(), "g-prod");
    let cmd = local_command("d-LOCKED001", &bundle, &status);
    host.submit(&cmd);
    wait_for(
        Duration::from_secs(30),
        "the wait for the group lock",
        &|| agent.log(),
        || {
            agent
                .log()
                .contains("waiting for deployment group g-prod")
                .then_some(())
        },
    );
    // The drain bound is grace 1 s + kill grace 1 s + 30 s; a cancelled wait needs none of it.
    let t = Instant::now();
    assert_eq!(
        agent.terminate(Duration::from_secs(10)),
        0,
        "{}",
        agent.log()
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    let log = agent.log();
    assert!(log.contains("no longer waiting for group g-prod"), "{log}");
    assert!(
        !host.spool().join("done/d-LOCKED001.json").exists(),
        "acknowledged unrun"
    );
    assert!(
        !host
            .root()
            .join("groups/g-prod")
            .join("deployments/d-LOCKED001")
            .exists(),
        "started without the lock"
    );
}

/// A deployment interrupted by a crash, in a group another process holds when the agent
/// starts again, is not left "in progress" for ever: the agent retries its message, closes
/// it once the group is free, reports it failed (AgentInterrupted) and acknowledges it.
#[test]
fn an_interrupted_deployment_in_a_busy_group_is_reported_once_the_group_is_free() {
    let scratch = Scratch::new();
    let host = spool_host(
        &scratch,
        "crashed",
        "daemon:\n  poll_wait_seconds: 1\n  retry_base_seconds: 1\n  retry_max_seconds: 2\n",
    );
    let status = scratch.path().join("status");
    let started = scratch.path().join("started");
    let bundle = tgz_bundle(
        &scratch,
        "slow",
        &scratch.path().join("www"),
        &[(
            "ApplicationStart",
            &format!(
                "#!/bin/sh\necho $$ > {}\nexec sleep 600\n",
                started.display()
            ),
        )],
    );
    let cmd = local_command("d-BUSYCRASH", &bundle, &status);
    host.submit(&cmd);
    let agent = host.start();
    let hook = wait_for(Duration::from_secs(60), "the hook", &|| agent.log(), || {
        std::fs::read_to_string(&started)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
    });
    agent.signal(nix::sys::signal::Signal::SIGKILL);
    drop(agent);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(hook),
        nix::sys::signal::Signal::SIGKILL,
    );

    // Another process holds the group while the agent starts again.
    let held = hold_group_lock(host.root(), "g-prod");
    let mut agent = host.start();
    wait_for(
        Duration::from_secs(30),
        "the message to wait for the busy group",
        &|| agent.log(),
        || {
            agent
                .log()
                .contains("its group is busy in another process")
                .then_some(())
        },
    );
    let rec = local_record(&status, "d-BUSYCRASH", "crashed").expect("progress was written");
    assert_eq!(rec.status, DeploymentStatus::InProgress, "{rec:#?}");

    drop(held);
    let rec = wait_for(
        Duration::from_secs(30),
        "the final record",
        &|| agent.log(),
        || local_record(&status, "d-BUSYCRASH", "crashed").filter(|r| r.status.is_final()),
    );
    assert_eq!(rec.status, DeploymentStatus::Failed, "{rec:#?}");
    let interrupted = rec
        .events
        .iter()
        .find(|e| e.name == "ApplicationStart")
        .and_then(|e| e.diagnostics.as_ref())
        .map(|d| d.error_code);
    assert_eq!(
        interrupted,
        Some(pier_protocol::ErrorCode::AgentInterrupted),
        "{rec:#?}"
    );
    wait_for(Duration::from_secs(30), "the ack", &|| agent.log(), || {
        host.spool()
            .join("done/d-BUSYCRASH.json")
            .exists()
            .then_some(())
    });
    assert_eq!(
        agent.terminate(Duration::from_secs(10)),
        0,
        "{}",
        agent.log()
    );
}
