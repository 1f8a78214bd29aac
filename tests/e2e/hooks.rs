//! hooks end-to-end tests.
