//! The agent's own entry in the host registry: a [`RegistryEntry`] at
//! `hosts/{host_id}.json` in an [`ObjectStore`] (an S3 prefix for a fleet, the local status
//! directory on a spool host), which is how controllers learn which hosts exist, their tags
//! and zone, and whether they are alive.
//!
//! A [`Registrar`] is one of the daemon's parts. [`Registrar::run`] writes the entry as
//! `Running` at once and then refreshes `heartbeat_at` every interval (an unconditional put:
//! the entry is this host's alone); a failed write is logged and tried again at the next
//! tick, never fatal. [`Registrar::stopped`] writes `Stopped` on a clean shutdown, within a
//! bound, and from then on no heartbeat overwrites it. What the entry means to a controller
//! (healthy, stale, stopped) is `pier-protocol`'s [`RegistryEntry::health`]; choosing where
//! the store is belongs to the configuration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use pier_protocol::registry::{registry_key, HostState, RegistryEntry, REGISTRY_VERSION};
use pier_transport::store::{ObjectStore, Precondition};
use pier_transport::TransportError;

/// How long a clean shutdown waits for the `Stopped` write before it goes on without it.
pub const STOP_BOUND: Duration = Duration::from_secs(5);

/// What the agent says about itself in its entry.
#[derive(Debug, Clone, Default)]
pub struct Announcement {
    /// This host's id (the entry's key).
    pub host_id: String,
    /// `tags:` from the configuration.
    pub tags: BTreeMap<String, String>,
    /// The configured or IMDS-given availability zone.
    pub availability_zone: Option<String>,
    /// Where commands reach this host: the SQS queue URL or the spool directory.
    pub queue: Option<String>,
    /// `daemon.deployment_groups` from the configuration.
    pub deployment_groups: Vec<String>,
}

/// Writes this host's registry entry and keeps it fresh.
pub struct Registrar {
    store: Arc<dyn ObjectStore>,
    key: String,
    interval: Duration,
    stop_bound: Duration,
    /// The entry as last written (or about to be). The lock is held across each write, so
    /// writes never overtake one another and none follows the `Stopped` one.
    entry: tokio::sync::Mutex<RegistryEntry>,
}

impl Registrar {
    /// A registrar that announces `who` in `store` every `interval`; this run of the agent
    /// counts as started now.
    pub fn new(store: Arc<dyn ObjectStore>, who: Announcement, interval: Duration) -> Registrar {
        let now = Utc::now();
        let entry = RegistryEntry {
            version: REGISTRY_VERSION,
            host_id: who.host_id,
            tags: who.tags,
            availability_zone: who.availability_zone,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            queue: who.queue,
            deployment_groups: who.deployment_groups,
            started_at: now,
            heartbeat_at: now,
            // Whole seconds, at least one: a controller judges staleness in seconds.
            heartbeat_interval_seconds: interval.as_secs_f64().ceil().max(1.0) as u64,
            state: HostState::Running,
        };
        Registrar {
            store,
            key: registry_key(&entry.host_id),
            interval,
            stop_bound: STOP_BOUND,
            entry: tokio::sync::Mutex::new(entry),
        }
    }

    /// The same registrar with another bound on the `Stopped` write.
    pub fn with_stop_bound(mut self, bound: Duration) -> Registrar {
        self.stop_bound = bound;
        self
    }

    /// Where the entry is written, for messages: `s3://bucket/prefix/hosts/ID.json` or a path.
    pub fn describe(&self) -> String {
        let store = self.store.describe();
        format!("{}/{}", store.trim_end_matches('/'), self.key)
    }

    /// Writes the entry as `Running` with a fresh heartbeat, unless it was marked stopped.
    pub async fn heartbeat(&self) -> Result<(), TransportError> {
        let mut entry = self.entry.lock().await;
        if entry.state == HostState::Stopped {
            return Ok(());
        }
        entry.heartbeat_at = Utc::now();
        self.write(&entry).await
    }

    /// Announces the host now and refreshes the heartbeat every interval, for ever (the
    /// daemon drops this future when it stops). Failed writes are logged and retried at the
    /// next tick.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut announced = false;
        let mut failing = false;
        loop {
            tick.tick().await;
            match self.heartbeat().await {
                Ok(()) => {
                    if !announced {
                        log::info!("registered as {}", self.describe());
                        announced = true;
                    } else if failing {
                        log::info!("registry heartbeat to {} works again", self.describe());
                    }
                    failing = false;
                }
                Err(e) => {
                    log::warn!(
                        "registry heartbeat to {} failed: {e}; trying again in {}s",
                        self.describe(),
                        self.interval.as_secs()
                    );
                    failing = true;
                }
            }
        }
    }

    /// Marks the host `Stopped` (a clean shutdown). Waits at most the stop bound; a failure
    /// is logged, and the entry then goes stale instead.
    pub async fn stopped(&self) {
        let write = async {
            let mut entry = self.entry.lock().await;
            entry.state = HostState::Stopped;
            entry.heartbeat_at = Utc::now();
            self.write(&entry).await
        };
        match tokio::time::timeout(self.stop_bound, write).await {
            Ok(Ok(())) => log::info!("registry: marked stopped in {}", self.describe()),
            Ok(Err(e)) => log::warn!(
                "registry: cannot mark {} stopped: {e}; it will show as stale",
                self.describe()
            ),
            Err(_) => log::warn!(
                "registry: marking {} stopped took over {}s; giving up, it will show as stale",
                self.describe(),
                self.stop_bound.as_secs()
            ),
        }
    }

    async fn write(&self, entry: &RegistryEntry) -> Result<(), TransportError> {
        self.store
            .put(&self.key, entry.to_json(), Precondition::None)
            .await
            .map(|_| ())
    }
}
