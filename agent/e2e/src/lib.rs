//! Nothing here: this package only holds the end-to-end test binary (`tests/e2e`).
