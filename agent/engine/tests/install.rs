//! install: `pier_engine::install::plan` + `apply` on real revisions placed into real
//! destination trees, with a real user and group, real setfacl, and the manifest of one install
//! driving the cleanup of the next.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use pier_engine::appspec::{
    FileExistsBehavior, FileMapping, ObjectType, Permission, SeLinuxContext,
};
use pier_engine::install::{apply, check_setid, plan, InstallError, InstallInput, Manifest};

use crate::support::{ensure_user, Scratch};

/// The user and group the permission tests hand files to.
const WEB_USER: &str = "pier-e2e-web";

fn map(source: &str, dest: &Path) -> FileMapping {
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

/// Writes a revision directory `<scratch>/<name>` holding `files` (path, content).
fn revision(s: &Scratch, name: &str, files: &[(&str, &str)]) -> PathBuf {
    for (rel, content) in files {
        s.write(&format!("{name}/{rel}"), content);
    }
    s.path().join(name)
}

fn install(
    rev: &Path,
    files: &[FileMapping],
    permissions: &[Permission],
    previous: Option<&Manifest>,
    behavior: FileExistsBehavior,
) -> Result<Manifest, InstallError> {
    let p = plan(&InstallInput {
        revision_root: rev,
        files,
        permissions,
        previous,
        file_exists_behavior: behavior,
        source_digests: None,
        verify: Default::default(),
        snapshot: true,
        walked: None,
        consume_revision: false,
        keep: &[],
    })?;
    apply(&p)
}

fn read(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p.as_ref()).unwrap_or_else(|e| panic!("read {}: {e}", p.as_ref().display()))
}

fn mode(p: impl AsRef<Path>) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn ids(name: &str) -> (u32, u32) {
    let u = nix::unistd::User::from_name(name).unwrap().unwrap();
    (u.uid.as_raw(), u.gid.as_raw())
}

#[test]
fn files_land_per_appspec_and_the_next_install_cleans_up_the_previous_one() {
    let s = Scratch::new();
    let out = s.path().join("host");
    let www = out.join("srv/www");
    let etc = out.join("etc/myapp");
    let rev1 = revision(
        &s,
        "rev1",
        &[
            ("site/index.html", "v1"),
            ("site/old.html", "old"),
            ("site/img/logo.png", "png"),
            ("conf/app.conf", "port=1"),
        ],
    );
    let files = [map("site", &www), map("conf/app.conf", &etc)];
    let m1 = install(&rev1, &files, &[], None, FileExistsBehavior::Disallow).unwrap();
    assert_eq!(read(www.join("index.html")), "v1");
    assert_eq!(read(www.join("img/logo.png")), "png");
    assert_eq!(read(etc.join("app.conf")), "port=1");

    // The manifest is what the state module stores: it must survive JSON.
    let json = serde_json::to_string(&m1).unwrap();
    let m1: Manifest = serde_json::from_str(&json).unwrap();

    // Someone drops a file of their own into a directory the install made.
    fs::write(www.join("img/theirs.txt"), "keep me").unwrap();

    let rev2 = revision(&s, "rev2", &[("site/index.html", "v2")]);
    let files2 = [map("site", &www)];
    let m2 = install(&rev2, &files2, &[], Some(&m1), FileExistsBehavior::Disallow).unwrap();
    assert_eq!(read(www.join("index.html")), "v2");
    assert!(!www.join("old.html").exists());
    assert!(!www.join("img/logo.png").exists());
    // Not empty, so not removed; and the other file is untouched.
    assert_eq!(read(www.join("img/theirs.txt")), "keep me");
    // The directories made only for conf/ are gone again, deepest first.
    assert!(!etc.exists());
    assert!(!out.join("etc").exists());
    // srv/www is still ours: a third install may remove it.
    assert!(m2.entries.iter().any(|e| e.path == www && e.created));
}

#[test]
fn disallow_fails_naming_the_file_and_changes_nothing() {
    let s = Scratch::new();
    let dest = s.path().join("app");
    let rev1 = revision(&s, "rev1", &[("a.txt", "a1"), ("gone.txt", "g")]);
    let m1 = install(
        &rev1,
        &[map("", &dest)],
        &[],
        None,
        FileExistsBehavior::Disallow,
    )
    .unwrap();
    fs::write(dest.join("b.txt"), "not ours").unwrap();

    let rev2 = revision(&s, "rev2", &[("a.txt", "a2"), ("b.txt", "b2")]);
    let err = install(
        &rev2,
        &[map("", &dest)],
        &[],
        Some(&m1),
        FileExistsBehavior::Disallow,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&dest.join("b.txt").display().to_string()),
        "{msg}"
    );
    assert!(matches!(err, InstallError::Disallowed { .. }), "{msg}");
    // Nothing changed: not even the previous install's cleanup ran.
    assert_eq!(read(dest.join("a.txt")), "a1");
    assert_eq!(read(dest.join("gone.txt")), "g");
    assert_eq!(read(dest.join("b.txt")), "not ours");
}

#[test]
fn overwrite_replaces_and_retain_keeps_the_existing_file() {
    let s = Scratch::new();
    let rev = revision(&s, "rev", &[("app.conf", "ours"), ("new.txt", "new")]);

    let over = s.path().join("over");
    s.write("over/app.conf", "theirs");
    let m = install(
        &rev,
        &[map("", &over)],
        &[],
        None,
        FileExistsBehavior::Overwrite,
    )
    .unwrap();
    assert_eq!(read(over.join("app.conf")), "ours");
    assert!(m.entries.iter().any(|e| e.path == over.join("app.conf")));

    let keep = s.path().join("keep");
    s.write("keep/app.conf", "theirs");
    let m = install(
        &rev,
        &[map("", &keep)],
        &[],
        None,
        FileExistsBehavior::Retain,
    )
    .unwrap();
    assert_eq!(read(keep.join("app.conf")), "theirs");
    assert_eq!(read(keep.join("new.txt")), "new");
    // A retained file is not this install's: the next cleanup must not remove it.
    assert!(!m.entries.iter().any(|e| e.path == keep.join("app.conf")));
}

#[test]
fn a_replaced_file_lands_whole_by_rename() {
    let s = Scratch::new();
    let dest = s.path().join("app");
    s.write("app/data.txt", "old content");
    let rev = revision(&s, "rev", &[("data.txt", "new content")]);
    // A reader holding the old file keeps seeing the whole old file: the new one was written
    // beside it and renamed over, not written into it.
    let mut held = fs::File::open(dest.join("data.txt")).unwrap();
    install(
        &rev,
        &[map("", &dest)],
        &[],
        None,
        FileExistsBehavior::Overwrite,
    )
    .unwrap();
    let mut old = String::new();
    held.read_to_string(&mut old).unwrap();
    assert_eq!(old, "old content");
    assert_eq!(read(dest.join("data.txt")), "new content");
    let leftovers: Vec<_> = fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "data.txt")
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[test]
fn an_unchanged_file_is_not_rewritten_and_the_dry_run_says_so() {
    let s = Scratch::new();
    let dest = s.path().join("app");
    let rev = revision(&s, "rev", &[("same.txt", "same"), ("diff.txt", "v1")]);
    let m1 = install(
        &rev,
        &[map("", &dest)],
        &[],
        None,
        FileExistsBehavior::Disallow,
    )
    .unwrap();
    // Hard links elsewhere hold the old inodes, so a rewrite cannot get the same number back.
    for n in ["same.txt", "diff.txt"] {
        fs::hard_link(dest.join(n), s.path().join(format!("witness-{n}"))).unwrap();
    }
    let ino = |p: PathBuf| fs::metadata(p).unwrap().ino();

    let rev2 = revision(&s, "rev2", &[("same.txt", "same"), ("diff.txt", "v2")]);
    let files = [map("", &dest)];
    let p = plan(&InstallInput {
        revision_root: &rev2,
        files: &files,
        permissions: &[],
        previous: Some(&m1),
        file_exists_behavior: FileExistsBehavior::Disallow,
        source_digests: None,
        verify: Default::default(),
        snapshot: true,
        walked: None,
        consume_revision: false,
        keep: &[],
    })
    .unwrap();
    let shown = p.to_string();
    assert!(
        shown.contains(&format!("unchanged  {}", dest.join("same.txt").display())),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("create     {}", dest.join("diff.txt").display())),
        "{shown}"
    );
    apply(&p).unwrap();
    let witness = |n: &str| s.path().join(format!("witness-{n}"));
    assert_eq!(ino(dest.join("same.txt")), ino(witness("same.txt")));
    assert_ne!(ino(dest.join("diff.txt")), ino(witness("diff.txt")));
    assert_eq!(read(dest.join("diff.txt")), "v2");
}

#[test]
fn permissions_set_owner_group_and_mode_by_pattern_except_and_type() {
    ensure_user(WEB_USER);
    let (uid, gid) = ids(WEB_USER);
    let s = Scratch::new();
    let dest = s.path().join("app");
    let rev = revision(
        &s,
        "rev",
        &[
            ("run.sh", "#!/bin/sh\n"),
            ("lib.sh", "#!/bin/sh\n"),
            ("secret.key", "k"),
            ("bin/deep.sh", "#!/bin/sh\n"),
            ("conf/app.conf", "port=1"),
            ("data/.keep", ""),
        ],
    );
    fs::set_permissions(rev.join("secret.key"), fs::Permissions::from_mode(0o600)).unwrap();

    // Direct children of the object only (a pattern does not cross '/'), minus the except.
    let mut scripts = perm(&dest);
    scripts.pattern = Some("*".into());
    scripts.except = vec!["secret*".into()];
    scripts.types = vec![ObjectType::File];
    scripts.owner = Some(WEB_USER.into());
    scripts.group = Some(WEB_USER.into());
    scripts.mode = Some(0o750);
    // Everything beneath conf/ (files only).
    let mut conf = perm(&dest.join("conf"));
    conf.types = vec![ObjectType::File];
    conf.owner = Some(WEB_USER.into());
    conf.mode = Some(0o640);
    // Directories beneath the object (never the object itself).
    let mut dirs = perm(&dest);
    dirs.types = vec![ObjectType::Directory];
    dirs.group = Some(WEB_USER.into());
    dirs.mode = Some(0o2710);

    install(
        &rev,
        &[map("", &dest)],
        &[scripts, conf, dirs],
        None,
        FileExistsBehavior::Disallow,
    )
    .unwrap();
    let owner = |n: &str| {
        let m = fs::symlink_metadata(dest.join(n)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner("run.sh"), (uid, gid));
    assert_eq!(mode(dest.join("run.sh")), 0o750);
    assert_eq!(owner("lib.sh"), (uid, gid));
    assert_eq!(owner("secret.key"), (0, 0));
    assert_eq!(mode(dest.join("secret.key")), 0o600);
    assert_eq!(owner("bin/deep.sh"), (0, 0));
    assert_eq!(owner("conf/app.conf"), (uid, 0));
    assert_eq!(mode(dest.join("conf/app.conf")), 0o640);
    for d in ["conf", "data", "bin"] {
        assert_eq!(owner(d), (0, gid), "{d}");
        assert_eq!(mode(dest.join(d)), 0o2710, "{d}");
    }
    assert_ne!(mode(&dest), 0o2710);
}

#[test]
fn one_object_selected_by_two_permission_entries_is_refused() {
    let s = Scratch::new();
    let dest = s.path().join("app");
    let rev = revision(&s, "rev", &[("a.sh", "x")]);
    let mut one = perm(&dest);
    one.mode = Some(0o700);
    let mut two = perm(&dest.join("a.sh"));
    two.mode = Some(0o755);
    let err = install(
        &rev,
        &[map("", &dest)],
        &[one, two],
        None,
        FileExistsBehavior::Disallow,
    )
    .unwrap_err();
    assert!(matches!(err, InstallError::PermissionTwice { .. }), "{err}");
    assert!(!dest.exists(), "a refused plan must change nothing");
}

#[test]
fn an_unknown_owner_is_refused_before_anything_is_placed() {
    let s = Scratch::new();
    let dest = s.path().join("app");
    let rev = revision(&s, "rev", &[("a.txt", "x")]);
    let mut p = perm(&dest);
    p.owner = Some("pier-no-such-user".into());
    let err = install(
        &rev,
        &[map("", &dest)],
        &[p],
        None,
        FileExistsBehavior::Disallow,
    )
    .unwrap_err();
    assert!(err.to_string().contains("pier-no-such-user"), "{err}");
    assert!(!dest.exists());
}

#[test]
fn acls_are_set_with_setfacl() {
    ensure_user(WEB_USER);
    assert!(
        Command::new("setfacl").arg("--version").output().is_ok(),
        "setfacl is missing: install the acl package (scripts/test.sh does)"
    );
    let s = Scratch::new();
    let dest = s.path().join("app");
    let rev = revision(&s, "rev", &[("shared.txt", "x"), ("private.txt", "y")]);
    let mut p = perm(&dest.join("shared.txt"));
    p.acls = vec![format!("u:{WEB_USER}:rw")];
    let m1 = install(
        &rev,
        &[map("", &dest)],
        &[p],
        None,
        FileExistsBehavior::Disallow,
    )
    .unwrap();
    let getfacl = |n: &str| {
        let out = Command::new("getfacl")
            .arg("-p")
            .arg(dest.join(n))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let want = format!("user:{WEB_USER}:rw-");
    assert!(
        getfacl("shared.txt").contains(&want),
        "{}",
        getfacl("shared.txt")
    );
    assert!(!getfacl("private.txt").contains(&want));

    // The next install drops the ACL from appspec.yml; the file itself is unchanged and not
    // rewritten, yet it must not keep the old grant.
    let m2 = install(
        &rev,
        &[map("", &dest)],
        &[],
        Some(&m1),
        FileExistsBehavior::Disallow,
    )
    .unwrap();
    assert!(
        !getfacl("shared.txt").contains(&want),
        "{}",
        getfacl("shared.txt")
    );

    // An ACL granted behind pier's back on a file pier leaves unchanged goes too, as a fresh
    // copy would not have it; a file without one is left alone (no setfacl run for it).
    let granted = Command::new("setfacl")
        .args(["-m", &format!("u:{WEB_USER}:rw")])
        .arg(dest.join("private.txt"))
        .status()
        .unwrap();
    assert!(granted.success());
    assert!(getfacl("private.txt").contains(&want));
    install(
        &rev,
        &[map("", &dest)],
        &[],
        Some(&m2),
        FileExistsBehavior::Disallow,
    )
    .unwrap();
    assert!(
        !getfacl("private.txt").contains(&want),
        "{}",
        getfacl("private.txt")
    );
    assert!(!getfacl("shared.txt").contains(&want));
}

#[test]
fn selinux_context_is_set_or_refused_with_the_tool_named() {
    let s = Scratch::new();
    let dest = s.path().join("app");
    let rev = revision(&s, "rev", &[("index.html", "x")]);
    let mut p = perm(&dest.join("index.html"));
    p.context = Some(SeLinuxContext {
        user: None,
        kind: "httpd_sys_content_t".into(),
        range: None,
    });
    let result = install(
        &rev,
        &[map("", &dest)],
        &[p],
        None,
        FileExistsBehavior::Disallow,
    );
    if Path::new("/sys/fs/selinux/enforce").exists() {
        result.unwrap();
    } else {
        // No SELinux here: chcon exists (coreutils) but cannot label; the error must say so.
        let err = result.unwrap_err().to_string();
        assert!(err.contains("chcon"), "{err}");
        assert!(err.contains("index.html"), "{err}");
    }
}

#[test]
fn symlinks_are_placed_as_symlinks() {
    let s = Scratch::new();
    let dest = s.path().join("app");
    let rev = revision(&s, "rev", &[("releases/v1/app.txt", "v1")]);
    std::os::unix::fs::symlink("releases/v1", rev.join("current")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", rev.join("hostname")).unwrap();
    let m = install(
        &rev,
        &[map("", &dest)],
        &[],
        None,
        FileExistsBehavior::Disallow,
    )
    .unwrap();
    assert_eq!(
        fs::read_link(dest.join("current")).unwrap(),
        Path::new("releases/v1")
    );
    assert_eq!(read(dest.join("current/app.txt")), "v1");
    assert_eq!(
        fs::read_link(dest.join("hostname")).unwrap(),
        Path::new("/etc/hostname")
    );
    assert!(m
        .entries
        .iter()
        .any(|e| e.path == dest.join("current")
            && e.kind == pier_engine::install::EntryKind::Symlink));
}

#[test]
fn setuid_from_the_bundle_needs_a_permission_that_grants_it() {
    let s = Scratch::new();
    // A real tar with a set-uid helper, unpacked the way deploy does it.
    let archive = s.path().join("b.tar");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("bin/helper").unwrap();
    h.set_size(10);
    h.set_mode(0o4755);
    h.set_cksum();
    b.append(&h, &b"#!/bin/sh\n"[..]).unwrap();
    fs::write(&archive, b.into_inner().unwrap()).unwrap();
    let rev = s.path().join("rev");
    let u = pier_engine::bundle::unpack::unpack(
        &archive,
        pier_engine::bundle::unpack::BundleType::Tar,
        &rev,
        &Default::default(),
    )
    .unwrap();

    let dest = s.path().join("opt");
    let files = [map("bin", &dest)];
    let err = check_setid(&files, &[], &u.setid_entries).unwrap_err();
    assert!(err.to_string().contains("bin/helper"), "{err}");

    let mut grant = perm(&dest.join("helper"));
    grant.owner = Some("root".into());
    grant.mode = Some(0o4755);
    let perms = [grant];
    check_setid(&files, &perms, &u.setid_entries).unwrap();
    install(&rev, &files, &perms, None, FileExistsBehavior::Disallow).unwrap();
    // Mode after owner: chown would have cleared the bit.
    assert_eq!(mode(dest.join("helper")), 0o4755);
}

#[test]
fn a_directory_bundle_reaches_its_destination_as_one_copy() {
    let s = Scratch::new();
    let src = revision(&s, "src", &[("site/index.html", "hi")]);
    let rev = s.path().join("deploy/rev");
    pier_engine::bundle::unpack::unpack(
        &src,
        pier_engine::bundle::unpack::BundleType::Directory,
        &rev,
        &Default::default(),
    )
    .unwrap();
    let dest = s.path().join("www");
    install(
        &rev,
        &[map("site", &dest)],
        &[],
        None,
        FileExistsBehavior::Disallow,
    )
    .unwrap();
    let ino = |p: PathBuf| fs::metadata(p).unwrap().ino();
    // The revision shares the source's data; the destination is the one copy.
    assert_eq!(
        ino(src.join("site/index.html")),
        ino(rev.join("site/index.html"))
    );
    assert_ne!(
        ino(rev.join("site/index.html")),
        ino(dest.join("index.html"))
    );
    assert_eq!(read(dest.join("index.html")), "hi");
}

#[test]
fn after_a_failed_install_the_next_one_cleans_up_what_it_left() {
    let s = Scratch::new();
    let dest = s.path().join("app");
    let rev1 = revision(
        &s,
        "rev1",
        &[("a.txt", "a"), ("sub/b.txt", "b"), ("z.txt", "z")],
    );
    let files = [map("", &dest)];
    let p = plan(&InstallInput {
        revision_root: &rev1,
        files: &files,
        permissions: &[],
        previous: None,
        file_exists_behavior: FileExistsBehavior::Disallow,
        source_digests: None,
        verify: Default::default(),
        snapshot: true,
        walked: None,
        consume_revision: false,
        keep: &[],
    })
    .unwrap();
    // What the deploy engine records before applying, and keeps if the apply fails.
    let pending = serde_json::to_string(&p.pending_manifest()).unwrap();
    // The revision loses a file under the install's feet: apply fails part-way.
    fs::remove_file(rev1.join("z.txt")).unwrap();
    let err = apply(&p).unwrap_err();
    assert!(err.to_string().contains("z.txt"), "{err}");
    // Files are renamed into place only once all of them are written: a failure while writing
    // leaves no new file and no temp file behind.
    assert!(!dest.join("a.txt").exists());
    let leftovers: Vec<_> = fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".pier-tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let pending: Manifest = serde_json::from_str(&pending).unwrap();
    let rev2 = revision(&s, "rev2", &[("a.txt", "a2")]);
    install(
        &rev2,
        &files,
        &[],
        Some(&pending),
        FileExistsBehavior::Disallow,
    )
    .unwrap();
    assert_eq!(read(dest.join("a.txt")), "a2");
    assert!(!dest.join("sub").exists());
}

/// A temp file left by an earlier life of this same pid (an agent that is PID 1 in a
/// container comes back as PID 1) is swept like any other stale one, and does not collide.
#[test]
fn temp_left_by_an_earlier_process_with_the_same_pid_is_swept() {
    let s = Scratch::new();
    let dest = s.path().join("app");
    fs::create_dir_all(&dest).unwrap();
    let stale = dest.join(format!(".pier-tmp-{}-0-0-a.txt", std::process::id()));
    fs::write(&stale, "half").unwrap();
    let rev = revision(&s, "rev", &[("a.txt", "a")]);
    install(
        &rev,
        &[map("", &dest)],
        &[],
        None,
        FileExistsBehavior::Disallow,
    )
    .unwrap();
    assert_eq!(read(dest.join("a.txt")), "a");
    assert!(!stale.exists(), "stale temp left in place");
}

/// A file or symlink of the last revision that this one turns into a directory: the cleanup
/// removes it, so nothing is in the way of the directory or of what goes beneath it.
#[test]
fn a_file_or_link_that_becomes_a_directory_installs() {
    let s = Scratch::new();
    let dest = s.path().join("app");
    let files = [map("", &dest)];
    let rev1 = revision(&s, "rev1", &[("config", "flat"), ("keep.txt", "k")]);
    fs::create_dir_all(s.path().join("elsewhere")).unwrap();
    std::os::unix::fs::symlink(s.path().join("elsewhere"), rev1.join("lib")).unwrap();
    let m1 = install(&rev1, &files, &[], None, FileExistsBehavior::Disallow).unwrap();
    assert!(fs::symlink_metadata(dest.join("lib"))
        .unwrap()
        .file_type()
        .is_symlink());

    let rev2 = revision(
        &s,
        "rev2",
        &[("config/a.conf", "a"), ("lib/x.so", "x"), ("keep.txt", "k")],
    );
    install(&rev2, &files, &[], Some(&m1), FileExistsBehavior::Disallow).unwrap();
    assert_eq!(read(dest.join("config/a.conf")), "a");
    assert!(fs::symlink_metadata(dest.join("lib")).unwrap().is_dir());
    assert_eq!(read(dest.join("lib/x.so")), "x");
    // Nothing went through the old link.
    assert!(!s.path().join("elsewhere/x.so").exists());
}

/// OVERWRITE over a file pier did not place: if the install fails before the replacement
/// lands, the manifest handed to the next install does not claim that file.
#[test]
fn a_failed_overwrite_does_not_hand_the_operators_file_to_cleanup() {
    let s = Scratch::new();
    let dest = s.path().join("app");
    fs::create_dir_all(&dest).unwrap();
    fs::write(dest.join("local.conf"), "operator's").unwrap();
    let rev = revision(&s, "rev", &[("local.conf", "ours"), ("z.txt", "z")]);
    let p = plan(&InstallInput {
        revision_root: &rev,
        files: &[map("", &dest)],
        permissions: &[],
        previous: None,
        file_exists_behavior: FileExistsBehavior::Overwrite,
        source_digests: None,
        verify: Default::default(),
        snapshot: true,
        walked: None,
        consume_revision: false,
        keep: &[],
    })
    .unwrap();
    let pending = p.pending_manifest();
    assert!(
        !pending
            .entries
            .iter()
            .any(|e| e.path == dest.join("local.conf")),
        "{pending:?}"
    );
    fs::remove_file(rev.join("z.txt")).unwrap();
    apply(&p).unwrap_err();
    assert_eq!(read(dest.join("local.conf")), "operator's");
}
