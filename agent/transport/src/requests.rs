//! Counting the requests this process makes to its queues and stores, by operation, so that
//! what a command costs (how many S3 and SQS calls a rollout makes per host) can be measured
//! rather than guessed (`scripts/fleet-bench`, `PIER_REQUEST_STATS=1 pier deploy ...`).
//!
//! One tally per process, always on, fed at the lowest layer of each backend:
//!
//! - **AWS** (S3, SQS): an SDK interceptor, [`CountRequests`], on every client
//!   [`crate::aws::aws_clients`] builds. It counts each HTTP attempt (a retried call counts
//!   once per attempt, as AWS bills it) under the SDK's operation name: `GetObject`,
//!   `PutObject`, `ListObjectsV2`, `SendMessage`, `ReceiveMessage`, `DeleteMessage`, ...
//! - **Local directories** (the single-host spool, where there are no requests): each file
//!   operation of a store, status sink or spool counts as one request, named for the backend
//!   and what it did: `DirStore.Get`, `LocalStatus.Read`, `Spool.Submit`, ...
//!
//! Counting costs one uncontended lock per request, nothing next to a network round trip or
//! a file write. Clients of other services (CloudWatch, SNS) are not counted.

use std::collections::BTreeMap;
use std::sync::Mutex;

use aws_sdk_s3::config::ConfigBag;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;

/// Requests made so far by this process, by operation.
static COUNTS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Counts one request of `operation`.
pub fn record(operation: &str) {
    let mut counts = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
    match counts.get_mut(operation) {
        Some(n) => *n += 1,
        None => {
            counts.insert(operation.to_string(), 1);
        }
    }
}

/// The requests this process has made so far, by operation.
pub fn counts() -> BTreeMap<String, u64> {
    COUNTS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// One line for a person or a script: `requests: total=N Op=n Op=n ...` (operations sorted).
pub fn summary() -> String {
    let counts = counts();
    let total: u64 = counts.values().sum();
    let mut line = format!("requests: total={total}");
    for (op, n) in &counts {
        line.push_str(&format!(" {op}={n}"));
    }
    line
}

/// The SDK interceptor that feeds [`record`] with each attempt's operation name.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountRequests;

impl Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "pier.CountRequests"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        record(cfg.load::<Metadata>().map_or("Unknown", |m| m.name()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_by_operation() {
        let before = counts();
        record("Test.Op");
        record("Test.Op");
        record("Test.Other");
        let after = counts();
        let grew = |op: &str| after.get(op).unwrap_or(&0) - before.get(op).unwrap_or(&0);
        assert_eq!(grew("Test.Op"), 2);
        assert_eq!(grew("Test.Other"), 1);
        assert!(summary().contains(" Test.Op="));
    }
}
