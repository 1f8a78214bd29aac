//! Fleet rollouts with real agents: a deployment group stored with `pier group put`, deployed
//! by `pier deploy --deployment-group G` (no `--hosts`) batch by batch under CodeDeploy's
//! minimum-healthy-hosts rules, with the record in the shared store telling what was
//! dispatched when. Each agent's hooks append `DEPLOYMENT_ID` to its own log, so a test sees
//! exactly which hosts ran a deployment and how often; an agent whose `FAIL` is 1 fails
//! ValidateService.
//!
//! On the spool (no cloud): batch sizes for HOST_COUNT, OneAtATime stopping at its first
//! failure, HalfAtATime succeeding despite one failure, approval holding dispatch, a
//! controller killed mid-rollout and resumed by another with no host run twice, and a stop.
//! On moto: agents on their own SQS queues, status in S3, results learned through the
//! deployment's notification queue.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pier_protocol::record::{DeploymentRecord, HostRolloutState, RolloutStatus};

use crate::support::*;

/// A bundle with no files in `rel`: AfterInstall appends `$DEPLOYMENT_ID` to `$HOOK_LOG` after
/// sleeping `$HOOK_SLEEP` seconds (2 more while the file `$FAIL_DIR/slow` exists);
/// ValidateService is `validate` (a shell script).
fn hook_bundle(s: &Scratch, rel: &str, validate: &str) -> PathBuf {
    s.write(
        &format!("{rel}/appspec.yml"),
        "version: 0.0\nos: linux\nhooks:\n  AfterInstall:\n    - location: record.sh\n      \
         timeout: 60\n  ValidateService:\n    - location: validate.sh\n      timeout: 60\n",
    );
    s.script(
        &format!("{rel}/record.sh"),
        "#!/bin/sh\nsleep \"${HOOK_SLEEP:-0}\"\n[ -f \"$FAIL_DIR/slow\" ] && sleep 2\n\
         echo \"$DEPLOYMENT_ID\" >> \"$HOOK_LOG\"\n",
    );
    s.script(&format!("{rel}/validate.sh"), validate);
    s.path().join(rel)
}

/// The fleet's usual bundle ([`hook_bundle`]): ValidateService fails when `$PIER_HOST` is
/// listed in `$FAIL_DIR/GROUP` (see [`SpoolFleet::group`]), else exits `$FAIL`.
fn bundle(s: &Scratch) -> PathBuf {
    hook_bundle(
        s,
        "bundle",
        "#!/bin/sh\ngrep -qx \"$PIER_HOST\" \"$FAIL_DIR/$DEPLOYMENT_GROUP_NAME\" 2>/dev/null \
         && exit 1\nexit \"${FAIL:-0}\"\n",
    )
}

/// When [`commit`] commits the bundle (its committer time, which push records for lead time).
const COMMITTED_AT: &str = "2026-01-02T03:04:05Z";

/// Makes `dir` a git checkout with everything committed at [`COMMITTED_AT`].
fn commit(dir: &Path) {
    for args in [
        &["init", "-q"][..],
        &["add", "-A"],
        &[
            "-c",
            "user.name=pier tests",
            "-c",
            "user.email=tests@pier.invalid",
            "commit",
            "-qm",
            "bundle",
        ],
    ] {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_COMMITTER_DATE", COMMITTED_AT)
            .env("GIT_AUTHOR_DATE", COMMITTED_AT)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
    }
}

/// A fleet of spool agents `h1..hN` under `s`.
struct SpoolFleet {
    agents: Vec<RunningAgent>,
    dir: PathBuf,
    status: PathBuf,
    revision: PathBuf,
}

impl SpoolFleet {
    fn start(s: &Scratch, n: usize, sleep: u32) -> SpoolFleet {
        let dir = s.path().join("fleet");
        let mut agents = Vec::new();
        for i in 1..=n {
            let host = format!("h{i}");
            let log = dir.join(format!("{host}.hooks"));
            agents.push(
                Agent::builder(dir.join(&host))
                    .host(&host)
                    .spool()
                    .hook_env("HOOK_LOG", &log.display().to_string())
                    .hook_env("PIER_HOST", &host)
                    .hook_env("FAIL_DIR", &dir.display().to_string())
                    .hook_env("HOOK_SLEEP", &sleep.to_string())
                    .spawn(),
            );
        }
        let revision = s.path().join("rev.tgz");
        let source = bundle(s);
        commit(&source);
        pier(&[
            "push",
            "--application",
            "shop",
            "--source",
            source.to_str().unwrap(),
            "--local-location",
            revision.to_str().unwrap(),
        ])
        .success();
        SpoolFleet {
            agents,
            status: s.path().join("status"),
            dir,
            revision,
        }
    }

    /// Stores the group `name` with every host and `config`, plus `extra` YAML; the hosts in
    /// `failing` fail its deployments.
    fn group(&self, s: &Scratch, name: &str, config: &str, failing: &[&str], extra: &str) {
        std::fs::write(self.dir.join(name), failing.join("\n") + "\n").unwrap();
        let hosts: Vec<String> = (1..=self.agents.len()).map(|i| format!("h{i}")).collect();
        let file = s.write(
            &format!("{name}.yml"),
            &format!(
                "name: {name}\napplication: shop\nhosts: [{}]\ndeployment_config: {config}\n\
                 transport:\n  type: spool\n  spool_dir: \"{}/{{host}}/root/spool\"\n{extra}",
                hosts.join(", "),
                self.dir.display()
            ),
        );
        pier(&[
            "group",
            "put",
            file.to_str().unwrap(),
            "--status-dir",
            self.status(),
        ])
        .success();
    }

    fn status(&self) -> &str {
        self.status.to_str().unwrap()
    }

    fn deploy_args<'a>(&'a self, group: &'a str) -> Vec<&'a str> {
        vec![
            "deploy",
            "--application",
            "shop",
            "--deployment-group",
            group,
            "--revision",
            self.revision.to_str().unwrap(),
            "--status-dir",
            self.status(),
            "--poll-interval",
            "0.2",
        ]
    }

    /// How many times host `h` ran `deployment`.
    fn runs(&self, host: &str, deployment: &str) -> usize {
        std::fs::read_to_string(self.dir.join(format!("{host}.hooks")))
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == deployment)
            .count()
    }

    fn record(&self, deployment: &str) -> DeploymentRecord {
        let path = self
            .status
            .join(format!("deployments/{deployment}/record.json"));
        DeploymentRecord::from_json(&std::fs::read(&path).unwrap()).unwrap()
    }
}

fn deployment_id(run: &Run) -> String {
    run.stdout
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no deployment id printed\n{}", run.all()))
        .trim()
        .to_string()
}

fn batch_sizes(rec: &DeploymentRecord) -> Vec<usize> {
    rec.batches.iter().map(|b| b.hosts.len()).collect()
}

fn states(rec: &DeploymentRecord) -> BTreeMap<String, HostRolloutState> {
    rec.hosts
        .iter()
        .map(|(h, r)| (h.clone(), r.state))
        .collect()
}

/// `pier` started in the background with the test environment of [`pier`].
fn spawn_pier(args: &[&str], log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new(pier_bin())
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env_remove("PIER_STATUS_BUCKET")
        .env_remove("PIER_STATUS_DIR")
        .env_remove("PIER_SIGNING_KEY")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap()
}

/// Waits (bounded) until the file at `log` has a first line: the deployment id.
fn first_line(log: &Path) -> String {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(id) = text.lines().find(|l| l.starts_with("d-")) {
            return id.trim().to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no id in {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_exit(child: &mut Child, bound: Duration) -> i32 {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        assert!(t.elapsed() < bound, "pier did not finish within {bound:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn rollouts_follow_the_minimum_healthy_hosts_rules() {
    let s = Scratch::new();
    let fleet = SpoolFleet::start(&s, 5, 0);

    // HOST_COUNT 3 of 5, h1 and h4 failing: two at a time at first (h1, h2); h1's failure
    // leaves room for one more at a time (h3, then h4); h4's leaves exactly three healthy,
    // so h5 cannot be taken out of service: the deployment fails and h5 is never sent.
    fleet.group(&s, "count", "HOST_COUNT:3", &["h1", "h4"], "");
    let run = pier(&fleet.deploy_args("count"));
    let id = deployment_id(&run);
    let rec = fleet.record(&id);
    assert_eq!(run.code, 1, "{}", run.all());
    assert_eq!(rec.status, RolloutStatus::Failed, "{}", run.all());
    assert_eq!(batch_sizes(&rec), [2, 1, 1]);
    assert_eq!(rec.hosts["h5"].state, HostRolloutState::Skipped);
    assert_eq!(fleet.runs("h5", &id), 0);
    for h in ["h1", "h2", "h3", "h4"] {
        assert_eq!(fleet.runs(h, &id), 1, "{h} ran {id} once");
    }
    assert!(
        rec.status_reason
            .as_deref()
            .unwrap_or("")
            .contains("minimum of 3"),
        "{:?}",
        rec.status_reason
    );
    assert!(
        run.stderr.contains("h1: failed: ValidateService"),
        "{}",
        run.stderr
    );

    // OneAtATime: h1 fails first, so nothing more is sent and the rest are skipped...
    fleet.group(&s, "one", "OneAtATime", &["h1"], "");
    let run = pier(&fleet.deploy_args("one"));
    assert_eq!(run.code, 1, "{}", run.all());
    let id = deployment_id(&run);
    let rec = fleet.record(&id);
    assert_eq!(rec.status, RolloutStatus::Failed);
    assert_eq!(batch_sizes(&rec), [1]);
    assert_eq!(rec.hosts["h1"].state, HostRolloutState::Failed);
    for h in ["h2", "h3", "h4", "h5"] {
        assert_eq!(rec.hosts[h].state, HostRolloutState::Skipped, "{h}");
        assert_eq!(fleet.runs(h, &id), 0, "{h} never got {id}");
    }

    // ...while a failure on the last host alone still succeeds.
    fleet.group(&s, "one-last", "OneAtATime", &["h5"], "");
    let run = pier(&fleet.deploy_args("one-last"));
    assert_eq!(run.code, 0, "{}", run.all());
    let rec = fleet.record(&deployment_id(&run));
    assert_eq!(rec.status, RolloutStatus::Succeeded);
    assert_eq!(batch_sizes(&rec), [1, 1, 1, 1, 1]);
    assert_eq!(rec.hosts["h5"].state, HostRolloutState::Failed);

    // HalfAtATime of 5: minimum 3 (half, rounded up), so two at a time; one failure still
    // leaves four successes.
    fleet.group(&s, "half", "HalfAtATime", &["h5"], "");
    let run = pier(&fleet.deploy_args("half"));
    let id = deployment_id(&run);
    let rec = fleet.record(&id);
    assert_eq!(
        rec.minimum_healthy_hosts,
        pier_protocol::record::MinimumHealthyHosts::FleetPercent(50)
    );
    assert_eq!(batch_sizes(&rec), [2, 2, 1]);
    assert_eq!(rec.status, RolloutStatus::Succeeded, "{}", run.all());
    assert_eq!(run.code, 0);

    // --deployment-config overrides the group: AllAtOnce sends all five in one batch; with
    // --format json stdout is the final record, for pipelines.
    let mut args = fleet.deploy_args("half");
    args.extend(["--deployment-config", "AllAtOnce", "--format", "json"]);
    let run = pier(&args);
    assert_eq!(run.code, 0, "{}", run.all());
    let printed = DeploymentRecord::from_json(run.stdout.as_bytes()).expect("a record on stdout");
    let rec = fleet.record(&printed.deployment_id);
    assert_eq!(printed.status, rec.status);
    assert_eq!(batch_sizes(&rec), [5]);
    assert_eq!(rec.config_name, "AllAtOnce");
    assert_eq!(rec.status, RolloutStatus::Succeeded);
    // The commit push recorded reaches the record, with its time.
    assert_eq!(rec.commit_sha.as_ref().map(String::len), Some(40));
    assert_eq!(rec.commit_time, Some(COMMITTED_AT.parse().unwrap()));

    // The metrics of these five deployments, all of one commit: groups count and one
    // failed (two incidents, neither restored: their groups never succeed); one-last and
    // half succeeded, the first deployment of the commit to each (lead time measured); the
    // AllAtOnce one deployed it to half again (a repeat). Change failure rate 2 of 5.
    let run = pier(&["dora", "--format", "json", "--status-dir", fleet.status()]).success();
    let r: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(r["deployments"]["succeeded"], 3, "{r}");
    assert_eq!(r["deployments"]["failed"], 2, "{r}");
    assert_eq!(r["lead_time"]["measured"], 2, "{r}");
    assert_eq!(r["lead_time"]["repeats"], 1, "{r}");
    assert_eq!(r["change_failure_rate"]["failures"], 2, "{r}");
    assert_eq!(r["change_failure_rate"]["changes"], 5, "{r}");
    assert_eq!(r["time_to_restore"]["unrestored"], 2, "{r}");
}

#[test]
fn approval_holds_dispatch_and_a_killed_controller_is_resumed_without_repeats() {
    let s = Scratch::new();
    // Each hook sleeps 1 s so a rollout is slow enough to catch mid-way.
    let fleet = SpoolFleet::start(&s, 3, 1);
    fleet.group(&s, "gated", "OneAtATime", &[], "require_approval: true\n");

    // Held: nothing is sent until approved.
    let log = s.path().join("deploy-1.log");
    let mut args = fleet.deploy_args("gated");
    args.extend(["--lease", "3"]);
    let mut child = spawn_pier(&args, &log);
    let id = first_line(&log);
    std::thread::sleep(Duration::from_secs(2));
    let rec = fleet.record(&id);
    assert_eq!(rec.status, RolloutStatus::PendingApproval);
    assert!(rec.batches.is_empty());
    for h in ["h1", "h2", "h3"] {
        assert_eq!(fleet.runs(h, &id), 0);
    }
    // One deployment per group at a time: a second one is refused while this one is open.
    let second = pier(&args);
    assert_eq!(second.code, 64, "{}", second.all());
    assert!(second.stderr.contains(&id), "{}", second.stderr);
    assert!(second.stderr.contains("--resume"), "{}", second.stderr);
    pier(&[
        "approve",
        &id,
        "--status-dir",
        fleet.status(),
        "--comment",
        "ship it",
    ])
    .success();
    let rec = fleet.record(&id);
    assert!(rec
        .approval
        .as_ref()
        .is_some_and(|a| a.approved && a.comment.as_deref() == Some("ship it")));

    // Kill the controller once the first batch is claimed, then resume from another.
    wait_for("the first batch", || {
        (!fleet.record(&id).batches.is_empty()).then_some(())
    });
    child.kill().unwrap();
    let _ = child.wait();
    let before = fleet.record(&id);
    assert!(!before.status.is_final());
    let run = pier(&[
        "deploy",
        "--resume",
        &id,
        "--status-dir",
        fleet.status(),
        "--poll-interval",
        "0.2",
    ]);
    assert_eq!(run.code, 0, "{}", run.all());
    let rec = fleet.record(&id);
    assert_eq!(rec.status, RolloutStatus::Succeeded);
    assert_eq!(batch_sizes(&rec), [1, 1, 1]);
    for h in ["h1", "h2", "h3"] {
        assert_eq!(
            fleet.runs(h, &id),
            1,
            "{h} ran {id} exactly once\n{}",
            run.all()
        );
    }
    assert!(rec.lease.is_none(), "the lease is given up at the end");

    // Reject: nothing is ever sent.
    let log = s.path().join("deploy-2.log");
    let mut child = spawn_pier(&fleet.deploy_args("gated"), &log);
    let id = first_line(&log);
    pier(&["reject", &id, "--status-dir", fleet.status()]).success();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), 1);
    let rec = fleet.record(&id);
    assert_eq!(rec.status, RolloutStatus::Failed);
    assert!(rec.approval.as_ref().is_some_and(|a| !a.approved));
    assert!(rec
        .hosts
        .values()
        .all(|h| h.state == HostRolloutState::Skipped));

    // Stop mid-rollout: the host in flight finishes, nothing more is sent.
    fleet.group(&s, "slow", "OneAtATime", &[], "");
    let log = s.path().join("deploy-3.log");
    let mut child = spawn_pier(&fleet.deploy_args("slow"), &log);
    let id = first_line(&log);
    wait_for("the first batch", || {
        (!fleet.record(&id).batches.is_empty()).then_some(())
    });
    pier(&["stop", &id, "--status-dir", fleet.status()]).success();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), 1);
    let rec = fleet.record(&id);
    assert_eq!(rec.status, RolloutStatus::Stopped);
    assert_eq!(rec.batches.len(), 1, "{:?}", states(&rec));
    let skipped = rec.count(HostRolloutState::Skipped);
    assert_eq!(skipped, 2, "{:?}", states(&rec));
}

#[test]
fn a_group_file_with_problems_is_refused_with_all_of_them() {
    let s = Scratch::new();
    let file = s.write(
        "bad.yml",
        "name: web/prod\napplication: shop\ndeployment_config: HOST_COUNT:x\ncolour: blue\n",
    );
    let status = s.path().join("status");
    let run = pier(&[
        "group",
        "put",
        file.to_str().unwrap(),
        "--status-dir",
        status.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 64, "{}", run.all());
    for key in ["name", "deployment_config", "colour"] {
        assert!(run.stderr.contains(key), "{key} not named:\n{}", run.stderr);
    }
    assert!(!status.join("groups").exists(), "nothing stored");
    // A group that does not exist is named, with what to do.
    let run = pier(&[
        "deploy",
        "--application",
        "shop",
        "--deployment-group",
        "nope",
        "--revision",
        "/nonexistent.tgz",
        "--status-dir",
        status.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 64, "{}", run.all());
    assert!(run.stderr.contains("pier group put"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_fleet_learns_results_from_the_notification_queue() {
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let s = Scratch::new();
    let dir = s.path().join("fleet");
    let prefix = unique("fleet");
    let mut agents = Vec::new();
    for i in 1..=3 {
        let host = format!("{prefix}-h{i}");
        let log = dir.join(format!("{host}.hooks"));
        agents.push(
            Agent::builder(dir.join(&host))
                .host(&host)
                .sqs_own_queue()
                .hook_env("HOOK_LOG", &log.display().to_string())
                .hook_env("FAIL", if i == 3 { "1" } else { "0" })
                .config("daemon:\n  poll_wait_seconds: 1\n")
                .spawn(),
        );
    }
    let key = format!("{prefix}/rev.tgz");
    let push = pier(&[
        "push",
        "--application",
        "shop",
        "--source",
        bundle(&s).to_str().unwrap(),
        "--s3-location",
        &format!("s3://{bucket}/{key}"),
    ])
    .success();
    let rev = s.write("rev.json", &push.stdout);
    // Deployment events go to an SNS topic, read back through a queue subscribed to it.
    let sns = aws_sdk_sns::Client::new(&aws.config);
    let topic = sns
        .create_topic()
        .name(format!("{prefix}-events"))
        .send()
        .await
        .unwrap()
        .topic_arn()
        .unwrap()
        .to_string();
    let inbox = aws
        .sqs
        .create_queue()
        .queue_name(format!("{prefix}-inbox"))
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_string();
    let inbox_arn = aws
        .sqs
        .get_queue_attributes()
        .queue_url(&inbox)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes()
        .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
        .clone();
    sns.subscribe()
        .topic_arn(&topic)
        .protocol("sqs")
        .endpoint(&inbox_arn)
        .send()
        .await
        .unwrap();
    let group = s.write(
        "g.yml",
        &format!(
            "name: {prefix}\napplication: shop\nhosts: [{p}-h1, {p}-h2, {p}-h3]\n\
             deployment_config: HOST_COUNT:1\nnotifications:\n  - sns_topic_arn: {topic}\n    \
             events: [DeploymentStart, DeploymentSuccess]\n",
            p = prefix
        ),
    );
    // The agents create their queues on start; wait until all three exist.
    for i in 1..=3 {
        let name = format!("pier-{prefix}-h{i}");
        crate::support::wait_for_queue(&aws.sqs, &name).await;
    }
    let status = [
        "--status-bucket",
        bucket.as_str(),
        "--status-prefix",
        "pier",
    ];
    let mut put = vec!["group", "put", group.to_str().unwrap()];
    put.extend(status);
    pier(&put).success();
    let rev_arg = format!("@{}", rev.display());
    let mut args = vec![
        "deploy",
        "--application",
        "shop",
        "--deployment-group",
        &prefix,
        "--revision",
        &rev_arg,
        "--poll-interval",
        "0.5",
    ];
    args.extend(status);
    let run = tokio::task::spawn_blocking({
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        move || pier(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    // HOST_COUNT 1 of 3: two at a time; h3 fails, two succeed: the deployment succeeds.
    assert_eq!(run.code, 0, "{}", run.all());
    let id = deployment_id(&run);
    let obj = aws
        .s3
        .get_object()
        .bucket(&bucket)
        .key(format!("pier/deployments/{id}/record.json"))
        .send()
        .await
        .unwrap();
    let rec = DeploymentRecord::from_json(&obj.body.collect().await.unwrap().into_bytes()).unwrap();
    assert_eq!(batch_sizes(&rec), [2, 1]);
    assert_eq!(rec.count(HostRolloutState::Succeeded), 2);
    assert_eq!(rec.count(HostRolloutState::Failed), 1);
    // The deployment's notification queue is gone once it ended.
    let gone = aws
        .sqs
        .get_queue_url()
        .queue_name(format!("pier-status-{id}"))
        .send()
        .await;
    assert!(gone.is_err(), "notification queue left behind");
    // SNS got DeploymentStart and DeploymentSuccess for it.
    let mut heard = Vec::new();
    let t = Instant::now();
    while heard.len() < 2 && t.elapsed() < Duration::from_secs(30) {
        let out = aws
            .sqs
            .receive_message()
            .queue_url(&inbox)
            .wait_time_seconds(1)
            .max_number_of_messages(10)
            .send()
            .await
            .unwrap();
        for m in out.messages() {
            let envelope: serde_json::Value = serde_json::from_str(m.body().unwrap()).unwrap();
            let doc: serde_json::Value =
                serde_json::from_str(envelope["Message"].as_str().unwrap()).unwrap();
            assert_eq!(doc["deployment_id"], id.as_str(), "{doc}");
            heard.push(doc["event"].as_str().unwrap().to_string());
        }
    }
    heard.sort();
    assert_eq!(heard, ["DeploymentStart", "DeploymentSuccess"]);
    drop(agents);
}

/// A second bundle, `v2` ([`hook_bundle`]): ValidateService fails on the hosts listed in the
/// bundle's own `failhosts` (so the revision is bad, not the host).
fn bad_bundle(s: &Scratch, failing: &[&str]) -> PathBuf {
    s.write("bundle-v2/failhosts", &(failing.join("\n") + "\n"));
    hook_bundle(
        s,
        "bundle-v2",
        "#!/bin/sh\ngrep -qx \"$PIER_HOST\" \"$(dirname \"$0\")/failhosts\" && exit 1\nexit 0\n",
    )
}

fn push_local(bundle: &Path, to: &Path) {
    pier(&[
        "push",
        "--application",
        "shop",
        "--source",
        bundle.to_str().unwrap(),
        "--local-location",
        to.to_str().unwrap(),
    ])
    .success();
}

/// A health endpoint on 127.0.0.1 answering `status` (changed by the test) to every GET.
fn health_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicU16>) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU16, Ordering};
    let status = std::sync::Arc::new(AtomicU16::new(200));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/health", listener.local_addr().unwrap());
    let answer = status.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 2048];
            let _ = conn.read(&mut buf);
            let code = answer.load(Ordering::SeqCst);
            let _ = write!(
                conn,
                "HTTP/1.1 {code} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            );
        }
    });
    (url, status)
}

#[test]
fn failures_and_a_failing_health_check_roll_back_to_the_last_success() {
    use std::sync::atomic::Ordering;
    let s = Scratch::new();
    let fleet = SpoolFleet::start(&s, 3, 0);
    let v2 = s.path().join("rev-v2.tgz");
    push_local(&bad_bundle(&s, &["h2"]), &v2);
    let (url, health) = health_server();
    fleet.group(
        &s,
        "rb",
        "OneAtATime",
        &[],
        &format!(
            "auto_rollback:\n  on_failure: true\n  on_alarm: true\nhealth_url: \"{url}\"\n\
             health_grace_seconds: 1\n"
        ),
    );

    // v1 succeeds everywhere: the group's last success.
    let good = pier(&fleet.deploy_args("rb"));
    assert_eq!(good.code, 0, "{}", good.all());
    let v1_id = deployment_id(&good);

    // v2 fails on h2 (the second host, one at a time): the deployment fails, h3 is never
    // sent, and h1 and h2 (the hosts that got v2) are rolled back to v1.
    let mut args = fleet.deploy_args("rb");
    let v2_arg = v2.to_str().unwrap().to_string();
    let pos = args.iter().position(|a| *a == "--revision").unwrap();
    args[pos + 1] = &v2_arg;
    let bad = pier(&args);
    assert_eq!(bad.code, 1, "{}", bad.all());
    let id = deployment_id(&bad);
    let rec = fleet.record(&id);
    assert_eq!(rec.status, RolloutStatus::Failed);
    let rb_id = rec.rolled_back_by.clone().expect("rolled back");
    let rb = fleet.record(&rb_id);
    assert_eq!(rb.rollback_of.as_deref(), Some(id.as_str()));
    assert_eq!(rb.revision, fleet.record(&v1_id).revision, "back to v1");
    assert_eq!(
        rb.hosts.keys().cloned().collect::<Vec<_>>(),
        ["h1", "h2"],
        "only the hosts that got v2"
    );
    assert_eq!(rb.status, RolloutStatus::Succeeded, "{}", bad.all());
    for h in ["h1", "h2"] {
        assert_eq!(fleet.runs(h, &rb_id), 1, "{h} ran the rollback once");
    }
    assert_eq!(fleet.runs("h3", &id), 0);
    assert_eq!(fleet.runs("h3", &rb_id), 0);
    assert!(
        bad.stderr.contains(&format!("rolled back by {rb_id}")),
        "{}",
        bad.stderr
    );

    // The health URL fails while v1 deploys (slowly) again: three failed checks in a row stop
    // the rollout, which is rolled back although every host it reached succeeded.
    health.store(500, Ordering::SeqCst);
    std::fs::write(fleet.dir.join("slow"), "").unwrap();
    let run = pier(&fleet.deploy_args("rb"));
    assert_eq!(run.code, 1, "{}", run.all());
    let rec = fleet.record(&deployment_id(&run));
    assert_eq!(rec.status, RolloutStatus::Failed);
    assert!(
        rec.status_reason
            .as_deref()
            .unwrap_or("")
            .contains("health check"),
        "{:?}",
        rec.status_reason
    );
    // The first host was sent before the third failed check (each takes 2 s to deploy).
    assert_eq!(rec.batches[0].hosts, ["h1"]);
    assert!(
        rec.count(HostRolloutState::Skipped) >= 1,
        "{:?}",
        states(&rec)
    );
    let rb = fleet.record(rec.rolled_back_by.as_deref().expect("rolled back"));
    assert_eq!(rb.status, RolloutStatus::Succeeded, "{}", run.all());
    assert_eq!(rb.hosts.len(), rec.batches.len());
}

#[test]
fn stop_with_rollback_and_manual_rollback() {
    let s = Scratch::new();
    let fleet = SpoolFleet::start(&s, 2, 1);
    fleet.group(&s, "man", "OneAtATime", &[], "");
    let v1 = pier(&fleet.deploy_args("man"));
    assert_eq!(v1.code, 0, "{}", v1.all());
    let v1_id = deployment_id(&v1);
    let v2 = pier(&fleet.deploy_args("man"));
    assert_eq!(v2.code, 0, "{}", v2.all());
    let v2_id = deployment_id(&v2);

    // pier rollback: the hosts of the latest (v2_id) go back to the last success before it…
    // which is v2_id itself, so --to is needed.
    let status = fleet.status().to_string();
    let run = pier(&[
        "rollback",
        "--deployment-group",
        "man",
        "--status-dir",
        &status,
    ]);
    assert_eq!(run.code, 64, "{}", run.all());
    assert!(run.stderr.contains("--to"), "{}", run.stderr);
    let run = pier(&[
        "rollback",
        "--deployment-group",
        "man",
        "--to",
        &v1_id,
        "--status-dir",
        &status,
    ]);
    assert_eq!(run.code, 0, "{}", run.all());
    let rb_id = fleet.record(&v2_id).rolled_back_by.expect("linked");
    let rb = fleet.record(&rb_id);
    assert_eq!(rb.rollback_of.as_deref(), Some(v2_id.as_str()));
    assert_eq!(rb.status, RolloutStatus::Succeeded);
    for h in ["h1", "h2"] {
        assert_eq!(fleet.runs(h, &rb_id), 1);
    }

    // stop --rollback mid-rollout: h1 got it, h2 never does; h1 goes back.
    let log = s.path().join("deploy.log");
    let mut child = spawn_pier(&fleet.deploy_args("man"), &log);
    let id = first_line(&log);
    wait_for("the first batch", || {
        (!fleet.record(&id).batches.is_empty()).then_some(())
    });
    let run = pier(&["stop", &id, "--rollback", "--status-dir", &status]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), 1);
    let rec = fleet.record(&id);
    assert_eq!(rec.status, RolloutStatus::Stopped);
    let rb = fleet.record(rec.rolled_back_by.as_deref().expect("rolled back"));
    assert_eq!(rb.hosts.keys().cloned().collect::<Vec<_>>(), ["h1"]);
    assert_eq!(rb.status, RolloutStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloudwatch_alarm_during_the_rollout_stops_and_rolls_it_back() {
    use aws_sdk_cloudwatch::types::{ComparisonOperator, StateValue, Statistic};
    let aws = moto_clients().await;
    let cw = aws_sdk_cloudwatch::Client::new(&aws.config);
    let alarm = unique("errors");
    cw.put_metric_alarm()
        .alarm_name(&alarm)
        .metric_name("Errors")
        .namespace("Shop")
        .statistic(Statistic::Sum)
        .period(60)
        .evaluation_periods(1)
        .threshold(1.0)
        .comparison_operator(ComparisonOperator::GreaterThanThreshold)
        .send()
        .await
        .unwrap();
    let set = |state: StateValue| {
        let cw = cw.clone();
        let alarm = alarm.clone();
        async move {
            cw.set_alarm_state()
                .alarm_name(&alarm)
                .state_value(state)
                .state_reason("test")
                .send()
                .await
                .unwrap();
        }
    };
    set(StateValue::Ok).await;

    let s = Scratch::new();
    let fleet = SpoolFleet::start(&s, 3, 1);
    fleet.group(
        &s,
        "cw",
        "OneAtATime",
        &[],
        &format!("alarms: [{alarm}]\nauto_rollback:\n  on_alarm: true\n"),
    );
    let env = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        move || pier(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let good = tokio::task::spawn_blocking(env(&fleet.deploy_args("cw")))
        .await
        .unwrap();
    assert_eq!(good.code, 0, "{}", good.all());

    let log = s.path().join("deploy.log");
    let mut args = fleet.deploy_args("cw");
    let endpoint = format!("--endpoint-url={}", moto_endpoint());
    args.push(&endpoint);
    let mut child = spawn_pier(&args, &log);
    let id = first_line(&log);
    wait_for("the first batch", || {
        (!fleet.record(&id).batches.is_empty()).then_some(())
    });
    set(StateValue::Alarm).await;
    assert_eq!(wait_exit(&mut child, Duration::from_secs(60)), 1);
    let rec = fleet.record(&id);
    assert_eq!(rec.status, RolloutStatus::Failed);
    assert!(
        rec.status_reason.as_deref().unwrap_or("").contains(&alarm),
        "{:?}\n{}",
        rec.status_reason,
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        rec.count(HostRolloutState::Skipped) >= 1,
        "{:?}",
        states(&rec)
    );
    let rb = fleet.record(rec.rolled_back_by.as_deref().expect("rolled back on alarm"));
    assert_eq!(rb.status, RolloutStatus::Succeeded);
    assert_eq!(
        rb.hosts.len(),
        rec.batches.iter().map(|b| b.hosts.len()).sum::<usize>()
    );

    // An alarm during a zone's bake (every host done, the monitor period running) stops the
    // deployment and rolls back every host that got it. (The hosts have no zone: one zone.)
    set(StateValue::Ok).await;
    fleet.group(
        &s,
        "cw",
        "AllAtOnce",
        &[],
        &format!(
            "alarms: [{alarm}]\nauto_rollback:\n  on_alarm: true\nzonal:\n  \
             first_zone_monitor_seconds: 120\n"
        ),
    );
    let log = s.path().join("deploy-bake.log");
    let mut child = spawn_pier(&args, &log);
    let id = first_line(&log);
    wait_for("the bake", || fleet.record(&id).bake_until.map(|_| ()));
    let baking = fleet.record(&id);
    assert_eq!(
        baking.count(HostRolloutState::Succeeded),
        3,
        "{:?}",
        states(&baking)
    );
    assert!(!baking.status.is_final());
    set(StateValue::Alarm).await;
    assert_eq!(wait_exit(&mut child, Duration::from_secs(60)), 1);
    let rec = fleet.record(&id);
    assert_eq!(rec.status, RolloutStatus::Failed);
    assert!(
        rec.status_reason.as_deref().unwrap_or("").contains(&alarm),
        "{:?}",
        rec.status_reason
    );
    let rb = fleet.record(rec.rolled_back_by.as_deref().expect("rolled back on alarm"));
    assert_eq!(rb.hosts.len(), 3);
    assert_eq!(rb.status, RolloutStatus::Succeeded);
    set(StateValue::Ok).await;
}

#[test]
fn zonal_rollouts_go_one_zone_at_a_time_and_bake_between_zones() {
    let s = Scratch::new();
    let dir = s.path().join("fleet");
    let status = s.path().join("status");
    let mut agents = Vec::new();
    // Four hosts found by tag in two zones; they register in the controller's store.
    for (host, zone) in [("a1", "z-a"), ("a2", "z-a"), ("b1", "z-b"), ("b2", "z-b")] {
        let log = dir.join(format!("{host}.hooks"));
        agents.push(
            Agent::builder(dir.join(host))
                .host(host)
                .spool()
                .hook_env("HOOK_LOG", &log.display().to_string())
                .config(&format!(
                    "availability_zone: {zone}\ntags:\n  role: web\nregistry:\n  dir: {}\n",
                    status.display()
                ))
                .spawn(),
        );
    }
    let st = status.to_str().unwrap().to_string();
    wait_for("four registered hosts", || {
        let run = pier(&["hosts", "--status-dir", &st, "--format", "json"]);
        let v: serde_json::Value = serde_json::from_str(&run.stdout).ok()?;
        (v.as_array()?.len() == 4).then_some(())
    });
    let revision = s.path().join("rev.tgz");
    push_local(&bundle(&s), &revision);
    let group = s.write(
        "zonal.yml",
        &format!(
            "name: zonal\napplication: shop\ntag_filters:\n  - {{key: role, value: web}}\n\
             deployment_config: AllAtOnce\nzonal:\n  first_zone_monitor_seconds: 2\n  \
             monitor_seconds: 1\ntransport:\n  type: spool\n  spool_dir: \"{}/{{host}}/root/spool\"\n",
            dir.display()
        ),
    );
    pier(&["group", "put", group.to_str().unwrap(), "--status-dir", &st]).success();
    let listed = pier(&["hosts", "--deployment-group", "zonal", "--status-dir", &st]).success();
    assert!(listed.stdout.contains("z-b"), "{}", listed.stdout);

    let run = pier(&[
        "deploy",
        "--application",
        "shop",
        "--deployment-group",
        "zonal",
        "--revision",
        revision.to_str().unwrap(),
        "--status-dir",
        &st,
        "--poll-interval",
        "0.2",
    ]);
    assert_eq!(run.code, 0, "{}", run.all());
    let id = deployment_id(&run);
    let rec = DeploymentRecord::from_json(
        &std::fs::read(status.join(format!("deployments/{id}/record.json"))).unwrap(),
    )
    .unwrap();
    // AllAtOnce within each zone, one zone at a time.
    let batches: Vec<Vec<String>> = rec.batches.iter().map(|b| b.hosts.clone()).collect();
    assert_eq!(
        batches,
        [vec!["a1", "a2"], vec!["b1", "b2"]],
        "{}",
        run.all()
    );
    assert_eq!(rec.baked_zones, ["z-a", "z-b"]);
    // Zone z-b started only after z-a's last host ended and the first zone's 2 s bake.
    let a_end = ["a1", "a2"]
        .iter()
        .filter_map(|h| rec.hosts[*h].ended_at)
        .max()
        .unwrap();
    let gap = rec.batches[1].started_at - a_end;
    assert!(
        gap >= chrono::Duration::milliseconds(1900),
        "bake was {gap}"
    );
    assert!(rec.ended_at.unwrap() - rec.batches[1].started_at >= chrono::Duration::seconds(1));
    drop(agents);
}

/// A webhook receiver on 127.0.0.1 that keeps each request's headers and body.
/// The requests a [`webhook_receiver`] got: (headers, body).
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

fn webhook_receiver() -> (String, Received) {
    use std::io::{BufRead, BufReader, Read, Write};
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            sink.lock()
                .unwrap()
                .push((head, String::from_utf8_lossy(&body).into_owned()));
            let mut conn = conn;
            let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        }
    });
    (url, got)
}

#[test]
fn a_webhook_hears_every_trigger_event_of_a_rollout_and_its_rollback() {
    let s = Scratch::new();
    let fleet = SpoolFleet::start(&s, 2, 0);
    let (url, got) = webhook_receiver();
    fleet.group(
        &s,
        "hooked",
        "OneAtATime",
        &[],
        &format!(
            "auto_rollback: {{on_failure: true}}\nnotifications:\n  - webhook: {{url: \"{url}\", \
             secret_env: PIER_E2E_HOOK_SECRET}}\n"
        ),
    );
    // Without the secret in the environment the deployment is refused before anything.
    let run = pier(&fleet.deploy_args("hooked"));
    assert_eq!(run.code, 64, "{}", run.all());
    assert!(
        run.stderr.contains("PIER_E2E_HOOK_SECRET"),
        "{}",
        run.stderr
    );

    let with_secret = |args: &[&str]| {
        run_cmd(
            Command::new(pier_bin())
                .args(args)
                .env("PIER_E2E_HOOK_SECRET", "s3cret")
                .env_remove("PIER_STATUS_DIR"),
        )
    };
    let good = with_secret(&fleet.deploy_args("hooked"));
    assert_eq!(good.code, 0, "{}", good.all());
    let v2 = s.path().join("rev-v2.tgz");
    push_local(&bad_bundle(&s, &["h1"]), &v2);
    let mut args = fleet.deploy_args("hooked");
    let v2_arg = v2.to_str().unwrap().to_string();
    let pos = args.iter().position(|a| *a == "--revision").unwrap();
    args[pos + 1] = &v2_arg;
    let bad = with_secret(&args);
    assert_eq!(bad.code, 1, "{}", bad.all());
    let bad_id = deployment_id(&bad);

    let events: Vec<(String, serde_json::Value)> = got
        .lock()
        .unwrap()
        .iter()
        .map(|(head, body)| {
            let event = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("x-pier-event: ")
                        .or(l.strip_prefix("X-Pier-Event: "))
                })
                .unwrap_or("?")
                .trim()
                .to_string();
            assert!(
                head.to_ascii_lowercase()
                    .contains("x-pier-signature-256: sha256="),
                "unsigned: {head}"
            );
            (event, serde_json::from_str(body).unwrap())
        })
        .collect();
    let of = |id: &str| -> Vec<String> {
        let mut v: Vec<String> = events
            .iter()
            .filter(|(_, d)| d["deployment_id"] == id)
            .map(|(e, _)| e.clone())
            .collect();
        v.sort();
        v
    };
    // The failed deployment: it started, h1 (first, one at a time) failed, so it failed and
    // was rolled back; the rollback announced its own start, host and success.
    assert_eq!(
        of(&bad_id),
        [
            "DeploymentFailure",
            "DeploymentRollback",
            "DeploymentStart",
            "InstanceFailure",
            "InstanceStart",
        ],
        "{events:?}"
    );
    let rb = fleet.record(&bad_id).rolled_back_by.unwrap();
    assert!(
        of(&rb).contains(&"DeploymentSuccess".to_string()),
        "{events:?}"
    );
    let failure = events
        .iter()
        .find(|(e, d)| e == "InstanceFailure" && d["deployment_id"] == bad_id.as_str())
        .unwrap();
    assert!(failure.1.to_string().contains("h1"), "{}", failure.1);

    // A rejection is announced as a failure, by the command that rejected it.
    let log = s.path().join("held.log");
    let mut args = fleet.deploy_args("hooked");
    args.push("--require-approval");
    let mut held = Command::new(pier_bin())
        .args(&args)
        .env("PIER_E2E_HOOK_SECRET", "s3cret")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let held_id = first_line(&log);
    let rejected = run_cmd(
        Command::new(pier_bin())
            .args(["reject", &held_id, "--status-dir", fleet.status()])
            .env("PIER_E2E_HOOK_SECRET", "s3cret"),
    );
    assert_eq!(rejected.code, 0, "{}", rejected.all());
    assert_eq!(wait_exit(&mut held, Duration::from_secs(30)), 1);
    let heard = got.lock().unwrap().iter().any(|(head, body)| {
        head.to_ascii_lowercase()
            .contains("x-pier-event: deploymentfailure")
            && body.contains(&held_id)
    });
    assert!(heard, "no DeploymentFailure for the rejected {held_id}");
}

#[test]
fn a_failure_mid_half_at_a_time_rolls_back_only_the_hosts_that_got_it() {
    let s = Scratch::new();
    let fleet = SpoolFleet::start(&s, 4, 0);
    fleet.group(
        &s,
        "half-rb",
        "HalfAtATime",
        &[],
        "auto_rollback: {on_failure: true}\n",
    );
    let good = pier(&fleet.deploy_args("half-rb"));
    assert_eq!(good.code, 0, "{}", good.all());
    // v2 fails on h1 and h2, the first batch (two of four: the minimum is two healthy): no
    // host can be taken out of service any more, so h3 and h4 never get v2.
    let v2 = s.path().join("rev-v2.tgz");
    push_local(&bad_bundle(&s, &["h1", "h2"]), &v2);
    let mut args = fleet.deploy_args("half-rb");
    let v2_arg = v2.to_str().unwrap().to_string();
    let pos = args.iter().position(|a| *a == "--revision").unwrap();
    args[pos + 1] = &v2_arg;
    let bad = pier(&args);
    assert_eq!(bad.code, 1, "{}", bad.all());
    let id = deployment_id(&bad);
    let rec = fleet.record(&id);
    assert_eq!(batch_sizes(&rec), [2]);
    for h in ["h3", "h4"] {
        assert_eq!(rec.hosts[h].state, HostRolloutState::Skipped);
        assert_eq!(fleet.runs(h, &id), 0);
    }
    let rb_id = rec.rolled_back_by.clone().expect("rolled back");
    let rb = fleet.record(&rb_id);
    assert_eq!(rb.hosts.keys().cloned().collect::<Vec<_>>(), ["h1", "h2"]);
    assert_eq!(rb.status, RolloutStatus::Succeeded, "{}", bad.all());
    for h in ["h3", "h4"] {
        assert_eq!(fleet.runs(h, &rb_id), 0, "{h} was never touched");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_choose_the_store_and_can_assume_a_role() {
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let s = Scratch::new();
    let group = s.write(
        "g.yml",
        "name: envs\napplication: shop\nhosts: [h1]\ntransport: {type: spool, spool_dir: /nonexistent}\n",
    );
    let config = s.write(
        "controller.yml",
        &format!(
            "environments:\n  local:\n    status_dir: {}\n  cloud:\n    region: us-east-1\n    \
             endpoint_url: {}\n    role_arn: arn:aws:iam::123456789012:role/pier-deployer\n    \
             status_bucket: {bucket}\n",
            s.path().join("local-store").display(),
            moto_endpoint()
        ),
    );
    let cfg = config.to_str().unwrap().to_string();
    let g = group.to_str().unwrap().to_string();
    let run_env = move |env: &'static str, args: &[&str]| {
        let mut all = vec![
            "--controller-config".to_string(),
            cfg.clone(),
            "--env".into(),
            env.into(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        run_cmd(
            Command::new(pier_bin())
                .args(&all)
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env_remove("AWS_ENDPOINT_URL")
                .env_remove("PIER_STATUS_BUCKET")
                .env_remove("PIER_STATUS_DIR"),
        )
    };
    let (re, g2) = (run_env.clone(), g.clone());
    tokio::task::spawn_blocking(move || {
        // The local environment's store is a directory...
        re("local", &["group", "put", &g2]).success();
        // ...the cloud one's a bucket, reached with credentials from STS AssumeRole (moto).
        re("cloud", &["group", "put", &g2]).success();
        let list = re("cloud", &["group", "list"]).success();
        assert!(list.stdout.contains("envs"), "{}", list.all());
        let bad = re("nowhere", &["group", "list"]);
        assert_eq!(bad.code, 64, "{}", bad.all());
        assert!(
            bad.stderr.contains("local, cloud") || bad.stderr.contains("cloud, local"),
            "{}",
            bad.stderr
        );
    })
    .await
    .unwrap();
    assert!(s.path().join("local-store/groups/envs.json").exists());
    let obj = aws
        .s3
        .head_object()
        .bucket(&bucket)
        .key("pier/groups/envs.json")
        .send()
        .await;
    assert!(obj.is_ok(), "the cloud environment wrote to its bucket");
}

#[test]
fn two_controllers_resuming_one_rollout_at_once_run_no_host_twice() {
    let s = Scratch::new();
    let fleet = SpoolFleet::start(&s, 4, 1);
    fleet.group(&s, "race", "OneAtATime", &[], "");
    let log = s.path().join("first.log");
    let mut args = fleet.deploy_args("race");
    args.extend(["--lease", "3"]);
    let mut first = spawn_pier(&args, &log);
    let id = first_line(&log);
    wait_for("the first batch", || {
        (!fleet.record(&id).batches.is_empty()).then_some(())
    });
    first.kill().unwrap();
    let _ = first.wait();
    // Two controllers take it up at the same moment: the lease and the conditional writes
    // let one drive while the other waits, and whichever finishes reports the same end.
    let resume = |n: u32| {
        spawn_pier(
            &[
                "deploy",
                "--resume",
                &id,
                "--status-dir",
                fleet.status(),
                "--poll-interval",
                "0.2",
                "--lease",
                "3",
            ],
            &s.path().join(format!("resume-{n}.log")),
        )
    };
    let (mut a, mut b) = (resume(1), resume(2));
    assert_eq!(wait_exit(&mut a, Duration::from_secs(90)), 0);
    assert_eq!(wait_exit(&mut b, Duration::from_secs(90)), 0);
    let rec = fleet.record(&id);
    assert_eq!(rec.status, RolloutStatus::Succeeded);
    assert_eq!(batch_sizes(&rec), [1, 1, 1, 1]);
    for h in ["h1", "h2", "h3", "h4"] {
        assert_eq!(fleet.runs(h, &id), 1, "{h} ran {id} exactly once");
    }
}
