//! Revision bundles: fetch (S3, HTTP(S), GitHub, local) → verify → unpack safely.
//! Knows nothing of AppSpec semantics.

pub mod fetch;
pub mod unpack;
