//! What pier's test binaries share (the e2e tests and each crate's integration tests):
//! scratch directories, real users, the moto server (SQS and S3 wire protocol on 127.0.0.1,
//! started through `scripts/services.sh` unless `AWS_ENDPOINT_URL` names one) with clients
//! and buckets on it, unique names, and [`skip`], which makes a skipped test count as
//! skipped rather than passed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use pier_transport::aws::{aws_clients, AwsClients, AwsSettings, Credentials};

/// The repository's top-level directory (where `scripts/` and `appspec-examples/` live).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("agent/testkit is two levels below the top")
        .to_path_buf()
}

/// A scratch directory removed when dropped.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("pier-test-")
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

/// Creates a system user (and its group) if it does not exist; tests run as root.
pub fn ensure_user(name: &str) {
    let exists = Command::new("getent")
        .args(["passwd", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !exists {
        let st = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", "--user-group", name])
            .status()
            .expect("run useradd");
        // Another test may have created it at the same moment.
        let exists_now = Command::new("getent")
            .args(["passwd", name])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(st.success() || exists_now, "useradd {name} failed");
    }
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
        role_arn: None,
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
    let bucket = unique("pier-test");
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
