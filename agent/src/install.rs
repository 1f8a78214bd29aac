//! install (not yet written).
