//! Unit tests for the plan logic, on real files under a temp dir.

use super::*;
use crate::appspec::{FileMapping, ObjectType, Permission};

fn mapping(source: &str, dest: &Path) -> FileMapping {
    FileMapping {
        source: source.to_string(),
        destination: dest.to_path_buf(),
        span: Default::default(),
    }
}

fn perm(object: &Path) -> Permission {
    Permission {
        object: object.to_path_buf(),
        pattern: None,
        except: vec![],
        owner: None,
        group: None,
        mode: None,
        acls: vec![],
        context: None,
        types: vec![],
        span: Default::default(),
    }
}

/// A revision with `site/index.html`, `site/css/a.css`, `conf/app.conf`.
fn revision() -> tempfile::TempDir {
    let rev = tempfile::tempdir().unwrap();
    let r = rev.path();
    fs::create_dir_all(r.join("site/css")).unwrap();
    fs::write(r.join("site/index.html"), "<h1>hi</h1>").unwrap();
    fs::write(r.join("site/css/a.css"), "body{}").unwrap();
    fs::create_dir_all(r.join("conf")).unwrap();
    fs::write(r.join("conf/app.conf"), "port=1").unwrap();
    rev
}

fn input<'a>(
    rev: &'a Path,
    files: &'a [FileMapping],
    permissions: &'a [Permission],
    previous: Option<&'a Manifest>,
    b: FileExistsBehavior,
) -> InstallInput<'a> {
    InstallInput {
        revision_root: rev,
        files,
        permissions,
        previous,
        file_exists_behavior: b,
        source_digests: None,
        verify: Verify::default(),
        snapshot: true,
        walked: None,
        consume_revision: false,
        keep: &[],
    }
}

#[test]
fn directory_source_copies_contents_and_file_source_lands_by_name() {
    let rev = revision();
    let out = tempfile::tempdir().unwrap();
    let www = out.path().join("srv/www");
    let etc = out.path().join("etc/app");
    let files = [mapping("site", &www), mapping("conf/app.conf", &etc)];
    let p = plan(&input(
        rev.path(),
        &files,
        &[],
        None,
        FileExistsBehavior::Disallow,
    ))
    .unwrap();
    let shown = p.to_string();
    assert_eq!(p.summary(), first_words(&shown));
    assert!(shown.contains(&format!("mkdir      {}", out.path().join("srv").display())));
    assert!(shown.contains(&format!("create     {}", www.join("css/a.css").display())));
    assert!(shown.contains(&format!("create     {}", etc.join("app.conf").display())));
    let m = apply(&p).unwrap();
    assert_eq!(
        fs::read_to_string(www.join("index.html")).unwrap(),
        "<h1>hi</h1>"
    );
    assert_eq!(fs::read_to_string(etc.join("app.conf")).unwrap(), "port=1");
    let created: Vec<_> = m
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Dir && e.created)
        .map(|e| e.path.clone())
        .collect();
    assert!(created.contains(&out.path().join("srv")));
    assert!(created.contains(&www.join("css")));
}

#[test]
fn disallow_names_every_file_in_the_way_and_plans_nothing() {
    let rev = revision();
    let out = tempfile::tempdir().unwrap();
    fs::write(out.path().join("index.html"), "mine").unwrap();
    let files = [mapping("site", out.path())];
    let err = plan(&input(
        rev.path(),
        &files,
        &[],
        None,
        FileExistsBehavior::Disallow,
    ))
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&out.path().join("index.html").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("DISALLOW"), "{msg}");
    assert_eq!(err.error_code(), ErrorCode::FileExists);
    assert_eq!(
        fs::read_to_string(out.path().join("index.html")).unwrap(),
        "mine"
    );
}

#[test]
fn second_install_keeps_unchanged_files_and_removes_dropped_ones() {
    let rev = revision();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("app");
    let files = [mapping("site", &dest)];
    let first = apply(
        &plan(&input(
            rev.path(),
            &files,
            &[],
            None,
            FileExistsBehavior::Disallow,
        ))
        .unwrap(),
    )
    .unwrap();

    // The next revision drops css/ and changes nothing else.
    fs::remove_dir_all(rev.path().join("site/css")).unwrap();
    let p = plan(&input(
        rev.path(),
        &files,
        &[],
        Some(&first),
        FileExistsBehavior::Disallow,
    ))
    .unwrap();
    let shown = p.to_string();
    assert_eq!(p.summary(), first_words(&shown));
    assert!(shown.contains(&format!("unchanged  {}", dest.join("index.html").display())));
    assert!(shown.contains(&format!("remove     {}", dest.join("css/a.css").display())));
    assert!(shown.contains(&format!("rmdir      {}", dest.join("css").display())));
    let second = apply(&p).unwrap();
    assert!(!dest.join("css").exists());
    assert!(second.entries.iter().any(|e| e.path == dest && e.created));
}

#[test]
fn a_file_changed_on_disk_is_not_taken_for_unchanged() {
    let rev = revision();
    let out = tempfile::tempdir().unwrap();
    let files = [mapping("site", out.path())];
    let first = apply(
        &plan(&input(
            rev.path(),
            &files,
            &[],
            None,
            FileExistsBehavior::Disallow,
        ))
        .unwrap(),
    )
    .unwrap();
    // Same size, other content: only the hash tells.
    fs::write(out.path().join("index.html"), "<h1>HI</h1>").unwrap();
    let p = plan(&input(
        rev.path(),
        &files,
        &[],
        Some(&first),
        FileExistsBehavior::Disallow,
    ))
    .unwrap();
    assert!(p.to_string().contains(&format!(
        "create     {}",
        out.path().join("index.html").display()
    )));
    apply(&p).unwrap();
    assert_eq!(
        fs::read_to_string(out.path().join("index.html")).unwrap(),
        "<h1>hi</h1>"
    );
}

#[test]
fn two_sources_for_one_destination_are_refused() {
    let rev = revision();
    fs::write(rev.path().join("index.html"), "x").unwrap();
    let out = tempfile::tempdir().unwrap();
    let files = [
        mapping("site", out.path()),
        mapping("index.html", out.path()),
    ];
    let err = plan(&input(
        rev.path(),
        &files,
        &[],
        None,
        FileExistsBehavior::Overwrite,
    ))
    .unwrap_err();
    assert!(matches!(err, InstallError::TwoSources { .. }), "{err}");
    assert_eq!(err.error_code(), ErrorCode::InstallFailed);
}

#[test]
fn pattern_matches_direct_children_and_double_star_everything() {
    let obj = Path::new("/srv/app");
    let mut p = perm(obj);
    p.pattern = Some("*.sh".into());
    let s = permissions::tests_selector(&p);
    assert!(s(Path::new("/srv/app/run.sh"), false));
    assert!(!s(Path::new("/srv/app/bin/run.sh"), false));
    assert!(!s(Path::new("/srv/app"), true));

    let mut p = perm(obj);
    p.except = vec!["secret*".into()];
    p.types = vec![ObjectType::File];
    let s = permissions::tests_selector(&p);
    assert!(s(Path::new("/srv/app/bin/run.sh"), false));
    assert!(!s(Path::new("/srv/app/secret.key"), false));
    assert!(!s(Path::new("/srv/app/bin"), true));
}

#[test]
fn setid_is_refused_unless_a_permission_grants_it() {
    let dest = Path::new("/opt/tool");
    let files = [mapping("bin", dest)];
    let setid = [("bin/helper".to_string(), 0o100_000 | 0o4755)];
    let err = check_setid(&files, &[], &setid).unwrap_err();
    assert!(err.to_string().contains("bin/helper"), "{err}");
    assert_eq!(err.error_code(), ErrorCode::BundleRefused);

    let mut p = perm(dest);
    p.pattern = Some("helper".into());
    p.mode = Some(0o4750);
    check_setid(&files, &[p.clone()], &setid).unwrap();
    p.mode = Some(0o0750);
    assert!(check_setid(&files, &[p], &setid).is_err());
    // Not installed anywhere: harmless, the bits were cleared.
    check_setid(&[mapping("other", dest)], &[], &setid).unwrap();
}

fn many_files(n: usize) -> tempfile::TempDir {
    let rev = tempfile::tempdir().unwrap();
    for i in 0..n {
        let d = rev.path().join(format!("d{}", i % 7));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(format!("f{i}")), format!("content {i}")).unwrap();
    }
    rev
}

#[test]
fn many_files_are_placed_on_several_threads_and_listed_in_path_order() {
    let rev = many_files(300);
    let out = tempfile::tempdir().unwrap();
    let files = [mapping("", out.path())];
    let m = apply(
        &plan(&input(
            rev.path(),
            &files,
            &[],
            None,
            FileExistsBehavior::Disallow,
        ))
        .unwrap(),
    )
    .unwrap();
    let placed: Vec<_> = m
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .collect();
    assert_eq!(placed.len(), 300);
    for e in &placed {
        let i: usize = e.path.file_name().unwrap().to_str().unwrap()[1..]
            .parse()
            .unwrap();
        assert_eq!(fs::read_to_string(&e.path).unwrap(), format!("content {i}"));
        assert_eq!(e.size, format!("content {i}").len() as u64);
    }
    let paths: Vec<_> = m.entries.iter().map(|e| e.path.clone()).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);
}

#[test]
fn a_failing_file_step_fails_the_apply_naming_the_file() {
    let rev = many_files(300);
    let out = tempfile::tempdir().unwrap();
    let files = [mapping("", out.path())];
    let p = plan(&input(
        rev.path(),
        &files,
        &[],
        None,
        FileExistsBehavior::Disallow,
    ))
    .unwrap();
    fs::remove_file(rev.path().join("d3/f150")).unwrap();
    let err = apply(&p).unwrap_err();
    assert!(err.to_string().contains("d3/f150"), "{err}");
    assert_eq!(err.error_code(), ErrorCode::InstallFailed);
}

#[test]
fn a_file_that_appears_between_plan_and_apply_is_not_clobbered() {
    let rev = revision();
    let out = tempfile::tempdir().unwrap();
    let files = [mapping("site", out.path())];
    let p = plan(&input(
        rev.path(),
        &files,
        &[],
        None,
        FileExistsBehavior::Disallow,
    ))
    .unwrap();
    fs::write(out.path().join("index.html"), "someone else's").unwrap();
    let err = apply(&p).unwrap_err();
    assert!(
        matches!(err, InstallError::AppearedSincePlan { .. }),
        "{err}"
    );
    assert_eq!(err.error_code(), ErrorCode::FileExists);
    assert_eq!(
        fs::read_to_string(out.path().join("index.html")).unwrap(),
        "someone else's"
    );
    let stray: Vec<_> = fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".pier-"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn temp_files_of_a_killed_install_are_swept_but_not_a_live_ones() {
    let rev = revision();
    let out = tempfile::tempdir().unwrap();
    let dead = out
        .path()
        .join(format!("{TEMP_PREFIX}999999999-0-index.html"));
    let live = out.path().join(format!(
        "{TEMP_PREFIX}{}-{}-0-index.html",
        std::process::id(),
        process_nonce()
    ));
    fs::write(&dead, "half").unwrap();
    fs::write(&live, "being written").unwrap();
    let files = [mapping("site", out.path())];
    let p = plan(&input(
        rev.path(),
        &files,
        &[],
        None,
        FileExistsBehavior::Disallow,
    ))
    .unwrap();
    assert!(p.removals.contains(&Removal::File(dead.clone())));
    assert!(!p.removals.contains(&Removal::File(live.clone())));
    apply(&p).unwrap();
    assert!(!dead.exists());
    assert!(live.exists());
}

fn file_entry(path: &Path, body: &str) -> ManifestEntry {
    ManifestEntry {
        path: path.to_path_buf(),
        kind: EntryKind::File,
        size: body.len() as u64,
        mode: 0o644,
        sha256: Some(hex::encode(Sha256::digest(body.as_bytes()))),
        link_target: None,
        created: false,
        disk: None,
        source: None,
        source_ctime: None,
    }
}

/// An intent as a killed install leaves it: `a` changed (its temp written), `gone` to be
/// removed, `new/` made for `new/b` (its temp written).
fn interrupted(phase: intent::Phase) -> (tempfile::TempDir, Intent) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    fs::write(p.join("a"), "old a").unwrap();
    fs::write(p.join("gone"), "old gone").unwrap();
    fs::create_dir(p.join("new")).unwrap();
    let tag = "1-2";
    let (ta, tb) = (p.join(".pier-tmp-1-2-0-a"), p.join("new/.pier-tmp-1-2-1-b"));
    fs::write(&ta, "new a").unwrap();
    fs::write(&tb, "new b").unwrap();
    let previous = Manifest {
        entries: vec![
            file_entry(&p.join("a"), "old a"),
            file_entry(&p.join("gone"), "old gone"),
        ],
        revision: None,
    };
    let mut new_dir = dir_entry(&p.join("new"), true);
    new_dir.mode = 0o755;
    let intent = Intent {
        phase,
        tag: tag.into(),
        temp_dirs: [p.to_path_buf(), p.join("new")].into_iter().collect(),
        made_dirs: vec![p.join("new")],
        renames: vec![
            intent::Rename {
                temp: ta,
                dest: p.join("a"),
                replace: true,
            },
            intent::Rename {
                temp: tb,
                dest: p.join("new/b"),
                replace: false,
            },
        ],
        removals: vec![Removal::File(p.join("gone"))],
        previous: Some(previous),
        manifest: Manifest {
            entries: vec![
                file_entry(&p.join("a"), "new a"),
                new_dir,
                file_entry(&p.join("new/b"), "new b"),
            ],
            revision: None,
        },
    };
    (d, intent)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn recovery_of_a_stop_while_staging_rolls_back() {
    let (d, intent) = interrupted(intent::Phase::Staging);
    let (m, outcome) = recover_intent(&intent);
    assert_eq!(outcome, Outcome::RolledBack);
    assert_eq!(names(d.path()), ["a", "gone"]);
    assert_eq!(fs::read_to_string(d.path().join("a")).unwrap(), "old a");
    assert_eq!(Some(m), intent.previous);
}

#[test]
fn recovery_of_a_stop_while_switching_rolls_forward() {
    let (d, mut intent) = interrupted(intent::Phase::Switching);
    // The first rename happened before the stop.
    fs::rename(&intent.renames[0].temp, d.path().join("a")).unwrap();
    intent.renames[0].temp = d.path().join(".pier-tmp-1-2-0-a");
    let (m, outcome) = recover_intent(&intent);
    assert_eq!(outcome, Outcome::RolledForward);
    assert_eq!(names(d.path()), ["a", "new"]);
    assert_eq!(names(&d.path().join("new")), ["b"]);
    assert_eq!(fs::read_to_string(d.path().join("a")).unwrap(), "new a");
    assert_eq!(fs::read_to_string(d.path().join("new/b")).unwrap(), "new b");
    assert_eq!(m, intent.manifest);
}

#[test]
fn recovery_of_a_stop_while_removing_finishes_the_removals() {
    let (d, intent) = interrupted(intent::Phase::Removing);
    for r in &intent.renames {
        fs::rename(&r.temp, &r.dest).unwrap();
    }
    let (m, _) = recover_intent(&intent);
    assert_eq!(names(d.path()), ["a", "new"]);
    // The manifest lists what is on disk: `gone` is not in it.
    assert_eq!(m, intent.manifest);
}

#[test]
fn an_intent_carries_its_manifests_without_the_disk_records() {
    let (d, mut intent) = interrupted(intent::Phase::Switching);
    let a = d.path().join("a");
    let ident = crate::bundle::unpack::FileIdent::of(&fs::metadata(&a).unwrap());
    let disk = DiskStat {
        ident,
        mode: 0o644,
        uid: 0,
        gid: 0,
        acl: false,
    };
    for m in [intent.previous.as_mut().unwrap(), &mut intent.manifest] {
        m.revision = Some("/rev".into());
        m.entries[0].disk = Some(Box::new(disk));
        m.entries[0].source = Some(Box::new(SourceStat::of(
            "app/a".into(),
            &ident,
            &Settled::now(),
        )));
    }
    let back: Intent = serde_json::from_slice(&serde_json::to_vec(&intent).unwrap()).unwrap();
    for (sent, got) in [
        (
            intent.previous.as_ref().unwrap(),
            back.previous.as_ref().unwrap(),
        ),
        (&intent.manifest, &back.manifest),
    ] {
        assert_eq!(got.revision, sent.revision);
        assert_eq!(got.entries.len(), sent.entries.len());
        for (s, g) in sent.entries.iter().zip(&got.entries) {
            // Everything but the records, which a recovered manifest must not trust.
            assert_eq!(
                (&g.path, g.kind, g.size, &g.sha256),
                (&s.path, s.kind, s.size, &s.sha256)
            );
            assert_eq!(
                (g.mode, &g.link_target, g.created),
                (s.mode, &s.link_target, s.created)
            );
            assert!(g.disk.is_none() && g.source.is_none());
        }
    }
    // The manifest itself keeps them.
    let m: Manifest =
        serde_json::from_slice(&serde_json::to_vec(&intent.manifest).unwrap()).unwrap();
    assert_eq!(m.entries[0].disk.as_deref(), Some(&disk));

    // An install writes its intent borrowed: the same JSON, which a recovery reads back.
    let entries: Vec<&ManifestEntry> = intent.manifest.entries.iter().collect();
    let borrowed = intent::IntentRef {
        phase: intent.phase,
        tag: &intent.tag,
        temp_dirs: &intent.temp_dirs,
        made_dirs: &intent.made_dirs,
        renames: &intent.renames,
        removals: &intent.removals,
        previous: intent.previous.as_ref(),
        manifest: &entries,
    };
    let mut owned = serde_json::to_value(&intent).unwrap();
    // (An intent's own manifest never names a revision; this one was given one above.)
    owned["manifest"]["revision"] = serde_json::Value::Null;
    let written = serde_json::to_value(&borrowed).unwrap();
    assert_eq!(written, owned);
    let read: Intent = serde_json::from_value(written).unwrap();
    assert_eq!(read.renames, intent.renames);
    assert_eq!(read.manifest.entries.len(), intent.manifest.entries.len());
}

#[test]
fn the_source_ctime_is_a_field_an_older_agent_skips() {
    let mut e = dir_entry(Path::new("/www/a"), false);
    e.kind = EntryKind::File;
    e.source = Some(Box::new(SourceStat {
        rel: "app/a".into(),
        dev: 1,
        ino: 2,
        size: 3,
        mtime: (4, 5),
        ctime: Some((6, 7)),
    }));
    e.source_ctime = Some((6, 7));
    let m = Manifest {
        entries: vec![e],
        revision: None,
    };
    let json = serde_json::to_value(&m).unwrap();
    let entry = &json["entries"][0];
    // The record keeps the five elements an earlier agent's tuple reads; the ctime beside it
    // is a field that agent ignores.
    assert_eq!(
        entry["source"],
        serde_json::json!(["app/a", 1, 2, 3, [4, 5]])
    );
    assert_eq!(entry["source_ctime"], serde_json::json!([6, 7]));
    /// The source record as an agent before the ctime reads it: a 5-tuple, nothing more.
    type EarlierRecord = (PathBuf, u64, u64, u64, (i64, i64));
    #[derive(serde::Deserialize)]
    struct EarlierEntry {
        source: Option<EarlierRecord>,
    }
    let earlier: EarlierEntry = serde_json::from_value(entry.clone()).unwrap();
    assert_eq!(earlier.source.unwrap().2, 2);
    let back: Manifest = serde_json::from_value(json).unwrap();
    let e = &back.entries[0];
    assert_eq!(e.source_ctime, Some((6, 7)));
    let ident = FileIdent {
        dev: 1,
        ino: 2,
        size: 3,
        mtime: (4, 5),
        ctime: (6, 7),
    };
    assert!(e
        .source
        .as_ref()
        .unwrap()
        .untouched(e.source_ctime, Path::new("app/a"), &ident));
}

#[test]
fn an_unsettled_ctime_is_not_recorded() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    fs::write(&a, b"x").unwrap();
    let ident = crate::bundle::unpack::FileIdent::of(&fs::metadata(&a).unwrap());
    // Just written: within the clock's tick of now, so it could change again unseen.
    assert_eq!(
        SourceStat::of("a".into(), &ident, &Settled::now()).ctime,
        None
    );
    let long_ago = FileIdent {
        ctime: (1_000_000, 0),
        ..ident
    };
    let rec = SourceStat::of("a".into(), &long_ago, &Settled::now());
    assert_eq!(rec.ctime, Some((1_000_000, 0)));
    assert!(rec.untouched(rec.ctime, Path::new("a"), &long_ago));
    assert!(!rec.untouched(rec.ctime, Path::new("a"), &ident));
    // The same inode, size and mtime, but touched since (its ctime moved).
    assert!(rec.same_inode(Path::new("a"), &ident));
}

#[test]
fn a_revision_read_in_place_is_trusted_by_its_ctime_alone() {
    let rev = revision();
    let out = tempfile::tempdir().unwrap();
    let www = out.path().join("www");
    let files = [mapping("site", &www)];
    // Settled, so that the install records the sources' ctimes.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let in_place = |previous| InstallInput {
        snapshot: false,
        walked: None,
        consume_revision: false,
        keep: &[],
        ..input(
            rev.path(),
            &files,
            &[],
            previous,
            FileExistsBehavior::Disallow,
        )
    };
    let m0 = apply(&plan(&in_place(None)).unwrap()).unwrap();
    assert_eq!(m0.revision, None, "only a snapshot is named as evidence");
    // Once more, the destination settled too, so that its records vouch for it.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let m1 = apply(&plan(&in_place(Some(&m0))).unwrap()).unwrap();
    // A wrong digest in the record: a plan that read either side would see it differ, so
    // only a file trusted on its metadata alone (both sides) stays unchanged.
    // As the next install reads it: from the manifest file.
    let mut m1: Manifest = serde_json::from_slice(&serde_json::to_vec(&m1).unwrap()).unwrap();
    for e in m1.entries.iter_mut().filter(|e| e.kind == EntryKind::File) {
        assert!(e.source_ctime.is_some(), "{e:?}");
        assert!(e.disk.is_some(), "{e:?}");
        e.sha256 = Some("0".repeat(64));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    let p = plan(&in_place(Some(&m1))).unwrap();
    let unchanged = |p: &Plan| {
        p.steps
            .iter()
            .filter(|s| matches!(s.action, Action::Unchanged { .. }))
            .count()
    };
    assert_eq!(unchanged(&p), 2, "{p}");
    // Touched since (a chmod and back moves the ctime only): read, and found to differ.
    let css = rev.path().join("site/css/a.css");
    fs::set_permissions(&css, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(&css, fs::Permissions::from_mode(0o644)).unwrap();
    let p = plan(&in_place(Some(&m1))).unwrap();
    assert_eq!(unchanged(&p), 1, "{p}");
}

#[test]
fn a_whole_second_is_settled_only_once_the_filesystem_could_not_repeat_it() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let secs = now.as_secs() as i64;
    let settled = Settled::now();
    // A nanosecond time 50 ms old is settled; the same second with no nanoseconds (a
    // filesystem that keeps seconds) is not, until two seconds have passed.
    let ns_old = now - std::time::Duration::from_millis(50);
    assert!(settled.before((
        ns_old.as_secs() as i64,
        i64::from(ns_old.subsec_nanos()) | 1
    )));
    assert!(!settled.before((secs, 0)));
    assert!(!settled.before((secs - 1, 0)));
    assert!(settled.before((secs - 3, 0)));
}

#[test]
fn a_set_id_bit_on_a_revision_read_in_place_is_cleared_as_an_unpack_clears_it() {
    let rev = revision();
    let conf = rev.path().join("conf/app.conf");
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o4755)).unwrap();
    let out = tempfile::tempdir().unwrap();
    let files = [mapping("conf", &out.path().join("etc"))];
    let mode_of = |snapshot| {
        let p = plan(&InstallInput {
            snapshot,
            walked: None,
            consume_revision: false,
            keep: &[],
            ..input(rev.path(), &files, &[], None, FileExistsBehavior::Disallow)
        })
        .unwrap();
        p.steps
            .iter()
            .find_map(|s| match &s.action {
                Action::Create { mode, .. } => Some(*mode),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(mode_of(false), 0o755);
    // A snapshot had its bits cleared by the unpack already (and refused unless granted).
    assert_eq!(mode_of(true), 0o4755);
}

/// A dry run's lines counted by their first word, in order of first appearance: what
/// [`Plan::summary`] says without printing the plan.
fn first_words(shown: &str) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for word in shown.lines().filter_map(|l| l.split_whitespace().next()) {
        match counts.iter_mut().find(|(w, _)| *w == word) {
            Some((_, n)) => *n += 1,
            None => counts.push((word, 1)),
        }
    }
    if counts.is_empty() {
        return "nothing to do".to_string();
    }
    let counted: Vec<String> = counts.iter().map(|(w, n)| format!("{w} {n}")).collect();
    counted.join(", ")
}

#[test]
fn an_empty_plan_says_nothing_to_do() {
    assert_eq!(Plan::default().summary(), "nothing to do");
    assert_eq!(first_words(&Plan::default().to_string()), "nothing to do");
}

#[test]
fn a_consumed_revision_moves_only_its_own_single_use_files() {
    use std::os::unix::fs::MetadataExt;
    let rev = tempfile::tempdir().unwrap();
    let r = rev.path();
    fs::create_dir_all(r.join("app")).unwrap();
    fs::create_dir_all(r.join("sg")).unwrap();
    for (n, c) in [
        ("app/a", "aaa"),
        ("app/b", "bbb"),
        ("app/shared", "sss"),
        ("app/edited", "old"),
        ("sg/x", "xxx"),
        ("app/unknown", "uuu"),
        ("appspec.yml", "version: 0.0\n"),
    ] {
        fs::write(r.join(n), c).unwrap();
    }
    // Two names of one inode: moving one would leave the destination sharing it.
    fs::hard_link(r.join("app/b"), r.join("app/b2")).unwrap();
    let digest = |rel: &str| {
        let p = r.join(rel);
        let ident = FileIdent::of(&fs::symlink_metadata(&p).unwrap());
        let sha256 = sha256_file(&p).unwrap();
        let settled = true;
        (
            PathBuf::from(rel),
            SourceDigest {
                sha256,
                ident,
                settled,
            },
        )
    };
    let digests: HashMap<PathBuf, SourceDigest> = [
        "app/a",
        "app/b",
        "app/b2",
        "app/shared",
        "app/edited",
        "sg/x",
        "appspec.yml",
    ]
    .map(digest)
    .into_iter()
    .collect();
    // Rewritten since the unpack hashed it (as a BeforeInstall hook might): its digest no
    // longer vouches for it, so it is read and copied.
    fs::write(r.join("app/edited"), "newer").unwrap();
    let out = tempfile::tempdir().unwrap();
    let all = out.path().join("all");
    // A set-group-id destination directory of another group: a file made there takes that
    // group, which a moved file would not.
    let sgdir = out.path().join("sgdir");
    fs::create_dir(&sgdir).unwrap();
    std::os::unix::fs::chown(&sgdir, None, Some(65534)).unwrap();
    fs::set_permissions(&sgdir, fs::Permissions::from_mode(0o2755)).unwrap();
    let files = [
        mapping("app", &all),
        mapping("appspec.yml", &all),
        mapping("app/shared", &out.path().join("again")),
        mapping("sg/x", &sgdir),
    ];
    let appspec = fs::metadata(r.join("appspec.yml")).unwrap();
    let keep = [(appspec.dev(), appspec.ino())];
    let mut inp = input(r, &files, &[], None, FileExistsBehavior::Disallow);
    inp.source_digests = Some(&digests);
    inp.consume_revision = true;
    inp.keep = &keep;
    let p = plan(&inp).unwrap();
    let m = apply(&p).unwrap();

    assert!(!r.join("app/a").exists(), "the one movable file is moved");
    for stays in [
        "app/b",
        "app/b2",
        "app/shared",
        "app/edited",
        "app/unknown",
        "sg/x",
        "appspec.yml",
    ] {
        assert!(r.join(stays).is_file(), "{stays} stays in the revision");
    }
    let read = |p: &Path| fs::read_to_string(p).unwrap();
    assert_eq!(read(&all.join("a")), "aaa");
    assert_eq!(read(&all.join("edited")), "newer");
    assert_eq!(read(&sgdir.join("x")), "xxx");
    assert_eq!(fs::metadata(sgdir.join("x")).unwrap().gid(), 65534);
    assert_eq!(read(&all.join("shared")), "sss");
    assert_eq!(read(&out.path().join("again/shared")), "sss");
    assert_eq!(read(&all.join("appspec.yml")), "version: 0.0\n");
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_ne!(ino(&all.join("b")), ino(&all.join("b2")));
    assert_ne!(ino(&all.join("b")), ino(&r.join("app/b")));
    // The manifest records what landed, moved or copied.
    for e in m.entries.iter().filter(|e| e.kind == EntryKind::File) {
        assert_eq!(
            e.sha256.as_deref(),
            Some(sha256_file(&e.path).unwrap().as_str())
        );
        assert_eq!(e.size, fs::metadata(&e.path).unwrap().len());
    }
}

#[test]
fn an_intent_without_its_previous_manifest_takes_the_groups_file_untrusted() {
    let mut prev = file_entry(Path::new("/srv/a"), "a");
    let ident = FileIdent {
        dev: 1,
        ino: 2,
        size: 1,
        mtime: (3, 4),
        ctime: (5, 6),
    };
    prev.disk = Some(Box::new(DiskStat {
        ident,
        mode: 0o644,
        uid: 0,
        gid: 0,
        acl: false,
    }));
    prev.source_ctime = Some((5, 6));
    let file = Manifest {
        entries: vec![prev],
        revision: Some("/rev".into()),
    };
    let borrowed = intent::IntentRef {
        phase: intent::Phase::Staging,
        tag: "1-2",
        temp_dirs: &BTreeSet::new(),
        made_dirs: &[],
        renames: &[],
        removals: &[],
        previous: None,
        manifest: &[],
    };
    let mut read: Intent =
        serde_json::from_value(serde_json::to_value(&borrowed).unwrap()).unwrap();
    assert!(read.previous.is_none());
    read.previous_from(Some(file.clone()));
    let got = read.previous.as_ref().unwrap();
    assert_eq!(got.entries[0].path, file.entries[0].path);
    assert_eq!(got.entries[0].sha256, file.entries[0].sha256);
    assert!(got.entries[0].disk.is_none() && got.entries[0].source_ctime.is_none());
    // One that holds its previous manifest (an earlier version's) keeps it.
    let mut other = file.clone();
    other.entries.clear();
    read.previous_from(Some(other));
    assert_eq!(read.previous.as_ref().unwrap().entries.len(), 1);
}
