//! pier-controller's integration tests, against real services: webhooks on a small HTTP
//! server in the test process (127.0.0.1), SNS and SQS from a moto server (the one
//! `AWS_ENDPOINT_URL` names, else one this test process starts through `scripts/services.sh`
//! and that stops when the process ends); and the `pier` binary's parse-only mode.

mod notify;
mod parse_only;
