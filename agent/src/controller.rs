//! controller (not yet written).
