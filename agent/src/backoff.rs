//! backoff (not yet written).
