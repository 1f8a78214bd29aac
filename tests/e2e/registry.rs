//! The host registry end to end: real `pier-agent run` processes announce themselves (in the
//! spool host's status directory, or in S3 on moto), keep their heartbeat fresh and say
//! `Stopped` after SIGTERM; the real `pier hosts` lists them.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{moto_clients, moto_endpoint, new_bucket, pier_bin, run, Agent, Scratch};

/// `pier hosts --format json ARGS...` (a spool registry needs no AWS), as parsed JSON.
fn hosts_json(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["hosts", "--format", "json"];
    all.extend_from_slice(args);
    let out = run(&pier_bin(), &all).success();
    serde_json::from_str::<Vec<Value>>(&out.stdout)
        .unwrap_or_else(|e| panic!("pier hosts printed no JSON array ({e}):\n{}", out.stdout))
}

fn host<'a>(hosts: &'a [Value], id: &str) -> Option<&'a Value> {
    hosts.iter().find(|h| h["host_id"] == id)
}

/// Polls `pier hosts` until `done` holds of what it printed, or panics after `bound`.
fn wait_for_hosts(
    args: &[&str],
    bound: Duration,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let hosts = hosts_json(args);
        if done(&hosts) {
            return hosts;
        }
        assert!(
            start.elapsed() < bound,
            "timed out waiting for {what}; pier hosts says:\n{hosts:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Two agents on the spool: one announces in its own default place (`ROOT/status`), the
/// other is pointed there; `pier hosts` lists both with their tags, sees the heartbeat move,
/// and shows the one stopped with SIGTERM as `Stopped` while the other stays `Healthy`.
#[test]
fn spool_agents_are_listed_with_tags_heartbeats_and_stopped_after_sigterm() {
    let s = Scratch::new();
    let a = Agent::builder(s.path().join("reg-a"))
        .host("reg-a")
        .spool()
        .config("tags:\n  role: web\n  env: prod\navailability_zone: zone-1\ndaemon:\n  heartbeat_seconds: 5\n")
        .build();
    let registry = a.root().join("status");
    let b = Agent::builder(s.path().join("reg-b"))
        .host("reg-b")
        .spool()
        .config(&format!(
            "tags:\n  role: db\nregistry:\n  dir: {}\ndaemon:\n  heartbeat_seconds: 5\n",
            registry.display()
        ))
        .build();
    let mut run_a = a.start();
    let mut run_b = b.start();
    let dir = registry.display().to_string();
    let args = ["--status-dir", dir.as_str()];

    let first = wait_for_hosts(&args, Duration::from_secs(30), "both hosts", |h| {
        host(h, "reg-a").is_some() && host(h, "reg-b").is_some()
    });
    let ha = host(&first, "reg-a").unwrap();
    assert_eq!(ha["health"], "Healthy", "{ha:#}");
    assert_eq!(ha["state"], "Running");
    assert_eq!(ha["tags"]["role"], "web");
    assert_eq!(ha["tags"]["env"], "prod");
    assert_eq!(ha["availability_zone"], "zone-1");
    assert_eq!(ha["heartbeat_interval_seconds"], 5);
    assert_eq!(ha["queue"], a.spool().display().to_string());
    assert_eq!(ha["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(ha["heartbeat_age_seconds"].as_i64().unwrap() <= 5, "{ha:#}");
    assert_eq!(host(&first, "reg-b").unwrap()["tags"]["role"], "db");
    assert!(
        host(&first, "reg-b")
            .unwrap()
            .get("availability_zone")
            .is_none(),
        "off EC2 and not configured, the zone stays unset"
    );

    let beat = ha["heartbeat_at"].as_str().unwrap().to_string();
    wait_for_hosts(&args, Duration::from_secs(20), "a later heartbeat", |h| {
        host(h, "reg-a").is_some_and(|a| a["heartbeat_at"].as_str().unwrap() != beat)
    });

    let text = run(&pier_bin(), &["hosts", "--status-dir", &dir]).success();
    assert!(text.stdout.starts_with("HOST"), "{}", text.stdout);
    // Tags print sorted by key.
    assert!(text.stdout.contains("env=prod,role=web"), "{}", text.stdout);

    assert_eq!(run_a.terminate(Duration::from_secs(30)), 0);
    assert!(run_a.log().contains("marked stopped"), "{}", run_a.log());
    let after = hosts_json(&args);
    assert_eq!(host(&after, "reg-a").unwrap()["health"], "Stopped");
    assert_eq!(host(&after, "reg-a").unwrap()["state"], "Stopped");
    assert_eq!(host(&after, "reg-b").unwrap()["health"], "Healthy");
    assert!(run_b.is_running());
    let text = run(&pier_bin(), &["hosts", "--status-dir", &dir]).success();
    assert!(
        text.stdout
            .contains("2 host(s): 1 healthy, 0 stale, 1 stopped"),
        "{}",
        text.stdout
    );
}

/// A spool agent with `registry: {bucket, prefix}` announces itself in S3 on moto, and
/// `pier hosts --status-bucket/--status-prefix` reads it; SIGTERM leaves it `Stopped`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_announces_itself_in_s3_and_pier_hosts_reads_it() {
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let s = Scratch::new();
    let agent = Agent::builder(s.path().join("reg-s3"))
        .host("reg-s3")
        .spool()
        .config(&format!(
            "tags:\n  role: api\nregistry:\n  bucket: {bucket}\n  prefix: fleet\naws:\n  region: us-east-1\n  endpoint_url: {}\n",
            moto_endpoint()
        ))
        .build();
    let mut running = agent.start();
    let args = [
        "--status-bucket",
        bucket.as_str(),
        "--status-prefix",
        "fleet",
    ];
    let via_moto = |args: &[&str]| -> Vec<Value> {
        let mut all = vec!["hosts", "--format", "json"];
        all.extend_from_slice(args);
        let out = crate::support::pier(&all).success();
        serde_json::from_str(&out.stdout).unwrap()
    };
    let start = Instant::now();
    let hosts = loop {
        let hosts = via_moto(&args);
        if !hosts.is_empty() {
            break hosts;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no entry in S3\n{}",
            running.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(hosts[0]["host_id"], "reg-s3");
    assert_eq!(hosts[0]["health"], "Healthy");
    assert_eq!(hosts[0]["tags"]["role"], "api");
    let stored = aws
        .s3
        .get_object()
        .bucket(&bucket)
        .key("fleet/hosts/reg-s3.json")
        .send()
        .await
        .expect("the entry is at PREFIX/hosts/HOST.json");
    assert!(stored.content_length().unwrap_or(0) > 0);

    assert_eq!(running.terminate(Duration::from_secs(30)), 0);
    let hosts = via_moto(&args);
    assert_eq!(hosts[0]["health"], "Stopped", "{hosts:#?}");
}
