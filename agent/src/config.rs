//! config (not yet written).
