//! What the dashboard's pages show, read from the store the CLI reads: a page of the
//! deployment list (through [`crate::index`], reading only the records on the page), one
//! deployment (its record, if it has one, and its hosts' status records), the hosts (the
//! registry, as `pier hosts` reads it) and the DORA report (`pier dora`'s own computation,
//! [`crate::history::dora_report`]). The JSON endpoints serve these structures as they are;
//! the HTML pages render them.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::Serialize;

use pier_protocol::record::{DeploymentRecord, RolloutStatus};
use pier_protocol::registry::{HostHealth, RegistryEntry};
use pier_protocol::{DeploymentStatus, Revision, StatusRecord};
use pier_transport::store::ObjectStore;

use crate::history::short_revision;
use crate::index::{self, Entry};
use crate::ControllerError;

/// Records read at once for a page.
const PARALLEL_READS: usize = 16;

/// A list's filter and position.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only this application.
    pub application: Option<String>,
    /// Only this deployment group.
    pub deployment_group: Option<String>,
    /// Only this status.
    pub status: Option<RolloutStatus>,
    /// Start after this index key (the previous page's `next`).
    pub after: Option<String>,
    /// Rows per page.
    pub limit: usize,
}

/// One row of the list: what the CLI's `pier history` shows, for a stored rollout or a
/// `--hosts` deployment alike.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub deployment_id: String,
    pub application: String,
    pub deployment_group: String,
    /// The revision in a few characters (archive name or `owner/repo@commit`); `None` for a
    /// `--hosts` deployment, whose revision only its hosts know.
    pub revision: Option<String>,
    pub commit_sha: Option<String>,
    /// A link to the commit, when the revision names its repository or `--repo-url` was given.
    pub commit_url: Option<String>,
    pub creator: Option<String>,
    /// `PendingApproval`, `InProgress`, `Succeeded`, `Failed` or `Stopped`.
    pub status: RolloutStatus,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub rollback_of: Option<String>,
    pub rolled_back_by: Option<String>,
    /// Hosts the deployment names (or that reported, without a record).
    pub hosts: usize,
    /// Whether the deployment has a rollout record (a stored group's) or only hosts' status
    /// records (`pier deploy --hosts`).
    pub has_record: bool,
}

/// A page of the list.
#[derive(Debug, Clone, Serialize)]
pub struct ListPage {
    pub deployments: Vec<Summary>,
    /// The cursor of the next page, when there is one.
    pub next: Option<String>,
}

/// One deployment with everything its page shows.
#[derive(Debug, Clone, Serialize)]
pub struct DeploymentView {
    pub summary: Summary,
    /// The rollout record (configuration, batches, zones, per-host rollout state, approval).
    pub record: Option<DeploymentRecord>,
    /// Every host's status record, by host id; `None` for a host that has not reported.
    pub hosts: BTreeMap<String, Option<StatusRecord>>,
    /// When this view was read.
    pub read_at: DateTime<Utc>,
}

impl DeploymentView {
    /// Whether nothing will change any more: the rollout (or every host) is final.
    pub fn is_final(&self) -> bool {
        self.summary.status.is_final()
            && self
                .hosts
                .values()
                .all(|h| h.as_ref().is_none_or(|r| r.status.is_final()))
    }
}

/// A registered host with what the hosts page shows.
#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    #[serde(flatten)]
    pub entry: RegistryEntry,
    pub health: HostHealth,
    pub heartbeat_age_seconds: i64,
    /// The newest deployment (among the last [`LAST_DEPLOYMENT_SCAN`]) that names the host.
    pub last_deployment: Option<HostDeployment>,
}

/// A host's part in a deployment.
#[derive(Debug, Clone, Serialize)]
pub struct HostDeployment {
    pub deployment_id: String,
    pub created_at: DateTime<Utc>,
    /// The host's own status there, when it reported.
    pub status: Option<DeploymentStatus>,
}

/// How many of the newest deployments the hosts page looks through for each host's last one.
pub const LAST_DEPLOYMENT_SCAN: usize = 50;

/// Where commit links point when the revision does not say (`--repo-url`).
#[derive(Debug, Clone, Default)]
pub struct Links {
    /// `https://github.com/org/repo` or the like; a commit is `{repo_url}/commit/{sha}`.
    pub repo_url: Option<String>,
}

impl Links {
    fn commit_url(&self, revision: Option<&Revision>, sha: Option<&str>) -> Option<String> {
        if let Some(Revision::Github {
            owner,
            repo,
            commit,
            ..
        }) = revision
        {
            return Some(format!("https://github.com/{owner}/{repo}/commit/{commit}"));
        }
        let sha = sha?;
        let base = self.repo_url.as_deref()?.trim_end_matches('/');
        Some(format!("{base}/commit/{sha}"))
    }
}

fn record_key(id: &str) -> String {
    format!("deployments/{id}/record.json")
}

fn hosts_prefix(id: &str) -> String {
    format!("deployments/{id}/hosts/")
}

async fn read_record(
    store: &dyn ObjectStore,
    id: &str,
) -> Result<Option<DeploymentRecord>, ControllerError> {
    let key = record_key(id);
    let Some(v) = store.get(&key).await.map_err(|e| {
        ControllerError::transport(format!("cannot read the deployment record {key}"), e)
    })?
    else {
        return Ok(None);
    };
    DeploymentRecord::from_json(&v.bytes)
        .map(Some)
        .map_err(|e| ControllerError::Record {
            location: format!("{}{key}", store.describe()),
            message: e.to_string(),
        })
}

/// The hosts' status records of a deployment, by host id.
async fn read_statuses(
    store: &dyn ObjectStore,
    id: &str,
) -> Result<BTreeMap<String, Option<StatusRecord>>, ControllerError> {
    let prefix = hosts_prefix(id);
    let keys = store.list(&prefix, None, None).await.map_err(|e| {
        ControllerError::transport(format!("cannot list the hosts' status records of {id}"), e)
    })?;
    let read: Vec<(String, Option<StatusRecord>)> = stream::iter(keys)
        .filter_map(|k| {
            let host = k
                .strip_prefix(&prefix)
                .and_then(|h| h.strip_suffix(".json"))
                .filter(|h| pier_protocol::is_valid_id(h))
                .map(str::to_string);
            futures::future::ready(host.map(|h| (k, h)))
        })
        .map(|(key, host)| async move {
            let got = store.get(&key).await.map_err(|e| {
                ControllerError::transport(format!("host {host}: cannot read status"), e)
            })?;
            // An unreadable record shows as "no status", not as a broken page.
            let rec = got.and_then(|v| StatusRecord::from_json(&v.bytes).ok());
            Ok::<_, ControllerError>((host, rec))
        })
        .buffer_unordered(PARALLEL_READS)
        .try_collect()
        .await?;
    Ok(read.into_iter().collect())
}

/// The overall status of a deployment that has only hosts' status records.
fn status_of_hosts(hosts: &BTreeMap<String, Option<StatusRecord>>) -> RolloutStatus {
    let recs: Vec<&StatusRecord> = hosts.values().flatten().collect();
    if recs.len() < hosts.len() || recs.iter().any(|r| !r.status.is_final()) || recs.is_empty() {
        RolloutStatus::InProgress
    } else if recs.iter().any(|r| r.status == DeploymentStatus::Failed) {
        RolloutStatus::Failed
    } else {
        RolloutStatus::Succeeded
    }
}

fn summarise(
    entry_created: DateTime<Utc>,
    id: &str,
    app: &str,
    group: &str,
    record: Option<&DeploymentRecord>,
    hosts: Option<&BTreeMap<String, Option<StatusRecord>>>,
    links: &Links,
) -> Summary {
    if let Some(r) = record {
        return Summary {
            deployment_id: r.deployment_id.clone(),
            application: r.application.clone(),
            deployment_group: r.deployment_group.clone(),
            revision: Some(short_revision(&r.revision)),
            commit_sha: r.commit_sha.clone(),
            commit_url: links.commit_url(Some(&r.revision), r.commit_sha.as_deref()),
            creator: Some(r.creator.clone()),
            status: r.status,
            created_at: r.created_at,
            started_at: r.started_at,
            ended_at: r.ended_at,
            rollback_of: r.rollback_of.clone(),
            rolled_back_by: r.rolled_back_by.clone(),
            hosts: r.hosts.len(),
            has_record: true,
        };
    }
    let empty = BTreeMap::new();
    let hosts = hosts.unwrap_or(&empty);
    let status = status_of_hosts(hosts);
    let events = || hosts.values().flatten().flat_map(|r| r.events.iter());
    Summary {
        deployment_id: id.to_string(),
        application: app.to_string(),
        deployment_group: group.to_string(),
        revision: None,
        commit_sha: None,
        commit_url: None,
        creator: None,
        status,
        created_at: entry_created,
        started_at: events().filter_map(|e| e.started).min(),
        ended_at: if status.is_final() {
            events()
                .filter_map(|e| e.ended)
                .max()
                .or_else(|| hosts.values().flatten().map(|r| r.updated_at).max())
        } else {
            None
        },
        rollback_of: None,
        rolled_back_by: None,
        hosts: hosts.len(),
        has_record: false,
    }
}

/// The row of one index entry: its record, or (without one) its hosts' status records.
async fn row(
    store: &dyn ObjectStore,
    entry: &Entry,
    links: &Links,
) -> Result<Summary, ControllerError> {
    let record = read_record(store, &entry.deployment_id).await?;
    let hosts = match record {
        Some(_) => None,
        None => Some(read_statuses(store, &entry.deployment_id).await?),
    };
    Ok(summarise(
        entry.created_at,
        &entry.deployment_id,
        &entry.application,
        &entry.deployment_group,
        record.as_ref(),
        hosts.as_ref(),
        links,
    ))
}

/// One page of the deployment list, newest first.
pub async fn list(
    store: &dyn ObjectStore,
    q: &ListQuery,
    links: &Links,
) -> Result<ListPage, ControllerError> {
    let limit = q.limit.max(1);
    let keep = |e: &Entry| {
        q.application.as_ref().is_none_or(|a| *a == e.application)
            && q.deployment_group
                .as_ref()
                .is_none_or(|g| *g == e.deployment_group)
    };
    let by_key = q.application.is_some() || q.deployment_group.is_some();
    let Some(status) = q.status else {
        let (entries, more) = index::page(store, q.after.as_deref(), limit, keep, by_key).await?;
        let rows: Vec<Summary> = stream::iter(entries.iter().cloned())
            .map(|e| async move { row(store, &e, links).await })
            .buffered(PARALLEL_READS)
            .try_collect()
            .await?;
        let next = more
            .then(|| entries.last().map(|e| e.key.clone()))
            .flatten();
        return Ok(ListPage {
            deployments: rows,
            next,
        });
    };
    // The status is in the records, not the keys: read them in order, a batch at a time,
    // until the page is full.
    let mut rows: Vec<(String, Summary)> = Vec::new();
    let mut cursor = q.after.clone();
    let mut more = false;
    'batches: loop {
        let (batch, left) =
            index::page(store, cursor.as_deref(), PARALLEL_READS * 4, keep, by_key).await?;
        let read: Vec<Summary> = stream::iter(batch.iter().cloned())
            .map(|e| async move { row(store, &e, links).await })
            .buffered(PARALLEL_READS)
            .try_collect()
            .await?;
        for (entry, s) in batch.iter().zip(read) {
            if s.status != status {
                continue;
            }
            if rows.len() == limit {
                more = true;
                break 'batches;
            }
            rows.push((entry.key.clone(), s));
        }
        match batch.last() {
            Some(last) if left => cursor = Some(last.key.clone()),
            _ => break,
        }
    }
    let next = if more {
        rows.last().map(|(k, _)| k.clone())
    } else {
        None
    };
    Ok(ListPage {
        deployments: rows.into_iter().map(|(_, s)| s).collect(),
        next,
    })
}

/// One deployment: `None` when the store knows nothing of it.
pub async fn deployment(
    store: &dyn ObjectStore,
    id: &str,
    links: &Links,
) -> Result<Option<DeploymentView>, ControllerError> {
    let (record, mut hosts) = futures::try_join!(read_record(store, id), read_statuses(store, id))?;
    if record.is_none() && hosts.is_empty() {
        return Ok(None);
    }
    if let Some(r) = &record {
        for h in r.hosts.keys() {
            hosts.entry(h.clone()).or_insert(None);
        }
    }
    // Without a record, the creation time is the earliest report (the index has it too,
    // but finding the entry would mean listing it).
    let created = record.as_ref().map(|r| r.created_at).unwrap_or_else(|| {
        hosts
            .values()
            .flatten()
            .flat_map(|r| r.events.iter().filter_map(|e| e.started))
            .min()
            .unwrap_or_else(Utc::now)
    });
    // Without a record, the application and group are in the index entry only.
    let entry = match record {
        Some(_) => None,
        None => index::find(store, id, created).await.ok().flatten(),
    };
    let (created, app, group) = match &entry {
        Some(e) => (
            e.created_at,
            e.application.as_str(),
            e.deployment_group.as_str(),
        ),
        None => (created, "-", "-"),
    };
    let summary = summarise(
        created,
        id,
        app,
        group,
        record.as_ref(),
        Some(&hosts),
        links,
    );
    Ok(Some(DeploymentView {
        summary,
        record,
        hosts,
        read_at: Utc::now(),
    }))
}

/// The registered hosts, each with its last deployment among the newest ones.
pub async fn hosts(
    store: &dyn ObjectStore,
    now: DateTime<Utc>,
) -> Result<(Vec<HostView>, Vec<crate::hosts::Unreadable>), ControllerError> {
    let registry = crate::hosts::read_registry(store).await?;
    let (recent, _) = index::page(store, None, LAST_DEPLOYMENT_SCAN, |_| true, false).await?;
    // Each recent deployment's hosts: the record's, or those that reported.
    let named: Vec<(Entry, BTreeMap<String, Option<DeploymentStatus>>)> = stream::iter(recent)
        .map(|e| async move {
            let mut hosts: BTreeMap<String, Option<DeploymentStatus>> = BTreeMap::new();
            if let Some(r) = read_record(store, &e.deployment_id).await.ok().flatten() {
                for h in r.hosts.keys() {
                    hosts.insert(h.clone(), None);
                }
                return (e, hosts);
            }
            // A `--hosts` deployment: its hosts are those that reported.
            let reported: BTreeSet<String> = store
                .list(&hosts_prefix(&e.deployment_id), None, None)
                .await
                .unwrap_or_default()
                .into_iter()
                .filter_map(|k| {
                    k.rsplit('/')
                        .next()
                        .and_then(|f| f.strip_suffix(".json"))
                        .map(str::to_string)
                })
                .collect();
            for h in reported {
                hosts.entry(h).or_insert(None);
            }
            (e, hosts)
        })
        .buffered(PARALLEL_READS)
        .collect()
        .await;
    let mut views = Vec::new();
    for entry in registry.entries {
        let last = named
            .iter()
            .find(|(_, hs)| hs.contains_key(&entry.host_id))
            .map(|(e, _)| e);
        let last_deployment = match last {
            Some(e) => {
                let key = format!("{}{}.json", hosts_prefix(&e.deployment_id), entry.host_id);
                let status = store
                    .get(&key)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|v| StatusRecord::from_json(&v.bytes).ok())
                    .map(|r| r.status);
                Some(HostDeployment {
                    deployment_id: e.deployment_id.clone(),
                    created_at: e.created_at,
                    status,
                })
            }
            None => None,
        };
        views.push(HostView {
            health: entry.health(now),
            heartbeat_age_seconds: (now - entry.heartbeat_at).num_seconds().max(0),
            entry,
            last_deployment,
        });
    }
    Ok((views, registry.unreadable))
}
