//! incremental: an install on top of an earlier one, which leaves files it finds unchanged in
//! place (trusting the metadata its manifest recorded, or the unpack's digests), ends exactly
//! where a from-scratch install of the same revision into an empty destination ends: same
//! paths, kinds, contents, link targets, modes, owners and ACLs. Random revisions, three ways
//! to read a bundle (a directory, whose files the unpack hard-links into a snapshot; the same
//! directory read where it lies, as a hookless revision is; a tgz, whose files the unpack
//! writes and hashes), random `permissions`, random changes made at the destination behind
//! pier's back, some within a clock tick of the install, some after, and bundle files
//! rewritten in place with their size and mtime put back.

use std::collections::BTreeMap;
use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pier_engine::appspec::{FileExistsBehavior, FileMapping, ObjectType, Permission};
use pier_engine::bundle::unpack::{
    survey_directory, unpack, BundleType, Survey, UnpackPolicy, Walked,
};
use pier_engine::install::{apply, plan, InstallInput, Manifest, Verify};
use proptest::prelude::*;

use crate::support::Scratch;

/// Where a revision may put something: files at two depths, so that directories come and go.
const PATHS: &[&str] = &["a", "b", "c", "d0/x", "d0/y", "d1/x", "d1/d2/z"];
/// Contents of equal size among themselves, so that only a content check tells them apart.
const CONTENTS: &[&str] = &["", "aaaa", "bbbb", "cccc", "aaaaaaaa", "zzzzzzzz"];
const MODES: &[u32] = &[0o644, 0o600, 0o755];

#[derive(Debug, Clone)]
enum Node {
    File { content: usize, mode: usize },
    Link(&'static str),
}

type Tree = BTreeMap<&'static str, Node>;

#[derive(Debug, Clone)]
struct Revision {
    tree: Tree,
    /// A `permissions` entry giving every file mode 0640 and the `nobody` owner.
    restrict: bool,
    kind: Kind,
    /// Files the bundle rewrites get their old mtime back (same size: only the content and
    /// the ctime tell). Only where the bundle is read in place: a snapshot's evidence is the
    /// inode it shares with the previous snapshot and the mtime, which this fools.
    sneaky: bool,
}

/// How the bundle reaches Install.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Snapshot,
    InPlace,
    Tgz,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop::sample::select(&[Kind::Snapshot, Kind::InPlace, Kind::Tgz][..])
}

/// A change at the destination that pier did not make.
#[derive(Debug, Clone)]
enum Meddle {
    /// New content of the same size, the old mtime put back.
    EditKeepMtime,
    /// A new file (new inode) of the same size and mtime renamed over it.
    ReplaceKeepMtime,
    Chmod,
    Chown,
    Acl,
    Delete,
}

fn node() -> impl Strategy<Value = Option<Node>> {
    prop_oneof![
        2 => Just(None),
        5 => (0..CONTENTS.len(), 0..MODES.len())
            .prop_map(|(content, mode)| Some(Node::File { content, mode })),
        1 => prop::sample::select(&["a", "../b", "nowhere"][..]).prop_map(|t| Some(Node::Link(t))),
    ]
}

fn revision() -> impl Strategy<Value = Revision> {
    (
        prop::collection::vec(node(), PATHS.len()),
        any::<bool>(),
        kind(),
    )
        .prop_map(|(nodes, restrict, kind)| Revision {
            tree: PATHS
                .iter()
                .zip(nodes)
                .filter_map(|(p, n)| n.map(|n| (*p, n)))
                .collect(),
            restrict,
            kind,
            sneaky: false,
        })
}

fn meddling() -> impl Strategy<Value = Vec<(usize, Meddle)>> {
    prop::collection::vec(
        (
            0..PATHS.len(),
            prop::sample::select(
                &[
                    Meddle::EditKeepMtime,
                    Meddle::ReplaceKeepMtime,
                    Meddle::Chmod,
                    Meddle::Chown,
                    Meddle::Acl,
                    Meddle::Delete,
                ][..],
            ),
        ),
        0..4,
    )
}

/// A second revision that mostly keeps the first: what a redeploy usually looks like.
fn nearby(first: &Revision) -> impl Strategy<Value = Revision> {
    let first = first.clone();
    (
        prop::collection::vec((any::<bool>(), node()), PATHS.len()),
        any::<bool>(),
        kind(),
        any::<bool>(),
    )
        .prop_map(move |(changes, flip_restrict, kind, sneaky)| {
            let mut tree = first.tree.clone();
            for (p, (change, n)) in PATHS.iter().zip(changes) {
                if change {
                    match n {
                        Some(n) => tree.insert(p, n),
                        None => tree.remove(p),
                    };
                }
            }
            let links = tree.values().any(|n| matches!(n, Node::Link(_)));
            Revision {
                tree,
                restrict: first.restrict != flip_restrict,
                kind,
                // Only where it will be read in place (no symlink makes it a snapshot).
                sneaky: sneaky && kind == Kind::InPlace && !links,
            }
        })
}

/// Makes the bundle directory hold `rev`, changing only what differs (in place where a file
/// stays a file, so that its inode is kept, as an editor or a build tool may).
fn sync_bundle(bundle: &Path, rev: &Revision) {
    // A revision may hold nothing at all: the bundle is then an empty directory.
    fs::create_dir_all(bundle).unwrap();
    for p in PATHS {
        let path = bundle.join(p);
        let old = fs::symlink_metadata(&path).ok();
        match (rev.tree.get(p), old) {
            (None, Some(_)) => fs::remove_file(&path).unwrap(),
            (None, None) => {}
            (Some(Node::File { content, mode }), old) => {
                if old.as_ref().is_some_and(|m| !m.file_type().is_file()) {
                    fs::remove_file(&path).unwrap();
                }
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                let same = fs::read(&path).is_ok_and(|c| c == CONTENTS[*content].as_bytes());
                if !same {
                    let was = old.filter(|m| m.file_type().is_file());
                    fs::write(&path, CONTENTS[*content]).unwrap();
                    if let Some(m) =
                        was.filter(|m| rev.sneaky && m.len() == CONTENTS[*content].len() as u64)
                    {
                        let f = File::options().write(true).open(&path).unwrap();
                        f.set_times(FileTimes::new().set_modified(m.modified().unwrap()))
                            .unwrap();
                    }
                }
                fs::set_permissions(&path, fs::Permissions::from_mode(MODES[*mode])).unwrap();
            }
            (Some(Node::Link(t)), old) => {
                if old.is_some() {
                    fs::remove_file(&path).unwrap();
                }
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(t, &path).unwrap();
            }
        }
    }
    // Directories left empty would be deployed too; a fresh bundle would not have them.
    for d in ["d1/d2", "d1", "d0"] {
        let _ = fs::remove_dir(bundle.join(d));
    }
}

/// Unpacks the bundle directory (as it is, or packed as a tgz first) into `work/revision`,
/// as the deploy engine does, or surveys it to be read where it lies; returns the root to
/// install from, what the unpack recorded, whether the root is a snapshot, and the survey's
/// listing of a bundle read in place (which the plan reads instead of the tree, as the
/// deploy engine's does). A bundle with a symlink is snapshotted even when asked to be read
/// in place, as the deploy engine does.
fn unpacked(
    bundle: &Path,
    rev: &Revision,
    work: &Path,
) -> (
    PathBuf,
    pier_engine::bundle::unpack::Unpacked,
    bool,
    Option<Walked>,
) {
    fs::create_dir_all(work).unwrap();
    let kind = rev.kind;
    if kind == Kind::InPlace {
        match survey_directory(bundle, &UnpackPolicy::default()).unwrap() {
            Survey::InPlace {
                root,
                unpacked,
                walked,
            } => return (root, unpacked, false, Some(walked)),
            Survey::Snapshot(why) => {
                let links = rev.tree.values().any(|n| matches!(n, Node::Link(_)));
                assert!(links, "the bundle must be read in place: {why}");
            }
        }
    }
    let (src, kind) = if kind == Kind::Tgz {
        let file = work.join("bundle.tgz");
        let st = Command::new("tar")
            .arg("-C")
            .arg(bundle)
            .arg("-czf")
            .arg(&file)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        (file, BundleType::Tgz)
    } else {
        (bundle.to_path_buf(), BundleType::Directory)
    };
    let root = work.join("revision");
    let out = unpack(&src, kind, &root, &UnpackPolicy::default()).unwrap();
    (root, out, true, None)
}

fn mapping(dest: &Path) -> Vec<FileMapping> {
    vec![FileMapping {
        source: String::new(),
        destination: dest.to_path_buf(),
        span: Default::default(),
    }]
}

fn permissions(rev: &Revision, dest: &Path) -> Vec<Permission> {
    if !rev.restrict {
        return Vec::new();
    }
    vec![Permission {
        object: dest.to_path_buf(),
        pattern: Some("**".into()),
        except: vec![],
        owner: Some("nobody".into()),
        group: None,
        mode: Some(0o640),
        acls: vec![],
        context: None,
        types: vec![ObjectType::File],
        span: Default::default(),
    }]
}

/// Brings `bundle` to `rev` (then waits a while when `aged`), unpacks it in `work` and
/// installs it into `dest` on top of `previous`; returns the new manifest.
fn deploy(
    bundle: &Path,
    work: &Path,
    rev: &Revision,
    dest: &Path,
    previous: Option<&Manifest>,
    verify: Verify,
    aged: bool,
) -> Manifest {
    sync_bundle(bundle, rev);
    if aged {
        // The bundle's times settle before the install looks, so it records their ctimes.
        std::thread::sleep(Duration::from_millis(25));
    }
    let (root, out, snapshot, walked) = unpacked(bundle, rev, work);
    let files = mapping(dest);
    let perms = permissions(rev, dest);
    let p = plan(&InstallInput {
        revision_root: &root,
        files: &files,
        permissions: &perms,
        previous,
        file_exists_behavior: FileExistsBehavior::Overwrite,
        source_digests: Some(&out.digests),
        verify,
        snapshot,
        walked: walked.as_ref(),
        consume_revision: rev.kind == Kind::Tgz,
        keep: &[],
    })
    .unwrap();
    // The Install note counts what a dry run prints, without printing it.
    let mut counts: Vec<(String, usize)> = Vec::new();
    for word in p
        .to_string()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        match counts.iter_mut().find(|(w, _)| w == word) {
            Some((_, n)) => *n += 1,
            None => counts.push((word.to_string(), 1)),
        }
    }
    let counted: Vec<String> = counts.iter().map(|(w, n)| format!("{w} {n}")).collect();
    if !counted.is_empty() {
        assert_eq!(p.summary(), counted.join(", "));
    }
    apply(&p).unwrap()
}

/// Everything a deploy decides about a destination tree, by relative path.
fn snapshot(dest: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dest.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let m = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(dest).unwrap().to_path_buf();
            let what = if m.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&path).unwrap().display())
            } else {
                let acl = xattr::get(&path, "system.posix_acl_access")
                    .ok()
                    .flatten()
                    .map(|v| format!(" acl {v:?}"))
                    .unwrap_or_default();
                let ids = format!("{:o} {}:{}{acl}", m.mode() & 0o7777, m.uid(), m.gid());
                if m.is_dir() {
                    stack.push(path.clone());
                    format!("dir {ids}")
                } else {
                    format!("file {:?} {ids}", fs::read_to_string(&path).unwrap())
                }
            };
            out.insert(rel, what);
        }
    }
    out
}

/// Changes the destination the way an operator or an application might, without pier.
fn meddle(dest: &Path, what: &[(usize, Meddle)]) {
    for (i, m) in what {
        let path = dest.join(PATHS[*i]);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.file_type().is_file() {
            continue;
        }
        let flipped: String = fs::read_to_string(&path)
            .unwrap()
            .chars()
            .map(|c| if c == 'q' { 'r' } else { 'q' })
            .collect();
        let mtime = meta.modified().unwrap();
        match m {
            Meddle::EditKeepMtime => {
                let mut f = OpenOptions::new().write(true).open(&path).unwrap();
                f.write_all(flipped.as_bytes()).unwrap();
                f.set_times(FileTimes::new().set_modified(mtime)).unwrap();
            }
            Meddle::ReplaceKeepMtime => {
                let tmp = path.with_file_name(".meddle");
                let mut f = File::create(&tmp).unwrap();
                f.write_all(flipped.as_bytes()).unwrap();
                f.set_permissions(meta.permissions()).unwrap();
                f.set_times(FileTimes::new().set_modified(mtime)).unwrap();
                std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid())).unwrap();
                fs::rename(&tmp, &path).unwrap();
            }
            Meddle::Chmod => {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o604)).unwrap();
            }
            Meddle::Chown => std::os::unix::fs::chown(&path, Some(1), Some(1)).unwrap(),
            Meddle::Acl => {
                let _ = Command::new("setfacl")
                    .arg("-m")
                    .arg("u:1:rwx")
                    .arg(&path)
                    .status();
            }
            Meddle::Delete => fs::remove_file(&path).unwrap(),
        }
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn an_incremental_install_ends_where_a_fresh_one_does(
        (first, second) in revision().prop_flat_map(|r| (Just(r.clone()), nearby(&r))),
        meddling in meddling(),
        settle in any::<bool>(),
        again in any::<bool>(),
        paranoid in any::<bool>(),
        aged in any::<bool>(),
    ) {
        // install.verify: content reads every unchanged file; it must end in the same place.
        let verify = if paranoid { Verify::Content } else { Verify::Metadata };
        if !nix::unistd::geteuid().is_root() {
            crate::support::skip("changing owners at the destination needs root");
            return Ok(());
        }
        let s = Scratch::new();
        let dest = s.path().join("dest/app");
        let (bundle, work) = (s.path().join("bundle"), |n: &str| s.path().join(n));
        let m1 = deploy(&bundle, &work("r1"), &first, &dest, None, verify, aged);
        // Some changes land within a clock tick of the install, some well after: the first
        // kind must not slip past the recorded times, the second must be seen by them.
        if settle {
            std::thread::sleep(Duration::from_millis(25));
        }
        meddle(&dest, &meddling);
        let m2 = deploy(&bundle, &work("r2"), &second, &dest, Some(&m1), verify, false);
        let fresh = s.path().join("fresh/app");
        deploy(&s.path().join("fresh-bundle"), &work("f"), &second, &fresh, None, verify, false);
        prop_assert_eq!(snapshot(&dest), snapshot(&fresh));
        if again {
            // The same revision once more, nothing changed: every file trusted as it is.
            std::thread::sleep(Duration::from_millis(25));
            deploy(&bundle, &work("r3"), &second, &dest, Some(&m2), verify, false);
            prop_assert_eq!(snapshot(&dest), snapshot(&fresh));
        }
    }

    /// The case the general property reaches only now and then, every time: a bundle read
    /// where it lies, settled and recorded, then some of its files rewritten in place with
    /// their size and mtime put back; the next install must read them.
    #[test]
    fn a_bundle_read_in_place_is_not_trusted_past_a_rewrite(
        (first, second) in revision().prop_flat_map(|r| (Just(r.clone()), nearby(&r))),
    ) {
        if !nix::unistd::geteuid().is_root() {
            crate::support::skip("changing owners at the destination needs root");
            return Ok(());
        }
        let plain = |t: &Tree| t.iter().map(|(p, n)| match n {
            Node::Link(_) => (*p, Node::File { content: 0, mode: 0 }),
            n => (*p, n.clone()),
        }).collect::<Tree>();
        let first = Revision { tree: plain(&first.tree), kind: Kind::InPlace, sneaky: false, ..first };
        let second = Revision { tree: plain(&second.tree), kind: Kind::InPlace, sneaky: true, ..second };
        let s = Scratch::new();
        let dest = s.path().join("dest/app");
        let (bundle, work) = (s.path().join("bundle"), |n: &str| s.path().join(n));
        let m1 = deploy(&bundle, &work("r1"), &first, &dest, None, Verify::Metadata, true);
        std::thread::sleep(Duration::from_millis(25));
        deploy(&bundle, &work("r2"), &second, &dest, Some(&m1), Verify::Metadata, false);
        let fresh = s.path().join("fresh/app");
        deploy(&s.path().join("fresh-bundle"), &work("f"), &second, &fresh, None, Verify::Metadata, false);
        prop_assert_eq!(snapshot(&dest), snapshot(&fresh));
    }
}
