//! Fetching revisions (not yet written).
