//! `pier hosts`: the fleet as the agents announced it. Each agent keeps one
//! [`RegistryEntry`] at `hosts/{host_id}.json` in the status store (an S3 bucket and prefix,
//! or the spool host's status directory); this module reads them all ([`load_registry`], also
//! what target selection builds on) and prints them with their health at this moment
//! (healthy, stale, stopped: [`RegistryEntry::health`] decides, not this module).
//!
//! An entry that cannot be parsed, or that sits under another host's key, is reported by name
//! and skipped: one broken object must not hide the rest of the fleet. A store that cannot be
//! read at all is an error.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::Serialize;

use super::status::{describe_sink, SinkOptions};
use super::{AwsOptions, ControllerError};
use pier_protocol::quote::bounded;
use pier_protocol::registry::{host_of_key, HostHealth, RegistryEntry, REGISTRY_PREFIX};
use pier_protocol::StatusSinkSpec;
use pier_transport::store::ObjectStore;

/// How many entries are read at once (S3 GETs in flight).
const READ_CONCURRENCY: usize = 16;

/// The widest a host-supplied value (a tag, the queue) is shown in the text table.
const MAX_CELL_CHARS: usize = 80;

/// How `pier hosts` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// An aligned table, stale hosts in capitals, and a summary line.
    #[default]
    Text,
    /// A JSON array: each entry plus `health` and `heartbeat_age_seconds`.
    Json,
}

/// What `pier hosts` was asked.
#[derive(Debug, Clone, Default)]
pub struct HostsOptions {
    /// Where the registry is (the status store's flags).
    pub sink: SinkOptions,
    /// Output format.
    pub format: Format,
    /// Only the hosts this stored deployment group selects.
    pub deployment_group: Option<String>,
    /// How to reach S3.
    pub aws: AwsOptions,
}

/// An object under `hosts/` that is not a usable entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// The store key, e.g. `hosts/web-1.json`.
    pub key: String,
    /// Why it was skipped.
    pub reason: String,
}

/// Everything under `hosts/`: the entries, sorted by host id, and what was skipped.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    pub entries: Vec<RegistryEntry>,
    pub unreadable: Vec<Unreadable>,
}

/// Reads every registry entry in `store`, sorted by host id. Unreadable entries are logged
/// (by key, with the reason) and skipped; a store that cannot be listed or read fails.
pub async fn load_registry(store: &dyn ObjectStore) -> Result<Vec<RegistryEntry>, ControllerError> {
    let registry = read_registry(store).await?;
    for u in &registry.unreadable {
        log::warn!(
            "skipping registry entry {} in {}: {}",
            u.key,
            store.describe(),
            u.reason
        );
    }
    Ok(registry.entries)
}

/// [`load_registry`], handing the skipped entries to the caller instead of the log.
pub async fn read_registry(store: &dyn ObjectStore) -> Result<Registry, ControllerError> {
    let keys = store.list(REGISTRY_PREFIX, None, None).await.map_err(|e| {
        ControllerError::transport(
            format!("cannot list {REGISTRY_PREFIX} in {}", store.describe()),
            e,
        )
    })?;
    let read: Vec<(String, Option<Vec<u8>>)> = stream::iter(keys)
        .map(|key| async move {
            let got = store.get(&key).await.map_err(|e| {
                ControllerError::transport(format!("cannot read registry entry {key}"), e)
            })?;
            Ok::<_, ControllerError>((key, got.map(|v| v.bytes)))
        })
        .buffered(READ_CONCURRENCY)
        .try_collect()
        .await?;
    let mut registry = Registry::default();
    for (key, bytes) in read {
        // Deleted between the listing and the read: the host is gone, nothing to report.
        let Some(bytes) = bytes else { continue };
        match parse_entry(&key, &bytes) {
            Ok(entry) => registry.entries.push(entry),
            Err(reason) => registry.unreadable.push(Unreadable { key, reason }),
        }
    }
    registry.entries.sort_by(|a, b| a.host_id.cmp(&b.host_id));
    Ok(registry)
}

/// One stored entry, checked against the key it was found under (an entry copied to another
/// host's key would otherwise make one host appear twice).
fn parse_entry(key: &str, bytes: &[u8]) -> Result<RegistryEntry, String> {
    let Some(host) = host_of_key(key) else {
        return Err("not a registry key (hosts/HOST_ID.json)".to_string());
    };
    let entry = RegistryEntry::from_json(bytes).map_err(|e| e.to_string())?;
    if entry.host_id != host {
        return Err(format!(
            "it names host {}, not {}",
            pier_protocol::quote::quote(&entry.host_id),
            pier_protocol::quote::quote(host)
        ));
    }
    Ok(entry)
}

/// One host as `--format json` prints it.
#[derive(Debug, Serialize)]
struct HostView<'a> {
    #[serde(flatten)]
    entry: &'a RegistryEntry,
    health: HostHealth,
    /// Seconds since the last heartbeat (0 if the host's clock is ahead of ours).
    heartbeat_age_seconds: i64,
}

/// Prints the registry on stdout. Returns the exit code: 0, also when some entries were
/// skipped (they are named on stderr) or the registry is empty (said on stderr).
pub async fn hosts(opts: &HostsOptions) -> Result<i32, ControllerError> {
    let spec = opts.sink.spec(true)?;
    let store = open_store(&spec, &opts.aws).await?;
    let registry = read_registry(&*store).await?;
    for u in &registry.unreadable {
        eprintln!("pier: skipping registry entry {}: {}", u.key, u.reason);
    }
    let mut entries = registry.entries;
    if let Some(name) = &opts.deployment_group {
        let def = super::fleet::load_group(&*store, name)
            .await?
            .ok_or_else(|| {
                ControllerError::usage(
                    "--deployment-group",
                    format!("no group `{name}` in {}", describe_sink(&spec)),
                )
            })?;
        let chosen = super::group::select_hosts(&def, &entries);
        entries.retain(|e| chosen.contains(&e.host_id));
        for h in chosen
            .iter()
            .filter(|h| !entries.iter().any(|e| &e.host_id == *h))
        {
            eprintln!("pier: host {h} of group {name} is not registered");
        }
    }
    if entries.is_empty() {
        eprintln!(
            "pier: no hosts registered in {}; agents announce themselves in their registry \
             store (agent.yml `registry:`), check the --status-* flags",
            describe_sink(&spec)
        );
    }
    let now = Utc::now();
    match opts.format {
        Format::Text => print!("{}", render(&entries, now)),
        Format::Json => println!("{}", to_json(&entries, now)),
    }
    Ok(0)
}

/// Opens the store the registry lives in; AWS clients are built only for S3.
async fn open_store(
    spec: &StatusSinkSpec,
    aws: &AwsOptions,
) -> Result<Box<dyn ObjectStore>, ControllerError> {
    let clients = match spec {
        StatusSinkSpec::S3 { .. } => Some(aws.clients().await?),
        StatusSinkSpec::Local { .. } => None,
    };
    pier_transport::open_store(spec, clients.as_ref())
        .map_err(|e| ControllerError::transport("cannot open the registry store", e))
}

/// The `--format json` document: an array of entries with their health now.
pub(crate) fn to_json(entries: &[RegistryEntry], now: DateTime<Utc>) -> String {
    let views: Vec<HostView> = entries
        .iter()
        .map(|entry| HostView {
            entry,
            health: entry.health(now),
            heartbeat_age_seconds: age_seconds(entry, now),
        })
        .collect();
    serde_json::to_string_pretty(&views).expect("registry entries always serialise")
}

fn age_seconds(entry: &RegistryEntry, now: DateTime<Utc>) -> i64 {
    (now - entry.heartbeat_at).num_seconds().max(0)
}

/// The text table: one row per host, stale hosts' health in capitals, then a summary.
pub(crate) fn render(entries: &[RegistryEntry], now: DateTime<Utc>) -> String {
    const COLUMNS: [&str; 7] = [
        "HOST",
        "HEALTH",
        "HEARTBEAT",
        "ZONE",
        "TAGS",
        "VERSION",
        "QUEUE",
    ];
    let mut table = vec![COLUMNS.map(str::to_string)];
    let (mut healthy, mut stale, mut stopped) = (0, 0, 0);
    for e in entries {
        let health = match e.health(now) {
            HostHealth::Healthy => {
                healthy += 1;
                "healthy"
            }
            HostHealth::Stale => {
                stale += 1;
                "STALE"
            }
            HostHealth::Stopped => {
                stopped += 1;
                "stopped"
            }
        };
        let tags = e
            .tags
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let cell = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                bounded(s, MAX_CELL_CHARS)
            }
        };
        table.push([
            cell(&e.host_id),
            health.to_string(),
            format!("{} ago", age(age_seconds(e, now))),
            cell(e.availability_zone.as_deref().unwrap_or("")),
            cell(&tags),
            cell(&e.agent_version),
            cell(e.queue.as_deref().unwrap_or("")),
        ]);
    }
    let mut out = super::aligned(&table);
    let _ = write!(
        out,
        "{} host(s): {healthy} healthy, {stale} stale, {stopped} stopped",
        entries.len()
    );
    if stale > 0 {
        out.push_str(
            " (STALE: no heartbeat for three intervals; the agent may be down or cut off)",
        );
    }
    out.push('\n');
    out
}

/// `42s`, `5m03s`, `2h04m`, `3d02h`.
fn age(secs: i64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pier_protocol::registry::{registry_key, HostState, REGISTRY_VERSION};
    use pier_transport::store::{DirStore, Precondition};

    fn entry(host: &str, age_secs: i64, state: HostState, now: DateTime<Utc>) -> RegistryEntry {
        RegistryEntry {
            version: REGISTRY_VERSION,
            host_id: host.into(),
            tags: [("role".to_string(), "web".to_string())].into(),
            availability_zone: Some("us-east-1a".into()),
            agent_version: "0.1.0".into(),
            queue: Some("/var/lib/pier/spool".into()),
            deployment_groups: vec![],
            started_at: now - chrono::Duration::hours(1),
            heartbeat_at: now - chrono::Duration::seconds(age_secs),
            heartbeat_interval_seconds: 60,
            state,
        }
    }

    #[test]
    fn the_table_marks_stale_hosts_and_counts_them() {
        let now = Utc::now();
        let out = render(
            &[
                entry("a", 5, HostState::Running, now),
                entry("b", 600, HostState::Running, now),
                entry("c", 3700, HostState::Stopped, now),
            ],
            now,
        );
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("HOST  HEALTH   HEARTBEAT"), "{out}");
        assert!(lines[1].starts_with("a     healthy  5s ago"), "{out}");
        assert!(lines[2].starts_with("b     STALE    10m00s ago"), "{out}");
        assert!(lines[3].starts_with("c     stopped  1h01m ago"), "{out}");
        assert!(
            lines[1].contains("us-east-1a  role=web  0.1.0    /var/lib/pier/spool"),
            "{out}"
        );
        assert!(
            lines[4].starts_with("3 host(s): 1 healthy, 1 stale, 1 stopped (STALE"),
            "{out}"
        );
    }

    #[test]
    fn json_is_the_entry_with_health_and_age() {
        let now = Utc::now();
        let v: serde_json::Value =
            serde_json::from_str(&to_json(&[entry("a", 200, HostState::Running, now)], now))
                .unwrap();
        assert_eq!(v[0]["host_id"], "a");
        assert_eq!(v[0]["health"], "Stale");
        assert_eq!(v[0]["heartbeat_age_seconds"], 200);
        assert_eq!(v[0]["tags"]["role"], "web");
        assert_eq!(v[0]["state"], "Running");
    }

    #[tokio::test]
    async fn unreadable_and_misplaced_entries_are_named_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path());
        let now = Utc::now();
        for (key, bytes) in [
            (
                registry_key("b"),
                entry("b", 1, HostState::Running, now).to_json(),
            ),
            (
                registry_key("a"),
                entry("a", 1, HostState::Running, now).to_json(),
            ),
            (
                registry_key("x"),
                entry("a", 1, HostState::Running, now).to_json(),
            ),
            (registry_key("broken"), b"{not json".to_vec()),
            ("hosts/notes.txt".to_string(), b"hello".to_vec()),
        ] {
            store.put(&key, bytes, Precondition::None).await.unwrap();
        }
        let r = read_registry(&store).await.unwrap();
        let ids: Vec<&str> = r.entries.iter().map(|e| e.host_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        let keys: Vec<&str> = r.unreadable.iter().map(|u| u.key.as_str()).collect();
        assert_eq!(
            keys,
            ["hosts/broken.json", "hosts/notes.txt", "hosts/x.json"]
        );
        assert!(
            r.unreadable[2].reason.contains("names host \"a\""),
            "{:?}",
            r.unreadable
        );
        assert_eq!(load_registry(&store).await.unwrap().len(), 2);

        let empty = DirStore::new(dir.path().join("nothing-here"));
        assert!(load_registry(&empty).await.unwrap().is_empty());
    }
}
