//! The local status sink: status records as files on this host, for the spool transport.
//!
//! Each record is `{dir}/deployments/{deployment_id}/hosts/{host_id}.json`, written
//! atomically (temp file, fsync, rename, fsync of the directory), so a reader — `pier status`
//! or a test — sees the previous record or the new one, never a torn write.

use std::path::PathBuf;

use super::{
    atomic_write, blocking, requests, status_record_path, BoxFuture, StatusSink, TransportError,
};
use pier_protocol::StatusRecord;

/// Status records under a directory.
#[derive(Debug, Clone)]
pub struct LocalStatusSink {
    dir: PathBuf,
}

impl LocalStatusSink {
    /// A sink writing under `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> LocalStatusSink {
        LocalStatusSink { dir: dir.into() }
    }

    /// Where the record of `deployment_id` on `host_id` lives.
    pub(crate) fn path(&self, deployment_id: &str, host_id: &str) -> PathBuf {
        self.dir.join(status_record_path(deployment_id, host_id))
    }
}

impl StatusSink for LocalStatusSink {
    fn write<'a>(&'a self, record: &'a StatusRecord) -> BoxFuture<'a, ()> {
        requests::record("LocalStatus.Write");
        let path = self.path(&record.deployment_id, &record.host_id);
        let bytes = record.to_json();
        Box::pin(blocking(move || atomic_write(&path, &bytes)))
    }

    fn read<'a>(
        &'a self,
        deployment_id: &'a str,
        host_id: &'a str,
    ) -> BoxFuture<'a, Option<StatusRecord>> {
        requests::record("LocalStatus.Read");
        let path = self.path(deployment_id, host_id);
        Box::pin(blocking(move || {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(TransportError::io("read", &path, e)),
            };
            StatusRecord::from_json(&bytes)
                .map(Some)
                .map_err(|e| TransportError::Corrupt {
                    location: path.display().to_string(),
                    reason: e.to_string(),
                })
        }))
    }

    fn list_hosts<'a>(&'a self, deployment_id: &'a str) -> BoxFuture<'a, Vec<String>> {
        requests::record("LocalStatus.ListHosts");
        let dir = self
            .dir
            .join("deployments")
            .join(deployment_id)
            .join("hosts");
        Box::pin(blocking(move || {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(TransportError::io("list", &dir, e)),
            };
            let mut hosts = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| TransportError::io("list", &dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                if let Some(host) = name.strip_suffix(".json") {
                    hosts.push(host.to_string());
                }
            }
            hosts.sort();
            Ok(hosts)
        }))
    }
}
