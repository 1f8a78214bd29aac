//! Safe unpacking of bundles (not yet written).
