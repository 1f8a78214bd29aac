//! pier-agent's library tests: revision fetching (S3 on a moto server on 127.0.0.1, the one
//! `AWS_ENDPOINT_URL` names, else one this process starts through `scripts/services.sh`;
//! HTTP from a small server in the test), deduplication on disk, and the daemon driven
//! in-process from its parts (`serve`). The `pier-agent`
//! binary itself is tested in `tests/e2e`.

mod support;

mod dedupe;
mod fetch;
mod serve;
