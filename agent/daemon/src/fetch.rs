//! Fetching a revision bundle to a local file: from S3 (GetObject, a given version, ETag
//! checked), over HTTP(S), from GitHub (a commit's tarball, with a token that is never
//! logged), or from a local path.
//!
//! Every download is streamed to a `.part` file beside the destination while its SHA-256 is
//! computed, and renamed to the destination only once the hash matches the command's: a bundle
//! that does not match is removed, never unpacked. Transient failures (network, throttling,
//! 5xx) are retried from the start with [`Backoff`]. Progress goes to a
//! callback so the CLI can draw a bar. [`Fetcher`] is the engine's
//! [`RevisionFetcher`]; unpacking is the engine's job.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, USER_AGENT};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use pier_engine::bundle::{FetchError, FetchProgress, Fetched, ProgressFn, RevisionFetcher};
use pier_protocol::{BundleType, Revision};

use pier_transport::backoff::Backoff;

/// Where GitHub's REST API is, unless configured otherwise (GitHub Enterprise, tests).
pub(crate) const GITHUB_API_URL: &str = "https://api.github.com";

/// Settings of a [`Fetcher`].
#[derive(Clone)]
pub struct FetchOptions {
    /// GitHub API base URL, default [`GITHUB_API_URL`].
    pub github_api_url: String,
    /// GitHub token for private repositories (sent as a bearer token, never logged).
    pub github_token: Option<String>,
    /// Retry schedule for transient failures.
    pub backoff: Backoff,
    /// Connect timeout for HTTP(S) and GitHub (a stalled transfer is caught by `read_timeout`).
    pub connect_timeout: Duration,
    /// Longest silence in the middle of an HTTP(S) transfer.
    pub read_timeout: Duration,
}

impl Default for FetchOptions {
    fn default() -> FetchOptions {
        FetchOptions {
            github_api_url: GITHUB_API_URL.to_string(),
            github_token: None,
            backoff: Backoff::network(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
        }
    }
}

impl std::fmt::Debug for FetchOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchOptions")
            .field("github_api_url", &self.github_api_url)
            .field(
                "github_token",
                &self.github_token.as_ref().map(|_| "<redacted>"),
            )
            .field("backoff", &self.backoff)
            .finish()
    }
}

/// Fetches revisions; build one per agent and share it.
pub struct Fetcher {
    s3: Option<aws_sdk_s3::Client>,
    http: reqwest::Client,
    github_api_url: String,
    /// The `Authorization` header, marked sensitive so it never shows in debug output.
    github_auth: Option<HeaderValue>,
    backoff: Backoff,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("s3", &self.s3.is_some())
            .field("github_api_url", &self.github_api_url)
            .field(
                "github_token",
                &self.github_auth.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A URL fit for a message: its query (a presigned URL's signature) is replaced by `?…`.
fn redact_query(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_string(),
    }
}

impl RevisionFetcher for Fetcher {
    fn fetch<'a>(
        &'a self,
        revision: &'a Revision,
        dest: &'a Path,
        progress: ProgressFn<'a>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fetched, FetchError>> + Send + 'a>>
    {
        Box::pin(self.fetch_revision(revision, dest, progress))
    }
}

impl Fetcher {
    /// A fetcher; `s3` is needed only for S3 revisions. HTTP(S) honours the usual proxy
    /// variables (`HTTPS_PROXY`, `NO_PROXY`).
    pub fn new(
        s3: Option<aws_sdk_s3::Client>,
        options: FetchOptions,
    ) -> Result<Fetcher, FetchError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("pier-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout)
            .build()
            .map_err(|e| FetchError::Setup(e.to_string()))?;
        let github_auth = match &options.github_token {
            Some(token) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    FetchError::Setup(
                        "the GitHub token contains characters not allowed in an HTTP header".into(),
                    )
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(Fetcher {
            s3,
            http,
            github_api_url: options.github_api_url.trim_end_matches('/').to_string(),
            github_auth,
            backoff: options.backoff,
        })
    }

    /// Fetches `revision` to `dest` (a file path; its directory must exist), verifies its
    /// SHA-256 when the revision has one, and returns what was fetched. A local directory
    /// revision is returned in place. On a hash mismatch nothing is left at `dest`.
    async fn fetch_revision(
        &self,
        revision: &Revision,
        dest: &Path,
        progress: ProgressFn<'_>,
    ) -> Result<Fetched, FetchError> {
        let bundle_type = revision.bundle_type();
        if let Revision::Local { path, .. } = revision {
            if bundle_type == BundleType::Directory {
                let meta = tokio::fs::metadata(path)
                    .await
                    .map_err(|e| FetchError::io("read revision directory", Path::new(path), e))?;
                if !meta.is_dir() {
                    return Err(FetchError::io(
                        "read revision directory",
                        Path::new(path),
                        std::io::Error::other("not a directory"),
                    ));
                }
                return Ok(Fetched {
                    path: PathBuf::from(path),
                    sha256: None,
                    bytes: 0,
                    bundle_type,
                });
            }
        }
        let part = part_path(dest);
        let result = self
            .backoff
            .retry(
                |attempt| {
                    if attempt > 1 {
                        log::warn!(
                            "retrying fetch of {} (attempt {attempt})",
                            revision.describe()
                        );
                    }
                    self.fetch_once(revision, &part, progress)
                },
                FetchError::is_transient,
            )
            .await;
        let (bytes, actual) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
        };
        if let Some(expected) = revision.sha256() {
            if !expected.eq_ignore_ascii_case(&actual) {
                let _ = std::fs::remove_file(&part);
                return Err(FetchError::Sha256Mismatch {
                    source_desc: revision.describe(),
                    expected: expected.to_string(),
                    actual,
                });
            }
        }
        let (from, to) = (part.clone(), dest.to_path_buf());
        tokio::task::spawn_blocking(move || pier_sys::persist_path(&from, &to))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
            .map_err(|e| FetchError::io("rename into place", dest, e))?;
        Ok(Fetched {
            path: dest.to_path_buf(),
            sha256: Some(actual),
            bytes,
            bundle_type,
        })
    }

    /// One attempt: the whole bundle into `part`. Returns its size and SHA-256.
    async fn fetch_once(
        &self,
        revision: &Revision,
        part: &Path,
        progress: ProgressFn<'_>,
    ) -> Result<(u64, String), FetchError> {
        match revision {
            Revision::S3 {
                bucket,
                key,
                version_id,
                etag,
                ..
            } => {
                self.fetch_s3(
                    bucket,
                    key,
                    version_id.as_deref(),
                    etag.as_deref(),
                    part,
                    progress,
                )
                .await
            }
            Revision::Http { url, .. } => self.fetch_http(url, None, part, progress).await,
            Revision::Github {
                owner,
                repo,
                commit,
                ..
            } => {
                let url = format!(
                    "{}/repos/{owner}/{repo}/tarball/{commit}",
                    self.github_api_url
                );
                self.fetch_http(&url, self.github_auth.as_ref(), part, progress)
                    .await
            }
            Revision::Local { path, .. } => copy_local(Path::new(path), part, progress).await,
        }
    }

    async fn fetch_s3(
        &self,
        bucket: &str,
        key: &str,
        version_id: Option<&str>,
        etag: Option<&str>,
        part: &Path,
        progress: ProgressFn<'_>,
    ) -> Result<(u64, String), FetchError> {
        let location = format!("s3://{bucket}/{key}");
        let client = self.s3.as_ref().ok_or_else(|| FetchError::NoS3 {
            location: location.clone(),
        })?;
        let mut req = client.get_object().bucket(bucket).key(key);
        if let Some(v) = version_id {
            req = req.version_id(v);
        }
        let out = req.send().await.map_err(|e| FetchError::S3 {
            location: location.clone(),
            transient: pier_transport::aws::is_transient(&e),
            message: aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
        })?;
        if let Some(expected) = etag {
            let actual = out.e_tag().unwrap_or_default();
            if expected.trim_matches('"') != actual.trim_matches('"') {
                return Err(FetchError::EtagMismatch {
                    location,
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        let total = out.content_length().and_then(|l| u64::try_from(l).ok());
        let mut sink = PartFile::create(part, total, progress).await?;
        let mut body = out.body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| FetchError::S3 {
                location: location.clone(),
                message: format!("download cut off: {e}"),
                transient: true,
            })?;
            sink.push(&chunk).await?;
        }
        sink.finish().await
    }

    async fn fetch_http(
        &self,
        url: &str,
        auth: Option<&HeaderValue>,
        part: &Path,
        progress: ProgressFn<'_>,
    ) -> Result<(u64, String), FetchError> {
        let network = |e: reqwest::Error| FetchError::Network {
            url: redact_query(url),
            // without_url: the error's own URL could be a redirect target with a signature.
            reason: e.without_url().to_string(),
        };
        let mut req = self.http.get(url).header(
            USER_AGENT,
            concat!("pier-agent/", env!("CARGO_PKG_VERSION")),
        );
        if let Some(auth) = auth {
            // reqwest drops this header when GitHub redirects to another host (codeload).
            req = req
                .header(AUTHORIZATION, auth.clone())
                .header(ACCEPT, "application/vnd.github+json");
        }
        let resp = req.send().await.map_err(network)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(FetchError::Http {
                url: redact_query(url),
                status: status.as_u16(),
            });
        }
        let mut sink = PartFile::create(part, resp.content_length(), progress).await?;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            sink.push(&chunk.map_err(network)?).await?;
        }
        sink.finish().await
    }
}

/// A local archive is copied into place (hashed on the way), so the deployment keeps its own
/// bundle even if the original changes afterwards.
async fn copy_local(
    src: &Path,
    part: &Path,
    progress: ProgressFn<'_>,
) -> Result<(u64, String), FetchError> {
    let mut file = tokio::fs::File::open(src)
        .await
        .map_err(|e| FetchError::io("open revision", src, e))?;
    let total = file.metadata().await.ok().map(|m| m.len());
    let mut sink = PartFile::create(part, total, progress).await?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| FetchError::io("read revision", src, e))?;
        if n == 0 {
            break;
        }
        sink.push(&buf[..n]).await?;
    }
    sink.finish().await
}

/// The download in progress: written, hashed and reported chunk by chunk.
struct PartFile<'a> {
    path: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    done: u64,
    total: Option<u64>,
    progress: ProgressFn<'a>,
}

impl<'a> PartFile<'a> {
    async fn create(
        path: &Path,
        total: Option<u64>,
        progress: ProgressFn<'a>,
    ) -> Result<PartFile<'a>, FetchError> {
        // Truncates what an earlier attempt left: a retry starts over.
        let file = tokio::fs::File::create(path)
            .await
            .map_err(|e| FetchError::io("create", path, e))?;
        progress(FetchProgress { done: 0, total });
        Ok(PartFile {
            path: path.to_path_buf(),
            file,
            hasher: Sha256::new(),
            done: 0,
            total,
            progress,
        })
    }

    async fn push(&mut self, chunk: &[u8]) -> Result<(), FetchError> {
        self.file
            .write_all(chunk)
            .await
            .map_err(|e| FetchError::io("write", &self.path, e))?;
        self.hasher.update(chunk);
        self.done += chunk.len() as u64;
        (self.progress)(FetchProgress {
            done: self.done,
            total: self.total,
        });
        Ok(())
    }

    async fn finish(mut self) -> Result<(u64, String), FetchError> {
        self.file
            .flush()
            .await
            .and(self.file.sync_all().await)
            .map_err(|e| FetchError::io("write", &self.path, e))?;
        Ok((self.done, hex::encode(self.hasher.finalize())))
    }
}

/// `bundle.tgz` → `bundle.tgz.part`, beside it so the final rename stays on one filesystem.
fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

#[cfg(test)]
mod redact_tests {
    #[test]
    fn presigned_signatures_stay_out_of_messages() {
        assert_eq!(
            super::redact_query("https://b.s3.amazonaws.com/k.tgz?X-Amz-Signature=abc"),
            "https://b.s3.amazonaws.com/k.tgz?…"
        );
        assert_eq!(super::redact_query("https://h/k.tgz"), "https://h/k.tgz");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[tokio::test]
    async fn local_archive_is_copied_and_verified() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("b.tgz");
        std::fs::write(&src, b"bundle bytes").unwrap();
        let f = Fetcher::new(None, FetchOptions::default()).unwrap();
        let rev = Revision::Local {
            path: src.display().to_string(),
            bundle_type: BundleType::Tgz,
            sha256: Some(sha(b"bundle bytes")),
        };
        let dest = tmp.path().join("out.tgz");
        let seen = std::sync::Mutex::new(Vec::new());
        let got = f
            .fetch(&rev, &dest, &|p| seen.lock().unwrap().push(p.done))
            .await
            .unwrap();
        assert_eq!(got.bytes, 12);
        assert_eq!(std::fs::read(&dest).unwrap(), b"bundle bytes");
        assert_eq!(seen.lock().unwrap().last(), Some(&12));

        let bad = Revision::Local {
            path: src.display().to_string(),
            bundle_type: BundleType::Tgz,
            sha256: Some("0".repeat(64)),
        };
        let dest2 = tmp.path().join("bad.tgz");
        let e = f.fetch(&bad, &dest2, &|_| {}).await.unwrap_err();
        assert!(matches!(e, FetchError::Sha256Mismatch { .. }), "{e}");
        assert!(!dest2.exists() && !part_path(&dest2).exists());
    }

    #[test]
    fn token_is_not_in_debug_output() {
        let opts = FetchOptions {
            github_token: Some("ghp_secret".into()),
            ..FetchOptions::default()
        };
        assert!(!format!("{opts:?}").contains("ghp_secret"));
        let f = Fetcher::new(None, opts).unwrap();
        assert!(!format!("{f:?}").contains("ghp_secret"));
    }
}
