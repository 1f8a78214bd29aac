//! The queue transports, status sinks and revision fetching against real services: SQS and S3
//! from a moto server on 127.0.0.1 (the one `AWS_ENDPOINT_URL` names, else one this test
//! process starts through `scripts/services.sh` and that stops when the process ends), HTTP
//! from a small server in the test, and spool directories on disk.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pier_agent::dedupe::{Dedupe, Seen};
use pier_agent::fetch::{FetchOptions, Fetcher};
use pier_engine::bundle::{FetchError, RevisionFetcher};
use pier_protocol::{
    BundleType, Command, DeploymentStatus, EventState, EventStatus, ProtocolError, Revision,
    StatusRecord, StatusSinkSpec, StatusTarget,
};
use pier_transport::aws::AwsClients;
use pier_transport::s3::S3StatusSink;
use pier_transport::spool::Spool;
use pier_transport::sqs::{QueueSpec, SqsQueue};
use pier_transport::{keep_invisible, open_status_sink, Queue, StatusSink};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{moto_clients, new_bucket, new_versioned_bucket, sha256, unique, Scratch};

fn command(id: &str, revision: Revision, status_dir: &Path) -> Command {
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
        creator: Some("tests".into()),
        commit_sha: Some("0123456789abcdef".into()),
        status: StatusTarget {
            sink: StatusSinkSpec::Local {
                dir: status_dir.display().to_string(),
            },
            notify_queue_url: None,
        },
        created_at: chrono::Utc::now(),
    }
}

fn local_revision() -> Revision {
    Revision::Local {
        path: "/srv/bundle.tgz".into(),
        bundle_type: BundleType::Tgz,
        sha256: None,
    }
}

async fn new_queue(aws: &AwsClients, max_receive_count: u32) -> SqsQueue {
    let spec = QueueSpec {
        name: unique("pier-host"),
        url: None,
        create: true,
        max_receive_count,
    };
    SqsQueue::open(aws.sqs.clone(), &spec)
        .await
        .expect("create queue")
}

#[tokio::test]
async fn sqs_send_receive_extend_ack() {
    let aws = moto_clients().await;
    let q = new_queue(&aws, 5).await;
    let body = command("d-sqs-1", local_revision(), Path::new("/tmp")).to_json();
    q.send(&body).await.unwrap();

    let got = q.receive(Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, body);
    assert_eq!(got[0].receive_count, 1);
    let cmd = Command::from_json(&got[0].body).unwrap();
    assert_eq!(cmd.deployment_id, "d-sqs-1");

    // Visibility 0 hands the message back at once: proof that extend reaches SQS.
    q.extend(&got[0], Duration::ZERO).await.unwrap();
    let again = q.receive(Duration::from_secs(5)).await.unwrap();
    assert_eq!(again.len(), 1, "message visible again after extend(0)");
    assert_eq!(again[0].receive_count, 2);

    // A long extension keeps it hidden from the next poll.
    q.extend(&again[0], Duration::from_secs(600)).await.unwrap();
    assert!(q.receive(Duration::from_secs(1)).await.unwrap().is_empty());

    // Once acked it is gone for good, even if its visibility is reset.
    q.ack(&again[0]).await.unwrap();
    let _ = q.extend(&again[0], Duration::ZERO).await;
    assert!(q.receive(Duration::from_secs(1)).await.unwrap().is_empty());

    // Opening by name finds the same queue rather than creating another.
    let name = q.url().rsplit('/').next().unwrap().to_string();
    let reopened = SqsQueue::open(
        aws.sqs.clone(),
        &QueueSpec {
            name,
            url: None,
            create: false,
            max_receive_count: 5,
        },
    )
    .await
    .unwrap();
    assert_eq!(reopened.url(), q.url());
}

#[tokio::test]
async fn sqs_missing_queue_without_create_says_so() {
    let aws = moto_clients().await;
    let spec = QueueSpec {
        name: unique("pier-absent"),
        url: None,
        create: false,
        max_receive_count: 3,
    };
    let e = SqsQueue::open(aws.sqs.clone(), &spec).await.unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
}

#[tokio::test]
async fn sqs_rejected_message_moves_to_dlq() {
    let aws = moto_clients().await;
    let q = new_queue(&aws, 2).await.with_reject_delay(Duration::ZERO);
    q.send(br#"{"version": 9, "deployment_id": "d-x"}"#)
        .await
        .unwrap();

    let mut rejections = 0;
    for _ in 0..6 {
        let got = q.receive(Duration::from_secs(1)).await.unwrap();
        let Some(msg) = got.first() else { break };
        let err = Command::from_json(&msg.body).unwrap_err();
        assert!(matches!(err, ProtocolError::UnknownVersion { .. }), "{err}");
        q.reject(msg, &err.to_string()).await.unwrap();
        rejections += 1;
    }
    assert_eq!(
        rejections, 2,
        "maxReceiveCount 2: two receives, then the DLQ"
    );

    let dlq_url = format!("{}-dlq", q.url());
    let dlq = SqsQueue::new(aws.sqs.clone(), dlq_url);
    let dead = dlq.receive(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        dead.len(),
        1,
        "the rejected message is in the dead-letter queue"
    );
    assert!(String::from_utf8_lossy(&dead[0].body).contains("\"version\": 9"));
}

fn record(deployment: &str, host: &str, status: DeploymentStatus) -> StatusRecord {
    let mut r = StatusRecord::new(host, deployment);
    r.status = status;
    r.events.push(EventStatus {
        name: "ValidateService".into(),
        status: if status == DeploymentStatus::Failed {
            EventState::Failed
        } else {
            EventState::InProgress
        },
        started: Some(chrono::Utc::now()),
        ended: None,
        exit_code: Some(3),
        failing_script: Some("scripts/check.sh".into()),
        log_tail: Some("curl: connection refused\n".into()),
        diagnostics: None,
    });
    r
}

#[tokio::test]
async fn s3_status_write_read_list() {
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let sink = S3StatusSink::new(aws.s3.clone(), &bucket, "/pier/");
    assert_eq!(sink.key("d-1", "h1"), "pier/deployments/d-1/hosts/h1.json");
    assert_eq!(sink.read("d-1", "h1").await.unwrap(), None);

    let first = record("d-1", "h1", DeploymentStatus::InProgress);
    sink.write(&first).await.unwrap();
    assert_eq!(sink.read("d-1", "h1").await.unwrap(), Some(first));
    // Rewritten at the next event: the read sees the latest.
    let last = record("d-1", "h1", DeploymentStatus::Failed);
    sink.write(&last).await.unwrap();
    sink.write(&record("d-1", "h2", DeploymentStatus::Succeeded))
        .await
        .unwrap();
    sink.write(&record("d-10", "h3", DeploymentStatus::Succeeded))
        .await
        .unwrap();
    assert_eq!(sink.read("d-1", "h1").await.unwrap(), Some(last));
    assert_eq!(sink.list_hosts("d-1").await.unwrap(), vec!["h1", "h2"]);
    assert!(sink.list_hosts("d-2").await.unwrap().is_empty());

    // A corrupt object is reported with where it is, not taken for "no record".
    aws.s3
        .put_object()
        .bucket(&bucket)
        .key(sink.key("d-9", "h1"))
        .body(b"{}".to_vec().into())
        .send()
        .await
        .unwrap();
    let e = sink.read("d-9", "h1").await.unwrap_err();
    assert!(e.to_string().contains("d-9/hosts/h1.json"), "{e}");
}

#[tokio::test]
async fn s3_status_sink_with_notification() {
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let notify = new_queue(&aws, 5).await;
    let target = StatusTarget {
        sink: StatusSinkSpec::S3 {
            bucket: bucket.clone(),
            prefix: String::new(),
        },
        notify_queue_url: Some(notify.url().to_string()),
    };
    let sink = open_status_sink(&target, Some(&aws)).unwrap();
    sink.write(&record("d-n", "h1", DeploymentStatus::Succeeded))
        .await
        .unwrap();
    assert!(sink.read("d-n", "h1").await.unwrap().is_some());
    let got = notify.receive(Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1);
    let note: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(note["deployment_id"], "d-n");
    assert_eq!(note["status"], "Succeeded");

    // Without AWS access an S3 sink cannot be opened, and the error says what to do.
    let e = open_status_sink(&target, None).err().unwrap();
    assert!(e.to_string().contains("no AWS access"), "{e}");
}

#[tokio::test]
async fn local_status_write_read_list() {
    let s = Scratch::new();
    let target = StatusTarget {
        sink: StatusSinkSpec::Local {
            dir: s.path().display().to_string(),
        },
        notify_queue_url: None,
    };
    let sink = open_status_sink(&target, None).unwrap();
    sink.write(&record("d-1", "h2", DeploymentStatus::InProgress))
        .await
        .unwrap();
    let done = record("d-1", "h1", DeploymentStatus::Failed);
    sink.write(&done).await.unwrap();
    assert_eq!(sink.read("d-1", "h1").await.unwrap(), Some(done));
    assert_eq!(sink.list_hosts("d-1").await.unwrap(), vec!["h1", "h2"]);
    assert!(s.path().join("deployments/d-1/hosts/h1.json").is_file());
    // No temp files left behind by the atomic writes.
    let leftovers: Vec<_> = std::fs::read_dir(s.path().join("deployments/d-1/hosts"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

async fn put(aws: &AwsClients, bucket: &str, key: &str, body: &[u8]) -> String {
    let out = aws
        .s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(body.to_vec().into())
        .send()
        .await
        .unwrap();
    out.e_tag().unwrap().to_string()
}

#[tokio::test]
async fn fetch_from_s3_verifies_sha256_and_etag() {
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let body = b"pretend this is a tgz".repeat(1000);
    let etag = put(&aws, &bucket, "web/1.tgz", &body).await;
    let fetcher = Fetcher::new(Some(aws.s3.clone()), FetchOptions::default()).unwrap();
    let s = Scratch::new();

    let ok = Revision::S3 {
        bucket: bucket.clone(),
        key: "web/1.tgz".into(),
        version_id: None,
        etag: Some(etag.clone()),
        bundle_type: BundleType::Tgz,
        sha256: sha256(&body),
    };
    let max_seen = Arc::new(AtomicU32::new(0));
    let m = max_seen.clone();
    let got = fetcher
        .fetch(&ok, &s.path().join("bundle.tgz"), &move |p| {
            m.fetch_max(p.done as u32, Ordering::Relaxed);
            assert_eq!(p.total, Some(21_000));
        })
        .await
        .unwrap();
    assert_eq!(got.bytes, body.len() as u64);
    assert_eq!(got.sha256.as_deref(), Some(sha256(&body).as_str()));
    assert_eq!(std::fs::read(&got.path).unwrap(), body);
    assert_eq!(max_seen.load(Ordering::Relaxed), 21_000);

    let wrong_sha = Revision::S3 {
        bucket: bucket.clone(),
        key: "web/1.tgz".into(),
        version_id: None,
        etag: None,
        bundle_type: BundleType::Tgz,
        sha256: sha256(b"something else"),
    };
    let dest = s.path().join("bad.tgz");
    let e = fetcher.fetch(&wrong_sha, &dest, &|_| {}).await.unwrap_err();
    match &e {
        FetchError::Sha256Mismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &sha256(b"something else"));
            assert_eq!(actual, &sha256(&body));
        }
        other => panic!("expected a sha256 mismatch, got {other}"),
    }
    assert!(e.to_string().contains(&sha256(&body)));
    assert!(!dest.exists(), "a mismatching bundle is removed");
    assert!(std::fs::read_dir(s.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".part")));

    let wrong_etag = Revision::S3 {
        bucket: bucket.clone(),
        key: "web/1.tgz".into(),
        version_id: None,
        etag: Some("\"0000\"".into()),
        bundle_type: BundleType::Tgz,
        sha256: sha256(&body),
    };
    let e = fetcher
        .fetch(&wrong_etag, &s.path().join("e.tgz"), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::EtagMismatch { .. }), "{e}");

    let missing = Revision::S3 {
        bucket,
        key: "web/none.tgz".into(),
        version_id: None,
        etag: None,
        bundle_type: BundleType::Tgz,
        sha256: sha256(&body),
    };
    let e = fetcher
        .fetch(&missing, &s.path().join("m.tgz"), &|_| {})
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "a missing object is not retried: {e}");
    assert!(e.to_string().contains("web/none.tgz"), "{e}");
}

#[tokio::test]
async fn fetch_from_s3_by_version_id() {
    let aws = moto_clients().await;
    let bucket = new_versioned_bucket(&aws).await;
    let v1 = aws
        .s3
        .put_object()
        .bucket(&bucket)
        .key("app.tar")
        .body(b"version one".to_vec().into())
        .send()
        .await
        .unwrap()
        .version_id()
        .unwrap()
        .to_string();
    put(&aws, &bucket, "app.tar", b"version two").await;
    let fetcher = Fetcher::new(Some(aws.s3.clone()), FetchOptions::default()).unwrap();
    let s = Scratch::new();
    let rev = Revision::S3 {
        bucket,
        key: "app.tar".into(),
        version_id: Some(v1),
        etag: None,
        bundle_type: BundleType::Tar,
        sha256: sha256(b"version one"),
    };
    let got = fetcher
        .fetch(&rev, &s.path().join("b.tar"), &|_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(got.path).unwrap(), b"version one");
}

/// One canned HTTP answer.
#[derive(Clone)]
struct Reply {
    status: u16,
    /// Extra header lines, each ending in `\r\n`.
    headers: String,
    body: Vec<u8>,
}

fn reply(status: u16, body: &[u8]) -> Reply {
    Reply {
        status,
        headers: String::new(),
        body: body.to_vec(),
    }
}

/// A tiny HTTP/1.1 server: answers each connection with the next of `responses`, repeating
/// the last, and records each request's head.
async fn http_server(responses: Vec<Reply>) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let Reply {
                status,
                headers,
                body,
            } = responses[n.min(responses.len() - 1)].clone();
            n += 1;
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => head.extend_from_slice(&buf[..k]),
                }
            }
            log.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let reply = format!(
                "HTTP/1.1 {status} X\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(reply.as_bytes()).await;
            let _ = sock.write_all(&body).await;
            let _ = sock.shutdown().await;
        }
    });
    (format!("http://{addr}"), seen)
}

fn quick_retries() -> FetchOptions {
    FetchOptions {
        backoff: pier_transport::backoff::Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(50),
            4,
        ),
        ..FetchOptions::default()
    }
}

#[tokio::test]
async fn fetch_over_http_retries_transient_errors_and_verifies() {
    let body = b"bundle over http".to_vec();
    let (base, seen) = http_server(vec![reply(503, b"busy"), reply(200, &body)]).await;
    let fetcher = Fetcher::new(None, quick_retries()).unwrap();
    let s = Scratch::new();
    let rev = Revision::Http {
        url: format!("{base}/rev.zip"),
        bundle_type: BundleType::Zip,
        sha256: sha256(&body),
    };
    let got = fetcher
        .fetch(&rev, &s.path().join("rev.zip"), &|_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), body);
    assert_eq!(seen.lock().unwrap().len(), 2, "one 503, then a retry");

    // A 404 is permanent: one request, no retries.
    let (base, seen) = http_server(vec![reply(404, b"no")]).await;
    let rev = Revision::Http {
        url: format!("{base}/gone.zip"),
        bundle_type: BundleType::Zip,
        sha256: sha256(&body),
    };
    let e = fetcher
        .fetch(&rev, &s.path().join("gone.zip"), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Http { status: 404, .. }), "{e}");
    assert_eq!(seen.lock().unwrap().len(), 1);

    // The right bytes under the wrong hash are refused and removed.
    let (base, _) = http_server(vec![reply(200, b"tampered")]).await;
    let rev = Revision::Http {
        url: format!("{base}/rev.zip"),
        bundle_type: BundleType::Zip,
        sha256: sha256(&body),
    };
    let dest = s.path().join("t.zip");
    let e = fetcher.fetch(&rev, &dest, &|_| {}).await.unwrap_err();
    assert!(matches!(e, FetchError::Sha256Mismatch { .. }), "{e}");
    assert!(!dest.exists());
}

#[tokio::test]
async fn fetch_from_github_sends_token_to_the_api_only() {
    let body = b"tarball bytes".to_vec();
    // Like api.github.com, the API redirects to another host (codeload) for the bytes.
    let (codeload, codeload_seen) = http_server(vec![reply(200, &body)]).await;
    let (base, seen) = http_server(vec![Reply {
        status: 302,
        headers: format!("location: {codeload}/acme/web/legacy.tar.gz/0123abc\r\n"),
        body: Vec::new(),
    }])
    .await;
    let fetcher = Fetcher::new(
        None,
        FetchOptions {
            github_api_url: base,
            github_token: Some("ghp_test_token".into()),
            ..quick_retries()
        },
    )
    .unwrap();
    let s = Scratch::new();
    let rev = Revision::Github {
        owner: "acme".into(),
        repo: "web".into(),
        commit: "0123abc".into(),
        bundle_type: None,
        sha256: Some(sha256(&body)),
    };
    let got = fetcher
        .fetch(&rev, &s.path().join("gh.tgz"), &|_| {})
        .await
        .unwrap();
    assert_eq!(got.bundle_type, BundleType::Tgz);
    let head = seen.lock().unwrap()[0].to_lowercase();
    assert!(
        head.starts_with("get /repos/acme/web/tarball/0123abc "),
        "{head}"
    );
    assert!(
        head.contains("authorization: bearer ghp_test_token"),
        "{head}"
    );
    let head = codeload_seen.lock().unwrap()[0].to_lowercase();
    assert!(
        head.starts_with("get /acme/web/legacy.tar.gz/0123abc "),
        "{head}"
    );
    assert!(
        !head.contains("ghp_test_token"),
        "token leaked on redirect: {head}"
    );

    // A failure message names the repository, never the token.
    let (base, _) = http_server(vec![reply(404, b"")]).await;
    let fetcher = Fetcher::new(
        None,
        FetchOptions {
            github_api_url: base,
            github_token: Some("ghp_test_token".into()),
            ..quick_retries()
        },
    )
    .unwrap();
    let e = fetcher
        .fetch(&rev, &s.path().join("gh2.tgz"), &|_| {})
        .await
        .unwrap_err();
    let msg = format!("{e} {e:?}");
    assert!(msg.contains("/repos/acme/web/tarball/0123abc"), "{msg}");
    assert!(!msg.contains("ghp_test_token"), "{msg}");
}

#[tokio::test]
async fn spool_pick_up_ack_reject_and_restart() {
    let s = Scratch::new();
    let dir = s.path().join("spool");
    let spool = Spool::open(&dir).unwrap();
    assert!(spool
        .receive(Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());

    // Half-written files (dotfiles, *.tmp) are not commands.
    std::fs::write(dir.join(".incoming.json"), b"{").unwrap();
    std::fs::write(dir.join("next.json.tmp"), b"{").unwrap();
    let good = command("d-spool-1", local_revision(), &s.path().join("status")).to_json();

    // A command dropped while a receive waits is picked up by that receive.
    let d = dir.clone();
    let body = good.clone();
    let dropper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Spool::submit(&d, "a.json", &body).unwrap();
    });
    let got = spool.receive(Duration::from_secs(5)).await.unwrap();
    dropper.await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, "a.json");
    assert_eq!(got[0].body, good);
    assert_eq!(got[0].receive_count, 1);
    assert!(dir.join("processing/a.json").is_file());
    assert!(!dir.join("a.json").exists());
    spool
        .extend(&got[0], Duration::from_secs(60))
        .await
        .unwrap();

    // The agent stops mid-deployment: a new one finds the command again.
    drop(spool);
    let spool = Spool::open(&dir).unwrap();
    let again = spool.receive(Duration::from_millis(300)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, "a.json");
    assert_eq!(again[0].receive_count, 2);
    spool.ack(&again[0]).await.unwrap();
    assert!(dir.join("done/a.json").is_file());
    assert!(!dir.join("processing/a.json").exists());

    // A malformed command is rejected with its reason beside it, never run nor deleted.
    Spool::submit(
        &dir,
        "b.json",
        br#"{"version": 1, "deployment_id": "d-2", "application_name": 5}"#,
    )
    .unwrap();
    let got = spool.receive(Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.len(), 1);
    let err = Command::from_json(&got[0].body).unwrap_err();
    spool.reject(&got[0], &err.to_string()).await.unwrap();
    assert!(dir.join("rejected/b.json").is_file());
    let reason = std::fs::read_to_string(dir.join("rejected/b.json.reason")).unwrap();
    assert!(reason.contains("application_name"), "{reason}");

    // The half-written files are still there, untouched.
    assert!(dir.join(".incoming.json").exists() && dir.join("next.json.tmp").exists());
    assert!(Spool::submit(&dir, "x.tmp", b"{}").is_err());
}

#[tokio::test]
async fn spool_two_agents_take_a_command_once() {
    let s = Scratch::new();
    let dir = s.path().join("spool");
    let a = Spool::open(&dir).unwrap();
    let b = Spool::open(&dir).unwrap();
    for i in 0..20 {
        Spool::submit(&dir, &format!("c{i:02}.json"), b"{}").unwrap();
    }
    let mut ids = Vec::new();
    loop {
        let (x, y) = tokio::join!(
            a.receive(Duration::from_millis(10)),
            b.receive(Duration::from_millis(10))
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        if x.is_empty() && y.is_empty() {
            break;
        }
        ids.extend(x.into_iter().chain(y).map(|m| m.id));
    }
    ids.sort();
    let want: Vec<String> = (0..20).map(|i| format!("c{i:02}.json")).collect();
    assert_eq!(ids, want);
}

#[test]
fn dedupe_persists_across_reopen() {
    let s = Scratch::new();
    let dir = s.path().join("seen");
    let d = Dedupe::open(&dir).unwrap();
    assert_eq!(d.begin("d-1").unwrap(), None, "first delivery runs");
    assert_eq!(
        d.begin("d-1").unwrap(),
        Some(Seen::InProgress),
        "duplicate does not"
    );
    assert_eq!(d.begin("d-2").unwrap(), None);
    d.finish("d-2").unwrap();
    drop(d);

    let d = Dedupe::open(&dir).unwrap();
    assert_eq!(d.begin("d-1").unwrap(), Some(Seen::InProgress));
    assert_eq!(d.begin("d-2").unwrap(), Some(Seen::Done));
    assert_eq!(d.in_progress().unwrap(), vec!["d-1".to_string()]);
}

#[test]
fn protocol_rejects_unknown_version_and_malformed_fields() {
    let s = Scratch::new();
    let mut v: serde_json::Value =
        serde_json::from_slice(&command("d-p", local_revision(), s.path()).to_json()).unwrap();
    v["version"] = serde_json::json!(3);
    let e = Command::from_json(v.to_string().as_bytes()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "message has version 3, this agent understands version 1; upgrade the agent or send a \
         version 1 message"
    );

    v["version"] = serde_json::json!(1);
    v["revision"]["bundle_type"] = serde_json::json!("rar");
    let e = Command::from_json(v.to_string().as_bytes()).unwrap_err();
    assert!(
        matches!(&e, ProtocolError::Field { field, .. } if field.starts_with("revision")),
        "{e}"
    );
    assert!(e.to_string().contains("rar"), "{e}");

    v["revision"]["bundle_type"] = serde_json::json!("tgz");
    v["is_rollback"] = serde_json::json!("yes");
    let e = Command::from_json(v.to_string().as_bytes()).unwrap_err();
    assert!(e.to_string().starts_with("field `is_rollback`"), "{e}");

    let e = Command::from_json(b"{\"version\": 1,").unwrap_err();
    assert!(e.to_string().contains("not valid JSON"), "{e}");
}

#[tokio::test]
async fn sqs_message_stays_invisible_while_work_runs() {
    let aws = moto_clients().await;
    let host = unique("host.a");
    let q = SqsQueue::open(aws.sqs.clone(), &QueueSpec::for_host(&host))
        .await
        .unwrap();
    assert!(q
        .url()
        .ends_with(&format!("pier-{}", host.replace('.', "-"))));
    q.send(b"{}").await.unwrap();
    let got = q.receive(Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1);

    // The work outlasts the 3 s visibility twice over; renewals keep the message hidden.
    let seen_during = keep_invisible(&q, &got[0], Duration::from_secs(3), async {
        let mut seen = 0;
        let until = tokio::time::Instant::now() + Duration::from_secs(7);
        while tokio::time::Instant::now() < until {
            seen += q.receive(Duration::from_secs(1)).await.unwrap().len();
        }
        seen
    })
    .await;
    assert_eq!(
        seen_during, 0,
        "another receiver got the message mid-deployment"
    );

    // Without renewals it comes back once its visibility runs out.
    let back = q.receive(Duration::from_secs(6)).await.unwrap();
    assert_eq!(
        back.len(),
        1,
        "the message reappears after the work stopped renewing"
    );
}
