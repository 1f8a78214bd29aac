//! The host registry: each agent announces itself as one [`RegistryEntry`] stored at
//! `{store}/hosts/{host_id}.json` (an S3 prefix for a fleet, a directory on a single host),
//! refreshed every heartbeat interval and marked [`HostState::Stopped`] on a clean shutdown.
//! The controller lists these entries to find a deployment group's hosts and to tell live
//! hosts from stale ones.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ProtocolError;

/// The registry entry version this agent writes and the controller reads.
pub const REGISTRY_VERSION: u32 = 1;

/// The key prefix under which every registry entry lives (list it to find the hosts).
pub const REGISTRY_PREFIX: &str = "hosts/";

/// The store key of `host_id`'s entry: `hosts/{host_id}.json`.
pub fn registry_key(host_id: &str) -> String {
    format!("{REGISTRY_PREFIX}{host_id}.json")
}

/// The host id a registry key names (`hosts/web-1.json` → `web-1`), `None` for any other key.
pub fn host_of_key(key: &str) -> Option<&str> {
    key.strip_prefix(REGISTRY_PREFIX)?
        .strip_suffix(".json")
        .filter(|h| !h.is_empty() && !h.contains('/'))
}

/// Whether the agent is running, as it last said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostState {
    /// Polling its queue; the heartbeat is refreshed every `heartbeat_interval_seconds`.
    Running,
    /// Shut down cleanly; it takes no deployments until it starts again.
    Stopped,
}

/// One host as its agent described itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryEntry {
    /// Always [`REGISTRY_VERSION`].
    pub version: u32,
    /// The host id (EC2 instance id, configured id, or machine id).
    pub host_id: String,
    /// `key=value` tags from the agent's configuration, matched by deployment groups.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Availability zone (from IMDS on EC2, else the configuration), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    /// The agent's version.
    pub agent_version: String,
    /// Where commands reach this host: an SQS queue URL or a spool directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The deployment groups the agent is limited to (empty: any).
    #[serde(default)]
    pub deployment_groups: Vec<String>,
    /// When this run of the agent started.
    pub started_at: DateTime<Utc>,
    /// When the entry was last written.
    pub heartbeat_at: DateTime<Utc>,
    /// How often the agent refreshes the entry; the controller calls a host stale after three
    /// intervals without a heartbeat.
    pub heartbeat_interval_seconds: u64,
    /// Running, or stopped cleanly.
    pub state: HostState,
}

/// How a controller sees a host at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostHealth {
    /// Running, heartbeat within three intervals.
    Healthy,
    /// Running by its last word, but no heartbeat for three intervals or more.
    Stale,
    /// Shut down cleanly.
    Stopped,
}

impl RegistryEntry {
    /// Parses a stored entry, naming the field at fault.
    pub fn from_json(bytes: &[u8]) -> Result<RegistryEntry, ProtocolError> {
        let entry: RegistryEntry = crate::parse_versioned(bytes, REGISTRY_VERSION)?;
        crate::check_id_field("host_id", &entry.host_id)?;
        Ok(entry)
    }

    /// The stored form.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a registry entry always serialises")
    }

    /// Health at `now`: stale after three heartbeat intervals (at least 30 s) of silence.
    pub fn health(&self, now: DateTime<Utc>) -> HostHealth {
        if self.state == HostState::Stopped {
            return HostHealth::Stopped;
        }
        let limit = (self.heartbeat_interval_seconds.max(10) * 3) as i64;
        if (now - self.heartbeat_at).num_seconds() > limit {
            HostHealth::Stale
        } else {
            HostHealth::Healthy
        }
    }
}
