//! Status sinks: S3 on moto (with a notification queue) and a local directory: write, read
//! back, list.

use std::time::Duration;

use pier_protocol::{
    DeploymentStatus, EventState, EventStatus, StatusRecord, StatusSinkSpec, StatusTarget,
};
use pier_transport::s3::S3StatusSink;
use pier_transport::{open_status_sink, Queue, StatusSink};

use crate::support::{moto_clients, new_bucket, new_queue, Scratch};

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
        ignored: false,
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
