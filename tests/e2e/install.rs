//! install end-to-end tests.
