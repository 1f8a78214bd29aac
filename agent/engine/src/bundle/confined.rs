//! Confined reads of an unpacked revision: every path the AppSpec names (the AppSpec itself,
//! hook scripts, `files` sources) is resolved beneath the revision root and never through a
//! symlink, `..` or absolute path that leaves it. A bundle may hold symlinks (CodeDeploy
//! bundles do: `current -> v2`, `scripts -> deploy/scripts`); those that stay inside keep
//! working, one that leads out is refused with an error naming the entry.
//!
//! The kernel does the resolving where it can: `openat2(2)` with `RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS` on a descriptor of the root. Where `openat2` is missing (Linux before
//! 5.6, or a seccomp filter that answers ENOSYS/EPERM) the same rule is applied by a walk, one
//! component at a time with `O_NOFOLLOW`, reading each symlink and splicing its target in
//! (absolute targets refused, `..` never above the root, at most [`MAX_LINKS`] links).
//! Everything that reads bundle content opens it here; nothing here knows what the file is for.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, readlinkat, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, Mode, SFlag};

/// How many symlinks one path may pass through (the kernel's own limit).
pub const MAX_LINKS: usize = 40;

/// Set once `openat2` has answered ENOSYS/EPERM: every later open walks.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// How paths are resolved beneath the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `openat2` when the kernel has it, else the walk.
    Auto,
    /// `openat2` only (an error where the kernel lacks it).
    Openat2,
    /// The component-by-component `O_NOFOLLOW` walk, even where `openat2` exists.
    Walk,
}

/// Why a bundle entry could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConfinedError {
    /// The path leads out of the bundle.
    #[error("refused bundle entry {entry}: {why}; symlinks in a bundle must stay inside it")]
    Escapes {
        /// The entry as named (escaped, bounded).
        entry: String,
        /// What leads out.
        why: &'static str,
    },
    /// Nothing at that path in the bundle.
    #[error("bundle entry {entry} does not exist")]
    Missing {
        /// The entry as named (escaped, bounded).
        entry: String,
    },
    /// Something other than a regular file where a file is read.
    #[error("bundle entry {entry} is {kind}, not a regular file")]
    NotRegular {
        /// The entry as named (escaped, bounded).
        entry: String,
        /// What it is ("a directory", "a FIFO", ...).
        kind: &'static str,
    },
    /// Any other failure of the system calls.
    #[error("cannot open bundle entry {entry}: {source}")]
    Io {
        /// The entry as named (escaped, bounded).
        entry: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl ConfinedError {
    /// True when the entry was refused for leading out of the bundle.
    pub fn is_escape(&self) -> bool {
        matches!(self, ConfinedError::Escapes { .. })
    }
}

/// An entry name fit for a message: the one rule every name follows
/// ([`pier_protocol::quote::quote`]: quoted, escaped, cut).
pub fn show(entry: &str) -> String {
    pier_protocol::quote::quote(entry)
}

/// The root of an unpacked revision, held open, through which bundle paths are opened.
#[derive(Debug)]
pub struct Confined {
    root: PathBuf,
    dir: OwnedFd,
    method: Method,
}

impl Confined {
    /// Opens `root` (the agent's own revision directory, so following a link to it is fine).
    pub fn open(root: &Path) -> io::Result<Confined> {
        let dir = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Confined {
            root: root.to_path_buf(),
            dir,
            method: Method::Auto,
        })
    }

    /// The same root, resolved with `method` (tests force the walk with it).
    pub fn with_method(mut self, method: Method) -> Confined {
        self.method = method;
        self
    }

    /// The root as given.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens `rel` (in-bundle links followed) for reading; refuses anything but a regular
    /// file. Opened non-blocking, so a FIFO cannot hang the caller before it is refused.
    pub fn open_file(&self, rel: &str) -> Result<File, ConfinedError> {
        let fd = self.resolve(rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY)?;
        let st = fstat(&fd).map_err(|e| io_err(rel, e))?;
        let kind = file_kind(st.st_mode);
        if kind != SFlag::S_IFREG {
            return Err(ConfinedError::NotRegular {
                entry: show(rel),
                kind: kind_name(kind),
            });
        }
        Ok(File::from(fd))
    }

    /// The path of `rel` with every in-bundle link resolved: beneath the root, free of
    /// symlinks at the moment it is returned. Fails as [`Confined::open_file`] does for a path
    /// that leads out or is missing.
    pub fn real_path(&self, rel: &str) -> Result<PathBuf, ConfinedError> {
        let fd = self.resolve(rel, OFlag::O_PATH)?;
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|source| {
            ConfinedError::Io {
                entry: show(rel),
                source,
            }
        })
    }

    /// Whether `rel` resolves beneath the root to something that exists.
    pub fn check(&self, rel: &str) -> Result<(), ConfinedError> {
        self.resolve(rel, OFlag::O_PATH).map(drop)
    }

    /// Opens `rel` beneath the root with `flags` (plus `O_CLOEXEC`).
    fn resolve(&self, rel: &str, flags: OFlag) -> Result<OwnedFd, ConfinedError> {
        let rel_path = if rel.is_empty() { "." } else { rel };
        let try_openat2 = match self.method {
            Method::Openat2 => true,
            Method::Walk => false,
            Method::Auto => !NO_OPENAT2.load(Ordering::Relaxed),
        };
        if try_openat2 {
            let how = OpenHow::new()
                .flags(flags | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            match openat2(&self.dir, OsStr::new(rel_path), how) {
                Ok(fd) => return Ok(fd),
                Err(Errno::ENOSYS | Errno::EPERM) if self.method == Method::Auto => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                }
                Err(Errno::EXDEV) => {
                    return Err(escapes(rel, "it leads outside the bundle"));
                }
                Err(Errno::ELOOP) => {
                    return Err(escapes(rel, "too many symlinks, or a /proc link"));
                }
                Err(e) => return Err(io_err(rel, e)),
            }
        }
        self.walk(rel, flags)
    }

    /// The fallback: one component at a time, never letting the kernel follow a link.
    fn walk(&self, rel: &str, flags: OFlag) -> Result<OwnedFd, ConfinedError> {
        if rel.starts_with('/') {
            return Err(escapes(rel, "an absolute path leads outside the bundle"));
        }
        let here = OsStr::new(".");
        let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        // The directories passed through, from the root: `..` pops one.
        let mut stack: Vec<OwnedFd> =
            vec![openat(&self.dir, here, dir_flags, Mode::empty()).map_err(|e| io_err(rel, e))?];
        let mut todo: VecDeque<Vec<u8>> = components(rel.as_bytes()).collect();
        let mut links = 0;
        while let Some(name) = todo.pop_front() {
            if name == b".." {
                if stack.len() == 1 {
                    return Err(escapes(rel, "`..` leads above the bundle root"));
                }
                stack.pop();
                continue;
            }
            let cur = stack.last().expect("the root stays on the stack");
            let name = OsStr::from_bytes(&name);
            let st =
                fstatat(cur, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| io_err(rel, e))?;
            if file_kind(st.st_mode) == SFlag::S_IFLNK {
                links += 1;
                if links > MAX_LINKS {
                    return Err(escapes(rel, "too many symlinks"));
                }
                let target = readlinkat(cur, name).map_err(|e| io_err(rel, e))?;
                let target = target.as_bytes();
                if target.starts_with(b"/") {
                    return Err(escapes(rel, "a symlink to an absolute path leads outside"));
                }
                for part in components(target).collect::<Vec<_>>().into_iter().rev() {
                    todo.push_front(part);
                }
                continue;
            }
            if todo.is_empty() {
                // The last component, known not to be a link: O_NOFOLLOW refuses one swapped in.
                return openat(
                    cur,
                    name,
                    flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| match e {
                    Errno::ELOOP => escapes(rel, "a symlink appeared while it was opened"),
                    e => io_err(rel, e),
                });
            }
            let next = openat(cur, name, dir_flags | OFlag::O_NOFOLLOW, Mode::empty())
                .map_err(|e| io_err(rel, e))?;
            stack.push(next);
        }
        // The path ends at a directory already open (the root, `a/..`, a link to a directory).
        let cur = stack.last().expect("the root stays on the stack");
        openat(cur, here, flags | OFlag::O_CLOEXEC, Mode::empty()).map_err(|e| io_err(rel, e))
    }
}

/// The non-empty, non-`.` components of a path.
fn components(path: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    path.split(|&b| b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .map(<[u8]>::to_vec)
}

fn escapes(rel: &str, why: &'static str) -> ConfinedError {
    ConfinedError::Escapes {
        entry: show(rel),
        why,
    }
}

fn io_err(rel: &str, e: Errno) -> ConfinedError {
    match e {
        Errno::ENOENT | Errno::ENOTDIR => ConfinedError::Missing { entry: show(rel) },
        e => ConfinedError::Io {
            entry: show(rel),
            source: io::Error::from(e),
        },
    }
}

fn file_kind(mode: nix::sys::stat::mode_t) -> SFlag {
    SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits())
}

fn kind_name(kind: SFlag) -> &'static str {
    match kind {
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFLNK => "a symlink",
        _ => "not a file",
    }
}

/// Opens a file Install planned as a regular file of the revision (a path [`Confined`] has
/// already resolved, with no link in it): without following a link swapped in since, and
/// only if it is still a regular file.
pub(crate) fn open_planned(path: &Path) -> io::Result<File> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let st = fstat(&fd)?;
    if file_kind(st.st_mode) != SFlag::S_IFREG {
        return Err(io::Error::other(format!(
            "{} is {}, not a regular file",
            path.display(),
            kind_name(file_kind(st.st_mode))
        )));
    }
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_and_bounded() {
        assert_eq!(show("a\nb"), "\"a\\nb\"");
        let long = "x".repeat(1000);
        assert!(show(&long).chars().count() < pier_protocol::quote::MAX_MESSAGE_CHARS + 10);
    }

    #[test]
    fn components_skip_empty_and_dot() {
        let c: Vec<Vec<u8>> = components(b"./a//b/../c/").collect();
        assert_eq!(
            c,
            vec![b"a".to_vec(), b"b".to_vec(), b"..".to_vec(), b"c".to_vec()]
        );
    }
}
