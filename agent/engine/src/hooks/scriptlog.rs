//! The script log: one file per deployment (`logs/scripts.log`) that receives every line the
//! hook scripts print, each prefixed with the time it was read. The file is size-rotated the
//! way logrotate would do it (`scripts.log` → `scripts.log.1` → … → `scripts.log.N`, oldest
//! dropped) so that a chatty script cannot fill the disk. It knows nothing of hooks: callers
//! hand it finished text lines.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{SecondsFormat, Utc};

/// A timestamped, size-rotated log file shared by every hook of a deployment.
///
/// Cloning is cheap and every clone writes to the same file; it is `Send + Sync`, and each
/// line is written whole under a lock, so concurrent writers (stdout and stderr readers,
/// several hooks) never interleave inside a line.
#[derive(Clone, Debug)]
pub struct ScriptLog {
    path: PathBuf,
    inner: Arc<Mutex<LogFile>>,
}

#[derive(Debug)]
struct LogFile {
    file: File,
    /// Bytes in the current file; tracked here instead of asking the file system per line.
    size: u64,
    max_bytes: u64,
    keep: usize,
}

impl ScriptLog {
    /// Opens (creating if needed, with its parent directories) the log at `path` for
    /// appending. The current file is rotated once a line would take it past `max_bytes`;
    /// `keep` rotated files are kept (`keep == 0` truncates instead of rotating).
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> io::Result<ScriptLog> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                fs::create_dir_all(parent)?;
            }
        }
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(ScriptLog {
            path: path.to_path_buf(),
            inner: Arc::new(Mutex::new(LogFile {
                file,
                size,
                max_bytes: max_bytes.max(1),
                keep,
            })),
        })
    }

    /// The path of the current (newest) log file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `text` as one line, prefixed with the current UTC time in RFC 3339
    /// (`2026-11-26T07:00:00.123Z text`). Newlines inside `text` are replaced by spaces so
    /// that one call is always one line.
    pub(crate) fn line(&self, text: &str) -> io::Result<()> {
        let stamp = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut line = String::with_capacity(stamp.len() + text.len() + 2);
        line.push_str(&stamp);
        line.push(' ');
        line.extend(text.chars().map(|c| if c == '\n' { ' ' } else { c }));
        line.push('\n');

        // A writer that panicked mid-line leaves nothing inconsistent worth refusing for.
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let len = line.len() as u64;
        if inner.size > 0 && inner.size + len > inner.max_bytes {
            self.rotate(&mut inner)?;
        }
        inner.file.write_all(line.as_bytes())?;
        inner.size += len;
        Ok(())
    }

    /// Shifts `scripts.log.i` to `.i+1` (the oldest is overwritten by the rename), moves the
    /// current file to `.1` and starts a new one.
    fn rotate(&self, inner: &mut LogFile) -> io::Result<()> {
        if inner.keep == 0 {
            inner.file.set_len(0)?;
            inner.size = 0;
            return Ok(());
        }
        for i in (1..inner.keep).rev() {
            match fs::rename(self.numbered(i), self.numbered(i + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        fs::rename(&self.path, self.numbered(1))?;
        inner.file = open_append(&self.path)?;
        inner.size = 0;
        Ok(())
    }

    fn numbered(&self, i: usize) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{i}"));
        PathBuf::from(name)
    }
}

/// Script output may carry secrets a script echoed, so the log is not world-readable.
fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/scripts.log");
        let log = ScriptLog::open(&path, 200, 2).unwrap();
        for i in 0..40 {
            log.line(&format!("line {i:03} padding padding padding"))
                .unwrap();
        }
        for p in [path.clone(), log.numbered(1), log.numbered(2)] {
            let len = fs::metadata(&p).unwrap().len();
            assert!(len > 0 && len <= 200, "{} has {len} bytes", p.display());
        }
        assert!(!log.numbered(3).exists());
        let current = fs::read_to_string(&path).unwrap();
        assert!(current.contains("line 039"), "{current}");
    }

    #[test]
    fn keep_zero_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scripts.log");
        let log = ScriptLog::open(&path, 100, 0).unwrap();
        for i in 0..20 {
            log.line(&format!("line {i:03} padding padding")).unwrap();
        }
        assert!(fs::metadata(&path).unwrap().len() <= 100);
        assert!(!log.numbered(1).exists());
    }

    #[test]
    fn one_call_is_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scripts.log");
        let log = ScriptLog::open(&path, 1 << 20, 1).unwrap();
        log.line("a\nb").unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1);
        let (stamp, rest) = text.trim_end().split_once(' ').unwrap();
        chrono::DateTime::parse_from_rfc3339(stamp).unwrap();
        assert_eq!(rest, "a b");
    }
}
