//! `pier history` and `pier dora` on a constructed history: deployment records written
//! straight into a `--status-dir` store (built with the protocol's own types, as a controller
//! would have written them), then read back by the real binary. The DORA figures are worked
//! out by hand below; `pier dora`'s window ends at the moment it runs, so every record sits
//! well inside the window, away from its edges.

use chrono::{DateTime, Duration, Utc};
use pier_protocol::record::{DeploymentRecord, MinimumHealthyHosts, RolloutStatus, RECORD_VERSION};
use pier_protocol::{BundleType, Revision};
use serde_json::Value;

use crate::support::*;

use RolloutStatus::{Failed, InProgress, Succeeded};

/// A record of application `app`, group `group`, that ended at `end` (created five minutes
/// before).
fn rec(
    id: &str,
    app: &str,
    group: &str,
    status: RolloutStatus,
    end: DateTime<Utc>,
) -> DeploymentRecord {
    DeploymentRecord {
        version: RECORD_VERSION,
        deployment_id: id.into(),
        application: app.into(),
        deployment_group: group.into(),
        revision: Revision::Local {
            path: format!("/revs/{id}.tgz"),
            bundle_type: BundleType::Tgz,
            sha256: Some("a".repeat(64)),
        },
        commit_sha: None,
        commit_time: None,
        creator: "ops@build".into(),
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
        created_at: end - Duration::minutes(5),
        started_at: Some(end - Duration::minutes(4)),
        ended_at: status.is_final().then_some(end),
        updated_at: end,
        settings: Value::Null,
    }
}

fn with_commit(mut r: DeploymentRecord, sha: &str, time: DateTime<Utc>) -> DeploymentRecord {
    r.commit_sha = Some(sha.into());
    r.commit_time = Some(time);
    r
}

fn store(dir: &std::path::Path, r: &DeploymentRecord) {
    let path = dir.join(format!("deployments/{}/record.json", r.deployment_id));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, r.to_json()).unwrap();
}

/// Runs `pier` with no AWS at all: the store is a directory, so no moto is started.
fn pier_local(args: &[&str]) -> Run {
    pier_via("http://127.0.0.1:9", args)
}

fn ids(json: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["deployment_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn dora_and_history_read_a_constructed_history() {
    let s = Scratch::new();
    let status = s.path().join("status");
    let dir = status.to_str().unwrap();
    // The window is the two days before `pier dora` runs; t0 is (a little after) its start.
    let t0 = Utc::now() - Duration::days(2) + Duration::minutes(30);
    let h = |hours: i64, minutes: i64| t0 + Duration::hours(hours) + Duration::minutes(minutes);

    let mut a2 = with_commit(rec("d-A2", "shop", "web", Failed, h(2, 0)), "cB", h(1, 0));
    a2.rolled_back_by = Some("d-A3".into());
    let mut a3 = rec("d-A3", "shop", "web", Succeeded, h(2, 20));
    a3.rollback_of = Some("d-A2".into());
    let mut a6 = rec("d-A6", "shop", "api", Succeeded, h(30, 0));
    a6.commit_sha = Some("cE".into());
    a6.rolled_back_by = Some("d-A7".into());
    let mut a7 = rec("d-A7", "shop", "api", Succeeded, h(31, 0));
    a7.rollback_of = Some("d-A6".into());
    let mut a10 = rec("d-A10", "shop", "web", InProgress, h(45, 0));
    a10.created_at = h(45, 0);
    let records = [
        // Before the window: web already runs c1.
        with_commit(
            rec("d-A0", "shop", "web", Succeeded, h(-6, 0)),
            "c1",
            h(-7, 0),
        ),
        with_commit(
            rec("d-A1", "shop", "web", Succeeded, h(1, 0)),
            "cA",
            h(0, 30),
        ),
        a2,
        a3,
        with_commit(
            rec("d-A4", "shop", "api", Succeeded, h(10, 0)),
            "cC",
            h(7, 0),
        ),
        with_commit(
            rec("d-A5", "shop", "web", Succeeded, h(20, 0)),
            "c1",
            h(-7, 0),
        ),
        a6,
        a7,
        rec("d-A8", "shop", "api", Failed, h(40, 0)),
        with_commit(
            rec("d-A9", "shop", "api", Succeeded, h(41, 30)),
            "cD",
            h(41, 0),
        ),
        a10,
        // Another application, left out by --application shop.
        rec("d-B1", "billing", "ledger", Failed, h(5, 0)),
    ];
    for r in &records {
        store(&status, r);
    }
    // A damaged record is named and skipped; a host's status record is not a deployment.
    s.write("status/deployments/d-BAD/record.json", "{\"version\": 1");
    s.write("status/deployments/d-A1/hosts/h1.json", "{}");

    let run = pier_local(&[
        "dora",
        "--application",
        "shop",
        "--since",
        "2d",
        "--format",
        "json",
        "--status-dir",
        dir,
    ])
    .success();
    assert!(run.stderr.contains("d-BAD"), "{}", run.stderr);
    let r: Value =
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout));

    // Finished in the window, application shop: succeeded changes A1 A4 A5 A6 A9 = 5;
    // failed A2 A8 = 2; rollbacks A3 A7 = 2; A10 unfinished. A0 ended before the window.
    let d = &r["deployments"];
    assert_eq!(
        [
            &d["succeeded"],
            &d["failed"],
            &d["rollbacks"],
            &d["unfinished"]
        ],
        [5, 2, 2, 1]
    );
    // Frequency: 5 / 2 days = 2.5 a day ≥ 2: met.
    let f = &r["deployment_frequency"];
    assert_eq!(f["per_day"], 2.5);
    assert_eq!(f["target"]["met"], true);
    let daily: u64 = f["daily"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deployments"].as_u64().unwrap())
        .sum();
    assert_eq!(daily, 5);
    // Lead time: A1 30 min = 1800 s, A4 3 h = 10800 s, A9 30 min = 1800 s; A5 repeats c1
    // (A0 took it to web), A6 has no commit time. Sorted [1800, 1800, 10800]: median 1800 s
    // < 1 h: met; p90 rank ⌈0.9 × 3⌉ = 3 → 10800 s.
    let l = &r["lead_time"];
    assert_eq!([&l["measured"], &l["unknown"], &l["repeats"]], [3, 1, 1]);
    assert_eq!([&l["median_seconds"], &l["p90_seconds"]], [1800, 10800]);
    assert_eq!(l["target"]["met"], true);
    // Change failure rate: changes 5 + 2 = 7; failures A2, A8 and A6 (rolled back) = 3;
    // 3 / 7 ≈ 42.9 % ≥ 15 %: not met.
    let c = &r["change_failure_rate"];
    assert_eq!([&c["failures"], &c["changes"]], [3, 7]);
    assert!((c["rate"].as_f64().unwrap() - 3.0 / 7.0).abs() < 1e-9);
    assert_eq!(c["target"]["met"], false);
    // Time to restore: web A2 (2:00) → A3 (2:20) = 1200 s; api A8 (40:00) → A9 (41:30) =
    // 5400 s. Median (1200 + 5400) / 2 = 3300 s < 1 h: met; max 5400 s.
    let t = &r["time_to_restore"];
    assert_eq!(
        [&t["incidents"], &t["restored"], &t["unrestored"]],
        [2, 2, 0]
    );
    assert_eq!([&t["median_seconds"], &t["max_seconds"]], [3300, 5400]);
    assert_eq!(t["target"]["met"], true);

    // The text form says the same.
    let text = pier_local(&[
        "dora",
        "--application",
        "shop",
        "--since",
        "2d",
        "--status-dir",
        dir,
    ])
    .success()
    .stdout;
    assert!(text.contains("2.50 a day (5 in 2.0 days)"), "{text}");
    assert!(text.contains("42.9 % (3 of 7 changes)"), "{text}");

    // History: filtered, newest (by creation) first.
    let run = pier_local(&[
        "history",
        "--application",
        "shop",
        "--deployment-group",
        "web",
        "--format",
        "json",
        "--status-dir",
        dir,
    ])
    .success();
    assert_eq!(
        ids(&run.stdout),
        ["d-A10", "d-A5", "d-A3", "d-A2", "d-A1", "d-A0"]
    );
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json[3]["rolled_back_by"], "d-A3");
    let commit_time: DateTime<Utc> =
        serde_json::from_value(json[4]["commit_time"].clone()).unwrap();
    assert_eq!(commit_time, h(0, 30));
    let failed = pier_local(&[
        "history",
        "--status",
        "failed",
        "--format",
        "json",
        "--status-dir",
        dir,
    ])
    .success();
    assert_eq!(ids(&failed.stdout), ["d-A8", "d-B1", "d-A2"]);
    let newest = pier_local(&[
        "history",
        "--limit",
        "2",
        "--format",
        "json",
        "--status-dir",
        dir,
    ])
    .success();
    assert_eq!(ids(&newest.stdout), ["d-A10", "d-A9"]);
    // Created in the last 12 hours (after t0 + 35:30): A8 (39:55), A9 (41:25), A10 (45:00).
    let recent = pier_local(&[
        "history",
        "--since",
        "12h",
        "--format",
        "json",
        "--status-dir",
        dir,
    ])
    .success();
    assert_eq!(ids(&recent.stdout), ["d-A10", "d-A9", "d-A8"]);

    let table = pier_local(&["history", "--deployment-group", "web", "--status-dir", dir])
        .success()
        .stdout;
    let a2_line = table.lines().find(|l| l.starts_with("d-A2 ")).unwrap();
    assert!(a2_line.contains("Failed"), "{table}");
    assert!(a2_line.ends_with("rolled back by d-A3"), "{table}");
    let a3_line = table.lines().find(|l| l.starts_with("d-A3 ")).unwrap();
    assert!(a3_line.ends_with("rolls back d-A2"), "{table}");

    // A bad flag is a usage error.
    pier_local(&["dora", "--since", "soon", "--status-dir", dir]).code(64);
    pier_local(&["history", "--status", "done", "--status-dir", dir]).code(64);
}
