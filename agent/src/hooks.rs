//! hooks (not yet written).
