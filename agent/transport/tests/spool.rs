//! The spool directory queue: pick up, acknowledge, reject, survive a restart, and hand each
//! command to only one of two agents sharing a spool; woken by inotify (not a timer), with
//! nothing lost between the watch and the scan, a recreated directory watched again, and a
//! timer where inotify is not used.

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

/// A receive that must be woken by the kernel: its wait and the timer fallback are both an
/// hour, so only an inotify event can make it return the command. The bound on the test is
/// there so a broken watch fails the test instead of hanging it.
async fn receive_within_an_hour(spool: &Spool) -> Vec<pier_transport::Received> {
    tokio::time::timeout(
        Duration::from_secs(60),
        spool.receive(Duration::from_secs(3600)),
    )
    .await
    .expect("the receive was not woken: no inotify event reached it")
    .unwrap()
}

#[tokio::test]
async fn spool_is_woken_by_inotify_not_by_a_timer() {
    let s = Scratch::new();
    let dir = s.path().join("spool");
    let spool = Spool::open(&dir)
        .unwrap()
        .with_fallback_poll(Duration::from_secs(3600));
    let d = dir.clone();
    let dropper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A half-written file does not count; the command renamed in does.
        std::fs::write(d.join("c1.json.tmp"), b"{").unwrap();
        Spool::submit(&d, "c1.json", b"{}").unwrap();
    });
    let got = receive_within_an_hour(&spool).await;
    dropper.await.unwrap();
    assert_eq!(ids(&got), ["c1.json"]);

    // Commands that arrive while nobody is receiving (the agent busy with a deployment) are
    // taken by the next receive.
    Spool::submit(&dir, "c2.json", b"{}").unwrap();
    Spool::submit(&dir, "c3.json", b"{}").unwrap();
    let got = receive_within_an_hour(&spool).await;
    assert_eq!(ids(&got), ["c2.json", "c3.json"]);

    // A command written in place (not renamed in) is taken once its writer closes it.
    let d = dir.clone();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::fs::write(d.join("c4.json"), b"{}").unwrap();
    });
    let got = receive_within_an_hour(&spool).await;
    writer.await.unwrap();
    assert_eq!(ids(&got), ["c4.json"]);
}

#[tokio::test]
async fn spool_takes_a_command_that_was_there_before_the_watch() {
    let s = Scratch::new();
    let dir = s.path().join("spool");
    std::fs::create_dir_all(&dir).unwrap();
    // Present before the agent starts: no event will ever come for it, so the scan after
    // arming the watch must find it.
    Spool::submit(&dir, "early.json", b"{}").unwrap();
    let spool = Spool::open(&dir)
        .unwrap()
        .with_fallback_poll(Duration::from_secs(3600));
    let got = receive_within_an_hour(&spool).await;
    assert_eq!(ids(&got), ["early.json"]);
}

#[tokio::test]
async fn spool_waiting_on_a_same_named_command_is_taken_when_it_leaves() {
    let s = Scratch::new();
    let dir = s.path().join("spool");
    let spool = Spool::open(&dir)
        .unwrap()
        .with_fallback_poll(Duration::from_secs(3600));
    Spool::submit(&dir, "same.json", b"{\"n\": 1}").unwrap();
    let first = receive_within_an_hour(&spool).await;
    assert_eq!(ids(&first), ["same.json"]);
    // The same name again while the first is still in processing/: it waits.
    Spool::submit(&dir, "same.json", b"{\"n\": 2}").unwrap();
    assert!(spool
        .receive(Duration::from_millis(100))
        .await
        .unwrap()
        .is_empty());
    // The first one is acknowledged while a receive waits: that wakes it.
    let ack = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        spool.ack(&first[0]).await.unwrap();
    };
    let (got, ()) = tokio::join!(receive_within_an_hour(&spool), ack);
    assert_eq!(ids(&got), ["same.json"]);
    assert_eq!(got[0].body, b"{\"n\": 2}");
}

#[tokio::test]
async fn spool_directory_recreated_is_watched_again() {
    let s = Scratch::new();
    let dir = s.path().join("spool");
    let spool = Spool::open(&dir)
        .unwrap()
        .with_fallback_poll(Duration::from_secs(3600));
    assert!(spool
        .receive(Duration::from_millis(50))
        .await
        .unwrap()
        .is_empty());

    // Replaced between two receives (a bare directory: the agent makes its subdirectories).
    std::fs::rename(&dir, s.path().join("old-spool")).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let d = dir.clone();
    let dropper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Spool::submit(&d, "after.json", b"{}").unwrap();
    });
    let got = receive_within_an_hour(&spool).await;
    dropper.await.unwrap();
    assert_eq!(ids(&got), ["after.json"]);
    assert!(dir.join("processing/after.json").is_file());

    // Removed and made again while a receive waits. The receive may fail while the
    // directory is missing (the daemon retries a failed receive); the next one takes it.
    let d = dir.clone();
    let remaker = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::fs::remove_dir_all(&d).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::create_dir(&d).unwrap();
        Spool::submit(&d, "again.json", b"{}").unwrap();
    });
    let mut got = Vec::new();
    for _ in 0..20 {
        match tokio::time::timeout(
            Duration::from_secs(60),
            spool.receive(Duration::from_secs(3600)),
        )
        .await
        .expect("the receive was not woken after the directory was made again")
        {
            Ok(m) if !m.is_empty() => {
                got = m;
                break;
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    remaker.await.unwrap();
    assert_eq!(ids(&got), ["again.json"]);
}

#[tokio::test]
async fn spool_without_inotify_falls_back_to_a_timer() {
    let s = Scratch::new();
    let dir = s.path().join("spool");
    let spool = Spool::open(&dir)
        .unwrap()
        .without_inotify()
        .with_fallback_poll(Duration::from_millis(50));
    let d = dir.clone();
    let dropper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Spool::submit(&d, "polled.json", b"{}").unwrap();
    });
    let got = tokio::time::timeout(
        Duration::from_secs(60),
        spool.receive(Duration::from_secs(3600)),
    )
    .await
    .expect("the fallback timer did not scan")
    .unwrap();
    dropper.await.unwrap();
    assert_eq!(ids(&got), ["polled.json"]);
}

fn ids(got: &[pier_transport::Received]) -> Vec<&str> {
    got.iter().map(|m| m.id.as_str()).collect()
}
