//! The install's own journal: which phase an [`apply`](super::apply) was in (staging,
//! switching, removing) and what it placed, written atomically before each phase, so that the
//! next start can finish or undo a half-done install before anything else runs for the group
//! ([`recover`], called by the state module under the group lock).
//!
//! Staging only adds (new directories, temp files beside their destinations), so an install
//! stopped there is rolled back: its temps are removed and the previous install stands. From
//! the switch on, every temp is durable and named in the intent, so an install stopped there is
//! rolled forward: the remaining renames, then the removals. Either way each destination path
//! holds its old or its new content, and the manifest written afterwards ([`reconcile`])
//! lists what is on disk.
//!
//! Also the test hook `PIER_FAILPOINT` (debug builds only), which makes the process kill
//! itself at a chosen point of an install.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{rename_into_place, EntryKind, InstallError, Manifest, ManifestEntry, Removal};

/// How far an install got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Phase {
    /// Making new directories and writing temps beside their destinations; nothing of the
    /// previous install is changed yet. Recovery rolls back.
    Staging,
    /// Every temp is written and synced; renaming them over their destinations. Recovery
    /// rolls forward.
    Switching,
    /// Everything new is in place; removing what the new revision no longer has. Recovery
    /// finishes the removals.
    Removing,
}

/// One rename of the switch: a synced temp over its destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Rename {
    pub(crate) temp: PathBuf,
    pub(crate) dest: PathBuf,
    /// Whether it may replace what is at `dest` (else a thing that appeared there is kept).
    pub(crate) replace: bool,
}

/// What an unfinished install leaves for the next start: written before each phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Intent {
    pub(crate) phase: Phase,
    /// `<pid>-<nonce>`: every temp of this install is named `.pier-tmp-<tag>-...`.
    pub(crate) tag: String,
    /// The directories this install's temps are written in.
    pub(crate) temp_dirs: BTreeSet<PathBuf>,
    /// The new directories staging makes, parents first: a roll-back removes those left
    /// empty.
    #[serde(default)]
    pub(crate) made_dirs: Vec<PathBuf>,
    /// Switching: the renames, in order.
    pub(crate) renames: Vec<Rename>,
    /// Switching and removing: what of the previous install goes once the switch is done.
    pub(crate) removals: Vec<Removal>,
    /// The manifest before this install. An install of this version leaves it out: it is
    /// the group's manifest file, which is not written while the intent exists (but for the
    /// moment between writing the final or rolled-back manifest and removing the intent, when
    /// the file already describes the disk), so recovery reads it from there
    /// ([`Intent::previous_from`]). An intent written by an earlier version holds it.
    #[serde(serialize_with = "lean_previous")]
    pub(crate) previous: Option<Manifest>,
    /// Staging: everything this install may place; later: what it placed. An install of this
    /// version leaves out the files it keeps unchanged: they are in `previous` as they are.
    #[serde(serialize_with = "lean")]
    pub(crate) manifest: Manifest,
}

impl Intent {
    /// Fills in `previous` from the group's manifest file `m` (already read) when the intent
    /// does not hold it, without the records of what each file looked like on disk: a
    /// manifest rebuilt by a recovery trusts none of its files unread.
    pub(crate) fn previous_from(&mut self, m: Option<Manifest>) {
        if self.previous.is_some() {
            return;
        }
        self.previous = m.map(|mut m| {
            for e in &mut m.entries {
                e.disk = None;
                e.source = None;
                e.source_ctime = None;
            }
            m
        });
    }
}

/// An [`Intent`] as [`apply_logged`](super::apply_logged) writes it: borrowed, so that
/// recording a phase of a large install copies none of its lists. The same JSON as
/// `Intent`'s.
#[derive(Serialize)]
pub(crate) struct IntentRef<'a> {
    pub(crate) phase: Phase,
    pub(crate) tag: &'a str,
    pub(crate) temp_dirs: &'a BTreeSet<PathBuf>,
    pub(crate) made_dirs: &'a [PathBuf],
    pub(crate) renames: &'a [Rename],
    pub(crate) removals: &'a [Removal],
    #[serde(serialize_with = "lean_previous_ref")]
    pub(crate) previous: Option<&'a Manifest>,
    /// The entries of the intent's manifest (whose `revision` an intent never sets).
    #[serde(serialize_with = "lean_entries")]
    pub(crate) manifest: &'a [&'a ManifestEntry],
}

/// An intent's manifests without what each file looked like on disk ([`ManifestEntry`]'s
/// `disk` and `source`): all a recovery needs is which paths are whose, and an intent is
/// written three times an install. A manifest rebuilt by a recovery therefore trusts none of
/// its files unread, which is what it should do after a crash.
fn lean_of<'e, S, I>(entries: I, revision: Option<&Path>, s: S) -> Result<S::Ok, S::Error>
where
    S: serde::Serializer,
    I: ExactSizeIterator<Item = &'e ManifestEntry> + Clone,
{
    use serde::ser::{SerializeSeq, SerializeStruct};
    /// A [`ManifestEntry`] as serialized, borrowed, without `disk` and `source`.
    #[derive(Serialize)]
    struct LeanEntry<'a> {
        path: &'a Path,
        kind: EntryKind,
        #[serde(skip_serializing_if = "is_zero")]
        size: u64,
        mode: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        sha256: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        link_target: Option<&'a Path>,
        #[serde(skip_serializing_if = "is_false")]
        created: bool,
    }
    fn is_zero(n: &u64) -> bool {
        *n == 0
    }
    fn is_false(b: &bool) -> bool {
        !*b
    }
    struct Entries<I>(I);
    impl<'e, I> Serialize for Entries<I>
    where
        I: ExactSizeIterator<Item = &'e ManifestEntry> + Clone,
    {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(self.0.len()))?;
            for e in self.0.clone() {
                seq.serialize_element(&LeanEntry {
                    path: &e.path,
                    kind: e.kind,
                    size: e.size,
                    mode: e.mode,
                    sha256: e.sha256.as_deref(),
                    link_target: e.link_target.as_deref(),
                    created: e.created,
                })?;
            }
            seq.end()
        }
    }
    let mut st = s.serialize_struct("Manifest", 2)?;
    st.serialize_field("entries", &Entries(entries))?;
    st.serialize_field("revision", &revision)?;
    st.end()
}

fn lean<S: serde::Serializer>(m: &Manifest, s: S) -> Result<S::Ok, S::Error> {
    lean_of(m.entries.iter(), m.revision.as_deref(), s)
}

fn lean_previous<S: serde::Serializer>(m: &Option<Manifest>, s: S) -> Result<S::Ok, S::Error> {
    lean_previous_ref(&m.as_ref(), s)
}

fn lean_previous_ref<S: serde::Serializer>(m: &Option<&Manifest>, s: S) -> Result<S::Ok, S::Error> {
    struct Lean<'a>(&'a Manifest);
    impl Serialize for Lean<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            lean(self.0, s)
        }
    }
    match m {
        Some(m) => s.serialize_some(&Lean(m)),
        None => s.serialize_none(),
    }
}

fn lean_entries<S: serde::Serializer>(
    entries: &&[&ManifestEntry],
    s: S,
) -> Result<S::Ok, S::Error> {
    lean_of(entries.iter().copied(), None, s)
}

/// Where an install records its progress: the group's intent and manifest files.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InstallLog<'a> {
    /// The install-intent file (exists only while an install is unfinished).
    pub(crate) intent: &'a Path,
    /// The group's manifest of what its last Install placed.
    pub(crate) manifest: &'a Path,
}

fn record_err(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Write {
        action: "record the install's progress in",
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a JSON state file atomically (temp, fsync, rename, fsync of the directory).
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), InstallError> {
    // Compact and streamed: a manifest holds a line per placed file, and is written several
    // times an install.
    pier_sys::atomic_write_with(path, |w| {
        serde_json::to_writer(w, value).map_err(io::Error::other)
    })
    .map_err(record_err(path))
}

/// Removes the intent file once the install is finished or undone (durably: the directory is
/// synced, so a crash right after cannot bring the intent back).
pub(crate) fn clear(path: &Path) -> Result<(), InstallError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(record_err(path)(e)),
    }
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(record_err(path))?;
    }
    Ok(())
}

/// Whether `e` describes what is on disk at its path now (same kind of object).
fn on_disk(e: &ManifestEntry) -> bool {
    let Ok(meta) = fs::symlink_metadata(&e.path) else {
        return false;
    };
    match e.kind {
        EntryKind::File => meta.file_type().is_file(),
        // A kept directory may be a link to one (e.g. /var/www -> /srv/www).
        EntryKind::Dir => e.path.is_dir(),
        EntryKind::Symlink => meta.file_type().is_symlink(),
    }
}

/// The manifest that describes the disk after an install stopped part-way or was recovered:
/// for each path either manifest names, `primary`'s entry if it matches the kind of object on
/// disk, else `secondary`'s; a path holding neither is left out. A file entry whose content
/// differs from the disk does no harm: "unchanged" is only ever decided by hashing the disk.
pub(crate) fn reconcile(primary: &Manifest, secondary: Option<&Manifest>) -> Manifest {
    let mut out: BTreeMap<PathBuf, ManifestEntry> = BTreeMap::new();
    for e in secondary
        .into_iter()
        .flat_map(|m| &m.entries)
        .chain(&primary.entries)
    {
        if on_disk(e) {
            out.insert(e.path.clone(), e.clone());
        }
    }
    Manifest {
        entries: out.into_values().collect(),
        revision: primary
            .revision
            .clone()
            .or_else(|| secondary.and_then(|m| m.revision.clone())),
    }
}

/// Removes every temp named with `tag` in `dirs`; returns how many.
pub(crate) fn sweep(tag: &str, dirs: &BTreeSet<PathBuf>) -> usize {
    let prefix = format!("{}{tag}-", super::TEMP_PREFIX);
    let mut n = 0;
    for dir in dirs {
        let Ok(rd) = fs::read_dir(dir) else { continue };
        for e in rd.flatten() {
            let is_ours = e
                .file_name()
                .to_str()
                .is_some_and(|s| s.starts_with(&prefix));
            if is_ours
                && e.file_type().is_ok_and(|t| !t.is_dir())
                && fs::remove_file(e.path()).is_ok()
            {
                n += 1;
            }
        }
    }
    n
}

/// Carries out removals of the previous install; with `kill_at`, the failpoint counts them.
pub(crate) fn remove_all_of(removals: &[Removal], failpoints: bool) -> Result<(), InstallError> {
    for (k, r) in removals.iter().enumerate() {
        if failpoints {
            failpoint("remove", k + 1);
        }
        super::remove_previous(std::slice::from_ref(r))?;
    }
    Ok(())
}

/// What [`recover`] did, for the log and the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Stopped while staging: temps removed, the previous install stands.
    RolledBack,
    /// Stopped while switching or removing: the new install was finished.
    RolledForward,
}

/// Finishes or undoes the install `intent` describes (see the module comment) and returns the
/// manifest that describes the disk afterwards. Best effort per path: a rename or removal that
/// fails is logged and its path left as it is (old or new, never torn).
pub(crate) fn recover(intent: &Intent) -> (Manifest, Outcome) {
    match intent.phase {
        Phase::Staging => {
            let n = sweep(&intent.tag, &intent.temp_dirs);
            // Children before parents; a directory someone else filled since is left.
            for d in intent.made_dirs.iter().rev() {
                let _ = fs::remove_dir(d);
            }
            log::info!("interrupted install rolled back: {n} staged temp files removed");
            let m = reconcile(
                intent.previous.as_ref().unwrap_or(&Manifest::default()),
                Some(&intent.manifest),
            );
            (m, Outcome::RolledBack)
        }
        Phase::Switching | Phase::Removing => {
            let mut dirs = BTreeSet::new();
            for r in &intent.renames {
                if fs::symlink_metadata(&r.temp).is_err() {
                    continue; // renamed before the stop
                }
                if let Err(e) = rename_into_place(&r.temp, &r.dest, r.replace) {
                    log::warn!("finishing an interrupted install: {e}");
                    let _ = fs::remove_file(&r.temp);
                }
                if let Some(d) = r.dest.parent() {
                    dirs.insert(d.to_path_buf());
                }
            }
            sweep(&intent.tag, &intent.temp_dirs);
            for r in &intent.removals {
                if let Err(e) = super::remove_previous(std::slice::from_ref(r)) {
                    log::warn!("finishing an interrupted install: {e}");
                }
                if let Some(d) = r.path().parent() {
                    dirs.insert(d.to_path_buf());
                }
            }
            for d in dirs {
                let _ = fs::File::open(&d).and_then(|f| f.sync_all());
            }
            log::info!(
                "interrupted install rolled forward: {} renames and {} removals finished",
                intent.renames.len(),
                intent.removals.len()
            );
            (
                reconcile(&intent.manifest, intent.previous.as_ref()),
                Outcome::RolledForward,
            )
        }
    }
}

/// Test hook: with `PIER_FAILPOINT=install:PHASE:N` in the environment of a debug build, the
/// process kills itself (SIGKILL, like `kill -9`) at the Nth step of PHASE (`stage`: files and
/// links written; `switch`: renames; `remove`: removals; N = 0: as the phase starts, its
/// intent written). Release builds never read the variable. A cargo feature would be the
/// usual gate, but `cargo test` rebuilds the binaries the end-to-end tests run without
/// test-only features; the debug profile is what those binaries are always built with.
pub(crate) fn failpoint(phase: &str, n: usize) {
    #[cfg(debug_assertions)]
    {
        static AT: std::sync::OnceLock<Option<(String, usize)>> = std::sync::OnceLock::new();
        let at = AT.get_or_init(|| {
            let v = std::env::var("PIER_FAILPOINT").ok()?;
            let rest = v.strip_prefix("install:")?;
            let (p, n) = rest.rsplit_once(':')?;
            Some((p.to_string(), n.parse().ok()?))
        });
        if let Some((p, at_n)) = at {
            if p == phase && *at_n == n {
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = (phase, n);
}
