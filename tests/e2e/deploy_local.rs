//! `pier-agent deploy-local` end to end: real bundles, real files, real hook processes and
//! users, a deployment root in a scratch directory.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{self, ensure_user, run_cmd, Agent, Run, Scratch};

/// A host for one test: an agent configured with a private deployment root, and a place for
/// bundles and destinations.
struct Host {
    scratch: Scratch,
    agent: Agent,
}

impl Host {
    fn new() -> Host {
        Host::with_config("")
    }

    fn with_config(extra: &str) -> Host {
        let scratch = Scratch::new();
        let agent = Agent::builder(scratch.path()).config(extra).build();
        Host { scratch, agent }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.scratch.path().join(rel)
    }

    fn root(&self) -> PathBuf {
        self.agent.root().to_path_buf()
    }

    /// Writes a bundle directory `name` with `appspec` and the given files; a file whose
    /// name starts with `scripts/` is made executable.
    fn bundle(&self, name: &str, appspec: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.path(name);
        self.scratch.write(&format!("{name}/appspec.yml"), appspec);
        for (rel, body) in files {
            if rel.starts_with("scripts/") {
                self.scratch.script(&format!("{name}/{rel}"), body);
            } else {
                self.scratch.write(&format!("{name}/{rel}"), body);
            }
        }
        dir
    }

    fn deploy(&self, bundle: &Path, extra: &[&str]) -> Run {
        self.agent.deploy_local(bundle, extra)
    }

    /// The scripts.log files of every deployment, concatenated.
    fn scripts_logs(&self) -> String {
        let mut out = String::new();
        for g in std::fs::read_dir(self.root().join("groups")).unwrap() {
            let deps = g.unwrap().path().join("deployments");
            for d in std::fs::read_dir(deps).unwrap() {
                let p = d.unwrap().path().join("logs/scripts.log");
                out.push_str(&std::fs::read_to_string(p).unwrap_or_default());
            }
        }
        out
    }
}

fn read(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p.as_ref())
        .unwrap_or_else(|e| panic!("read {}: {e}", p.as_ref().display()))
}

fn appspec_files(dest: &Path, extra: &str) -> String {
    format!(
        "version: 0.0\nos: linux\nfiles:\n  - source: app\n    destination: {}\n{extra}",
        dest.display()
    )
}

#[test]
fn places_files_and_cleans_up_the_previous_revision() {
    let host = Host::new();
    let dest = host.path("www");
    let v1 = host.bundle(
        "v1",
        &appspec_files(&dest, ""),
        &[
            ("app/index.html", "v1"),
            ("app/old.css", "old"),
            ("app/sub/deep.txt", "deep"),
        ],
    );
    host.deploy(&v1, &[]).success();
    assert_eq!(read(dest.join("index.html")), "v1");
    assert_eq!(read(dest.join("sub/deep.txt")), "deep");

    // v2 drops old.css and sub/: the previous install's files go, the new ones land, and a
    // file nobody installed is left alone... unless it is in the way (DISALLOW by default).
    std::fs::write(dest.join("operator-note.txt"), "mine").unwrap();
    let v2 = host.bundle("v2", &appspec_files(&dest, ""), &[("app/index.html", "v2")]);
    host.deploy(&v2, &[]).success();
    assert_eq!(read(dest.join("index.html")), "v2");
    assert!(!dest.join("old.css").exists(), "old.css was not cleaned up");
    assert!(
        !dest.join("sub").exists(),
        "a directory the last install made is left"
    );
    assert_eq!(read(dest.join("operator-note.txt")), "mine");
}

#[test]
fn file_exists_behavior_disallow_overwrite_retain() {
    let host = Host::new();
    let dest = host.path("dest");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(dest.join("conf.txt"), "theirs").unwrap();
    let b = host.bundle(
        "b",
        &appspec_files(&dest, ""),
        &[("app/conf.txt", "ours"), ("app/other.txt", "new")],
    );

    // DISALLOW (the default) fails, names the file, and changes nothing.
    let r = host.deploy(&b, &[]).code(1);
    assert!(r.all().contains("conf.txt"), "{}", r.all());
    assert!(r.stdout.contains("Install"), "{}", r.stdout);
    assert_eq!(read(dest.join("conf.txt")), "theirs");
    assert!(!dest.join("other.txt").exists());

    host.deploy(&b, &["-b", "RETAIN"]).success();
    assert_eq!(read(dest.join("conf.txt")), "theirs");
    assert_eq!(read(dest.join("other.txt")), "new");

    host.deploy(&b, &["-b", "OVERWRITE"]).success();
    assert_eq!(read(dest.join("conf.txt")), "ours");

    // The AppSpec's own value wins over the command's.
    let dest2 = host.path("dest2");
    std::fs::create_dir_all(&dest2).unwrap();
    std::fs::write(dest2.join("conf.txt"), "theirs").unwrap();
    let b2 = host.bundle(
        "b2",
        &appspec_files(&dest2, "file_exists_behavior: OVERWRITE\n"),
        &[("app/conf.txt", "ours")],
    );
    host.deploy(&b2, &["-g", "g2", "-b", "DISALLOW"]).success();
    assert_eq!(read(dest2.join("conf.txt")), "ours");
}

#[test]
fn permissions_apply_owner_group_and_mode_with_a_real_user() {
    ensure_user("pier-e2e-perm");
    let host = Host::new();
    let dest = host.path("perm");
    let spec = appspec_files(
        &dest,
        &format!(
            "permissions:\n  - object: {d}\n    pattern: \"*.sh\"\n    owner: pier-e2e-perm\n    group: pier-e2e-perm\n    mode: 750\n    type: [file]\n",
            d = dest.display()
        ),
    );
    let b = host.bundle(
        "b",
        &spec,
        &[("app/run.sh", "#!/bin/sh\n"), ("app/readme.txt", "x")],
    );
    host.deploy(&b, &[]).success();
    let user = nix::unistd::User::from_name("pier-e2e-perm")
        .unwrap()
        .unwrap();
    let m = std::fs::metadata(dest.join("run.sh")).unwrap();
    assert_eq!(m.uid(), user.uid.as_raw());
    assert_eq!(m.gid(), user.gid.as_raw());
    assert_eq!(m.permissions().mode() & 0o7777, 0o750);
    // Not matched by the pattern: untouched owner.
    let m = std::fs::metadata(dest.join("readme.txt")).unwrap();
    assert_eq!(m.uid(), 0);
}

/// A hook that appends its event, the CodeDeploy variables, its working directory and
/// whether the agent's credentials leaked to `out`.
fn env_script(out: &Path) -> String {
    format!(
        "#!/bin/sh\necho \"$LIFECYCLE_EVENT $DEPLOYMENT_ID $APPLICATION_NAME $DEPLOYMENT_GROUP_NAME $DEPLOYMENT_GROUP_ID cwd=$(pwd) secret=${{AWS_SECRET_ACCESS_KEY:-none}}\" >> {}\n",
        out.display()
    )
}

fn all_hooks_spec(dest: &Path) -> String {
    let mut s = appspec_files(dest, "hooks:\n");
    for ev in [
        "ApplicationStop",
        "BeforeInstall",
        "AfterInstall",
        "ApplicationStart",
        "ValidateService",
    ] {
        s.push_str(&format!(
            "  {ev}:\n    - location: scripts/log.sh\n      timeout: 30\n"
        ));
    }
    s
}

#[test]
fn hooks_run_in_order_with_codedeploy_environment_and_no_agent_credentials() {
    let host = Host::new();
    let dest = host.path("d");
    let b = host.bundle(
        "b",
        &all_hooks_spec(&dest),
        &[
            ("app/f", "x"),
            ("scripts/log.sh", &env_script(&host.path("order.txt"))),
        ],
    );
    let mut cmd = host.agent.deploy_local_cmd(&b);
    cmd.env("AWS_SECRET_ACCESS_KEY", "agent-secret").args([
        "-a",
        "shop",
        "-d",
        "web-fleet",
        "-g",
        "grp-1",
    ]);
    let r = run_cmd(&mut cmd).success();
    let order = read(host.path("order.txt"));
    let lines: Vec<&str> = order.lines().collect();
    // First deployment: no previous revision, so no ApplicationStop.
    let events: Vec<&str> = lines.iter().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(
        events,
        [
            "BeforeInstall",
            "AfterInstall",
            "ApplicationStart",
            "ValidateService"
        ],
        "{order}"
    );
    let id = r
        .stdout
        .split_whitespace()
        .nth(1)
        .expect("deployment id in output");
    for l in &lines {
        assert!(
            l.contains(&format!(" {id} shop web-fleet grp-1 cwd=")),
            "{l}"
        );
        assert!(l.contains("/revision secret=none"), "{l}");
    }
}

#[test]
fn application_stop_runs_the_previous_revisions_script() {
    let host = Host::new();
    let dest = host.path("d");
    let stop = |tag: &str| {
        format!(
            "#!/bin/sh\necho stop-from-{tag} >> {}\n",
            host.path("stops.txt").display()
        )
    };
    let spec = appspec_files(
        &dest,
        "hooks:\n  ApplicationStop:\n    - location: scripts/stop.sh\n",
    );
    let v1 = host.bundle(
        "v1",
        &spec,
        &[("app/f", "1"), ("scripts/stop.sh", &stop("v1"))],
    );
    let v2 = host.bundle(
        "v2",
        &spec,
        &[("app/f", "2"), ("scripts/stop.sh", &stop("v2"))],
    );
    host.deploy(&v1, &[]).success();
    assert!(
        !host.path("stops.txt").exists(),
        "first deployment ran a stop"
    );
    host.deploy(&v2, &[]).success();
    host.deploy(&v1, &[]).success();
    assert_eq!(read(host.path("stops.txt")), "stop-from-v1\nstop-from-v2\n");
}

#[test]
fn failing_validate_service_fails_the_deployment_with_event_script_code_and_log() {
    let host = Host::new();
    let dest = host.path("d");
    let spec = appspec_files(
        &dest,
        "hooks:\n  ValidateService:\n    - location: scripts/check.sh\n",
    );
    let b = host.bundle(
        "b",
        &spec,
        &[
            ("app/f", "x"),
            (
                "scripts/check.sh",
                "#!/bin/sh\necho 'health check: \x1b[31mdown\x1b[0m'\nexit 3\n",
            ),
        ],
    );
    let r = host.deploy(&b, &[]).code(1);
    let last = r.stdout.lines().last().unwrap_or_default();
    assert!(last.contains("ValidateService"), "{last}");
    assert!(last.contains("scripts/check.sh"), "{last}");
    assert!(last.contains("code 3"), "{last}");
    assert!(last.contains("failed [ScriptFailed]:"), "{last}");
    assert!(last.contains("scripts.log"), "{last}");
    assert!(r.stderr.contains("health check: down"), "{}", r.stderr);
    assert!(host.scripts_logs().contains("health check: down"));
}

#[test]
fn hook_timeout_kills_the_whole_process_group() {
    let host = Host::new();
    let dest = host.path("d");
    let pidfile = host.path("child.pid");
    let spec = appspec_files(
        &dest,
        "hooks:\n  BeforeInstall:\n    - location: scripts/hang.sh\n      timeout: 1\n",
    );
    let b = host.bundle(
        "b",
        &spec,
        &[
            ("app/f", "x"),
            (
                "scripts/hang.sh",
                &format!(
                    "#!/bin/sh\nsleep 300 &\necho $! > {}\nsleep 300\n",
                    pidfile.display()
                ),
            ),
        ],
    );
    let r = host.deploy(&b, &[]).code(1);
    assert!(r.stdout.contains("BeforeInstall"), "{}", r.stdout);
    assert!(r.stdout.contains("timed out"), "{}", r.stdout);
    let pid: i32 = read(&pidfile).trim().parse().unwrap();
    // The background child was in the script's group: it must be gone (allow the kernel a
    // moment to reap it).
    let gone = (0..50).any(|_| {
        let alive = Path::new(&format!("/proc/{pid}")).exists()
            && !read(format!("/proc/{pid}/stat")).contains(") Z ");
        if alive {
            std::thread::sleep(Duration::from_millis(100));
        }
        !alive
    });
    assert!(gone, "background child {pid} survived the timeout");
}

#[test]
fn background_child_holding_stdout_does_not_hold_the_deployment() {
    let host = Host::new();
    let dest = host.path("d");
    let pidfile = host.path("daemon.pid");
    let spec = appspec_files(
        &dest,
        "hooks:\n  ApplicationStart:\n    - location: scripts/start.sh\n      timeout: 600\n",
    );
    let b = host.bundle(
        "b",
        &spec,
        &[
            ("app/f", "x"),
            (
                "scripts/start.sh",
                &format!(
                    "#!/bin/sh\n(sleep 120; echo late) &\necho $! > {}\necho started\n",
                    pidfile.display()
                ),
            ),
        ],
    );
    let t = Instant::now();
    host.deploy(&b, &[]).success();
    let took = t.elapsed();
    let pid = read(&pidfile).trim().to_string();
    let _ = Command::new("kill").arg(&pid).status();
    assert!(
        took < Duration::from_secs(60),
        "deploy-local waited {took:?} for a background child that holds stdout"
    );
}

#[test]
fn runas_switches_to_the_user_with_its_environment() {
    ensure_user("pier-e2e-runas");
    let host = Host::new();
    let dest = host.path("d");
    let out = host.path("whoami.txt");
    std::fs::write(&out, "").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(host.scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let spec = appspec_files(
        &dest,
        "hooks:\n  AfterInstall:\n    - location: scripts/who.sh\n      runas: pier-e2e-runas\n",
    );
    let b = host.bundle(
        "b",
        &spec,
        &[
            ("app/f", "x"),
            (
                "scripts/who.sh",
                &format!(
                    "#!/bin/sh\necho \"$(id -un) $(id -u) $HOME $USER $LOGNAME\" >> {}\n",
                    out.display()
                ),
            ),
        ],
    );
    host.deploy(&b, &[]).success();
    let user = nix::unistd::User::from_name("pier-e2e-runas")
        .unwrap()
        .unwrap();
    assert_eq!(
        read(&out).trim(),
        format!(
            "pier-e2e-runas {} {} pier-e2e-runas pier-e2e-runas",
            user.uid,
            user.dir.display()
        )
    );
}

#[test]
fn malicious_archive_is_refused_and_nothing_lands_outside() {
    let host = Host::new();
    let victim = host.path("victim.txt");
    // A tar whose entry climbs out with "..": built by hand so that the name is kept as is.
    let tar_path = host.path("evil.tar");
    {
        let mut data = Vec::new();
        let mut header = tar::Header::new_gnu();
        let body = b"pwned";
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        {
            let name = b"../../../../../../victim.txt";
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
        }
        header.set_cksum();
        let mut builder = tar::Builder::new(&mut data);
        builder.append(&header, &body[..]).unwrap();
        builder.finish().unwrap();
        drop(builder);
        std::fs::write(&tar_path, data).unwrap();
    }
    let r = host.deploy(&tar_path, &[]).code(1);
    assert!(r.stdout.contains("DownloadBundle"), "{}", r.stdout);
    assert!(r.all().contains("victim.txt"), "{}", r.all());
    assert!(!victim.exists());
    assert!(!host.root().join("victim.txt").exists());
}

#[test]
fn killed_mid_deployment_then_next_run_reports_and_continues() {
    let host = Host::new();
    let dest = host.path("d");
    let started = host.path("started");
    let spec = appspec_files(
        &dest,
        "hooks:\n  AfterInstall:\n    - location: scripts/slow.sh\n      timeout: 600\n",
    );
    let b = host.bundle(
        "b",
        &spec,
        &[
            ("app/f", "x"),
            (
                "scripts/slow.sh",
                &format!(
                    "#!/bin/sh\necho $$ > {}\nexec sleep 600\n",
                    started.display()
                ),
            ),
        ],
    );
    let mut child = host
        .agent
        .deploy_local_cmd(&b)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !started.exists() || read(&started).trim().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(60), "hook never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    // The orphaned hook (its own process group) is still sleeping; end it for tidiness.
    let _ = Command::new("kill").arg(read(&started).trim()).status();

    // The next run of the group takes over: it closes the dead one as failed at AfterInstall
    // and deploys cleanly: the dead run's Install had finished, so its manifest lets the next
    // Install clean up after it even under DISALLOW.
    let fixed = host.bundle("fixed", &appspec_files(&dest, ""), &[("app/f", "y")]);
    host.deploy(&fixed, &[]).success();
    assert_eq!(read(dest.join("f")), "y");

    let groups = host
        .root()
        .join("groups/default-local-deployment-group/deployments");
    let mut interrupted = 0;
    for d in std::fs::read_dir(groups).unwrap() {
        let j: serde_json::Value =
            serde_json::from_str(&read(d.unwrap().path().join("journal.json"))).unwrap();
        if j["recovered"] == true {
            interrupted += 1;
            assert_eq!(j["status"], "Failed");
            assert!(j["error"].as_str().unwrap().contains("AfterInstall"), "{j}");
            let after = j["events"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["event"] == "AfterInstall")
                .unwrap();
            assert_eq!(after["code"], "AgentInterrupted", "{j}");
        }
    }
    assert_eq!(interrupted, 1);
}

#[test]
fn events_flag_runs_a_subset_and_refuses_wrong_order() {
    let host = Host::new();
    let dest = host.path("d");
    let b = host.bundle(
        "b",
        &all_hooks_spec(&dest),
        &[
            ("app/f", "x"),
            ("scripts/log.sh", &env_script(&host.path("order.txt"))),
        ],
    );
    let r = host.deploy(&b, &["-e", "ApplicationStart,BeforeInstall"]);
    assert_ne!(r.code, 0);
    assert!(r.all().contains("lifecycle order"), "{}", r.all());
    host.deploy(&b, &["-e", "BeforeInstall,ApplicationStart"])
        .success();
    let order = read(host.path("order.txt"));
    let events: Vec<&str> = order
        .lines()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(events, ["BeforeInstall", "ApplicationStart"]);
    assert_eq!(read(dest.join("f")), "x", "Install always runs");
}

#[test]
fn retention_keeps_max_revisions_and_the_last_successful() {
    let host = Host::with_config("max_revisions: 2\n");
    let dest = host.path("d");
    let good = host.bundle("good", &appspec_files(&dest, ""), &[("app/f", "x")]);
    let bad = host.bundle(
        "bad",
        &appspec_files(
            &dest,
            "hooks:\n  BeforeInstall:\n    - location: scripts/fail.sh\n",
        ),
        &[("app/f", "x"), ("scripts/fail.sh", "#!/bin/sh\nexit 1\n")],
    );
    host.deploy(&good, &[]).success();
    for _ in 0..3 {
        host.deploy(&bad, &[]).code(1);
    }
    let deps = host
        .root()
        .join("groups/default-local-deployment-group/deployments");
    let left = std::fs::read_dir(&deps).unwrap().count();
    assert_eq!(left, 3, "2 newest plus the last successful");
    let last: serde_json::Value = serde_json::from_str(&read(
        host.root()
            .join("groups/default-local-deployment-group/last-successful.json"),
    ))
    .unwrap();
    assert!(deps
        .join(last["deployment_id"].as_str().unwrap())
        .join("revision/appspec.yml")
        .exists());
}

#[test]
fn every_example_bundle_deploys() {
    let examples = support::repo_root().join("appspec-examples");
    let mut names: Vec<String> = std::fs::read_dir(&examples)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            e.path()
                .join("appspec.yml")
                .exists()
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    assert!(names.len() >= 4, "{names:?}");
    // The systemd-service example leaves its service running; stop it however the test ends.
    struct StopService(PathBuf);
    impl Drop for StopService {
        fn drop(&mut self) {
            if self.0.exists() {
                let _ = Command::new("bash").arg(&self.0).output();
            }
        }
    }
    let _stop = StopService(examples.join("systemd-service/scripts/stop.sh"));
    let host = Host::new();
    for name in &names {
        // Twice: the second deployment runs the first one's ApplicationStop and cleans up.
        for round in 0..2 {
            let r = host.deploy(
                &examples.join(name),
                &["-g", &format!("example-{name}"), "-b", "OVERWRITE"],
            );
            assert_eq!(
                r.code,
                0,
                "example {name} round {round}\n{}\n{}",
                r.all(),
                host.scripts_logs()
            );
        }
    }
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let host = Host::new();
    let dest = host.path("d");
    let v1 = host.bundle(
        "v1",
        &appspec_files(&dest, ""),
        &[("app/keep.txt", "same"), ("app/gone.txt", "old")],
    );
    host.deploy(&v1, &[]).success();
    let v2 = host.bundle(
        "v2",
        &appspec_files(
            &dest,
            "hooks:\n  BeforeInstall:\n    - location: scripts/mark.sh\n",
        ),
        &[
            ("app/keep.txt", "same"),
            ("app/new.txt", "new"),
            (
                "scripts/mark.sh",
                &format!("#!/bin/sh\ntouch {}\n", host.path("hook-ran").display()),
            ),
        ],
    );
    let r = host.deploy(&v2, &["--dry-run"]).success();
    let plan = r.stdout;
    assert!(
        plan.contains(&format!("remove     {}", dest.join("gone.txt").display())),
        "{plan}"
    );
    assert!(
        plan.contains(&format!("create     {}", dest.join("new.txt").display())),
        "{plan}"
    );
    assert!(
        plan.contains(&format!("unchanged  {}", dest.join("keep.txt").display())),
        "{plan}"
    );
    // Nothing changed: the old file is there, the new one is not, no hook ran, and the group
    // still has one deployment.
    assert_eq!(read(dest.join("gone.txt")), "old");
    assert!(!dest.join("new.txt").exists());
    assert!(!host.path("hook-ran").exists());
    let deps = host
        .root()
        .join("groups/default-local-deployment-group/deployments");
    assert_eq!(std::fs::read_dir(deps).unwrap().count(), 1);
}

/// The journals of the default group's deployments, oldest first.
fn journals(host: &Host) -> Vec<(PathBuf, serde_json::Value)> {
    let deps = host
        .root()
        .join("groups/default-local-deployment-group/deployments");
    let mut out: Vec<(PathBuf, serde_json::Value)> = std::fs::read_dir(deps)
        .unwrap()
        .map(|d| {
            let dir = d.unwrap().path();
            let j = serde_json::from_str(&read(dir.join("journal.json"))).unwrap();
            (dir, j)
        })
        .collect();
    out.sort_by_key(|(_, j)| j["started_at"].as_str().unwrap_or_default().to_string());
    out
}

/// What the journal `j` says of `event` (its note, or its message).
fn event_message(j: &serde_json::Value, event: &str) -> String {
    let e = j["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == event)
        .unwrap_or_else(|| panic!("no {event} in {j}"));
    e["message"].as_str().unwrap_or_default().to_string()
}

/// The directory of the group's last deployment, which must have snapshotted its directory
/// bundle (not read it where it lies).
fn snapshotted(host: &Host) -> PathBuf {
    let (dir, j) = journals(host).pop().unwrap();
    assert!(
        !event_message(&j, "DownloadBundle").contains("where they lie"),
        "{j}"
    );
    dir
}

/// A snapshotted hookless revision whose `app/a.txt` the unpack copied (it could not
/// hard-link it): with no hook to read it there, Install moved that copy into place, and
/// the revision keeps its AppSpec.
fn assert_copy_moved_out(dir: &Path) {
    assert!(dir.join("revision/appspec.yml").is_file());
    assert!(!dir.join("revision/app/a.txt").exists());
}

/// Everything in `dir`, relative, sorted.
fn tree_of(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_hookless_directory_bundle_is_read_where_it_lies_and_redeployed_by_stat() {
    let host = Host::new();
    let dest = host.path("www");
    let files = [("app/a.txt", "aaaa"), ("app/sub/b.txt", "bbbb")];
    let v1 = host.bundle("v1", &appspec_files(&dest, ""), &files);
    // Settled before the agent looks, so that it records the files' ctimes.
    std::thread::sleep(Duration::from_millis(100));
    host.deploy(&v1, &[]).success();
    assert_eq!(read(dest.join("sub/b.txt")), "bbbb");
    let (dir, j) = journals(&host).pop().unwrap();
    let note = event_message(&j, "DownloadBundle");
    // app/a.txt, app/sub/b.txt and the AppSpec.
    assert!(note.contains("3 files read where they lie"), "{j}");
    // No snapshot: the revision keeps the AppSpec alone (for the next ApplicationStop).
    assert_eq!(tree_of(&dir.join("revision")), ["appspec.yml"]);

    // The same bundle again: nothing is read or written, only looked at.
    host.deploy(&v1, &[]).success();
    let (_, j) = journals(&host).pop().unwrap();
    assert!(
        event_message(&j, "Install").starts_with("unchanged 2;"),
        "{j}"
    );
    // Once every record is settled (the files this install placed were recorded by the
    // one after it), a redeploy changes no record, and the manifest file is left as it is.
    let manifest = host
        .root()
        .join("groups/default-local-deployment-group/install-manifest.json");
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    host.deploy(&v1, &[]).success();
    let before = (ino(&manifest), read(&manifest));
    host.deploy(&v1, &[]).success();
    assert_eq!((ino(&manifest), read(&manifest)), before);

    // A file rewritten in place with its size and mtime put back: its ctime tells.
    let a = v1.join("app/a.txt");
    let mtime = std::fs::metadata(&a).unwrap().modified().unwrap();
    std::fs::write(&a, "AAAA").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&a)
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_modified(mtime))
        .unwrap();
    host.deploy(&v1, &[]).success();
    assert_eq!(read(dest.join("a.txt")), "AAAA");
}

/// `dir` packed as `NAME.tgz` beside it.
fn tgz_of(dir: &Path) -> PathBuf {
    let out = dir.with_extension("tgz");
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-czf")
        .arg(&out)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    out
}

#[test]
fn a_hookless_archive_is_moved_out_of_its_revision_and_one_with_hooks_is_not() {
    let host = Host::new();
    let dest = host.path("www");
    // The whole bundle, AppSpec included, as many real AppSpecs map it.
    let whole = |extra: &str| {
        format!(
            "version: 0.0\nos: linux\nfiles:\n  - source: /\n    destination: {}\n{extra}",
            dest.display()
        )
    };
    let v1 = host.bundle(
        "v1",
        &whole(""),
        &[("app/a.txt", "aaaa"), ("app/b.txt", "bbbb")],
    );
    let v1 = tgz_of(&v1);
    host.deploy(&v1, &["-t", "tgz"]).success();
    assert_eq!(read(dest.join("app/a.txt")), "aaaa");
    assert_eq!(read(dest.join("appspec.yml")), whole(""));
    let (dir, _) = journals(&host).pop().unwrap();
    // No script of this revision will ever read its files: they were moved into place. The
    // AppSpec stays, for the next deployment's ApplicationStop.
    assert_eq!(tree_of(&dir.join("revision")), ["app", "appspec.yml"]);

    // Redeployed unchanged (the new unpack's digests tell), then a revision with hooks,
    // whose files stay for its scripts.
    host.deploy(&v1, &["-t", "tgz"]).success();
    let (_, j) = journals(&host).pop().unwrap();
    assert!(
        event_message(&j, "Install").starts_with("unchanged 3;"),
        "{j}"
    );
    let hooks = "hooks:\n  ApplicationStop:\n    - location: scripts/stop.sh\n";
    let v2 = host.bundle(
        "v2",
        &whole(hooks),
        &[
            ("app/a.txt", "AAAA"),
            (
                "scripts/stop.sh",
                "#!/bin/sh\necho stopping $LIFECYCLE_EVENT\n",
            ),
        ],
    );
    let v2 = tgz_of(&v2);
    host.deploy(&v2, &["-t", "tgz"]).success();
    assert_eq!(read(dest.join("app/a.txt")), "AAAA");
    let (dir, _) = journals(&host).pop().unwrap();
    assert!(dir.join("revision/app/a.txt").is_file());
    assert!(dir.join("revision/scripts/stop.sh").is_file());
    // Its ApplicationStop runs from that revision at the next deployment.
    host.deploy(&v1, &["-t", "tgz"]).success();
    assert!(host.scripts_logs().contains("stopping ApplicationStop"));
    assert_eq!(read(dest.join("app/a.txt")), "aaaa");
}

#[test]
fn a_bundle_with_hooks_or_another_owner_is_snapshotted_and_refusals_stay() {
    let host = Host::new();
    let dest = host.path("www");
    let hooks = "hooks:\n  AfterInstall:\n    - location: scripts/ok.sh\n";
    let with_hooks = host.bundle(
        "hooks",
        &appspec_files(&dest, hooks),
        &[("app/a.txt", "a"), ("scripts/ok.sh", "#!/bin/sh\nexit 0\n")],
    );
    host.deploy(&with_hooks, &[]).success();
    let dir = snapshotted(&host);
    assert!(dir.join("revision/app/a.txt").is_file());
    assert!(dir.join("revision/scripts/ok.sh").is_file());

    // Hookless, but a file another user owns (who could change it under the install).
    let other = host.bundle("other", &appspec_files(&dest, ""), &[("app/a.txt", "b")]);
    std::os::unix::fs::chown(other.join("app/a.txt"), Some(65534), None).unwrap();
    host.deploy(&other, &[]).success();
    let dir = snapshotted(&host);
    assert_copy_moved_out(&dir);
    assert_eq!(read(dest.join("a.txt")), "b");

    // Hookless and the agent's own, with a directory others may write to.
    let open = host.bundle("open", &appspec_files(&dest, ""), &[("app/a.txt", "c")]);
    std::fs::set_permissions(open.join("app"), std::fs::Permissions::from_mode(0o777)).unwrap();
    host.deploy(&open, &[]).success();
    let (dir, _) = journals(&host).pop().unwrap();
    assert!(dir.join("revision/app/a.txt").is_file());

    // Hookless and the agent's own, with a FIFO: refused as an unpack refuses it, naming it.
    let fifo = host.bundle("fifo", &appspec_files(&dest, ""), &[("app/a.txt", "d")]);
    assert!(Command::new("mkfifo")
        .arg(fifo.join("app/pipe"))
        .status()
        .unwrap()
        .success());
    let r = host.deploy(&fifo, &[]).code(1);
    assert!(r.all().contains("app/pipe"), "{}", r.all());
    assert!(r.all().contains("FIFO"), "{}", r.all());
    assert_eq!(
        read(dest.join("a.txt")),
        "c",
        "a refused bundle changed the destination"
    );
}

#[test]
fn a_hookless_bundle_others_could_swap_or_on_an_image_is_snapshotted() {
    let host = Host::new();
    let dest = host.path("www");
    // The bundle's parent is writable by everyone, without the sticky bit: another user could
    // rename the bundle away and put their own tree in its place.
    let open = host.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let b = host.bundle("open/b", &appspec_files(&dest, ""), &[("app/a.txt", "a")]);
    host.deploy(&b, &[]).success();
    let dir = snapshotted(&host);
    assert!(dir.join("revision/app/a.txt").is_file());
    // The same with the sticky bit (as /tmp): read where it lies.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    host.deploy(&b, &[]).success();
    let (_, j) = journals(&host).pop().unwrap();
    assert!(
        event_message(&j, "DownloadBundle").contains("where they lie"),
        "{j}"
    );

    // On a read-only filesystem (here a tmpfs remounted read-only, as an image would be).
    let ro = host.path("ro");
    std::fs::create_dir(&ro).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "pier-test-ro"])
        .arg(&ro)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        support::skip("cannot mount a tmpfs here (not root, or no mount allowed)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(ro.clone());
    let img = host.bundle("ro/b", &appspec_files(&dest, ""), &[("app/a.txt", "ro")]);
    assert!(Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&ro)
        .status()
        .unwrap()
        .success());
    host.deploy(&img, &[]).success();
    let dir = snapshotted(&host);
    assert_copy_moved_out(&dir);
    assert_eq!(read(dest.join("a.txt")), "ro");
}
