//! validate end-to-end tests.
