//! Deployments through a faulty network: two real `pier-agent run` (SQS commands, S3
//! revisions, S3 status) and the real `pier deploy --wait` all reach moto through
//! [`proxy::FaultProxy`], which drops, resets, delays, answers 5xx for, or trickles a share
//! of their connections. For a bounded time (`PIER_FAULT_SECONDS`, 60 s by default) the test
//! sends deployments one after another, then turns the faults off and checks what the
//! design promises: the agents stay up; every deployment the agents started ends Succeeded
//! or cleanly Failed (read from S3 directly, not through the proxy, within a bound once the
//! faults stop), and every deployment the controller announced reaches both hosts; no hook
//! runs twice; and the agents' descriptors and memory stay flat. The seed
//! (`PIER_FAULT_SEED`) fixes which connection gets which fault.

mod proxy;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use pier_protocol::{DeploymentStatus, StatusRecord};
use pier_transport::aws::AwsClients;

use crate::support::*;
use proxy::{FaultProxy, Limits};

/// Descriptors and resident memory of a process, from /proc.
#[derive(Clone, Copy, Debug)]
struct Footprint {
    fds: usize,
    rss_kib: u64,
}

fn footprint(pid: i32) -> Footprint {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Footprint { fds, rss_kib }
}

/// A bundle with no files whose AfterInstall appends `$DEPLOYMENT_ID` to the file the
/// agent's `HOOK_LOG` names and whose ValidateService exits `validate_exit`.
fn recording_bundle(s: &Scratch, rel: &str, validate_exit: i32) -> std::path::PathBuf {
    s.write(
        &format!("{rel}/appspec.yml"),
        "version: 0.0\nos: linux\nhooks:\n  AfterInstall:\n    - location: scripts/record.sh\n      \
         timeout: 60\n  ValidateService:\n    - location: scripts/validate.sh\n      timeout: 60\n",
    );
    s.script(
        &format!("{rel}/scripts/record.sh"),
        "#!/bin/sh\necho \"$DEPLOYMENT_ID\" >> \"$HOOK_LOG\"\n",
    );
    s.script(
        &format!("{rel}/scripts/validate.sh"),
        &format!("#!/bin/sh\nexit {validate_exit}\n"),
    );
    s.path().join(rel)
}

/// What `pier deploy --wait` said about one deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Told {
    /// Exit 0: every host succeeded.
    Succeeded,
    /// Exit 1, every host final, not all succeeded.
    Failed,
    /// Exit 1 after `--timeout`: the controller stopped waiting.
    TimedOut,
    /// No deployment id printed: the controller gave up before every host had its command.
    NotSent,
}

/// Every status record under `pier/` in `bucket`, read from moto directly.
async fn records(aws: &AwsClients, bucket: &str) -> Vec<StatusRecord> {
    let mut out = Vec::new();
    let mut pages = aws
        .s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix("pier/deployments/")
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.expect("list status records on moto");
        for obj in page.contents() {
            let key = obj.key().unwrap();
            if !key.contains("/hosts/") || !key.ends_with(".json") {
                continue;
            }
            let body = aws
                .s3
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .expect("read a status record on moto")
                .body
                .collect()
                .await
                .unwrap()
                .into_bytes();
            out.push(
                StatusRecord::from_json(&body)
                    .unwrap_or_else(|e| panic!("status record {key} does not parse: {e}")),
            );
        }
    }
    out
}

fn hook_ids(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test]
async fn deployments_through_a_faulty_network_end_once_and_the_agents_stay_up() {
    let fault_time = Duration::from_secs(env_u64("PIER_FAULT_SECONDS", 60));
    let seed = env_u64("PIER_FAULT_SEED", 0x5eed_fa17);
    // Once the faults stop, every deployment an agent started has this long to end.
    let settle = Duration::from_secs(60);
    let deploy_timeout = 25;

    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let s = Scratch::new();
    let proxy = FaultProxy::start(
        moto_endpoint(),
        seed,
        Limits {
            max_connections: 20_000,
            lifetime: fault_time + Duration::from_secs(300),
        },
    );
    let endpoint = proxy.url();

    let hosts = [unique("flaky"), unique("flaky")];
    let hook_logs = [s.path().join("hooks-0.txt"), s.path().join("hooks-1.txt")];
    let mut agents: Vec<RunningAgent> = hosts
        .iter()
        .zip(&hook_logs)
        .map(|(h, log)| {
            Agent::builder(s.path().join(h))
                .host(h)
                .sqs_own_queue()
                .endpoint(&endpoint)
                .hook_env("HOOK_LOG", log.to_str().unwrap())
                .spawn()
        })
        .collect();
    let pids: Vec<i32> = agents.iter().map(RunningAgent::pid).collect();
    let logs = |agents: &[RunningAgent]| {
        agents
            .iter()
            .map(|a| a.log())
            .collect::<Vec<_>>()
            .join("\n--- next agent\n")
    };
    // Faults stay off until both agents have made their queues (start-up is not under test).
    for h in &hosts {
        let deadline = Instant::now() + Duration::from_secs(30);
        while aws
            .sqs
            .get_queue_url()
            .queue_name(format!("pier-{h}"))
            .send()
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "agent {h} made no queue:\n{}",
                logs(&agents)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // The revisions go up straight to moto: what is under test is the agents and the waits.
    let mut locations = Vec::new();
    for (rel, exit) in [("good", 0), ("bad", 3)] {
        let src = recording_bundle(&s, rel, exit);
        let location = format!("s3://{bucket}/web/{rel}.tgz");
        pier(&[
            "push",
            "--application",
            "web",
            "--source",
            src.to_str().unwrap(),
            "--s3-location",
            &location,
        ])
        .success();
        locations.push(location);
    }
    let hosts_arg = hosts.join(",");
    let deploy = |location: &str| {
        let args: Vec<String> = [
            "deploy",
            "--application",
            "web",
            "--deployment-group",
            "prod",
            "--revision",
            location,
            "--hosts",
            &hosts_arg,
            "--status-bucket",
            &bucket,
            "--wait",
            "--timeout",
            &deploy_timeout.to_string(),
            "--poll-interval",
            "0.5",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        let endpoint = endpoint.clone();
        // `pier` blocks while it waits: run it off the async runtime.
        tokio::task::spawn_blocking(move || {
            pier_via(
                &endpoint,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        })
    };

    // Warm-up without faults: one good deployment must simply succeed.
    let run = deploy(&locations[0]).await.unwrap();
    assert_eq!(run.code, 0, "{}\n--- agents\n{}", run.all(), logs(&agents));
    let warm_id = run.stdout.trim().to_string();

    // Under faults: one deployment after another; every fourth has a failing
    // ValidateService. The footprint is taken after the first few, once pools and buffers
    // have grown to what the faults make them.
    proxy.set_faults(true);
    let started = Instant::now();
    let mut told: Vec<(Option<String>, bool, Told)> = Vec::new();
    let mut before: Option<Vec<Footprint>> = None;
    let mut n = 0;
    while started.elapsed() < fault_time {
        let bad = n % 4 == 3;
        let run = deploy(&locations[usize::from(bad)]).await.unwrap();
        let id = Some(run.stdout.trim().to_string()).filter(|i| !i.is_empty());
        let outcome = match (run.code, &id) {
            (_, None) => Told::NotSent,
            (0, Some(_)) => Told::Succeeded,
            (1, Some(_)) if run.stderr.contains("timed out waiting") => Told::TimedOut,
            (1, Some(_)) => Told::Failed,
            (code, Some(_)) => panic!("pier deploy exited {code}:\n{}", run.all()),
        };
        if outcome == Told::NotSent {
            eprintln!(
                "fault proxy: deployment {n} not sent: {}",
                run.stderr.lines().last().unwrap_or("")
            );
        }
        told.push((id, bad, outcome));
        for (a, h) in agents.iter_mut().zip(&hosts) {
            assert!(
                a.is_running(),
                "agent {h} died under faults:\n{}",
                logs(std::slice::from_ref(a))
            );
        }
        n += 1;
        if n == 3 {
            before = Some(pids.iter().map(|&p| footprint(p)).collect());
        }
    }
    proxy.set_faults(false);
    let faults = proxy.summary();

    // Every deployment the agents started ends, and every announced one reached both hosts.
    let announced: BTreeSet<String> = told
        .iter()
        .filter_map(|(id, _, _)| id.clone())
        .chain([warm_id.clone()])
        .collect();
    let deadline = Instant::now() + settle;
    let finals = loop {
        let recs = records(&aws, &bucket).await;
        let mut by_id: BTreeMap<String, Vec<StatusRecord>> = BTreeMap::new();
        for r in recs {
            by_id.entry(r.deployment_id.clone()).or_default().push(r);
        }
        let all_final = by_id
            .values()
            .flatten()
            .all(|r: &StatusRecord| r.status.is_final());
        let all_reached = announced
            .iter()
            .all(|id| by_id.get(id).is_some_and(|r| r.len() == hosts.len()));
        if all_final && all_reached {
            break by_id;
        }
        assert!(
            Instant::now() < deadline,
            "{settle:?} after the faults stopped, not every deployment has ended on every \
             host it was sent to:\n{:#?}\n--- agents\n{}",
            by_id
                .iter()
                .map(|(id, r)| (
                    id,
                    r.iter().map(|r| (&r.host_id, r.status)).collect::<Vec<_>>()
                ))
                .collect::<Vec<_>>(),
            logs(&agents)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let after: Vec<Footprint> = pids.iter().map(|&p| footprint(p)).collect();
    for (a, h) in agents.iter_mut().zip(&hosts) {
        assert!(a.is_running(), "agent {h} died:\n{}", a.log());
    }

    // What each deployment ended as, and how that squares with what the controller said.
    let bad_ids: BTreeSet<&str> = told
        .iter()
        .filter(|(_, bad, _)| *bad)
        .filter_map(|(id, _, _)| id.as_deref())
        .collect();
    let mut ended: BTreeMap<String, usize> = BTreeMap::new();
    for (id, recs) in &finals {
        for r in recs {
            let word = match r.status {
                DeploymentStatus::Succeeded => "Succeeded".to_string(),
                _ => {
                    let failed = r.events.iter().find_map(|e| {
                        e.diagnostics
                            .as_ref()
                            .map(|d| format!("{}:{}", e.name, d.error_code))
                    });
                    format!("Failed({})", failed.unwrap_or_default())
                }
            };
            if bad_ids.contains(id.as_str()) {
                assert_ne!(
                    r.status,
                    DeploymentStatus::Succeeded,
                    "{id} on {}: a failing ValidateService succeeded",
                    r.host_id
                );
            }
            *ended.entry(word).or_default() += 1;
        }
    }
    for (id, _, outcome) in &told {
        let Some(id) = id else { continue };
        let recs = &finals[id];
        let all_ok = recs.iter().all(|r| r.status == DeploymentStatus::Succeeded);
        match outcome {
            Told::Succeeded => assert!(all_ok, "{id}: pier said Succeeded, S3 says {recs:?}"),
            Told::Failed => assert!(!all_ok, "{id}: pier said Failed, S3 says all Succeeded"),
            Told::TimedOut | Told::NotSent => {}
        }
    }

    // No hook ran twice on a host, and every host that succeeded ran its hook once.
    for ((log, h), i) in hook_logs.iter().zip(&hosts).zip(0..) {
        let ids = hook_ids(log);
        let mut seen = BTreeSet::new();
        for id in &ids {
            assert!(
                seen.insert(id.as_str()),
                "{h} ran deployment {id} twice:\n{}",
                agents[i].log()
            );
        }
        for (id, recs) in &finals {
            if recs
                .iter()
                .any(|r| &r.host_id == h && r.status == DeploymentStatus::Succeeded)
            {
                assert!(
                    seen.contains(id.as_str()),
                    "{h} succeeded {id} without its hook"
                );
            }
        }
    }

    // Descriptors and memory flat between the warm-up point and the end.
    let before = before.unwrap_or_else(|| after.clone());
    let told_counts = told.iter().fold(BTreeMap::new(), |mut m, (_, _, o)| {
        *m.entry(format!("{o:?}")).or_insert(0) += 1;
        m
    });
    let prints = |f: &[Footprint]| {
        f.iter()
            .map(|f| format!("{} fds/{} KiB", f.fds, f.rss_kib))
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!(
        "fault proxy: seed {seed:#x}, {}s of faults, {} deployments; connections {faults}; \
         pier said {told_counts:?}; hosts ended {ended:?}; agents before {} after {}",
        fault_time.as_secs(),
        told.len(),
        prints(&before),
        prints(&after),
    );
    for ((b, a), h) in before.iter().zip(&after).zip(&hosts) {
        assert!(
            a.fds <= b.fds + 3,
            "{h}: descriptors grew from {} to {}",
            b.fds,
            a.fds
        );
        assert!(
            a.rss_kib <= b.rss_kib + 8 * 1024,
            "{h}: resident memory grew from {} KiB to {} KiB",
            b.rss_kib,
            a.rss_kib
        );
    }
    for a in &mut agents {
        assert_eq!(a.terminate(Duration::from_secs(30)), 0, "{}", a.log());
    }
    drop(proxy);
}

/// A plain HTTP server on 127.0.0.1 that answers every request `200` with a 2 KiB body and
/// closes; it stops accepting after `lifetime`.
fn http_upstream(lifetime: Duration) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let deadline = Instant::now() + lifetime;
        while Instant::now() < deadline {
            let mut conn = match listener.accept() {
                Ok((conn, _)) => conn,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let body = "x".repeat(2048);
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    url
}

/// Each connection through the proxy with faults on meets the fault the proxy counted: a
/// full answer from upstream (passed, delayed or trickled), the canned 500 or 503, or a
/// connection cut before any answer (dropped or reset); every kind shows up.
#[test]
fn the_proxy_injects_each_kind_of_fault_it_counts() {
    use std::io::{Read, Write};
    const N: usize = 120;
    let upstream = http_upstream(Duration::from_secs(60));
    let proxy = FaultProxy::start(
        &upstream,
        7,
        Limits {
            max_connections: N as u64,
            lifetime: Duration::from_secs(60),
        },
    );
    proxy.set_faults(true);
    let addr = proxy.url().trim_start_matches("http://").to_string();
    let answers: Vec<(String, Duration)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..N)
            .map(|_| {
                scope.spawn(|| {
                    let t = Instant::now();
                    let mut c = std::net::TcpStream::connect(&addr).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: upstream\r\n\r\n");
                    let mut got = Vec::new();
                    let answer = match c.read_to_end(&mut got) {
                        _ if got.starts_with(b"HTTP/1.1 200 ") && got.ends_with(&[b'x'; 2048]) => {
                            "200".to_string()
                        }
                        _ if got.starts_with(b"HTTP/1.1 500 ") => "500".to_string(),
                        _ if got.starts_with(b"HTTP/1.1 503 ") => "503".to_string(),
                        Ok(_) | Err(_) if got.is_empty() => "cut".to_string(),
                        other => format!("unexpected {other:?}: {}", String::from_utf8_lossy(&got)),
                    };
                    (answer, t.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let seen = |a: &str| answers.iter().filter(|(x, _)| x == a).count() as u64;
    let counts = proxy.counts();
    let c = |f: proxy::Fault| counts[&f];
    eprintln!("fault proxy self-test: {}", proxy.summary());
    assert!(
        answers.iter().all(|(a, _)| !a.starts_with("unexpected")),
        "{answers:?}"
    );
    for f in [
        proxy::Fault::Pass,
        proxy::Fault::Drop,
        proxy::Fault::Reset,
        proxy::Fault::Delay,
        proxy::Fault::Http500,
        proxy::Fault::Http503,
        proxy::Fault::Slow,
    ] {
        assert!(c(f) > 0, "seed 7 gave no {f:?} in {N} connections");
    }
    use proxy::Fault::*;
    assert_eq!(seen("200"), c(Pass) + c(Delay) + c(Slow), "{answers:?}");
    assert_eq!(seen("500"), c(Http500));
    assert_eq!(seen("503"), c(Http503));
    assert_eq!(seen("cut"), c(Drop) + c(Reset));
    // A delayed connection is held at least a second before it is answered; a trickled one
    // takes 16 pauses of 25 ms for its 2 KiB.
    let took = |at_least: Duration| {
        answers
            .iter()
            .filter(|(a, t)| a == "200" && *t >= at_least)
            .count() as u64
    };
    assert!(took(Duration::from_secs(1)) >= c(Delay), "{answers:?}");
    assert!(
        took(Duration::from_millis(375)) >= c(Delay) + c(Slow),
        "{answers:?}"
    );
}
