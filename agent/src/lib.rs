//! pier: an on-host deployment agent for Linux in the style of AWS CodeDeploy, with an open
//! control plane.
//!
//! Data moves one way: command → [`deploy`] → [`bundle`] → [`appspec`] → [`install`] /
//! [`hooks`] → status. The two binaries (`pier-agent`, `pier`) only parse arguments, build
//! these parts and wait.
#![deny(unsafe_code)]

pub mod appspec;
pub mod backoff;
pub mod bundle;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod deploy;
pub mod hooks;
pub mod install;
pub mod logging;
pub mod protocol;
pub mod state;
pub mod transport;
pub mod validate;
