//! Unit tests of the AppSpec model; the located messages are tested end to end in
//! tests/e2e/validate.rs.
