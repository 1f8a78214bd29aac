//! The transport tests' fixture: the shared test kit (scratch directories, moto clients,
//! unique names, counted skips), a command to carry and a queue to carry it.
#![allow(dead_code)]

pub use pier_testkit::*;

use std::path::Path;

use pier_protocol::{BundleType, Command, Revision, StatusSinkSpec, StatusTarget};
use pier_transport::aws::AwsClients;
use pier_transport::sqs::{QueueSpec, SqsQueue};

/// A version-1 deployment command reporting to the local status directory `status_dir`.
pub fn command(id: &str, revision: Revision, status_dir: &Path) -> Command {
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
        ignore_application_stop_failures: false,
        status: StatusTarget {
            sink: StatusSinkSpec::Local {
                dir: status_dir.display().to_string(),
            },
            notify_queue_url: None,
        },
        created_at: chrono::Utc::now(),
    }
}

/// A revision on this host (never fetched by these tests).
pub fn local_revision() -> Revision {
    Revision::Local {
        path: "/srv/bundle.tgz".into(),
        bundle_type: BundleType::Tgz,
        sha256: None,
    }
}

/// A new SQS queue on moto whose messages go to a dead-letter queue after
/// `max_receive_count` receives.
pub async fn new_queue(aws: &AwsClients, max_receive_count: u32) -> SqsQueue {
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
