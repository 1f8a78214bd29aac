//! Revision bundles: fetch (through the caller's [`fetch::RevisionFetcher`]) → verify →
//! unpack safely. Knows nothing of AppSpec semantics.

pub(crate) mod fetch;
pub mod tar_stream;
pub mod unpack;

pub use fetch::{FetchError, FetchProgress, Fetched, ProgressFn, RevisionFetcher};
