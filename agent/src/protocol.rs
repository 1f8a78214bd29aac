//! protocol (not yet written).
