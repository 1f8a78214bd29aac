//! The spool directory queue: pick up, acknowledge, reject, survive a restart, and hand each
//! command to only one of two agents sharing a spool.

use std::time::Duration;

use pier_protocol::Command;
use pier_transport::spool::Spool;
use pier_transport::Queue;

use crate::support::{command, local_revision, Scratch};

#[tokio::test]
async fn spool_pick_up_ack_reject_and_restart() {
    let s = Scratch::new();
    let dir = s.path().join("spool");
    let spool = Spool::open(&dir).unwrap();
    assert!(spool
        .receive(Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());

    // Half-written files (dotfiles, *.tmp) are not commands.
    std::fs::write(dir.join(".incoming.json"), b"{").unwrap();
    std::fs::write(dir.join("next.json.tmp"), b"{").unwrap();
    let good = command("d-spool-1", local_revision(), &s.path().join("status")).to_json();

    // A command dropped while a receive waits is picked up by that receive.
    let d = dir.clone();
    let body = good.clone();
    let dropper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Spool::submit(&d, "a.json", &body).unwrap();
    });
    let got = spool.receive(Duration::from_secs(5)).await.unwrap();
    dropper.await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, "a.json");
    assert_eq!(got[0].body, good);
    assert_eq!(got[0].receive_count, 1);
    assert!(dir.join("processing/a.json").is_file());
    assert!(!dir.join("a.json").exists());
    spool
        .extend(&got[0], Duration::from_secs(60))
        .await
        .unwrap();

    // The agent stops mid-deployment: a new one finds the command again.
    drop(spool);
    let spool = Spool::open(&dir).unwrap();
    let again = spool.receive(Duration::from_millis(300)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, "a.json");
    assert_eq!(again[0].receive_count, 2);
    spool.ack(&again[0]).await.unwrap();
    assert!(dir.join("done/a.json").is_file());
    assert!(!dir.join("processing/a.json").exists());

    // A malformed command is rejected with its reason beside it, never run nor deleted.
    Spool::submit(
        &dir,
        "b.json",
        br#"{"version": 1, "deployment_id": "d-2", "application_name": 5}"#,
    )
    .unwrap();
    let got = spool.receive(Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.len(), 1);
    let err = Command::from_json(&got[0].body).unwrap_err();
    spool.reject(&got[0], &err.to_string()).await.unwrap();
    assert!(dir.join("rejected/b.json").is_file());
    let reason = std::fs::read_to_string(dir.join("rejected/b.json.reason")).unwrap();
    assert!(reason.contains("application_name"), "{reason}");

    // The half-written files are still there, untouched.
    assert!(dir.join(".incoming.json").exists() && dir.join("next.json.tmp").exists());
    // Only ID.json names, with the one id rule, are submitted.
    for bad in ["x.tmp", ".x.json", "a/b.json", "x", ".json", "../x.json"] {
        assert!(Spool::submit(&dir, bad, b"{}").is_err(), "{bad}");
    }
}

#[tokio::test]
async fn spool_two_agents_take_a_command_once() {
    let s = Scratch::new();
    let dir = s.path().join("spool");
    let a = Spool::open(&dir).unwrap();
    let b = Spool::open(&dir).unwrap();
    for i in 0..20 {
        Spool::submit(&dir, &format!("c{i:02}.json"), b"{}").unwrap();
    }
    let mut ids = Vec::new();
    loop {
        let (x, y) = tokio::join!(
            a.receive(Duration::from_millis(10)),
            b.receive(Duration::from_millis(10))
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        if x.is_empty() && y.is_empty() {
            break;
        }
        ids.extend(x.into_iter().chain(y).map(|m| m.id));
    }
    ids.sort();
    let want: Vec<String> = (0..20).map(|i| format!("c{i:02}.json")).collect();
    assert_eq!(ids, want);
}
