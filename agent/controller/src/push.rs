//! `pier push`: archive a directory into a revision bundle and upload it.
//!
//! The archive (tgz by default, or tar or zip) holds the directory's entries in byte order of
//! their paths, with fixed timestamps and owners, so the same tree always gives the same
//! SHA-256; symlinks stay symlinks and `.git` is left out. Its SHA-256, the git commit of the
//! directory (when it is a checkout: its SHA, its committer time for lead time, and whether
//! there were uncommitted changes) and the application name are
//! recorded with it: as S3 object metadata, written with server-side encryption (AES256
//! unless told otherwise), or for a local location in a `PATH.pier.json` sidecar. The result
//! is a [`RevisionInfo`], printed as JSON for scripts and read back by `pier deploy`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ServerSideEncryption};
use sha2::{Digest, Sha256};

use chrono::{DateTime, Utc};

use super::revision::{
    sidecar_path, RevisionInfo, META_APPLICATION, META_BUNDLE_TYPE, META_COMMIT, META_COMMIT_TIME,
    META_DIRTY, META_SHA256,
};
use super::{parse_s3_url, progress_bar, AwsOptions, ControllerError};
use pier_protocol::{BundleType, Revision};

/// Archives up to this size go up in one PutObject; larger ones as a multipart upload in
/// parts of this size, so a progress bar moves and no request carries gigabytes.
const PART_SIZE: usize = 16 * 1024 * 1024;

/// What `pier push` was asked to do, as given on the command line (checked by [`push`]).
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// `--application`: recorded with the revision.
    pub application: String,
    /// `--source`: the directory to archive.
    pub source: PathBuf,
    /// `--s3-location s3://BUCKET/KEY`.
    pub s3_location: Option<String>,
    /// `--local-location PATH`: write the archive here instead of S3.
    pub local_location: Option<PathBuf>,
    /// `--bundle-type`: `tgz` (default), `tar` or `zip`.
    pub bundle_type: Option<String>,
    /// `--sse`: `AES256` (default) or `aws:kms`.
    pub sse: Option<String>,
    /// `--sse-kms-key-id`: the KMS key for `aws:kms`.
    pub sse_kms_key_id: Option<String>,
    /// How to reach S3.
    pub aws: AwsOptions,
}

/// The outcome of a push.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The revision, ready for `pier deploy`.
    pub info: RevisionInfo,
    /// The archive's size in bytes.
    pub size: u64,
}

enum Destination {
    S3 { bucket: String, key: String },
    Local(PathBuf),
}

/// Archives `opts.source` and uploads (or writes) it; see the module documentation.
pub async fn push(opts: &PushOptions) -> Result<Pushed, ControllerError> {
    if opts.application.trim().is_empty() {
        return Err(ControllerError::usage("--application", "must not be empty"));
    }
    let dest = match (&opts.s3_location, &opts.local_location) {
        (Some(url), None) => {
            let (bucket, key, version) = parse_s3_url("--s3-location", url)?;
            if version.is_some() {
                return Err(ControllerError::usage(
                    "--s3-location",
                    "a push creates a version; drop ?versionId from the location",
                ));
            }
            Destination::S3 { bucket, key }
        }
        (None, Some(path)) => Destination::Local(super::absolute(path)?),
        _ => {
            return Err(ControllerError::usage(
                "--s3-location/--local-location",
                "give exactly one of them",
            ))
        }
    };
    let bundle_type = match opts.bundle_type.as_deref() {
        None => BundleType::Tgz,
        Some(s) => match super::revision::parse_bundle_type("--bundle-type", s)? {
            BundleType::Directory => {
                return Err(ControllerError::usage(
                    "--bundle-type",
                    "push makes an archive; use tgz, tar or zip",
                ))
            }
            t => t,
        },
    };
    let sse = match (opts.sse.as_deref(), &opts.sse_kms_key_id) {
        (None | Some("AES256"), None) => ServerSideEncryption::Aes256,
        (None | Some("aws:kms"), Some(_)) | (Some("aws:kms"), None) => ServerSideEncryption::AwsKms,
        (Some("AES256"), Some(_)) => {
            return Err(ControllerError::usage(
                "--sse-kms-key-id",
                "only applies with --sse aws:kms",
            ))
        }
        (Some(other), _) => {
            return Err(ControllerError::usage(
                "--sse",
                format!("`{other}` is not AES256 or aws:kms"),
            ))
        }
    };
    let source = super::absolute(&opts.source)?;
    let meta = std::fs::metadata(&source).map_err(|e| ControllerError::io("open", &source, e))?;
    if !meta.is_dir() {
        return Err(ControllerError::usage(
            "--source",
            format!("{} is not a directory", source.display()),
        ));
    }

    let GitCommit {
        sha: commit,
        time: commit_time,
        dirty,
    } = git_commit(&source).await;
    // The archive is built beside a local destination (renamed into place once whole), or in
    // the temp directory on its way to S3.
    let (tmp_dir, skip) = match &dest {
        Destination::Local(path) => {
            let parent = path.parent().unwrap_or(Path::new("/")).to_path_buf();
            std::fs::create_dir_all(&parent)
                .map_err(|e| ControllerError::io("create directory", &parent, e))?;
            (parent, vec![path.clone(), sidecar_path(path)])
        }
        Destination::S3 { .. } => (std::env::temp_dir(), Vec::new()),
    };
    let archive = {
        let source = source.clone();
        tokio::task::spawn_blocking(move || build_archive(&source, &tmp_dir, bundle_type, &skip))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?
    };
    let (sha256, size) = hash_file(archive.path())?;

    let mut info = RevisionInfo {
        revision: Revision::Local {
            path: String::new(),
            bundle_type,
            sha256: Some(sha256.clone()),
        },
        commit,
        commit_time,
        dirty,
        application: Some(opts.application.clone()),
    };
    match dest {
        Destination::Local(path) => {
            info.revision = Revision::Local {
                path: path.display().to_string(),
                bundle_type,
                sha256: Some(sha256),
            };
            // The sidecar first: an archive without its sidecar cannot be deployed, while a
            // sidecar that names an older archive is caught by the host's sha256 check.
            let sidecar = sidecar_path(&path);
            pier_sys::atomic_write(&sidecar, format!("{}\n", info.to_json()).as_bytes())
                .map_err(|e| ControllerError::io("write the sidecar", &sidecar, e))?;
            pier_sys::persist(archive, &path)
                .map_err(|e| ControllerError::io("rename into place", &path, e))?;
        }
        Destination::S3 { bucket, key } => {
            let mut metadata = vec![
                (META_SHA256, sha256.clone()),
                (META_APPLICATION, opts.application.clone()),
                (META_BUNDLE_TYPE, bundle_type.to_string()),
            ];
            if let Some(c) = &info.commit {
                metadata.push((META_COMMIT, c.clone()));
                metadata.push((META_DIRTY, info.dirty.to_string()));
            }
            if let Some(t) = &info.commit_time {
                metadata.push((META_COMMIT_TIME, t.to_rfc3339()));
            }
            let clients = opts.aws.clients().await?;
            let upload = Upload {
                client: &clients.s3,
                bucket: &bucket,
                key: &key,
                sse,
                kms_key: opts.sse_kms_key_id.as_deref(),
                metadata: &metadata,
            };
            let (etag, version_id) = upload.run(archive.path(), size).await?;
            info.revision = Revision::S3 {
                bucket,
                key,
                version_id,
                etag,
                bundle_type,
                sha256,
            };
        }
    }
    Ok(Pushed { info, size })
}

/// How long one `git` call may take before push gives up on the commit SHA (a hung
/// filesystem or a lock must not hang a pipeline).
const GIT_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// What git says about the checkout a revision is pushed from.
#[derive(Debug, Default)]
struct GitCommit {
    /// `HEAD`'s SHA.
    sha: Option<String>,
    /// `HEAD`'s committer time (`%cI`): when the change entered the branch, which is where
    /// lead time for changes starts (the author time survives rebases and would overstate it).
    time: Option<DateTime<Utc>>,
    /// Uncommitted changes under the directory.
    dirty: bool,
}

/// The commit of `dir`'s checkout; all empty when it is not a git checkout or git is not
/// installed, or does not answer within [`GIT_TIME_LIMIT`] (then it is killed and a warning
/// says so).
async fn git_commit(dir: &Path) -> GitCommit {
    let git = |args: &'static [&'static str]| async move {
        let run = tokio::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(GIT_TIME_LIMIT, run).await {
            Ok(out) => out,
            Err(_) => {
                eprintln!(
                    "pier: warning: `git {}` in {} did not finish within {}s; it was stopped",
                    args.join(" "),
                    dir.display(),
                    GIT_TIME_LIMIT.as_secs()
                );
                Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
            }
        }
    };
    let Ok(out) = git(&["rev-parse", "--verify", "--quiet", "HEAD"]).await else {
        return GitCommit::default();
    };
    let sha = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || sha.is_empty() {
        return GitCommit::default();
    }
    // Without a time the revision still deploys; lead time then counts it as unknown.
    let time = match git(&["show", "-s", "--format=%cI", "HEAD"]).await {
        Ok(o) if o.status.success() => {
            DateTime::parse_from_rfc3339(String::from_utf8_lossy(&o.stdout).trim())
                .ok()
                .map(|t| t.with_timezone(&Utc))
        }
        _ => None,
    };
    // Only changes under DIR count: the archive holds nothing else.
    let dirty = match git(&["status", "--porcelain", "--", "."]).await {
        Ok(o) => !o.status.success() || !o.stdout.is_empty(),
        Err(_) => true,
    };
    GitCommit {
        sha: Some(sha),
        time,
        dirty,
    }
}

/// One entry of the source directory, relative to it.
struct Entry {
    rel: PathBuf,
    full: PathBuf,
    kind: Kind,
}

enum Kind {
    Dir,
    File,
    Symlink,
}

/// Every entry under `root` except `.git` and the paths in `skip`, parents before children,
/// siblings in byte order of their names (so the archive does not depend on directory order).
fn collect(root: &Path, skip: &[PathBuf]) -> Result<Vec<Entry>, ControllerError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| ControllerError::io("list", &dir, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| ControllerError::io("list", &dir, e))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            if name == ".git" {
                continue;
            }
            let full = dir.join(&name);
            if skip.contains(&full) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&full)
                .map_err(|e| ControllerError::io("stat", &full, e))?;
            let ft = meta.file_type();
            let kind = if ft.is_symlink() {
                Kind::Symlink
            } else if ft.is_dir() {
                Kind::Dir
            } else if ft.is_file() {
                Kind::File
            } else {
                return Err(ControllerError::Archive {
                    path: full,
                    reason: "is a device, FIFO or socket, which no bundle may hold; remove it \
                             from the source directory"
                        .into(),
                });
            };
            let rel = rel.join(&name);
            if matches!(kind, Kind::Dir) {
                subdirs.push(rel.clone());
            }
            out.push(Entry { rel, full, kind });
        }
        stack.extend(subdirs);
    }
    // The walk's order does not matter: paths compare component by component, so this sort
    // puts each directory right before its contents, in one canonical order.
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// Writes the archive of `source` into a temp file in `tmp_dir`.
fn build_archive(
    source: &Path,
    tmp_dir: &Path,
    bundle_type: BundleType,
    skip: &[PathBuf],
) -> Result<tempfile::NamedTempFile, ControllerError> {
    let entries = collect(source, skip)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".pier-push-")
        .suffix(".tmp")
        .tempfile_in(tmp_dir)
        .map_err(|e| ControllerError::io("create a temp file in", tmp_dir, e))?;
    let bar = progress_bar(entries.len() as u64, "archive", false);
    let tmp_path = tmp.path().to_path_buf();
    let file = tmp.as_file_mut();
    let write_err = |e: std::io::Error| ControllerError::io("write", &tmp_path, e);
    match bundle_type {
        BundleType::Tgz => {
            let gz = flate2::write::GzEncoder::new(
                std::io::BufWriter::new(file),
                flate2::Compression::default(),
            );
            let gz = write_tar(gz, &entries, &bar)?;
            gz.finish().and_then(|mut w| w.flush()).map_err(write_err)?;
        }
        BundleType::Tar => {
            let mut w = write_tar(std::io::BufWriter::new(file), &entries, &bar)?;
            w.flush().map_err(write_err)?;
        }
        BundleType::Zip => write_zip(file, &entries, &bar, &tmp_path)?,
        BundleType::Directory => unreachable!("push refuses the directory type"),
    }
    bar.finish_and_clear();
    tmp.as_file().sync_all().map_err(write_err)?;
    Ok(tmp)
}

fn write_tar<W: Write>(
    w: W,
    entries: &[Entry],
    bar: &indicatif::ProgressBar,
) -> Result<W, ControllerError> {
    let mut tar = tar::Builder::new(w);
    // Fixed mtime and owner: the same tree gives the same bytes. Owners are the AppSpec's
    // `permissions` business on the host, not the build machine's.
    tar.mode(tar::HeaderMode::Deterministic);
    tar.follow_symlinks(false);
    for e in entries {
        tar.append_path_with_name(&e.full, &e.rel)
            .map_err(|err| ControllerError::Archive {
                path: e.full.clone(),
                reason: format!("{err}; check that it is readable"),
            })?;
        bar.inc(1);
    }
    tar.into_inner().map_err(|err| ControllerError::Archive {
        path: PathBuf::from("(archive end)"),
        reason: err.to_string(),
    })
}

fn write_zip(
    file: &mut std::fs::File,
    entries: &[Entry],
    bar: &indicatif::ProgressBar,
    tmp_path: &Path,
) -> Result<(), ControllerError> {
    use std::os::unix::fs::PermissionsExt;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let zip_err = |path: &Path, err: zip::result::ZipError| ControllerError::Archive {
        path: path.to_path_buf(),
        reason: err.to_string(),
    };
    for e in entries {
        let name = e.rel.to_string_lossy().into_owned();
        let mode = std::fs::symlink_metadata(&e.full)
            .map_err(|err| ControllerError::io("stat", &e.full, err))?
            .permissions()
            .mode()
            & 0o7777;
        // The zip epoch (1980-01-01) as every entry's time, for the same reason as tar's.
        let opts = zip::write::SimpleFileOptions::default()
            .last_modified_time(zip::DateTime::default())
            .unix_permissions(mode)
            .large_file(true);
        match e.kind {
            Kind::Dir => zip
                .add_directory(format!("{name}/"), opts)
                .map_err(|err| zip_err(&e.full, err))?,
            Kind::Symlink => {
                let target = std::fs::read_link(&e.full)
                    .map_err(|err| ControllerError::io("read link", &e.full, err))?;
                zip.add_symlink(name, target.to_string_lossy(), opts)
                    .map_err(|err| zip_err(&e.full, err))?
            }
            Kind::File => {
                zip.start_file(name, opts)
                    .map_err(|err| zip_err(&e.full, err))?;
                let mut f = std::fs::File::open(&e.full)
                    .map_err(|err| ControllerError::io("open", &e.full, err))?;
                std::io::copy(&mut f, &mut zip)
                    .map_err(|err| ControllerError::io("archive", &e.full, err))?;
            }
        }
        bar.inc(1);
    }
    zip.finish()
        .map_err(|err| zip_err(tmp_path, err))?
        .flush()
        .map_err(|err| ControllerError::io("write", tmp_path, err))
}

/// The lowercase hex SHA-256 and size of a file.
fn hash_file(path: &Path) -> Result<(String, u64), ControllerError> {
    let mut f = std::fs::File::open(path).map_err(|e| ControllerError::io("open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| ControllerError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// One archive's way into S3.
struct Upload<'a> {
    client: &'a aws_sdk_s3::Client,
    bucket: &'a str,
    key: &'a str,
    sse: ServerSideEncryption,
    kms_key: Option<&'a str>,
    metadata: &'a [(&'static str, String)],
}

impl Upload<'_> {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    fn s3_err<E>(&self, op: &'static str, e: aws_sdk_s3::error::SdkError<E>) -> ControllerError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        ControllerError::S3 {
            op,
            location: self.location(),
            message: aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
            transient: pier_transport::aws::is_transient(&e),
        }
    }

    /// Uploads `path` (`size` bytes); returns the object's ETag and version id.
    async fn run(
        &self,
        path: &Path,
        size: u64,
    ) -> Result<(Option<String>, Option<String>), ControllerError> {
        let bar = progress_bar(size, "upload", true);
        let out = if size <= PART_SIZE as u64 {
            let body = ByteStream::from_path(path)
                .await
                .map_err(|e| ControllerError::Archive {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            let mut req = self
                .client
                .put_object()
                .bucket(self.bucket)
                .key(self.key)
                .body(body)
                .server_side_encryption(self.sse.clone())
                .set_ssekms_key_id(self.kms_key.map(str::to_string));
            for (k, v) in self.metadata {
                req = req.metadata(*k, v);
            }
            let out = req.send().await.map_err(|e| self.s3_err("PutObject", e))?;
            bar.inc(size);
            (
                out.e_tag().map(str::to_string),
                out.version_id().map(str::to_string),
            )
        } else {
            self.multipart(path, &bar).await?
        };
        bar.finish_and_clear();
        Ok(out)
    }

    async fn multipart(
        &self,
        path: &Path,
        bar: &indicatif::ProgressBar,
    ) -> Result<(Option<String>, Option<String>), ControllerError> {
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(self.bucket)
            .key(self.key)
            .server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.kms_key.map(str::to_string));
        for (k, v) in self.metadata {
            req = req.metadata(*k, v);
        }
        let created = req
            .send()
            .await
            .map_err(|e| self.s3_err("CreateMultipartUpload", e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let result = self.parts(path, &upload_id, bar).await;
        if result.is_err() {
            // Parts of an abandoned upload are billed until aborted.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(self.bucket)
                .key(self.key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    async fn parts(
        &self,
        path: &Path,
        upload_id: &str,
        bar: &indicatif::ProgressBar,
    ) -> Result<(Option<String>, Option<String>), ControllerError> {
        use tokio::io::AsyncReadExt;
        let mut f = tokio::fs::File::open(path)
            .await
            .map_err(|e| ControllerError::io("open", path, e))?;
        let mut parts = Vec::new();
        for number in 1.. {
            let mut buf = Vec::with_capacity(PART_SIZE);
            let mut chunk = (&mut f).take(PART_SIZE as u64);
            chunk
                .read_to_end(&mut buf)
                .await
                .map_err(|e| ControllerError::io("read", path, e))?;
            if buf.is_empty() {
                break;
            }
            let len = buf.len() as u64;
            let out = self
                .client
                .upload_part()
                .bucket(self.bucket)
                .key(self.key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(buf))
                .send()
                .await
                .map_err(|e| self.s3_err("UploadPart", e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .build(),
            );
            bar.inc(len);
        }
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(self.bucket)
            .key(self.key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.s3_err("CompleteMultipartUpload", e))?;
        Ok((
            out.e_tag().map(str::to_string),
            out.version_id().map(str::to_string),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("b/c")).unwrap();
        std::fs::create_dir_all(p.join(".git/objects")).unwrap();
        std::fs::write(p.join(".git/HEAD"), "ref").unwrap();
        std::fs::write(p.join("b/c/z.txt"), "z").unwrap();
        std::fs::write(p.join("a.txt"), "a").unwrap();
        std::fs::write(p.join("b.txt"), "b").unwrap();
        std::os::unix::fs::symlink("a.txt", p.join("link")).unwrap();
        d
    }

    #[tokio::test]
    async fn git_commit_gives_the_committer_time() {
        let d = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(d.path())
                .args(args)
                .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00+00:00")
                .env("GIT_COMMITTER_DATE", "2026-03-04T05:06:07+02:00")
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {out:?}");
        };
        git(&["init", "-q"]);
        std::fs::write(d.path().join("a.txt"), "a").unwrap();
        git(&["add", "a.txt"]);
        git(&[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "commit",
            "-qm",
            "a",
        ]);
        let c = git_commit(d.path()).await;
        assert_eq!(c.sha.as_ref().map(String::len), Some(40));
        // The committer's, not the author's, and in UTC.
        assert_eq!(
            c.time,
            Some("2026-03-04T03:06:07Z".parse::<DateTime<Utc>>().unwrap())
        );
        assert!(!c.dirty);
        let none = git_commit(tempfile::tempdir().unwrap().path()).await;
        assert_eq!((none.sha, none.time), (None, None));
    }

    #[test]
    fn collects_in_path_order_without_git() {
        let d = tree();
        let names: Vec<String> = collect(d.path(), &[])
            .unwrap()
            .iter()
            .map(|e| e.rel.display().to_string())
            .collect();
        assert_eq!(names, ["a.txt", "b", "b/c", "b/c/z.txt", "b.txt", "link"]);
    }

    #[test]
    fn same_tree_same_bytes_and_symlinks_kept() {
        let d = tree();
        let out = tempfile::tempdir().unwrap();
        for t in [BundleType::Tgz, BundleType::Tar, BundleType::Zip] {
            let a = build_archive(d.path(), out.path(), t, &[]).unwrap();
            let b = build_archive(d.path(), out.path(), t, &[]).unwrap();
            assert_eq!(
                hash_file(a.path()).unwrap(),
                hash_file(b.path()).unwrap(),
                "{t:?}"
            );
        }
        let tar_file = build_archive(d.path(), out.path(), BundleType::Tar, &[]).unwrap();
        let mut ar = tar::Archive::new(std::fs::File::open(tar_file.path()).unwrap());
        let link = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path().unwrap().to_str() == Some("link"))
            .unwrap();
        assert!(link.header().entry_type().is_symlink());
        assert_eq!(link.link_name().unwrap().unwrap().to_str(), Some("a.txt"));
    }
}
