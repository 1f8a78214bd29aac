//! What the controller knows about a revision beyond where it is: its SHA-256, the git commit
//! it was built from, and the application it belongs to. `pier push` records these (S3
//! object metadata, or a `PATH.pier.json` sidecar beside a local archive) and prints them as a
//! [`RevisionInfo`]; `pier deploy` finds them again from an `s3://` URL (HeadObject), a local
//! path (its sidecar) or `@FILE` (the JSON `push` printed), so that every command it sends
//! carries a sha256 the host verifies before unpacking.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{parse_s3_url, AwsOptions, ControllerError};
use pier_protocol::{BundleType, Revision};

/// S3 metadata key (`x-amz-meta-sha256`) holding the archive's lowercase hex SHA-256.
pub(crate) const META_SHA256: &str = "sha256";
/// S3 metadata key holding the git commit SHA of the pushed directory.
pub(crate) const META_COMMIT: &str = "commit";
/// S3 metadata key holding the commit's committer time (RFC 3339), for lead time (DORA).
pub(crate) const META_COMMIT_TIME: &str = "commit-time";
/// S3 metadata key, `true` when the checkout had uncommitted changes at push time.
pub(crate) const META_DIRTY: &str = "commit-dirty";
/// S3 metadata key holding the application name given to `pier push`.
pub(crate) const META_APPLICATION: &str = "application";
/// S3 metadata key holding the archive format (`tgz`, `tar`, `zip`).
pub(crate) const META_BUNDLE_TYPE: &str = "bundle-type";

/// A revision as `pier push` prints it and `pier deploy --revision @FILE` reads it: the
/// protocol's [`Revision`] (flattened, so its `type`, location, `bundle_type` and `sha256`
/// are top-level keys) plus what the controller records about where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionInfo {
    /// Where the bundle is, its format and its SHA-256.
    #[serde(flatten)]
    pub(crate) revision: Revision,
    /// The git commit SHA of the pushed directory, when it was a git checkout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) commit: Option<String>,
    /// When that commit was made (its committer time), the start of lead time for changes.
    /// Absent in revisions pushed before it was recorded, and outside a git checkout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) commit_time: Option<DateTime<Utc>>,
    /// Whether that checkout had uncommitted changes (the bundle is then not exactly
    /// `commit`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) dirty: bool,
    /// The application the revision was pushed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) application: Option<String>,
}

impl RevisionInfo {
    /// The revision as pretty JSON (what `push` prints and the sidecar holds).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a revision always serialises")
    }
}

/// A revision for humans: where it is, its format, a short sha256 and its commit, e.g.
/// `s3://revs/web.tgz (tgz, sha256 1f2e3d4c5b6a, commit 0a1b2c3d4e5f, dirty)`.
pub fn describe(info: &RevisionInfo) -> String {
    let mut s = info.revision.describe();
    let kind = info.revision.bundle_type();
    s.push_str(&format!(" ({kind}"));
    if let Some(sha) = info.revision.sha256() {
        s.push_str(&format!(", sha256 {}", &sha[..sha.len().min(12)]));
    }
    if let Some(c) = &info.commit {
        s.push_str(&format!(", commit {}", &c[..c.len().min(12)]));
        if info.dirty {
            s.push_str(", dirty");
        }
    }
    s.push(')');
    s
}

/// The sidecar of a local archive: `PATH.pier.json`.
pub(crate) fn sidecar_path(archive: &Path) -> PathBuf {
    let mut s = archive.as_os_str().to_owned();
    s.push(".pier.json");
    PathBuf::from(s)
}

/// Parses a bundle type word (`tgz`, `tar`, `zip`, `directory`) given to `flag`.
pub fn parse_bundle_type(flag: &str, s: &str) -> Result<BundleType, ControllerError> {
    s.parse::<BundleType>()
        .map_err(|e| ControllerError::usage(flag, e.to_string()))
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

/// What `pier deploy` was told about the revision on top of `--revision`.
#[derive(Debug, Clone, Default)]
pub struct RevisionOverrides {
    /// `--sha256`: the archive's SHA-256 when nothing recorded it (or to insist on one).
    pub sha256: Option<String>,
    /// `--bundle-type`: the archive format when neither metadata nor the name says.
    pub bundle_type: Option<BundleType>,
}

/// Resolves `--revision` (`s3://BUCKET/KEY[?versionId=V]`, `@FILE`, an `http(s)://` URL, or
/// a local path) into a [`RevisionInfo`] whose SHA-256 is known. Refuses a revision with no
/// recorded SHA-256 unless `--sha256` gives one, and a `--sha256` that contradicts the
/// recorded one (every host would refuse the bundle). A local directory needs no SHA-256:
/// there is no archive to verify.
pub(crate) async fn resolve(
    spec: &str,
    overrides: &RevisionOverrides,
    aws: &AwsOptions,
) -> Result<RevisionInfo, ControllerError> {
    if let Some(s) = &overrides.sha256 {
        if !is_sha256(s) {
            return Err(ControllerError::usage(
                "--sha256",
                format!("`{s}` is not 64 lowercase hex digits"),
            ));
        }
    }
    let mut info = if let Some(file) = spec.strip_prefix('@') {
        from_file(Path::new(file))?
    } else if spec.starts_with("s3://") {
        from_s3(spec, overrides, aws).await?
    } else if spec.starts_with("http://") || spec.starts_with("https://") {
        from_http(spec, overrides)?
    } else {
        from_local(Path::new(spec), overrides)?
    };
    let recorded = info.revision.sha256().map(str::to_string);
    match (&recorded, &overrides.sha256) {
        (Some(r), Some(o)) if r != o => {
            return Err(ControllerError::Revision {
                revision: spec.to_string(),
                message: format!(
                    "--sha256 {o} contradicts the recorded sha256 {r}; push the revision \
                     again or drop --sha256"
                ),
            })
        }
        (None, Some(o)) => set_sha256(&mut info.revision, o.clone()),
        _ => {}
    }
    let needs_sha = !matches!(
        info.revision,
        Revision::Local {
            bundle_type: BundleType::Directory,
            ..
        } | Revision::Github { .. }
    );
    if needs_sha && info.revision.sha256().is_none() {
        return Err(ControllerError::Revision {
            revision: spec.to_string(),
            message: "no sha256 is recorded for it, so hosts could not verify the bundle; \
                      upload it with `pier push`, or pass --sha256 HEX"
                .to_string(),
        });
    }
    Ok(info)
}

fn set_sha256(revision: &mut Revision, value: String) {
    match revision {
        Revision::S3 { sha256, .. } | Revision::Http { sha256, .. } => *sha256 = value,
        Revision::Github { sha256, .. } | Revision::Local { sha256, .. } => *sha256 = Some(value),
    }
}

fn from_file(path: &Path) -> Result<RevisionInfo, ControllerError> {
    let text = std::fs::read(path).map_err(|e| ControllerError::io("read", path, e))?;
    serde_json::from_slice(&text).map_err(|e| ControllerError::Revision {
        revision: format!("@{}", path.display()),
        message: format!(
            "is not a revision JSON as `pier push` prints it ({e}); capture push's stdout \
             into the file"
        ),
    })
}

fn from_http(url: &str, overrides: &RevisionOverrides) -> Result<RevisionInfo, ControllerError> {
    let bundle_type = overrides
        .bundle_type
        .or_else(|| BundleType::from_file_name(url.split(['?', '#']).next().unwrap_or(url)))
        .ok_or_else(|| ControllerError::Revision {
            revision: url.to_string(),
            message: "its name does not say the archive format; pass --bundle-type".into(),
        })?;
    let sha256 = overrides
        .sha256
        .clone()
        .ok_or_else(|| ControllerError::Revision {
            revision: url.to_string(),
            message: "an HTTP revision has no recorded sha256; pass --sha256 HEX".into(),
        })?;
    Ok(RevisionInfo {
        revision: Revision::Http {
            url: url.to_string(),
            bundle_type,
            sha256,
        },
        commit: None,
        commit_time: None,
        dirty: false,
        application: None,
    })
}

fn from_local(path: &Path, overrides: &RevisionOverrides) -> Result<RevisionInfo, ControllerError> {
    let abs = super::absolute(path)?;
    let sidecar = sidecar_path(&abs);
    match std::fs::read(&sidecar) {
        Ok(bytes) => {
            let mut info: RevisionInfo =
                serde_json::from_slice(&bytes).map_err(|e| ControllerError::Revision {
                    revision: path.display().to_string(),
                    message: format!(
                        "its sidecar {} is unreadable ({e}); push the revision again",
                        sidecar.display()
                    ),
                })?;
            // The sidecar was written by push for this very file; the path the host gets is
            // the one asked for now, in case the pair was moved together.
            if let Revision::Local { path: p, .. } = &mut info.revision {
                *p = abs.display().to_string();
            }
            return Ok(info);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ControllerError::io("read", &sidecar, e)),
    }
    let is_dir = abs.is_dir();
    let bundle_type = if is_dir {
        BundleType::Directory
    } else {
        overrides
            .bundle_type
            .or_else(|| BundleType::from_file_name(&abs.to_string_lossy()))
            .ok_or_else(|| ControllerError::Revision {
                revision: path.display().to_string(),
                message: "its name does not say the archive format; pass --bundle-type".into(),
            })?
    };
    Ok(RevisionInfo {
        revision: Revision::Local {
            path: abs.display().to_string(),
            bundle_type,
            sha256: None,
        },
        commit: None,
        commit_time: None,
        dirty: false,
        application: None,
    })
}

async fn from_s3(
    url: &str,
    overrides: &RevisionOverrides,
    aws: &AwsOptions,
) -> Result<RevisionInfo, ControllerError> {
    let (bucket, key, version_id) = parse_s3_url("--revision", url)?;
    let clients = aws.clients().await?;
    let head = clients
        .s3
        .head_object()
        .bucket(&bucket)
        .key(&key)
        .set_version_id(version_id.clone())
        .send()
        .await
        .map_err(|e| ControllerError::S3 {
            op: "HeadObject",
            location: format!("s3://{bucket}/{key}"),
            message: aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
            transient: pier_transport::aws::is_transient(&e),
        })?;
    let meta = head.metadata().cloned().unwrap_or_default();
    let bundle_type = match overrides.bundle_type {
        Some(t) => t,
        None => match meta.get(META_BUNDLE_TYPE) {
            Some(t) => parse_bundle_type("bundle-type metadata", t)?,
            None => BundleType::from_file_name(&key).ok_or_else(|| ControllerError::Revision {
                revision: url.to_string(),
                message: "neither its metadata nor its key says the archive format; pass \
                          --bundle-type"
                    .into(),
            })?,
        },
    };
    let sha256 = meta
        .get(META_SHA256)
        .cloned()
        .or_else(|| overrides.sha256.clone())
        .ok_or_else(|| ControllerError::Revision {
            revision: url.to_string(),
            message: "the object has no sha256 metadata, so hosts could not verify it; \
                      upload it with `pier push`, or pass --sha256 HEX"
                .into(),
        })?;
    Ok(RevisionInfo {
        revision: Revision::S3 {
            bucket,
            key,
            version_id: version_id.or_else(|| head.version_id().map(str::to_string)),
            etag: head.e_tag().map(str::to_string),
            bundle_type,
            sha256,
        },
        commit: meta.get(META_COMMIT).cloned(),
        // A malformed time is dropped, not fatal: it only feeds the metrics.
        commit_time: meta
            .get(META_COMMIT_TIME)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc)),
        dirty: meta.get(META_DIRTY).is_some_and(|v| v == "true"),
        application: meta.get(META_APPLICATION).cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_info_json_round_trips_with_the_protocol_fields_on_top() {
        let info = RevisionInfo {
            revision: Revision::S3 {
                bucket: "b".into(),
                key: "k.tgz".into(),
                version_id: None,
                etag: Some("\"e\"".into()),
                bundle_type: BundleType::Tgz,
                sha256: "a".repeat(64),
            },
            commit: Some("c0ffee".into()),
            commit_time: Some("2026-03-01T10:00:00Z".parse().unwrap()),
            dirty: true,
            application: Some("web".into()),
        };
        let json = info.to_json();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["type"], "s3");
        assert_eq!(v["sha256"], "a".repeat(64));
        assert_eq!(v["commit"], "c0ffee");
        assert_eq!(v["commit_time"], "2026-03-01T10:00:00Z");
        assert_eq!(serde_json::from_str::<RevisionInfo>(&json).unwrap(), info);
    }

    #[test]
    fn revision_json_from_before_commit_times_still_reads() {
        let old = r#"{"type":"local","path":"/r.tgz","bundle_type":"tgz","commit":"c0ffee"}"#;
        let info: RevisionInfo = serde_json::from_str(old).unwrap();
        assert_eq!(info.commit.as_deref(), Some("c0ffee"));
        assert_eq!(info.commit_time, None);
        assert!(!info.to_json().contains("commit_time"));
    }

    #[test]
    fn names_give_bundle_types() {
        assert_eq!(
            BundleType::from_file_name("a/B.TAR.GZ"),
            Some(BundleType::Tgz)
        );
        assert_eq!(BundleType::from_file_name("x.tar"), Some(BundleType::Tar));
        assert_eq!(BundleType::from_file_name("x.zip"), Some(BundleType::Zip));
        assert_eq!(BundleType::from_file_name("x.bin"), None);
    }

    #[tokio::test]
    async fn local_archive_without_sidecar_needs_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("r.tgz");
        std::fs::write(&archive, b"x").unwrap();
        let spec = archive.to_str().unwrap();
        let aws = AwsOptions::default();
        let e = resolve(spec, &RevisionOverrides::default(), &aws)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("--sha256"), "{e}");
        let o = RevisionOverrides {
            sha256: Some("b".repeat(64)),
            bundle_type: None,
        };
        let info = resolve(spec, &o, &aws).await.unwrap();
        assert_eq!(info.revision.sha256(), Some("b".repeat(64).as_str()));
        let bad = RevisionOverrides {
            sha256: Some("B".repeat(64)),
            bundle_type: None,
        };
        let e = resolve(spec, &bad, &aws).await.unwrap_err();
        assert!(e.to_string().starts_with("--sha256:"), "{e}");
    }
}
