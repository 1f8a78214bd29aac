//! Watching a rollout's health from outside the hosts: CloudWatch alarms (a fleet on AWS)
//! and an HTTP health check (an on-premises fleet without CloudWatch).
//!
//! The rollout driver asks [`HealthWatch::check`] between batches and while hosts deploy; an
//! answer of `Some(reason)` stops the rollout (and rolls it back when the group says so). An
//! alarm counts as soon as it is in `ALARM`; the health URL counts after at least
//! [`URL_FAILURES`] failed checks in a row (a non-2xx answer, a timeout, a refused
//! connection) spanning the group's `health_grace_seconds`, so one dropped request, or a
//! service restarting for a moment, does not roll a fleet back. A CloudWatch call that
//! fails is reported and retried at the next check, never taken as an alarm.

use std::time::Duration;

use aws_sdk_cloudwatch::types::StateValue;
use pier_transport::aws::AwsClients;

use super::ControllerError;

/// Failed health-URL checks in a row that count as unhealthy.
pub(crate) const URL_FAILURES: u32 = 3;

/// The alarms and health URL of one rollout.
pub(crate) struct HealthWatch {
    alarms: Option<(aws_sdk_cloudwatch::Client, Vec<String>)>,
    url: Option<(reqwest::Client, String)>,
    url_failures: u32,
    first_failure: Option<tokio::time::Instant>,
    grace: Duration,
    every: Duration,
    last: Option<tokio::time::Instant>,
}

impl HealthWatch {
    /// A watch over `alarms` and `health_url`, checked at most every `every`; `None` when
    /// there is nothing to watch.
    pub(crate) fn new(
        alarms: &[String],
        health_url: Option<&str>,
        grace: Duration,
        aws: Option<&AwsClients>,
        every: Duration,
    ) -> Result<Option<HealthWatch>, ControllerError> {
        if alarms.is_empty() && health_url.is_none() {
            return Ok(None);
        }
        let alarms = if alarms.is_empty() {
            None
        } else {
            let aws = aws.ok_or_else(|| {
                ControllerError::usage(
                    "alarms",
                    "watching CloudWatch alarms needs AWS access (--region, --endpoint-url, \
                     credentials)",
                )
            })?;
            Some((
                aws_sdk_cloudwatch::Client::new(&aws.config),
                alarms.to_vec(),
            ))
        };
        let url = match health_url {
            None => None,
            Some(u) => {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| ControllerError::usage("health_url", e.to_string()))?;
                Some((client, u.to_string()))
            }
        };
        Ok(Some(HealthWatch {
            alarms,
            url,
            url_failures: 0,
            first_failure: None,
            grace,
            every,
            last: None,
        }))
    }

    /// Checks when a check is due; `Some(why)` when the fleet is unhealthy.
    pub(crate) async fn check(&mut self) -> Option<String> {
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            return None;
        }
        self.last = Some(tokio::time::Instant::now());
        if let Some((cw, names)) = &self.alarms {
            match cw
                .describe_alarms()
                .set_alarm_names(Some(names.clone()))
                .send()
                .await
            {
                Ok(out) => {
                    let firing: Vec<&str> = out
                        .metric_alarms()
                        .iter()
                        .filter(|a| a.state_value() == Some(&StateValue::Alarm))
                        .filter_map(|a| a.alarm_name())
                        .chain(
                            out.composite_alarms()
                                .iter()
                                .filter(|a| a.state_value() == Some(&StateValue::Alarm))
                                .filter_map(|a| a.alarm_name()),
                        )
                        .collect();
                    if !firing.is_empty() {
                        return Some(format!("CloudWatch alarm {} in ALARM", firing.join(", ")));
                    }
                }
                Err(e) => eprintln!(
                    "cannot read CloudWatch alarms ({}); checking again shortly",
                    aws_sdk_cloudwatch::error::DisplayErrorContext(&e)
                ),
            }
        }
        if let Some((client, url)) = &self.url {
            let failure = match client.get(url.as_str()).send().await {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("answered {}", r.status())),
                Err(e) => Some(e.to_string()),
            };
            match failure {
                None => {
                    self.url_failures = 0;
                    self.first_failure = None;
                }
                Some(why) => {
                    self.url_failures += 1;
                    let since = *self
                        .first_failure
                        .get_or_insert_with(tokio::time::Instant::now);
                    eprintln!(
                        "health check {url} failed ({why}), {} in a row over {} s",
                        self.url_failures,
                        since.elapsed().as_secs()
                    );
                    if self.url_failures >= URL_FAILURES && since.elapsed() >= self.grace {
                        return Some(format!(
                            "health check {url} failed {} times in a row over {} s (last: {why})",
                            self.url_failures,
                            since.elapsed().as_secs()
                        ));
                    }
                }
            }
        }
        None
    }
}
