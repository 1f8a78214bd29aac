//! Confined reads of a revision (`pier_engine::bundle::Confined`): every bundle path resolves
//! beneath the root, through both resolvers (`openat2` and the `O_NOFOLLOW` walk that stands
//! in where the kernel lacks it), and the hook runner and Install use it: a link out of the
//! bundle is refused, in-bundle links keep working.

use std::fs;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use pier_engine::appspec::{FileExistsBehavior, FileMapping};
use pier_engine::bundle::confined::{Confined, ConfinedError, Method, MAX_LINKS};
use pier_engine::hooks::{self, HookError, HookRun, ScriptLog};
use pier_engine::install::{apply, plan, InstallError, InstallInput};
use tokio_util::sync::CancellationToken;

use crate::support::Scratch;

/// A revision `<scratch>/rev` with in-bundle links and links out, and a file outside it.
fn layout(s: &Scratch) -> std::path::PathBuf {
    s.write("outside/secret", "OUTSIDE-MARKER\n");
    s.write("rev/app/index.html", "hello\n");
    s.write("rev/deploy/scripts/start.sh", "#!/bin/sh\necho started\n");
    let rev = s.path().join("rev");
    symlink("deploy/scripts", rev.join("scripts")).unwrap();
    symlink("../app/index.html", rev.join("deploy/index-link")).unwrap();
    symlink(s.path().join("outside/secret"), rev.join("abs-out")).unwrap();
    symlink("../outside", rev.join("rel-out-dir")).unwrap();
    symlink("deploy/../../outside/secret", rev.join("sneaky")).unwrap();
    symlink("/proc/self/root/etc/passwd", rev.join("magic")).unwrap();
    symlink("loop-b", rev.join("loop-a")).unwrap();
    symlink("loop-a", rev.join("loop-b")).unwrap();
    rev
}

fn read(c: &Confined, rel: &str) -> Result<String, ConfinedError> {
    let mut text = String::new();
    c.open_file(rel)?.read_to_string(&mut text).unwrap();
    Ok(text)
}

fn both(rev: &Path) -> [Confined; 2] {
    [
        Confined::open(rev).unwrap().with_method(Method::Openat2),
        Confined::open(rev).unwrap().with_method(Method::Walk),
    ]
}

#[test]
fn in_bundle_paths_and_links_resolve_with_both_methods() {
    let s = Scratch::new();
    let rev = layout(&s);
    for c in both(&rev) {
        assert_eq!(read(&c, "app/index.html").unwrap(), "hello\n");
        assert_eq!(
            read(&c, "scripts/start.sh").unwrap(),
            "#!/bin/sh\necho started\n"
        );
        assert_eq!(read(&c, "deploy/index-link").unwrap(), "hello\n");
        assert_eq!(read(&c, "deploy/../app/index.html").unwrap(), "hello\n");
        let real = c.real_path("scripts").unwrap();
        assert_eq!(real, fs::canonicalize(rev.join("deploy/scripts")).unwrap());
        c.check("").unwrap();
    }
}

#[test]
fn links_out_are_refused_with_both_methods_and_nothing_is_read() {
    let s = Scratch::new();
    let rev = layout(&s);
    for c in both(&rev) {
        for rel in [
            "abs-out",
            "rel-out-dir/secret",
            "sneaky",
            "magic",
            "../outside/secret",
            "loop-a",
        ] {
            let err = read(&c, rel).expect_err(rel);
            assert!(err.is_escape(), "{rel}: {err}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("{rel:?}")), "{msg}");
            assert!(!msg.contains("OUTSIDE-MARKER"), "{msg}");
        }
        assert!(c.real_path("rel-out-dir").unwrap_err().is_escape());
    }
}

#[test]
fn the_walk_caps_link_chains_and_names_are_bounded() {
    let s = Scratch::new();
    let rev = s.path().join("rev");
    fs::create_dir_all(&rev).unwrap();
    s.write("rev/target", "end\n");
    // A chain one longer than the cap, every link inside the bundle.
    symlink("target", rev.join("l0")).unwrap();
    for i in 1..=MAX_LINKS {
        symlink(format!("l{}", i - 1), rev.join(format!("l{i}"))).unwrap();
    }
    let walk = Confined::open(&rev).unwrap().with_method(Method::Walk);
    assert_eq!(
        read(&walk, &format!("l{}", MAX_LINKS - 1)).unwrap(),
        "end\n"
    );
    assert!(read(&walk, &format!("l{MAX_LINKS}"))
        .unwrap_err()
        .is_escape());
    // A hostile name is escaped and cut in the message.
    let name = format!("{}\n{}", "x".repeat(5000), "y");
    let msg = read(&walk, &name).unwrap_err().to_string();
    assert!(msg.len() < 400, "{}", msg.len());
    assert!(!msg.contains('\n'));
}

#[test]
fn only_regular_files_are_opened_and_a_fifo_does_not_hang() {
    let s = Scratch::new();
    let rev = s.path().join("rev");
    fs::create_dir_all(rev.join("dir")).unwrap();
    nix::unistd::mkfifo(
        &rev.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    for c in both(&rev) {
        for (rel, kind) in [("fifo", "a FIFO"), ("dir", "a directory")] {
            match c.open_file(rel) {
                Err(ConfinedError::NotRegular { kind: k, .. }) => assert_eq!(k, kind),
                other => panic!("{rel}: {other:?}"),
            }
        }
        assert!(matches!(
            c.open_file("nope/x"),
            Err(ConfinedError::Missing { .. })
        ));
    }
}

fn hook(rev: &Path, rel: &str) -> HookRun {
    HookRun {
        script: rev.join(rel),
        location: rel.to_string(),
        working_dir: rev.to_path_buf(),
        timeout: Duration::from_secs(30),
        runas: None,
        env: vec![],
        kill_grace: Duration::from_secs(2),
        event: "ApplicationStart".into(),
        limits: pier_engine::hooks::HookLimits::default(),
        containment: pier_engine::hooks::Containment::host(),
    }
}

#[tokio::test]
async fn a_hook_that_leads_out_never_runs_and_one_through_an_in_bundle_link_does() {
    let s = Scratch::new();
    let marker = s.path().join("ran-outside");
    s.script(
        "outside/evil.sh",
        &format!("#!/bin/sh\ntouch {}\n", marker.display()),
    );
    s.script(
        "rev/deploy/scripts/start.sh",
        "#!/bin/sh\necho inside-ran\n",
    );
    let rev = s.path().join("rev");
    symlink("deploy/scripts", rev.join("scripts")).unwrap();
    symlink(s.path().join("outside/evil.sh"), rev.join("evil.sh")).unwrap();
    symlink("../outside", rev.join("outdir")).unwrap();
    let log = ScriptLog::open(&s.path().join("scripts.log"), 1 << 20, 2).unwrap();
    let cancel = CancellationToken::new();

    for rel in ["evil.sh", "outdir/evil.sh"] {
        match hooks::run(&hook(&rev, rel), &log, &cancel).await {
            Err(e @ HookError::Refused { .. }) => assert!(e.to_string().contains(rel), "{e}"),
            other => panic!("{rel}: {other:?}"),
        }
    }
    assert!(!marker.exists(), "the script outside the bundle ran");

    let ok = hooks::run(&hook(&rev, "scripts/start.sh"), &log, &cancel)
        .await
        .unwrap();
    assert!(ok.tail.contains("inside-ran"), "{}", ok.tail);
}

fn mapping(source: &str, dest: &Path) -> FileMapping {
    FileMapping {
        source: source.to_string(),
        destination: dest.to_path_buf(),
        span: Default::default(),
    }
}

#[test]
fn install_refuses_a_source_through_a_link_out_and_places_in_bundle_links() {
    let s = Scratch::new();
    s.write("outside/secret", "OUTSIDE-MARKER\n");
    s.write("rev/real/conf/app.conf", "port=1\n");
    let rev = s.path().join("rev");
    symlink("../outside", rev.join("out")).unwrap();
    symlink("real/conf", rev.join("conf")).unwrap();
    let dest = s.path().join("dest");

    let files = [mapping("out/secret", &dest)];
    let refused = plan(&InstallInput {
        revision_root: &rev,
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
    .unwrap_err();
    assert!(matches!(refused, InstallError::Refused { .. }), "{refused}");
    assert!(refused.to_string().contains("out/secret"), "{refused}");
    assert!(!dest.exists(), "nothing may be installed");

    // Through an in-bundle directory link: the file itself is installed.
    let files = [mapping("conf/app.conf", &dest)];
    let p = plan(&InstallInput {
        revision_root: &rev,
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
    apply(&p).unwrap();
    assert_eq!(
        fs::read_to_string(dest.join("app.conf")).unwrap(),
        "port=1\n"
    );
}
