//! The controller's record of one fleet deployment, stored at
//! `{store}/deployments/{deployment_id}/record.json` beside the hosts' status records.
//!
//! The record is the rollout's only state: targets, configuration, batches, each host's state,
//! the revision, who made it and when, links to the rollback it caused or the deployment it
//! rolls back. Every change is a conditional write on the stored version (S3 `If-Match`), so
//! two controllers never both dispatch a batch, and a controller that dies leaves a record
//! another can carry on from. A controller holds a time-limited `lease` while it drives the
//! deployment; another takes over only once the lease has run out.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{ProtocolError, Revision};

/// The deployment record version this controller writes and reads.
pub const RECORD_VERSION: u32 = 1;

/// Where a fleet deployment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutStatus {
    /// Held until someone approves or rejects it; nothing has been sent.
    PendingApproval,
    /// Being rolled out (or ready to be, once a controller picks it up).
    InProgress,
    /// Finished: enough hosts succeeded.
    Succeeded,
    /// Finished: too many hosts failed, an alarm fired, or it was rejected.
    Failed,
    /// Stopped by an operator; nothing more is sent.
    Stopped,
}

impl RolloutStatus {
    /// Whether the record will not change state again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutStatus::Succeeded | RolloutStatus::Failed | RolloutStatus::Stopped
        )
    }
}

/// One target host's part in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostRolloutState {
    /// Not sent yet; still runs the previous revision (counts as healthy).
    Pending,
    /// Claimed for a batch and sent (or about to be: a controller that resumes sends again to
    /// a dispatched host with no status, which the agent's dedupe makes harmless).
    Dispatched,
    /// The host reported success.
    Succeeded,
    /// The host reported failure, or did not report in time.
    Failed,
    /// Never sent: the rollout ended (failed or stopped) first.
    Skipped,
}

impl HostRolloutState {
    /// Every state, in the order a host goes through them (for tables and counts that list
    /// each state even when no host is in it).
    pub const ALL: [HostRolloutState; 5] = [
        HostRolloutState::Pending,
        HostRolloutState::Dispatched,
        HostRolloutState::Succeeded,
        HostRolloutState::Failed,
        HostRolloutState::Skipped,
    ];

    /// The state's name as it is written in the record.
    pub fn as_str(self) -> &'static str {
        match self {
            HostRolloutState::Pending => "Pending",
            HostRolloutState::Dispatched => "Dispatched",
            HostRolloutState::Succeeded => "Succeeded",
            HostRolloutState::Failed => "Failed",
            HostRolloutState::Skipped => "Skipped",
        }
    }
}

/// One host in the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRollout {
    /// State of this host.
    pub state: HostRolloutState,
    /// The batch (0-based) the host was dispatched in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u32>,
    /// Availability zone, for zonal rollouts and display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    /// When the command was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<DateTime<Utc>>,
    /// When the host's final status was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// Why the host failed (its failing event and error code, or "no status in time").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One batch as dispatched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// 0-based index.
    pub index: u32,
    /// The hosts sent in this batch.
    pub hosts: Vec<String>,
    /// When it was claimed.
    pub started_at: DateTime<Utc>,
}

/// The controller driving the deployment, and until when its claim holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// A unique id of the controller process (`host:pid:random`).
    pub owner: String,
    /// The claim lapses at this time unless renewed.
    pub until: DateTime<Utc>,
}

/// A decision on a deployment held for approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// Approved (`true`) or rejected.
    pub approved: bool,
    /// `user@host` of who decided.
    pub by: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Their comment, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// How many hosts must stay healthy, as CodeDeploy states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MinimumHealthyHosts {
    /// At least this many hosts.
    HostCount(u32),
    /// At least this percentage of the fleet, rounded up to whole hosts.
    FleetPercent(u32),
}

/// A fleet deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// Always [`RECORD_VERSION`].
    pub version: u32,
    /// The deployment id (also in every command sent for it).
    pub deployment_id: String,
    /// Application name.
    pub application: String,
    /// Deployment group name.
    pub deployment_group: String,
    /// The revision deployed.
    pub revision: Revision,
    /// The git commit the revision was built from, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_sha: Option<String>,
    /// When that commit was made, for lead time (DORA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<DateTime<Utc>>,
    /// `user@host` of whoever created it.
    pub creator: String,
    /// The deployment configuration's name (`OneAtATime`, ... or `Custom`).
    pub config_name: String,
    /// The minimum healthy hosts rule in force.
    pub minimum_healthy_hosts: MinimumHealthyHosts,
    /// Where it stands.
    pub status: RolloutStatus,
    /// Why it failed or stopped, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// Every target host, by id.
    pub hosts: BTreeMap<String, HostRollout>,
    /// Batches in the order they were dispatched.
    #[serde(default)]
    pub batches: Vec<Batch>,
    /// Zonal rollouts: the zones whose hosts are done and whose monitor period has passed,
    /// in order (a host with no zone is in the zone `""`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub baked_zones: Vec<String>,
    /// Zonal rollouts: the current zone's monitor period ends at this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_until: Option<DateTime<Utc>>,
    /// This deployment rolls back that one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<String>,
    /// That deployment rolled this one back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_by: Option<String>,
    /// Who approved or rejected it, when it was held for approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// The controller driving it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// First batch sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// Reached a final status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// Last written.
    pub updated_at: DateTime<Utc>,
    /// Everything else a controller needs to build the commands and resume (events,
    /// file-exists behaviour, transport, status store, notification queue, options), kept
    /// opaque here so the protocol does not grow with the controller's options.
    #[serde(default)]
    pub settings: serde_json::Value,
}

impl DeploymentRecord {
    /// Parses a stored record, naming the field at fault.
    pub fn from_json(bytes: &[u8]) -> Result<DeploymentRecord, ProtocolError> {
        let rec: DeploymentRecord = crate::parse_versioned(bytes, RECORD_VERSION)?;
        crate::check_id_field("deployment_id", &rec.deployment_id)?;
        for host in rec.hosts.keys() {
            crate::check_id_field("hosts", host)?;
        }
        Ok(rec)
    }

    /// The stored form.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a deployment record always serialises")
    }

    /// How many hosts are in `state`.
    pub fn count(&self, state: HostRolloutState) -> usize {
        self.hosts.values().filter(|h| h.state == state).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_state_names_are_the_serialised_ones() {
        for state in HostRolloutState::ALL {
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::Value::from(state.as_str())
            );
        }
    }
}
