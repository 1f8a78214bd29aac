//! `pier`: the deployment controller and operator CLI. Parses arguments and hands off to
//! `pier_controller`; usage errors exit 64, failures 1.
//!
//! With `PIER_PARSE_ONLY=1` in its environment, `pier` only parses its arguments (the same
//! parser, so the same flags and errors), prints `parsed: SUBCOMMAND` and exits 0, before it
//! reads a file, the controller configuration or the network: how `scripts/check-examples`
//! checks the `pier` invocations in `docs/examples/` against the real CLI.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use pier_controller::deploy::{DeployOptions, TransportKind};
use pier_controller::fleet::{Fleet, GroupDeployOptions};
use pier_controller::hosts::HostsOptions;
use pier_controller::push::PushOptions;
use pier_controller::revision::{parse_bundle_type, RevisionOverrides};
use pier_controller::status::{SinkOptions, StatusOptions};
use pier_controller::{AwsOptions, ControllerError, EXIT_USAGE};

#[derive(Parser)]
#[command(
    name = "pier",
    version,
    about = "pier deployment controller: push revisions, deploy them to hosts, follow their status, list the hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    aws: AwsArgs,
}

#[derive(Args)]
#[command(next_help_heading = "AWS access")]
struct AwsArgs {
    /// AWS region (else AWS_REGION or the profile's).
    #[arg(long, global = true, env = "AWS_REGION")]
    region: Option<String>,
    /// Endpoint for S3 and SQS (moto, MinIO, ...).
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// Named AWS profile.
    #[arg(long, global = true, env = "AWS_PROFILE")]
    profile: Option<String>,
    /// An IAM role to assume with the credentials found (e.g. a deployer role in the
    /// production account).
    #[arg(long, global = true, env = "PIER_ROLE_ARN")]
    role_arn: Option<String>,
    /// Take defaults from this environment of the controller configuration (its profile or
    /// role, region, store, queue template, signing key); flags still win.
    #[arg(long = "env", global = true, env = "PIER_ENV", value_name = "NAME")]
    environment: Option<String>,
    /// The controller configuration file that names the environments.
    #[arg(
        long,
        global = true,
        env = "PIER_CONTROLLER_CONFIG",
        value_name = "FILE",
        default_value = pier_controller::environments::DEFAULT_CONTROLLER_CONFIG
    )]
    controller_config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Archive a directory, upload it as a revision, print the revision JSON on stdout.
    Push(PushArgs),
    /// Deploy a revision: to a stored group, rolled out batch by batch to the end; or with
    /// --hosts, to those hosts at once (with --wait, followed until every host is done).
    Deploy(Box<DeployArgs>),
    /// Show a deployment's per-host, per-event status.
    Status(StatusArgs),
    /// Store, show, list or delete deployment group definitions.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Stop dispatching a fleet deployment (hosts already sent finish on their own).
    Stop(StopArgs),
    /// Send a group's hosts back to an earlier revision: the hosts that got the group's
    /// latest deployment get the last successful one (or --to DEPLOYMENT_ID's).
    Rollback(RollbackArgs),
    /// Approve a deployment held for approval; its rollout starts.
    Approve(DecideArgs),
    /// Reject a deployment held for approval; nothing is sent.
    Reject(DecideArgs),
    /// List the hosts whose agents announced themselves, with their health (healthy, stale,
    /// stopped), zone, tags, version and queue.
    Hosts(HostsArgs),
    /// Write a new ed25519 key pair for signing commands: DIR/NAME.key (mode 0600) and
    /// DIR/NAME.pub; print the key's id on stdout.
    Keygen(KeygenArgs),
    /// List fleet deployments, newest first: revision, commit, creator, status, duration,
    /// rollback links.
    History(HistoryArgs),
    /// DORA metrics from the deployment records: deployment frequency, lead time for
    /// changes, change failure rate, time to restore (definitions: docs/dora.md).
    Dora(DoraArgs),
    /// Serve a web dashboard of the deployments, their per-host timelines, the hosts and the
    /// DORA metrics, with approve/reject/stop/rollback behind a token (docs/dashboard.md).
    Dashboard(DashboardArgs),
}

#[derive(Args)]
struct DashboardArgs {
    /// ADDRESS:PORT to listen on (port 0: any free one). Anything but a loopback address
    /// needs --token.
    #[arg(long, default_value = pier_controller::dashboard::DEFAULT_LISTEN)]
    listen: String,
    /// The token actions (approve, reject, stop, rollback) require, at least 16 characters;
    /// without it a random one is made and printed.
    #[arg(long, env = "PIER_DASHBOARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Link commits to this repository (`URL/commit/SHA`) when the revision does not name
    /// one, e.g. https://github.com/org/shop.
    #[arg(long, value_name = "URL")]
    repo_url: Option<String>,
    /// The key rollbacks started from the dashboard are signed with.
    #[arg(long, value_name = "FILE", env = "PIER_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
    #[command(flatten)]
    sink: SinkArgs,
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Check a group definition (every problem at once) and store it.
    Put {
        /// The group's YAML file.
        file: PathBuf,
        #[command(flatten)]
        sink: SinkArgs,
    },
    /// Print a stored group as JSON.
    Get {
        /// The group's name.
        name: String,
        #[command(flatten)]
        sink: SinkArgs,
    },
    /// List the stored groups.
    List {
        #[command(flatten)]
        sink: SinkArgs,
    },
    /// Delete a stored group.
    Delete {
        /// The group's name.
        name: String,
        #[command(flatten)]
        sink: SinkArgs,
    },
}

#[derive(Args)]
struct StopArgs {
    /// The deployment id.
    deployment_id: String,
    /// Also roll back the hosts that got it to the group's last successful revision.
    #[arg(long)]
    rollback: bool,
    /// The key the deployment's commands are signed with (a rollback is signed like the
    /// deployment it undoes).
    #[arg(long, value_name = "FILE", env = "PIER_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
    #[command(flatten)]
    sink: SinkArgs,
}

#[derive(Args)]
struct RollbackArgs {
    /// The deployment group.
    #[arg(long)]
    deployment_group: String,
    /// The deployment whose revision to go back to (default: the group's last success).
    #[arg(long, value_name = "DEPLOYMENT_ID")]
    to: Option<String>,
    /// The key the deployment's commands are signed with (a rollback is signed like the
    /// deployment it undoes).
    #[arg(long, value_name = "FILE", env = "PIER_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
    #[command(flatten)]
    sink: SinkArgs,
}

#[derive(Args)]
struct DecideArgs {
    /// The deployment id.
    deployment_id: String,
    /// A comment recorded with the decision.
    #[arg(long)]
    comment: Option<String>,
    #[command(flatten)]
    sink: SinkArgs,
}

#[derive(Args)]
struct KeygenArgs {
    /// Directory to write the key pair into (created with mode 0700 when missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// File name of the pair, without extension.
    #[arg(long, default_value = "pier-signing")]
    name: String,
}

#[derive(Args)]
struct PushArgs {
    /// Application name, recorded with the revision.
    #[arg(long)]
    application: String,
    /// The directory to archive (its `.git` is left out).
    #[arg(long)]
    source: PathBuf,
    /// Upload to s3://BUCKET/KEY.
    #[arg(
        long,
        conflicts_with = "local_location",
        required_unless_present = "local_location"
    )]
    s3_location: Option<String>,
    /// Write the archive here (for the spool transport), with a PATH.pier.json sidecar.
    #[arg(long)]
    local_location: Option<PathBuf>,
    /// Server-side encryption: AES256 (default) or aws:kms.
    #[arg(long)]
    sse: Option<String>,
    /// KMS key id for --sse aws:kms.
    #[arg(long)]
    sse_kms_key_id: Option<String>,
    /// Archive format: tgz (default), tar or zip.
    #[arg(long)]
    bundle_type: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum TransportArg {
    Sqs,
    Spool,
}

#[derive(Args)]
struct SinkArgs {
    /// Bucket where hosts write status records.
    #[arg(long, env = "PIER_STATUS_BUCKET", conflicts_with = "status_dir")]
    status_bucket: Option<String>,
    /// Key prefix of the status records (default pier).
    #[arg(long, env = "PIER_STATUS_PREFIX")]
    status_prefix: Option<String>,
    /// Directory where hosts write status records (spool transport; default
    /// /var/lib/pier/status).
    #[arg(long, env = "PIER_STATUS_DIR")]
    status_dir: Option<PathBuf>,
}

impl SinkArgs {
    fn into_options(self) -> SinkOptions {
        SinkOptions {
            status_bucket: self.status_bucket,
            status_prefix: self.status_prefix,
            status_dir: self.status_dir,
        }
    }
}

#[derive(Args)]
struct DeployArgs {
    /// Application name (APPLICATION_NAME in hooks).
    #[arg(long, required_unless_present = "resume")]
    application: Option<String>,
    /// Deployment group name (DEPLOYMENT_GROUP_NAME in hooks). Without --hosts, the group
    /// stored with `pier group put`: its hosts, rules and transport.
    #[arg(long, required_unless_present = "resume")]
    deployment_group: Option<String>,
    /// Deployment group id (DEPLOYMENT_GROUP_ID in hooks); defaults to the group name.
    #[arg(long)]
    deployment_group_id: Option<String>,
    /// s3://BUCKET/KEY[?versionId=V], a local archive or directory, @revision.json (what
    /// `pier push` printed), or an http(s) URL.
    #[arg(long, required_unless_present = "resume")]
    revision: Option<String>,
    /// The bundle's sha256 when nothing recorded it.
    #[arg(long)]
    sha256: Option<String>,
    /// The bundle's format when neither its metadata nor its name says: tgz, tar or zip.
    #[arg(long)]
    bundle_type: Option<String>,
    /// Target host ids, comma-separated: send to these hosts at once, without a stored
    /// group.
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
    /// For a stored group: OneAtATime, HalfAtATime, AllAtOnce, HOST_COUNT:N or
    /// FLEET_PERCENT:N instead of the group's configuration.
    #[arg(long, conflicts_with = "hosts")]
    deployment_config: Option<String>,
    /// For a stored group: hold the deployment until `pier approve`.
    #[arg(long, conflicts_with = "hosts")]
    require_approval: bool,
    /// For a stored group: a host with no final status this many seconds after it was sent
    /// counts as failed.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    host_timeout: u64,
    /// For a stored group: an http(s) URL that must keep answering 2xx during the rollout
    /// (failures spanning the group's health_grace_seconds stop it, and roll it back when the
    /// group says so).
    #[arg(long, value_name = "URL", conflicts_with = "hosts")]
    health_url: Option<String>,
    /// For a stored group: seconds this controller's claim on the rollout holds without
    /// renewal (a controller killed mid-rollout delays the next by at most this).
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    lease: u64,
    /// For a stored group: `json` prints the deployment's final record on stdout (instead of
    /// its id), for pipelines.
    #[arg(long, value_enum, default_value = "text")]
    format: OutputFormat,
    /// Carry on a stored group deployment whose controller stopped (once its lease runs out).
    #[arg(long, value_name = "DEPLOYMENT_ID", conflicts_with_all = ["hosts", "revision"])]
    resume: Option<String>,
    /// How commands reach hosts (default: sqs when --queue-url-template or --status-bucket
    /// is given, else spool).
    #[arg(long, value_enum, env = "PIER_TRANSPORT")]
    transport: Option<TransportArg>,
    /// Spool directory of the host, or a template with {host} (default /var/lib/pier/spool).
    #[arg(long, env = "PIER_SPOOL_DIR")]
    spool_dir: Option<String>,
    /// SQS queue URL template with {host} (default: look up the queue pier-{host}).
    #[arg(long, env = "PIER_QUEUE_URL_TEMPLATE")]
    queue_url_template: Option<String>,
    #[command(flatten)]
    sink: SinkArgs,
    /// Lifecycle events to run, comma-separated, in lifecycle order; DownloadBundle and Install
    /// always run (default: ApplicationStop through ValidateService, no traffic events).
    #[arg(long, value_delimiter = ',')]
    events: Option<Vec<String>>,
    /// DISALLOW, OVERWRITE or RETAIN, when the AppSpec does not say.
    #[arg(long)]
    file_exists_behavior: Option<String>,
    /// A failing ApplicationStop (or BeforeBlockTraffic, AfterBlockTraffic) script of the
    /// previous revision does not fail a host; the deployment goes on (as CodeDeploy's option).
    #[arg(long)]
    ignore_application_stop_failures: bool,
    /// Sign each command with this secret key file (from `pier keygen`, mode 0600); agents
    /// with `trusted_keys` accept only signed commands.
    #[arg(long, value_name = "FILE", env = "PIER_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
    /// Follow the deployment until every host is done; exit 0 only if all succeeded.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// With --wait: seconds between status reads.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    poll_interval: f64,
}

#[derive(Args)]
struct StatusArgs {
    /// The deployment id `pier deploy` printed.
    deployment_id: String,
    #[command(flatten)]
    sink: SinkArgs,
    /// Hosts to show even if they have not reported yet, comma-separated.
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
}

/// How often `stop --rollback` and `rollback` read status while they drive the rollback.
const POLL: Duration = Duration::from_millis(500);
#[derive(Args)]
struct HostsArgs {
    /// Where the registry is: the store the hosts' status records are in.
    #[command(flatten)]
    sink: SinkArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: pier_controller::hosts::Format,
    /// Only the hosts this stored deployment group selects (its hosts and tag filters).
    #[arg(long)]
    deployment_group: Option<String>,
}

/// Applies `--env NAME` before the arguments are parsed for real: its settings become the
/// environment variables the flags fall back to, so a flag given still wins.
fn apply_environment() -> Result<(), ControllerError> {
    // A first, lenient parse only to find --env and --controller-config.
    let Ok(first) = Cli::try_parse() else {
        return Ok(());
    };
    let Some(name) = first.aws.environment else {
        return Ok(());
    };
    let env = pier_controller::environments::select(&first.aws.controller_config, &name)?;
    for (key, value) in env.variables() {
        // Single-threaded here: no runtime has started yet.
        std::env::set_var(key, value);
    }
    Ok(())
}

/// The environment variable that makes `pier` stop after parsing its arguments (see the
/// module's documentation). Deliberately not a flag: it stays out of `--help`.
const PARSE_ONLY: &str = "PIER_PARSE_ONLY";

/// Parses the command line. On an error, or on `--help` / `--version`, prints what clap says
/// and returns the exit code: 0 for help and version, 64 (a usage error, like the rest of
/// pier's) for anything else.
fn parse_args() -> Result<(Cli, ArgMatches), ExitCode> {
    let fail = |e: clap::Error| {
        let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
        let _ = e.print();
        ExitCode::from(code as u8)
    };
    let matches = Cli::command().try_get_matches().map_err(fail)?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| fail(e.format(&mut Cli::command())))?;
    Ok((cli, matches))
}

/// `PIER_PARSE_ONLY=1`: the parse and nothing else. Prints the (sub)command parsed, e.g.
/// `parsed: deploy` or `parsed: group put`.
fn parse_only() -> ExitCode {
    let (_, matches) = match parse_args() {
        Ok(parsed) => parsed,
        Err(code) => return code,
    };
    let mut names = Vec::new();
    let mut m = &matches;
    while let Some((name, sub)) = m.subcommand() {
        names.push(name);
        m = sub;
    }
    println!("parsed: {}", names.join(" "));
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    // Before anything reads a file, the environment's configuration or the network.
    if std::env::var_os(PARSE_ONLY).is_some_and(|v| v == "1") {
        return parse_only();
    }
    pier_transport::aws::disable_imds_off_ec2();
    if let Err(e) = apply_environment() {
        eprintln!("pier: {e}");
        return ExitCode::from(EXIT_USAGE as u8);
    }
    let cli = match parse_args() {
        Ok((cli, _)) => cli,
        Err(code) => return code,
    };
    pier_sys::logging::init(log::LevelFilter::Warn);
    let aws = AwsOptions {
        region: cli.aws.region,
        endpoint_url: cli.aws.endpoint_url.filter(|e| !e.is_empty()),
        profile: cli.aws.profile,
        role_arn: cli.aws.role_arn.filter(|r| !r.is_empty()),
    };
    let code = pier_controller::run(async move {
        match cli.command {
            Command::Push(a) => push(a, aws).await,
            Command::Deploy(a) => deploy(*a, aws).await,
            Command::Keygen(a) => keygen(a),
            Command::Group(g) => group(g, aws).await,
            Command::Stop(a) => {
                let fleet = Fleet::open(&a.sink.into_options(), &aws).await?;
                let key = a.signing_key.filter(|p| !p.as_os_str().is_empty());
                pier_controller::fleet::stop(
                    &fleet,
                    &a.deployment_id,
                    a.rollback,
                    key.as_deref(),
                    &aws,
                    POLL,
                )
                .await
            }
            Command::Rollback(a) => {
                let fleet = Fleet::open(&a.sink.into_options(), &aws).await?;
                let key = a.signing_key.filter(|p| !p.as_os_str().is_empty());
                pier_controller::fleet::rollback(
                    &fleet,
                    &a.deployment_group,
                    a.to.as_deref(),
                    key.as_deref(),
                    &aws,
                    POLL,
                )
                .await
            }
            Command::History(a) => history(a, aws).await,
            Command::Dora(a) => dora(a, aws).await,
            Command::Dashboard(a) => {
                pier_controller::dashboard::run(pier_controller::dashboard::DashboardOptions {
                    listen: a.listen,
                    token: a.token.filter(|t| !t.is_empty()),
                    sink: a.sink.into_options(),
                    aws,
                    repo_url: a.repo_url.filter(|u| !u.is_empty()),
                    signing_key: a.signing_key.filter(|p| !p.as_os_str().is_empty()),
                })
                .await
            }
            Command::Approve(a) => decide(a, true, aws).await,
            Command::Reject(a) => decide(a, false, aws).await,
            Command::Hosts(a) => {
                pier_controller::hosts::hosts(&HostsOptions {
                    sink: a.sink.into_options(),
                    format: a.format,
                    deployment_group: a.deployment_group,
                    aws,
                })
                .await
            }
            Command::Status(a) => {
                pier_controller::status::status(&StatusOptions {
                    deployment_id: a.deployment_id,
                    sink: a.sink.into_options(),
                    hosts: a.hosts,
                    aws,
                })
                .await
            }
        }
    });
    // What the command asked of S3, SQS or the local store, for benchmarks and cost checks.
    if std::env::var_os("PIER_REQUEST_STATS").is_some_and(|v| v == "1") {
        eprintln!("{}", pier_transport::requests::summary());
    }
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

async fn push(a: PushArgs, aws: AwsOptions) -> Result<i32, ControllerError> {
    let pushed = pier_controller::push::push(&PushOptions {
        application: a.application,
        source: a.source,
        s3_location: a.s3_location,
        local_location: a.local_location,
        bundle_type: a.bundle_type,
        sse: a.sse,
        sse_kms_key_id: a.sse_kms_key_id,
        aws,
    })
    .await?;
    eprintln!(
        "pushed {} bytes: {}",
        pushed.size,
        pier_controller::revision::describe(&pushed.info)
    );
    println!("{}", pushed.info.to_json());
    Ok(0)
}

fn keygen(a: KeygenArgs) -> Result<i32, ControllerError> {
    let g = pier_controller::signing::keygen(&a.out, &a.name)?;
    eprintln!(
        "wrote {} (secret: keep it with the controller) and {} (public: give it to agents)\n\
         agent.yml:\ntrusted_keys:\n  - id: {}\n    public_key: {}",
        g.secret.display(),
        g.public.display(),
        g.key_id,
        g.public_key
    );
    println!("{}", g.key_id);
    Ok(0)
}

async fn group(g: GroupCommand, aws: AwsOptions) -> Result<i32, ControllerError> {
    use pier_controller::fleet;
    match g {
        GroupCommand::Put { file, sink } => {
            fleet::group_put(&Fleet::open(&sink.into_options(), &aws).await?, &file).await
        }
        GroupCommand::Get { name, sink } => {
            fleet::group_get(&Fleet::open(&sink.into_options(), &aws).await?, &name).await
        }
        GroupCommand::List { sink } => {
            fleet::group_list(&Fleet::open(&sink.into_options(), &aws).await?).await
        }
        GroupCommand::Delete { name, sink } => {
            fleet::group_delete(&Fleet::open(&sink.into_options(), &aws).await?, &name).await
        }
    }
}

async fn decide(a: DecideArgs, approved: bool, aws: AwsOptions) -> Result<i32, ControllerError> {
    let fleet = Fleet::open(&a.sink.into_options(), &aws).await?;
    pier_controller::fleet::decide(&fleet, &a.deployment_id, approved, a.comment, &aws).await
}

async fn deploy(a: DeployArgs, aws: AwsOptions) -> Result<i32, ControllerError> {
    let bundle_type = a
        .bundle_type
        .as_deref()
        .map(|t| parse_bundle_type("--bundle-type", t))
        .transpose()?;
    if !(a.poll_interval > 0.0 && a.poll_interval.is_finite()) {
        return Err(ControllerError::Usage {
            flag: "--poll-interval".into(),
            message: "must be a positive number of seconds".into(),
        });
    }
    let poll = Duration::from_secs_f64(a.poll_interval);
    let signing_key = a.signing_key.filter(|p| !p.as_os_str().is_empty());
    let lease = Duration::from_secs(a.lease.max(2));
    if let Some(id) = &a.resume {
        let fleet = Fleet::open(&a.sink.into_options(), &aws).await?;
        return pier_controller::fleet::resume(
            &fleet,
            id,
            signing_key.as_deref(),
            &aws,
            poll,
            lease,
            a.format == OutputFormat::Json,
        )
        .await;
    }
    let (Some(application), Some(deployment_group), Some(revision)) =
        (a.application, a.deployment_group, a.revision)
    else {
        unreachable!("clap requires these without --resume");
    };
    if a.hosts.is_empty() {
        let fleet = Fleet::open(&a.sink.into_options(), &aws).await?;
        return pier_controller::fleet::deploy_group(
            &fleet,
            &GroupDeployOptions {
                application,
                deployment_group,
                revision,
                overrides: RevisionOverrides {
                    sha256: a.sha256,
                    bundle_type,
                },
                deployment_config: a.deployment_config,
                events: a.events,
                file_exists_behavior: a.file_exists_behavior,
                require_approval: a.require_approval,
                ignore_application_stop_failures: a.ignore_application_stop_failures,
                host_timeout: Duration::from_secs(a.host_timeout),
                signing_key,
                poll,
                lease,
                health_url: a.health_url,
                json: a.format == OutputFormat::Json,
            },
            &aws,
        )
        .await;
    }
    pier_controller::deploy::deploy(&DeployOptions {
        application,
        deployment_group,
        deployment_group_id: a.deployment_group_id,
        revision,
        overrides: RevisionOverrides {
            sha256: a.sha256,
            bundle_type,
        },
        hosts: a.hosts,
        transport: a.transport.map(|t| match t {
            TransportArg::Sqs => TransportKind::Sqs,
            TransportArg::Spool => TransportKind::Spool,
        }),
        spool_dir: a.spool_dir,
        queue_url_template: a.queue_url_template,
        sink: a.sink.into_options(),
        events: a.events,
        file_exists_behavior: a.file_exists_behavior,
        ignore_application_stop_failures: a.ignore_application_stop_failures,
        signing_key,
        wait: a.wait,
        timeout: a.timeout.map(Duration::from_secs),
        poll_interval: poll,
        aws,
    })
    .await
}

#[derive(Clone, Copy, Default, ValueEnum)]
enum FormatArg {
    #[default]
    Text,
    Json,
}

impl From<FormatArg> for pier_controller::history::Format {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Text => pier_controller::history::Format::Text,
            FormatArg::Json => pier_controller::history::Format::Json,
        }
    }
}

#[derive(Args)]
struct HistoryArgs {
    /// Only this application.
    #[arg(long)]
    application: Option<String>,
    /// Only this deployment group.
    #[arg(long)]
    deployment_group: Option<String>,
    /// Only this status: PendingApproval, InProgress, Succeeded, Failed or Stopped.
    #[arg(long)]
    status: Option<String>,
    /// Only deployments created since: 30d, 12h, 90m (back from now) or an RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// At most this many (the newest).
    #[arg(long)]
    limit: Option<usize>,
    /// text (an aligned table) or json (an array of deployment records).
    #[arg(long, value_enum, default_value_t = FormatArg::Text)]
    format: FormatArg,
    #[command(flatten)]
    sink: SinkArgs,
}

#[derive(Args)]
struct DoraArgs {
    /// Only this application.
    #[arg(long)]
    application: Option<String>,
    /// Only this deployment group.
    #[arg(long)]
    deployment_group: Option<String>,
    /// The window, ending now: 30d, 12h, 90m or an RFC 3339 start time.
    #[arg(long, default_value = "30d")]
    since: String,
    /// text or json (the report the dashboard also shows).
    #[arg(long, value_enum, default_value_t = FormatArg::Text)]
    format: FormatArg,
    #[command(flatten)]
    sink: SinkArgs,
}

async fn history(a: HistoryArgs, aws: AwsOptions) -> Result<i32, ControllerError> {
    use pier_controller::history::{self, HistoryFilter, HistoryOptions};
    let now = chrono::Utc::now();
    let opts = HistoryOptions {
        filter: HistoryFilter {
            application: a.application,
            deployment_group: a.deployment_group,
            status: a
                .status
                .map(|s| history::parse_status("--status", &s))
                .transpose()?,
            since: a
                .since
                .map(|s| history::parse_since("--since", &s, now))
                .transpose()?,
        },
        limit: a.limit,
        format: a.format.into(),
    };
    let fleet = Fleet::open(&a.sink.into_options(), &aws).await?;
    history::history(&fleet, &opts).await
}

async fn dora(a: DoraArgs, aws: AwsOptions) -> Result<i32, ControllerError> {
    use pier_controller::history::{self, DoraOptions, HistoryFilter};
    let now = chrono::Utc::now();
    let opts = DoraOptions {
        filter: HistoryFilter {
            application: a.application,
            deployment_group: a.deployment_group,
            ..HistoryFilter::default()
        },
        since: history::parse_since("--since", &a.since, now)?,
        now,
        format: a.format.into(),
    };
    let fleet = Fleet::open(&a.sink.into_options(), &aws).await?;
    history::dora(&fleet, &opts).await
}
