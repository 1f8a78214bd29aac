//! The `pier-agent validate` command: find the AppSpec of an appspec file, a bundle directory
//! or a bundle archive, run every [`appspec`](pier_engine::appspec) check that the input allows, and
//! print the findings.
//!
//! Archives are read in place (entry names, and the AppSpec's bytes), never unpacked: safe
//! unpacking belongs to `bundle`, and a validator has no reason to write anything.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;

use pier_engine::appspec::{self, Diagnostic, MAX_APPSPEC_BYTES};
use pier_engine::bundle::tar_stream::{self, MAX_NAME_BYTES};
use pier_engine::bundle::unpack::MAX_ZIP_EXTRA_BYTES;
use pier_engine::bundle::{Confined, ConfinedError};
use pier_protocol::quote::{quote, quote_bytes};
use pier_protocol::BundleType;

/// How much of an archive reader's message a refusal keeps.
const MAX_REASON_CHARS: usize = 400;

/// How findings are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One `FILE:LINE:COL: severity: key: message; hint` line per finding, then a summary.
    Text,
    /// One JSON document on stdout (see [`Report`]).
    Json,
}

/// What `pier-agent validate` was asked to check.
#[derive(Debug, Clone)]
pub struct Options {
    /// An appspec file, a bundle directory, or a bundle archive.
    pub path: PathBuf,
    /// `-A NAME`: the AppSpec file name inside a bundle.
    pub appspec_filename: Option<String>,
    /// Text for people, JSON for tools.
    pub format: Format,
}

/// Why validation could not even start: these exit 2, not 1.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ValidateError {
    /// PATH does not exist.
    #[error("{path}: no such file or directory; give an appspec.yml, a bundle directory or a .tar/.tgz/.zip bundle")]
    Missing { path: PathBuf },
    /// PATH (or a file in the bundle) could not be read.
    #[error("{path}: cannot read: {source}; check the path and its permissions")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The bundle holds none of the AppSpec names looked for.
    #[error("{path}: no {names} at the bundle root; add one, or name it with -A NAME")]
    NoAppSpec { path: PathBuf, names: String },
    /// `-A` named something other than a file at the bundle root.
    #[error("{path}: -A `{name}` must be a file name at the bundle root, without `/` or `..`")]
    BadName { path: PathBuf, name: String },
    /// The archive is truncated, corrupt, or not of the kind its name says.
    #[error("{path}: not a readable {kind} archive: {reason}; check that the file is complete and of that type")]
    Archive {
        path: PathBuf,
        kind: &'static str,
        reason: String,
    },
    /// A tar stream the bundle reader refused (turned into [`ValidateError::Archive`]).
    #[error(transparent)]
    Tar(#[from] tar_stream::TarError),
    /// The AppSpec is too large to be one.
    #[error("{path}: the AppSpec {name} is over {MAX_APPSPEC_BYTES} bytes; an AppSpec is a small YAML file")]
    TooLarge { path: PathBuf, name: String },
    /// The AppSpec is not a regular file, or could not be read.
    #[error("{path}: the AppSpec `{name}`: {source}")]
    Unusable {
        path: PathBuf,
        name: String,
        source: appspec::ReadError,
    },
    /// The AppSpec in a bundle directory leads out of it, or cannot be opened beneath it.
    #[error("{path}: {source}")]
    Refused {
        path: PathBuf,
        source: ConfinedError,
    },
}

/// The JSON form of a validation run.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// The PATH given on the command line.
    pub(crate) path: String,
    /// The AppSpec label used in the findings.
    pub(crate) appspec: Option<String>,
    /// True when there is no error (exit 0).
    pub(crate) valid: bool,
    /// How many findings are errors.
    pub(crate) errors: usize,
    /// How many findings are warnings.
    pub(crate) warnings: usize,
    /// Every finding, in the order of the text.
    pub(crate) diagnostics: Vec<Diagnostic>,
    /// Set when validation could not start (exit 2); the findings are then empty.
    pub(crate) usage_error: Option<String>,
}

/// The bundle around an AppSpec, as far as validation needs it.
enum Bundle {
    /// A lone appspec file: nothing to check sources against.
    None,
    /// Every file and directory path in the bundle, normalized and relative to its root.
    Listed {
        files: BTreeSet<String>,
        dirs: BTreeSet<String>,
        /// A bundle directory, held open: a path is in it when it resolves beneath the root
        /// (through in-bundle links too), as the deployment will resolve it.
        revision: Option<Confined>,
    },
}

/// An AppSpec found for PATH: its label for messages, its bytes, and its bundle.
struct Found {
    label: String,
    bytes: Vec<u8>,
    bundle: Bundle,
}

/// Runs the command; returns the process exit code (0 valid, 1 invalid, 2 usage).
pub fn run(opts: &Options) -> i32 {
    let path_label = opts.path.display().to_string();
    let found = match find(&opts.path, opts.appspec_filename.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("pier-agent validate: {e}");
            if opts.format == Format::Json {
                print_json(&Report {
                    path: path_label,
                    appspec: None,
                    valid: false,
                    errors: 0,
                    warnings: 0,
                    diagnostics: Vec::new(),
                    usage_error: Some(e.to_string()),
                });
            }
            return 2;
        }
    };
    let diags = check(&found);
    let errors = diags.iter().filter(|d| d.is_error()).count();
    let warnings = diags.len() - errors;
    match opts.format {
        Format::Text => {
            for d in &diags {
                println!("{d}");
            }
            if errors == 0 {
                println!("{}: valid ({warnings} warning(s))", found.label);
            } else {
                println!(
                    "{}: invalid: {errors} error(s), {warnings} warning(s)",
                    found.label
                );
            }
        }
        Format::Json => print_json(&Report {
            path: path_label,
            appspec: Some(found.label.clone()),
            valid: errors == 0,
            errors,
            warnings,
            diagnostics: diags,
            usage_error: None,
        }),
    }
    if errors == 0 {
        0
    } else {
        1
    }
}

fn print_json(report: &Report) {
    match serde_json::to_string_pretty(report) {
        Ok(s) => println!("{s}"),
        // Serializing plain strings and numbers cannot fail; say so loudly if it ever does.
        Err(e) => eprintln!("pier-agent validate: cannot print JSON: {e}"),
    }
}

/// Every finding for the AppSpec found, in the order of the text.
fn check(found: &Found) -> Vec<Diagnostic> {
    let parsed = match appspec::parse_bytes(&found.label, &found.bytes) {
        Ok(p) => p,
        Err(diags) => return diags,
    };
    let mut diags = parsed.warnings;
    let user_exists = |name: &str| matches!(nix::unistd::User::from_name(name), Ok(Some(_)));
    match &found.bundle {
        Bundle::None => {
            // No bundle to look into, but the host's users can still be checked.
            diags.extend(appspec::check_environment(
                &found.label,
                &parsed.spec,
                &|_| true,
                Some(&user_exists),
            ));
        }
        Bundle::Listed {
            files,
            dirs,
            revision,
        } => {
            let has = |p: &str| match revision {
                Some(r) => r.check(p).is_ok(),
                None => files.contains(p) || dirs.contains(p),
            };
            let is_file = |p: &str| files.contains(p);
            diags.extend(appspec::check_environment(
                &found.label,
                &parsed.spec,
                &has,
                Some(&user_exists),
            ));
            diags.extend(appspec::check_file_objects(
                &found.label,
                &parsed.spec,
                &is_file,
            ));
        }
    }
    diags.sort_by_key(|d| (d.span, d.severity));
    diags
}

/// The AppSpec names to look for at a bundle root, in order.
fn candidates(name: Option<&str>, path: &Path) -> Result<Vec<String>, ValidateError> {
    match name {
        Some(n) => {
            if n.is_empty() || n.contains('/') || n == "." || n == ".." {
                return Err(ValidateError::BadName {
                    path: path.to_path_buf(),
                    name: n.to_string(),
                });
            }
            Ok(vec![n.to_string()])
        }
        None => Ok(vec!["appspec.yml".to_string(), "appspec.yaml".to_string()]),
    }
}

fn no_appspec(path: &Path, names: &[String]) -> ValidateError {
    ValidateError::NoAppSpec {
        path: path.to_path_buf(),
        names: names.join(" or "),
    }
}

/// How an archive kind is named in messages.
fn archive_name(kind: BundleType) -> &'static str {
    match kind {
        BundleType::Tgz => "tar.gz",
        other => other.as_str(),
    }
}

/// Names the archive kind from the file name, else from its first bytes; None for text.
fn archive_kind(path: &Path) -> Result<Option<BundleType>, ValidateError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if let Some(kind) = BundleType::from_file_name(&name) {
        return Ok(Some(kind));
    }
    if name.ends_with(".yml") || name.ends_with(".yaml") {
        return Ok(None);
    }
    let read_err = |source| ValidateError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; pier_protocol::MAGIC_LEN];
    let mut f = File::open(path).map_err(read_err)?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]).map_err(read_err)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(BundleType::from_magic(&head[..n]))
}

fn find(path: &Path, name: Option<&str>) -> Result<Found, ValidateError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ValidateError::Missing {
            path: path.to_path_buf(),
        },
        _ => ValidateError::Read {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    if meta.is_dir() {
        return find_in_dir(path, name);
    }
    match archive_kind(path)? {
        Some(kind) => find_in_archive(path, kind, name),
        None => {
            let bytes = read_capped(path)?;
            Ok(Found {
                label: path.display().to_string(),
                bytes,
                bundle: Bundle::None,
            })
        }
    }
}

/// Reads an AppSpec named on the command line (following a link: the user named it), but
/// only a regular file and only up to the one limit.
fn read_capped(path: &Path) -> Result<Vec<u8>, ValidateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(|source| ValidateError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    read_appspec(f, path, &path.display().to_string())
}

/// [`appspec::read_bounded`], its refusals as validation errors.
fn read_appspec(f: File, path: &Path, name: &str) -> Result<Vec<u8>, ValidateError> {
    appspec::read_bounded(f).map_err(|source| match source {
        appspec::ReadError::TooLarge => ValidateError::TooLarge {
            path: path.to_path_buf(),
            name: name.to_string(),
        },
        source => ValidateError::Unusable {
            path: path.to_path_buf(),
            name: name.to_string(),
            source,
        },
    })
}

/// A bundle directory: the AppSpec is opened beneath it, as a deployment opens it.
fn find_in_dir(dir: &Path, name: Option<&str>) -> Result<Found, ValidateError> {
    let names = candidates(name, dir)?;
    let chosen = names
        .iter()
        .find(|n| dir.join(n).symlink_metadata().is_ok())
        .ok_or_else(|| no_appspec(dir, &names))?;
    let file = dir.join(chosen);
    let revision = Confined::open(dir).map_err(|source| ValidateError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let opened = revision
        .open_file(chosen)
        .map_err(|source| ValidateError::Refused {
            path: dir.to_path_buf(),
            source,
        })?;
    let bytes = read_appspec(opened, dir, chosen)?;
    let mut files = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    list_dir(dir, "", &mut files, &mut dirs).map_err(|source| ValidateError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(Found {
        label: file.display().to_string(),
        bytes,
        bundle: Bundle::Listed {
            files,
            dirs,
            revision: Some(revision),
        },
    })
}

/// Lists a directory tree without following symlinks (a symlink counts as a file: it is
/// what the bundle holds at that path).
fn list_dir(
    root: &Path,
    rel: &str,
    files: &mut BTreeSet<String>,
    dirs: &mut BTreeSet<String>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let child = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        if entry.file_type()?.is_dir() {
            dirs.insert(child.clone());
            list_dir(root, &child, files, dirs)?;
        } else {
            files.insert(child);
        }
    }
    Ok(())
}

/// An archive member name as a bundle path (`./a/b/` → `a/b`); None for names that are not
/// inside the bundle, which the unpacker refuses anyway.
fn member_path(raw: &str) -> Option<String> {
    let p = appspec_bundle_path(raw)?;
    (!p.is_empty()).then_some(p)
}

fn appspec_bundle_path(raw: &str) -> Option<String> {
    let mut parts = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// Records `path` and every directory above it.
fn add_member(
    path: String,
    is_dir: bool,
    files: &mut BTreeSet<String>,
    dirs: &mut BTreeSet<String>,
) {
    let mut parent = path.as_str();
    while let Some((up, _)) = parent.rsplit_once('/') {
        dirs.insert(up.to_string());
        parent = up;
    }
    if is_dir {
        dirs.insert(path);
    } else {
        files.insert(path);
    }
}

fn find_in_archive(
    path: &Path,
    kind: BundleType,
    name: Option<&str>,
) -> Result<Found, ValidateError> {
    let names = candidates(name, path)?;
    let bad = |reason: String| ValidateError::Archive {
        path: path.to_path_buf(),
        kind: archive_name(kind),
        reason: pier_protocol::quote::bounded(&reason, MAX_REASON_CHARS),
    };
    let read_err = |source| ValidateError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut files = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    // The AppSpec candidates' contents, by name, as met in the archive.
    let mut found: Vec<(String, Vec<u8>)> = Vec::new();
    let file = File::open(path).map_err(read_err)?;
    match kind {
        BundleType::Tar | BundleType::Tgz => {
            let reader: Box<dyn Read> = if kind == BundleType::Tgz {
                Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file)))
            } else {
                Box::new(BufReader::new(file))
            };
            let listed = tar_stream::for_each_member(reader, |m| -> Result<(), ValidateError> {
                let raw = String::from_utf8_lossy(m.name).into_owned();
                let Some(p) = member_path(&raw) else {
                    return Ok(());
                };
                let is_dir = m.entry_type.is_dir();
                if !is_dir && names.contains(&p) {
                    if m.size > MAX_APPSPEC_BYTES {
                        return Err(ValidateError::TooLarge {
                            path: path.to_path_buf(),
                            name: quote(&p),
                        });
                    }
                    let mut bytes = Vec::new();
                    m.data
                        .take(MAX_APPSPEC_BYTES + 1)
                        .read_to_end(&mut bytes)
                        .map_err(|e| bad(e.to_string()))?;
                    found.push((p.clone(), bytes));
                }
                add_member(p, is_dir, &mut files, &mut dirs);
                Ok(())
            });
            listed.map_err(|e| match e {
                ValidateError::Tar(t) => bad(t.to_string()),
                e => e,
            })?;
        }
        BundleType::Zip => {
            let mut ar =
                zip::ZipArchive::new(BufReader::new(file)).map_err(|e| bad(e.to_string()))?;
            for i in 0..ar.len() {
                let mut entry = ar.by_index(i).map_err(|e| bad(e.to_string()))?;
                let extra = entry.extra_data().map_or(0, |d| d.len());
                for (what, len, limit) in [
                    ("name", entry.name_raw().len(), MAX_NAME_BYTES),
                    ("extra field", extra, MAX_ZIP_EXTRA_BYTES),
                ] {
                    if len as u64 > limit {
                        return Err(bad(format!(
                            "entry {} has a {what} of {len} bytes, over the cap of {limit}",
                            quote_bytes(entry.name_raw())
                        )));
                    }
                }
                let raw = entry.name().map_err(|e| bad(e.to_string()))?.into_owned();
                let Some(p) = member_path(&raw) else { continue };
                let is_dir = entry.is_dir();
                if !is_dir && names.contains(&p) {
                    if entry.size() > MAX_APPSPEC_BYTES {
                        return Err(ValidateError::TooLarge {
                            path: path.to_path_buf(),
                            name: quote(&p),
                        });
                    }
                    let mut bytes = Vec::new();
                    (&mut entry)
                        .take(MAX_APPSPEC_BYTES + 1)
                        .read_to_end(&mut bytes)
                        .map_err(|e| bad(e.to_string()))?;
                    found.push((p.clone(), bytes));
                }
                add_member(p, is_dir, &mut files, &mut dirs);
            }
        }
        BundleType::Directory => unreachable!("archive_kind never names a directory"),
    }
    // The first candidate name wins, whatever order the archive stores them in.
    let (chosen, bytes) = names
        .iter()
        .find_map(|n| found.iter().find(|(f, _)| f == n).cloned())
        .ok_or_else(|| no_appspec(path, &names))?;
    Ok(Found {
        label: format!("{}/{}", path.display(), chosen),
        bytes,
        bundle: Bundle::Listed {
            files,
            dirs,
            revision: None,
        },
    })
}
