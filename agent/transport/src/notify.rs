//! Status notifications: a [`StatusSink`] wrapper that, after each durable write, sends a
//! small message to an SQS queue so a listening controller need not poll.
//!
//! The notification is a hint, not the record: it is sent only after the write succeeded, and
//! a failure to send is logged, not returned, since the record itself is already safe.

use super::{BoxFuture, StatusSink};
use pier_protocol::StatusRecord;

/// A sink that also notifies a queue.
pub(crate) struct NotifyingSink {
    inner: Box<dyn StatusSink>,
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
}

impl NotifyingSink {
    /// Wraps `inner`, notifying `queue_url` after each write.
    pub(crate) fn new(
        inner: Box<dyn StatusSink>,
        sqs: aws_sdk_sqs::Client,
        queue_url: &str,
    ) -> NotifyingSink {
        NotifyingSink {
            inner,
            sqs,
            queue_url: queue_url.to_string(),
        }
    }
}

/// The body of a notification: enough to decide whether to fetch the record.
pub(crate) fn notification(record: &StatusRecord) -> serde_json::Value {
    serde_json::json!({
        "version": record.version,
        "deployment_id": record.deployment_id,
        "host_id": record.host_id,
        "status": record.status,
        "updated_at": record.updated_at,
    })
}

impl StatusSink for NotifyingSink {
    fn write<'a>(&'a self, record: &'a StatusRecord) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.inner.write(record).await?;
            let sent = self
                .sqs
                .send_message()
                .queue_url(&self.queue_url)
                .message_body(notification(record).to_string())
                .send()
                .await;
            if let Err(e) = sent {
                log::warn!(
                    "status of {} written, but the notification to {} failed: {}",
                    record.deployment_id,
                    self.queue_url,
                    aws_sdk_sqs::error::DisplayErrorContext(&e)
                );
            }
            Ok(())
        })
    }

    fn read<'a>(
        &'a self,
        deployment_id: &'a str,
        host_id: &'a str,
    ) -> BoxFuture<'a, Option<StatusRecord>> {
        self.inner.read(deployment_id, host_id)
    }

    fn list_hosts<'a>(&'a self, deployment_id: &'a str) -> BoxFuture<'a, Vec<String>> {
        self.inner.list_hosts(deployment_id)
    }
}
