//! The `permissions` section: which placed objects each entry selects (CodeDeploy rules), the
//! owner/group/mode/acls/context to set on them, and the set-id check on bundle entries.
//!
//! Selection follows the CodeDeploy agent: a file object selects that file (when this install
//! placed it and `type` allows files); a directory object selects what this install placed
//! *beneath* it (never the directory itself) whose path relative to the object matches
//! `pattern` (default `**`, everything; other globs do not cross `/`) and no `except` glob,
//! filtered by `type`. An object selected by two entries is refused, as CodeDeploy does.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use globset::{GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};

use super::{Action, InstallError, Step};
use crate::appspec::{FileMapping, ObjectType, Permission, SeLinuxContext};

const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const SETID_BITS: u32 = 0o6000;

/// Permissions to set on one placed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PermissionStep {
    /// The placed object.
    pub(crate) path: PathBuf,
    /// Symlinks only get an owner (lchown); mode, ACLs and context would reach the target.
    pub(crate) is_link: bool,
    /// The `permissions` object that selected it (for messages).
    pub(crate) object: PathBuf,
    /// Owner uid, resolved from the name at plan time.
    pub(crate) uid: Option<u32>,
    /// Owner and group as the AppSpec names them (for the dry run).
    pub(crate) names: (Option<String>, Option<String>),
    /// Group gid, resolved from the name at plan time.
    pub(crate) gid: Option<u32>,
    /// Mode bits (set after chown, which would clear set-id bits).
    pub(crate) mode: Option<u32>,
    /// Entries for `setfacl -m`.
    pub(crate) acls: Vec<String>,
    /// SELinux context for `chcon`.
    pub(crate) context: Option<SeLinuxContext>,
    /// Where setfacl is, when ACLs are asked for.
    setfacl: Option<PathBuf>,
    /// Where chcon is, when a context is asked for.
    chcon: Option<PathBuf>,
}

impl fmt::Display for PermissionStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "permission {}", self.path.display())?;
        if let (Some(u), Some(name)) = (self.uid, &self.names.0) {
            write!(f, " owner={name}({u})")?;
        }
        if let (Some(g), Some(name)) = (self.gid, &self.names.1) {
            write!(f, " group={name}({g})")?;
        }
        if let (Some(m), false) = (self.mode, self.is_link) {
            write!(f, " mode={m:04o}")?;
        }
        if !self.acls.is_empty() && !self.is_link {
            write!(f, " acls={}", self.acls.join(","))?;
        }
        if let (Some(c), false) = (&self.context, self.is_link) {
            write!(f, " context={}", c.kind)?;
        }
        Ok(())
    }
}

/// Which objects one `permissions` entry selects.
struct Selector {
    object: PathBuf,
    files: bool,
    dirs: bool,
    /// `None` is `**`: everything beneath the object.
    pattern: Option<GlobMatcher>,
    except: GlobSet,
}

fn glob(object: &Path, pattern: &str) -> Result<globset::Glob, InstallError> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| InstallError::BadPattern {
            object: object.to_path_buf(),
            pattern: pattern.to_string(),
            detail: e.kind().to_string(),
        })
}

impl Selector {
    fn new(p: &Permission) -> Result<Selector, InstallError> {
        let pattern = match p.pattern.as_deref() {
            None | Some("**") => None,
            Some(pat) => Some(glob(&p.object, pat)?.compile_matcher()),
        };
        let mut except = GlobSetBuilder::new();
        for e in &p.except {
            except.add(glob(&p.object, e)?);
        }
        let except = except.build().map_err(|e| InstallError::BadPattern {
            object: p.object.clone(),
            pattern: p.except.join(","),
            detail: e.kind().to_string(),
        })?;
        Ok(Selector {
            object: p.object.clone(),
            files: p.types.is_empty() || p.types.contains(&ObjectType::File),
            dirs: p.types.is_empty() || p.types.contains(&ObjectType::Directory),
            pattern,
            except,
        })
    }

    /// Whether the placed object at `path` is selected. The object itself is selected only as
    /// a file; a directory object selects what lies beneath it.
    fn selects(&self, path: &Path, is_dir: bool) -> bool {
        if path == self.object {
            return !is_dir && self.files;
        }
        let Ok(rel) = path.strip_prefix(&self.object) else {
            return false;
        };
        if rel.as_os_str().is_empty() || (is_dir && !self.dirs) || (!is_dir && !self.files) {
            return false;
        }
        self.pattern.as_ref().is_none_or(|m| m.is_match(rel)) && !self.except.is_match(rel)
    }
}

/// Finds a host tool on PATH or in the usual system directories (the agent may run with a
/// minimal PATH under systemd).
pub(super) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn resolve_user(object: &Path, name: &str) -> Result<u32, InstallError> {
    let unknown = || InstallError::UnknownUser {
        object: object.to_path_buf(),
        name: name.to_string(),
    };
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        _ => name.parse().map_err(|_| unknown()),
    }
}

fn resolve_group(object: &Path, name: &str) -> Result<u32, InstallError> {
    let unknown = || InstallError::UnknownGroup {
        object: object.to_path_buf(),
        name: name.to_string(),
    };
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => name.parse().map_err(|_| unknown()),
    }
}

/// Resolves each permission entry against what the install places.
pub(super) fn plan(
    permissions: &[Permission],
    steps: &[Step],
) -> Result<Vec<PermissionStep>, InstallError> {
    // What this install places, and whether each is a directory / a link.
    let placed: Vec<(&Path, bool, bool)> = steps
        .iter()
        .filter_map(|s| {
            let (is_dir, is_link) = match &s.action {
                Action::Mkdir { .. }
                | Action::ReplaceWithDir { .. }
                | Action::KeepDir { created: true } => (true, false),
                Action::Create { .. } | Action::Replace { .. } => (false, false),
                Action::Unchanged { previous, .. } => {
                    (false, previous.kind == super::EntryKind::Symlink)
                }
                Action::Link { .. } => (false, true),
                Action::KeepDir { created: false } | Action::Retain => return None,
            };
            Some((s.dest.as_path(), is_dir, is_link))
        })
        .collect();

    let mut claimed: HashMap<&Path, &Path> = HashMap::new();
    let mut out = Vec::new();
    for p in permissions {
        let sel = Selector::new(p)?;
        let matched: Vec<_> = placed
            .iter()
            .filter(|(path, is_dir, _)| sel.selects(path, *is_dir))
            .collect();
        if matched.is_empty() {
            continue;
        }
        // Resolved only when something is selected: a user made by a BeforeInstall hook for
        // this very deployment exists by now, one never used need not exist.
        let uid = p
            .owner
            .as_deref()
            .map(|n| resolve_user(&p.object, n))
            .transpose()?;
        let gid = p
            .group
            .as_deref()
            .map(|n| resolve_group(&p.object, n))
            .transpose()?;
        let setfacl = if p.acls.is_empty() {
            None
        } else {
            Some(
                find_tool("setfacl").ok_or_else(|| InstallError::MissingTool {
                    object: p.object.clone(),
                    what: "acls",
                    tool: "setfacl",
                    package: "acl",
                })?,
            )
        };
        let chcon = match &p.context {
            None => None,
            Some(_) => Some(find_tool("chcon").ok_or_else(|| InstallError::MissingTool {
                object: p.object.clone(),
                what: "context",
                tool: "chcon",
                package: "coreutils (with SELinux support)",
            })?),
        };
        for (path, _, is_link) in matched {
            if let Some(first) = claimed.insert(path, &p.object) {
                return Err(InstallError::PermissionTwice {
                    path: path.to_path_buf(),
                    first: first.to_path_buf(),
                    second: p.object.clone(),
                });
            }
            out.push(PermissionStep {
                path: path.to_path_buf(),
                is_link: *is_link,
                object: p.object.clone(),
                uid,
                gid,
                names: (p.owner.clone(), p.group.clone()),
                mode: p.mode,
                acls: p.acls.clone(),
                context: p.context.clone(),
                setfacl: setfacl.clone(),
                chcon: chcon.clone(),
            });
        }
    }
    Ok(out)
}

/// Runs setfacl/chcon on `path` (through its descriptor) within the tool time limit.
fn run_tool(cmd: &mut Command, path: &Path) -> Result<(), InstallError> {
    let line = format!("{cmd:?}");
    crate::tool::run(cmd, crate::tool::TOOL_TIME_LIMIT).map_err(|e| InstallError::ToolFailed {
        command: line,
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Sets the planned permissions: owner first (chown clears set-id bits), then mode, ACLs and
/// SELinux context.
///
/// Each file or directory is opened once without following symlinks and everything is done
/// through that descriptor (the external tools get `/proc/PID/fd/N`): the directories an
/// AppSpec hands to an application user are writable by that user, who could otherwise swap a
/// placed file for a symlink to `/etc/shadow` between the install and this step and have root
/// change its mode.
pub(super) fn apply(steps: &[PermissionStep]) -> Result<(), InstallError> {
    for s in steps {
        let path = &s.path;
        if s.is_link {
            if s.uid.is_some() || s.gid.is_some() {
                std::os::unix::fs::lchown(path, s.uid, s.gid)
                    .map_err(super::write_err("change the owner of", path))?;
            }
            continue;
        }
        let file = open_no_follow(path)?;
        if s.uid.is_some() || s.gid.is_some() {
            nix::unistd::fchown(
                &file,
                s.uid.map(nix::unistd::Uid::from_raw),
                s.gid.map(nix::unistd::Gid::from_raw),
            )
            .map_err(|e| super::write_err("change the owner of", path)(e.into()))?;
        }
        if let Some(mode) = s.mode {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(super::write_err("change the mode of", path))?;
        }
        let by_fd = {
            use std::os::fd::AsRawFd;
            PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                file.as_raw_fd()
            ))
        };
        if let Some(setfacl) = &s.setfacl {
            run_tool(
                Command::new(setfacl)
                    .arg("-m")
                    .arg(s.acls.join(","))
                    .arg("--")
                    .arg(&by_fd),
                path,
            )?;
        }
        if let (Some(chcon), Some(ctx)) = (&s.chcon, &s.context) {
            let mut cmd = Command::new(chcon);
            if let Some(user) = &ctx.user {
                cmd.arg("-u").arg(user);
            }
            cmd.arg("-t").arg(&ctx.kind);
            if let Some(range) = &ctx.range {
                cmd.arg("-l").arg(range);
            }
            run_tool(cmd.arg("--").arg(&by_fd), path)?;
        }
    }
    Ok(())
}

/// Opens what install placed at `path` for changing its metadata: never through a symlink,
/// never blocking on a FIFO, and only a regular file or a directory.
pub(super) fn open_no_follow(path: &Path) -> Result<std::fs::File, InstallError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                super::write_err("set permissions on", path)(std::io::Error::other(
                    "it was replaced by a symlink after it was installed; refusing to follow it",
                ))
            } else {
                super::write_err("open to set permissions on", path)(e)
            }
        })?;
    let kind = file
        .metadata()
        .map_err(super::write_err("inspect", path))?
        .file_type();
    if !(kind.is_file() || kind.is_dir()) || kind.is_fifo() {
        return Err(super::write_err("set permissions on", path)(
            std::io::Error::other("it is no longer a regular file or directory"),
        ));
    }
    Ok(file)
}

/// Where a bundle entry (revision-relative) lands, for each `files` mapping that installs it.
fn destinations(files: &[FileMapping], entry: &str, is_dir: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for m in files {
        if m.source.is_empty() {
            out.push(m.destination.join(entry));
        } else if entry == m.source {
            // A file source lands as destination/<name>; a directory source's own directory is
            // not placed (its contents are).
            if !is_dir {
                let name = Path::new(entry).file_name().unwrap_or_default();
                out.push(m.destination.join(name));
            }
        } else if let Some(rest) = entry
            .strip_prefix(m.source.as_str())
            .and_then(|r| r.strip_prefix('/'))
        {
            out.push(m.destination.join(rest));
        }
    }
    out
}

/// Refuse set-id bits that no permissions entry grants: `setid_entries` from unpack, relative to the bundle.
///
/// An entry is granted when, wherever the `files` section installs it, a permissions entry
/// selecting that destination sets a mode with those set-id bits. An entry no mapping installs
/// is harmless (its bits were cleared on unpack) and passes.
pub fn check_setid(
    files: &[FileMapping],
    permissions: &[Permission],
    setid_entries: &[(String, u32)],
) -> Result<(), InstallError> {
    if setid_entries.is_empty() {
        return Ok(());
    }
    let selectors = permissions
        .iter()
        .map(|p| Ok((Selector::new(p)?, p.mode)))
        .collect::<Result<Vec<_>, InstallError>>()?;
    for (entry, mode) in setid_entries {
        let bits = mode & SETID_BITS;
        let is_dir = mode & S_IFMT == S_IFDIR;
        for dest in destinations(files, entry, is_dir) {
            let granted = selectors
                .iter()
                .any(|(sel, m)| m.is_some_and(|m| m & bits == bits) && sel.selects(&dest, is_dir));
            if !granted {
                return Err(InstallError::SetidNotGranted {
                    entry: entry.clone(),
                    mode: *mode & 0o7777,
                    dest,
                });
            }
        }
    }
    Ok(())
}

/// For the unit tests: a permission entry's selection as a plain function.
#[cfg(test)]
pub(super) fn tests_selector(p: &Permission) -> impl Fn(&Path, bool) -> bool {
    let s = Selector::new(p).expect("valid globs");
    move |path, is_dir| s.selects(path, is_dir)
}

#[cfg(test)]
mod swap_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn step(path: &Path, mode: u32) -> PermissionStep {
        PermissionStep {
            path: path.to_path_buf(),
            is_link: false,
            object: path.to_path_buf(),
            uid: None,
            names: (None, None),
            gid: None,
            mode: Some(mode),
            acls: vec![],
            context: None,
            setfacl: None,
            chcon: None,
        }
    }

    #[test]
    fn a_placed_file_swapped_for_a_symlink_is_refused_and_its_target_untouched() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("shadow");
        std::fs::write(&secret, "x").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let placed = d.path().join("index.html");
        std::os::unix::fs::symlink(&secret, &placed).unwrap();
        let err = apply(&[step(&placed, 0o666)]).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_fifo_in_place_of_a_file_is_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let placed = d.path().join("f");
        nix::unistd::mkfifo(&placed, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = apply(&[step(&placed, 0o644)]).unwrap_err();
        assert!(
            err.to_string().contains("no longer a regular file"),
            "{err}"
        );
    }

    #[test]
    fn mode_is_set_through_the_descriptor() {
        let d = tempfile::tempdir().unwrap();
        let placed = d.path().join("f");
        std::fs::write(&placed, "x").unwrap();
        apply(&[step(&placed, 0o640)]).unwrap();
        let mode = std::fs::metadata(&placed).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);
    }
}
