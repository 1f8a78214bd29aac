//! deploy (not yet written).
