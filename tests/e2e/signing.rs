//! Signed commands end to end: `pier keygen` makes a key pair, `pier deploy --signing-key`
//! signs, and a real `pier-agent` with `trusted_keys` runs what verifies and refuses the rest
//! (unsigned, tampered, signed by another key, stale), leaving each in `rejected/` with its
//! reason and installing nothing. An agent without keys says it runs open and takes unsigned
//! commands.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use pier_protocol::signature::{sign, SecretKey};
use pier_protocol::Command;
use pier_transport::spool::Spool;

use crate::daemon::{local_record, wait_for};
use crate::support::{pier, Agent, Run, Scratch};

/// `pier keygen --out DIR --name NAME`; returns the key id it printed.
fn keygen(dir: &Path, name: &str) -> String {
    let run = pier(&["keygen", "--out", dir.to_str().unwrap(), "--name", name]).success();
    run.stdout.trim().to_string()
}

/// A bundle directory whose appspec copies `site/` to `dest`, pushed as a local archive.
fn pushed_bundle(s: &Scratch, name: &str, dest: &Path) -> PathBuf {
    s.write(
        &format!("{name}/appspec.yml"),
        &format!(
            "version: 0.0\nos: linux\nfiles:\n  - source: site\n    destination: {}\n",
            dest.display()
        ),
    );
    s.write(&format!("{name}/site/index.html"), &format!("{name}\n"));
    let archive = s.path().join(format!("revs/{name}.tgz"));
    pier(&[
        "push",
        "--application",
        "web",
        "--source",
        s.path().join(name).to_str().unwrap(),
        "--local-location",
        archive.to_str().unwrap(),
    ])
    .success();
    archive
}

/// `pier deploy` of `archive` to host `solo` through `spool`, with `extra` flags.
fn deploy(archive: &Path, spool: &Path, status: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "deploy",
        "--application",
        "web",
        "--deployment-group",
        "prod",
        "--revision",
        archive.to_str().unwrap(),
        "--hosts",
        "solo",
        "--spool-dir",
        spool.to_str().unwrap(),
        "--status-dir",
        status.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    pier(&args)
}

/// Waits until the agent has moved spool file `name` to `rejected/`, and returns the reason.
/// The spool writes the reason first and moves the command after it, so both are waited for.
fn rejection(agent: &crate::support::RunningAgent, spool: &Path, name: &str) -> String {
    let reason = spool.join(format!("rejected/{name}.reason"));
    let moved = spool.join("rejected").join(name);
    wait_for(
        Duration::from_secs(30),
        &format!("{name} to be rejected"),
        &|| agent.log(),
        || {
            let text = std::fs::read_to_string(&reason).ok()?;
            moved.is_file().then_some(text)
        },
    )
}

#[test]
fn an_agent_with_trusted_keys_runs_signed_commands_and_rejects_the_rest() {
    let s = Scratch::new();
    let keys = s.path().join("keys");
    let key_id = keygen(&keys, "ci");
    let secret = keys.join("ci.key");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&secret), 0o600);
    assert_eq!(mode(&keys.join("ci.pub")), 0o644);
    let other_keys = s.path().join("other");
    keygen(&other_keys, "rogue");

    let agent = Agent::builder(s.path().join("solo"))
        .host("solo")
        .spool()
        .config(&format!(
            "trusted_keys:\n  - id: {key_id}\n    file: {}\n",
            keys.join("ci.pub").display()
        ))
        .build();
    let spool = agent.spool().to_path_buf();
    let status = s.path().join("status");
    let dest = s.path().join("www");
    let running = agent.start();
    let v1 = pushed_bundle(&s, "v1", &dest);
    let v2 = pushed_bundle(&s, "v2", &dest);

    // Signed with the trusted key: deployed.
    let run = deploy(
        &v1,
        &spool,
        &status,
        &[
            "--signing-key",
            secret.to_str().unwrap(),
            "--wait",
            "--timeout",
            "60",
            "--poll-interval",
            "0.2",
        ],
    );
    assert_eq!(run.code, 0, "{}\n--- agent\n{}", run.all(), running.log());
    assert!(run.stderr.contains(&format!("signing with key {key_id}")));
    assert_eq!(
        std::fs::read_to_string(dest.join("index.html")).unwrap(),
        "v1\n"
    );
    let log = running.log();
    assert!(
        log.contains(&format!("signed by trusted key {key_id}")),
        "{log}"
    );
    assert!(!log.contains("RUNNING OPEN"), "{log}");

    // Unsigned: refused, never run.
    let run = deploy(&v2, &spool, &status, &[]).success();
    let unsigned = run.stdout.trim().to_string();
    let why = rejection(&running, &spool, &format!("{unsigned}.json"));
    assert!(why.contains("not signed"), "{why}");

    // Signed by a key the agent does not trust.
    let rogue = other_keys.join("rogue.key");
    let run = deploy(
        &v2,
        &spool,
        &status,
        &["--signing-key", rogue.to_str().unwrap()],
    )
    .success();
    let untrusted = run.stdout.trim().to_string();
    let why = rejection(&running, &spool, &format!("{untrusted}.json"));
    assert!(why.contains("does not trust"), "{why}");

    // Signed by the trusted key, then one byte of the signed command changed on the way.
    let staging = s.path().join("staging");
    let run = deploy(
        &v2,
        &staging,
        &status,
        &["--signing-key", secret.to_str().unwrap()],
    )
    .success();
    let tampered = run.stdout.trim().to_string();
    let name = format!("{tampered}.json");
    let mut envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(staging.join(&name)).unwrap()).unwrap();
    let mut payload = B64
        .decode(envelope["signed"]["payload"].as_str().unwrap())
        .unwrap();
    let at = String::from_utf8_lossy(&payload)
        .find("\"prod\"")
        .expect("the group name in the command")
        + 1;
    payload[at] = b'q'; // "prod" -> "qrod": still a valid command, no longer the signed one
    Command::from_json(&payload).expect("the tampered command still parses");
    envelope["signed"]["payload"] = B64.encode(&payload).into();
    Spool::submit(&spool, &name, envelope.to_string().as_bytes()).unwrap();
    let why = rejection(&running, &spool, &name);
    assert!(why.contains("does not verify"), "{why}");

    // Signed by the trusted key but created two hours ago: outside the replay window.
    let mut stale: Command = Command::from_json(&payload).unwrap();
    stale.deployment_group_name = "prod".into();
    stale.deployment_id = format!("{tampered}-stale");
    stale.created_at = chrono::Utc::now() - chrono::Duration::hours(2);
    let key = SecretKey::from_base64(&std::fs::read_to_string(&secret).unwrap()).unwrap();
    let name = format!("{}.json", stale.deployment_id);
    Spool::submit(&spool, &name, &sign(&stale.to_json(), &key)).unwrap();
    let why = rejection(&running, &spool, &name);
    assert!(why.contains("signature_max_age_seconds"), "{why}");

    // None of them ran: v1 is still installed and none has a status record.
    assert_eq!(
        std::fs::read_to_string(dest.join("index.html")).unwrap(),
        "v1\n"
    );
    for id in [&unsigned, &untrusted, &tampered, &stale.deployment_id] {
        assert!(local_record(&status, id, "solo").is_none(), "{id} ran");
    }
    let log = running.log();
    assert_eq!(log.matches("rejected message").count(), 4, "{log}");
}

#[test]
fn an_agent_without_keys_says_it_runs_open_and_takes_unsigned_commands() {
    let s = Scratch::new();
    let agent = Agent::builder(s.path().join("solo"))
        .host("solo")
        .spool()
        .build();
    let spool = agent.spool().to_path_buf();
    let status = s.path().join("status");
    let dest = s.path().join("www");
    let running = agent.start();
    let v1 = pushed_bundle(&s, "v1", &dest);
    let run = deploy(
        &v1,
        &spool,
        &status,
        &["--wait", "--timeout", "60", "--poll-interval", "0.2"],
    );
    assert_eq!(run.code, 0, "{}\n--- agent\n{}", run.all(), running.log());
    assert_eq!(
        std::fs::read_to_string(dest.join("index.html")).unwrap(),
        "v1\n"
    );
    let log = running.log();
    assert_eq!(log.matches("RUNNING OPEN").count(), 1, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_sqs_only_the_signed_command_runs_and_the_rest_reach_the_dead_letter_queue() {
    use crate::daemon::{local_command, tgz_bundle};
    use crate::support::{moto_clients, unique};
    use pier_transport::sqs::{create_with_dlq, SqsQueue};

    let aws = moto_clients().await;
    let s = Scratch::new();
    let keys = s.path().join("keys");
    let key_id = keygen(&keys, "ci");
    let key =
        SecretKey::from_base64(&std::fs::read_to_string(keys.join("ci.key")).unwrap()).unwrap();
    let qname = unique("pier-signed");
    let url = create_with_dlq(&aws.sqs, &qname, 1).await.unwrap();
    let agent = Agent::builder(s.path().join("solo"))
        .host("solo")
        .sqs(&url)
        .config(&format!(
            "trusted_keys:\n  - public_key: {}\n",
            key.public_key().to_base64()
        ))
        .spawn();
    let queue = SqsQueue::new(aws.sqs.clone(), &url);
    let status = s.path().join("status");
    let good_dest = s.path().join("good");
    let evil_dest = s.path().join("evil");
    let good = tgz_bundle(&s, "good", &good_dest, &[]);
    let evil = tgz_bundle(&s, "evil", &evil_dest, &[]);

    // Unsigned, then signed-and-altered (the revision swapped for another bundle), then signed.
    queue
        .send(&local_command("d-UNSIGNED1", &evil, &status).to_json())
        .await
        .unwrap();
    let signed_evil = local_command("d-ALTERED01", &evil, &status).to_json();
    let signed_good = local_command("d-ALTERED01", &good, &status).to_json();
    let mut envelope: serde_json::Value =
        serde_json::from_slice(&sign(&signed_good, &key)).unwrap();
    envelope["signed"]["payload"] = B64.encode(&signed_evil).into();
    queue.send(envelope.to_string().as_bytes()).await.unwrap();
    queue
        .send(&sign(
            &local_command("d-SIGNED001", &good, &status).to_json(),
            &key,
        ))
        .await
        .unwrap();

    let rec = wait_for(
        Duration::from_secs(90),
        "the signed deployment to finish",
        &|| agent.log(),
        || local_record(&status, "d-SIGNED001", "solo").filter(|r| r.status.is_final()),
    );
    assert_eq!(
        rec.status,
        pier_protocol::DeploymentStatus::Succeeded,
        "{rec:?}\n{}",
        agent.log()
    );
    assert_eq!(
        std::fs::read_to_string(good_dest.join("index.html")).unwrap(),
        "good"
    );

    // Both refused messages end in the dead-letter queue, never run.
    let dlq_url = aws
        .sqs
        .get_queue_url()
        .queue_name(format!("{qname}-dlq"))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let mut dead = Vec::new();
    let t = std::time::Instant::now();
    while dead.len() < 2 {
        let got = aws
            .sqs
            .receive_message()
            .queue_url(&dlq_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        dead.extend(got.messages.unwrap_or_default());
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "{} of 2 refused messages reached the DLQ\n{}",
            dead.len(),
            agent.log()
        );
    }
    let log = agent.log();
    assert!(log.contains("command is not signed"), "{log}");
    assert!(
        log.contains(&format!("signature by key `{key_id}` does not verify")),
        "{log}"
    );
    assert!(!evil_dest.exists(), "a refused command ran\n{log}");
    for id in ["d-UNSIGNED1", "d-ALTERED01"] {
        assert!(local_record(&status, id, "solo").is_none(), "{id} ran");
    }
}

#[test]
fn a_key_rotation_takes_effect_on_sighup() {
    let s = Scratch::new();
    let keys = s.path().join("keys");
    let old_id = keygen(&keys, "old");
    let new_id = keygen(&keys, "new");
    let trust = |names: &[&str]| {
        let mut yaml = String::from("trusted_keys:\n");
        for n in names {
            yaml.push_str(&format!(
                "  - file: {}\n",
                keys.join(format!("{n}.pub")).display()
            ));
        }
        yaml
    };
    let agent = Agent::builder(s.path().join("solo"))
        .host("solo")
        .spool()
        .config(&trust(&["old"]))
        .build();
    let spool = agent.spool().to_path_buf();
    let status = s.path().join("status");
    let dest = s.path().join("www");
    let running = agent.start();
    let v1 = pushed_bundle(&s, "v1", &dest);
    let signed_by = |name: &str| {
        let key = keys.join(format!("{name}.key"));
        deploy(
            &v1,
            &spool,
            &status,
            &["--signing-key", key.to_str().unwrap()],
        )
        .success()
        .stdout
        .trim()
        .to_string()
    };
    let finished = |id: &str| {
        wait_for(
            Duration::from_secs(60),
            &format!("{id} to finish"),
            &|| running.log(),
            || local_record(&status, id, "solo").filter(|r| r.status.is_final()),
        )
    };
    let reload = |names: &[&str], expect: &str| {
        let text = std::fs::read_to_string(agent.config()).unwrap();
        let head = text.split("trusted_keys:").next().unwrap().to_string();
        std::fs::write(agent.config(), head + &trust(names)).unwrap();
        let before = running.log().matches("applied").count();
        running.signal(nix::sys::signal::Signal::SIGHUP);
        wait_for(Duration::from_secs(30), "reload", &|| running.log(), || {
            (running.log().matches("applied").count() > before).then_some(())
        });
        assert!(running.log().contains(expect), "{}", running.log());
    };

    // Only the old key is trusted: the new one is refused.
    let id = signed_by("new");
    let why = rejection(&running, &spool, &format!("{id}.json"));
    assert!(why.contains("does not trust"), "{why}");
    finished(&signed_by("old"));

    // Both trusted (the rotation's overlap): either key deploys.
    let mut both = [old_id.clone(), new_id.clone()];
    both.sort();
    reload(
        &["old", "new"],
        &format!("trusted key(s) {}", both.join(", ")),
    );
    finished(&signed_by("new"));
    finished(&signed_by("old"));

    // The old key retired: what it signs is refused from the next message on.
    reload(&["new"], &format!("trusted key(s) {new_id} "));
    let id = signed_by("old");
    let why = rejection(&running, &spool, &format!("{id}.json"));
    assert!(why.contains(&format!("`{old_id}`")), "{why}");
    finished(&signed_by("new"));
}

/// The replay window stops a stale command for a deployment the host never took; a copy of
/// one it did take is the dedupe store's business, whatever its age: acknowledged, not run,
/// not refused.
#[test]
fn past_the_replay_window_a_taken_deployment_is_deduplicated_and_a_new_one_refused() {
    use crate::daemon::{local_command, tgz_bundle};

    let s = Scratch::new();
    let keys = s.path().join("keys");
    keygen(&keys, "ci");
    let key =
        SecretKey::from_base64(&std::fs::read_to_string(keys.join("ci.key")).unwrap()).unwrap();
    let agent = Agent::builder(s.path().join("solo"))
        .host("solo")
        .spool()
        .config(&format!(
            "trusted_keys:\n  - file: {}\nsignature_max_age_seconds: 10\n",
            keys.join("ci.pub").display()
        ))
        .build();
    let spool = agent.spool().to_path_buf();
    let status = s.path().join("status");
    let dest = s.path().join("www");
    let running = agent.start();
    let bundle = tgz_bundle(&s, "app", &dest, &[]);

    // Created 5 s ago: inside the 10 s window when it arrives, outside it 6 s later.
    let mut cmd = local_command("d-REPLAY01", &bundle, &status);
    cmd.created_at = chrono::Utc::now() - chrono::Duration::seconds(5);
    let body = sign(&cmd.to_json(), &key);
    Spool::submit(&spool, "d-REPLAY01.json", &body).unwrap();
    let rec = wait_for(
        Duration::from_secs(60),
        "the deployment to finish",
        &|| running.log(),
        || local_record(&status, "d-REPLAY01", "solo").filter(|r| r.status.is_final()),
    );
    assert_eq!(rec.status, pier_protocol::DeploymentStatus::Succeeded);
    std::fs::write(dest.join("index.html"), "changed since").unwrap();

    let past = cmd.created_at + chrono::Duration::seconds(11);
    if let Ok(wait) = (past - chrono::Utc::now()).to_std() {
        std::thread::sleep(wait);
    }
    // The same signed bytes again: a replay of a deployment this host took.
    Spool::submit(&spool, "d-REPLAY01-again.json", &body).unwrap();
    wait_for(
        Duration::from_secs(30),
        "the copy to be acknowledged",
        &|| running.log(),
        || {
            spool
                .join("done/d-REPLAY01-again.json")
                .is_file()
                .then_some(())
        },
    );
    assert!(!spool.join("rejected/d-REPLAY01-again.json").exists());
    assert_eq!(
        std::fs::read_to_string(dest.join("index.html")).unwrap(),
        "changed since",
        "the copy ran again"
    );
    assert!(
        running.log().contains("already done here"),
        "{}",
        running.log()
    );

    // A deployment this host never took, as old: refused.
    let mut stale = cmd.clone();
    stale.deployment_id = "d-REPLAY02".into();
    Spool::submit(&spool, "d-REPLAY02.json", &sign(&stale.to_json(), &key)).unwrap();
    let why = rejection(&running, &spool, "d-REPLAY02.json");
    assert!(why.contains("signature_max_age_seconds (10)"), "{why}");
    assert!(local_record(&status, "d-REPLAY02", "solo").is_none());
}
