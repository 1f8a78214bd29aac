//! The transport tests' fixture: scratch directories, moto clients, unique names, and a
//! command to carry; and a way to say a test was skipped.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pier_protocol::{BundleType, Command, Revision, StatusSinkSpec, StatusTarget};
use pier_transport::aws::{aws_clients, AwsClients, AwsSettings, Credentials};
use pier_transport::sqs::{QueueSpec, SqsQueue};

const PREFIX: &str = "pier-transport-test-";

/// A scratch directory removed when dropped.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix(PREFIX)
                .tempdir()
                .expect("create scratch dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `contents` at `rel` under the scratch dir, creating parents; returns the path.
    pub fn write(&self, rel: &str, contents: &str) -> PathBuf {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// Writes an executable script at `rel`.
    pub fn script(&self, rel: &str, contents: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.write(rel, contents);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
}

/// The repository's top-level directory (where `scripts/` lives).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the crate is two levels below the top")
        .to_path_buf()
}

/// The endpoint of the moto server for this test process.
pub fn moto_endpoint() -> &'static str {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    ENDPOINT.get_or_init(|| {
        if let Ok(url) = std::env::var("AWS_ENDPOINT_URL") {
            if !url.is_empty() {
                return url;
            }
        }
        // A state dir of our own, so this process's moto is not confused with a shared one;
        // --watch-pid stops it when this test process exits.
        let state = std::env::temp_dir().join(format!("pier-moto-{}", std::process::id()));
        let out = std::process::Command::new(repo_root().join("scripts/services.sh"))
            .arg("start")
            .arg("--state-dir")
            .arg(&state)
            .arg("--watch-pid")
            .arg(std::process::id().to_string())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run scripts/services.sh start");
        assert!(
            out.status.success(),
            "scripts/services.sh start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(state.join("endpoint"))
            .expect("services.sh wrote the endpoint")
            .trim()
            .to_string()
    })
}

/// AWS clients for moto (which takes any credentials).
pub async fn moto_clients() -> AwsClients {
    let settings = AwsSettings {
        region: Some("us-east-1".into()),
        endpoint_url: Some(moto_endpoint().to_string()),
        profile: None,
        credentials: Some(Credentials::new("testing", "testing", None, None, "tests")),
    };
    aws_clients(&settings).await.expect("build AWS clients")
}

/// A name no other test (or test run against a shared moto) uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        chrono::Utc::now().timestamp_millis() % 1_000_000
    )
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A new, empty bucket on moto.
pub async fn new_bucket(aws: &AwsClients) -> String {
    let bucket = unique("pier-e2e");
    aws.s3
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create bucket");
    bucket
}

/// A new bucket on moto with versioning on.
pub async fn new_versioned_bucket(aws: &AwsClients) -> String {
    let bucket = new_bucket(aws).await;
    aws.s3
        .put_bucket_versioning()
        .bucket(&bucket)
        .versioning_configuration(
            aws_sdk_s3::types::VersioningConfiguration::builder()
                .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .expect("enable versioning");
    bucket
}

/// A version-1 deployment command reporting to the local status directory `status_dir`.
pub fn command(id: &str, revision: Revision, status_dir: &Path) -> Command {
    Command {
        version: 1,
        deployment_id: id.into(),
        application_name: "web".into(),
        deployment_group_name: "prod".into(),
        deployment_group_id: "g-prod".into(),
        revision,
        events: None,
        file_exists_behavior: None,
        is_rollback: false,
        creator: Some("tests".into()),
        commit_sha: Some("0123456789abcdef".into()),
        status: StatusTarget {
            sink: StatusSinkSpec::Local {
                dir: status_dir.display().to_string(),
            },
            notify_queue_url: None,
        },
        created_at: chrono::Utc::now(),
    }
}

/// A revision on this host (never fetched by these tests).
pub fn local_revision() -> Revision {
    Revision::Local {
        path: "/srv/bundle.tgz".into(),
        bundle_type: BundleType::Tgz,
        sha256: None,
    }
}

/// A new SQS queue on moto whose messages go to a dead-letter queue after
/// `max_receive_count` receives.
pub async fn new_queue(aws: &AwsClients, max_receive_count: u32) -> SqsQueue {
    let spec = QueueSpec {
        name: unique("pier-host"),
        url: None,
        create: true,
        max_receive_count,
    };
    SqsQueue::open(aws.sqs.clone(), &spec)
        .await
        .expect("create queue")
}

/// Marks the calling test as skipped, saying why: prints `SKIPPED TEST: reason` and, when
/// `PIER_TEST_SKIP_LOG` names a file, appends the line `TEST: reason` to it, so the test
/// command counts the test as skipped rather than passed. The caller returns right after.
pub fn skip(reason: &str) {
    use std::io::Write;
    let thread = std::thread::current();
    // The test harness names each test's thread after the test.
    let test = thread.name().unwrap_or("unnamed test");
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os("PIER_TEST_SKIP_LOG") {
        // One line per skip, whatever the reason holds; one write, so parallel tests'
        // lines do not interleave.
        let line = format!("{test}: {}\n", reason.replace(['\n', '\r'], " "));
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .unwrap_or_else(|e| panic!("record the skip in {}: {e}", log.to_string_lossy()));
    }
}
