//! Revision bundles: fetch (through the caller's [`fetch::RevisionFetcher`]) → verify →
//! unpack safely, and the one way to read what was unpacked ([`confined`]: beneath the root,
//! never through a link out). Knows nothing of AppSpec semantics.

pub mod confined;
pub(crate) mod fetch;
pub mod tar_stream;
pub mod unpack;

pub use confined::{Confined, ConfinedError};
pub use fetch::{FetchError, FetchProgress, Fetched, ProgressFn, RevisionFetcher};
