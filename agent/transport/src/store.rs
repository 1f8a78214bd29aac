//! The controller's shared state: small JSON objects (deployment records, group definitions,
//! registry entries) in a store that any number of controllers and agents use at once.
//!
//! An [`ObjectStore`] is S3 under a prefix ([`S3Store`]) for a fleet, or a directory
//! ([`DirStore`]) on a single host. Writes can be conditional ([`Precondition`]): create only
//! if absent (S3 `If-None-Match: *`), or replace only the version read (S3 `If-Match` on the
//! ETag). That is the whole of the controllers' coordination: two that race on one record both
//! read version A, one writes B, the other's write on A is refused as a
//! [`PutOutcome::Conflict`] and it reads again. The directory store gives the same guarantee
//! on one host with an exclusive `flock` around compare-and-rename.

use std::path::{Path, PathBuf};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ServerSideEncryption;
use sha2::{Digest, Sha256};

use super::aws::aws_error;
use super::{atomic_write, blocking, requests, BoxFuture, TransportError};

/// An object as read, with the version a conditional write must name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The object's content.
    pub bytes: Vec<u8>,
    /// Its version: the S3 ETag, or a digest of the file's content.
    pub etag: String,
}

/// What must hold for a write to happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// Write whatever is there.
    None,
    /// Write only if no object has the key.
    Absent,
    /// Write only if the object is still this version.
    Matches(String),
}

/// How a write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// Written; the new version.
    Written(String),
    /// The precondition did not hold: someone else wrote (or deleted) first. Read again.
    Conflict,
}

/// A store of small objects with conditional writes.
pub trait ObjectStore: Send + Sync {
    /// Reads `key`, `None` if absent.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Versioned>>;
    /// Writes `bytes` at `key` if `when` holds.
    fn put<'a>(
        &'a self,
        key: &'a str,
        bytes: Vec<u8>,
        when: Precondition,
    ) -> BoxFuture<'a, PutOutcome>;
    /// The keys under `prefix` (which should end in `/`), sorted; at most `limit` of them
    /// when given, starting after `after` when given (for pages).
    fn list<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: Option<usize>,
    ) -> BoxFuture<'a, Vec<String>>;
    /// Deletes `key` (no error if absent).
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()>;
    /// `s3://bucket/prefix` or the directory, for messages.
    fn describe(&self) -> String;
}

/// Objects in an S3 bucket under a prefix, written with server-side encryption.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// With a trailing `/`, or empty.
    prefix: String,
}

impl S3Store {
    /// A store in `bucket` under `prefix` (slashes around it ignored).
    pub fn new(client: aws_sdk_s3::Client, bucket: &str, prefix: &str) -> S3Store {
        let prefix = prefix.trim_matches('/');
        S3Store {
            client,
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{}{key}", self.bucket, self.prefix)
    }
}

impl ObjectStore for S3Store {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Versioned>> {
        Box::pin(async move {
            let out = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                    return Ok(None)
                }
                Err(e) => return Err(aws_error("GetObject", self.location(key), e)),
            };
            let etag = out.e_tag().unwrap_or_default().to_string();
            let bytes = out.body.collect().await.map_err(|e| TransportError::Aws {
                op: "GetObject",
                target: self.location(key),
                message: e.to_string(),
                transient: true,
            })?;
            Ok(Some(Versioned {
                bytes: bytes.into_bytes().to_vec(),
                etag,
            }))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        bytes: Vec<u8>,
        when: Precondition,
    ) -> BoxFuture<'a, PutOutcome> {
        Box::pin(async move {
            let mut req = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .content_type("application/json")
                .server_side_encryption(ServerSideEncryption::Aes256)
                .body(ByteStream::from(bytes));
            match &when {
                Precondition::None => {}
                Precondition::Absent => req = req.if_none_match("*"),
                Precondition::Matches(etag) => req = req.if_match(etag),
            }
            match req.send().await {
                Ok(out) => Ok(PutOutcome::Written(
                    out.e_tag().unwrap_or_default().to_string(),
                )),
                Err(e) => {
                    // 412 Precondition Failed; 409 ConditionalRequestConflict when two
                    // conditional writes race; 404 for If-Match on a deleted object.
                    let status = e.raw_response().map(|r| r.status().as_u16());
                    match (status, &when) {
                        (Some(412 | 409), Precondition::Absent | Precondition::Matches(_))
                        | (Some(404), Precondition::Matches(_)) => Ok(PutOutcome::Conflict),
                        _ => Err(aws_error("PutObject", self.location(key), e)),
                    }
                }
            }
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: Option<usize>,
    ) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move {
            let full = self.full(prefix);
            let mut req = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full);
            if let Some(after) = after {
                req = req.start_after(self.full(after));
            }
            // A short listing (a page of the dashboard's index) asks for no more than it
            // keeps: S3's default page is 1,000 keys.
            if let Some(l) = limit.filter(|l| *l < 1000) {
                req = req.max_keys(l.max(1) as i32);
            }
            let mut pages = req.into_paginator().send();
            let mut keys = Vec::new();
            while let Some(page) = pages.next().await {
                let page =
                    page.map_err(|e| aws_error("ListObjectsV2", self.location(prefix), e))?;
                for obj in page.contents() {
                    if let Some(k) = obj.key().and_then(|k| k.strip_prefix(&self.prefix)) {
                        keys.push(k.to_string());
                    }
                }
                if limit.is_some_and(|l| keys.len() >= l) {
                    break;
                }
            }
            keys.sort();
            if let Some(l) = limit {
                keys.truncate(l);
            }
            Ok(keys)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .send()
                .await
                .map_err(|e| aws_error("DeleteObject", self.location(key), e))?;
            Ok(())
        })
    }

    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

/// Objects as files under a directory; conditional writes are serialised by an exclusive
/// lock on `{dir}/.lock`, and a version is the SHA-256 of the content.
#[derive(Debug, Clone)]
pub struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    /// A store under `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> DirStore {
        DirStore { dir: dir.into() }
    }

    fn path(&self, key: &str) -> Result<PathBuf, TransportError> {
        // Keys are built by pier from checked ids; refuse anything that could leave the
        // directory all the same.
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(TransportError::Config(format!(
                "object key `{key}` is not a relative path of plain names"
            )));
        }
        Ok(self.dir.join(key))
    }
}

fn etag_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn read_versioned(path: &Path) -> Result<Option<Versioned>, TransportError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(Versioned {
            etag: etag_of(&bytes),
            bytes,
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TransportError::io("read", path, e)),
    }
}

impl ObjectStore for DirStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Versioned>> {
        requests::record("DirStore.Get");
        let path = self.path(key);
        Box::pin(blocking(move || read_versioned(&path?)))
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        bytes: Vec<u8>,
        when: Precondition,
    ) -> BoxFuture<'a, PutOutcome> {
        requests::record("DirStore.Put");
        let path = self.path(key);
        let dir = self.dir.clone();
        Box::pin(blocking(move || {
            let path = path?;
            std::fs::create_dir_all(&dir).map_err(|e| TransportError::io("create", &dir, e))?;
            let lock_path = dir.join(".lock");
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| TransportError::io("open", &lock_path, e))?;
            let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| TransportError::io("lock", &lock_path, e.into()))?;
            let current = read_versioned(&path)?;
            let ok = match (&when, &current) {
                (Precondition::None, _) => true,
                (Precondition::Absent, None) => true,
                (Precondition::Absent, Some(_)) => false,
                (Precondition::Matches(want), Some(cur)) => *want == cur.etag,
                (Precondition::Matches(_), None) => false,
            };
            if !ok {
                return Ok(PutOutcome::Conflict);
            }
            let etag = etag_of(&bytes);
            atomic_write(&path, &bytes)?;
            Ok(PutOutcome::Written(etag))
        }))
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: Option<usize>,
    ) -> BoxFuture<'a, Vec<String>> {
        requests::record("DirStore.List");
        let root = self.dir.clone();
        let prefix = prefix.to_string();
        let after = after.map(str::to_string);
        Box::pin(blocking(move || {
            // The prefix names a directory (`deployments/`) or a directory plus the start
            // of a name (`deployments/d-2026`); walk from the directory part.
            let (dir_part, _) = prefix.rsplit_once('/').unwrap_or(("", &prefix));
            let start = if dir_part.is_empty() {
                root.clone()
            } else {
                root.join(dir_part)
            };
            let mut keys = Vec::new();
            let mut stack = vec![start];
            while let Some(dir) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(TransportError::io("list", &dir, e)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| TransportError::io("list", &dir, e))?;
                    let path = entry.path();
                    let Ok(rel) = path.strip_prefix(&root) else {
                        continue;
                    };
                    let Some(rel) = rel.to_str() else { continue };
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    // Temp files of atomic writes and the lock are not objects.
                    if name.starts_with('.') {
                        continue;
                    }
                    let file_type = entry
                        .file_type()
                        .map_err(|e| TransportError::io("stat", &path, e))?;
                    if file_type.is_dir() {
                        stack.push(path);
                    } else if rel.starts_with(&prefix) {
                        keys.push(rel.to_string());
                    }
                }
            }
            keys.sort();
            if let Some(after) = &after {
                keys.retain(|k| k.as_str() > after.as_str());
            }
            if let Some(l) = limit {
                keys.truncate(l);
            }
            Ok(keys)
        }))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        requests::record("DirStore.Delete");
        let path = self.path(key);
        Box::pin(blocking(move || {
            let path = path?;
            match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(TransportError::io("delete", &path, e)),
            }
        }))
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}
