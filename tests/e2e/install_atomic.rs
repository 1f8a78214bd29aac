//! Install is all-or-nothing per path, whatever stops it: the real `pier-agent deploy-local`
//! killed (SIGKILL, through the debug build's `PIER_FAILPOINT` hook) at many points of an
//! Install over a 2,000-file destination, and a deployment that runs out of space.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{self, run_cmd, sha256, Agent, Run, Scratch};

/// What is at one path of a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Object {
    Dir,
    /// A file and the sha256 of its content.
    File(String),
}

/// A destination's objects by relative path ("" is the destination itself).
type Tree = BTreeMap<String, Object>;

const TEMP: &str = ".pier-tmp-";

/// The tree a revision's files make.
fn tree_of(files: &BTreeMap<String, Vec<u8>>) -> Tree {
    let mut t = Tree::new();
    t.insert(String::new(), Object::Dir);
    for (rel, body) in files {
        let mut at = Path::new(rel.as_str()).parent();
        while let Some(d) = at.filter(|d| !d.as_os_str().is_empty()) {
            t.insert(d.to_string_lossy().into_owned(), Object::Dir);
            at = d.parent();
        }
        t.insert(rel.clone(), Object::File(sha256(body)));
    }
    t
}

/// What is on disk under `dest`, and the temp files found there.
fn tree_on_disk(dest: &Path) -> (Tree, Vec<PathBuf>) {
    let mut t = Tree::new();
    let mut temps = Vec::new();
    fn walk(root: &Path, dir: &Path, t: &mut Tree, temps: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with(TEMP) {
                temps.push(p);
                continue;
            }
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                t.insert(rel, Object::Dir);
                walk(root, &p, t, temps);
            } else {
                t.insert(rel, Object::File(sha256(&std::fs::read(&p).unwrap())));
            }
        }
    }
    if dest.is_dir() {
        t.insert(String::new(), Object::Dir);
        walk(dest, dest, &mut t, &mut temps);
    }
    (t, temps)
}

/// Panics unless every path holds what it holds in `old` or in `new` (absent counts as a
/// state only for a path one of them lacks).
fn assert_each_path_old_or_new(disk: &Tree, old: &Tree, new: &Tree, point: &str) {
    let mut bad = Vec::new();
    for p in old.keys().chain(new.keys()).chain(disk.keys()) {
        let (d, o, n) = (disk.get(p), old.get(p), new.get(p));
        if d != o && d != n {
            bad.push(format!("{p:?}: on disk {d:?}, old {o:?}, new {n:?}"));
        }
    }
    bad.dedup();
    assert!(
        bad.is_empty(),
        "killed at {point}: {} paths hold neither revision, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

fn write_bundle(dir: &Path, dest: &Path, files: &BTreeMap<String, Vec<u8>>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("appspec.yml"),
        format!(
            "version: 0.0\nos: linux\nfiles:\n  - source: app\n    destination: {}\n",
            dest.display()
        ),
    )
    .unwrap();
    for (rel, body) in files {
        let p = dir.join("app").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
}

fn deploy(agent: &Agent, bundle: &Path, failpoint: Option<&str>) -> Run {
    let mut cmd: Command = agent.deploy_local_cmd(bundle);
    if let Some(fp) = failpoint {
        cmd.env("PIER_FAILPOINT", fp);
    }
    run_cmd(&mut cmd)
}

/// The number of file entries in the group's install manifest, and whether each exists.
fn manifest_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for g in std::fs::read_dir(root.join("groups")).unwrap() {
        let m = g.unwrap().path().join("install-manifest.json");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
        for e in v["entries"].as_array().unwrap() {
            if e["kind"] == "file" {
                out.push(PathBuf::from(e["path"].as_str().unwrap()));
            }
        }
    }
    out
}

/// Kill -9 at many points of an Install that changes 1,500 of 2,000 files, drops 500 (and
/// the five directories holding them) and adds 500 in five new directories. After each
/// kill every path holds its old or its new content; the next start rolls a kill while
/// staging back (exactly the old revision) and one while switching or removing forward
/// (exactly the new), as docs/operations.md says; a clean deployment then gives exactly the
/// new revision, no temp file anywhere, and a manifest of exactly the files on disk.
#[test]
fn install_killed_at_any_point_leaves_each_path_old_or_new() {
    let s = Scratch::new();
    let agent = Agent::builder(s.path()).build();
    let dest = s.path().join("www");
    let old: BTreeMap<String, Vec<u8>> = (0..2000)
        .map(|i| {
            (
                format!("d{:02}/f{i:04}.txt", i / 100),
                format!("old {i}\n").into_bytes(),
            )
        })
        .collect();
    let mut new: BTreeMap<String, Vec<u8>> = (0..1500)
        .map(|i| {
            (
                format!("d{:02}/f{i:04}.txt", i / 100),
                format!("new {i} ").repeat(i % 7 + 1).into_bytes(),
            )
        })
        .collect();
    new.extend((0..500).map(|i| {
        (
            format!("n{:02}/g{i:04}.txt", i / 100),
            format!("added {i}\n").into_bytes(),
        )
    }));
    let (old_tree, new_tree) = (tree_of(&old), tree_of(&new));
    let (old_b, new_b) = (s.path().join("old"), s.path().join("new"));
    write_bundle(&old_b, &dest, &old);
    write_bundle(&new_b, &dest, &new);

    deploy(&agent, &old_b, None).success();
    assert_eq!(tree_on_disk(&dest).0, old_tree);

    // 2,000 files staged, 2,000 renames, 505 removals (500 files, 5 directories).
    let points = [
        "install:stage:0",
        "install:stage:1",
        "install:stage:700",
        "install:stage:1999",
        "install:stage:2000",
        "install:switch:0",
        "install:switch:1",
        "install:switch:1000",
        "install:switch:2000",
        "install:remove:0",
        "install:remove:1",
        "install:remove:250",
        "install:remove:505",
    ];
    for point in points {
        let killed = deploy(&agent, &new_b, Some(point));
        assert_eq!(
            killed.code,
            -1,
            "{point}: deploy-local was not killed (a debug build reads PIER_FAILPOINT)\n{}",
            killed.all()
        );
        let (disk, _temps) = tree_on_disk(&dest);
        assert_each_path_old_or_new(&disk, &old_tree, &new_tree, point);

        // The next start recovers first; this one is then killed as its own Install starts
        // (before it changes anything), so what is on disk is what recovery left.
        let next = deploy(&agent, &new_b, Some("install:stage:0"));
        assert_eq!(next.code, -1, "{point}: {}", next.all());
        let (disk, temps) = tree_on_disk(&dest);
        assert!(temps.is_empty(), "{point}: recovery left temps {temps:?}");
        let (want, which) = if point.starts_with("install:stage") {
            (&old_tree, "rolled back to the old revision")
        } else {
            (&new_tree, "rolled forward to the new revision")
        };
        assert!(disk == *want, "{point}: not {which}");

        deploy(&agent, &new_b, None).success();
        let (disk, temps) = tree_on_disk(&dest);
        assert!(
            disk == new_tree,
            "{point}: the next deployment is not the new revision"
        );
        assert!(temps.is_empty(), "{point}: temps left {temps:?}");
        let listed = manifest_files(agent.root());
        assert_eq!(
            listed.len(),
            new.len(),
            "{point}: manifest lists {} files",
            listed.len()
        );
        assert!(listed.iter().all(|p| p.is_file()), "{point}");

        deploy(&agent, &old_b, None).success();
        assert!(tree_on_disk(&dest).0 == old_tree, "{point}: back to old");
    }
}

/// Files an interrupted Install keeps unchanged are still the group's after recovery (its
/// intent names only what changes; recovery takes the rest from the group's manifest): the
/// recovered manifest lists exactly what is on disk, so the next deployments neither trip
/// over the kept files (DISALLOW) nor leave them behind.
#[test]
fn an_interrupted_install_keeps_its_unchanged_files_on_the_books() {
    let s = Scratch::new();
    let agent = Agent::builder(s.path()).build();
    let dest = s.path().join("www");
    let old: BTreeMap<String, Vec<u8>> = (0..300)
        .map(|i| {
            (
                format!("d{}/f{i:03}", i / 100),
                format!("old {i}\n").into_bytes(),
            )
        })
        .collect();
    let mut new = old.clone();
    for i in (0..300).step_by(3) {
        new.insert(
            format!("d{}/f{i:03}", i / 100),
            format!("changed {i}\n").into_bytes(),
        );
    }
    new.extend((0..50).map(|i| (format!("n/g{i:02}"), b"added\n".to_vec())));
    let one: BTreeMap<String, Vec<u8>> = [("only".to_string(), b"1".to_vec())].into();
    let (old_b, new_b, one_b) = (
        s.path().join("old"),
        s.path().join("new"),
        s.path().join("one"),
    );
    write_bundle(&old_b, &dest, &old);
    write_bundle(&new_b, &dest, &new);
    write_bundle(&one_b, &dest, &one);
    let (old_tree, new_tree) = (tree_of(&old), tree_of(&new));
    for point in ["install:stage:20", "install:switch:20", "install:remove:0"] {
        deploy(&agent, &old_b, None).success();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let killed = deploy(&agent, &new_b, Some(point));
        assert_eq!(killed.code, -1, "{point}: {}", killed.all());
        // Recovery, then the old revision again: every kept file must be on the books, or
        // DISALLOW refuses it as a file in the way.
        deploy(&agent, &old_b, None).success();
        assert!(
            tree_on_disk(&dest).0 == old_tree,
            "{point}: not the old revision"
        );
        deploy(&agent, &new_b, None).success();
        assert!(
            tree_on_disk(&dest).0 == new_tree,
            "{point}: not the new revision"
        );
        // And a revision of one file: everything else goes.
        deploy(&agent, &one_b, None).success();
        assert!(
            tree_on_disk(&dest).0 == tree_of(&one),
            "{point}: files left behind"
        );
        assert_eq!(manifest_files(agent.root()).len(), 1, "{point}");
    }
}

/// Unmounts a test mount however the test ends.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A revision that does not fit on the destination's filesystem: the deployment fails at
/// Install, the previous install is intact byte for byte, and no staged temp is left.
#[test]
fn install_out_of_space_leaves_the_previous_install_and_no_temps() {
    let s = Scratch::new();
    let dest = s.path().join("small");
    std::fs::create_dir_all(&dest).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&dest)
        .output();
    match mounted {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return support::skip(&format!(
                "cannot mount a tmpfs here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return support::skip(&format!("cannot run mount: {e}")),
    }
    let _mount = Mount(dest.clone());
    let app = dest.join("app");
    let agent = Agent::builder(s.path()).build();
    let kib = |n: usize, seed: u8| {
        (0..n * 1024)
            .map(|i| (i as u8).wrapping_mul(seed))
            .collect::<Vec<u8>>()
    };
    let old: BTreeMap<String, Vec<u8>> = (0..3)
        .map(|i| (format!("f{i}.bin"), kib(200, 3 + i as u8)))
        .collect();
    // The same three files changed, and ten more: 2.6 MB staged beside 0.6 MB in use.
    let new: BTreeMap<String, Vec<u8>> = (0..13)
        .map(|i| (format!("f{i}.bin"), kib(200, 101 + i as u8)))
        .collect();
    let (old_b, new_b) = (s.path().join("old"), s.path().join("new"));
    write_bundle(&old_b, &app, &old);
    write_bundle(&new_b, &app, &new);
    deploy(&agent, &old_b, None).success();
    let before = tree_on_disk(&app).0;
    assert_eq!(before, tree_of(&old));

    let r = deploy(&agent, &new_b, None).code(1);
    assert!(r.stdout.contains("Install"), "{}", r.all());
    assert!(r.all().contains("No space left"), "{}", r.all());
    let (after, temps) = tree_on_disk(&app);
    assert!(after == before, "the previous install changed: {after:?}");
    assert!(temps.is_empty(), "staged temps left: {temps:?}");
    // Nothing else was left on the filesystem either.
    let left: Vec<_> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["app"]);
    // And the next deployment that fits still works from there.
    deploy(&agent, &old_b, None).success();
    assert_eq!(tree_on_disk(&app).0, before);
}
