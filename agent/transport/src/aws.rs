//! Building the AWS clients (S3, SQS) the transports and the revision fetcher use, in one
//! place: the standard credential chain of `aws-config` (environment, profile, IMDSv2, web
//! identity), the region from config or that chain, and an endpoint override (config, or
//! `AWS_ENDPOINT_URL`) for S3/SQS-compatible services such as moto or MinIO, with S3
//! path-style addressing whenever the endpoint is overridden (such services rarely serve
//! virtual-hosted buckets). HTTPS proxy variables (`HTTPS_PROXY`, `NO_PROXY`) are honoured by
//! the SDK's default client under the latest behavior version used here. Also turns SDK
//! errors into [`TransportError`]s. Every S3 and SQS client built here counts its requests
//! ([`crate::requests`]).

use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{DisplayErrorContext, SdkError};

use super::requests::CountRequests;
use super::TransportError;

/// Static credentials, for an S3-compatible store with fixed keys or a test service.
pub use aws_sdk_s3::config::Credentials;

/// How to reach AWS; every field is optional and falls back to the standard chain.
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    /// Region; else `AWS_REGION`, the profile, or IMDS.
    pub region: Option<String>,
    /// Endpoint for S3 and SQS; else `AWS_ENDPOINT_URL` when set.
    pub endpoint_url: Option<String>,
    /// Named profile; else `AWS_PROFILE` or `default`.
    pub profile: Option<String>,
    /// Fixed credentials instead of the chain (tests, S3-compatible stores).
    pub credentials: Option<Credentials>,
    /// A role to assume (STS AssumeRole) with the credentials found, e.g. a deployer role in
    /// another account; the session is named `pier`.
    pub role_arn: Option<String>,
}

/// The clients built from one [`AwsSettings`].
#[derive(Debug, Clone)]
pub struct AwsClients {
    /// S3 (path-style when the endpoint is overridden).
    pub s3: aws_sdk_s3::Client,
    /// SQS.
    pub sqs: aws_sdk_sqs::Client,
    /// The loaded configuration (region, credentials, endpoint, timeouts), for clients of
    /// other services built by their users (CloudWatch, SNS in the controller).
    pub config: aws_config::SdkConfig,
}

/// Builds S3 and SQS clients from `settings` and the standard chain. Fails only when no
/// region can be found (credentials are looked up lazily, at the first call).
pub async fn aws_clients(settings: &AwsSettings) -> Result<AwsClients, TransportError> {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &settings.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(profile) = &settings.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(creds) = &settings.credentials {
        loader = loader.credentials_provider(creds.clone());
    }
    let endpoint_url = settings
        .endpoint_url
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .filter(|e| !e.is_empty());
    if let Some(url) = &endpoint_url {
        loader = loader.endpoint_url(url);
    }
    // A half-open connection must not hang a poll or an upload for ever; the read timeout is
    // longer than SQS's 20 s long poll.
    loader = loader.timeout_config(
        aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .read_timeout(std::time::Duration::from_secs(60))
            .build(),
    );
    let mut config = loader.load().await;
    if let Some(role) = &settings.role_arn {
        let provider = aws_config::sts::AssumeRoleProvider::builder(role)
            .session_name("pier")
            .configure(&config)
            .build()
            .await;
        config = config
            .into_builder()
            .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(provider))
            .build();
    }
    config.region().ok_or_else(|| {
        TransportError::Config(
            "no AWS region found: set `region` in the agent config or AWS_REGION, or run \
                 on EC2 where IMDS gives it"
                .to_string(),
        )
    })?;
    // Every request is counted (`requests`); the SdkConfig cannot carry an interceptor, so
    // each client gets its own.
    let s3_config = aws_sdk_s3::config::Builder::from(&config)
        .force_path_style(endpoint_url.is_some())
        .interceptor(CountRequests)
        .build();
    // No stalled-stream protection on SQS: its messages are a few KiB, and its watch of the
    // request body ticks every 100 ms for as long as a 20 s long poll waits for an answer,
    // waking an idle agent 10 times a second. The read timeout above still bounds a poll
    // that hangs; S3, whose bundles are large, keeps the protection.
    let sqs_config = aws_sdk_sqs::config::Builder::from(&config)
        .stalled_stream_protection(aws_sdk_sqs::config::StalledStreamProtectionConfig::disabled())
        .interceptor(CountRequests)
        .build();
    Ok(AwsClients {
        s3: aws_sdk_s3::Client::from_conf(s3_config),
        sqs: aws_sdk_sqs::Client::from_conf(sqs_config),
        config,
    })
}

/// Whether this machine's firmware says it is an EC2 instance; reads files only, no network.
pub fn looks_like_ec2() -> bool {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    read("/sys/devices/virtual/dmi/id/board_asset_tag").starts_with("i-")
        || read("/sys/devices/virtual/dmi/id/sys_vendor").contains("Amazon EC2")
        || read("/sys/hypervisor/uuid").starts_with("ec2")
}

/// Off EC2, turns the AWS SDK's instance-metadata lookups (for region and credentials) off
/// for this process, so that the agent and the controller never send a request to the
/// metadata address of a network they are not on. Call first thing in `main`, before any
/// thread starts; an explicit `AWS_EC2_METADATA_DISABLED` is left as it is.
pub fn disable_imds_off_ec2() {
    if std::env::var_os("AWS_EC2_METADATA_DISABLED").is_none() && !looks_like_ec2() {
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
}

/// The EC2 instance id from IMDSv2, or `None` off EC2 (answers within about a second: the
/// metadata service is link-local, so a host without it fails fast).
pub async fn ec2_instance_id() -> Option<String> {
    imds_get("/latest/meta-data/instance-id").await
}

/// The instance's availability zone from IMDSv2 (`us-east-1a`), or `None` off EC2; asked the
/// same way as [`ec2_instance_id`].
pub async fn ec2_availability_zone() -> Option<String> {
    imds_get("/latest/meta-data/placement/availability-zone").await
}

/// One IMDSv2 metadata value, trimmed; `None` when the service does not answer quickly.
async fn imds_get(path: &str) -> Option<String> {
    let client = aws_config::imds::client::Client::builder()
        .connect_timeout(std::time::Duration::from_millis(500))
        .read_timeout(std::time::Duration::from_millis(500))
        .max_attempts(1)
        .build();
    match client.get(path).await {
        Ok(v) => Some(v.as_ref().trim().to_string()).filter(|s| !s.is_empty()),
        Err(e) => {
            log::debug!("no answer from IMDS for {path}: {e}");
            None
        }
    }
}

/// Converts an SDK error, deciding whether it is worth retrying: timeouts, connection
/// failures, unparseable responses, throttling and 5xx are; 4xx are not.
pub(crate) fn aws_error<E>(
    op: &'static str,
    target: impl Into<String>,
    err: SdkError<E, HttpResponse>,
) -> TransportError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let transient = is_transient(&err);
    TransportError::Aws {
        op,
        target: target.into(),
        message: DisplayErrorContext(&err).to_string(),
        transient,
    }
}

/// Whether an SDK error may go away on retry.
pub fn is_transient<E>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        _ => err
            .raw_response()
            .map(|r| {
                let s = r.status().as_u16();
                s == 429 || s >= 500
            })
            .unwrap_or(false),
    }
}
