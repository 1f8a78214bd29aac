//! Deployment notifications: telling a group's SNS topics and webhooks about its deployments
//! (CodeDeploy's trigger events), as described in `docs/protocol.md` under "Deployment
//! notifications".
//!
//! A [`Notifier`] is built from a group's `notifications` when a rollout starts (reading each
//! webhook's secret from its environment variable then, so a missing one stops the deployment
//! before anything is sent). The rollout driver calls [`Notifier::send`] at each event; every
//! target subscribed to it gets the same JSON [`document`]: SNS as a Publish with a short
//! subject, a webhook as an HTTP POST signed with HMAC-SHA256 over a timestamp and the exact
//! body ([`signature`]). A notification never fails the deployment: each delivery is retried
//! with the one [`Backoff`] and bounded in time, and one that still fails is reported on
//! stderr and returned as a [`DeliveryFailure`].
//!
//! This module decides what is said and how it is delivered; when an event happens is the
//! rollout driver's business.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use pier_protocol::quote::quote_bytes;
use pier_protocol::record::{DeploymentRecord, HostRolloutState};
use pier_sys::backoff::Backoff;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::group::{Notification, NotificationTarget, TriggerEvent};
use crate::ControllerError;

/// The notification document version this controller sends.
pub const NOTIFICATION_VERSION: u32 = 1;

/// Header naming the event of a webhook POST.
pub const EVENT_HEADER: &str = "X-Pier-Event";
/// Header with the delivery's id, the same on every attempt of one delivery, so a receiver
/// can drop a retry of a POST it already handled.
pub const DELIVERY_HEADER: &str = "X-Pier-Delivery";
/// Header with the Unix time (seconds) the attempt was signed at; part of the signed material.
pub const TIMESTAMP_HEADER: &str = "X-Pier-Timestamp";
/// Header with `sha256=HEX`, the HMAC-SHA256 of `TIMESTAMP.BODY` under the shared secret.
pub const SIGNATURE_HEADER: &str = "X-Pier-Signature-256";

/// How long one delivery (all its attempts) may take by default.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
/// How long one webhook request may take: a few attempts fit in the delivery's deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);
/// SNS takes a subject of fewer than 100 characters.
const SUBJECT_MAX: usize = 99;

/// Sends a group's notifications. Cheap to share: `send` takes `&self`.
pub struct Notifier {
    targets: Vec<Target>,
    sns: Option<aws_sdk_sns::Client>,
    http: reqwest::Client,
    deadline: Duration,
    backoff: Backoff,
}

/// One notification entry, resolved: its secret read, its URL parsed.
struct Target {
    destination: Destination,
    events: Vec<TriggerEvent>,
}

enum Destination {
    Sns {
        topic_arn: String,
    },
    Webhook {
        url: reqwest::Url,
        /// The shared secret's bytes, from the environment variable the group names.
        secret: Vec<u8>,
    },
}

impl Destination {
    /// How the target is named in messages: the topic ARN, or the URL without its query
    /// (which may hold a token).
    fn describe(&self) -> String {
        match self {
            Destination::Sns { topic_arn } => topic_arn.clone(),
            Destination::Webhook { url, .. } => {
                let mut shown = url.clone();
                if shown.query().is_some() {
                    shown.set_query(Some("…"));
                }
                shown.to_string()
            }
        }
    }
}

impl std::fmt::Debug for Notifier {
    // Hand-written so that no secret ends up in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field(
                "targets",
                &self
                    .targets
                    .iter()
                    .map(|t| (t.destination.describe(), &t.events))
                    .collect::<Vec<_>>(),
            )
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// A notification that was not delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryFailure {
    /// The event it was about.
    pub event: TriggerEvent,
    /// The topic ARN, or the webhook URL (its query elided).
    pub target: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub message: String,
}

impl std::fmt::Display for DeliveryFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} notification to {} not delivered after {} attempt{}: {}",
            self.event.as_str(),
            self.target,
            self.attempts,
            if self.attempts == 1 { "" } else { "s" },
            self.message
        )
    }
}

/// Why one attempt failed, and whether another may succeed.
struct AttemptError {
    message: String,
    transient: bool,
}

impl Notifier {
    /// A notifier for a group's `targets`. Reads each webhook's secret from its environment
    /// variable now; a variable that is unset or empty is a usage error naming it (every such
    /// variable is named at once). `sns` is needed when a target is an SNS topic.
    pub fn new(
        targets: &[Notification],
        sns: Option<aws_sdk_sns::Client>,
    ) -> Result<Notifier, ControllerError> {
        let mut resolved = Vec::with_capacity(targets.len());
        let mut problems = Vec::new();
        for (i, n) in targets.iter().enumerate() {
            let destination = match &n.target {
                NotificationTarget::Sns(arn) => {
                    if sns.is_none() {
                        problems.push((
                            format!("notifications[{i}].sns_topic_arn"),
                            "publishing to an SNS topic needs AWS access (--region or \
                             AWS_REGION, credentials)"
                                .to_string(),
                        ));
                    }
                    Destination::Sns {
                        topic_arn: arn.clone(),
                    }
                }
                NotificationTarget::Webhook(hook) => {
                    let url = match reqwest::Url::parse(&hook.url) {
                        Ok(url) if matches!(url.scheme(), "http" | "https") => Some(url),
                        _ => {
                            problems.push((
                                format!("notifications[{i}].webhook.url"),
                                format!(
                                    "{} is not an http:// or https:// URL",
                                    quote_bytes(hook.url.as_bytes())
                                ),
                            ));
                            None
                        }
                    };
                    let secret = secret_from_env(&hook.secret_env);
                    if secret.is_none() {
                        problems.push((
                            format!("notifications[{i}].webhook.secret_env"),
                            format!(
                                "the environment variable {} is not set or empty; export the \
                                 webhook's shared secret in it",
                                hook.secret_env
                            ),
                        ));
                    }
                    match (url, secret) {
                        (Some(url), Some(secret)) => Destination::Webhook { url, secret },
                        _ => continue,
                    }
                }
            };
            resolved.push(Target {
                destination,
                events: n.events.clone(),
            });
        }
        match problems.len() {
            0 => {}
            1 => {
                let (flag, message) = problems.remove(0);
                return Err(ControllerError::usage(flag, message));
            }
            _ => {
                let all: Vec<String> = problems
                    .into_iter()
                    .map(|(at, message)| format!("{at}: {message}"))
                    .collect();
                return Err(ControllerError::usage("notifications", all.join("; ")));
            }
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("pier/", env!("CARGO_PKG_VERSION")))
            .timeout(REQUEST_TIMEOUT)
            // A redirected POST would be replayed as a GET elsewhere; a webhook URL must be
            // the one that answers.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ControllerError::Notify(format!("the HTTP client for webhooks: {e}")))?;
        Ok(Notifier {
            targets: resolved,
            sns,
            http,
            deadline: DEFAULT_DEADLINE,
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(2), 4),
        })
    }

    /// The same notifier with another bound on each delivery and another retry schedule
    /// (tests, or a caller with a tighter budget).
    pub fn with_timing(mut self, deadline: Duration, backoff: Backoff) -> Notifier {
        self.deadline = deadline;
        self.backoff = backoff;
        self
    }

    /// Whether there is nothing to notify (the group lists no targets).
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Sends `event` about `record` (and `host`, for `Instance*` events) to every target
    /// subscribed to it, all targets at once. Never fails the deployment: each delivery is
    /// retried on transient failures (a connection error, a timeout, 408, 429, 5xx, SNS
    /// throttling) with the notifier's backoff and bounded by its deadline (10 s unless
    /// [`with_timing`](Notifier::with_timing) says otherwise); a delivery that still fails is
    /// reported on stderr and returned.
    pub async fn send(
        &self,
        event: TriggerEvent,
        record: &DeploymentRecord,
        host: Option<&str>,
    ) -> Vec<DeliveryFailure> {
        let subscribed: Vec<&Target> = self
            .targets
            .iter()
            .filter(|t| t.events.contains(&event))
            .collect();
        if subscribed.is_empty() {
            return Vec::new();
        }
        let body = document(event, record, host, Utc::now()).to_string();
        let subject = subject(event, record, host);
        let deliveries = subscribed
            .into_iter()
            .map(|t| self.deliver(t, event, &body, &subject));
        let failures: Vec<DeliveryFailure> = futures::future::join_all(deliveries)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        for f in &failures {
            eprintln!("pier: deployment {}: {f}", record.deployment_id);
        }
        failures
    }

    /// One target, every attempt, within the deadline.
    async fn deliver(
        &self,
        target: &Target,
        event: TriggerEvent,
        body: &str,
        subject: &str,
    ) -> Result<(), DeliveryFailure> {
        let delivery = delivery_id();
        let attempts = AtomicU32::new(0);
        let last_error = Mutex::new(None::<String>);
        let run = self.backoff.retry(
            |n| {
                attempts.store(n, Ordering::Relaxed);
                let delivery = &delivery;
                let last_error = &last_error;
                async move {
                    let result = match &target.destination {
                        Destination::Sns { topic_arn } => {
                            self.publish(topic_arn, event, body, subject).await
                        }
                        Destination::Webhook { url, secret } => {
                            self.post(url, secret, event, body, delivery).await
                        }
                    };
                    if let Err(e) = &result {
                        *last_error.lock().expect("no panic while held") = Some(e.message.clone());
                    }
                    result
                }
            },
            |e: &AttemptError| e.transient,
        );
        let message = match tokio::time::timeout(self.deadline, run).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.message,
            Err(_) => {
                let last = last_error.lock().expect("no panic while held").take();
                let within = format!("not delivered within {} ms", self.deadline.as_millis());
                match last {
                    Some(last) => format!("{within}; last error: {last}"),
                    None => within,
                }
            }
        };
        Err(DeliveryFailure {
            event,
            target: target.destination.describe(),
            attempts: attempts.load(Ordering::Relaxed).max(1),
            message,
        })
    }

    /// One SNS Publish: the document as the message, the event also as a message attribute
    /// so that subscriptions can filter on it.
    async fn publish(
        &self,
        topic_arn: &str,
        event: TriggerEvent,
        body: &str,
        subject: &str,
    ) -> Result<(), AttemptError> {
        let sns = self
            .sns
            .as_ref()
            .expect("Notifier::new requires a client for SNS targets");
        let attribute = aws_sdk_sns::types::MessageAttributeValue::builder()
            .data_type("String")
            .string_value(event.as_str())
            .build()
            .map_err(|e| AttemptError {
                message: e.to_string(),
                transient: false,
            })?;
        sns.publish()
            .topic_arn(topic_arn)
            .subject(subject)
            .message(body)
            .message_attributes("event", attribute)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| AttemptError {
                transient: pier_transport::aws::is_transient(&e),
                message: format!(
                    "SNS Publish: {}",
                    aws_sdk_sns::error::DisplayErrorContext(&e)
                ),
            })
    }

    /// One webhook POST, signed afresh (a retry carries a new timestamp, the same delivery id).
    async fn post(
        &self,
        url: &reqwest::Url,
        secret: &[u8],
        event: TriggerEvent,
        body: &str,
        delivery: &str,
    ) -> Result<(), AttemptError> {
        let timestamp = Utc::now().timestamp();
        let mut response = self
            .http
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(EVENT_HEADER, event.as_str())
            .header(DELIVERY_HEADER, delivery)
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(
                SIGNATURE_HEADER,
                signature(secret, timestamp, body.as_bytes()),
            )
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| AttemptError {
                message: error_chain(&e),
                // A request that could not even be built will not build next time either.
                transient: !e.is_builder(),
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let code = status.as_u16();
        // The start of the answer says why; only its first chunk is read (quote_bytes cuts
        // it further), so a receiver cannot make the controller read a large body.
        let excerpt = match response.chunk().await {
            Ok(Some(bytes)) if !bytes.trim_ascii().is_empty() => {
                format!(": {}", quote_bytes(bytes.trim_ascii()))
            }
            _ => String::new(),
        };
        Err(AttemptError {
            message: format!("HTTP {status}{excerpt}"),
            transient: code == 408 || code == 429 || status.is_server_error(),
        })
    }
}

/// A webhook's secret: the bytes of the environment variable, if set and not empty.
fn secret_from_env(name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStringExt;
    std::env::var_os(name)
        .map(OsStringExt::into_vec)
        .filter(|s| !s.is_empty())
}

/// The value of [`SIGNATURE_HEADER`]: `sha256=` and the lower-case hex HMAC-SHA256, keyed
/// with `secret`, of the decimal `timestamp`, a `.`, and the exact `body` bytes.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The JSON document sent for `event` about `record` (and `host`, for `Instance*` events),
/// stamped `sent_at` = `now`. Field by field in `docs/protocol.md`, "Deployment
/// notifications".
pub fn document(
    event: TriggerEvent,
    record: &DeploymentRecord,
    host: Option<&str>,
    now: DateTime<Utc>,
) -> Value {
    let mut hosts = serde_json::Map::new();
    hosts.insert("total".into(), record.hosts.len().into());
    for state in HostRolloutState::ALL {
        hosts.insert(state.as_str().into(), record.count(state).into());
    }
    let instance = match host.filter(|_| event.is_instance()) {
        Some(id) => {
            let h = record.hosts.get(id);
            json!({
                "host_id": id,
                "state": h.map(|h| h.state),
                "batch": h.and_then(|h| h.batch),
                "availability_zone": h.and_then(|h| h.availability_zone.clone()),
                "dispatched_at": h.and_then(|h| h.dispatched_at),
                "ended_at": h.and_then(|h| h.ended_at),
                "error": h.and_then(|h| h.error.clone()),
            })
        }
        None => Value::Null,
    };
    json!({
        "version": NOTIFICATION_VERSION,
        "event": event.as_str(),
        "sent_at": now,
        "deployment_id": record.deployment_id,
        "application": record.application,
        "deployment_group": record.deployment_group,
        "status": record.status,
        "status_reason": record.status_reason,
        "revision": record.revision.describe(),
        "commit_sha": record.commit_sha,
        "creator": record.creator,
        "config_name": record.config_name,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
        "hosts": hosts,
        "instance": instance,
        "rollback_of": record.rollback_of,
        "rolled_back_by": record.rolled_back_by,
    })
}

/// The SNS subject: `pier EVENT: APPLICATION/GROUP DEPLOYMENT_ID [HOST]`, in printable ASCII
/// (SNS refuses control characters and line breaks) and under SNS's 100-character limit.
fn subject(event: TriggerEvent, record: &DeploymentRecord, host: Option<&str>) -> String {
    let mut s = format!(
        "pier {}: {}/{} {}",
        event.as_str(),
        record.application,
        record.deployment_group,
        record.deployment_id
    );
    if let Some(h) = host.filter(|_| event.is_instance()) {
        s.push(' ');
        s.push_str(h);
    }
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(SUBJECT_MAX)
        .collect()
}

/// A random id in the form of a version-4 UUID, naming one delivery across its attempts.
fn delivery_id() -> String {
    let mut b: u128 = rand::random();
    b = (b & !(0xf << 76)) | (0x4 << 76);
    b = (b & !(0x3 << 62)) | (0x2 << 62);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        b >> 96,
        (b >> 80) & 0xffff,
        (b >> 64) & 0xffff,
        (b >> 48) & 0xffff,
        b & 0xffff_ffff_ffff
    )
}

/// An error and its sources, for a person ("error sending request: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !message.contains(&next) {
            message.push_str(": ");
            message.push_str(&next);
        }
        source = s.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::Webhook;

    /// A record with three hosts: one succeeded, one failed, one not sent yet.
    pub(crate) fn record() -> DeploymentRecord {
        serde_json::from_value(json!({
            "version": 1,
            "deployment_id": "d-20260126-0001",
            "application": "shop",
            "deployment_group": "production",
            "revision": {"type": "s3", "bucket": "b", "key": "shop.tgz", "bundle_type": "tgz",
                         "sha256": "00"},
            "commit_sha": "4b825dc642cb6eb9a060e54bf8d69288fbee4904",
            "creator": "ana@build",
            "config_name": "OneAtATime",
            "minimum_healthy_hosts": {"type": "HOST_COUNT", "value": 2},
            "status": "Failed",
            "status_reason": "too many hosts failed",
            "hosts": {
                "web-1": {"state": "Succeeded", "batch": 0},
                "web-2": {"state": "Failed", "batch": 1, "availability_zone": "eu-west-1a",
                          "error": "ApplicationStart: ScriptFailed"},
                "web-3": {"state": "Skipped"}
            },
            "rollback_of": "d-20260125-0007",
            "created_at": "2026-01-26T09:00:00Z",
            "started_at": "2026-01-26T09:00:05Z",
            "ended_at": "2026-01-26T09:03:00Z",
            "updated_at": "2026-01-26T09:03:00Z"
        }))
        .unwrap()
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // printf '%s' '1700000000.{"event":"DeploymentStart"}' \
        //   | openssl dgst -sha256 -hmac "It's a Secret to Everybody"
        assert_eq!(
            signature(
                b"It's a Secret to Everybody",
                1_700_000_000,
                br#"{"event":"DeploymentStart"}"#
            ),
            "sha256=56c33ea742fe748637d77004d5e1f5c15e46f7bae52eb3f8fc7b129e6dbfa2ef"
        );
    }

    #[test]
    fn instance_document_carries_the_host_and_the_counts() {
        let now: DateTime<Utc> = "2026-01-26T09:03:01Z".parse().unwrap();
        let doc = document(TriggerEvent::InstanceFailure, &record(), Some("web-2"), now);
        assert_eq!(
            doc,
            json!({
                "version": 1,
                "event": "InstanceFailure",
                "sent_at": "2026-01-26T09:03:01Z",
                "deployment_id": "d-20260126-0001",
                "application": "shop",
                "deployment_group": "production",
                "status": "Failed",
                "status_reason": "too many hosts failed",
                "revision": "s3://b/shop.tgz",
                "commit_sha": "4b825dc642cb6eb9a060e54bf8d69288fbee4904",
                "creator": "ana@build",
                "config_name": "OneAtATime",
                "created_at": "2026-01-26T09:00:00Z",
                "started_at": "2026-01-26T09:00:05Z",
                "ended_at": "2026-01-26T09:03:00Z",
                "hosts": {"total": 3, "Pending": 0, "Dispatched": 0, "Succeeded": 1,
                          "Failed": 1, "Skipped": 1},
                "instance": {"host_id": "web-2", "state": "Failed", "batch": 1,
                             "availability_zone": "eu-west-1a", "dispatched_at": null,
                             "ended_at": null, "error": "ApplicationStart: ScriptFailed"},
                "rollback_of": "d-20260125-0007",
                "rolled_back_by": null
            })
        );
    }

    #[test]
    fn deployment_document_has_no_instance_even_when_given_a_host() {
        let doc = document(
            TriggerEvent::DeploymentFailure,
            &record(),
            Some("web-2"),
            Utc::now(),
        );
        assert_eq!(doc["instance"], Value::Null);
        assert_eq!(doc["event"], "DeploymentFailure");
    }

    #[test]
    fn subject_is_short_printable_ascii() {
        let mut rec = record();
        assert_eq!(
            subject(TriggerEvent::InstanceStart, &rec, Some("web-1")),
            "pier InstanceStart: shop/production d-20260126-0001 web-1"
        );
        rec.application = format!("caf\u{e9}\n{}", "x".repeat(200));
        let s = subject(TriggerEvent::DeploymentStart, &rec, None);
        assert_eq!(s.chars().count(), SUBJECT_MAX);
        assert!(s.starts_with("pier DeploymentStart: caf??xxx"), "{s}");
    }

    /// The rollout driver may run `send` on a spawned task.
    #[test]
    fn send_is_a_send_future() {
        fn is_send<T: Send>(_: &T) {}
        let n = Notifier::new(&[], None).unwrap();
        let rec = record();
        is_send(&n.send(TriggerEvent::DeploymentStart, &rec, None));
    }

    #[test]
    fn delivery_ids_look_like_uuids() {
        let id = delivery_id();
        let parts: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{id}");
        assert_eq!(&id[14..15], "4", "{id}");
        assert_ne!(id, delivery_id());
    }

    #[test]
    fn missing_secrets_and_sns_client_are_named_at_once() {
        let targets = vec![
            Notification {
                target: NotificationTarget::Webhook(Webhook {
                    url: "https://example.com/hook".into(),
                    secret_env: "PIER_TEST_NOTIFY_UNSET_SECRET".into(),
                }),
                events: TriggerEvent::ALL.to_vec(),
            },
            Notification {
                target: NotificationTarget::Sns("arn:aws:sns:us-east-1:123456789012:t".into()),
                events: TriggerEvent::ALL.to_vec(),
            },
        ];
        let e = Notifier::new(&targets, None).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("notifications[0].webhook.secret_env")
                && text.contains("PIER_TEST_NOTIFY_UNSET_SECRET")
                && text.contains("notifications[1].sns_topic_arn"),
            "{text}"
        );
        assert_eq!(e.exit_code(), crate::EXIT_USAGE);

        let n = Notifier::new(&targets[..1], None);
        let e = n.unwrap_err();
        assert!(
            e.to_string()
                .starts_with("notifications[0].webhook.secret_env: the environment variable"),
            "{e}"
        );
        assert!(Notifier::new(&[], None).unwrap().is_empty());
    }
}
