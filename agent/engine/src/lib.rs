//! pier's host engine: one deployment on this host, from a bundle to a status.
//!
//! Data moves one way: [`deploy::Engine`] takes a [`deploy::Request`], gets the revision
//! ([`bundle`]: fetched through the caller's [`bundle::RevisionFetcher`], verified, unpacked
//! safely), reads its [`appspec`], runs the lifecycle: [`install`] places the files and
//! [`hooks`] run the scripts, while [`state`] keeps the journal, the locks and retention on
//! disk, and [`tool`] runs the host tools they need within a time limit. It knows nothing of AWS, queues or the controller: the agent builds it from its
//! configuration ([`settings::EngineSettings`]) and hands it commands.

pub mod appspec;
pub(crate) mod buffer;
pub mod bundle;
pub mod deploy;
pub mod hooks;
pub mod install;
pub(crate) mod parallel;
pub mod settings;
pub mod state;
pub(crate) mod tool;
