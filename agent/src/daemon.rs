//! daemon (not yet written).
