//! The daemon driven in-process from its parts: a spool queue in a temp dir, a status sink
//! that fails on purpose, and timings of milliseconds instead of minutes.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pier_agent::config::Config;
use pier_agent::daemon::{Daemon, Parts, SinkOpener, Timings};
use pier_agent::dedupe::Dedupe;
use pier_agent::fetch::{FetchOptions, Fetcher};
use pier_engine::deploy::Engine;
use pier_protocol::{BundleType, Command, Revision, StatusRecord, StatusSinkSpec, StatusTarget};
use pier_sys::backoff::Backoff;
use pier_transport::local::LocalStatusSink;
use pier_transport::spool::Spool;
use pier_transport::{BoxFuture, StatusSink, TransportError};
use tokio_util::sync::CancellationToken;

/// A status store whose final-record writes fail for the deployments named in `fail`
/// (during their first so many deliveries; `u32::MAX`: always), and that notes when each
/// delivery's final writes came.
#[derive(Default)]
struct Flaky {
    fail: Mutex<HashMap<String, u32>>,
    final_writes: Mutex<HashMap<String, Vec<Instant>>>,
}

impl Flaky {
    fn attempts(&self, id: &str) -> Vec<Instant> {
        self.final_writes
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_default()
    }
}

struct FlakySink {
    inner: LocalStatusSink,
    flaky: Arc<Flaky>,
}

impl StatusSink for FlakySink {
    fn write<'a>(&'a self, record: &'a StatusRecord) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if record.status.is_final() {
                // The status writer's copy of the final record and the daemon's own final
                // write come together: one burst is one delivery of the message.
                let id = record.deployment_id.clone();
                let burst = {
                    let mut writes = self.flaky.final_writes.lock().unwrap();
                    let bursts = writes.entry(id.clone()).or_default();
                    let now = Instant::now();
                    if bursts
                        .last()
                        .is_none_or(|last| now - *last > Duration::from_millis(50))
                    {
                        bursts.push(now);
                    }
                    bursts.len() as u32
                };
                if self
                    .flaky
                    .fail
                    .lock()
                    .unwrap()
                    .get(&id)
                    .is_some_and(|n| burst <= *n)
                {
                    return Err(TransportError::Config("the store is down (test)".into()));
                }
            }
            self.inner.write(record).await
        })
    }

    fn read<'a>(&'a self, d: &'a str, h: &'a str) -> BoxFuture<'a, Option<StatusRecord>> {
        self.inner.read(d, h)
    }

    fn list_hosts<'a>(&'a self, d: &'a str) -> BoxFuture<'a, Vec<String>> {
        self.inner.list_hosts(d)
    }
}

struct FlakySinks(Arc<Flaky>);

impl SinkOpener for FlakySinks {
    fn open(&self, target: &StatusTarget) -> Result<Arc<dyn StatusSink>, TransportError> {
        let StatusSinkSpec::Local { dir } = &target.sink else {
            panic!("tests use local sinks")
        };
        Ok(Arc::new(FlakySink {
            inner: LocalStatusSink::new(dir),
            flaky: self.0.clone(),
        }))
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    spool: PathBuf,
    status: PathBuf,
    flaky: Arc<Flaky>,
    daemon: Arc<Daemon>,
}

fn timings(retry_base: Duration, retry_max: Duration, retry_cap: usize) -> Timings {
    Timings {
        poll_wait: Duration::from_millis(50),
        receive_slack: Duration::from_secs(5),
        receive_retry: Backoff::unbounded(Duration::from_millis(10), Duration::from_millis(100)),
        visibility: Duration::from_secs(30),
        visibility_renewal: Duration::from_secs(10),
        retry_base,
        retry_max,
        retry_cap,
        // One try: a failed final write leaves the message at once.
        status_write_retry: Backoff::new(Duration::from_millis(1), Duration::from_millis(1), 1),
        duplicate_hold: Backoff::unbounded(Duration::from_millis(10), Duration::from_millis(50)),
        shutdown_grace: Duration::from_millis(300),
        drain_bound: Duration::from_secs(3),
    }
}

fn fixture(timings: Timings) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let spool = dir.join("spool");
    let config = Config::parse(
        Path::new("agent.yml"),
        &format!(
            "root_dir: {}\nhooks:\n  kill_grace_seconds: 1\n",
            dir.join("root").display()
        ),
    )
    .unwrap();
    let hook_cancel = CancellationToken::new();
    let engine = Engine::new(Arc::new(config.engine_settings()), hook_cancel.clone()).unwrap();
    let flaky = Arc::new(Flaky::default());
    let daemon = Daemon::from_parts(Parts {
        host_id: "unit".into(),
        queue: Arc::new(Spool::open(spool.clone()).unwrap()),
        sinks: Arc::new(FlakySinks(flaky.clone())),
        fetcher: Arc::new(Fetcher::new(None, FetchOptions::default()).unwrap()),
        engine: Arc::new(engine),
        hook_cancel,
        dedupe: Arc::new(Dedupe::open(dir.join("root/dedupe")).unwrap()),
        config,
        timings,
    });
    Fixture {
        status: dir.join("status"),
        _tmp: tmp,
        dir,
        spool,
        flaky,
        daemon: Arc::new(daemon),
    }
}

impl Fixture {
    /// Submits a deployment of a directory bundle to group `group`, whose AfterInstall
    /// hook runs `hook` (if any).
    fn submit(&self, id: &str, group: &str, hook: Option<&str>) {
        let bundle = self.dir.join("bundles").join(id);
        std::fs::create_dir_all(&bundle).unwrap();
        let mut appspec = "version: 0.0\nos: linux\n".to_string();
        if let Some(body) = hook {
            let script = bundle.join("hook.sh");
            std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
            appspec.push_str("hooks:\n  AfterInstall:\n    - location: hook.sh\n");
        }
        std::fs::write(bundle.join("appspec.yml"), appspec).unwrap();
        let cmd = Command {
            version: 1,
            deployment_id: id.into(),
            application_name: "web".into(),
            deployment_group_name: group.into(),
            deployment_group_id: group.into(),
            revision: Revision::Local {
                path: bundle.display().to_string(),
                bundle_type: BundleType::Directory,
                sha256: None,
            },
            events: None,
            file_exists_behavior: None,
            is_rollback: false,
            creator: None,
            commit_sha: None,
            status: StatusTarget {
                sink: StatusSinkSpec::Local {
                    dir: self.status.display().to_string(),
                },
                notify_queue_url: None,
            },
            created_at: chrono::Utc::now(),
        };
        std::fs::create_dir_all(&self.spool).unwrap();
        Spool::submit(&self.spool, &format!("{id}.json"), &cmd.to_json()).unwrap();
    }

    fn acked(&self, id: &str) -> bool {
        self.spool.join(format!("done/{id}.json")).exists()
    }

    /// Runs the daemon until `shutdown` fires; returns how long the drain took.
    fn serve(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<Duration> {
        let daemon = self.daemon.clone();
        tokio::spawn(async move {
            let stop = shutdown.clone();
            let drain_started = Arc::new(Mutex::new(None::<Instant>));
            let marker = drain_started.clone();
            let watcher = tokio::spawn(async move {
                stop.cancelled().await;
                *marker.lock().unwrap() = Some(Instant::now());
            });
            daemon
                .serve(
                    shutdown,
                    CancellationToken::new(),
                    Arc::new(tokio::sync::Notify::new()),
                )
                .await;
            let _ = watcher.await;
            let started = drain_started.lock().unwrap().expect("shutdown fired");
            started.elapsed()
        })
    }
}

async fn wait_until(bound: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A message whose final status cannot be written is left, tried again after growing
/// (jittered) delays, and handled once the store is back, without running twice; its retry
/// bookkeeping is gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_left_message_is_retried_with_growing_delays_and_handled() {
    let f = fixture(timings(
        Duration::from_millis(200),
        Duration::from_secs(2),
        16,
    ));
    f.flaky.fail.lock().unwrap().insert("d-LEFT00001".into(), 3);
    f.submit("d-LEFT00001", "g1", Some("echo ran"));
    let shutdown = CancellationToken::new();
    let served = f.serve(shutdown.clone());
    wait_until(Duration::from_secs(60), "the acknowledgement", || {
        f.acked("d-LEFT00001")
    })
    .await;
    let attempts = f.flaky.attempts("d-LEFT00001");
    assert_eq!(
        attempts.len(),
        4,
        "three failures, then the write that landed"
    );
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    // Delay n is drawn from [base*2^n / 2, base*2^n]: at least 100, 200, 400 ms.
    for (n, gap) in gaps.iter().enumerate() {
        let floor = Duration::from_millis(100 << n);
        assert!(
            *gap >= floor,
            "retry {n} came after {gap:?}, before {floor:?}"
        );
    }
    assert!(gaps[2] > gaps[0], "delays grow: {gaps:?}");
    assert_eq!(
        f.daemon.pending_retries(),
        0,
        "bookkeeping forgotten once done"
    );
    shutdown.cancel();
    served.await.unwrap();
    assert_eq!(f.daemon.tasks_running(), 0);
}

/// Shutdown drains within its bound (grace, then hooks stopped, then the drain bound) and
/// owns every task the daemon spawned: the running deployment, a retry sleeping for a
/// minute, and status writers. The retry bookkeeping never goes past its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_within_its_bound_and_owns_every_task() {
    let t = timings(Duration::from_secs(60), Duration::from_secs(120), 1);
    let bound = t.shutdown_grace + t.drain_bound;
    let f = fixture(t);
    for id in ["d-FAIL00001", "d-FAIL00002"] {
        f.flaky.fail.lock().unwrap().insert(id.into(), u32::MAX);
    }
    f.submit("d-FAIL00001", "g1", None);
    f.submit("d-FAIL00002", "g2", None);
    let started = f.dir.join("started");
    f.submit(
        "d-LONG00001",
        "g3",
        Some(&format!("touch {}\nsleep 600", started.display())),
    );
    let shutdown = CancellationToken::new();
    let served = f.serve(shutdown.clone());
    wait_until(
        Duration::from_secs(60),
        "both failing writes and the hook",
        || {
            !f.flaky.attempts("d-FAIL00001").is_empty()
                && !f.flaky.attempts("d-FAIL00002").is_empty()
                && started.exists()
        },
    )
    .await;
    // Give the second Left outcome its moment to plan (or be refused) a retry.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(f.daemon.pending_retries(), 1, "capped at one");
    assert!(
        f.daemon.tasks_running() >= 2,
        "the retry and the deployment are tracked"
    );
    shutdown.cancel();
    let drained = served.await.unwrap();
    assert!(
        drained < bound + Duration::from_secs(2),
        "drained in {drained:?}, bound {bound:?}"
    );
    assert_eq!(f.daemon.tasks_running(), 0, "no task outlives serve");
    assert_eq!(f.daemon.pending_retries(), 0);
    assert!(
        !f.acked("d-LONG00001"),
        "the interrupted deployment stays for the next start"
    );
}
