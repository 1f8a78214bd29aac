//! The engine tests' fixture: scratch directories, real users, and a way to say a test was
//! skipped.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

const PREFIX: &str = "pier-engine-test-";

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
