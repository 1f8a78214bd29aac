//! transport (not yet written).
