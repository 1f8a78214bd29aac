//! pier-transport's integration tests: the queue transports and status sinks against real
//! services: SQS and S3 from a moto server on 127.0.0.1 (the one `AWS_ENDPOINT_URL` names,
//! else one this test process starts through `scripts/services.sh` and that stops when the
//! process ends), and spool directories on disk.

mod support;

mod spool;
mod sqs;
mod status;
mod store;
