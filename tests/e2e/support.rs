//! The shared fixture: a scratch directory, the paths of the real binaries, and a way to run
//! them and look at what they printed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use pier_transport::aws::{aws_clients, AwsClients, AwsSettings, Credentials};

/// Path of the `pier-agent` binary (`cargo build --workspace --bins` builds it; the test
/// command does that first).
pub fn agent_bin() -> PathBuf {
    built_bin("pier-agent")
}

/// Path of the `pier` controller binary.
pub fn pier_bin() -> PathBuf {
    built_bin("pier")
}

/// A binary of this workspace, from the target directory this test binary was built in
/// (`target/PROFILE/deps/e2e-HASH` → `target/PROFILE/NAME`). The binaries live in other
/// packages than this test, so cargo does not hand us their paths; a missing one is a clear
/// failure, not a skip.
fn built_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/PROFILE/deps");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is not built: run `cargo build --workspace --bins` before the end-to-end tests \
         (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The repository's top-level directory (where `appspec-examples/` lives).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("agent/e2e is two levels below the top")
        .to_path_buf()
}

/// One of the bundles in `appspec-examples/`.
pub fn example(name: &str) -> PathBuf {
    repo_root().join("appspec-examples").join(name)
}

/// The captured result of running a binary.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics with everything the command printed unless it exited 0.
    #[track_caller]
    pub fn success(self) -> Run {
        assert_eq!(
            self.code, 0,
            "expected success\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Panics unless the command exited with `code`.
    #[track_caller]
    pub fn code(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "unexpected exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// stdout and stderr together, for assertions that do not care which stream.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `bin` with `args`, no stdin, and captures its output.
pub fn run(bin: &Path, args: &[&str]) -> Run {
    run_cmd(Command::new(bin).args(args))
}

/// Runs a prepared command and captures its output.
pub fn run_cmd(cmd: &mut Command) -> Run {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Run::from_output(out)
}

/// A scratch directory removed when dropped.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("pier-e2e-")
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
