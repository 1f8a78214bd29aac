//! daemon end-to-end tests.
