//! The engine tests' fixture: the shared test kit (scratch directories, real users, counted
//! skips).
#![allow(unused_imports)]

pub use pier_testkit::*;
