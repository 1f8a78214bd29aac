//! The S3 status sink: one object per deployment and host,
//! `{prefix}/deployments/{deployment_id}/hosts/{host_id}.json`, rewritten at each event.
//!
//! S3 is durable once PutObject returns, so a controller that was offline during the
//! deployment still finds every host's last record; listing the `hosts/` prefix tells it
//! which hosts have reported. Objects are written with server-side encryption (AES256).

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ServerSideEncryption;

use super::aws::aws_error;
use super::{status_record_path, BoxFuture, StatusSink, TransportError};
use pier_protocol::StatusRecord;

/// Status records in an S3 bucket under a prefix.
#[derive(Debug, Clone)]
pub struct S3StatusSink {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// The prefix with a trailing `/`, or empty.
    prefix: String,
}

impl S3StatusSink {
    /// A sink writing to `bucket` under `prefix` (slashes around it are ignored).
    pub fn new(client: aws_sdk_s3::Client, bucket: &str, prefix: &str) -> S3StatusSink {
        let prefix = prefix.trim_matches('/');
        S3StatusSink {
            client,
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        }
    }

    /// The object key of the record of `deployment_id` on `host_id`.
    pub fn key(&self, deployment_id: &str, host_id: &str) -> String {
        format!(
            "{}{}",
            self.prefix,
            status_record_path(deployment_id, host_id)
        )
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }
}

impl StatusSink for S3StatusSink {
    fn write<'a>(&'a self, record: &'a StatusRecord) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let key = self.key(&record.deployment_id, &record.host_id);
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .content_type("application/json")
                .server_side_encryption(ServerSideEncryption::Aes256)
                .body(ByteStream::from(record.to_json()))
                .send()
                .await
                .map_err(|e| aws_error("PutObject", self.location(&key), e))?;
            Ok(())
        })
    }

    fn read<'a>(
        &'a self,
        deployment_id: &'a str,
        host_id: &'a str,
    ) -> BoxFuture<'a, Option<StatusRecord>> {
        Box::pin(async move {
            let key = self.key(deployment_id, host_id);
            let out = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(&key)
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                    return Ok(None)
                }
                Err(e) => return Err(aws_error("GetObject", self.location(&key), e)),
            };
            let bytes = out.body.collect().await.map_err(|e| TransportError::Aws {
                op: "GetObject",
                target: self.location(&key),
                message: e.to_string(),
                transient: true,
            })?;
            StatusRecord::from_json(&bytes.into_bytes())
                .map(Some)
                .map_err(|e| TransportError::Corrupt {
                    location: self.location(&key),
                    reason: e.to_string(),
                })
        })
    }

    fn list_hosts<'a>(&'a self, deployment_id: &'a str) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move {
            let prefix = format!("{}deployments/{deployment_id}/hosts/", self.prefix);
            let mut hosts = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page =
                    page.map_err(|e| aws_error("ListObjectsV2", self.location(&prefix), e))?;
                for obj in page.contents() {
                    let host = obj
                        .key()
                        .and_then(|k| k.strip_prefix(&prefix))
                        .and_then(|k| k.strip_suffix(".json"));
                    if let Some(host) = host.filter(|h| !h.contains('/')) {
                        hosts.push(host.to_string());
                    }
                }
            }
            hosts.sort();
            Ok(hosts)
        })
    }
}
