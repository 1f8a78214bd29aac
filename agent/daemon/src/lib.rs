//! `pier-agent`: the host agent. It reads its configuration ([`config`]), builds the engine
//! and the transports from it, and runs the daemon's poll loop ([`daemon`]); `deploy-local`
//! ([`deploy_local`]) and `validate` ([`validate`]) are its one-shot commands. Revisions are
//! fetched by [`fetch::Fetcher`] (S3, HTTP(S), GitHub, local), deployments already taken are
//! remembered by [`dedupe`]; the agent announces itself in the host registry through
//! [`registry`]. It links no controller code.

pub mod config;
pub mod daemon;
pub mod dedupe;
pub mod deploy_local;
pub mod fetch;
pub mod registry;
pub mod validate;
