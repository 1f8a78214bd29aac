//! The deployment index: one empty object per deployment under `index/deployments/`, whose
//! key alone says what a list of deployments needs to order and filter it, so the dashboard's
//! list reads one page of keys and the records it shows, never the whole history.
//!
//! A key is `index/deployments/{R}~{ID}~{APP}~{GROUP}`: `R` is 9,999,999,999,999 minus the
//! creation time in milliseconds, 13 digits, so that the store's ascending key order is newest
//! first; `APP` and `GROUP` are percent-encoded (anything outside `A-Z a-z 0-9 . _ -`).
//! Everything in a key is fixed when the deployment is created, so an entry is written once
//! and never changed: several controllers creating deployments at once each write their own
//! key (`Precondition::Absent`) and cannot conflict, and there is no shared object to update.
//! What changes (status, times, links) stays in the record, the one truth the page reads.
//!
//! Entries are written by whoever creates a deployment: [`crate::rollout`] for stored groups
//! and rollbacks, [`crate::deploy`] for `--hosts` deployments (which have no record, only the
//! hosts' status records). Deployments created before the index existed, or by a controller
//! that does not write it, are found by [`backfill`], which the dashboard runs at start and
//! then now and again: it lists `deployments/` and adds the entries that are missing.

use std::collections::HashSet;

use chrono::{DateTime, TimeZone, Utc};
use futures::stream::{self, StreamExt};

use pier_protocol::record::DeploymentRecord;
use pier_protocol::StatusRecord;
use pier_transport::store::{ObjectStore, Precondition};

use super::ControllerError;

/// Where the entries are.
pub const INDEX_PREFIX: &str = "index/deployments/";

/// The largest millisecond time a key can hold (year 2286).
const MAX_MS: i64 = 9_999_999_999_999;

/// One deployment as its index key tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The store key (the position in the list, and the cursor for the next page).
    pub key: String,
    /// The deployment id.
    pub deployment_id: String,
    /// When it was created (to the millisecond).
    pub created_at: DateTime<Utc>,
    /// Its application (`-` when unknown).
    pub application: String,
    /// Its deployment group (`-` when unknown).
    pub deployment_group: String,
}

/// The key of a deployment's entry.
pub fn key(
    deployment_id: &str,
    created_at: DateTime<Utc>,
    application: &str,
    deployment_group: &str,
) -> String {
    let inverted = (MAX_MS - created_at.timestamp_millis()).clamp(0, MAX_MS);
    format!(
        "{INDEX_PREFIX}{inverted:013}~{deployment_id}~{}~{}",
        encode(application),
        encode(deployment_group)
    )
}

/// Reads a key back; `None` for anything that is not an entry's key.
pub fn parse(key: &str) -> Option<Entry> {
    let rest = key.strip_prefix(INDEX_PREFIX)?;
    let mut parts = rest.split('~');
    let (inv, id, app, group) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || inv.len() != 13 || !pier_protocol::is_valid_id(id) {
        return None;
    }
    let ms = MAX_MS - inv.parse::<i64>().ok()?;
    Some(Entry {
        key: key.to_string(),
        deployment_id: id.to_string(),
        created_at: Utc.timestamp_millis_opt(ms).single()?,
        application: decode(app)?,
        deployment_group: decode(group)?,
    })
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Writes the entry of a deployment. Never changes an existing one.
pub async fn add(
    store: &dyn ObjectStore,
    deployment_id: &str,
    created_at: DateTime<Utc>,
    application: &str,
    deployment_group: &str,
) -> Result<(), ControllerError> {
    let k = key(deployment_id, created_at, application, deployment_group);
    store
        .put(&k, Vec::new(), Precondition::Absent)
        .await
        .map(|_| ())
        .map_err(|e| ControllerError::transport("cannot write the deployment index", e))
}

/// [`add`] for a new record. A failure is logged, not returned: the deployment matters more
/// than its place in the dashboard's list, and [`backfill`] adds a missing entry later.
pub(crate) async fn add_record(store: &dyn ObjectStore, record: &DeploymentRecord) {
    if let Err(e) = add(
        store,
        &record.deployment_id,
        record.created_at,
        &record.application,
        &record.deployment_group,
    )
    .await
    {
        log::warn!("deployment {}: {e}", record.deployment_id);
    }
}

/// One page of entries, newest first, starting after the entry `after` (a key from a previous
/// page) and keeping those `keep` accepts: at most `limit` of them, plus whether more follow.
/// Without a filter this is one listing of `limit + 1` keys; with one, keys are listed in
/// growing batches (keys only, no records read) until the page is full.
pub async fn page(
    store: &dyn ObjectStore,
    after: Option<&str>,
    limit: usize,
    keep: impl Fn(&Entry) -> bool,
    filtered: bool,
) -> Result<(Vec<Entry>, bool), ControllerError> {
    // A filtered page starts with a few pages' worth of keys and asks for more each time the
    // filter leaves it short: a common application fills it from the first listing, a rare
    // one soon lists a thousand at a time.
    let mut chunk = limit.saturating_add(1).min(LIST_CHUNK);
    if filtered {
        chunk = chunk.saturating_mul(4).min(LIST_CHUNK);
    }
    let mut cursor = after.map(str::to_string);
    let mut out = Vec::new();
    loop {
        let keys = store
            .list(INDEX_PREFIX, cursor.as_deref(), Some(chunk))
            .await
            .map_err(|e| ControllerError::transport("cannot list the deployment index", e))?;
        let listed = keys.len();
        for k in keys {
            let entry = parse(&k);
            cursor = Some(k);
            let Some(entry) = entry.filter(|e| keep(e)) else {
                continue;
            };
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(entry);
        }
        if listed < chunk {
            return Ok((out, false));
        }
        chunk = chunk.saturating_mul(4).min(LIST_CHUNK);
    }
}

/// Keys asked for at once when a page must skip entries (S3 returns at most 1,000).
const LIST_CHUNK: usize = 1000;

/// The entry of `deployment_id`, known to have been created at or before `not_after` (a
/// `--hosts` deployment is indexed before its commands are sent, so before any host
/// reports): one listing from that time back, `None` if it is not among the first hundred.
pub async fn find(
    store: &dyn ObjectStore,
    deployment_id: &str,
    not_after: DateTime<Utc>,
) -> Result<Option<Entry>, ControllerError> {
    let inverted = (MAX_MS - not_after.timestamp_millis() - 1).clamp(0, MAX_MS);
    let start = format!("{INDEX_PREFIX}{inverted:013}");
    let keys = store
        .list(INDEX_PREFIX, Some(&start), Some(100))
        .await
        .map_err(|e| ControllerError::transport("cannot list the deployment index", e))?;
    Ok(keys
        .iter()
        .filter_map(|k| parse(k))
        .find(|e| e.deployment_id == deployment_id))
}

/// Every entry, newest first.
pub async fn all(store: &dyn ObjectStore) -> Result<Vec<Entry>, ControllerError> {
    Ok(page(store, None, usize::MAX - 1, |_| true, true).await?.0)
}

/// Adds the entries missing for deployments in `store`: records under
/// `deployments/{id}/record.json`, and `--hosts` deployments that have only hosts' status
/// records (their time is the earliest a host reported; application and group unknown).
/// Returns how many were added.
pub async fn backfill(store: &dyn ObjectStore) -> Result<usize, ControllerError> {
    let indexed: HashSet<String> = all(store)
        .await?
        .into_iter()
        .map(|e| e.deployment_id)
        .collect();
    let keys = store
        .list("deployments/", None, None)
        .await
        .map_err(|e| ControllerError::transport("cannot list the deployments", e))?;
    // Per id: whether it has a record, and its hosts' status keys.
    let mut missing: std::collections::BTreeMap<String, (bool, Vec<String>)> =
        std::collections::BTreeMap::new();
    for k in &keys {
        let Some(rest) = k.strip_prefix("deployments/") else {
            continue;
        };
        let Some((id, tail)) = rest.split_once('/') else {
            continue;
        };
        if indexed.contains(id) || !pier_protocol::is_valid_id(id) {
            continue;
        }
        let slot = missing.entry(id.to_string()).or_default();
        if tail == "record.json" {
            slot.0 = true;
        } else if tail.starts_with("hosts/") && tail.ends_with(".json") {
            slot.1.push(k.clone());
        }
    }
    let added = stream::iter(missing)
        .map(|(id, (has_record, host_keys))| async move {
            let found = if has_record {
                read_record(store, &id).await.map(|r| {
                    (
                        r.created_at,
                        r.application.clone(),
                        r.deployment_group.clone(),
                    )
                })
            } else {
                earliest_report(store, &host_keys)
                    .await
                    .map(|t| (t, "-".to_string(), "-".to_string()))
            };
            match found {
                Some((t, app, group)) => add(store, &id, t, &app, &group).await.is_ok(),
                None => false,
            }
        })
        .buffer_unordered(16)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    Ok(added)
}

async fn read_record(store: &dyn ObjectStore, id: &str) -> Option<DeploymentRecord> {
    let v = store
        .get(&format!("deployments/{id}/record.json"))
        .await
        .ok()??;
    DeploymentRecord::from_json(&v.bytes).ok()
}

/// The earliest time any of these status records says something happened.
async fn earliest_report(store: &dyn ObjectStore, keys: &[String]) -> Option<DateTime<Utc>> {
    let mut earliest: Option<DateTime<Utc>> = None;
    for k in keys {
        let Ok(Some(v)) = store.get(k).await else {
            continue;
        };
        let Ok(rec) = StatusRecord::from_json(&v.bytes) else {
            continue;
        };
        let first = rec
            .events
            .iter()
            .filter_map(|e| e.started)
            .min()
            .unwrap_or(rec.updated_at);
        earliest = Some(earliest.map_or(first, |e| e.min(first)));
    }
    earliest
}

#[cfg(test)]
mod tests {
    use super::*;
    use pier_transport::store::DirStore;

    #[test]
    fn keys_sort_newest_first_and_read_back() {
        let t1 = Utc.timestamp_millis_opt(1_780_000_000_123).unwrap();
        let t2 = t1 + chrono::Duration::milliseconds(1);
        let k1 = key("d-OLD", t1, "shop", "web prod/1");
        let k2 = key("d-NEW", t2, "shop", "web");
        assert!(k2 < k1, "{k2} sorts before {k1}");
        let e = parse(&k1).unwrap();
        assert_eq!(e.deployment_id, "d-OLD");
        assert_eq!(e.created_at, t1);
        assert_eq!(e.application, "shop");
        assert_eq!(e.deployment_group, "web prod/1");
        assert!(!k1.contains(' ') && k1.matches('/').count() == 2, "{k1}");
        assert_eq!(parse("index/deployments/x~d-1~a~b"), None);
        assert_eq!(parse("index/deployments/0000000000001~d-1~a"), None);
    }

    #[tokio::test]
    async fn pages_follow_the_cursor_and_filter_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path());
        let t0 = Utc.timestamp_millis_opt(1_780_000_000_000).unwrap();
        for i in 0..7 {
            let app = if i % 2 == 0 { "shop" } else { "billing" };
            add(
                &store,
                &format!("d-{i}"),
                t0 + chrono::Duration::seconds(i),
                app,
                "web",
            )
            .await
            .unwrap();
        }
        // Written twice: still one entry.
        add(
            &store,
            "d-6",
            t0 + chrono::Duration::seconds(6),
            "shop",
            "web",
        )
        .await
        .unwrap();
        let ids =
            |es: &[Entry]| -> Vec<String> { es.iter().map(|e| e.deployment_id.clone()).collect() };
        let (p1, more) = page(&store, None, 3, |_| true, false).await.unwrap();
        assert_eq!(ids(&p1), ["d-6", "d-5", "d-4"]);
        assert!(more);
        let (p2, _) = page(&store, Some(&p1[2].key), 3, |_| true, false)
            .await
            .unwrap();
        assert_eq!(ids(&p2), ["d-3", "d-2", "d-1"]);
        let (p3, more) = page(&store, Some(&p2[2].key), 3, |_| true, false)
            .await
            .unwrap();
        assert_eq!(ids(&p3), ["d-0"]);
        assert!(!more);
        let (shop, more) = page(&store, None, 10, |e| e.application == "shop", true)
            .await
            .unwrap();
        assert_eq!(ids(&shop), ["d-6", "d-4", "d-2", "d-0"]);
        assert!(!more);
    }

    #[tokio::test]
    async fn backfill_adds_records_and_host_only_deployments_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path());
        let mut rec = crate::dora::tests::rec(
            "d-REC",
            "web",
            pier_protocol::record::RolloutStatus::Succeeded,
            None,
        );
        rec.application = "shop".into();
        store
            .put(
                "deployments/d-REC/record.json",
                rec.to_json(),
                Precondition::None,
            )
            .await
            .unwrap();
        let status = StatusRecord::new("h1", "d-ADHOC");
        store
            .put(
                "deployments/d-ADHOC/hosts/h1.json",
                serde_json::to_vec(&status).unwrap(),
                Precondition::None,
            )
            .await
            .unwrap();
        assert_eq!(backfill(&store).await.unwrap(), 2);
        assert_eq!(backfill(&store).await.unwrap(), 0);
        let all = all(&store).await.unwrap();
        let rec_entry = all.iter().find(|e| e.deployment_id == "d-REC").unwrap();
        assert_eq!(rec_entry.application, "shop");
        assert_eq!(rec_entry.created_at, rec.created_at);
        let adhoc = all.iter().find(|e| e.deployment_id == "d-ADHOC").unwrap();
        assert_eq!(adhoc.application, "-");
    }
}
