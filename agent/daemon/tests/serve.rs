//! The daemon driven in-process from its parts: a spool queue in a temp dir, a status sink
//! that fails on purpose, a registry store that fails or hangs, and timings of milliseconds
//! instead of minutes.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pier_agent::config::Config;
use pier_agent::daemon::{Daemon, Parts, SinkOpener, Timings};
use pier_agent::dedupe::Dedupe;
use pier_agent::fetch::{FetchOptions, Fetcher};
use pier_agent::registry::{Announcement, Registrar};
use pier_engine::deploy::Engine;
use pier_protocol::registry::{registry_key, HostHealth, HostState, RegistryEntry};
use pier_protocol::{BundleType, Command, Revision, StatusRecord, StatusSinkSpec, StatusTarget};
use pier_sys::backoff::Backoff;
use pier_transport::local::LocalStatusSink;
use pier_transport::spool::Spool;
use pier_transport::store::{DirStore, ObjectStore, Precondition, PutOutcome, Versioned};
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
    fixture_with(timings, None)
}

fn fixture_with(timings: Timings, registry: Option<Arc<Registrar>>) -> Fixture {
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
        registry,
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
            ignore_application_stop_failures: false,
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

/// A registry store that refuses writes while `down` is set, and counts the refusals.
struct FlakyStore {
    inner: DirStore,
    down: std::sync::atomic::AtomicBool,
    refused: std::sync::atomic::AtomicU32,
}

impl ObjectStore for FlakyStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Versioned>> {
        self.inner.get(key)
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        bytes: Vec<u8>,
        when: Precondition,
    ) -> BoxFuture<'a, PutOutcome> {
        use std::sync::atomic::Ordering;
        if self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Box::pin(async {
                Err(TransportError::Config("the store is down (test)".into()))
            });
        }
        self.inner.put(key, bytes, when)
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: Option<usize>,
    ) -> BoxFuture<'a, Vec<String>> {
        self.inner.list(prefix, after, limit)
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        self.inner.delete(key)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn read_entry(dir: &Path) -> Option<RegistryEntry> {
    let bytes = std::fs::read(dir.join(registry_key("unit"))).ok()?;
    Some(RegistryEntry::from_json(&bytes).expect("the entry parses"))
}

/// The daemon announces the host with its tags at start, refreshes the heartbeat every
/// interval, goes on when the store refuses heartbeats (and catches up when it is back), and
/// marks the host stopped on shutdown, after which no heartbeat overwrites it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_is_announced_kept_fresh_through_store_failures_and_marked_stopped() {
    use std::sync::atomic::Ordering;
    let reg_dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FlakyStore {
        inner: DirStore::new(reg_dir.path()),
        down: false.into(),
        refused: 0.into(),
    });
    let registrar = Registrar::new(
        store.clone(),
        Announcement {
            host_id: "unit".into(),
            tags: [("role".to_string(), "web".to_string())].into(),
            availability_zone: Some("zone-a".into()),
            queue: Some("/spool".into()),
            deployment_groups: vec!["g1".into()],
        },
        Duration::from_millis(100),
    )
    .with_stop_bound(Duration::from_secs(2));
    let f = fixture_with(
        timings(Duration::from_secs(1), Duration::from_secs(2), 4),
        Some(Arc::new(registrar)),
    );
    let shutdown = CancellationToken::new();
    let served = f.serve(shutdown.clone());

    wait_until(Duration::from_secs(10), "the entry", || {
        read_entry(reg_dir.path()).is_some()
    })
    .await;
    let first = read_entry(reg_dir.path()).unwrap();
    assert_eq!(first.state, HostState::Running);
    assert_eq!(first.tags.get("role").map(String::as_str), Some("web"));
    assert_eq!(first.availability_zone.as_deref(), Some("zone-a"));
    assert_eq!(first.deployment_groups, ["g1"]);
    assert_eq!(first.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(first.heartbeat_interval_seconds, 1);
    assert_eq!(first.health(chrono::Utc::now()), HostHealth::Healthy);

    wait_until(Duration::from_secs(10), "a later heartbeat", || {
        read_entry(reg_dir.path()).is_some_and(|e| e.heartbeat_at > first.heartbeat_at)
    })
    .await;

    store.down.store(true, Ordering::SeqCst);
    wait_until(Duration::from_secs(10), "refused heartbeats", || {
        store.refused.load(Ordering::SeqCst) >= 3
    })
    .await;
    let during = read_entry(reg_dir.path()).unwrap();
    store.down.store(false, Ordering::SeqCst);
    wait_until(
        Duration::from_secs(10),
        "heartbeats after the outage",
        || read_entry(reg_dir.path()).is_some_and(|e| e.heartbeat_at > during.heartbeat_at),
    )
    .await;
    assert!(!served.is_finished(), "failed heartbeats are not fatal");

    shutdown.cancel();
    served.await.unwrap();
    let last = read_entry(reg_dir.path()).unwrap();
    assert_eq!(last.state, HostState::Stopped);
    assert_eq!(last.started_at, first.started_at);
    assert_eq!(last.health(chrono::Utc::now()), HostHealth::Stopped);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        read_entry(reg_dir.path()).unwrap(),
        last,
        "nothing writes after Stopped"
    );
    assert_eq!(f.daemon.tasks_running(), 0);
}

/// A store that never answers cannot hold up shutdown beyond the registrar's stop bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_registry_store_does_not_delay_shutdown_past_the_bound() {
    struct Hung;
    impl ObjectStore for Hung {
        fn get<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Option<Versioned>> {
            Box::pin(std::future::pending())
        }
        fn put<'a>(&'a self, _: &'a str, _: Vec<u8>, _: Precondition) -> BoxFuture<'a, PutOutcome> {
            Box::pin(std::future::pending())
        }
        fn list<'a>(
            &'a self,
            _: &'a str,
            _: Option<&'a str>,
            _: Option<usize>,
        ) -> BoxFuture<'a, Vec<String>> {
            Box::pin(std::future::pending())
        }
        fn delete<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ()> {
            Box::pin(std::future::pending())
        }
        fn describe(&self) -> String {
            "hung".into()
        }
    }
    let registrar = Registrar::new(
        Arc::new(Hung),
        Announcement {
            host_id: "unit".into(),
            ..Announcement::default()
        },
        Duration::from_millis(50),
    )
    .with_stop_bound(Duration::from_millis(500));
    let f = fixture_with(
        timings(Duration::from_secs(1), Duration::from_secs(2), 4),
        Some(Arc::new(registrar)),
    );
    let shutdown = CancellationToken::new();
    let served = f.serve(shutdown.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    let drained = served.await.unwrap();
    assert!(
        drained < Duration::from_secs(2),
        "shutdown took {drained:?} with a hung registry"
    );
}
