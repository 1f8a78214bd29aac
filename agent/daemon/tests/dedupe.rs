//! Deduplication by deployment id, persisted on disk.

use pier_agent::dedupe::{Dedupe, Seen};

use crate::support::Scratch;

#[test]
fn dedupe_persists_across_reopen() {
    let s = Scratch::new();
    let dir = s.path().join("seen");
    let d = Dedupe::open(&dir).unwrap();
    assert_eq!(d.begin("d-1").unwrap(), None, "first delivery runs");
    assert_eq!(
        d.begin("d-1").unwrap(),
        Some(Seen::InProgress),
        "duplicate does not"
    );
    assert_eq!(d.begin("d-2").unwrap(), None);
    d.finish("d-2").unwrap();
    drop(d);

    let d = Dedupe::open(&dir).unwrap();
    assert_eq!(d.begin("d-1").unwrap(), Some(Seen::InProgress));
    assert_eq!(d.begin("d-2").unwrap(), Some(Seen::Done));
    assert_eq!(d.in_progress().unwrap(), vec!["d-1".to_string()]);
}
