//! The four DORA metrics, computed from deployment records: deployment frequency, lead time
//! for changes, change failure rate and time to restore service, each against the target
//! operators use. `pier dora` prints a [`DoraReport`]; the dashboard serves the same one, so
//! there is one computation and one set of definitions.
//!
//! This module is pure: [`compute`] takes records, a window and the current time, and reads
//! nothing else. Loading records is [`crate::history`]'s job. The definitions below are
//! also in `docs/dora.md`; the two must say the same thing.
//!
//! # Definitions
//!
//! The window is `[window_start, window_end)`. A deployment belongs to the window when it
//! *finished* in it: its `ended_at` is in the window. Deployments that have not finished
//! (`PendingApproval`, `InProgress`) are not counted in any figure; the report counts them as
//! `unfinished`. A final record without an end time (pier never writes one) is ignored.
//!
//! Kinds of finished deployment:
//! - a **rollback** (`rollback_of` set) restores service: it is not a change, so it is left
//!   out of deployment frequency, lead time and change failure rate, but a successful one
//!   ends an incident (time to restore);
//! - a **rejected** one (`Failed` with a negative approval) was never sent to a host: it is
//!   approval working, not a failed change, and counts nowhere;
//! - a **stopped** one (`Stopped`, an operator's decision) counts nowhere unless it was rolled
//!   back, which makes it a change failure;
//! - everything else that is `Succeeded` or `Failed` is a **change**.
//!
//! **Deployment frequency**: successful changes finished in the window divided by the
//! window's length in days (fractional: a 12-hour window is half a day), plus the number per
//! UTC calendar day for a chart (the first and last days may be partial). Target: several a
//! day, i.e. an average of at least [`FREQUENCY_TARGET_PER_DAY`] (elite performers deploy on
//! demand, several times a day).
//!
//! **Lead time for changes**: for each successful change finished in the window, from its
//! commit's time to the deployment's end. Only the *first* successful deployment of a commit
//! to a group measures its lead time: deploying the same commit to the same group again later
//! is counted as a `repeat`, not as a change that took longer. A deployment without a commit
//! time (or commit SHA), or whose commit time is after its end (a wrong clock), is counted as
//! `unknown`, never guessed. Median (the middle value, the mean of the two middle values for
//! an even count) and 90th percentile (nearest rank: the value at rank ⌈0.9·n⌉ of the sorted
//! values). Target: median under one hour.
//!
//! **Change failure rate**: change failures / all changes finished in the window, where a
//! change failure is a `Failed` change, or any change (succeeded or stopped) that a later
//! deployment rolled back (`rolled_back_by` set). The rollback may come after the window, so
//! the rate of a past window can rise as rollbacks are recorded. No changes: no rate.
//! Target: under 15 %.
//!
//! **Time to restore service**: per deployment group, a `Failed` change or rollback starts an
//! incident unless one is already open; it is restored at the end of the next `Succeeded`
//! deployment of the group (a rollback or a fix) that ended after the failure. Further
//! failures while an incident is open are part of it. Time to restore is restored end minus
//! the first failure's end, for incidents that started in the window (the restore may come
//! later). Incidents not restored by `now` are counted as `unrestored`, with the age of the
//! oldest. A successful change that was later rolled back counts as a change failure but
//! starts no incident: the records do not say when the trouble began. Median and maximum.
//! Target: median under one hour; an unrestored incident older than an hour misses it too.
//!
//! A target is `met: null` when there is nothing to judge (no changes, no measured lead time,
//! no incidents).

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::Serialize;

use pier_protocol::record::{DeploymentRecord, RolloutStatus};

/// The average number of successful changes a day that counts as "several a day".
pub const FREQUENCY_TARGET_PER_DAY: f64 = 2.0;
/// Lead time for changes target: a median under this many seconds (one hour).
pub const LEAD_TIME_TARGET_SECONDS: i64 = 3600;
/// Change failure rate target: under this fraction (15 %).
pub const CHANGE_FAILURE_RATE_TARGET: f64 = 0.15;
/// Time to restore target: a median under this many seconds (one hour).
pub const RESTORE_TARGET_SECONDS: i64 = 3600;

/// The four metrics over a window, with the counts they came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DoraReport {
    /// Start of the window (inclusive).
    pub window_start: DateTime<Utc>,
    /// End of the window (exclusive).
    pub window_end: DateTime<Utc>,
    /// When the report was computed (the age of unrestored incidents is taken from it).
    pub computed_at: DateTime<Utc>,
    /// What was counted, and what was left out and why.
    pub deployments: Counts,
    /// Successful changes per day.
    pub deployment_frequency: DeploymentFrequency,
    /// Commit to running in production.
    pub lead_time: LeadTime,
    /// Share of changes that failed or were rolled back.
    pub change_failure_rate: ChangeFailureRate,
    /// Failure to restored service.
    pub time_to_restore: TimeToRestore,
}

/// The deployments that finished in the window, by kind (see the module's definitions).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Changes (not rollbacks) that succeeded.
    pub succeeded: u32,
    /// Changes (not rollbacks) that failed, rejections excluded.
    pub failed: u32,
    /// Changes stopped by an operator.
    pub stopped: u32,
    /// Rollback deployments, whatever their outcome.
    pub rollbacks: u32,
    /// Deployments rejected at approval (never sent).
    pub rejected: u32,
    /// Deployments not finished yet (pending approval or in progress), whenever created.
    pub unfinished: u32,
}

/// Whether a figure meets the target operators use.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    /// The target, for people (e.g. `< 1 h`).
    pub goal: String,
    /// Met, missed, or `None` when there is nothing to judge.
    pub met: Option<bool>,
}

/// Successful changes in one UTC calendar day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DayCount {
    /// The day (UTC).
    pub date: NaiveDate,
    /// Successful changes that finished that day.
    pub deployments: u32,
    /// Change failures that finished that day.
    pub failures: u32,
}

/// Deployment frequency.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeploymentFrequency {
    /// Successful changes finished in the window.
    pub deployments: u32,
    /// The window's length in days.
    pub days: f64,
    /// `deployments / days`; `None` for an empty window.
    pub per_day: Option<f64>,
    /// Per UTC day of the window, oldest first, every day present (zeros included).
    pub daily: Vec<DayCount>,
    /// Several a day.
    pub target: Target,
}

/// Lead time for changes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeadTime {
    /// Changes whose lead time was measured.
    pub measured: u32,
    /// Successful changes with no usable commit time.
    pub unknown: u32,
    /// Successful changes of a commit already deployed to the group (not measured).
    pub repeats: u32,
    /// Median, seconds.
    pub median_seconds: Option<i64>,
    /// 90th percentile (nearest rank), seconds.
    pub p90_seconds: Option<i64>,
    /// Median under one hour.
    pub target: Target,
}

/// Change failure rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChangeFailureRate {
    /// Failed changes, and changes later rolled back.
    pub failures: u32,
    /// All changes counted (succeeded, failed, and stopped ones that were rolled back).
    pub changes: u32,
    /// `failures / changes` as a fraction; `None` when there were no changes.
    pub rate: Option<f64>,
    /// Under 15 %.
    pub target: Target,
}

/// Time to restore service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimeToRestore {
    /// Incidents that started in the window.
    pub incidents: u32,
    /// Of those, restored (by now).
    pub restored: u32,
    /// Of those, not restored yet.
    pub unrestored: u32,
    /// Median over restored incidents, seconds.
    pub median_seconds: Option<i64>,
    /// Maximum over restored incidents, seconds.
    pub max_seconds: Option<i64>,
    /// Age of the oldest unrestored incident at `computed_at`, seconds.
    pub oldest_unrestored_seconds: Option<i64>,
    /// Median under one hour (and no unrestored incident older than that).
    pub target: Target,
}

/// What a finished deployment is, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Restores service; not a change.
    Rollback,
    /// Never sent.
    Rejected,
    /// Stopped and not rolled back: an operator's decision.
    Stopped,
    /// A change: `failure` when it failed or was rolled back.
    Change { succeeded: bool, failure: bool },
}

fn kind(r: &DeploymentRecord) -> Kind {
    if r.rollback_of.is_some() {
        return Kind::Rollback;
    }
    let rolled_back = r.rolled_back_by.is_some();
    match r.status {
        RolloutStatus::Failed if r.approval.as_ref().is_some_and(|a| !a.approved) => Kind::Rejected,
        RolloutStatus::Failed => Kind::Change {
            succeeded: false,
            failure: true,
        },
        RolloutStatus::Succeeded => Kind::Change {
            succeeded: true,
            failure: rolled_back,
        },
        RolloutStatus::Stopped if rolled_back => Kind::Change {
            succeeded: false,
            failure: true,
        },
        // Not final states never reach here (they have no end); a stop counts nowhere.
        RolloutStatus::Stopped | RolloutStatus::PendingApproval | RolloutStatus::InProgress => {
            Kind::Stopped
        }
    }
}

/// Computes the report over `[window_start, window_end)` from `records` (all of them, in any
/// order: deployments before the window matter for repeats and incidents). Pure.
pub fn compute(
    records: &[DeploymentRecord],
    window_start: DateTime<Utc>,
    window_end: DateTime<Utc>,
    now: DateTime<Utc>,
) -> DoraReport {
    let in_window = |t: DateTime<Utc>| t >= window_start && t < window_end;
    // Finished deployments, oldest end first (ties by id, so the result does not depend on
    // the order records were listed in).
    let mut finished: Vec<(&DeploymentRecord, DateTime<Utc>)> = records
        .iter()
        .filter(|r| r.status.is_final())
        .filter_map(|r| r.ended_at.map(|e| (r, e)))
        .collect();
    finished.sort_by(|(a, ae), (b, be)| ae.cmp(be).then(a.deployment_id.cmp(&b.deployment_id)));

    let mut counts = Counts {
        unfinished: records.iter().filter(|r| !r.status.is_final()).count() as u32,
        ..Counts::default()
    };
    let mut daily: BTreeMap<NaiveDate, DayCount> = days(window_start, window_end)
        .map(|date| {
            (
                date,
                DayCount {
                    date,
                    deployments: 0,
                    failures: 0,
                },
            )
        })
        .collect();
    let mut failures = 0u32;
    let mut changes = 0u32;
    let mut lead_times = Vec::new();
    let mut unknown = 0u32;
    let mut repeats = 0u32;
    // (group, commit) pairs already deployed successfully, from all history up to the
    // deployment being looked at.
    let mut deployed: HashSet<(&str, &str)> = HashSet::new();

    for &(r, end) in &finished {
        let k = kind(r);
        let first_of_commit = match (k, r.commit_sha.as_deref()) {
            (
                Kind::Change {
                    succeeded: true, ..
                },
                Some(sha),
            ) => deployed.insert((r.deployment_group.as_str(), sha)),
            _ => false,
        };
        if !in_window(end) {
            continue;
        }
        match k {
            Kind::Rollback => counts.rollbacks += 1,
            Kind::Rejected => counts.rejected += 1,
            Kind::Stopped => counts.stopped += 1,
            Kind::Change { succeeded, failure } => {
                changes += 1;
                if r.status == RolloutStatus::Stopped {
                    counts.stopped += 1;
                } else if succeeded {
                    counts.succeeded += 1;
                } else {
                    counts.failed += 1;
                }
                // Every instant of the window has its day, so the entry exists.
                let day = daily.entry(end.date_naive()).or_insert(DayCount {
                    date: end.date_naive(),
                    deployments: 0,
                    failures: 0,
                });
                if failure {
                    failures += 1;
                    day.failures += 1;
                }
                if !succeeded {
                    continue;
                }
                day.deployments += 1;
                match (r.commit_sha.as_deref(), r.commit_time) {
                    (Some(_), Some(t)) if t <= end => {
                        if first_of_commit {
                            lead_times.push((end - t).num_seconds());
                        } else {
                            repeats += 1;
                        }
                    }
                    _ => unknown += 1,
                }
            }
        }
    }

    let days_len = (window_end - window_start).num_milliseconds() as f64 / 86_400_000.0;
    let per_day = (days_len > 0.0).then(|| f64::from(counts.succeeded) / days_len);
    lead_times.sort_unstable();
    let lead_median = median(&lead_times);
    let rate = (changes > 0).then(|| f64::from(failures) / f64::from(changes));
    let restore = restore_times(&finished, &in_window, now);

    DoraReport {
        window_start,
        window_end,
        computed_at: now,
        deployment_frequency: DeploymentFrequency {
            deployments: counts.succeeded,
            days: days_len.max(0.0),
            per_day,
            daily: daily.into_values().collect(),
            target: Target {
                goal: format!("several a day (≥ {FREQUENCY_TARGET_PER_DAY} a day)"),
                met: per_day.map(|p| p >= FREQUENCY_TARGET_PER_DAY),
            },
        },
        lead_time: LeadTime {
            measured: lead_times.len() as u32,
            unknown,
            repeats,
            median_seconds: lead_median,
            p90_seconds: nearest_rank(&lead_times, 90),
            target: Target {
                goal: "median < 1 h".into(),
                met: lead_median.map(|m| m < LEAD_TIME_TARGET_SECONDS),
            },
        },
        change_failure_rate: ChangeFailureRate {
            failures,
            changes,
            rate,
            target: Target {
                goal: "< 15 %".into(),
                met: rate.map(|r| r < CHANGE_FAILURE_RATE_TARGET),
            },
        },
        time_to_restore: restore,
        deployments: counts,
    }
}

/// Every UTC date the window touches, oldest first.
fn days(start: DateTime<Utc>, end: DateTime<Utc>) -> impl Iterator<Item = NaiveDate> {
    let first = start.date_naive();
    // The last instant in the window is just before `end`.
    let last = (end - Duration::nanoseconds(1)).date_naive();
    let n = if end > start {
        (last - first).num_days() + 1
    } else {
        0
    };
    (0..n).map(move |i| first + Duration::days(i))
}

/// Incidents per group over all `finished` (oldest end first), restore times of those that
/// started in the window.
fn restore_times(
    finished: &[(&DeploymentRecord, DateTime<Utc>)],
    in_window: &dyn Fn(DateTime<Utc>) -> bool,
    now: DateTime<Utc>,
) -> TimeToRestore {
    // Open incident per group: when it started.
    let mut open: BTreeMap<&str, DateTime<Utc>> = BTreeMap::new();
    let mut restored = Vec::new();
    for &(r, end) in finished {
        let group = r.deployment_group.as_str();
        match (r.status, kind(r)) {
            (_, Kind::Rejected) => {}
            (RolloutStatus::Failed, _) => {
                open.entry(group).or_insert(end);
            }
            (RolloutStatus::Succeeded, _) => {
                if let Some(start) = open.remove(group) {
                    if in_window(start) {
                        restored.push((end - start).num_seconds());
                    }
                }
            }
            _ => {}
        }
    }
    let unrestored: Vec<i64> = open
        .values()
        .filter(|s| in_window(**s))
        .map(|s| (now - *s).num_seconds().max(0))
        .collect();
    restored.sort_unstable();
    let median_seconds = median(&restored);
    let oldest_unrestored_seconds = unrestored.iter().copied().max();
    let met = if oldest_unrestored_seconds.is_some_and(|a| a >= RESTORE_TARGET_SECONDS) {
        Some(false)
    } else {
        median_seconds.map(|m| m < RESTORE_TARGET_SECONDS)
    };
    TimeToRestore {
        incidents: (restored.len() + unrestored.len()) as u32,
        restored: restored.len() as u32,
        unrestored: unrestored.len() as u32,
        median_seconds,
        max_seconds: restored.last().copied(),
        oldest_unrestored_seconds,
        target: Target {
            goal: "median < 1 h".into(),
            met,
        },
    }
}

/// The median of sorted values (the mean of the two middle ones for an even count, rounded
/// down to a whole second).
fn median(sorted: &[i64]) -> Option<i64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]).div_euclid(2)),
    }
}

/// The `p`th percentile of sorted values by nearest rank: the value at rank ⌈p·n/100⌉.
fn nearest_rank(sorted: &[i64], p: usize) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    Some(sorted[rank - 1])
}

/// A duration for people: `45s`, `4m12s`, `2h03m`, `3d04h`.
pub fn human_duration(seconds: i64) -> String {
    let (sign, s) = if seconds < 0 {
        ("-", seconds.unsigned_abs())
    } else {
        ("", seconds as u64)
    };
    let text = match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    };
    format!("{sign}{text}")
}

/// The report as a few aligned lines for a terminal: each figure, how it was counted, and
/// its target.
pub fn render_text(report: &DoraReport) -> String {
    let f = &report.deployment_frequency;
    let l = &report.lead_time;
    let c = &report.change_failure_rate;
    let t = &report.time_to_restore;
    let opt = |v: Option<i64>| v.map(human_duration).unwrap_or_else(|| "-".into());
    let rows = [
        (
            "Deployment frequency",
            match f.per_day {
                Some(p) => format!("{p:.2} a day ({} in {:.1} days)", f.deployments, f.days),
                None => "- (empty window)".into(),
            },
            &f.target,
        ),
        (
            "Lead time for changes",
            format!(
                "median {}, p90 {} ({} measured, {} unknown, {} repeats)",
                opt(l.median_seconds),
                opt(l.p90_seconds),
                l.measured,
                l.unknown,
                l.repeats
            ),
            &l.target,
        ),
        (
            "Change failure rate",
            match c.rate {
                Some(r) => format!(
                    "{:.1} % ({} of {} changes)",
                    r * 100.0,
                    c.failures,
                    c.changes
                ),
                None => "- (no changes)".into(),
            },
            &c.target,
        ),
        (
            "Time to restore",
            format!(
                "median {}, max {} ({} incidents, {} unrestored{})",
                opt(t.median_seconds),
                opt(t.max_seconds),
                t.incidents,
                t.unrestored,
                t.oldest_unrestored_seconds
                    .map(|a| format!(", oldest open {}", human_duration(a)))
                    .unwrap_or_default()
            ),
            &t.target,
        ),
    ];
    let value_width = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
    let mut out = format!(
        "{} to {}\n",
        report.window_start.format("%Y-%m-%d %H:%M UTC"),
        report.window_end.format("%Y-%m-%d %H:%M UTC")
    );
    for (name, value, target) in rows {
        let verdict = match target.met {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "n/a",
        };
        out.push_str(&format!(
            "{name:<22} {value:<value_width$}  target {}: {verdict}\n",
            target.goal
        ));
    }
    let d = &report.deployments;
    out.push_str(&format!(
        "finished in the window: {} succeeded, {} failed, {} stopped; not changes: {} \
         rollbacks, {} rejected; not finished: {} (definitions: docs/dora.md)\n",
        d.succeeded, d.failed, d.stopped, d.rollbacks, d.rejected, d.unfinished
    ));
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pier_protocol::record::{Approval, MinimumHealthyHosts, RECORD_VERSION};
    use pier_protocol::{BundleType, Revision};

    /// `2026-03-DDTHH:MM:00Z`, or February for day 0 (28 Feb).
    pub(crate) fn at(day: u32, hh: u32, mm: u32) -> DateTime<Utc> {
        let s = if day == 0 {
            format!("2026-02-28T{hh:02}:{mm:02}:00Z")
        } else {
            format!("2026-03-{day:02}T{hh:02}:{mm:02}:00Z")
        };
        s.parse().unwrap()
    }

    /// A record of `group` (application `shop`) in `status`, ended at `ended`.
    pub(crate) fn rec(
        id: &str,
        group: &str,
        status: RolloutStatus,
        ended: Option<DateTime<Utc>>,
    ) -> DeploymentRecord {
        let t = ended.unwrap_or(at(2, 23, 0));
        DeploymentRecord {
            version: RECORD_VERSION,
            deployment_id: id.into(),
            application: "shop".into(),
            deployment_group: group.into(),
            revision: Revision::Local {
                path: format!("/revs/{id}.tgz"),
                bundle_type: BundleType::Tgz,
                sha256: None,
            },
            commit_sha: None,
            commit_time: None,
            creator: "ops@box".into(),
            config_name: "AllAtOnce".into(),
            minimum_healthy_hosts: MinimumHealthyHosts::HostCount(0),
            status,
            status_reason: None,
            hosts: Default::default(),
            batches: Vec::new(),
            baked_zones: Vec::new(),
            bake_until: None,
            rollback_of: None,
            rolled_back_by: None,
            approval: None,
            lease: None,
            created_at: t - Duration::minutes(5),
            started_at: Some(t - Duration::minutes(4)),
            ended_at: ended,
            updated_at: t,
            settings: serde_json::Value::Null,
        }
    }

    fn commit(mut r: DeploymentRecord, sha: &str, time: Option<DateTime<Utc>>) -> DeploymentRecord {
        r.commit_sha = Some(sha.into());
        r.commit_time = time;
        r
    }

    fn rollback_of(mut r: DeploymentRecord, of: &str) -> DeploymentRecord {
        r.rollback_of = Some(of.into());
        r
    }

    fn rolled_back_by(mut r: DeploymentRecord, by: &str) -> DeploymentRecord {
        r.rolled_back_by = Some(by.into());
        r
    }

    use RolloutStatus::{Failed, InProgress, PendingApproval, Stopped, Succeeded};

    /// Two groups over a two-day window, 1 March 00:00 to 3 March 00:00 UTC, with every kind
    /// of deployment the definitions name. The figures in the test are worked out by hand
    /// from this list.
    fn history() -> Vec<DeploymentRecord> {
        let mut rejected = rec("d-10", "api", Failed, Some(at(2, 11, 0)));
        rejected.approval = Some(Approval {
            approved: false,
            by: "boss@box".into(),
            at: at(2, 11, 0),
            comment: None,
        });
        let mut unfinished = rec("d-15", "api", InProgress, None);
        unfinished.started_at = Some(at(2, 23, 50));
        let mut pending = rec("d-16", "web", PendingApproval, None);
        pending.started_at = None;
        vec![
            // Before the window: web gets c1; api fails (an incident that started before
            // the window).
            commit(
                rec("d-0A", "web", Succeeded, Some(at(0, 20, 0))),
                "c1",
                Some(at(0, 19, 0)),
            ),
            rec("d-0B", "api", Failed, Some(at(0, 23, 0))),
            // 1 March.
            commit(
                rec("d-01", "web", Succeeded, Some(at(1, 10, 0))),
                "c2",
                Some(at(1, 9, 30)),
            ),
            commit(
                rec("d-02", "api", Succeeded, Some(at(1, 11, 0))),
                "c3",
                Some(at(1, 9, 0)),
            ),
            commit(
                rec("d-03", "web", Succeeded, Some(at(1, 14, 0))),
                "c1",
                Some(at(0, 19, 0)),
            ),
            rolled_back_by(
                commit(
                    rec("d-04", "web", Failed, Some(at(1, 15, 0))),
                    "c4",
                    Some(at(1, 14, 30)),
                ),
                "d-06",
            ),
            rollback_of(rec("d-05", "web", Failed, Some(at(1, 15, 20))), "d-04"),
            rollback_of(rec("d-06", "web", Succeeded, Some(at(1, 15, 40))), "d-04"),
            // 2 March.
            rolled_back_by(
                commit(rec("d-07", "web", Succeeded, Some(at(2, 9, 0))), "c5", None),
                "d-08",
            ),
            rollback_of(rec("d-08", "web", Succeeded, Some(at(2, 9, 30))), "d-07"),
            rec("d-09", "api", Stopped, Some(at(2, 10, 0))),
            rejected,
            commit(
                rec("d-11", "api", Failed, Some(at(2, 12, 0))),
                "c6",
                Some(at(2, 11, 0)),
            ),
            commit(
                rec("d-12", "api", Succeeded, Some(at(2, 14, 30))),
                "c7",
                Some(at(2, 14, 0)),
            ),
            rolled_back_by(rec("d-18", "api", Stopped, Some(at(2, 16, 0))), "d-19"),
            rollback_of(rec("d-19", "api", Succeeded, Some(at(2, 16, 10))), "d-18"),
            commit(
                rec("d-13", "web", Succeeded, Some(at(2, 18, 0))),
                "c8",
                Some(at(2, 8, 0)),
            ),
            commit(
                rec("d-14", "web", Failed, Some(at(2, 23, 0))),
                "c9",
                Some(at(2, 22, 0)),
            ),
            unfinished,
            pending,
            // On the window's end, so outside it.
            commit(
                rec("d-17", "api", Succeeded, Some(at(3, 0, 0))),
                "c10",
                Some(at(2, 23, 0)),
            ),
        ]
    }

    #[test]
    fn figures_of_a_constructed_history() {
        let mut records = history();
        // The order records are listed in does not matter.
        records.reverse();
        let r = compute(&records, at(1, 0, 0), at(3, 0, 0), at(3, 0, 0));

        // Finished in the window, by kind:
        // succeeded changes d-01 d-02 d-03 d-07 d-12 d-13 = 6; failed d-04 d-11 d-14 = 3;
        // stopped d-09 d-18 = 2; rollbacks d-05 d-06 d-08 d-19 = 4; rejected d-10 = 1;
        // unfinished d-15 d-16 = 2. d-0A, d-0B end before the window, d-17 on its end.
        assert_eq!(
            r.deployments,
            Counts {
                succeeded: 6,
                failed: 3,
                stopped: 2,
                rollbacks: 4,
                rejected: 1,
                unfinished: 2,
            }
        );

        // Frequency: 6 successful changes / 2 days = 3.0 a day ≥ 2: met.
        // 1 March: d-01 d-02 d-03 succeed, d-04 fails.
        // 2 March: d-07 d-12 d-13 succeed; failures d-07 (rolled back), d-11, d-14, d-18.
        let f = &r.deployment_frequency;
        assert_eq!((f.deployments, f.days, f.per_day), (6, 2.0, Some(3.0)));
        assert_eq!(f.target.met, Some(true));
        let daily: Vec<(String, u32, u32)> = f
            .daily
            .iter()
            .map(|d| (d.date.to_string(), d.deployments, d.failures))
            .collect();
        assert_eq!(
            daily,
            [("2026-03-01".into(), 3, 1), ("2026-03-02".into(), 3, 4)]
        );

        // Lead time: d-01 09:30→10:00 = 1800 s; d-02 09:00→11:00 = 7200 s;
        // d-12 14:00→14:30 = 1800 s; d-13 08:00→18:00 = 36000 s. d-03 deploys c1, which
        // d-0A already took to web: a repeat. d-07 has no commit time: unknown.
        // Sorted [1800, 1800, 7200, 36000]: median (1800 + 7200) / 2 = 4500 s ≥ 3600: not
        // met; p90 rank ⌈0.9 × 4⌉ = 4 → 36000 s.
        let l = &r.lead_time;
        assert_eq!((l.measured, l.unknown, l.repeats), (4, 1, 1));
        assert_eq!((l.median_seconds, l.p90_seconds), (Some(4500), Some(36000)));
        assert_eq!(l.target.met, Some(false));

        // Change failure rate: changes = 6 succeeded + 3 failed + d-18 (stopped, rolled
        // back) = 10; failures = d-04 d-11 d-14 (failed) + d-07 d-18 (rolled back) = 5;
        // 5 / 10 = 50 % ≥ 15 %: not met. d-09 (stopped, not rolled back), d-10 (rejected)
        // and the rollbacks are not changes.
        let c = &r.change_failure_rate;
        assert_eq!((c.failures, c.changes, c.rate), (5, 10, Some(0.5)));
        assert_eq!(c.target.met, Some(false));

        // Time to restore, incidents starting in the window:
        // web: d-04 fails 1 Mar 15:00, the rollback d-05 fails too (same incident), d-06
        //      succeeds 15:40 → 2400 s;
        // api: d-11 fails 2 Mar 12:00, d-12 succeeds 14:30 → 9000 s;
        // web: d-14 fails 2 Mar 23:00, nothing after it: unrestored, 3600 s old at now.
        // api's d-0B incident (restored by d-02) started before the window; d-07's rollback
        // starts none; d-10 was rejected, d-09 and d-18 stopped.
        // Median (2400 + 9000) / 2 = 5700 s, max 9000 s; an unrestored incident an hour
        // old already misses the target.
        let t = &r.time_to_restore;
        assert_eq!((t.incidents, t.restored, t.unrestored), (3, 2, 1));
        assert_eq!((t.median_seconds, t.max_seconds), (Some(5700), Some(9000)));
        assert_eq!(t.oldest_unrestored_seconds, Some(3600));
        assert_eq!(t.target.met, Some(false));
    }

    #[test]
    fn targets_met_on_a_good_day() {
        // 12 h window, 1 Mar 00:00–12:00: d-01 (lead 1800 s), d-02 (lead 7200 s) succeed,
        // nothing fails. Frequency 2 / 0.5 days = 4 a day: met. Lead time median
        // (1800 + 7200) / 2 = 4500 s: not met. Change failure rate 0 / 2 = 0 %: met.
        // No incidents: time to restore has nothing to judge.
        let r = compute(&history(), at(1, 0, 0), at(1, 12, 0), at(1, 12, 0));
        assert_eq!(r.deployment_frequency.per_day, Some(4.0));
        assert_eq!(r.deployment_frequency.target.met, Some(true));
        assert_eq!(r.lead_time.median_seconds, Some(4500));
        assert_eq!(r.change_failure_rate.rate, Some(0.0));
        assert_eq!(r.change_failure_rate.target.met, Some(true));
        assert_eq!(r.time_to_restore.incidents, 0);
        assert_eq!(r.time_to_restore.target.met, None);
        assert_eq!(r.deployment_frequency.daily.len(), 1);
    }

    #[test]
    fn an_empty_window_has_nothing_to_judge_but_frequency() {
        let r = compute(&[], at(1, 0, 0), at(2, 0, 0), at(2, 0, 0));
        // No deployments in a day: 0 a day, which is not several.
        assert_eq!(r.deployment_frequency.per_day, Some(0.0));
        assert_eq!(r.deployment_frequency.target.met, Some(false));
        assert_eq!(r.deployment_frequency.daily.len(), 1);
        assert_eq!(r.lead_time.median_seconds, None);
        assert_eq!(r.lead_time.target.met, None);
        assert_eq!(r.change_failure_rate.rate, None);
        assert_eq!(r.change_failure_rate.target.met, None);
        assert_eq!(r.time_to_restore.target.met, None);
        // A window of no length: no rate at all, no days.
        let r = compute(&history(), at(1, 0, 0), at(1, 0, 0), at(1, 0, 0));
        assert_eq!(r.deployment_frequency.per_day, None);
        assert!(r.deployment_frequency.daily.is_empty());
        // Serialises for `--format json` and the dashboard.
        let v = serde_json::to_value(&r).unwrap();
        assert!(v["lead_time"]["median_seconds"].is_null());
    }

    #[test]
    fn a_commit_time_after_the_end_is_unknown_not_negative() {
        let r = commit(
            rec("d-1", "web", Succeeded, Some(at(1, 10, 0))),
            "c",
            Some(at(1, 11, 0)),
        );
        let rep = compute(&[r], at(1, 0, 0), at(2, 0, 0), at(2, 0, 0));
        assert_eq!((rep.lead_time.measured, rep.lead_time.unknown), (0, 1));
    }

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[5]), Some(5));
        assert_eq!(median(&[1, 2, 10]), Some(2));
        assert_eq!(median(&[1, 2]), Some(1)); // 1.5 rounded down
        assert_eq!(nearest_rank(&[7], 90), Some(7));
        // Ten values: rank ⌈9⌉ = 9.
        let ten: Vec<i64> = (1..=10).collect();
        assert_eq!(nearest_rank(&ten, 90), Some(9));
        // Eleven values: rank ⌈9.9⌉ = 10.
        let eleven: Vec<i64> = (1..=11).collect();
        assert_eq!(nearest_rank(&eleven, 90), Some(10));
    }

    #[test]
    fn durations_for_people() {
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(252), "4m12s");
        assert_eq!(human_duration(7380), "2h03m");
        assert_eq!(human_duration(3 * 86400 + 4 * 3600 + 59), "3d04h");
        assert_eq!(human_duration(-60), "-1m00s");
    }

    #[test]
    fn the_text_report_names_each_figure_and_its_verdict() {
        let r = compute(&history(), at(1, 0, 0), at(3, 0, 0), at(3, 0, 0));
        let text = render_text(&r);
        assert!(text.contains("3.00 a day (6 in 2.0 days)"), "{text}");
        assert!(text.contains("median 1h15m, p90 10h00m"), "{text}");
        assert!(text.contains("50.0 % (5 of 10 changes)"), "{text}");
        assert!(text.contains("NOT MET"), "{text}");
    }
}
