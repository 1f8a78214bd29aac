//! Every read of bundle content stays inside the bundle: real `pier-agent deploy-local`,
//! `validate` and `run` on bundles whose AppSpec, hook scripts or `files` sources are
//! symlinks (or sit in symlinked directories) leading out. What lies outside is a test-owned
//! file with a unique marker line, never the host's real secrets; the marker must not reach
//! any output, journal, log or status record, and a script outside must never run.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{Duration, Instant};

use pier_protocol::{BundleType, DeploymentStatus, ErrorCode, Revision, StatusSinkSpec};

use crate::daemon::{command, local_record, sha256_file, wait_for};
use crate::support::{self, run_cmd, Agent, Scratch};

/// A line that must never leave the file it is in; looks like a shadow entry and like YAML.
const MARKER: &str = "pier-confine-marker:$6$NEVER-ECHOED$x:19000:0:99999:7:::";

struct Host {
    scratch: Scratch,
    agent: Agent,
}

impl Host {
    fn new() -> Host {
        let scratch = Scratch::new();
        let agent = Agent::builder(scratch.path().join("host")).build();
        Host { scratch, agent }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.scratch.path().join(rel)
    }

    /// A file outside every bundle holding the marker (and more lines like it).
    fn secret(&self) -> PathBuf {
        self.scratch
            .write("outside/secret", &format!("{MARKER}\n{MARKER}-2\n"))
    }

    /// Every file under the agent's root (journals, logs, state), concatenated.
    fn everything_on_disk(&self) -> String {
        let mut out = String::new();
        walk(self.agent.root(), &mut out);
        out
    }
}

fn walk(dir: &Path, out: &mut String) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            walk(&p, out);
        } else if ft.is_file() {
            out.push_str(&String::from_utf8_lossy(&std::fs::read(&p).unwrap()));
        }
    }
}

fn appspec(dest: &Path, source: &str, hooks: &str) -> String {
    format!(
        "version: 0.0\nos: linux\nfiles:\n  - source: {source}\n    destination: {}\n{hooks}",
        dest.display()
    )
}

#[track_caller]
fn assert_no_marker(what: &str, text: &str) {
    assert!(
        !text.contains("NEVER-ECHOED"),
        "the outside file's content reached {what}:\n{text}"
    );
}

#[test]
fn an_appspec_linked_out_is_refused_by_deploy_local_and_validate_and_never_echoed() {
    let h = Host::new();
    let secret = h.secret();
    let bundle = h.path("b");
    h.scratch.write("b/app/index.html", "v1");
    symlink(&secret, bundle.join("appspec.yml")).unwrap();

    let run = h.agent.deploy_local(&bundle, &[]);
    assert_ne!(run.code, 0, "{}", run.all());
    assert_no_marker("deploy-local's output", &run.all());
    assert!(run.all().contains("appspec.yml"), "{}", run.all());
    assert!(run.all().contains("outside the bundle"), "{}", run.all());
    let disk = h.everything_on_disk();
    assert_no_marker("the journal or logs", &disk);
    assert!(disk.contains("BundleRefused"), "journal: {disk}");

    let v = support::run(
        &support::agent_bin(),
        &["validate", bundle.to_str().unwrap()],
    );
    assert_ne!(v.code, 0, "{}", v.all());
    assert_no_marker("validate's output", &v.all());
    assert!(v.all().contains("outside the bundle"), "{}", v.all());
}

#[test]
fn an_appspec_linked_to_dev_zero_is_refused_fast_in_bounded_memory() {
    let h = Host::new();
    let bundle = h.path("b");
    h.scratch.write("b/app/index.html", "v1");
    symlink("/dev/zero", bundle.join("appspec.yml")).unwrap();
    // Reading /dev/zero would hit this data limit in well under a second and abort.
    let started = Instant::now();
    let mut cmd = Process::new("prlimit");
    cmd.arg("--data=1073741824")
        .arg(support::agent_bin())
        .args(["deploy-local", "-c"])
        .arg(h.agent.config())
        .arg("-l")
        .arg(&bundle);
    let run = run_cmd(&mut cmd);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.all().contains("outside the bundle"), "{}", run.all());

    // A bundle-relative name validate is given directly is the user's own: followed, but a
    // device is still never read.
    let v = support::run(
        &support::agent_bin(),
        &["validate", bundle.join("appspec.yml").to_str().unwrap()],
    );
    assert_eq!(v.code, 2, "{}", v.all());
    assert!(v.all().contains("not a regular file"), "{}", v.all());
}

#[test]
fn a_five_mib_appspec_is_refused_by_deploy_local_too() {
    let h = Host::new();
    let dest = h.path("www");
    let bundle = h.path("b");
    let mut text = appspec(&dest, "app", "");
    let line = format!("# {MARKER}\n");
    while text.len() < 5 * 1024 * 1024 {
        text.push_str(&line);
    }
    h.scratch.write("b/appspec.yml", &text);
    h.scratch.write("b/app/index.html", "v1");
    let run = h.agent.deploy_local(&bundle, &[]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.all().contains("over 4194304 bytes"), "{}", run.all());
    assert_no_marker("deploy-local's output", &run.all());
    assert!(!dest.exists());
    let v = support::run(
        &support::agent_bin(),
        &["validate", bundle.to_str().unwrap()],
    );
    assert_eq!(v.code, 2, "{}", v.all());
    assert!(v.all().contains("over 4194304 bytes"), "{}", v.all());
}

#[test]
fn a_hook_linked_out_or_in_a_directory_linked_out_never_runs() {
    for location in ["evil.sh", "outdir/evil.sh"] {
        let h = Host::new();
        let ran = h.path("outside-script-ran");
        h.scratch.script(
            "outside/evil.sh",
            &format!("#!/bin/sh\ntouch {}\n", ran.display()),
        );
        let dest = h.path("www");
        let bundle = h.path("b");
        h.scratch.write(
            "b/appspec.yml",
            &appspec(
                &dest,
                "app",
                &format!("hooks:\n  BeforeInstall:\n    - location: {location}\n"),
            ),
        );
        h.scratch.write("b/app/index.html", "v1");
        symlink(h.path("outside/evil.sh"), bundle.join("evil.sh")).unwrap();
        // Absolute: the bundle is copied into the agent's root, where `../outside` would
        // point nowhere.
        symlink(h.path("outside"), bundle.join("outdir")).unwrap();

        let run = h.agent.deploy_local(&bundle, &[]);
        assert_eq!(run.code, 1, "{location}: {}", run.all());
        assert!(
            !ran.exists(),
            "{location}: the script outside the bundle ran"
        );
        assert!(run.all().contains(location), "{}", run.all());
        assert!(
            h.everything_on_disk().contains("BundleRefused"),
            "{location}"
        );
        assert!(!dest.exists(), "{location}");

        let v = support::run(
            &support::agent_bin(),
            &["validate", bundle.to_str().unwrap()],
        );
        assert_eq!(v.code, 1, "{location}: {}", v.all());
        assert!(v.stdout.contains(".location"), "{}", v.all());
    }
}

#[test]
fn a_files_source_through_a_directory_linked_out_installs_nothing_and_validate_agrees() {
    let h = Host::new();
    h.secret();
    let dest = h.path("www");
    let bundle = h.path("b");
    h.scratch
        .write("b/appspec.yml", &appspec(&dest, "conf/secret", ""));
    std::fs::create_dir_all(&bundle).unwrap();
    symlink(h.path("outside"), bundle.join("conf")).unwrap();

    let run = h.agent.deploy_local(&bundle, &[]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.all().contains("conf/secret"), "{}", run.all());
    assert_no_marker("deploy-local's output", &run.all());
    assert!(!dest.join("secret").exists(), "a host file was installed");
    assert_no_marker("the journal or logs", &h.everything_on_disk());

    let v = support::run(
        &support::agent_bin(),
        &["validate", bundle.to_str().unwrap()],
    );
    assert_eq!(v.code, 1, "{}", v.all());
    assert!(v.stdout.contains("files[0].source"), "{}", v.all());
}

#[test]
fn links_that_stay_inside_the_bundle_keep_working() {
    let h = Host::new();
    let dest = h.path("www");
    let ran = h.path("inside-script-ran");
    let bundle = h.path("b");
    h.scratch.write(
        "b/deploy/appspec.yml",
        &appspec(
            &dest,
            "site/index.html",
            "hooks:\n  AfterInstall:\n    - location: scripts/after.sh\n",
        ),
    );
    h.scratch.write("b/releases/v2/index.html", "v2");
    h.scratch.script(
        "b/deploy/scripts/after.sh",
        &format!(
            "#!/bin/sh\ncd \"$(dirname \"$0\")\" && touch {}\n",
            ran.display()
        ),
    );
    symlink("deploy/appspec.yml", bundle.join("appspec.yml")).unwrap();
    symlink("releases/v2", bundle.join("site")).unwrap();
    symlink("deploy/scripts", bundle.join("scripts")).unwrap();

    let v = support::run(
        &support::agent_bin(),
        &["validate", bundle.to_str().unwrap()],
    );
    assert_eq!(v.code, 0, "{}", v.all());
    h.agent.deploy_local(&bundle, &[]).success();
    assert_eq!(
        std::fs::read_to_string(dest.join("index.html")).unwrap(),
        "v2"
    );
    assert!(ran.exists(), "the in-bundle hook did not run");
}

/// A tgz of `dir` that keeps its symlinks as symlinks.
fn tgz_of(dir: &Path, out: &Path) {
    let f = std::fs::File::create(out).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
}

#[test]
fn the_daemon_reports_an_appspec_linked_out_as_bundle_refused_without_its_content() {
    let h = Host::new();
    let secret = h.secret();
    let src = h.path("src");
    h.scratch.write("src/app/index.html", "v1");
    symlink(&secret, src.join("appspec.yml")).unwrap();
    let bundle = h.path("bundle.tgz");
    tgz_of(&src, &bundle);

    let status = h.path("status");
    let cmd = command(
        "d-CONFINE1",
        Revision::Local {
            path: bundle.display().to_string(),
            bundle_type: BundleType::Tgz,
            sha256: Some(sha256_file(&bundle)),
        },
        StatusSinkSpec::Local {
            dir: status.display().to_string(),
        },
    );
    let agent = Agent::builder(h.path("daemon"))
        .host("h-confine")
        .spool()
        .build();
    agent.submit(&cmd);
    let mut running = agent.start();
    let rec = wait_for(
        Duration::from_secs(60),
        "final status",
        &|| running.log(),
        || local_record(&status, "d-CONFINE1", "h-confine").filter(|r| r.status.is_final()),
    );
    assert_eq!(running.terminate(Duration::from_secs(30)), 0);
    assert_eq!(rec.status, DeploymentStatus::Failed, "{rec:#?}");
    let d = rec
        .events
        .iter()
        .find_map(|e| e.diagnostics.as_ref())
        .unwrap_or_else(|| panic!("no diagnostics: {rec:#?}"));
    assert_eq!(d.error_code, ErrorCode::BundleRefused, "{rec:#?}");
    assert!(d.message.contains("appspec.yml"), "{}", d.message);
    let mut record_text = String::new();
    walk(&status, &mut record_text);
    assert_no_marker("the status record", &record_text);
    assert_no_marker("the agent log", &running.log());
    let mut on_disk = String::new();
    walk(agent.root(), &mut on_disk);
    assert_no_marker("the agent's journal and state", &on_disk);
}
