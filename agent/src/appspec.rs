//! appspec (not yet written).
