//! CodeDeploy's rollout rules: how many hosts must stay healthy while a deployment runs
//! ([`DeploymentConfig`]), and, from how the target hosts stand ([`Tally`]), what a rollout does
//! next ([`next_step`]): send a batch of so many hosts, wait for the batch in flight, or end.
//!
//! Pure arithmetic, no I/O and no clock: which hosts go into a batch, recording it and sending
//! the commands are the caller's (the rollout driver's). The meaning is CodeDeploy's, as
//! `docs/architecture.md` and issue 9 state it: the minimum healthy hosts is a host count or a
//! fleet percentage rounded up to whole hosts; hosts still on the old revision and hosts that
//! succeeded count as healthy, hosts being deployed to and hosts that failed do not; a
//! deployment succeeds only if at least one host succeeds, and fails as soon as the minimum
//! can no longer be met.

use std::fmt;

use pier_protocol::quote::quote;
use pier_protocol::record::MinimumHealthyHosts;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The forms [`DeploymentConfig::parse`] accepts, for messages.
const CONFIG_FORMS: &str = "OneAtATime, HalfAtATime, AllAtOnce, HOST_COUNT:N or FLEET_PERCENT:N";

/// Why a deployment configuration cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    /// Not a named configuration and not `TYPE:VALUE`.
    #[error("unknown deployment configuration {}: use {CONFIG_FORMS}", quote(.0))]
    UnknownConfig(String),
    /// The minimum healthy hosts type is neither `HOST_COUNT` nor `FLEET_PERCENT`.
    #[error("unknown minimum healthy hosts type {}: use HOST_COUNT or FLEET_PERCENT", quote(.0))]
    UnknownKind(String),
    /// The value is not a whole number of at least 0.
    #[error("{kind} needs a whole number of at least 0, not {}", quote(.value))]
    BadValue {
        /// `HOST_COUNT` or `FLEET_PERCENT`.
        kind: &'static str,
        /// The value as written.
        value: String,
    },
    /// A fleet percentage of 100 or more leaves no host to deploy to, whatever the fleet.
    #[error(
        "FLEET_PERCENT {0} would keep every host healthy and leave none to deploy to; \
         use a value from 0 to 99"
    )]
    PercentTooHigh(u32),
}

/// A deployment configuration: one of CodeDeploy's named ones, or a custom minimum of healthy
/// hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeploymentConfig {
    /// One host at a time; every host but one stays healthy, so a failure on the last host
    /// alone still lets the deployment succeed. CodeDeploy's default.
    OneAtATime,
    /// Up to half the hosts at a time (rounded down): at least half, rounded up, stay healthy.
    HalfAtATime,
    /// Every host at once; succeeds if at least one host succeeds.
    AllAtOnce,
    /// A custom minimum (`HOST_COUNT:N` or `FLEET_PERCENT:N`).
    Custom(MinimumHealthyHosts),
}

impl DeploymentConfig {
    /// The name recorded in a deployment record: `OneAtATime`, `HalfAtATime`, `AllAtOnce` or
    /// `Custom`.
    pub fn name(&self) -> String {
        match self {
            DeploymentConfig::OneAtATime => "OneAtATime",
            DeploymentConfig::HalfAtATime => "HalfAtATime",
            DeploymentConfig::AllAtOnce => "AllAtOnce",
            DeploymentConfig::Custom(_) => "Custom",
        }
        .to_string()
    }

    /// The minimum healthy hosts this configuration means for a fleet of `total` hosts (only
    /// `OneAtATime` depends on the fleet: all but one).
    pub fn minimum(&self, total: usize) -> MinimumHealthyHosts {
        match self {
            DeploymentConfig::OneAtATime => MinimumHealthyHosts::HostCount(
                u32::try_from(total.saturating_sub(1)).unwrap_or(u32::MAX),
            ),
            DeploymentConfig::HalfAtATime => MinimumHealthyHosts::FleetPercent(50),
            DeploymentConfig::AllAtOnce => MinimumHealthyHosts::HostCount(0),
            DeploymentConfig::Custom(m) => *m,
        }
    }

    /// How many of `total` hosts must stay healthy: a host count as it is, a fleet percentage
    /// rounded up to whole hosts (as CodeDeploy does: 40 % of 9 hosts is 4).
    pub fn min_healthy(&self, total: usize) -> usize {
        match self.minimum(total) {
            MinimumHealthyHosts::HostCount(n) => n as usize,
            MinimumHealthyHosts::FleetPercent(p) => {
                ((total as u64 * u64::from(p)).div_ceil(100)) as usize
            }
        }
    }

    /// Reads the command-line form: `OneAtATime`, `HalfAtATime`, `AllAtOnce` (each also with
    /// CodeDeploy's `CodeDeployDefault.` prefix), `HOST_COUNT:N` or `FLEET_PERCENT:N`.
    pub fn parse(s: &str) -> Result<DeploymentConfig, RulesError> {
        let named = s.strip_prefix("CodeDeployDefault.").unwrap_or(s);
        match named {
            "OneAtATime" => return Ok(DeploymentConfig::OneAtATime),
            "HalfAtATime" => return Ok(DeploymentConfig::HalfAtATime),
            "AllAtOnce" => return Ok(DeploymentConfig::AllAtOnce),
            _ => {}
        }
        let Some((kind, value)) = s.split_once(':') else {
            return Err(RulesError::UnknownConfig(s.to_string()));
        };
        let kind = min_kind(kind).ok_or_else(|| RulesError::UnknownConfig(s.to_string()))?;
        let n = value.parse::<u32>().map_err(|_| RulesError::BadValue {
            kind: kind.name(),
            value: value.to_string(),
        })?;
        kind.build(n)
    }
}

/// The two kinds of custom minimum, named once for both forms (`TYPE:N` and the YAML map).
#[derive(Clone, Copy)]
enum MinKind {
    HostCount,
    FleetPercent,
}

fn min_kind(s: &str) -> Option<MinKind> {
    match s {
        "HOST_COUNT" => Some(MinKind::HostCount),
        "FLEET_PERCENT" => Some(MinKind::FleetPercent),
        _ => None,
    }
}

impl MinKind {
    fn name(self) -> &'static str {
        match self {
            MinKind::HostCount => "HOST_COUNT",
            MinKind::FleetPercent => "FLEET_PERCENT",
        }
    }

    /// The custom configuration, refusing a percentage that can never leave a host to deploy to
    /// (a host count can only be judged against the fleet, when the deployment starts).
    fn build(self, n: u32) -> Result<DeploymentConfig, RulesError> {
        Ok(DeploymentConfig::Custom(match self {
            MinKind::HostCount => MinimumHealthyHosts::HostCount(n),
            MinKind::FleetPercent if n >= 100 => return Err(RulesError::PercentTooHigh(n)),
            MinKind::FleetPercent => MinimumHealthyHosts::FleetPercent(n),
        }))
    }
}

/// `HOST_COUNT 6` or `FLEET_PERCENT 40`, for messages.
fn describe(m: MinimumHealthyHosts) -> String {
    match m {
        MinimumHealthyHosts::HostCount(n) => format!("HOST_COUNT {n}"),
        MinimumHealthyHosts::FleetPercent(p) => format!("FLEET_PERCENT {p}"),
    }
}

impl fmt::Display for DeploymentConfig {
    /// The form [`DeploymentConfig::parse`] reads back: the name, or `TYPE:N` for a custom one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeploymentConfig::Custom(MinimumHealthyHosts::HostCount(n)) => {
                write!(f, "HOST_COUNT:{n}")
            }
            DeploymentConfig::Custom(MinimumHealthyHosts::FleetPercent(p)) => {
                write!(f, "FLEET_PERCENT:{p}")
            }
            named => f.write_str(&named.name()),
        }
    }
}

impl Serialize for DeploymentConfig {
    /// Always the string form, which every reader of a group accepts.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DeploymentConfig {
    /// Either the string form ([`DeploymentConfig::parse`]) or
    /// `{minimum_healthy_hosts: {type: HOST_COUNT|FLEET_PERCENT, value: N}}`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ConfigVisitor)
    }
}

struct ConfigVisitor;

/// The inner `{type, value}` map of the custom form.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMinimum {
    #[serde(rename = "type")]
    kind: String,
    value: i64,
}

impl<'de> Visitor<'de> for ConfigVisitor {
    type Value = DeploymentConfig;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a deployment configuration ({CONFIG_FORMS}) or {{minimum_healthy_hosts: {{type: \
             HOST_COUNT|FLEET_PERCENT, value: N}}}}"
        )
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<DeploymentConfig, E> {
        DeploymentConfig::parse(v).map_err(E::custom)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DeploymentConfig, A::Error> {
        let mut minimum: Option<RawMinimum> = None;
        while let Some(key) = map.next_key::<String>()? {
            if key != "minimum_healthy_hosts" {
                return Err(de::Error::unknown_field(&key, &["minimum_healthy_hosts"]));
            }
            if minimum.is_some() {
                return Err(de::Error::duplicate_field("minimum_healthy_hosts"));
            }
            minimum = Some(map.next_value()?);
        }
        let raw = minimum.ok_or_else(|| de::Error::missing_field("minimum_healthy_hosts"))?;
        let kind = min_kind(&raw.kind)
            .ok_or_else(|| de::Error::custom(RulesError::UnknownKind(raw.kind.clone())))?;
        let n = u32::try_from(raw.value).map_err(|_| {
            de::Error::custom(RulesError::BadValue {
                kind: kind.name(),
                value: raw.value.to_string(),
            })
        })?;
        kind.build(n).map_err(de::Error::custom)
    }
}

/// CodeDeploy's zonal configuration: one availability zone at a time, a monitor (bake)
/// period after each zone (a separate one after the first), and optionally a minimum of
/// healthy hosts within each zone, which caps how many of a zone's hosts go at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZonalConfig {
    /// Seconds to watch alarms after the first zone completes.
    pub first_zone_monitor_seconds: u64,
    /// Seconds to watch alarms after each later zone completes.
    pub monitor_seconds: u64,
    /// Healthy hosts to keep within a zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_healthy_hosts_per_zone: Option<MinimumHealthyHosts>,
}

impl ZonalConfig {
    /// How many of a zone's hosts may go in the next batch: the zone's healthy hosts above its
    /// minimum, but always at least one, so a small zone is never stuck.
    pub fn zone_capacity(&self, zone_total: usize, zone_healthy: usize) -> usize {
        match self.minimum_healthy_hosts_per_zone {
            None => usize::MAX,
            Some(m) => {
                let min = DeploymentConfig::Custom(m).min_healthy(zone_total);
                zone_healthy.saturating_sub(min).max(1)
            }
        }
    }
}

/// How the target hosts of a rollout stand. `total` is the sum of the other four.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Every target host.
    pub total: usize,
    /// Not sent yet: still on the old revision, so healthy.
    pub pending: usize,
    /// Sent and not finished: out of service.
    pub in_progress: usize,
    /// Finished with success: healthy.
    pub succeeded: usize,
    /// Finished with failure (or no report in time): not healthy.
    pub failed: usize,
}

/// What a rollout does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send this many more pending hosts (at least one).
    Dispatch(usize),
    /// Wait for the hosts in flight (rollouts go batch by batch).
    Wait,
    /// Every host is done and enough succeeded.
    Succeeded,
    /// The deployment has failed; send nothing more. The reason is for people.
    Failed(String),
}

/// The next step of a rollout under `cfg` with hosts standing as `t` (see the module
/// documentation for the rules). The caller stops sending as soon as this says `Failed`, even
/// with hosts still in flight.
pub fn next_step(cfg: &DeploymentConfig, t: &Tally) -> Next {
    debug_assert_eq!(
        t.total,
        t.pending + t.in_progress + t.succeeded + t.failed,
        "a tally's total is the sum of its parts"
    );
    let total = t.total;
    if total == 0 {
        return Next::Failed("no hosts match the deployment group".to_string());
    }
    let rule = cfg.minimum(total);
    let min = cfg.min_healthy(total);
    if let MinimumHealthyHosts::HostCount(n) = rule {
        if n as usize > total {
            return Next::Failed(format!(
                "{} asks for more healthy hosts than the {total} in the deployment",
                describe(rule)
            ));
        }
    }
    if min >= total {
        let detail = match rule {
            MinimumHealthyHosts::FleetPercent(_) => format!(" (rounded up to {min} hosts)"),
            MinimumHealthyHosts::HostCount(_) => String::new(),
        };
        return Next::Failed(format!(
            "{}{detail} leaves no host to deploy to among {total}",
            describe(rule)
        ));
    }
    // CodeDeploy: even with a minimum of 0, at least one host must succeed.
    let required = min.max(1);
    let can_succeed = t.succeeded + t.pending + t.in_progress;
    if can_succeed < required {
        return Next::Failed(format!(
            "{} of {total} hosts failed: at most {can_succeed} can succeed, fewer than the \
             {required} required ({} {})",
            t.failed,
            cfg.name(),
            describe(rule)
        ));
    }
    if t.in_progress > 0 {
        return Next::Wait;
    }
    if t.pending == 0 {
        return if t.succeeded >= required {
            Next::Succeeded
        } else {
            Next::Failed(format!(
                "{} of {total} hosts succeeded, fewer than the {required} required",
                t.succeeded
            ))
        };
    }
    let healthy = t.pending + t.succeeded;
    let capacity = healthy as i64 - min as i64;
    if capacity <= 0 {
        return Next::Failed(format!(
            "{} of {total} hosts failed: with {healthy} healthy, the deployment cannot take \
             another host out of service without going below the minimum of {min} healthy \
             hosts ({} {})",
            t.failed,
            cfg.name(),
            describe(rule)
        ));
    }
    let batch = (total - min).max(1);
    Next::Dispatch((capacity as usize).min(batch).min(t.pending))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use MinimumHealthyHosts::{FleetPercent, HostCount};

    /// How a simulated rollout ended.
    #[derive(Debug)]
    struct Run {
        /// The sizes of the batches sent, in order.
        batches: Vec<usize>,
        /// The last step: `Succeeded` or `Failed`.
        end: Next,
        /// The tally when it ended.
        tally: Tally,
    }

    /// Drives [`next_step`] over hosts whose outcomes are given in dispatch order (true:
    /// success), finishing in-flight hosts one at a time in that order and asking for the next
    /// step after each, as a controller reading status notifications would.
    fn simulate(cfg: DeploymentConfig, outcomes: &[bool]) -> Run {
        let total = outcomes.len();
        let min = cfg.min_healthy(total);
        let mut t = Tally {
            total,
            pending: total,
            ..Tally::default()
        };
        let mut sent = 0; // outcomes[..sent] were dispatched
        let mut done = 0; // outcomes[..done] have finished
        let mut batches = Vec::new();
        loop {
            match next_step(&cfg, &t) {
                Next::Dispatch(n) => {
                    assert!(n >= 1 && n <= t.pending, "{n} of {t:?}");
                    assert!(n <= total - min, "batch {n} exceeds {total} - {min}");
                    t.pending -= n;
                    t.in_progress += n;
                    sent += n;
                    assert!(
                        t.pending + t.succeeded >= min,
                        "healthy below {min} after dispatching {n}: {t:?}"
                    );
                    batches.push(n);
                }
                Next::Wait => {
                    assert!(done < sent, "waiting with nothing in flight: {t:?}");
                    t.in_progress -= 1;
                    if outcomes[done] {
                        t.succeeded += 1;
                    } else {
                        t.failed += 1;
                    }
                    done += 1;
                }
                end => {
                    return Run {
                        batches,
                        end,
                        tally: t,
                    }
                }
            }
        }
    }

    fn outcomes(spec: &str) -> Vec<bool> {
        spec.chars().map(|c| c == 'S').collect()
    }

    fn failed(run: &Run) -> &str {
        match &run.end {
            Next::Failed(why) => why,
            other => panic!("expected a failure, got {other:?} ({run:?})"),
        }
    }

    #[test]
    fn configurations_read_from_the_command_line() {
        for (s, cfg) in [
            ("OneAtATime", DeploymentConfig::OneAtATime),
            ("CodeDeployDefault.OneAtATime", DeploymentConfig::OneAtATime),
            ("HalfAtATime", DeploymentConfig::HalfAtATime),
            (
                "CodeDeployDefault.HalfAtATime",
                DeploymentConfig::HalfAtATime,
            ),
            ("AllAtOnce", DeploymentConfig::AllAtOnce),
            ("CodeDeployDefault.AllAtOnce", DeploymentConfig::AllAtOnce),
            ("HOST_COUNT:6", DeploymentConfig::Custom(HostCount(6))),
            (
                "FLEET_PERCENT:40",
                DeploymentConfig::Custom(FleetPercent(40)),
            ),
            ("FLEET_PERCENT:0", DeploymentConfig::Custom(FleetPercent(0))),
        ] {
            assert_eq!(DeploymentConfig::parse(s), Ok(cfg), "{s}");
        }
        assert_eq!(
            DeploymentConfig::parse("HOST_COUNT:6").unwrap().to_string(),
            "HOST_COUNT:6"
        );
        assert_eq!(DeploymentConfig::HalfAtATime.to_string(), "HalfAtATime");
        assert_eq!(DeploymentConfig::Custom(HostCount(1)).name(), "Custom");
    }

    #[test]
    fn malformed_configurations_are_refused_with_what_to_write() {
        for (s, expect) in [
            ("onebyone", "unknown deployment configuration \"onebyone\""),
            ("CodeDeployDefault.Fast", "unknown deployment configuration"),
            ("HOSTS:3", "unknown deployment configuration \"HOSTS:3\""),
            ("HOST_COUNT:-1", "HOST_COUNT needs a whole number"),
            ("FLEET_PERCENT:forty", "FLEET_PERCENT needs a whole number"),
            (
                "FLEET_PERCENT:100",
                "FLEET_PERCENT 100 would keep every host",
            ),
            ("FLEET_PERCENT:250", "use a value from 0 to 99"),
        ] {
            let e = DeploymentConfig::parse(s).unwrap_err().to_string();
            assert!(e.contains(expect), "{s}: {e}");
        }
        let e = DeploymentConfig::parse("x").unwrap_err().to_string();
        assert!(e.contains("HOST_COUNT:N"), "{e}");
    }

    #[test]
    fn configurations_read_from_either_serde_form() {
        let from_json = |j: &str| serde_json::from_str::<DeploymentConfig>(j);
        assert_eq!(
            from_json("\"HalfAtATime\"").unwrap(),
            DeploymentConfig::HalfAtATime
        );
        assert_eq!(
            from_json(r#"{"minimum_healthy_hosts": {"type": "FLEET_PERCENT", "value": 40}}"#)
                .unwrap(),
            DeploymentConfig::Custom(FleetPercent(40))
        );
        for (bad, expect) in [
            (
                r#"{"minimum_healthy_hosts": {"type": "HOSTS", "value": 4}}"#,
                "HOSTS",
            ),
            (
                r#"{"minimum_healthy_hosts": {"type": "HOST_COUNT", "value": -4}}"#,
                "-4",
            ),
            (
                r#"{"minimum_healthy_hosts": {"type": "FLEET_PERCENT", "value": 100}}"#,
                "0 to 99",
            ),
            (
                r#"{"minimum_healthy_hosts": {"type": "HOST_COUNT", "value": 4, "x": 1}}"#,
                "x",
            ),
            (
                r#"{"minimum": {"type": "HOST_COUNT", "value": 4}}"#,
                "minimum",
            ),
            (r#"{}"#, "minimum_healthy_hosts"),
            ("7", "a deployment configuration"),
        ] {
            let e = from_json(bad).unwrap_err().to_string();
            assert!(e.contains(expect), "{bad}: {e}");
        }
        for cfg in [
            DeploymentConfig::OneAtATime,
            DeploymentConfig::AllAtOnce,
            DeploymentConfig::Custom(HostCount(6)),
            DeploymentConfig::Custom(FleetPercent(40)),
        ] {
            let json = serde_json::to_string(&cfg).unwrap();
            assert_eq!(from_json(&json).unwrap(), cfg, "{json}");
        }
    }

    #[test]
    fn minimums_follow_codedeploy() {
        assert_eq!(DeploymentConfig::OneAtATime.minimum(9), HostCount(8));
        assert_eq!(DeploymentConfig::OneAtATime.minimum(0), HostCount(0));
        assert_eq!(DeploymentConfig::HalfAtATime.minimum(9), FleetPercent(50));
        assert_eq!(DeploymentConfig::AllAtOnce.minimum(9), HostCount(0));
        // Percentages round up to whole hosts.
        assert_eq!(DeploymentConfig::Custom(FleetPercent(40)).min_healthy(9), 4);
        assert_eq!(DeploymentConfig::HalfAtATime.min_healthy(9), 5);
        assert_eq!(DeploymentConfig::HalfAtATime.min_healthy(10), 5);
        assert_eq!(
            DeploymentConfig::Custom(FleetPercent(85)).min_healthy(10),
            9
        );
        assert_eq!(DeploymentConfig::Custom(HostCount(6)).min_healthy(9), 6);
    }

    #[test]
    fn host_count_six_of_nine_goes_three_at_a_time_and_needs_six() {
        let cfg = DeploymentConfig::Custom(HostCount(6));
        let run = simulate(cfg, &outcomes("SSSSSSSSS"));
        assert_eq!(
            (run.batches.as_slice(), &run.end),
            (&[3, 3, 3][..], &Next::Succeeded)
        );
        // Three failures in the last batch: six succeeded, enough.
        let run = simulate(cfg, &outcomes("SSSSSSFFF"));
        assert_eq!(run.end, Next::Succeeded);
        assert_eq!(run.tally.succeeded, 6);
        // A failure in the first batch shrinks the next ones so six stay healthy.
        let run = simulate(cfg, &outcomes("FSSSSSSSS"));
        assert_eq!(
            (run.batches.as_slice(), &run.end),
            (&[3, 2, 2, 2][..], &Next::Succeeded)
        );
        // The whole first batch fails: six healthy are left and none may be taken out, so it
        // fails without sending the rest.
        let run = simulate(cfg, &outcomes("FFFSSSSSS"));
        assert!(
            failed(&run).contains("minimum of 6 healthy hosts"),
            "{run:?}"
        );
        assert_eq!(run.batches, [3]);
    }

    #[test]
    fn fleet_percent_forty_of_nine_goes_five_at_a_time_and_needs_four() {
        let cfg = DeploymentConfig::Custom(FleetPercent(40));
        let run = simulate(cfg, &outcomes("SSSSSSSSS"));
        assert_eq!(
            (run.batches.as_slice(), &run.end),
            (&[5, 4][..], &Next::Succeeded)
        );
        let run = simulate(cfg, &outcomes("SSSSFFFFF"));
        assert_eq!(
            (run.batches.as_slice(), &run.end),
            (&[5, 4][..], &Next::Succeeded)
        );
        assert_eq!(run.tally.succeeded, 4);
        // The whole first batch fails: only four remain healthy, none may be taken.
        let run = simulate(cfg, &outcomes("FFFFFSSSS"));
        let why = failed(&run);
        assert!(
            why.contains("cannot take another host out of service"),
            "{why}"
        );
        assert!(why.contains("minimum of 4 healthy hosts"), "{why}");
        assert_eq!(run.batches, [5]);
    }

    #[test]
    fn one_at_a_time_tolerates_only_the_last_host_failing() {
        let cfg = DeploymentConfig::OneAtATime;
        let run = simulate(cfg, &outcomes("SSSSSSSSF"));
        assert_eq!(run.batches, [1; 9]);
        assert_eq!(run.end, Next::Succeeded);
        let run = simulate(cfg, &outcomes("FSSSSSSSS"));
        assert_eq!(
            run.batches,
            [1],
            "nothing more is sent after the first failure"
        );
        assert!(failed(&run).contains("OneAtATime"), "{run:?}");
        let run = simulate(cfg, &outcomes("SSSSFSSSS"));
        assert_eq!(run.batches, [1; 5]);
        failed(&run);
        // A single host: it must succeed.
        assert_eq!(simulate(cfg, &outcomes("S")).end, Next::Succeeded);
        failed(&simulate(cfg, &outcomes("F")));
    }

    #[test]
    fn half_at_a_time_of_nine_goes_four_at_a_time() {
        let run = simulate(DeploymentConfig::HalfAtATime, &outcomes("SSSSSSSSS"));
        assert_eq!(
            (run.batches.as_slice(), &run.end),
            (&[4, 4, 1][..], &Next::Succeeded)
        );
        let run = simulate(DeploymentConfig::HalfAtATime, &outcomes("SSSSSSSSSS"));
        assert_eq!(run.batches, [5, 5]);
    }

    #[test]
    fn all_at_once_sends_everything_and_one_success_suffices() {
        let cfg = DeploymentConfig::AllAtOnce;
        let run = simulate(cfg, &outcomes("FFFFFFFFS"));
        assert_eq!(
            (run.batches.as_slice(), &run.end),
            (&[9][..], &Next::Succeeded)
        );
        let run = simulate(cfg, &outcomes("FFFFFFFFF"));
        assert_eq!(run.batches, [9]);
        assert!(
            failed(&run).contains("fewer than the 1 required"),
            "{run:?}"
        );
    }

    #[test]
    fn failure_is_declared_while_a_batch_is_still_in_flight() {
        // HOST_COUNT 6 of 9: after four failures in flight nothing can save it, even though
        // other hosts of the batch have not reported yet.
        let cfg = DeploymentConfig::Custom(HostCount(6));
        let t = Tally {
            total: 9,
            pending: 3,
            in_progress: 2,
            succeeded: 0,
            failed: 4,
        };
        assert!(matches!(next_step(&cfg, &t), Next::Failed(_)));
        let t = Tally {
            failed: 3,
            in_progress: 3,
            ..t
        };
        assert_eq!(next_step(&cfg, &t), Next::Wait);
    }

    #[test]
    fn impossible_rules_fail_at_once_naming_the_rule_and_the_fleet() {
        let at_start = |cfg: DeploymentConfig, total: usize| {
            let t = Tally {
                total,
                pending: total,
                ..Tally::default()
            };
            match next_step(&cfg, &t) {
                Next::Failed(why) => why,
                other => panic!("{cfg} with {total} hosts: {other:?}"),
            }
        };
        assert_eq!(
            at_start(DeploymentConfig::Custom(HostCount(9)), 9),
            "HOST_COUNT 9 leaves no host to deploy to among 9"
        );
        let why = at_start(DeploymentConfig::Custom(HostCount(12)), 9);
        assert!(
            why.contains("HOST_COUNT 12") && why.contains("the 9"),
            "{why}"
        );
        let why = at_start(DeploymentConfig::Custom(FleetPercent(100)), 9);
        assert!(
            why.contains("FLEET_PERCENT 100") && why.contains("among 9"),
            "{why}"
        );
        let why = at_start(DeploymentConfig::Custom(FleetPercent(95)), 9);
        assert!(why.contains("rounded up to 9 hosts"), "{why}");
        // Half of one host rounds up to the whole fleet (CodeDeploy refuses it too).
        let why = at_start(DeploymentConfig::HalfAtATime, 1);
        assert!(
            why.contains("FLEET_PERCENT 50 (rounded up to 1 hosts)"),
            "{why}"
        );
        assert_eq!(
            at_start(DeploymentConfig::AllAtOnce, 0),
            "no hosts match the deployment group"
        );
    }

    fn any_config() -> impl Strategy<Value = DeploymentConfig> {
        prop_oneof![
            Just(DeploymentConfig::OneAtATime),
            Just(DeploymentConfig::HalfAtATime),
            Just(DeploymentConfig::AllAtOnce),
            (0u32..40).prop_map(|n| DeploymentConfig::Custom(HostCount(n))),
            (0u32..=110).prop_map(|p| DeploymentConfig::Custom(FleetPercent(p))),
        ]
    }

    proptest! {
        // The simulator itself checks that no batch exceeds total - min and that the healthy
        // hosts never drop below the minimum when a batch is sent.
        #[test]
        fn rollouts_keep_the_minimum_and_end_as_the_rules_say(
            cfg in any_config(),
            outcomes in proptest::collection::vec(any::<bool>(), 0..40),
        ) {
            let run = simulate(cfg, &outcomes);
            let t = run.tally;
            let required = cfg.min_healthy(t.total).max(1);
            let all_done = t.pending == 0 && t.in_progress == 0;
            if all_done {
                prop_assert_eq!(
                    run.end == Next::Succeeded,
                    t.succeeded >= required,
                    "{:?}", run
                );
            } else {
                prop_assert!(matches!(run.end, Next::Failed(_)), "{:?}", run);
            }
            // A valid rule and hosts that all succeed always succeed.
            let valid = t.total > 0 && cfg.min_healthy(t.total) < t.total;
            if valid && outcomes.iter().all(|ok| *ok) {
                prop_assert_eq!(run.end, Next::Succeeded);
            }
        }
    }
}
