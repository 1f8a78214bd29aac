//! bundle end-to-end tests.
