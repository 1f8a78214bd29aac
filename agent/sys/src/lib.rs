//! What every pier layer needs from the operating system and nothing else: durable atomic file
//! writes ([`atomic_write`]), logging to journald or stderr ([`logging`]), and the one retry
//! schedule every loop uses ([`backoff::Backoff`]), how much freed heap a long-running
//! process keeps ([`memory`]), and an inotify instance a task can wait on ([`inotify`]). The engine, the
//! transports, the agent and the controller all write state through [`atomic_write`], so there
//! is one definition of "written".

pub mod backoff;
pub mod inotify;
pub mod logging;
pub mod memory;

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` to `path` so that readers see the old content or the new, never a part,
/// even across a power cut: a temp file in the same directory, fsync, rename over, fsync of
/// the directory. The directory is created when missing.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = temp_beside(path)?;
    tmp.write_all(bytes)?;
    persist(tmp, path)
}

/// [`atomic_write`] of what `write` produces, streamed through a buffer into the temp file
/// rather than held whole in memory first.
pub fn atomic_write_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let mut tmp = temp_beside(path)?;
    {
        let mut w = io::BufWriter::with_capacity(64 * 1024, tmp.as_file_mut());
        write(&mut w)?;
        w.flush()?;
    }
    persist(tmp, path)
}

/// A temp file in `path`'s directory (created when missing), named after it, for a caller
/// that writes a large file in pieces and then [`persist`]s it. Dropped unpersisted, it is
/// removed.
pub(crate) fn temp_beside(path: &Path) -> io::Result<tempfile::NamedTempFile> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
}

/// Puts a fully written temp file (from [`temp_beside`], or any temp in `path`'s directory)
/// in place of `path` durably: fsync the file, rename over, fsync the directory.
pub fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> io::Result<()> {
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(parent_dir(path))
}

/// [`persist`] for a temp file known by its path (one written by async code): fsync it,
/// rename it over `path`, fsync the directory.
pub fn persist_path(tmp: &Path, path: &Path) -> io::Result<()> {
    File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, path)?;
    sync_dir(parent_dir(path))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Makes a directory's entries (a rename, a new or removed name) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/state.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        atomic_write(&p, b"old").unwrap();
        // A directory where the file should go makes the rename fail.
        let blocked = dir.path().join("d");
        std::fs::create_dir_all(blocked.join("x")).unwrap();
        assert!(atomic_write(&blocked, b"new").is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
    }
}
