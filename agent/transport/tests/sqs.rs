//! The SQS queue on moto: send, receive, extend and acknowledge; a missing queue; rejected
//! messages reaching the dead-letter queue; and renewing invisibility while work runs.

use std::path::Path;
use std::time::Duration;

use pier_protocol::{Command, ProtocolError};
use pier_transport::sqs::{QueueSpec, SqsQueue};
use pier_transport::{keep_invisible, Queue};

use crate::support::{command, local_revision, moto_clients, new_queue, unique};

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
