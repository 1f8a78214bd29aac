//! The agent library tests' fixture: the shared test kit (scratch directories, moto clients
//! and buckets, counted skips).
#![allow(unused_imports)]

pub use pier_testkit::*;
