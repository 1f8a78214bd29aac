//! state (not yet written).
