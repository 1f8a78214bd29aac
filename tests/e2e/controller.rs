//! controller end-to-end tests.
