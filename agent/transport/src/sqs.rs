//! The SQS queue transport: one queue per host, long-polled.
//!
//! A received message stays invisible while its deployment runs (the daemon calls
//! [`Queue::extend`], i.e. ChangeMessageVisibility) and is deleted only on [`Queue::ack`].
//! A rejected message is not deleted: it becomes visible again after a short delay, and once
//! it has been received `maxReceiveCount` times SQS's redrive policy moves it to the
//! dead-letter queue, where an operator can read it. [`SqsQueue::open`] can create the queue
//! and its DLQ on first start.

use std::time::Duration;

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};

use super::aws::aws_error;
use super::{BoxFuture, Queue, Received, TransportError};

/// SQS caps a long poll at 20 s.
const MAX_WAIT: Duration = Duration::from_secs(20);
/// SQS caps a receive at 10 messages.
const MAX_MESSAGES: i32 = 10;

/// A host's SQS command queue.
#[derive(Debug, Clone)]
pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    url: String,
    /// How long a rejected message stays invisible before it is offered again.
    reject_delay: Duration,
}

/// How [`SqsQueue::open`] finds (or makes) a host's queue.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    /// The queue's name (e.g. `pier-{host_id}`); ignored when `url` is set.
    pub name: String,
    /// The queue's URL when configured; used as is.
    pub url: Option<String>,
    /// Create the queue (and `{name}-dlq`) when it does not exist.
    pub create: bool,
    /// Receives after which a message moves to the DLQ (only when creating).
    pub max_receive_count: u32,
}

impl QueueSpec {
    /// The conventional queue of a host: `pier-{host_id}` (dots, not allowed in SQS names,
    /// become dashes), created with a DLQ after 5 receives when missing.
    pub fn for_host(host_id: &str) -> QueueSpec {
        let safe: String = host_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        QueueSpec {
            // SQS names are at most 80 characters, and the DLQ adds "-dlq".
            name: format!("pier-{safe}").chars().take(76).collect(),
            url: None,
            create: true,
            max_receive_count: 5,
        }
    }
}

impl SqsQueue {
    /// A queue by URL, without checking that it exists.
    pub fn new(client: aws_sdk_sqs::Client, url: impl Into<String>) -> SqsQueue {
        SqsQueue {
            client,
            url: url.into(),
            reject_delay: Duration::from_secs(5),
        }
    }

    /// Sets how long a rejected message stays invisible before SQS offers it again (and
    /// counts another receive toward the DLQ). Default 5 s.
    pub fn with_reject_delay(mut self, delay: Duration) -> SqsQueue {
        self.reject_delay = delay;
        self
    }

    /// Finds the queue by URL or name, creating it with a dead-letter queue and redrive
    /// policy when it does not exist and `spec.create` allows.
    pub async fn open(
        client: aws_sdk_sqs::Client,
        spec: &QueueSpec,
    ) -> Result<SqsQueue, TransportError> {
        if let Some(url) = &spec.url {
            return Ok(SqsQueue::new(client, url));
        }
        match client.get_queue_url().queue_name(&spec.name).send().await {
            Ok(out) => {
                let url = out.queue_url().unwrap_or_default().to_string();
                return Ok(SqsQueue::new(client, url));
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_queue_does_not_exist()) =>
            {
                if !spec.create {
                    return Err(TransportError::Config(format!(
                        "SQS queue `{}` does not exist; create it, set its URL in the agent \
                         config, or allow the agent to create it",
                        spec.name
                    )));
                }
            }
            Err(e) => return Err(aws_error("GetQueueUrl", &spec.name, e)),
        }
        let url = create_with_dlq(&client, &spec.name, spec.max_receive_count).await?;
        log::info!("created SQS queue {url} with a dead-letter queue");
        Ok(SqsQueue::new(client, url))
    }

    /// Creates (or finds: CreateQueue is idempotent for equal attributes) a plain queue with
    /// no dead-letter queue, such as a deployment's status notification queue.
    pub async fn create_plain(
        client: aws_sdk_sqs::Client,
        name: &str,
    ) -> Result<SqsQueue, TransportError> {
        let out = client
            .create_queue()
            .queue_name(name)
            .send()
            .await
            .map_err(|e| aws_error("CreateQueue", name, e))?;
        let url = out.queue_url().unwrap_or_default().to_string();
        Ok(SqsQueue::new(client, url))
    }

    /// Deletes the queue itself (for a queue that served its purpose); a queue already gone
    /// is not an error.
    pub async fn delete_queue(&self) -> Result<(), TransportError> {
        match self.client.delete_queue().queue_url(&self.url).send().await {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error().is_some_and(|s| {
                    s.meta().code() == Some("AWS.SimpleQueueService.NonExistentQueue")
                }) =>
            {
                Ok(())
            }
            Err(e) => Err(aws_error("DeleteQueue", &self.url, e)),
        }
    }

    /// The queue's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends `body` (the controller's side; also used by tests). Returns the message id.
    pub async fn send(&self, body: &[u8]) -> Result<String, TransportError> {
        let body = String::from_utf8_lossy(body).into_owned();
        let out = self
            .client
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| aws_error("SendMessage", &self.url, e))?;
        Ok(out.message_id().unwrap_or_default().to_string())
    }
}

/// Creates `{name}-dlq`, then `name` with a redrive policy pointing at it. Returns the URL.
pub async fn create_with_dlq(
    client: &aws_sdk_sqs::Client,
    name: &str,
    max_receive_count: u32,
) -> Result<String, TransportError> {
    let dlq_name = format!("{name}-dlq");
    let dlq = client
        .create_queue()
        .queue_name(&dlq_name)
        // A dead letter waits for a human: keep it the longest SQS allows (14 days).
        .attributes(QueueAttributeName::MessageRetentionPeriod, "1209600")
        .send()
        .await
        .map_err(|e| aws_error("CreateQueue", &dlq_name, e))?;
    let dlq_url = dlq.queue_url().unwrap_or_default().to_string();
    let attrs = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| aws_error("GetQueueAttributes", &dlq_url, e))?;
    let arn = attrs
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .ok_or_else(|| TransportError::Config(format!("queue {dlq_url} has no QueueArn")))?;
    let redrive = serde_json::json!({
        "deadLetterTargetArn": arn,
        "maxReceiveCount": max_receive_count.max(1).to_string(),
    });
    let out = client
        .create_queue()
        .queue_name(name)
        .attributes(QueueAttributeName::RedrivePolicy, redrive.to_string())
        .send()
        .await
        .map_err(|e| aws_error("CreateQueue", name, e))?;
    Ok(out.queue_url().unwrap_or_default().to_string())
}

/// SQS takes whole seconds within 0..=12 h for visibility.
fn secs(d: Duration) -> i32 {
    d.as_secs().min(12 * 3600) as i32
}

impl Queue for SqsQueue {
    fn receive(&self, wait: Duration) -> BoxFuture<'_, Vec<Received>> {
        Box::pin(async move {
            let out = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .wait_time_seconds(secs(wait.min(MAX_WAIT)))
                .max_number_of_messages(MAX_MESSAGES)
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .send()
                .await
                .map_err(|e| aws_error("ReceiveMessage", &self.url, e))?;
            Ok(out
                .messages()
                .iter()
                .filter_map(|m| {
                    let receipt = m.receipt_handle()?.to_string();
                    let receive_count = m
                        .attributes()
                        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(1);
                    Some(Received {
                        id: m.message_id().unwrap_or_default().to_string(),
                        body: m.body().unwrap_or_default().as_bytes().to_vec(),
                        receive_count,
                        receipt,
                    })
                })
                .collect())
        })
    }

    fn extend<'a>(&'a self, msg: &'a Received, visibility: Duration) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.client
                .change_message_visibility()
                .queue_url(&self.url)
                .receipt_handle(&msg.receipt)
                .visibility_timeout(secs(visibility))
                .send()
                .await
                .map_err(|e| aws_error("ChangeMessageVisibility", &self.url, e))?;
            Ok(())
        })
    }

    fn ack<'a>(&'a self, msg: &'a Received) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.client
                .delete_message()
                .queue_url(&self.url)
                .receipt_handle(&msg.receipt)
                .send()
                .await
                .map_err(|e| aws_error("DeleteMessage", &self.url, e))?;
            Ok(())
        })
    }

    fn reject<'a>(&'a self, msg: &'a Received, reason: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            log::warn!(
                "rejecting message {} from {} (receive {}): {reason}; it is left for the \
                 dead-letter queue",
                msg.id,
                self.url,
                msg.receive_count
            );
            self.extend(msg, self.reject_delay).await
        })
    }

    fn describe(&self) -> String {
        format!("SQS queue {}", self.url)
    }
}
