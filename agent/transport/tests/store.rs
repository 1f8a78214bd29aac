//! The shared object store: conditional writes on S3 (moto) and in a directory hold under a
//! race, so that of many writers starting from one version exactly one wins.

use std::sync::Arc;

use pier_transport::store::{DirStore, ObjectStore, Precondition, PutOutcome, S3Store};

use crate::support::{moto_clients, new_bucket, Scratch};

/// The conditional-write contract, for any store.
async fn contract(store: &dyn ObjectStore) {
    assert_eq!(
        store.get("deployments/d-1/record.json").await.unwrap(),
        None
    );
    let first = match store
        .put(
            "deployments/d-1/record.json",
            b"{\"n\":0}".to_vec(),
            Precondition::Absent,
        )
        .await
        .unwrap()
    {
        PutOutcome::Written(etag) => etag,
        PutOutcome::Conflict => panic!("creating an absent object conflicted"),
    };
    // A second create of the same key is refused.
    assert_eq!(
        store
            .put(
                "deployments/d-1/record.json",
                b"{\"n\":9}".to_vec(),
                Precondition::Absent
            )
            .await
            .unwrap(),
        PutOutcome::Conflict
    );
    let read = store
        .get("deployments/d-1/record.json")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.bytes, b"{\"n\":0}");
    assert_eq!(read.etag, first);
    // Replace on the version read succeeds once; the stale version is then refused.
    let second = store
        .put(
            "deployments/d-1/record.json",
            b"{\"n\":1}".to_vec(),
            Precondition::Matches(first.clone()),
        )
        .await
        .unwrap();
    assert!(
        matches!(second, PutOutcome::Written(ref e) if *e != first),
        "{second:?}"
    );
    assert_eq!(
        store
            .put(
                "deployments/d-1/record.json",
                b"{\"n\":2}".to_vec(),
                Precondition::Matches(first)
            )
            .await
            .unwrap(),
        PutOutcome::Conflict
    );
    assert_eq!(
        store
            .get("deployments/d-1/record.json")
            .await
            .unwrap()
            .unwrap()
            .bytes,
        b"{\"n\":1}"
    );
    // If-Match on a missing object is a conflict, not an error.
    assert_eq!(
        store
            .put(
                "deployments/d-9/record.json",
                b"{}".to_vec(),
                Precondition::Matches("x".into())
            )
            .await
            .unwrap(),
        PutOutcome::Conflict
    );

    // Listing: sorted, by prefix, paged.
    for host in ["h3", "h1", "h2"] {
        store
            .put(
                &format!("hosts/{host}.json"),
                b"{}".to_vec(),
                Precondition::None,
            )
            .await
            .unwrap();
    }
    assert_eq!(
        store.list("hosts/", None, None).await.unwrap(),
        ["hosts/h1.json", "hosts/h2.json", "hosts/h3.json"]
    );
    assert_eq!(
        store
            .list("hosts/", Some("hosts/h1.json"), Some(1))
            .await
            .unwrap(),
        ["hosts/h2.json"]
    );
    assert_eq!(
        store.list("deployments/", None, None).await.unwrap(),
        ["deployments/d-1/record.json"]
    );
    store.delete("hosts/h2.json").await.unwrap();
    store.delete("hosts/h2.json").await.unwrap();
    assert_eq!(store.list("hosts/", None, None).await.unwrap().len(), 2);
}

/// Eight writers each add one to a counter by read-modify-conditional-write, retrying on
/// conflict: no increment is lost, which is what keeps two controllers from both
/// dispatching one batch.
async fn race(store: Arc<dyn ObjectStore>) {
    store
        .put("counter.json", b"0".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..5 {
                loop {
                    let cur = store.get("counter.json").await.unwrap().unwrap();
                    let n: u64 = String::from_utf8(cur.bytes).unwrap().parse().unwrap();
                    match store
                        .put(
                            "counter.json",
                            (n + 1).to_string().into_bytes(),
                            Precondition::Matches(cur.etag),
                        )
                        .await
                        .unwrap()
                    {
                        PutOutcome::Written(_) => break,
                        PutOutcome::Conflict => conflicts += 1,
                    }
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.unwrap();
    }
    let end = store.get("counter.json").await.unwrap().unwrap();
    assert_eq!(end.bytes, b"40", "after {conflicts} conflicts");
}

#[tokio::test]
async fn dir_store_conditional_writes() {
    let scratch = Scratch::new();
    contract(&DirStore::new(scratch.path().join("store"))).await;
    race(Arc::new(DirStore::new(scratch.path().join("race")))).await;
    // A key that would leave the directory is refused.
    let store = DirStore::new(scratch.path().join("store"));
    assert!(store.get("../x").await.is_err());
    assert!(store
        .put("/etc/x", vec![], Precondition::None)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_store_conditional_writes() {
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    contract(&S3Store::new(aws.s3.clone(), &bucket, "/pier/")).await;
    race(Arc::new(S3Store::new(aws.s3.clone(), &bucket, "race"))).await;
}
