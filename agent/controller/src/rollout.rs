//! Fleet rollouts: one deployment to a deployment group's hosts, batch by batch, by
//! CodeDeploy's minimum-healthy-hosts rules ([`crate::rules`]), with all state in the
//! deployment record ([`DeploymentRecord`]) in the shared store.
//!
//! A rollout is a loop over the record. Each turn reads it, and:
//! - holds (or takes over an expired) lease, so one controller drives it at a time;
//! - learns which dispatched hosts have finished (from the deployment's SQS notification
//!   queue when there is one, by reading the hosts' status records otherwise, and by a full
//!   reconciliation now and then, so a lost notification costs a delay, never a result);
//! - asks the rules what comes next and writes that decision with a conditional write on the
//!   version it read *before* acting on it: a batch is claimed (its hosts marked
//!   `Dispatched`) before any command is sent. Two controllers that race on one record both
//!   try to claim; the store refuses one, which reads again and sees the batch taken.
//!
//! A controller that dies leaves the record as it was at its last write. The next one (`pier
//! deploy --resume ID`) waits out the lease, re-sends the command to dispatched hosts that have
//! written no status at all (the agent runs a deployment id once, however often it arrives),
//! and carries on. `pier stop ID` writes `Stopped` into the record; the driver sees it on its
//! next turn and sends nothing more.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use pier_protocol::record::{
    Batch, DeploymentRecord, HostRollout, HostRolloutState, Lease, MinimumHealthyHosts,
    RolloutStatus, RECORD_VERSION,
};
use pier_protocol::signature::SecretKey;
use pier_protocol::{
    Command, DeploymentStatus, Revision, StatusRecord, StatusSinkSpec, StatusTarget,
    COMMAND_VERSION,
};
use pier_sys::backoff::Backoff;
use pier_transport::aws::AwsClients;
use pier_transport::spool::Spool;
use pier_transport::sqs::{QueueSpec, SqsQueue};
use pier_transport::store::{ObjectStore, Precondition, PutOutcome};
use pier_transport::{Queue, StatusSink};

use super::group::{Notification, TriggerEvent};
use super::health::HealthWatch;
use super::notify::Notifier;
use super::rules::{next_step, DeploymentConfig, Next, Tally, ZonalConfig};
use super::ControllerError;

/// `eprintln!` for the driver: above its live progress line when it has one.
macro_rules! sayln {
    ($driver:expr, $($arg:tt)*) => { $driver.say(format!($($arg)*)) };
}

/// A dispatched host silent this long (no status record at all) is sent the command again.
const RESEND_AFTER: Duration = Duration::from_secs(60);

/// How long a lease holds without renewal by default: a controller killed mid-rollout delays
/// the next one by at most this.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(20);

/// The store key of a deployment's record.
pub(crate) fn record_key(deployment_id: &str) -> String {
    format!("deployments/{deployment_id}/record.json")
}

/// How commands reach the rollout's hosts, stored in the record so a resuming controller
/// sends the same way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Delivery {
    /// SQS: the queue `pier-{host}`, or this template's URL with `{host}` replaced.
    Sqs {
        /// `https://.../pier-{host}`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        queue_url_template: Option<String>,
    },
    /// A spool directory per host: this template with `{host}` replaced (or one directory
    /// for a single host).
    Spool {
        /// E.g. `/srv/{host}/spool`.
        spool_dir: String,
    },
}

/// Everything needed to build the commands and follow the hosts, beyond the record's own
/// fields (kept in [`DeploymentRecord::settings`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSettings {
    /// The group id the hosts lock and keep state under.
    pub deployment_group_id: String,
    /// A subset of lifecycle events, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    /// `file_exists_behavior`, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_exists_behavior: Option<String>,
    /// How commands are delivered.
    pub delivery: Delivery,
    /// Where hosts write status (the store the record is in).
    pub status: StatusSinkSpec,
    /// The deployment's notification queue, when status notifications are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_queue_url: Option<String>,
    /// A dispatched host with no final status after this long counts as failed.
    pub host_timeout_seconds: u64,
    /// The signing key's id, when commands are signed (a resuming controller must sign with
    /// the same key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_id: Option<String>,
    /// Roll back automatically when the rollout fails.
    #[serde(default)]
    pub rollback_on_failure: bool,
    /// Roll back automatically when an alarm or the health check stops the rollout.
    #[serde(default)]
    pub rollback_on_alarm: bool,
    /// CloudWatch alarms watched while the rollout runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alarms: Vec<String>,
    /// An HTTP(S) URL that must keep answering 2xx while the rollout runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_url: Option<String>,
    /// How long the health URL must keep failing before it stops the rollout.
    #[serde(default)]
    pub health_grace_seconds: u64,
    /// One zone at a time, with a bake after each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zonal: Option<ZonalConfig>,
    /// Where deployment and host events are announced (SNS topics, webhooks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<Notification>,
    /// Hosts let a failing ApplicationStop of the previous revision pass (CodeDeploy's option).
    #[serde(default)]
    pub ignore_application_stop_failures: bool,
}

/// The last deployment of a group that succeeded: what a rollback goes back to. Stored at
/// `state/groups/{group}/last-success.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastSuccess {
    /// The deployment.
    pub deployment_id: String,
    /// Its revision.
    pub revision: Revision,
    /// Its commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_sha: Option<String>,
    /// When that commit was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<chrono::DateTime<Utc>>,
    /// When it ended.
    pub ended_at: chrono::DateTime<Utc>,
}

fn last_success_key(group: &str) -> String {
    format!("state/groups/{group}/last-success.json")
}

/// The key naming the group's one deployment in progress (`{"deployment_id": ...}`): as in
/// CodeDeploy, a group runs one deployment at a time, or two rollouts would each count only
/// their own hosts against the minimum healthy.
fn active_key(group: &str) -> String {
    format!("state/groups/{group}/active.json")
}

/// Takes the group's active slot for `deployment_id`, or says which deployment holds it. A
/// slot naming a deployment that is final (or was never stored) is free.
pub(crate) async fn claim_active(
    store: &dyn ObjectStore,
    group: &str,
    deployment_id: &str,
) -> Result<(), ControllerError> {
    let key = active_key(group);
    let body =
        serde_json::to_vec(&serde_json::json!({ "deployment_id": deployment_id })).expect("json");
    loop {
        let cur = get_retrying(store, &key, "cannot read the group's active deployment").await?;
        let when = match &cur {
            None => Precondition::Absent,
            Some(v) => {
                let holder = serde_json::from_slice::<serde_json::Value>(&v.bytes)
                    .ok()
                    .and_then(|j| j["deployment_id"].as_str().map(str::to_string));
                if let Some(holder) = holder.filter(|h| h != deployment_id) {
                    if let Some(l) = load(store, &holder).await? {
                        if !l.record.status.is_final() {
                            return Err(ControllerError::usage(
                                "--deployment-group",
                                format!(
                                    "group {group} has deployment {holder} {:?}: one deployment \
                                     runs per group at a time; wait for it, carry it on with \
                                     pier deploy --resume {holder}, or stop it with pier stop \
                                     {holder}",
                                    l.record.status
                                ),
                            ));
                        }
                    }
                }
                Precondition::Matches(v.etag.clone())
            }
        };
        match put_retrying(store, &key, body.clone(), when, "cannot claim the group").await? {
            PutOutcome::Written(_) => return Ok(()),
            PutOutcome::Conflict => continue,
        }
    }
}

/// Frees the group's active slot if `deployment_id` holds it (best effort: a slot naming a
/// final deployment is free anyway).
pub(crate) async fn release_active(store: &dyn ObjectStore, group: &str, deployment_id: &str) {
    let key = active_key(group);
    if let Ok(Some(v)) = store.get(&key).await {
        let holder = serde_json::from_slice::<serde_json::Value>(&v.bytes)
            .ok()
            .and_then(|j| j["deployment_id"].as_str().map(str::to_string));
        if holder.as_deref() == Some(deployment_id) {
            let _ = store.delete(&key).await;
        }
    }
}

/// A read that rides out transient failures (the controller's one retry loop, with the one
/// backoff).
async fn get_retrying(
    store: &dyn ObjectStore,
    key: &str,
    what: &str,
) -> Result<Option<pier_transport::store::Versioned>, ControllerError> {
    super::deploy::with_retries(what, || async {
        store
            .get(key)
            .await
            .map_err(|e| ControllerError::transport(what.to_string(), e))
    })
    .await
}

/// The key naming a group's most recent deployment (`{"deployment_id": ...}`), which
/// `pier rollback` starts from.
pub(crate) fn latest_key(group: &str) -> String {
    format!("state/groups/{group}/latest.json")
}

/// Reads a group's last successful deployment, if any.
pub(crate) async fn last_success(
    store: &dyn ObjectStore,
    group: &str,
) -> Result<Option<LastSuccess>, ControllerError> {
    let key = last_success_key(group);
    let Some(v) = get_retrying(store, &key, "cannot read the group's last success").await? else {
        return Ok(None);
    };
    serde_json::from_slice(&v.bytes)
        .map(Some)
        .map_err(|e| ControllerError::Record {
            location: format!("{}{key}", store.describe()),
            message: e.to_string(),
        })
}

/// Records `record` (just succeeded) as its group's last success, unless a later success is
/// already recorded.
async fn note_success(
    store: &dyn ObjectStore,
    record: &DeploymentRecord,
) -> Result<(), ControllerError> {
    let key = last_success_key(&record.deployment_group);
    let entry = LastSuccess {
        deployment_id: record.deployment_id.clone(),
        revision: record.revision.clone(),
        commit_sha: record.commit_sha.clone(),
        commit_time: record.commit_time,
        ended_at: record.ended_at.unwrap_or_else(Utc::now),
    };
    let bytes = serde_json::to_vec_pretty(&entry).expect("serialises");
    loop {
        let cur = get_retrying(store, &key, "cannot read the group's last success").await?;
        let when = match &cur {
            None => Precondition::Absent,
            Some(v) => {
                let older = serde_json::from_slice::<LastSuccess>(&v.bytes)
                    .map(|l| l.ended_at <= entry.ended_at)
                    .unwrap_or(true);
                if !older {
                    return Ok(());
                }
                Precondition::Matches(v.etag.clone())
            }
        };
        match put_retrying(
            store,
            &key,
            bytes.clone(),
            when,
            "cannot record the group's last success",
        )
        .await?
        {
            PutOutcome::Written(_) => return Ok(()),
            PutOutcome::Conflict => continue,
        }
    }
}

/// The hosts that got `record`'s revision (dispatched, whatever came of it), with zones.
pub(crate) fn hosts_reached(record: &DeploymentRecord) -> Vec<(String, Option<String>)> {
    record
        .hosts
        .iter()
        .filter(|(_, h)| {
            matches!(
                h.state,
                HostRolloutState::Dispatched
                    | HostRolloutState::Succeeded
                    | HostRolloutState::Failed
            )
        })
        .map(|(id, h)| (id.clone(), h.availability_zone.clone()))
        .collect()
}

/// Decides, while `record` is being made final, whether it is rolled back: a rollback is
/// only for a deployment that is not itself one, that reached some host, and whose group has
/// an earlier success to go back to. Sets `rolled_back_by` to the new id (the claim, written
/// with the final status) and returns it.
pub(crate) async fn claim_rollback(
    store: &dyn ObjectStore,
    record: &mut DeploymentRecord,
) -> Result<Option<String>, ControllerError> {
    if record.rollback_of.is_some() || record.rolled_back_by.is_some() {
        return Ok(record.rolled_back_by.clone());
    }
    if hosts_reached(record).is_empty() {
        return Ok(None);
    }
    match last_success(store, &record.deployment_group).await? {
        Some(last) if last.deployment_id != record.deployment_id => {
            let id = pier_protocol::new_deployment_id();
            record.rolled_back_by = Some(id.clone());
            Ok(Some(id))
        }
        _ => {
            let note = "no earlier successful deployment of the group to roll back to";
            record.status_reason = Some(match record.status_reason.take() {
                Some(r) => format!("{r}; {note}"),
                None => note.to_string(),
            });
            Ok(None)
        }
    }
}

/// Claims a rollback of the final deployment `deployment_id` to the group's last success for
/// an operator (`pier stop --rollback`): writes `rolled_back_by` with a conditional write.
/// `None` (said on stderr) when there is nothing to roll back.
pub(crate) async fn claim_rollback_of(
    store: &dyn ObjectStore,
    deployment_id: &str,
) -> Result<Option<String>, ControllerError> {
    loop {
        let Loaded { mut record, etag } = load_existing(store, deployment_id).await?;
        if let Some(by) = &record.rolled_back_by {
            eprintln!("{deployment_id} is already rolled back by {by}");
            return Ok(Some(by.clone()));
        }
        // claim_rollback refuses a rollback of a rollback; an operator may want one.
        let of = record.rollback_of.take();
        let claimed = claim_rollback(store, &mut record).await?;
        record.rollback_of = of;
        let Some(id) = claimed else {
            eprintln!(
                "nothing to roll back for {deployment_id}: {}",
                record.status_reason.as_deref().unwrap_or("no host got it")
            );
            return Ok(None);
        };
        if save(store, &mut record, &etag).await?.is_some() {
            return Ok(Some(id));
        }
    }
}

/// Creates the rollback deployment `record.rolled_back_by` names, if it does not exist yet
/// (a controller that died between the claim and this finds it missing and makes it), to
/// the group's last successful revision.
pub(crate) async fn ensure_rollback(
    store: &dyn ObjectStore,
    record: &DeploymentRecord,
    aws: Option<&AwsClients>,
) -> Result<Option<String>, ControllerError> {
    let Some(id) = &record.rolled_back_by else {
        return Ok(None);
    };
    if load(store, id).await?.is_some() {
        return Ok(Some(id.clone()));
    }
    let Some(last) = last_success(store, &record.deployment_group).await? else {
        return Ok(None);
    };
    create_rollback(store, record, id, last, aws, None).await?;
    Ok(Some(id.clone()))
}

/// Creates rollback deployment `id` of `record`: `to`'s revision, to the hosts that got
/// `record`'s, by the same rules when they leave a host to deploy to (else all at once),
/// marked as a rollback and linked to `record`, created by `who` (else by `record`'s creator).
/// An existing record `id` is left as it is.
pub(crate) async fn create_rollback(
    store: &dyn ObjectStore,
    record: &DeploymentRecord,
    id: &str,
    last: LastSuccess,
    aws: Option<&AwsClients>,
    who: Option<String>,
) -> Result<(), ControllerError> {
    let mut settings: RolloutSettings =
        serde_json::from_value(record.settings.clone()).map_err(|e| ControllerError::Record {
            location: record_key(&record.deployment_id),
            message: format!("settings: {e}"),
        })?;
    if settings.notify_queue_url.is_some() {
        settings.notify_queue_url = match aws {
            Some(aws) => Some(
                SqsQueue::create_plain(aws.sqs.clone(), &format!("pier-status-{id}"))
                    .await
                    .map_err(|e| ControllerError::transport("notification queue", e))?
                    .url()
                    .to_string(),
            ),
            None => None,
        };
    }
    // A rollback is not stopped by the alarm or health check that may have caused it (it
    // is likely still firing): it is how the fleet gets healthy again.
    settings.alarms.clear();
    settings.health_url = None;
    settings.rollback_on_failure = false;
    settings.rollback_on_alarm = false;
    settings.zonal = None;
    let hosts = hosts_reached(record);
    let same = DeploymentConfig::Custom(record.minimum_healthy_hosts);
    let config = if same.min_healthy(hosts.len()) < hosts.len() {
        same
    } else {
        DeploymentConfig::AllAtOnce
    };
    let mut rollback = new_record(NewRollout {
        deployment_id: id.to_string(),
        application: record.application.clone(),
        deployment_group: record.deployment_group.clone(),
        revision: last.revision,
        commit_sha: last.commit_sha,
        commit_time: last.commit_time,
        creator: who.unwrap_or_else(|| record.creator.clone()),
        config,
        hosts,
        require_approval: false,
        rollback_of: Some(record.deployment_id.clone()),
        settings,
    });
    rollback.config_name = format!("{} (rollback)", rollback.config_name);
    match put_retrying(
        store,
        &record_key(id),
        rollback.to_json(),
        Precondition::Absent,
        "cannot store the rollback",
    )
    .await?
    {
        PutOutcome::Written(_) => super::index::add_record(store, &rollback).await,
        PutOutcome::Conflict => {}
    }
    // The rollback is the group's deployment in progress now.
    let _ = store
        .put(
            &active_key(&record.deployment_group),
            serde_json::to_vec(&serde_json::json!({ "deployment_id": id })).expect("json"),
            Precondition::None,
        )
        .await;
    let _ = store
        .put(
            &latest_key(&record.deployment_group),
            serde_json::to_vec(&serde_json::json!({ "deployment_id": id })).expect("json"),
            Precondition::None,
        )
        .await;
    eprintln!(
        "deployment {} rolled back by {id}: {} to {} host(s)",
        record.deployment_id,
        rollback.revision.describe(),
        rollback.hosts.len()
    );
    Ok(())
}

/// What a new rollout is made of.
#[derive(Debug, Clone)]
pub struct NewRollout {
    /// The deployment id.
    pub deployment_id: String,
    /// Application name.
    pub application: String,
    /// Deployment group name.
    pub deployment_group: String,
    /// The revision.
    pub revision: Revision,
    /// Its commit.
    pub commit_sha: Option<String>,
    /// When that commit was made (lead time for changes starts there).
    pub commit_time: Option<chrono::DateTime<Utc>>,
    /// Who asks.
    pub creator: String,
    /// The rules.
    pub config: DeploymentConfig,
    /// Target hosts with their zones.
    pub hosts: Vec<(String, Option<String>)>,
    /// Held for approval first.
    pub require_approval: bool,
    /// Rolls back this deployment.
    pub rollback_of: Option<String>,
    /// Commands, delivery, status.
    pub settings: RolloutSettings,
}

/// Builds the record of a new rollout (not yet stored).
pub(crate) fn new_record(new: NewRollout) -> DeploymentRecord {
    let now = Utc::now();
    let total = new.hosts.len();
    DeploymentRecord {
        version: RECORD_VERSION,
        deployment_id: new.deployment_id,
        application: new.application,
        deployment_group: new.deployment_group,
        revision: new.revision,
        commit_sha: new.commit_sha,
        commit_time: new.commit_time,
        creator: new.creator,
        config_name: new.config.name(),
        minimum_healthy_hosts: new.config.minimum(total),
        status: if new.require_approval {
            RolloutStatus::PendingApproval
        } else {
            RolloutStatus::InProgress
        },
        status_reason: None,
        hosts: new
            .hosts
            .into_iter()
            .map(|(h, zone)| {
                (
                    h,
                    HostRollout {
                        state: HostRolloutState::Pending,
                        batch: None,
                        availability_zone: zone,
                        dispatched_at: None,
                        ended_at: None,
                        error: None,
                    },
                )
            })
            .collect(),
        batches: Vec::new(),
        baked_zones: Vec::new(),
        bake_until: None,
        rollback_of: new.rollback_of,
        rolled_back_by: None,
        approval: None,
        lease: None,
        created_at: now,
        started_at: None,
        ended_at: None,
        updated_at: now,
        settings: serde_json::to_value(&new.settings).expect("settings serialise"),
    }
}

/// A record as read, with the version a conditional write must name.
pub(crate) struct Loaded {
    pub(crate) record: DeploymentRecord,
    etag: String,
}

/// Stores a new record; fails if the id is taken.
pub(crate) async fn create(
    store: &dyn ObjectStore,
    record: &DeploymentRecord,
) -> Result<(), ControllerError> {
    let key = record_key(&record.deployment_id);
    match put_retrying(
        store,
        &key,
        record.to_json(),
        Precondition::Absent,
        "cannot store the deployment record",
    )
    .await?
    {
        PutOutcome::Written(_) => {
            super::index::add_record(store, record).await;
            Ok(())
        }
        PutOutcome::Conflict => Err(ControllerError::usage(
            "deployment id",
            format!(
                "{} already exists in {}",
                record.deployment_id,
                store.describe()
            ),
        )),
    }
}

/// Reads a record, `None` if there is none.
pub(crate) async fn load(
    store: &dyn ObjectStore,
    deployment_id: &str,
) -> Result<Option<Loaded>, ControllerError> {
    let key = record_key(deployment_id);
    let got = get_retrying(store, &key, "cannot read the deployment record").await?;
    let Some(v) = got else {
        return Ok(None);
    };
    let record = DeploymentRecord::from_json(&v.bytes).map_err(|e| ControllerError::Record {
        location: format!("{}{key}", store.describe()),
        message: e.to_string(),
    })?;
    Ok(Some(Loaded {
        record,
        etag: v.etag,
    }))
}

/// A conditional write that rides out transient failures. When a retried write is refused,
/// the write before it may have landed with its answer lost: if the stored object is exactly
/// what was written, it was this write, and it counts as written (so a controller never
/// mistakes its own batch claim for someone else's and leaves the batch unsent).
async fn put_retrying(
    store: &dyn ObjectStore,
    key: &str,
    bytes: Vec<u8>,
    when: Precondition,
    what: &str,
) -> Result<PutOutcome, ControllerError> {
    let mut backoff = Backoff::network();
    let mut retried = false;
    loop {
        match store.put(key, bytes.clone(), when.clone()).await {
            Ok(PutOutcome::Written(etag)) => return Ok(PutOutcome::Written(etag)),
            Ok(PutOutcome::Conflict) => {
                if retried {
                    if let Ok(Some(cur)) = store.get(key).await {
                        if cur.bytes == bytes {
                            return Ok(PutOutcome::Written(cur.etag));
                        }
                    }
                }
                return Ok(PutOutcome::Conflict);
            }
            Err(e) if e.is_transient() => match backoff.next_delay() {
                Some(d) => {
                    log::warn!("{what}: {e}; retrying");
                    retried = true;
                    tokio::time::sleep(d).await;
                }
                None => return Err(ControllerError::transport(what.to_string(), e)),
            },
            Err(e) => return Err(ControllerError::transport(what.to_string(), e)),
        }
    }
}

/// Reads a record that must exist.
pub(crate) async fn load_existing(
    store: &dyn ObjectStore,
    deployment_id: &str,
) -> Result<Loaded, ControllerError> {
    load(store, deployment_id).await?.ok_or_else(|| {
        ControllerError::usage(
            "DEPLOYMENT_ID",
            format!(
                "no deployment {deployment_id} in {}; check the id and the store flags",
                store.describe()
            ),
        )
    })
}

/// Writes `record` over the version `etag`; `false` when someone else wrote first.
async fn save(
    store: &dyn ObjectStore,
    record: &mut DeploymentRecord,
    etag: &str,
) -> Result<Option<String>, ControllerError> {
    record.updated_at = Utc::now();
    match put_retrying(
        store,
        &record_key(&record.deployment_id),
        record.to_json(),
        Precondition::Matches(etag.to_string()),
        "cannot update the deployment record",
    )
    .await?
    {
        PutOutcome::Written(etag) => Ok(Some(etag)),
        PutOutcome::Conflict => Ok(None),
    }
}

/// Applies `change` to the stored record with a conditional write, reading again and
/// re-applying on conflict. `change` returns `false` to leave the record as it is. Returns the
/// record as written (or as found when unchanged).
pub(crate) async fn update<F>(
    store: &dyn ObjectStore,
    deployment_id: &str,
    mut change: F,
) -> Result<DeploymentRecord, ControllerError>
where
    F: FnMut(&mut DeploymentRecord) -> Result<bool, ControllerError>,
{
    loop {
        let Loaded { mut record, etag } = load_existing(store, deployment_id).await?;
        if !change(&mut record)? {
            return Ok(record);
        }
        if save(store, &mut record, &etag).await?.is_some() {
            return Ok(record);
        }
    }
}

/// Marks the record final and every host never sent as skipped.
pub(crate) fn finish(rec: &mut DeploymentRecord, status: RolloutStatus, reason: Option<String>) {
    let now = Utc::now();
    rec.status = status;
    rec.status_reason = reason;
    rec.ended_at = Some(now);
    rec.lease = None;
    for h in rec.hosts.values_mut() {
        if h.state == HostRolloutState::Pending {
            h.state = HostRolloutState::Skipped;
        }
    }
}

/// The rules in force for a stored record.
fn config_of(rec: &DeploymentRecord) -> DeploymentConfig {
    DeploymentConfig::Custom(rec.minimum_healthy_hosts)
}

/// Counts hosts the way the rules do.
pub(crate) fn tally(rec: &DeploymentRecord) -> Tally {
    Tally {
        total: rec.hosts.len(),
        pending: rec.count(HostRolloutState::Pending),
        in_progress: rec.count(HostRolloutState::Dispatched),
        succeeded: rec.count(HostRolloutState::Succeeded),
        failed: rec.count(HostRolloutState::Failed) + rec.count(HostRolloutState::Skipped),
    }
}

/// The parts a driver works with.
pub struct Driver<'a> {
    /// The shared store the record is in.
    pub store: &'a dyn ObjectStore,
    /// Where hosts write status (the same place).
    pub sink: &'a dyn StatusSink,
    /// AWS clients (SQS delivery, notifications).
    pub aws: Option<&'a AwsClients>,
    /// This controller's lease owner id.
    pub owner: String,
    /// The key commands are signed with, when the rollout is signed.
    pub signing_key: Option<&'a SecretKey>,
    /// How often statuses are read without notifications.
    pub poll: Duration,
    /// How often a full reconciliation reads every in-flight host's status, notifications or
    /// not.
    pub reconcile_every: Duration,
    /// How long this controller's lease holds without renewal.
    pub lease: Duration,
    /// A live line of hosts per state on a terminal (hidden otherwise).
    pub progress: indicatif::ProgressBar,
}

/// A unique lease owner id for this process.
pub(crate) fn owner_id() -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "{host}:{}:{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

impl Driver<'_> {
    /// Drives the rollout until it is final (or `until` says to stop waiting, leaving it to
    /// a later `--resume`). Prints each batch and host result on stderr. Returns the final
    /// record.
    pub async fn drive(&self, deployment_id: &str) -> Result<DeploymentRecord, ControllerError> {
        let mut resent = false;
        let mut last_resend: Option<tokio::time::Instant> = None;
        // Built at the first turn from the record's settings; deliveries run beside the
        // rollout and are awaited (bounded by the notifier's deadline) before returning.
        let mut notifier: Option<Option<Arc<Notifier>>> = None;
        let mut announcements: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        let mut watch: Option<Option<HealthWatch>> = None;
        let mut notices: Option<SqsQueue> = None;
        let mut last_reconcile: Option<tokio::time::Instant> = None;
        let mut waiting_reported = false;
        // Hosts a notification said are final, read on the next turn.
        let mut news: HashSet<String> = HashSet::new();
        loop {
            let Loaded { mut record, etag } = load_existing(self.store, deployment_id).await?;
            let before = record.clone();
            if record.status.is_final() {
                // Whoever finds a deployment final finishes its bookkeeping (each step is
                // idempotent), so a controller that died right after the final write loses
                // nothing: the group's last success, its active slot, the notification
                // queue, the rollback it claimed.
                self.release(&record, &etag).await;
                self.wrap_up(&record).await?;
                for a in announcements {
                    let _ = a.await;
                }
                return Ok(record);
            }
            if record.status == RolloutStatus::PendingApproval {
                if !waiting_reported {
                    sayln!(
                        self,
                        "deployment {deployment_id} waits for approval: pier approve {deployment_id}"
                    );
                    waiting_reported = true;
                }
                tokio::time::sleep(self.poll.max(Duration::from_secs(1))).await;
                continue;
            }
            let settings: RolloutSettings = serde_json::from_value(record.settings.clone())
                .map_err(|e| ControllerError::Record {
                    location: record_key(deployment_id),
                    message: format!("settings: {e}"),
                })?;
            if let Some(id) = &settings.signing_key_id {
                match self.signing_key {
                    Some(k) if k.public_key().key_id() == *id => {}
                    _ => {
                        return Err(ControllerError::usage(
                            "--signing-key",
                            format!(
                                "deployment {deployment_id} is signed with key {id}; resume it \
                                 with that key"
                            ),
                        ))
                    }
                }
            }

            // A notifier that cannot be built (a webhook secret missing here) stops this
            // controller before it writes anything.
            self.notifier(&settings, &mut notifier)?;

            // The lease: hold it, or wait for another controller's to run out.
            let now = Utc::now();
            let mine = record.lease.as_ref().is_some_and(|l| l.owner == self.owner);
            let held_by_other = record
                .lease
                .as_ref()
                .filter(|l| l.owner != self.owner && l.until > now);
            if let Some(lease) = held_by_other {
                if !waiting_reported {
                    sayln!(
                        self,
                        "deployment {deployment_id} is driven by {} until {}; waiting to take over",
                        lease.owner,
                        lease.until
                    );
                    waiting_reported = true;
                }
                let wait = (lease.until - now).to_std().unwrap_or_default();
                tokio::time::sleep(wait.min(Duration::from_secs(2)) + Duration::from_millis(100))
                    .await;
                continue;
            }
            let renew_due = record
                .lease
                .as_ref()
                .is_none_or(|l| (l.until - now).to_std().unwrap_or_default() < self.lease / 2);
            if !mine || renew_due {
                record.lease = Some(Lease {
                    owner: self.owner.clone(),
                    until: now
                        + chrono::Duration::from_std(self.lease)
                            .unwrap_or(chrono::Duration::seconds(20)),
                });
                if save(self.store, &mut record, &etag).await?.is_none() {
                    continue;
                }
                if !mine {
                    sayln!(
                        self,
                        "deployment {deployment_id}: driving ({})",
                        record.config_name
                    );
                    // Taking over (again): what another controller claimed may be unsent.
                    resent = false;
                }
                continue;
            }

            // Dispatched hosts with no status at all get the command again: at once when this
            // controller takes over, then at each full reconciliation for those silent for a
            // minute (a send that failed, a claim whose answer was lost). Agents run an id
            // once, however often it arrives.
            let due_resend =
                !resent || last_resend.is_none_or(|t| t.elapsed() >= self.reconcile_every);
            if due_resend {
                let grace = if resent { RESEND_AFTER } else { Duration::ZERO };
                resent = true;
                last_resend = Some(tokio::time::Instant::now());
                self.resend_unreported(deployment_id, &record, &settings, grace)
                    .await?;
                continue;
            }
            if notices.is_none() {
                if let (Some(url), Some(aws)) = (&settings.notify_queue_url, self.aws) {
                    notices = Some(SqsQueue::new(aws.sqs.clone(), url.clone()));
                }
            }

            // What finished since the last turn.
            let full = notices.is_none()
                || last_reconcile.is_none_or(|t| t.elapsed() >= self.reconcile_every);
            let finished = self
                .finished_hosts(&record, if full { None } else { Some(&news) })
                .await?;
            news.clear();
            if full {
                last_reconcile = Some(tokio::time::Instant::now());
            }
            let mut changed = apply_results(&mut record, &finished, &settings);

            // Alarms and the health check come before the rules.
            let watch = match &mut watch {
                Some(w) => w,
                None => watch.insert(HealthWatch::new(
                    &settings.alarms,
                    settings.health_url.as_deref(),
                    Duration::from_secs(settings.health_grace_seconds),
                    self.aws,
                    self.poll.max(Duration::from_secs(1)),
                )?),
            };
            let unhealthy = match watch {
                Some(w) => w.check().await,
                None => None,
            };

            self.progress.set_message(format!(
                "{deployment_id}: batch {}, {}",
                record.batches.len(),
                summary(&record)
            ));
            self.progress.tick();

            // Decide.
            let by_alarm = unhealthy.is_some();
            let mut decision = match unhealthy {
                Some(why) => Next::Failed(format!("stopped: {why}")),
                None => next_step(&config_of(&record), &tally(&record)),
            };
            // Zonal: the rules' batch is cut to the current zone, and a finished zone bakes
            // (alarms watched) before the next one starts, the last one included.
            let mut zone_batch = None;
            if let Some(z) = &settings.zonal {
                if matches!(decision, Next::Dispatch(_) | Next::Succeeded) {
                    let n = match decision {
                        Next::Dispatch(n) => n,
                        _ => 0,
                    };
                    match zone_step(&mut record, n, z, Utc::now()) {
                        ZoneStep::Dispatch(hosts) => zone_batch = Some(hosts),
                        ZoneStep::Wait { changed: c } => {
                            changed |= c;
                            decision = Next::Wait;
                        }
                        ZoneStep::AllBaked => {}
                    }
                }
            }
            let mut to_send = Vec::new();
            match &decision {
                Next::Dispatch(n) => {
                    let batch = zone_batch.take().unwrap_or_else(|| pick_batch(&record, *n));
                    let index = record.batches.len() as u32;
                    let now = Utc::now();
                    for h in &batch {
                        let host = record.hosts.get_mut(h).expect("picked from the record");
                        host.state = HostRolloutState::Dispatched;
                        host.batch = Some(index);
                        host.dispatched_at = Some(now);
                    }
                    record.batches.push(Batch {
                        index,
                        hosts: batch.clone(),
                        started_at: now,
                    });
                    record.started_at.get_or_insert(now);
                    to_send = batch;
                    changed = true;
                }
                Next::Succeeded => {
                    finish(&mut record, RolloutStatus::Succeeded, None);
                    changed = true;
                }
                Next::Failed(reason) => {
                    finish(&mut record, RolloutStatus::Failed, Some(reason.clone()));
                    let wanted = if by_alarm {
                        settings.rollback_on_alarm
                    } else {
                        settings.rollback_on_failure
                    };
                    if wanted {
                        claim_rollback(self.store, &mut record).await?;
                    }
                    changed = true;
                }
                Next::Wait => {}
            }
            if changed {
                // The claim comes first: a batch is sent only once it is written.
                if save(self.store, &mut record, &etag).await?.is_none() {
                    continue;
                }
                if let Some(n) = self.notifier(&settings, &mut notifier)? {
                    announcements.extend(announce(n, &before, &record));
                }
                for (h, r) in &finished {
                    let word = if r.status == DeploymentStatus::Succeeded {
                        "Succeeded"
                    } else {
                        "Failed"
                    };
                    sayln!(self, "{h}: {word}");
                }
            }
            if !to_send.is_empty() {
                let index = record.batches.len() - 1;
                sayln!(
                    self,
                    "batch {} of {deployment_id}: {} host(s): {}",
                    index + 1,
                    to_send.len(),
                    to_send.join(", ")
                );
                self.send(&record, &settings, &to_send).await?;
                continue;
            }
            if record.status.is_final() {
                sayln!(
                    self,
                    "deployment {deployment_id} {:?}{}",
                    record.status,
                    record
                        .status_reason
                        .as_ref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
                self.wrap_up(&record).await?;
                for a in announcements {
                    let _ = a.await;
                }
                return Ok(record);
            }
            // Wait for news: a notification, or the next poll.
            match &notices {
                Some(q) => {
                    let wait = self.poll.max(Duration::from_secs(1)).min(self.lease / 4);
                    match q.receive(wait).await {
                        Ok(msgs) => {
                            // A notification is a hint: the host's record is read next turn
                            // (one request per event), and acked only then.
                            for m in &msgs {
                                if let Some(host) = final_host_in(&m.body, deployment_id) {
                                    news.insert(host);
                                }
                                if let Err(e) = q.ack(m).await {
                                    log::warn!("cannot delete a notification: {e}");
                                }
                            }
                        }
                        Err(e) => {
                            log::warn!("notification queue: {e}");
                            tokio::time::sleep(self.poll).await;
                        }
                    }
                }
                None => tokio::time::sleep(self.poll).await,
            }
        }
    }

    /// Prints a line on stderr, above the live progress line when there is one.
    fn say(&self, line: String) {
        if self.progress.is_hidden() {
            eprintln!("{line}");
        } else {
            self.progress.println(line);
        }
    }

    /// The rollout's notifier, built once from its settings (`None` when it has no
    /// notification targets). A webhook secret missing from the environment is an error
    /// here, before anything is sent.
    fn notifier<'n>(
        &self,
        settings: &RolloutSettings,
        slot: &'n mut Option<Option<Arc<Notifier>>>,
    ) -> Result<Option<&'n Arc<Notifier>>, ControllerError> {
        if slot.is_none() {
            let built = if settings.notifications.is_empty() {
                None
            } else {
                let sns = self.aws.map(|a| aws_sdk_sns::Client::new(&a.config));
                Some(Arc::new(Notifier::new(&settings.notifications, sns)?))
            };
            *slot = Some(built);
        }
        Ok(slot.as_ref().and_then(|n| n.as_ref()))
    }

    /// Gives up the lease of a final record (best effort).
    async fn release(&self, record: &DeploymentRecord, etag: &str) {
        if record.lease.as_ref().is_some_and(|l| l.owner == self.owner) {
            let mut rec = record.clone();
            rec.lease = None;
            let _ = save(self.store, &mut rec, etag).await;
        }
    }

    /// The final status records of dispatched hosts: of every one (`only` is `None`, a full
    /// reconciliation) or of those a notification named.
    async fn finished_hosts(
        &self,
        record: &DeploymentRecord,
        only: Option<&HashSet<String>>,
    ) -> Result<Vec<(String, StatusRecord)>, ControllerError> {
        let mut out = Vec::new();
        for (h, host) in &record.hosts {
            if host.state != HostRolloutState::Dispatched || only.is_some_and(|o| !o.contains(h)) {
                continue;
            }
            match self.sink.read(&record.deployment_id, h).await {
                Ok(Some(r)) if r.status.is_final() => out.push((h.clone(), r)),
                Ok(_) => {}
                // One unreadable record (a newer agent's version, a denied key) must not stop
                // the rollout: the host stays in flight and times out if it never reads.
                Err(e) => log::warn!("status of {h}: {e}"),
            }
        }
        Ok(out)
    }

    /// Re-sends the command to dispatched hosts with no status record at all that were
    /// (last) sent more than `grace` ago, and restarts their host timeout from now (so a
    /// controller resumed long after a crash does not fail the hosts it has just sent to).
    async fn resend_unreported(
        &self,
        deployment_id: &str,
        record: &DeploymentRecord,
        settings: &RolloutSettings,
        grace: Duration,
    ) -> Result<(), ControllerError> {
        let now = Utc::now();
        let grace = chrono::Duration::from_std(grace).unwrap_or_default();
        let mut silent = Vec::new();
        for (h, host) in &record.hosts {
            if host.state != HostRolloutState::Dispatched
                || host.dispatched_at.is_some_and(|t| now - t < grace)
            {
                continue;
            }
            match self.sink.read(&record.deployment_id, h).await {
                Ok(None) => silent.push(h.clone()),
                Ok(Some(_)) => {}
                // Unknown: sending again is harmless (the agent runs an id once).
                Err(e) if e.is_transient() => silent.push(h.clone()),
                Err(e) => log::warn!("status of {h}: {e}"),
            }
        }
        if silent.is_empty() {
            return Ok(());
        }
        // The new dispatch time is written before sending, like a claim.
        let stamped = update(self.store, deployment_id, |rec| {
            let mut changed = false;
            for h in &silent {
                if let Some(host) = rec.hosts.get_mut(h) {
                    if host.state == HostRolloutState::Dispatched {
                        host.dispatched_at = Some(now);
                        changed = true;
                    }
                }
            }
            Ok(changed && !rec.status.is_final())
        })
        .await?;
        if stamped.status.is_final() {
            return Ok(());
        }
        sayln!(
            self,
            "sending again to {} dispatched host(s) with no status yet: {}",
            silent.len(),
            silent.join(", ")
        );
        self.send(&stamped, settings, &silent).await
    }

    /// The bookkeeping of a final deployment, idempotent so that any controller that finds
    /// it final can do it: record the group's last success, free the group's active slot,
    /// delete the notification queue, create the rollback it claimed.
    async fn wrap_up(&self, record: &DeploymentRecord) -> Result<(), ControllerError> {
        if record.status == RolloutStatus::Succeeded {
            note_success(self.store, record).await?;
        }
        release_active(self.store, &record.deployment_group, &record.deployment_id).await;
        if let Ok(settings) = serde_json::from_value::<RolloutSettings>(record.settings.clone()) {
            if let (Some(url), Some(aws)) = (&settings.notify_queue_url, self.aws) {
                if let Err(e) = SqsQueue::new(aws.sqs.clone(), url.clone())
                    .delete_queue()
                    .await
                {
                    log::warn!("cannot delete notification queue {url}: {e}");
                }
            }
        }
        ensure_rollback(self.store, record, self.aws).await?;
        Ok(())
    }

    /// Sends the deployment's command to `hosts`, retrying transient failures; a host whose
    /// queue cannot be reached is left dispatched and times out as failed.
    async fn send(
        &self,
        record: &DeploymentRecord,
        settings: &RolloutSettings,
        hosts: &[String],
    ) -> Result<(), ControllerError> {
        let cmd = command_for(record, settings)?;
        let body = match self.signing_key {
            Some(key) => pier_protocol::signature::sign(&cmd.to_json(), key),
            None => cmd.to_json(),
        };
        for h in hosts {
            let sent = match &settings.delivery {
                Delivery::Spool { spool_dir } => {
                    let dir = std::path::PathBuf::from(spool_dir.replace("{host}", h));
                    Spool::submit(&dir, &format!("{}.json", record.deployment_id), &body)
                        .map(|_| format!("spool {}", dir.display()))
                        .map_err(|e| ControllerError::transport(format!("host {h}"), e))
                }
                Delivery::Sqs { queue_url_template } => {
                    self.send_sqs(h, queue_url_template.as_deref(), &body).await
                }
            };
            match sent {
                Ok(via) => log::info!("{h}: sent via {via}"),
                Err(e) => eprintln!("{h}: cannot send the command: {e}"),
            }
        }
        Ok(())
    }

    async fn send_sqs(
        &self,
        host: &str,
        template: Option<&str>,
        body: &[u8],
    ) -> Result<String, ControllerError> {
        let aws = self.aws.ok_or_else(|| {
            ControllerError::usage("--endpoint-url", "SQS delivery needs AWS access")
        })?;
        let spec = QueueSpec {
            url: template.map(|t| t.replace("{host}", host)),
            create: false,
            ..QueueSpec::for_host(host)
        };
        let mut backoff = Backoff::network();
        loop {
            let attempt = async {
                let q = SqsQueue::open(aws.sqs.clone(), &spec).await?;
                q.send(body).await?;
                Ok::<_, pier_transport::TransportError>(q.url().to_string())
            }
            .await;
            match attempt {
                Ok(url) => return Ok(url),
                Err(e) if e.is_transient() => match backoff.next_delay() {
                    Some(d) => tokio::time::sleep(d).await,
                    None => return Err(ControllerError::transport(format!("host {host}"), e)),
                },
                Err(e) => return Err(ControllerError::transport(format!("host {host}"), e)),
            }
        }
    }
}

/// Sends, beside the rollout, the CodeDeploy trigger events that the change from `before`
/// to `after` (a write this controller just made) amounts to.
fn announce(
    notifier: &Arc<Notifier>,
    before: &DeploymentRecord,
    after: &DeploymentRecord,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut events: Vec<(TriggerEvent, Option<String>)> = Vec::new();
    if before.started_at.is_none() && after.started_at.is_some() {
        events.push((TriggerEvent::DeploymentStart, None));
    }
    for (h, host) in &after.hosts {
        let was = before.hosts.get(h).map(|b| b.state);
        if was == Some(host.state) {
            continue;
        }
        let event = match host.state {
            HostRolloutState::Dispatched => TriggerEvent::InstanceStart,
            HostRolloutState::Succeeded => TriggerEvent::InstanceSuccess,
            HostRolloutState::Failed => TriggerEvent::InstanceFailure,
            _ => continue,
        };
        events.push((event, Some(h.clone())));
    }
    if !before.status.is_final() && after.status.is_final() {
        events.push((
            match after.status {
                RolloutStatus::Succeeded => TriggerEvent::DeploymentSuccess,
                RolloutStatus::Stopped => TriggerEvent::DeploymentStop,
                _ => TriggerEvent::DeploymentFailure,
            },
            None,
        ));
    }
    if before.rolled_back_by.is_none() && after.rolled_back_by.is_some() {
        events.push((TriggerEvent::DeploymentRollback, None));
    }
    events
        .into_iter()
        .map(|(event, host)| {
            let n = notifier.clone();
            let rec = after.clone();
            tokio::spawn(async move {
                n.send(event, &rec, host.as_deref()).await;
            })
        })
        .collect()
}

/// Announces `event` for a change an operator's command just wrote (a stop, a rejection, a
/// manual rollback), best effort: a notifier that cannot be built is reported, not an
/// error, since the change is done.
pub(crate) async fn announce_event(
    record: &DeploymentRecord,
    event: TriggerEvent,
    aws: Option<&AwsClients>,
) {
    let Ok(settings) = serde_json::from_value::<RolloutSettings>(record.settings.clone()) else {
        return;
    };
    if settings.notifications.is_empty() {
        return;
    }
    let sns = aws.map(|a| aws_sdk_sns::Client::new(&a.config));
    match Notifier::new(&settings.notifications, sns) {
        Ok(n) => {
            n.send(event, record, None).await;
        }
        Err(e) => eprintln!("pier: cannot announce {}: {e}", event.as_str()),
    }
}

/// The host a status notification reports final for this deployment, if it does.
fn final_host_in(body: &[u8], deployment_id: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Notice {
        deployment_id: String,
        host_id: String,
        status: DeploymentStatus,
    }
    let n: Notice = serde_json::from_slice(body).ok()?;
    (n.deployment_id == deployment_id && n.status.is_final()).then_some(n.host_id)
}

/// The command every host of the rollout gets, checked with the agent's own parser.
pub(crate) fn command_for(
    record: &DeploymentRecord,
    settings: &RolloutSettings,
) -> Result<Command, ControllerError> {
    let cmd = Command {
        version: COMMAND_VERSION,
        deployment_id: record.deployment_id.clone(),
        application_name: record.application.clone(),
        deployment_group_name: record.deployment_group.clone(),
        deployment_group_id: settings.deployment_group_id.clone(),
        revision: record.revision.clone(),
        events: settings.events.clone(),
        file_exists_behavior: settings.file_exists_behavior.clone(),
        is_rollback: record.rollback_of.is_some(),
        creator: Some(record.creator.clone()),
        commit_sha: record.commit_sha.clone(),
        ignore_application_stop_failures: settings.ignore_application_stop_failures,
        status: StatusTarget {
            sink: settings.status.clone(),
            notify_queue_url: settings.notify_queue_url.clone(),
        },
        created_at: record.created_at,
    };
    Command::from_json(&cmd.to_json())?;
    Ok(cmd)
}

/// Records final host results and times out silent hosts; whether anything changed.
fn apply_results(
    record: &mut DeploymentRecord,
    finished: &[(String, StatusRecord)],
    settings: &RolloutSettings,
) -> bool {
    let mut changed = false;
    let now = Utc::now();
    let done: HashSet<&str> = finished.iter().map(|(h, _)| h.as_str()).collect();
    for (h, r) in finished {
        let Some(host) = record.hosts.get_mut(h) else {
            continue;
        };
        if host.state != HostRolloutState::Dispatched {
            continue;
        }
        host.ended_at = Some(r.updated_at);
        if r.status == DeploymentStatus::Succeeded {
            host.state = HostRolloutState::Succeeded;
        } else {
            host.state = HostRolloutState::Failed;
            host.error = Some(failure_summary(r));
        }
        changed = true;
    }
    let limit = chrono::Duration::seconds(settings.host_timeout_seconds as i64);
    for (h, host) in record.hosts.iter_mut() {
        if host.state == HostRolloutState::Dispatched
            && !done.contains(h.as_str())
            && host.dispatched_at.is_some_and(|t| now - t > limit)
        {
            host.state = HostRolloutState::Failed;
            host.ended_at = Some(now);
            host.error = Some(format!(
                "no final status within {} s of dispatch",
                settings.host_timeout_seconds
            ));
            changed = true;
        }
    }
    changed
}

/// One line on why a host failed: its failing event and error code, or its error.
fn failure_summary(r: &StatusRecord) -> String {
    match super::status::failing_event(r) {
        Some(e) => {
            let code = e
                .diagnostics
                .as_ref()
                .map(|d| format!(" [{}]", d.error_code))
                .unwrap_or_default();
            format!("{} {:?}{code}", e.name, e.status)
        }
        None => r
            .error
            .clone()
            .unwrap_or_else(|| "failed before any event".to_string()),
    }
}

/// What a zonal rollout does next, within what the rules allow.
#[derive(Debug, PartialEq)]
enum ZoneStep {
    /// Send these hosts (all in the current zone).
    Dispatch(Vec<String>),
    /// The current zone has hosts in flight, or is baking; `changed` when a bake started or
    /// ended (the record must be written).
    Wait { changed: bool },
    /// Every zone is done and baked.
    AllBaked,
}

/// The zones of the rollout's hosts in the order they go: named zones sorted, then hosts
/// without a zone (`""`).
fn zones(record: &DeploymentRecord) -> Vec<String> {
    let mut zones: Vec<String> = record
        .hosts
        .values()
        .map(|h| h.availability_zone.clone().unwrap_or_default())
        .collect();
    zones.sort_by(|a, b| (a.is_empty(), a).cmp(&(b.is_empty(), b)));
    zones.dedup();
    zones
}

/// One step of a zonal rollout: the first zone not yet baked is current; up to `n` of its
/// pending hosts (and no more than its per-zone minimum allows) go next; once all of its
/// hosts are final it bakes for the monitor period, then the next zone starts.
fn zone_step(
    record: &mut DeploymentRecord,
    n: usize,
    z: &ZonalConfig,
    now: chrono::DateTime<Utc>,
) -> ZoneStep {
    let mut changed = false;
    loop {
        let Some(zone) = zones(record)
            .into_iter()
            .find(|zone| !record.baked_zones.contains(zone))
        else {
            return if changed {
                ZoneStep::Wait { changed }
            } else {
                ZoneStep::AllBaked
            };
        };
        let in_zone = |h: &HostRollout| h.availability_zone.clone().unwrap_or_default() == zone;
        let mut pending: Vec<&String> = Vec::new();
        let (mut total, mut in_flight, mut succeeded) = (0, 0, 0);
        for (id, h) in record.hosts.iter().filter(|(_, h)| in_zone(h)) {
            total += 1;
            match h.state {
                HostRolloutState::Pending => pending.push(id),
                HostRolloutState::Dispatched => in_flight += 1,
                HostRolloutState::Succeeded => succeeded += 1,
                _ => {}
            }
        }
        if in_flight > 0 {
            return ZoneStep::Wait { changed };
        }
        if !pending.is_empty() {
            if n == 0 {
                return ZoneStep::Wait { changed };
            }
            let cap = z.zone_capacity(total, pending.len() + succeeded);
            let batch = pending
                .into_iter()
                .take(n.min(cap))
                .cloned()
                .collect::<Vec<_>>();
            return ZoneStep::Dispatch(batch);
        }
        // The zone is done: bake, then move on.
        match record.bake_until {
            None => {
                let secs = if record.baked_zones.is_empty() {
                    z.first_zone_monitor_seconds
                } else {
                    z.monitor_seconds
                };
                record.bake_until = Some(now + chrono::Duration::seconds(secs as i64));
                eprintln!(
                    "zone {} done; monitoring for {secs} s before the next",
                    if zone.is_empty() { "(none)" } else { &zone }
                );
                return ZoneStep::Wait { changed: true };
            }
            Some(until) if now < until => return ZoneStep::Wait { changed },
            Some(_) => {
                record.baked_zones.push(zone);
                record.bake_until = None;
                changed = true;
            }
        }
    }
}

/// The next `n` pending hosts, zone by zone (hosts without a zone last), by id within a zone,
/// so a batch drains one zone before touching the next.
fn pick_batch(record: &DeploymentRecord, n: usize) -> Vec<String> {
    let mut pending: Vec<(&Option<String>, &String)> = record
        .hosts
        .iter()
        .filter(|(_, h)| h.state == HostRolloutState::Pending)
        .map(|(id, h)| (&h.availability_zone, id))
        .collect();
    pending.sort_by(|a, b| (a.0.is_none(), a.0, a.1).cmp(&(b.0.is_none(), b.0, b.1)));
    pending
        .into_iter()
        .take(n)
        .map(|(_, id)| id.clone())
        .collect()
}

/// A summary of a record for people: per state, how many hosts.
pub(crate) fn summary(record: &DeploymentRecord) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for h in record.hosts.values() {
        let word = match h.state {
            HostRolloutState::Pending => "pending",
            HostRolloutState::Dispatched => "in progress",
            HostRolloutState::Succeeded => "succeeded",
            HostRolloutState::Failed => "failed",
            HostRolloutState::Skipped => "skipped",
        };
        *counts.entry(word).or_default() += 1;
    }
    counts
        .iter()
        .map(|(w, n)| format!("{n} {w}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// When a minimum given as a host count or a percentage is shown.
pub(crate) fn describe_minimum(m: MinimumHealthyHosts) -> String {
    match m {
        MinimumHealthyHosts::HostCount(n) => format!("HOST_COUNT {n}"),
        MinimumHealthyHosts::FleetPercent(p) => format!("FLEET_PERCENT {p}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pier_protocol::BundleType;

    fn record(hosts: &[(&str, Option<&str>)]) -> DeploymentRecord {
        new_record(NewRollout {
            deployment_id: "d-TEST00001".into(),
            application: "shop".into(),
            deployment_group: "web".into(),
            revision: Revision::Local {
                path: "/tmp/x.tgz".into(),
                sha256: None,
                bundle_type: BundleType::Tgz,
            },
            commit_sha: None,
            commit_time: None,
            creator: "t@h".into(),
            config: DeploymentConfig::AllAtOnce,
            hosts: hosts
                .iter()
                .map(|(h, z)| (h.to_string(), z.map(str::to_string)))
                .collect(),
            require_approval: false,
            rollback_of: None,
            settings: RolloutSettings {
                deployment_group_id: "web".into(),
                events: None,
                file_exists_behavior: None,
                delivery: Delivery::Spool {
                    spool_dir: "/x/{host}".into(),
                },
                status: StatusSinkSpec::Local { dir: "/x".into() },
                notify_queue_url: None,
                host_timeout_seconds: 60,
                signing_key_id: None,
                rollback_on_failure: false,
                rollback_on_alarm: false,
                alarms: vec![],
                health_url: None,
                health_grace_seconds: 30,
                zonal: None,
                notifications: vec![],
                ignore_application_stop_failures: false,
            },
        })
    }

    fn set(rec: &mut DeploymentRecord, hosts: &[String], state: HostRolloutState) {
        for h in hosts {
            rec.hosts.get_mut(h).unwrap().state = state;
        }
    }

    #[test]
    fn zonal_rollouts_go_zone_by_zone_and_bake_after_each() {
        let z = ZonalConfig {
            first_zone_monitor_seconds: 60,
            monitor_seconds: 10,
            minimum_healthy_hosts_per_zone: Some(MinimumHealthyHosts::HostCount(1)),
        };
        let mut rec = record(&[
            ("a1", Some("eu-1a")),
            ("a2", Some("eu-1a")),
            ("a3", Some("eu-1a")),
            ("b1", Some("eu-1b")),
            ("n1", None),
        ]);
        let t0 = Utc::now();
        // Zone eu-1a first; its per-zone minimum of 1 healthy caps the batch at 2 of 3.
        let ZoneStep::Dispatch(batch) = zone_step(&mut rec, 5, &z, t0) else {
            panic!("expected a batch")
        };
        assert_eq!(batch, ["a1", "a2"]);
        set(&mut rec, &batch, HostRolloutState::Dispatched);
        assert_eq!(
            zone_step(&mut rec, 5, &z, t0),
            ZoneStep::Wait { changed: false }
        );
        set(&mut rec, &batch, HostRolloutState::Succeeded);
        let ZoneStep::Dispatch(batch) = zone_step(&mut rec, 5, &z, t0) else {
            panic!("expected a batch")
        };
        assert_eq!(batch, ["a3"]);
        set(&mut rec, &batch, HostRolloutState::Failed);
        // Zone done: the first zone's bake (60 s) starts, and nothing else goes meanwhile.
        assert_eq!(
            zone_step(&mut rec, 5, &z, t0),
            ZoneStep::Wait { changed: true }
        );
        assert_eq!(rec.bake_until, Some(t0 + chrono::Duration::seconds(60)));
        let t1 = t0 + chrono::Duration::seconds(59);
        assert_eq!(
            zone_step(&mut rec, 5, &z, t1),
            ZoneStep::Wait { changed: false }
        );
        // After the bake, eu-1b goes (a one-host zone is never stuck on its minimum).
        let t2 = t0 + chrono::Duration::seconds(61);
        assert_eq!(
            zone_step(&mut rec, 5, &z, t2),
            ZoneStep::Dispatch(vec!["b1".to_string()])
        );
        assert_eq!(rec.baked_zones, ["eu-1a"]);
        set(&mut rec, &["b1".to_string()], HostRolloutState::Succeeded);
        // Later zones bake for monitor_seconds; hosts without a zone go last.
        assert_eq!(
            zone_step(&mut rec, 5, &z, t2),
            ZoneStep::Wait { changed: true }
        );
        assert_eq!(rec.bake_until, Some(t2 + chrono::Duration::seconds(10)));
        let t3 = t2 + chrono::Duration::seconds(11);
        assert_eq!(
            zone_step(&mut rec, 5, &z, t3),
            ZoneStep::Dispatch(vec!["n1".to_string()])
        );
        set(&mut rec, &["n1".to_string()], HostRolloutState::Succeeded);
        // The last zone bakes too before the deployment may end.
        assert_eq!(
            zone_step(&mut rec, 0, &z, t3),
            ZoneStep::Wait { changed: true }
        );
        let t4 = t3 + chrono::Duration::seconds(11);
        assert_eq!(
            zone_step(&mut rec, 0, &z, t4),
            ZoneStep::Wait { changed: true }
        );
        assert_eq!(zone_step(&mut rec, 0, &z, t4), ZoneStep::AllBaked);
        assert_eq!(rec.baked_zones, ["eu-1a", "eu-1b", ""]);
    }

    #[test]
    fn the_rules_cap_still_applies_inside_a_zone() {
        let z = ZonalConfig {
            first_zone_monitor_seconds: 0,
            monitor_seconds: 0,
            minimum_healthy_hosts_per_zone: None,
        };
        let mut rec = record(&[("a1", Some("z")), ("a2", Some("z")), ("a3", Some("z"))]);
        let ZoneStep::Dispatch(batch) = zone_step(&mut rec, 1, &z, Utc::now()) else {
            panic!()
        };
        assert_eq!(batch, ["a1"]);
    }

    /// A store whose first conditional write lands but loses its answer (as a connection
    /// reset after the server wrote would), then behaves.
    struct LostAnswer {
        inner: pier_transport::store::DirStore,
        lost: std::sync::atomic::AtomicBool,
    }

    impl ObjectStore for LostAnswer {
        fn get<'a>(
            &'a self,
            key: &'a str,
        ) -> pier_transport::BoxFuture<'a, Option<pier_transport::store::Versioned>> {
            self.inner.get(key)
        }
        fn put<'a>(
            &'a self,
            key: &'a str,
            bytes: Vec<u8>,
            when: Precondition,
        ) -> pier_transport::BoxFuture<'a, PutOutcome> {
            Box::pin(async move {
                let out = self.inner.put(key, bytes, when).await?;
                if !self.lost.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    return Err(pier_transport::TransportError::Aws {
                        op: "PutObject",
                        target: key.to_string(),
                        message: "connection reset".into(),
                        transient: true,
                    });
                }
                Ok(out)
            })
        }
        fn list<'a>(
            &'a self,
            prefix: &'a str,
            after: Option<&'a str>,
            limit: Option<usize>,
        ) -> pier_transport::BoxFuture<'a, Vec<String>> {
            self.inner.list(prefix, after, limit)
        }
        fn delete<'a>(&'a self, key: &'a str) -> pier_transport::BoxFuture<'a, ()> {
            self.inner.delete(key)
        }
        fn describe(&self) -> String {
            self.inner.describe()
        }
    }

    #[tokio::test]
    async fn a_claim_whose_answer_was_lost_counts_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let plain = pier_transport::store::DirStore::new(dir.path());
        let rec = record(&[("a1", None), ("a2", None)]);
        create(&plain, &rec).await.unwrap();
        let store = LostAnswer {
            inner: plain,
            lost: std::sync::atomic::AtomicBool::new(false),
        };
        let Loaded { mut record, etag } = load_existing(&store, &rec.deployment_id).await.unwrap();
        record.hosts.get_mut("a1").unwrap().state = HostRolloutState::Dispatched;
        // The first try lands but errs; the retry is refused (the version moved on); the
        // stored record is ours, so the claim stands.
        let written = save(&store, &mut record, &etag).await.unwrap();
        assert!(written.is_some(), "own write taken for a conflict");
        let now = load_existing(&store, &rec.deployment_id).await.unwrap();
        assert_eq!(now.record, record);
        // A real conflict (someone else's write) is still one.
        let mut stale = record.clone();
        stale.hosts.get_mut("a2").unwrap().state = HostRolloutState::Dispatched;
        assert_eq!(save(&store, &mut stale, &etag).await.unwrap(), None);
    }
}
