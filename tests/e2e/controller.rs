//! The `pier` controller CLI end to end: the real binary pushes revisions to S3 on a moto
//! server (and to local paths), sends deployment commands to real SQS queues and spool
//! directories, and reads status records from real sinks.

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pier_protocol::{
    BundleType, Command as DeployCommand, DeploymentStatus, EventState, EventStatus, Revision,
    StatusRecord, StatusSinkSpec,
};
use pier_transport::aws::AwsClients;
use pier_transport::local::LocalStatusSink;
use pier_transport::s3::S3StatusSink;
use pier_transport::sqs::SqsQueue;
use pier_transport::{Queue, StatusSink};

use crate::support::{
    moto_clients, new_bucket, new_versioned_bucket, pier, sha256, skip, unique, Agent,
    AgentBuilder, Run, Scratch,
};

/// A small bundle: an AppSpec, a file in a subdirectory, a symlink, and a hook.
fn bundle(s: &Scratch, rel: &str) -> std::path::PathBuf {
    s.write(
        &format!("{rel}/appspec.yml"),
        "version: 0.0\nos: linux\nfiles:\n  - source: site\n    destination: /tmp/pier-ctl-site\n",
    );
    s.write(&format!("{rel}/site/index.html"), "<h1>hello</h1>\n");
    s.script(&format!("{rel}/scripts/check.sh"), "#!/bin/sh\nexit 0\n");
    let dir = s.path().join(rel);
    std::os::unix::fs::symlink("index.html", dir.join("site/home.html")).unwrap();
    dir
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=pier tests",
            "-c",
            "user.email=tests@pier.invalid",
        ])
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Makes `dir` a git checkout with everything committed; returns HEAD.
fn commit_all(dir: &Path) -> String {
    git(dir, &["init", "-q"]);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "first"]);
    git(dir, &["rev-parse", "HEAD"])
}

/// The entry names of a tgz and which of them are symlinks.
fn tgz_entries(bytes: &[u8]) -> Vec<(String, bool)> {
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    ar.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.path().unwrap().display().to_string(),
                e.header().entry_type().is_symlink(),
            )
        })
        .collect()
}

#[tokio::test]
async fn push_to_s3_encrypts_and_records_sha256_and_commit() {
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let s = Scratch::new();
    let src = bundle(&s, "app");
    let head = commit_all(&src);
    let location = format!("s3://{bucket}/web/rev-1.tgz");

    let run = push(&src, "--s3-location", &location, &[]).success();

    let obj = aws
        .s3
        .get_object()
        .bucket(&bucket)
        .key("web/rev-1.tgz")
        .send()
        .await
        .expect("the object exists");
    let body = obj.body.collect().await.unwrap().into_bytes();
    let real_sha = sha256(&body);
    let head_obj = aws
        .s3
        .head_object()
        .bucket(&bucket)
        .key("web/rev-1.tgz")
        .send()
        .await
        .unwrap();
    assert_eq!(
        head_obj.server_side_encryption().map(|e| e.as_str()),
        Some("AES256")
    );
    let meta = head_obj.metadata().unwrap();
    assert_eq!(meta.get("sha256"), Some(&real_sha));
    assert_eq!(meta.get("commit"), Some(&head));
    // The committer time, for lead time (DORA); the same instant git reports.
    let committed = git(&src, &["show", "-s", "--format=%cI", "HEAD"]);
    let committed = chrono::DateTime::parse_from_rfc3339(&committed).unwrap();
    let recorded = meta.get("commit-time").expect("commit-time metadata");
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(recorded).unwrap(),
        committed
    );
    assert_eq!(meta.get("application").map(String::as_str), Some("web"));

    // stdout is the revision JSON, for scripts; the human line is on stderr.
    let printed: serde_json::Value = serde_json::from_str(&run.stdout).expect("revision JSON");
    assert_eq!(printed["type"], "s3");
    assert_eq!(printed["bucket"], bucket.as_str());
    assert_eq!(printed["key"], "web/rev-1.tgz");
    assert_eq!(printed["bundle_type"], "tgz");
    assert_eq!(printed["sha256"], real_sha.as_str());
    assert_eq!(printed["commit"], head.as_str());
    let printed_time = printed["commit_time"].as_str().expect("commit_time");
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(printed_time).unwrap(),
        committed
    );
    assert!(printed.get("dirty").is_none(), "{printed}");
    assert!(run.stderr.contains(&location), "{}", run.stderr);

    let entries = tgz_entries(&body);
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"appspec.yml"), "{names:?}");
    assert!(names.contains(&"site/index.html"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with(".git")),
        ".git must be left out: {names:?}"
    );
    assert!(entries.contains(&("site/home.html".to_string(), true)));
}

#[tokio::test]
async fn push_with_kms_and_a_second_push_of_the_same_tree_gives_the_same_sha256() {
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let s = Scratch::new();
    let src = bundle(&s, "app");
    let mut shas = Vec::new();
    for key in ["a.tgz", "b.tgz"] {
        let run = push(
            &src,
            "--s3-location",
            &format!("s3://{bucket}/{key}"),
            &["--sse", "aws:kms"],
        )
        .success();
        let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        assert!(v.get("commit").is_none(), "not a git checkout: {v}");
        shas.push(v["sha256"].as_str().unwrap().to_string());
        let head = aws
            .s3
            .head_object()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            head.server_side_encryption().map(|e| e.as_str()),
            Some("aws:kms")
        );
    }
    assert_eq!(shas[0], shas[1]);
}

#[test]
fn push_to_a_local_path_writes_the_archive_and_its_sidecar() {
    let s = Scratch::new();
    let src = bundle(&s, "app");
    let head = commit_all(&src);
    // An uncommitted change: the bundle is not exactly `head`, and the revision says so.
    std::fs::write(src.join("site/index.html"), "<h1>changed</h1>\n").unwrap();
    let out = s.path().join("revs/web.zip");

    let run = push(
        &src,
        "--local-location",
        out.to_str().unwrap(),
        &["--bundle-type", "zip"],
    )
    .success();

    let bytes = std::fs::read(&out).expect("archive written");
    let printed: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(printed["type"], "local");
    assert_eq!(printed["path"], out.to_str().unwrap());
    assert_eq!(printed["bundle_type"], "zip");
    assert_eq!(printed["sha256"], sha256(&bytes).as_str());
    assert_eq!(printed["commit"], head.as_str());
    assert_eq!(printed["dirty"], true);
    assert_eq!(printed["application"], "web");
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.path().join("revs/web.zip.pier.json")).unwrap())
            .unwrap();
    assert_eq!(sidecar, printed);

    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut index = String::new();
    zip.by_name("site/index.html")
        .unwrap()
        .read_to_string(&mut index)
        .unwrap();
    assert_eq!(index, "<h1>changed</h1>\n");
    assert!(zip.by_name("site/home.html").unwrap().is_symlink());
    assert!(zip.file_names().all(|n| !n.unwrap().starts_with(".git")));
}

#[test]
fn push_usage_errors_exit_64_naming_the_flag() {
    let s = Scratch::new();
    let src = bundle(&s, "app");
    let run = push(&src, "--s3-location", "not-a-url", &[]).code(64);
    assert!(run.stderr.contains("--s3-location"), "{}", run.stderr);
    let run = pier(&[
        "push",
        "--application",
        "web",
        "--source",
        s.path().join("missing").to_str().unwrap(),
        "--local-location",
        s.path().join("x.tgz").to_str().unwrap(),
        "--sse",
        "DES",
    ])
    .code(64);
    assert!(run.stderr.contains("--sse"), "{}", run.stderr);
    // A missing required flag is a usage error too, not clap's exit 2.
    pier(&["push", "--application", "web"]).code(64);
}

/// `pier push --application web --source SRC FLAG LOCATION EXTRA...`: the push most tests make.
fn push(src: &Path, flag: &str, location: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "push",
        "--application",
        "web",
        "--source",
        src.to_str().unwrap(),
        flag,
        location,
    ];
    args.extend_from_slice(extra);
    pier(&args)
}

/// Takes the one message waiting on `url` and parses it as a command.
async fn receive_command(aws: &AwsClients, url: &str) -> DeployCommand {
    let q = SqsQueue::new(aws.sqs.clone(), url);
    let msgs = q.receive(Duration::from_secs(2)).await.unwrap();
    assert_eq!(msgs.len(), 1, "one command on {url}");
    DeployCommand::from_json(&msgs[0].body).expect("a valid command")
}

#[tokio::test]
async fn deploy_sends_a_valid_command_to_each_hosts_sqs_queue() {
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let s = Scratch::new();
    let src = bundle(&s, "app");
    let head = commit_all(&src);
    let location = format!("s3://{bucket}/web/rev.tgz");
    let pushed = push(&src, "--s3-location", &location, &[]).success();
    let pushed: serde_json::Value = serde_json::from_str(&pushed.stdout).unwrap();
    let hosts = [unique("h"), unique("h")];
    let mut urls = Vec::new();
    for h in &hosts {
        let out = aws
            .sqs
            .create_queue()
            .queue_name(format!("pier-{h}"))
            .send()
            .await
            .unwrap();
        urls.push(out.queue_url().unwrap().to_string());
    }

    let run = pier(&[
        "deploy",
        "--application",
        "web",
        "--deployment-group",
        "prod",
        "--revision",
        &location,
        "--hosts",
        &format!("{},{}", hosts[0], hosts[1]),
        "--status-bucket",
        &bucket,
        "--status-prefix",
        "status",
        "--events",
        "BeforeInstall,ValidateService",
        "--file-exists-behavior",
        "OVERWRITE",
    ])
    .success();
    let id = run.stdout.trim();
    assert!(
        id.starts_with("d-"),
        "deployment id on stdout: {}",
        run.stdout
    );

    for (h, url) in hosts.iter().zip(&urls) {
        let cmd = receive_command(&aws, url).await;
        assert_eq!(cmd.deployment_id, id, "host {h}");
        assert_eq!(cmd.application_name, "web");
        assert_eq!(cmd.deployment_group_name, "prod");
        assert_eq!(cmd.deployment_group_id, "prod");
        assert_eq!(cmd.commit_sha.as_deref(), Some(head.as_str()));
        assert_eq!(
            cmd.events.as_deref(),
            Some(&["BeforeInstall".to_string(), "ValidateService".to_string()][..])
        );
        assert_eq!(cmd.file_exists_behavior.as_deref(), Some("OVERWRITE"));
        assert!(cmd.creator.as_deref().is_some_and(|c| c.contains('@')));
        match &cmd.revision {
            Revision::S3 {
                bucket: b,
                key,
                sha256,
                bundle_type,
                etag,
                ..
            } => {
                assert_eq!(b, &bucket);
                assert_eq!(key, "web/rev.tgz");
                assert_eq!(sha256, pushed["sha256"].as_str().unwrap());
                assert_eq!(*bundle_type, BundleType::Tgz);
                assert!(etag.is_some());
            }
            other => panic!("not an S3 revision: {other:?}"),
        }
        assert_eq!(
            cmd.status.sink,
            StatusSinkSpec::S3 {
                bucket: bucket.clone(),
                prefix: "status".into()
            }
        );
    }
}

#[tokio::test]
async fn deploy_finds_every_queue_before_sending_any() {
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let s = Scratch::new();
    let src = bundle(&s, "app");
    let location = format!("s3://{bucket}/rev.tgz");
    push(&src, "--s3-location", &location, &[]).success();
    let present = unique("h");
    let missing = unique("h");
    let url = aws
        .sqs
        .create_queue()
        .queue_name(format!("pier-{present}"))
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_string();
    let run = pier(&[
        "deploy",
        "--application",
        "web",
        "--deployment-group",
        "prod",
        "--revision",
        &location,
        "--hosts",
        &format!("{present},{missing}"),
        "--status-bucket",
        &bucket,
    ]);
    assert_ne!(run.code, 0, "{}", run.all());
    assert!(
        run.stderr.contains(&format!("host {missing}")),
        "{}",
        run.stderr
    );
    let q = SqsQueue::new(aws.sqs.clone(), &url);
    assert!(
        q.receive(Duration::from_secs(1)).await.unwrap().is_empty(),
        "nothing may be sent when a host has no queue"
    );
}

#[test]
fn deploy_drops_commands_into_spool_directories() {
    let s = Scratch::new();
    let src = bundle(&s, "app");
    let archive = s.path().join("revs/web.tgz");
    let pushed = push(&src, "--local-location", archive.to_str().unwrap(), &[]).success();
    std::fs::write(s.path().join("rev.json"), &pushed.stdout).unwrap();
    let pushed: serde_json::Value = serde_json::from_str(&pushed.stdout).unwrap();
    let spool = format!("{}/{{host}}/spool", s.path().display());
    let status_dir = s.path().join("status");

    // By path (the sidecar gives the sha256) and by the JSON push printed.
    for revision in [
        archive.to_str().unwrap().to_string(),
        format!("@{}", s.path().join("rev.json").display()),
    ] {
        let run = pier(&[
            "deploy",
            "--application",
            "web",
            "--deployment-group",
            "staging",
            "--deployment-group-id",
            "g-staging",
            "--revision",
            &revision,
            "--hosts",
            "alpha,beta",
            "--spool-dir",
            &spool,
            "--status-dir",
            status_dir.to_str().unwrap(),
        ])
        .success();
        let id = run.stdout.trim();
        for h in ["alpha", "beta"] {
            let file = s.path().join(format!("{h}/spool/{id}.json"));
            let cmd =
                DeployCommand::from_json(&std::fs::read(&file).expect("spooled command")).unwrap();
            assert_eq!(cmd.deployment_id, id);
            assert_eq!(cmd.deployment_group_id, "g-staging");
            assert_eq!(
                cmd.revision,
                Revision::Local {
                    path: archive.display().to_string(),
                    bundle_type: BundleType::Tgz,
                    sha256: Some(pushed["sha256"].as_str().unwrap().to_string()),
                }
            );
            assert_eq!(
                cmd.status.sink,
                StatusSinkSpec::Local {
                    dir: status_dir.display().to_string()
                }
            );
        }
    }
}

#[test]
fn deploy_refuses_a_revision_with_no_known_sha256() {
    let s = Scratch::new();
    let archive = s.write("plain.tgz", "not really an archive");
    let spool = s.path().join("spool");
    let status = s.path().join("status");
    let deploy = |hosts: &str, extra: &[&str]| {
        let mut a = vec![
            "deploy",
            "--application",
            "web",
            "--deployment-group",
            "prod",
            "--revision",
            archive.to_str().unwrap(),
            "--hosts",
            hosts,
            "--spool-dir",
            spool.to_str().unwrap(),
            "--status-dir",
            status.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        pier(&a)
    };
    let run = deploy("h1", &[]).code(64);
    assert!(run.stderr.contains("--sha256"), "{}", run.stderr);
    assert!(!spool.exists(), "nothing spooled for a refused revision");

    let sha = sha256(b"not really an archive");
    let run = deploy("h1", &["--sha256", &sha]).success();
    let cmd = DeployCommand::from_json(
        &std::fs::read(spool.join(format!("{}.json", run.stdout.trim()))).unwrap(),
    )
    .unwrap();
    assert_eq!(cmd.revision.sha256(), Some(sha.as_str()));

    // One spool directory cannot serve two hosts.
    let run = deploy("h1,h2", &["--sha256", &sha]).code(64);
    assert!(run.stderr.contains("--spool-dir"), "{}", run.stderr);
}

/// `--events` the agent would refuse are refused by the controller itself, naming the event,
/// before anything is sent: an unknown name, an order the lifecycle cannot run, a repeat.
#[test]
fn deploy_refuses_unknown_or_misordered_events_before_sending() {
    let s = Scratch::new();
    let archive = s.write("b.tgz", "bytes");
    let sha = sha256(b"bytes");
    let spool = s.path().join("spool");
    let status = s.path().join("status");
    let deploy = |events: &str| {
        pier(&[
            "deploy",
            "--application",
            "web",
            "--deployment-group",
            "prod",
            "--revision",
            archive.to_str().unwrap(),
            "--sha256",
            &sha,
            "--hosts",
            "h1",
            "--spool-dir",
            spool.to_str().unwrap(),
            "--status-dir",
            status.to_str().unwrap(),
            "--events",
            events,
        ])
    };
    for (events, says) in [
        ("BeforeInstall,Validate", "`Validate`"),
        ("ApplicationStart,applicationStop", "`applicationStop`"),
        (
            "ApplicationStart,BeforeInstall",
            "BeforeInstall cannot come after ApplicationStart",
        ),
        (
            "AfterInstall,AfterInstall",
            "AfterInstall cannot come after AfterInstall",
        ),
    ] {
        let run = deploy(events).code(64);
        assert!(run.stderr.contains("--events"), "{events}: {}", run.stderr);
        assert!(run.stderr.contains(says), "{events}: {}", run.stderr);
        assert!(
            !spool.exists(),
            "{events}: nothing is sent for refused events"
        );
    }
    // The same list in lifecycle order is sent.
    deploy("BeforeInstall,ApplicationStart").success();
    assert!(spool.exists());
}

fn event(name: &str, status: EventState, code: Option<i32>) -> EventStatus {
    let start = chrono::Utc::now();
    EventStatus {
        name: name.into(),
        status,
        started: Some(start),
        ended: Some(start + chrono::Duration::milliseconds(1500)),
        exit_code: code,
        failing_script: None,
        log_tail: None,
        diagnostics: None,
        ignored: false,
    }
}

fn record(host: &str, id: &str, ok: bool) -> StatusRecord {
    let mut r = StatusRecord::new(host, id);
    r.events.push(event("Install", EventState::Succeeded, None));
    if ok {
        r.status = DeploymentStatus::Succeeded;
        r.events
            .push(event("ValidateService", EventState::Succeeded, Some(0)));
    } else {
        r.status = DeploymentStatus::Failed;
        let mut e = event("ValidateService", EventState::Failed, Some(3));
        e.failing_script = Some("scripts/check.sh".into());
        e.log_tail = Some("health check failed\n".into());
        r.events.push(e);
        r.error = Some("ValidateService failed: scripts/check.sh exited 3".into());
    }
    r
}

#[tokio::test]
async fn status_prints_the_table_from_local_records() {
    let s = Scratch::new();
    let dir = s.path().join("status");
    let sink = LocalStatusSink::new(&dir);
    sink.write(&record("web-1", "d-LOCAL1", true))
        .await
        .unwrap();
    sink.write(&record("web-2", "d-LOCAL1", false))
        .await
        .unwrap();

    let run = pier(&["status", "d-LOCAL1", "--status-dir", dir.to_str().unwrap()]).code(1);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines[0],
        "HOST   EVENT            STATUS     DURATION  EXIT"
    );
    assert_eq!(lines[1], "web-1  Install          Succeeded  1.50s     -");
    assert_eq!(lines[2], "web-1  ValidateService  Succeeded  1.50s     0");
    assert_eq!(lines[4], "web-2  ValidateService  Failed     1.50s     3");
    assert!(run.stdout.contains("web-1: Succeeded\n"), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("web-2: Failed: ValidateService failed: scripts/check.sh exited 3\n"),
        "{}",
        run.stdout
    );

    let run = pier(&["status", "d-NONE", "--status-dir", dir.to_str().unwrap()]).code(1);
    assert!(run.stderr.contains("no status records"), "{}", run.stderr);
}

#[tokio::test]
async fn status_reads_records_from_s3() {
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let sink = S3StatusSink::new(aws.s3.clone(), &bucket, "fleet");
    sink.write(&record("i-0abc", "d-S3ONE", true))
        .await
        .unwrap();
    sink.write(&record("i-0def", "d-S3ONE", true))
        .await
        .unwrap();
    let run = pier(&[
        "status",
        "d-S3ONE",
        "--status-bucket",
        &bucket,
        "--status-prefix",
        "fleet",
    ])
    .success();
    assert!(run.stdout.contains("i-0abc: Succeeded\n"), "{}", run.stdout);
    assert!(run.stdout.contains("i-0def: Succeeded\n"), "{}", run.stdout);
    assert_eq!(run.stdout.matches("ValidateService").count(), 2);
}

#[test]
fn deploy_wait_gives_up_at_the_timeout_when_no_agent_answers() {
    let s = Scratch::new();
    let src = bundle(&s, "app");
    let archive = s.path().join("web.tgz");
    push(&src, "--local-location", archive.to_str().unwrap(), &[]).success();
    let run = pier(&[
        "deploy",
        "--application",
        "web",
        "--deployment-group",
        "prod",
        "--revision",
        archive.to_str().unwrap(),
        "--hosts",
        "lonely",
        "--spool-dir",
        s.path().join("spool").to_str().unwrap(),
        "--status-dir",
        s.path().join("status").to_str().unwrap(),
        "--wait",
        "--timeout",
        "1",
        "--poll-interval",
        "0.2",
    ])
    .code(1);
    assert!(
        run.stderr.contains("lonely: no status yet"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("timed out"), "{}", run.stderr);
}

#[tokio::test]
async fn a_large_push_goes_up_in_parts_and_deploy_can_pin_its_version() {
    let aws = moto_clients().await;
    let bucket = new_versioned_bucket(&aws).await;
    let s = Scratch::new();
    let src = bundle(&s, "app");
    // Random bytes do not compress: the archive passes the 16 MiB single-request limit.
    let mut noise = vec![0u8; 17 << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut noise)
        .unwrap();
    std::fs::write(src.join("site/big.bin"), &noise).unwrap();
    let location = format!("s3://{bucket}/big.tar");
    let run = push(&src, "--s3-location", &location, &["--bundle-type", "tar"]).success();
    let printed: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let version = printed["version_id"]
        .as_str()
        .expect("a versioned bucket gives a version id")
        .to_string();
    assert!(
        printed["etag"].as_str().unwrap().ends_with("-2\""),
        "two parts: {printed}"
    );
    let obj = aws
        .s3
        .get_object()
        .bucket(&bucket)
        .key("big.tar")
        .send()
        .await
        .unwrap();
    assert_eq!(
        obj.server_side_encryption().map(|e| e.as_str()),
        Some("AES256")
    );
    let sha = obj.metadata().unwrap().get("sha256").unwrap().clone();
    let body = obj.body.collect().await.unwrap().into_bytes();
    assert_eq!(sha, sha256(&body));
    assert_eq!(printed["sha256"], sha.as_str());

    // Push the same key again: a deployment that pins the first version still gets it.
    std::fs::remove_file(src.join("site/big.bin")).unwrap();
    push(&src, "--s3-location", &location, &["--bundle-type", "tar"]).success();
    let run = pier(&[
        "deploy",
        "--application",
        "web",
        "--deployment-group",
        "prod",
        "--revision",
        &format!("{location}?versionId={version}"),
        "--hosts",
        "h1",
        "--transport",
        "spool",
        "--spool-dir",
        s.path().join("spool").to_str().unwrap(),
        "--status-dir",
        s.path().join("status").to_str().unwrap(),
    ])
    .success();
    let cmd = DeployCommand::from_json(
        &std::fs::read(s.path().join(format!("spool/{}.json", run.stdout.trim()))).unwrap(),
    )
    .unwrap();
    match cmd.revision {
        Revision::S3 {
            version_id,
            sha256,
            bundle_type,
            ..
        } => {
            assert_eq!(version_id.as_deref(), Some(version.as_str()));
            assert_eq!(sha256, sha);
            assert_eq!(bundle_type, BundleType::Tar);
        }
        other => panic!("not an S3 revision: {other:?}"),
    }
}

/// A real `pier-agent run` standing in for one host: its own host id, deployment root and
/// spool (`DIR/HOST/root/spool`), and (through a private mount namespace with a tmpfs over
/// `dest`) its own view of the directory the bundle installs into, as two machines would have.
fn host_agent(s: &Scratch, host: &str, dest: &Path) -> AgentBuilder {
    Agent::builder(s.path().join(host))
        .host(host)
        .own_mount(dest)
}

/// Whether this machine lets a test give a process its own mount namespace.
fn mount_namespaces_work() -> bool {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs pier-probe /mnt")
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A bundle that installs `site/` into `dest`, records its hooks there, and whose
/// ValidateService exits `validate_exit`.
fn deployable_bundle(
    s: &Scratch,
    rel: &str,
    dest: &Path,
    validate_exit: i32,
) -> std::path::PathBuf {
    s.write(
        &format!("{rel}/appspec.yml"),
        &format!(
            "version: 0.0\nos: linux\nfiles:\n  - source: site\n    destination: {dest}\n\
             hooks:\n  AfterInstall:\n    - location: scripts/after.sh\n      timeout: 60\n\
             \x20 ValidateService:\n    - location: scripts/validate.sh\n      timeout: 60\n",
            dest = dest.display()
        ),
    );
    s.write(
        &format!("{rel}/site/index.html"),
        &format!("<h1>{rel}</h1>\n"),
    );
    s.script(
        &format!("{rel}/scripts/after.sh"),
        &format!(
            "#!/bin/sh\necho \"$LIFECYCLE_EVENT $DEPLOYMENT_ID\" > {}/hook.txt\n",
            dest.display()
        ),
    );
    s.script(
        &format!("{rel}/scripts/validate.sh"),
        &format!(
            "#!/bin/sh\necho checking the site\necho 'health check failed: port 8080 closed' >&2\nexit {validate_exit}\n"
        ),
    );
    s.path().join(rel)
}

#[test]
fn deploy_wait_against_two_real_agents_succeeds_then_reports_a_failing_hook() {
    if !mount_namespaces_work() {
        skip("this machine does not allow mount namespaces (unshare --mount), which give each agent its own install directory");
        return;
    }
    let s = Scratch::new();
    let dest = s.path().join("dest");
    std::fs::create_dir_all(&dest).unwrap();
    let agents = [
        host_agent(&s, "web-1", &dest).spool().spawn(),
        host_agent(&s, "web-2", &dest).spool().spawn(),
    ];
    let spool = format!("{}/{{host}}/root/spool", s.path().display());
    let status = s.path().join("status");
    let push = |rel: &str| {
        let archive = s.path().join(format!("revs/{rel}.tgz"));
        pier(&[
            "push",
            "--application",
            "web",
            "--source",
            s.path().join(rel).to_str().unwrap(),
            "--local-location",
            archive.to_str().unwrap(),
        ])
        .success();
        archive
    };
    let deploy = |archive: &Path| {
        pier(&[
            "deploy",
            "--application",
            "web",
            "--deployment-group",
            "prod",
            "--revision",
            archive.to_str().unwrap(),
            "--hosts",
            "web-1,web-2",
            "--spool-dir",
            &spool,
            "--status-dir",
            status.to_str().unwrap(),
            "--wait",
            "--timeout",
            "60",
            "--poll-interval",
            "0.2",
        ])
    };

    deployable_bundle(&s, "good", &dest, 0);
    let run = deploy(&push("good"));
    let logs = || {
        format!(
            "{}\n--- agent logs\n{}\n{}",
            run.all(),
            agents[0].log(),
            agents[1].log()
        )
    };
    assert_eq!(run.code, 0, "{}", logs());
    let id = run.stdout.trim().to_string();
    for (agent, host) in agents.iter().zip(["web-1", "web-2"]) {
        assert_eq!(
            std::fs::read_to_string(agent.host_path(&dest.join("index.html"))).unwrap(),
            "<h1>good</h1>\n",
            "{host}: {}",
            logs()
        );
        assert_eq!(
            std::fs::read_to_string(agent.host_path(&dest.join("hook.txt"))).unwrap(),
            format!("AfterInstall {id}\n")
        );
        assert!(
            run.stderr.contains(&format!("{host}: Succeeded")),
            "{}",
            logs()
        );
    }
    // Each agent's host sees only its own install, not the other's, nor the test's.
    assert!(!dest.join("index.html").exists());
    let table = pier(&["status", &id, "--status-dir", status.to_str().unwrap()]).success();
    let row_of = |host: &str, event: &str| -> Vec<String> {
        table
            .stdout
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .find(|w| w.len() == 5 && w[0] == host && w[1] == event)
            .unwrap_or_else(|| panic!("no {host} {event} row in\n{}", table.stdout))
    };
    assert_eq!(row_of("web-1", "Install")[2], "Succeeded");
    assert_eq!(row_of("web-2", "ValidateService")[2], "Succeeded");

    deployable_bundle(&s, "bad", &dest, 3);
    let run = deploy(&push("bad"));
    assert_eq!(run.code, 1, "{}", run.all());
    for host in ["web-1", "web-2"] {
        assert!(
            run.stderr.contains(&format!(
                "{host}: deployment failed in ValidateService (Failed), script scripts/validate.sh, exit code 3 [ScriptFailed]\n"
            )),
            "{}",
            run.stderr
        );
        // The progress line of the failed event carries its code too.
        let prefix = format!("{host}: ValidateService");
        assert!(
            run.stderr
                .lines()
                .any(|l| l.starts_with(&prefix) && l.ends_with("[ScriptFailed]")),
            "{}",
            run.stderr
        );
    }
    let bad_id = run.stdout.trim().to_string();
    let table = pier(&["status", &bad_id, "--status-dir", status.to_str().unwrap()]).code(1);
    assert!(
        table.stdout.contains(
            "web-2: Failed: ValidateService: script scripts/validate.sh exited with code 3\n  \
             ValidateService failed [ScriptFailed] scripts/validate.sh exit 3\n"
        ),
        "{}",
        table.stdout
    );
    assert!(
        run.stderr.contains("health check failed: port 8080 closed"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("did not succeed on every host"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn push_to_s3_and_deploy_wait_over_sqs_to_two_real_agents() {
    if !mount_namespaces_work() {
        skip("this machine does not allow mount namespaces (unshare --mount), which give each agent its own install directory");
        return;
    }
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let s = Scratch::new();
    let dest = s.path().join("dest");
    std::fs::create_dir_all(&dest).unwrap();
    let hosts = [unique("web"), unique("web")];
    let agents = [
        host_agent(&s, &hosts[0], &dest).sqs_own_queue().spawn(),
        host_agent(&s, &hosts[1], &dest).sqs_own_queue().spawn(),
    ];
    // The agents create their queues on start; pier only looks them up.
    for h in &hosts {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while aws
            .sqs
            .get_queue_url()
            .queue_name(format!("pier-{h}"))
            .send()
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "agent {h} made no queue:\n{}\n{}",
                agents[0].log(),
                agents[1].log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let src = deployable_bundle(&s, "app", &dest, 0);
    let location = format!("s3://{bucket}/web/app.tgz");
    push(&src, "--s3-location", &location, &[]).success();
    let hosts_arg = format!("{},{}", hosts[0], hosts[1]);
    let args: Vec<String> = [
        "deploy",
        "--application",
        "web",
        "--deployment-group",
        "prod",
        "--revision",
        &location,
        "--hosts",
        &hosts_arg,
        "--status-bucket",
        &bucket,
        "--wait",
        "--timeout",
        "90",
        "--poll-interval",
        "0.3",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    // `pier` blocks while it waits: run it off the async runtime.
    let run = tokio::task::spawn_blocking(move || {
        pier(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    assert_eq!(
        run.code,
        0,
        "{}\n--- agent logs\n{}\n{}",
        run.all(),
        agents[0].log(),
        agents[1].log()
    );
    let id = run.stdout.trim();
    let sink = S3StatusSink::new(aws.s3.clone(), &bucket, "pier");
    for (agent, h) in agents.iter().zip(&hosts) {
        assert_eq!(
            std::fs::read_to_string(agent.host_path(&dest.join("index.html"))).unwrap(),
            "<h1>app</h1>\n"
        );
        let rec = sink
            .read(id, h)
            .await
            .unwrap()
            .expect("a status record in S3");
        assert_eq!(rec.status, DeploymentStatus::Succeeded);
    }
}
