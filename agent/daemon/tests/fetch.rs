//! The Fetcher against real services: S3 on moto (sha256, ETag, version id), HTTP from a
//! small server in the test (retries), and the GitHub API (token sent to the API only).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pier_agent::fetch::{FetchOptions, Fetcher};
use pier_engine::bundle::{FetchError, RevisionFetcher};
use pier_protocol::{BundleType, Revision};
use pier_transport::aws::AwsClients;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{moto_clients, new_bucket, new_versioned_bucket, sha256, Scratch};

async fn put(aws: &AwsClients, bucket: &str, key: &str, body: &[u8]) -> String {
    let out = aws
        .s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(body.to_vec().into())
        .send()
        .await
        .unwrap();
    out.e_tag().unwrap().to_string()
}

#[tokio::test]
async fn fetch_from_s3_verifies_sha256_and_etag() {
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let body = b"pretend this is a tgz".repeat(1000);
    let etag = put(&aws, &bucket, "web/1.tgz", &body).await;
    let fetcher = Fetcher::new(Some(aws.s3.clone()), FetchOptions::default()).unwrap();
    let s = Scratch::new();

    let ok = Revision::S3 {
        bucket: bucket.clone(),
        key: "web/1.tgz".into(),
        version_id: None,
        etag: Some(etag.clone()),
        bundle_type: BundleType::Tgz,
        sha256: sha256(&body),
    };
    let max_seen = Arc::new(AtomicU32::new(0));
    let m = max_seen.clone();
    let got = fetcher
        .fetch(&ok, &s.path().join("bundle.tgz"), &move |p| {
            m.fetch_max(p.done as u32, Ordering::Relaxed);
            assert_eq!(p.total, Some(21_000));
        })
        .await
        .unwrap();
    assert_eq!(got.bytes, body.len() as u64);
    assert_eq!(got.sha256.as_deref(), Some(sha256(&body).as_str()));
    assert_eq!(std::fs::read(&got.path).unwrap(), body);
    assert_eq!(max_seen.load(Ordering::Relaxed), 21_000);

    let wrong_sha = Revision::S3 {
        bucket: bucket.clone(),
        key: "web/1.tgz".into(),
        version_id: None,
        etag: None,
        bundle_type: BundleType::Tgz,
        sha256: sha256(b"something else"),
    };
    let dest = s.path().join("bad.tgz");
    let e = fetcher.fetch(&wrong_sha, &dest, &|_| {}).await.unwrap_err();
    match &e {
        FetchError::Sha256Mismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &sha256(b"something else"));
            assert_eq!(actual, &sha256(&body));
        }
        other => panic!("expected a sha256 mismatch, got {other}"),
    }
    assert!(e.to_string().contains(&sha256(&body)));
    assert!(!dest.exists(), "a mismatching bundle is removed");
    assert!(std::fs::read_dir(s.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".part")));

    let wrong_etag = Revision::S3 {
        bucket: bucket.clone(),
        key: "web/1.tgz".into(),
        version_id: None,
        etag: Some("\"0000\"".into()),
        bundle_type: BundleType::Tgz,
        sha256: sha256(&body),
    };
    let e = fetcher
        .fetch(&wrong_etag, &s.path().join("e.tgz"), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::EtagMismatch { .. }), "{e}");

    let missing = Revision::S3 {
        bucket,
        key: "web/none.tgz".into(),
        version_id: None,
        etag: None,
        bundle_type: BundleType::Tgz,
        sha256: sha256(&body),
    };
    let e = fetcher
        .fetch(&missing, &s.path().join("m.tgz"), &|_| {})
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "a missing object is not retried: {e}");
    assert!(e.to_string().contains("web/none.tgz"), "{e}");
}

#[tokio::test]
async fn fetch_from_s3_by_version_id() {
    let aws = moto_clients().await;
    let bucket = new_versioned_bucket(&aws).await;
    let v1 = aws
        .s3
        .put_object()
        .bucket(&bucket)
        .key("app.tar")
        .body(b"version one".to_vec().into())
        .send()
        .await
        .unwrap()
        .version_id()
        .unwrap()
        .to_string();
    put(&aws, &bucket, "app.tar", b"version two").await;
    let fetcher = Fetcher::new(Some(aws.s3.clone()), FetchOptions::default()).unwrap();
    let s = Scratch::new();
    let rev = Revision::S3 {
        bucket,
        key: "app.tar".into(),
        version_id: Some(v1),
        etag: None,
        bundle_type: BundleType::Tar,
        sha256: sha256(b"version one"),
    };
    let got = fetcher
        .fetch(&rev, &s.path().join("b.tar"), &|_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(got.path).unwrap(), b"version one");
}

/// One canned HTTP answer.
#[derive(Clone)]
struct Reply {
    status: u16,
    /// Extra header lines, each ending in `\r\n`.
    headers: String,
    body: Vec<u8>,
}

fn reply(status: u16, body: &[u8]) -> Reply {
    Reply {
        status,
        headers: String::new(),
        body: body.to_vec(),
    }
}

/// A tiny HTTP/1.1 server: answers each connection with the next of `responses`, repeating
/// the last, and records each request's head.
async fn http_server(responses: Vec<Reply>) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let Reply {
                status,
                headers,
                body,
            } = responses[n.min(responses.len() - 1)].clone();
            n += 1;
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => head.extend_from_slice(&buf[..k]),
                }
            }
            log.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let reply = format!(
                "HTTP/1.1 {status} X\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(reply.as_bytes()).await;
            let _ = sock.write_all(&body).await;
            let _ = sock.shutdown().await;
        }
    });
    (format!("http://{addr}"), seen)
}

fn quick_retries() -> FetchOptions {
    FetchOptions {
        backoff: pier_transport::backoff::Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(50),
            4,
        ),
        ..FetchOptions::default()
    }
}

#[tokio::test]
async fn fetch_over_http_retries_transient_errors_and_verifies() {
    let body = b"bundle over http".to_vec();
    let (base, seen) = http_server(vec![reply(503, b"busy"), reply(200, &body)]).await;
    let fetcher = Fetcher::new(None, quick_retries()).unwrap();
    let s = Scratch::new();
    let rev = Revision::Http {
        url: format!("{base}/rev.zip"),
        bundle_type: BundleType::Zip,
        sha256: sha256(&body),
    };
    let got = fetcher
        .fetch(&rev, &s.path().join("rev.zip"), &|_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), body);
    assert_eq!(seen.lock().unwrap().len(), 2, "one 503, then a retry");

    // A 404 is permanent: one request, no retries.
    let (base, seen) = http_server(vec![reply(404, b"no")]).await;
    let rev = Revision::Http {
        url: format!("{base}/gone.zip"),
        bundle_type: BundleType::Zip,
        sha256: sha256(&body),
    };
    let e = fetcher
        .fetch(&rev, &s.path().join("gone.zip"), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Http { status: 404, .. }), "{e}");
    assert_eq!(seen.lock().unwrap().len(), 1);

    // The right bytes under the wrong hash are refused and removed.
    let (base, _) = http_server(vec![reply(200, b"tampered")]).await;
    let rev = Revision::Http {
        url: format!("{base}/rev.zip"),
        bundle_type: BundleType::Zip,
        sha256: sha256(&body),
    };
    let dest = s.path().join("t.zip");
    let e = fetcher.fetch(&rev, &dest, &|_| {}).await.unwrap_err();
    assert!(matches!(e, FetchError::Sha256Mismatch { .. }), "{e}");
    assert!(!dest.exists());
}

#[tokio::test]
async fn fetch_from_github_sends_token_to_the_api_only() {
    let body = b"tarball bytes".to_vec();
    // Like api.github.com, the API redirects to another host (codeload) for the bytes.
    let (codeload, codeload_seen) = http_server(vec![reply(200, &body)]).await;
    let (base, seen) = http_server(vec![Reply {
        status: 302,
        headers: format!("location: {codeload}/acme/web/legacy.tar.gz/0123abc\r\n"),
        body: Vec::new(),
    }])
    .await;
    let fetcher = Fetcher::new(
        None,
        FetchOptions {
            github_api_url: base,
            github_token: Some("ghp_test_token".into()),
            ..quick_retries()
        },
    )
    .unwrap();
    let s = Scratch::new();
    let rev = Revision::Github {
        owner: "acme".into(),
        repo: "web".into(),
        commit: "0123abc".into(),
        bundle_type: None,
        sha256: Some(sha256(&body)),
    };
    let got = fetcher
        .fetch(&rev, &s.path().join("gh.tgz"), &|_| {})
        .await
        .unwrap();
    assert_eq!(got.bundle_type, BundleType::Tgz);
    let head = seen.lock().unwrap()[0].to_lowercase();
    assert!(
        head.starts_with("get /repos/acme/web/tarball/0123abc "),
        "{head}"
    );
    assert!(
        head.contains("authorization: bearer ghp_test_token"),
        "{head}"
    );
    let head = codeload_seen.lock().unwrap()[0].to_lowercase();
    assert!(
        head.starts_with("get /acme/web/legacy.tar.gz/0123abc "),
        "{head}"
    );
    assert!(
        !head.contains("ghp_test_token"),
        "token leaked on redirect: {head}"
    );

    // A failure message names the repository, never the token.
    let (base, _) = http_server(vec![reply(404, b"")]).await;
    let fetcher = Fetcher::new(
        None,
        FetchOptions {
            github_api_url: base,
            github_token: Some("ghp_test_token".into()),
            ..quick_retries()
        },
    )
    .unwrap();
    let e = fetcher
        .fetch(&rev, &s.path().join("gh2.tgz"), &|_| {})
        .await
        .unwrap_err();
    let msg = format!("{e} {e:?}");
    assert!(msg.contains("/repos/acme/web/tarball/0123abc"), "{msg}");
    assert!(!msg.contains("ghp_test_token"), "{msg}");
}
