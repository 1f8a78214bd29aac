//! Deployment notifications reaching a real webhook (signed, retried on a 5xx, not retried on
//! a 4xx, given up on an unreachable one) and an SNS topic on moto, read back from an SQS
//! queue subscribed to it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use hmac::{Hmac, KeyInit, Mac};
use pier_controller::group::{Notification, NotificationTarget, TriggerEvent, Webhook};
use pier_controller::notify::Notifier;
use pier_protocol::record::DeploymentRecord;
use pier_sys::backoff::Backoff;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A POST as the test server received it.
#[derive(Debug, Clone)]
struct Received {
    /// Header names lower-cased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }
}

/// A minimal HTTP/1.1 server: answers each request with the next status of `statuses` (the
/// last one repeated) and records what it got. Stops with the test's runtime.
async fn webhook_server(statuses: Vec<u16>) -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/hooks/pier?token=t0ps3cret",
        listener.local_addr().unwrap()
    );
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    tokio::spawn(async move {
        for n in 0.. {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let header_end = loop {
                let read = conn.read(&mut chunk).await.unwrap();
                assert!(read > 0, "connection closed mid-request");
                buf.extend_from_slice(&chunk[..read]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
            };
            let head = String::from_utf8(buf[..header_end].to_vec()).unwrap();
            let mut lines = head.split("\r\n");
            assert!(lines
                .next()
                .unwrap()
                .starts_with("POST /hooks/pier?token=t0ps3cret "));
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let length: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map(|(_, v)| v.parse().unwrap())
                .expect("a Content-Length");
            while buf.len() < header_end + length {
                let read = conn.read(&mut chunk).await.unwrap();
                assert!(read > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..read]);
            }
            let body = buf[header_end..header_end + length].to_vec();
            log.lock().unwrap().push(Received { headers, body });
            let status = statuses[n.min(statuses.len() - 1)];
            let text = format!("status {status} from the test server");
            let response = format!(
                "HTTP/1.1 {status} Test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
            conn.write_all(response.as_bytes()).await.unwrap();
            let _ = conn.shutdown().await;
        }
    });
    (url, received)
}

/// A record of a deployment to two hosts, one of which failed.
fn record() -> DeploymentRecord {
    serde_json::from_value(json!({
        "version": 1,
        "deployment_id": "d-notify-1",
        "application": "shop",
        "deployment_group": "staging",
        "revision": {"type": "s3", "bucket": "b", "key": "shop.tgz", "bundle_type": "tgz",
                     "sha256": "00"},
        "creator": "ana@build",
        "config_name": "AllAtOnce",
        "minimum_healthy_hosts": {"type": "HOST_COUNT", "value": 0},
        "status": "InProgress",
        "hosts": {
            "web-1": {"state": "Dispatched", "batch": 0},
            "web-2": {"state": "Failed", "batch": 0, "error": "Install: FileExists"}
        },
        "created_at": "2026-01-26T09:00:00Z",
        "updated_at": "2026-01-26T09:00:00Z"
    }))
    .unwrap()
}

/// A webhook target whose secret is in a variable of its own (tests run in parallel).
fn webhook(url: &str, secret_env: &str, secret: &str, events: &[TriggerEvent]) -> Notification {
    std::env::set_var(secret_env, secret);
    Notification {
        target: NotificationTarget::Webhook(Webhook {
            url: url.to_string(),
            secret_env: secret_env.to_string(),
        }),
        events: events.to_vec(),
    }
}

/// Quick retries, so a test takes milliseconds.
fn fast(n: Notifier) -> Notifier {
    n.with_timing(
        Duration::from_secs(5),
        Backoff::new(Duration::from_millis(10), Duration::from_millis(40), 4),
    )
}

/// What a receiver does (docs/protocol.md): HMAC-SHA256 of `TIMESTAMP.BODY` with the secret.
fn verify(secret: &str, got: &Received) {
    let timestamp = got.header("x-pier-timestamp");
    let age = Utc::now().timestamp() - timestamp.parse::<i64>().unwrap();
    assert!(
        (0..60).contains(&age),
        "timestamp {timestamp} is {age} s old"
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&got.body);
    let hex = got
        .header("x-pier-signature-256")
        .strip_prefix("sha256=")
        .expect("sha256= prefix");
    mac.verify_slice(&hex::decode(hex).unwrap())
        .expect("the signature verifies");
}

/// The receiver's check as `docs/protocol.md` ("Verifying a webhook") gives it in Python,
/// run on what the server got, so the documented snippet cannot drift from what is sent.
fn docs_snippet_accepts(secret: &str, got: &Received, body: &[u8]) -> bool {
    let doc = std::fs::read_to_string(pier_testkit::repo_root().join("docs/protocol.md")).unwrap();
    let section = &doc[doc.find("### Verifying a webhook").expect("the section")..];
    let start = section.find("```python\n").expect("a python block") + "```python\n".len();
    let snippet = &section[start..start + section[start..].find("```").unwrap()];
    let scratch = pier_testkit::Scratch::new();
    let body_file = scratch.path().join("body.json");
    std::fs::write(&body_file, body).unwrap();
    let script = format!(
        "{snippet}\nimport sys\n\
         headers = {{'X-Pier-Timestamp': sys.argv[1], 'X-Pier-Signature-256': sys.argv[2]}}\n\
         sys.exit(0 if verify(sys.argv[3].encode(), headers, open(sys.argv[4], 'rb').read()) else 1)\n"
    );
    let status = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(got.header("x-pier-timestamp"))
        .arg(got.header("x-pier-signature-256"))
        .arg(secret)
        .arg(&body_file)
        .status()
        .expect("run python3 (moto needs it too)");
    status.success()
}

#[tokio::test]
async fn webhook_retries_a_500_and_delivers_a_signed_document() {
    let (url, received) = webhook_server(vec![500, 200]).await;
    let secret = "s3cret with spaces";
    let targets = [webhook(
        &url,
        "PIER_TEST_HOOK_SECRET_A",
        secret,
        &TriggerEvent::ALL,
    )];
    let notifier = fast(Notifier::new(&targets, None).unwrap());
    assert!(!notifier.is_empty());

    let failures = notifier
        .send(TriggerEvent::InstanceFailure, &record(), Some("web-2"))
        .await;
    assert_eq!(failures, []);

    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "one 500, then the retry that got a 200");
    for r in &got {
        verify(secret, r);
        assert_eq!(r.header("content-type"), "application/json");
        assert_eq!(r.header("x-pier-event"), "InstanceFailure");
    }
    assert_eq!(
        got[0].header("x-pier-delivery"),
        got[1].header("x-pier-delivery"),
        "a retry is the same delivery"
    );
    assert_eq!(got[0].body, got[1].body, "a retry sends the same document");
    assert!(docs_snippet_accepts(secret, &got[1], &got[1].body));
    let mut tampered = got[1].body.clone();
    tampered.extend_from_slice(b" ");
    assert!(!docs_snippet_accepts(secret, &got[1], &tampered));
    let doc: Value = serde_json::from_slice(&got[1].body).unwrap();
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["event"], "InstanceFailure");
    assert_eq!(doc["deployment_id"], "d-notify-1");
    assert_eq!(doc["status"], "InProgress");
    assert_eq!(doc["revision"], "s3://b/shop.tgz");
    assert_eq!(doc["hosts"]["Failed"], 1);
    assert_eq!(doc["hosts"]["Dispatched"], 1);
    assert_eq!(doc["instance"]["host_id"], "web-2");
    assert_eq!(doc["instance"]["error"], "Install: FileExists");
}

#[tokio::test]
async fn webhook_4xx_is_not_retried_and_unsubscribed_events_are_not_sent() {
    let (url, received) = webhook_server(vec![403]).await;
    let targets = [webhook(
        &url,
        "PIER_TEST_HOOK_SECRET_B",
        "k",
        &[TriggerEvent::DeploymentFailure],
    )];
    let notifier = fast(Notifier::new(&targets, None).unwrap());

    let rec = record();
    assert_eq!(
        notifier
            .send(TriggerEvent::DeploymentStart, &rec, None)
            .await,
        []
    );
    assert!(received.lock().unwrap().is_empty(), "not subscribed");

    let failures = notifier
        .send(TriggerEvent::DeploymentFailure, &rec, None)
        .await;
    assert_eq!(failures.len(), 1);
    let f = &failures[0];
    assert_eq!((f.event, f.attempts), (TriggerEvent::DeploymentFailure, 1));
    assert!(f.message.starts_with("HTTP 403"), "{}", f.message);
    assert!(f.message.contains("from the test server"), "{}", f.message);
    assert!(
        !f.target.contains("t0ps3cret"),
        "the URL's query is not shown: {}",
        f.target
    );
    assert_eq!(received.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn unreachable_webhook_is_given_up_within_the_bounds() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/hook");
    let targets = [webhook(
        &url,
        "PIER_TEST_HOOK_SECRET_C",
        "k",
        &TriggerEvent::ALL,
    )];
    let notifier = fast(Notifier::new(&targets, None).unwrap());
    let started = std::time::Instant::now();
    let failures = notifier
        .send(TriggerEvent::DeploymentStart, &record(), None)
        .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].attempts, 4, "{}", failures[0]);

    // A deadline shorter than the retries stops them.
    let slow = Notifier::new(&targets, None).unwrap().with_timing(
        Duration::from_millis(300),
        Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 10),
    );
    let started = std::time::Instant::now();
    let failures = slow
        .send(TriggerEvent::DeploymentStart, &record(), None)
        .await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        failures[0]
            .message
            .starts_with("not delivered within 300 ms; last error:"),
        "{}",
        failures[0]
    );
}

#[tokio::test]
async fn sns_topic_gets_the_document() {
    let aws = pier_testkit::moto_clients().await;
    // Built as the controller builds it: from the shared AWS configuration.
    let sns = aws_sdk_sns::Client::new(&aws.config);
    let name = pier_testkit::unique("pier-notify");
    let topic_arn = sns
        .create_topic()
        .name(&name)
        .send()
        .await
        .unwrap()
        .topic_arn
        .unwrap();
    let queue_url = aws
        .sqs
        .create_queue()
        .queue_name(&name)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let queue_arn = aws
        .sqs
        .get_queue_attributes()
        .queue_url(&queue_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
        .clone();
    sns.subscribe()
        .topic_arn(&topic_arn)
        .protocol("sqs")
        .endpoint(queue_arn)
        .send()
        .await
        .unwrap();

    let targets = [Notification {
        target: NotificationTarget::Sns(topic_arn.clone()),
        events: vec![TriggerEvent::DeploymentSuccess],
    }];
    let notifier = fast(Notifier::new(&targets, Some(sns.clone())).unwrap());
    let mut rec = record();
    rec.status = pier_protocol::record::RolloutStatus::Succeeded;
    let failures = notifier
        .send(TriggerEvent::DeploymentSuccess, &rec, None)
        .await;
    assert_eq!(failures, []);

    let mut messages = Vec::new();
    for _ in 0..5 {
        let got = aws
            .sqs
            .receive_message()
            .queue_url(&queue_url)
            .wait_time_seconds(2)
            .send()
            .await
            .unwrap();
        messages.extend(got.messages.unwrap_or_default());
        if !messages.is_empty() {
            break;
        }
    }
    assert_eq!(messages.len(), 1, "SNS delivered to the queue");
    // SQS subscriptions get SNS's envelope, the document in its Message.
    let envelope: Value = serde_json::from_str(messages[0].body().unwrap()).unwrap();
    assert_eq!(envelope["TopicArn"], topic_arn.as_str());
    assert_eq!(
        envelope["Subject"],
        "pier DeploymentSuccess: shop/staging d-notify-1"
    );
    assert_eq!(
        envelope["MessageAttributes"]["event"]["Value"],
        "DeploymentSuccess"
    );
    let doc: Value = serde_json::from_str(envelope["Message"].as_str().unwrap()).unwrap();
    assert_eq!(doc["event"], "DeploymentSuccess");
    assert_eq!(doc["status"], "Succeeded");
    assert_eq!(doc["application"], "shop");
    assert_eq!(doc["hosts"]["total"], 2);
    assert_eq!(doc["instance"], Value::Null);
}
