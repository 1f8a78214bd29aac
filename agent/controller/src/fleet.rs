//! The fleet commands over the shared store: deployment groups (`pier group
//! put/get/list/delete`, stored at `groups/{name}.json`), deployments to a stored group
//! (`pier deploy --deployment-group G` without `--hosts`: a rollout by the group's rules,
//! driven by [`crate::rollout::Driver`]), and the operator's hands on a running one (`pier
//! deploy --resume`, `pier stop`, `pier approve`, `pier reject`).
//!
//! The store is the status store the other commands name (`--status-bucket/--status-prefix`
//! or `--status-dir`): a fleet's groups, registry, deployment records and hosts' status
//! records all live under one prefix, so one set of flags (or environment variables) points
//! every command at a fleet.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use pier_protocol::record::{Approval, DeploymentRecord, HostRolloutState, RolloutStatus};
use pier_protocol::registry::HostHealth;
use pier_protocol::{is_valid_id, StatusSinkSpec};
use pier_transport::aws::AwsClients;
use pier_transport::sqs::SqsQueue;
use pier_transport::store::{ObjectStore, Precondition};

use super::deploy::{check_events, creator, with_retries};
use super::group::{parse_group, GroupDefinition, GroupTransport, TriggerEvent};
use super::revision::{resolve, RevisionOverrides};
use super::rollout::{self, Delivery, Driver, NewRollout, RolloutSettings};
use super::rules::DeploymentConfig;
use super::status::SinkOptions;
use super::{AwsOptions, ControllerError, EXIT_FAILURE};

/// The store a command works on, and the AWS clients it was opened with.
pub struct Fleet {
    /// The shared store.
    pub store: Box<dyn ObjectStore>,
    /// Where it is, as a status sink spec (what commands tell hosts).
    pub spec: StatusSinkSpec,
    /// AWS clients when the store (or delivery) needs them.
    pub clients: Option<AwsClients>,
}

impl Fleet {
    /// Opens the store the flags name (a local directory by default).
    pub async fn open(sink: &SinkOptions, aws: &AwsOptions) -> Result<Fleet, ControllerError> {
        let spec = sink.spec(true)?;
        let clients = match spec {
            StatusSinkSpec::S3 { .. } => Some(aws.clients().await?),
            StatusSinkSpec::Local { .. } => None,
        };
        let store = pier_transport::open_store(&spec, clients.as_ref())
            .map_err(|e| ControllerError::transport("cannot open the store", e))?;
        Ok(Fleet {
            store,
            spec,
            clients,
        })
    }
}

fn group_key(name: &str) -> String {
    format!("groups/{name}.json")
}

fn check_group_name(name: &str) -> Result<(), ControllerError> {
    if is_valid_id(name) {
        Ok(())
    } else {
        Err(ControllerError::usage(
            "NAME",
            format!("`{name}` is not a group name (letters, digits, `.`, `_`, `-`)"),
        ))
    }
}

/// Whether any notification target is an SNS topic (which needs AWS access).
fn has_sns(targets: &[super::group::Notification]) -> bool {
    targets
        .iter()
        .any(|n| matches!(n.target, super::group::NotificationTarget::Sns(_)))
}

/// `pier group put FILE`: checks the definition (every problem at once) and stores it.
pub async fn group_put(fleet: &Fleet, file: &Path) -> Result<i32, ControllerError> {
    let text = std::fs::read_to_string(file).map_err(|e| ControllerError::io("read", file, e))?;
    let def = parse_group(&file.display().to_string(), &text)
        .map_err(|e| ControllerError::usage(file.display().to_string(), e.to_string()))?;
    fleet
        .store
        .put(&group_key(&def.name), def.to_json(), Precondition::None)
        .await
        .map_err(|e| ControllerError::transport("cannot store the group", e))?;
    eprintln!(
        "stored group {} ({}) in {}",
        def.name,
        def.deployment_config,
        fleet.store.describe()
    );
    Ok(0)
}

/// Reads a stored group, `None` if there is none.
pub(crate) async fn load_group(
    store: &dyn ObjectStore,
    name: &str,
) -> Result<Option<GroupDefinition>, ControllerError> {
    check_group_name(name)?;
    let key = group_key(name);
    let Some(v) = store
        .get(&key)
        .await
        .map_err(|e| ControllerError::transport("cannot read the group", e))?
    else {
        return Ok(None);
    };
    let location = format!("{}{key}", store.describe());
    GroupDefinition::from_json(&location, &v.bytes)
        .map(Some)
        .map_err(|e| ControllerError::Record {
            location,
            message: e.to_string(),
        })
}

/// `pier group get NAME`: the stored definition as JSON on stdout.
pub async fn group_get(fleet: &Fleet, name: &str) -> Result<i32, ControllerError> {
    match load_group(fleet.store.as_ref(), name).await? {
        Some(def) => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&def.to_json());
            let _ = writeln!(out);
            Ok(0)
        }
        None => Err(ControllerError::usage(
            "NAME",
            format!("no group `{name}` in {}", fleet.store.describe()),
        )),
    }
}

/// `pier group list`: one line per group.
pub async fn group_list(fleet: &Fleet) -> Result<i32, ControllerError> {
    let keys = fleet
        .store
        .list("groups/", None, None)
        .await
        .map_err(|e| ControllerError::transport("cannot list the groups", e))?;
    for key in keys {
        let Some(name) = key
            .strip_prefix("groups/")
            .and_then(|k| k.strip_suffix(".json"))
        else {
            continue;
        };
        match load_group(fleet.store.as_ref(), name).await {
            Ok(Some(def)) => println!(
                "{}\t{}\t{}\t{} host(s), {} tag filter(s)",
                def.name,
                def.application,
                def.deployment_config,
                def.hosts.len(),
                def.tag_filters.len()
            ),
            Ok(None) => {}
            Err(e) => eprintln!("pier: {e}"),
        }
    }
    Ok(0)
}

/// `pier group delete NAME`.
pub async fn group_delete(fleet: &Fleet, name: &str) -> Result<i32, ControllerError> {
    check_group_name(name)?;
    fleet
        .store
        .delete(&group_key(name))
        .await
        .map_err(|e| ControllerError::transport("cannot delete the group", e))?;
    eprintln!("deleted group {name}");
    Ok(0)
}

/// What `pier deploy` to a stored group was asked.
#[derive(Debug, Clone)]
pub struct GroupDeployOptions {
    /// `--application` (must be the group's).
    pub application: String,
    /// `--deployment-group`.
    pub deployment_group: String,
    /// `--revision`.
    pub revision: String,
    /// `--sha256`, `--bundle-type`.
    pub overrides: RevisionOverrides,
    /// `--deployment-config`, overriding the group's.
    pub deployment_config: Option<String>,
    /// `--events`.
    pub events: Option<Vec<String>>,
    /// `--file-exists-behavior`.
    pub file_exists_behavior: Option<String>,
    /// `--require-approval` (or the group's setting).
    pub require_approval: bool,
    /// `--ignore-application-stop-failures` (or the group's setting).
    pub ignore_application_stop_failures: bool,
    /// `--host-timeout`.
    pub host_timeout: Duration,
    /// `--signing-key`.
    pub signing_key: Option<PathBuf>,
    /// `--poll-interval`.
    pub poll: Duration,
    /// `--lease`.
    pub lease: Duration,
    /// `--health-url`, overriding the group's.
    pub health_url: Option<String>,
    /// `--format json`: the final record on stdout instead of the id.
    pub json: bool,
}

/// `pier deploy` to a stored group: builds the rollout record, stores it, and drives it to
/// its end. Exit 0 only when the deployment succeeded.
pub async fn deploy_group(
    fleet: &Fleet,
    opts: &GroupDeployOptions,
    aws: &AwsOptions,
) -> Result<i32, ControllerError> {
    let def = load_group(fleet.store.as_ref(), &opts.deployment_group)
        .await?
        .ok_or_else(|| {
            ControllerError::usage(
                "--deployment-group",
                format!(
                    "no group `{}` in {}: store one with `pier group put FILE.yml`, or name \
                     the hosts with --hosts",
                    opts.deployment_group,
                    fleet.store.describe()
                ),
            )
        })?;
    if def.application != opts.application {
        return Err(ControllerError::usage(
            "--application",
            format!(
                "group `{}` belongs to application `{}`, not `{}`",
                def.name, def.application, opts.application
            ),
        ));
    }
    check_events(opts.events.as_deref())?;
    if let Some(u) = &opts.health_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            return Err(ControllerError::usage(
                "--health-url",
                format!("`{u}` is not an http:// or https:// URL"),
            ));
        }
    }
    if let Some(b) = &opts.file_exists_behavior {
        b.parse::<pier_protocol::FileExistsBehavior>()
            .map_err(|e| ControllerError::usage("--file-exists-behavior", e.to_string()))?;
    }
    let config = match &opts.deployment_config {
        Some(c) => DeploymentConfig::parse(c)
            .map_err(|e| ControllerError::usage("--deployment-config", e.to_string()))?,
        None => def.deployment_config,
    };
    let signing_key = opts
        .signing_key
        .as_deref()
        .map(super::signing::load_signing_key)
        .transpose()?;

    let registry = super::hosts::load_registry(fleet.store.as_ref()).await?;
    let now = Utc::now();
    let hosts: Vec<(String, Option<String>)> = super::group::select_hosts(&def, &registry)
        .into_iter()
        .map(|h| {
            let entry = registry.iter().find(|e| e.host_id == h);
            match entry.map(|e| e.health(now)) {
                Some(HostHealth::Healthy) => {}
                Some(health) => eprintln!(
                    "warning: host {h} is {health:?} in the registry; it will fail if it does \
                     not answer within the host timeout"
                ),
                None => eprintln!("warning: host {h} is not in the registry"),
            }
            (h, entry.and_then(|e| e.availability_zone.clone()))
        })
        .collect();

    let info = with_retries("reading the revision", || {
        resolve(&opts.revision, &opts.overrides, aws)
    })
    .await?;
    let deployment_id = pier_protocol::new_deployment_id();
    let delivery = match &def.transport {
        GroupTransport::Sqs { queue_url_template } => Delivery::Sqs {
            queue_url_template: queue_url_template.clone(),
        },
        GroupTransport::Spool { spool_dir } => Delivery::Spool {
            spool_dir: spool_dir.clone(),
        },
    };
    // Results come back on a queue of this deployment's own when hosts use SQS.
    let clients = match (&delivery, &fleet.clients) {
        (_, Some(c)) => Some(c.clone()),
        (Delivery::Sqs { .. }, None) => Some(aws.clients().await?),
        (_, None) if !def.alarms.is_empty() || has_sns(&def.notifications) => {
            Some(aws.clients().await?)
        }
        (_, None) => None,
    };
    // A webhook secret missing from this environment is refused before anything is made.
    if !def.notifications.is_empty() {
        let sns = clients
            .as_ref()
            .map(|c| aws_sdk_sns::Client::new(&c.config));
        super::notify::Notifier::new(&def.notifications, sns)?;
    }
    // One deployment per group at a time: the slot is taken before anything is created.
    rollout::claim_active(fleet.store.as_ref(), &def.name, &deployment_id).await?;
    let notify_queue_url = match (&delivery, &clients) {
        (Delivery::Sqs { .. }, Some(c)) => {
            let name = format!("pier-status-{deployment_id}");
            let q = with_retries("creating the notification queue", || async {
                SqsQueue::create_plain(c.sqs.clone(), &name)
                    .await
                    .map_err(|e| ControllerError::transport("notification queue", e))
            })
            .await?;
            Some(q.url().to_string())
        }
        _ => None,
    };
    let settings = RolloutSettings {
        deployment_group_id: def.name.clone(),
        events: opts.events.clone(),
        file_exists_behavior: opts.file_exists_behavior.clone(),
        delivery,
        status: fleet.spec.clone(),
        notify_queue_url,
        host_timeout_seconds: opts.host_timeout.as_secs().max(1),
        signing_key_id: signing_key.as_ref().map(|k| k.public_key().key_id()),
        rollback_on_failure: def.auto_rollback.on_failure,
        rollback_on_alarm: def.auto_rollback.on_alarm,
        alarms: def.alarms.clone(),
        health_url: opts.health_url.clone().or_else(|| def.health_url.clone()),
        health_grace_seconds: def.health_grace_seconds,
        zonal: def.zonal,
        notifications: def.notifications.clone(),
        ignore_application_stop_failures: opts.ignore_application_stop_failures
            || def.ignore_application_stop_failures,
    };
    let record = rollout::new_record(NewRollout {
        deployment_id: deployment_id.clone(),
        application: def.application.clone(),
        deployment_group: def.name.clone(),
        revision: info.revision.clone(),
        commit_sha: info.commit.clone(),
        commit_time: info.commit_time,
        creator: creator(),
        config,
        hosts,
        require_approval: opts.require_approval || def.require_approval,
        rollback_of: None,
        settings,
    });
    rollout::command_for(
        &record,
        &serde_json::from_value(record.settings.clone()).expect("just built"),
    )?;
    rollout::create(fleet.store.as_ref(), &record).await?;
    note_latest(fleet.store.as_ref(), &def.name, &deployment_id).await;
    if !opts.json {
        println!("{deployment_id}");
    }
    eprintln!(
        "deployment {deployment_id} of {} to group {} ({} host(s), {}, minimum {})",
        super::revision::describe(&info),
        def.name,
        record.hosts.len(),
        record.config_name,
        rollout::describe_minimum(record.minimum_healthy_hosts)
    );
    drive(
        fleet,
        clients.as_ref(),
        signing_key.as_ref(),
        &deployment_id,
        opts.poll,
        opts.lease,
        opts.json,
    )
    .await
}

/// Points the group's `latest` at `deployment_id` (best effort: only `pier rollback` without
/// `--to` reads it, and says so when it is missing).
async fn note_latest(store: &dyn ObjectStore, group: &str, deployment_id: &str) {
    let body =
        serde_json::to_vec(&serde_json::json!({ "deployment_id": deployment_id })).expect("json");
    if let Err(e) = store
        .put(&rollout::latest_key(group), body, Precondition::None)
        .await
    {
        eprintln!("warning: cannot record {deployment_id} as the group's latest: {e}");
    }
}

/// Drives a stored deployment to its end and reports it, then drives the rollback it caused,
/// if any; the exit code says whether the first one succeeded.
async fn drive(
    fleet: &Fleet,
    clients: Option<&AwsClients>,
    signing_key: Option<&pier_protocol::signature::SecretKey>,
    deployment_id: &str,
    poll: Duration,
    lease: Duration,
    json: bool,
) -> Result<i32, ControllerError> {
    let sink_target = pier_protocol::StatusTarget {
        sink: fleet.spec.clone(),
        notify_queue_url: None,
    };
    let sink = pier_transport::open_status_sink(&sink_target, clients)
        .map_err(|e| ControllerError::transport("cannot open the status store", e))?;
    let progress = live_line();
    let driver = Driver {
        store: fleet.store.as_ref(),
        sink: sink.as_ref(),
        aws: clients,
        owner: rollout::owner_id(),
        signing_key,
        poll,
        reconcile_every: Duration::from_secs(30),
        lease,
        progress: progress.clone(),
    };
    let mut current = deployment_id.to_string();
    let mut code = None;
    loop {
        let ctrl_c = tokio::signal::ctrl_c();
        let record = tokio::select! {
            r = drive_riding_out(&driver, &current) => r?,
            _ = ctrl_c => {
                eprintln!(
                    "interrupted: deployment {current} is left as recorded; carry on with \
                     pier deploy --resume {current}"
                );
                return Ok(130);
            }
        };
        progress.finish_and_clear();
        let this = report(&record);
        if code.is_none() && json {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&record.to_json());
            let _ = writeln!(out);
        }
        code.get_or_insert(this);
        match &record.rolled_back_by {
            Some(next) if record.rollback_of.is_none() => current = next.clone(),
            _ => return Ok(code.unwrap_or(this)),
        }
    }
}

/// Drives `deployment_id`, starting the driver again after a transient failure (the store
/// or a queue unreachable for longer than one call's retries) for up to ten minutes: the
/// record holds everything, so a restarted driver carries on where it was. A failure that
/// lasts says how to carry on later.
async fn drive_riding_out(
    driver: &Driver<'_>,
    deployment_id: &str,
) -> Result<DeploymentRecord, ControllerError> {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut backoff = pier_sys::backoff::Backoff::network();
    loop {
        match driver.drive(deployment_id).await {
            Ok(r) => return Ok(r),
            Err(e) if e.is_transient() && tokio::time::Instant::now() < give_up => {
                let delay = backoff.next_delay().unwrap_or(Duration::from_secs(10));
                eprintln!(
                    "deployment {deployment_id}: {e}; carrying on in {} s",
                    delay.as_secs().max(1)
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                eprintln!(
                    "deployment {deployment_id} is left as recorded; carry it on with pier \
                     deploy --resume {deployment_id} once this is fixed"
                );
                return Err(e);
            }
        }
    }
}

/// On a terminal, a live line under the rollout's log: batch and hosts per state. Hidden
/// otherwise, so CI logs get plain lines.
fn live_line() -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .expect("the template is valid"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Prints the end of a rollout on stderr; 0 only when it succeeded.
fn report(record: &DeploymentRecord) -> i32 {
    for (h, host) in &record.hosts {
        if host.state == HostRolloutState::Failed {
            eprintln!(
                "{h}: failed: {}",
                host.error.as_deref().unwrap_or("no reason recorded")
            );
        }
    }
    eprintln!(
        "deployment {} {:?} ({}){}",
        record.deployment_id,
        record.status,
        rollout::summary(record),
        record
            .status_reason
            .as_ref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    if record.status == RolloutStatus::Succeeded {
        0
    } else {
        EXIT_FAILURE
    }
}

/// `pier deploy --resume ID`: carries on a deployment another controller was driving once
/// its lease has run out.
pub async fn resume(
    fleet: &Fleet,
    deployment_id: &str,
    signing_key: Option<&Path>,
    aws: &AwsOptions,
    poll: Duration,
    lease: Duration,
    json: bool,
) -> Result<i32, ControllerError> {
    let loaded = rollout::load_existing(fleet.store.as_ref(), deployment_id).await?;
    let key = signing_key
        .map(super::signing::load_signing_key)
        .transpose()?;
    let clients = rollout_clients(fleet, &loaded.record, aws).await?;
    drive(
        fleet,
        clients.as_ref(),
        key.as_ref(),
        deployment_id,
        poll,
        lease,
        json,
    )
    .await
}

/// `pier stop ID [--rollback]`: nothing more is dispatched; with `rollback`, the hosts that
/// got the deployment go back to the group's last successful revision (driven here, to its
/// end).
pub async fn stop(
    fleet: &Fleet,
    deployment_id: &str,
    rollback: bool,
    signing_key: Option<&Path>,
    aws: &AwsOptions,
    poll: Duration,
) -> Result<i32, ControllerError> {
    stop_as(
        fleet,
        deployment_id,
        rollback,
        signing_key,
        aws,
        poll,
        &creator(),
    )
    .await
}

/// [`stop`], recording `who` stopped it (the dashboard names its user).
pub async fn stop_as(
    fleet: &Fleet,
    deployment_id: &str,
    rollback: bool,
    signing_key: Option<&Path>,
    aws: &AwsOptions,
    poll: Duration,
    who: &str,
) -> Result<i32, ControllerError> {
    let key = signing_key
        .map(super::signing::load_signing_key)
        .transpose()?;
    let reason = format!("stopped by {who}");
    let store = fleet.store.as_ref();
    let mut stopped_here = false;
    let rec = rollout::update(store, deployment_id, |rec| {
        if rec.status.is_final() {
            return Ok(false);
        }
        rollout::finish(rec, RolloutStatus::Stopped, Some(reason.clone()));
        stopped_here = true;
        Ok(true)
    })
    .await?;
    eprintln!(
        "deployment {deployment_id} {:?} ({})",
        rec.status,
        rollout::summary(&rec)
    );
    if stopped_here {
        // The stop is this command's write, so its announcement is this command's too.
        let clients = rollout_clients(fleet, &rec, aws).await?;
        rollout::announce_event(&rec, TriggerEvent::DeploymentStop, clients.as_ref()).await;
    }
    if !rollback {
        return Ok(0);
    }
    let Some(id) = rollout::claim_rollback_of(store, deployment_id).await? else {
        return Ok(EXIT_FAILURE);
    };
    let rec = rollout::load_existing(store, deployment_id).await?.record;
    let clients = rollout_clients(fleet, &rec, aws).await?;
    rollout::ensure_rollback(store, &rec, clients.as_ref()).await?;
    rollout::announce_event(&rec, TriggerEvent::DeploymentRollback, clients.as_ref()).await;
    drive(
        fleet,
        clients.as_ref(),
        key.as_ref(),
        &id,
        poll,
        rollout::DEFAULT_LEASE,
        false,
    )
    .await
}

/// The AWS clients a stored rollout's delivery needs.
async fn rollout_clients(
    fleet: &Fleet,
    rec: &DeploymentRecord,
    aws: &AwsOptions,
) -> Result<Option<AwsClients>, ControllerError> {
    let settings: RolloutSettings =
        serde_json::from_value(rec.settings.clone()).map_err(|e| ControllerError::Record {
            location: rollout::record_key(&rec.deployment_id),
            message: format!("settings: {e}"),
        })?;
    Ok(match (&settings.delivery, &fleet.clients) {
        (_, Some(c)) => Some(c.clone()),
        (Delivery::Sqs { .. }, None) => Some(aws.clients().await?),
        (_, None) if !settings.alarms.is_empty() || has_sns(&settings.notifications) => {
            Some(aws.clients().await?)
        }
        (_, None) => None,
    })
}

/// `pier rollback --deployment-group G [--to DEPLOYMENT_ID]`: the hosts that got the group's
/// latest deployment go back to the revision of `to` (default: the group's last success).
pub async fn rollback(
    fleet: &Fleet,
    group: &str,
    to: Option<&str>,
    signing_key: Option<&Path>,
    aws: &AwsOptions,
    poll: Duration,
) -> Result<i32, ControllerError> {
    rollback_as(fleet, group, to, signing_key, aws, poll, None).await
}

/// [`rollback`], recording `who` asked for it as the rollback's creator (the dashboard's
/// actor); without, the creator of the deployment rolled back, as an automatic rollback does.
pub async fn rollback_as(
    fleet: &Fleet,
    group: &str,
    to: Option<&str>,
    signing_key: Option<&Path>,
    aws: &AwsOptions,
    poll: Duration,
    who: Option<String>,
) -> Result<i32, ControllerError> {
    let key = signing_key
        .map(super::signing::load_signing_key)
        .transpose()?;
    let store = fleet.store.as_ref();
    check_group_name(group)?;
    let latest = store
        .get(&rollout::latest_key(group))
        .await
        .map_err(|e| ControllerError::transport("cannot read the group's latest deployment", e))?
        .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v.bytes).ok())
        .and_then(|v| v["deployment_id"].as_str().map(str::to_string))
        .ok_or_else(|| {
            ControllerError::usage(
                "--deployment-group",
                format!("group `{group}` has no recorded deployment to roll back"),
            )
        })?;
    let latest_rec = rollout::load_existing(store, &latest).await?.record;
    if !latest_rec.status.is_final() {
        return Err(ControllerError::usage(
            "--deployment-group",
            format!(
                "the group's latest deployment {latest} is {:?}; stop it first (pier stop \
                 {latest} --rollback)",
                latest_rec.status
            ),
        ));
    }
    let target = match to {
        Some(id) => {
            let r = rollout::load_existing(store, id).await?.record;
            if r.deployment_group != group {
                return Err(ControllerError::usage(
                    "--to",
                    format!(
                        "{id} is a deployment of group {}, not {group}",
                        r.deployment_group
                    ),
                ));
            }
            rollout::LastSuccess {
                deployment_id: r.deployment_id,
                revision: r.revision,
                commit_sha: r.commit_sha,
                commit_time: r.commit_time,
                ended_at: r.ended_at.unwrap_or(r.created_at),
            }
        }
        None => rollout::last_success(store, group).await?.ok_or_else(|| {
            ControllerError::usage(
                "--to",
                format!("group `{group}` has no successful deployment to go back to; name one"),
            )
        })?,
    };
    if target.deployment_id == latest {
        return Err(ControllerError::usage(
            "--to",
            format!("{latest} is the group's latest deployment already; name an earlier one"),
        ));
    }
    if rollout::hosts_reached(&latest_rec).is_empty() {
        eprintln!("nothing to roll back: {latest} reached no host");
        return Ok(EXIT_FAILURE);
    }
    if let Some(by) = &latest_rec.rolled_back_by {
        eprintln!("{latest} is already rolled back by {by}");
        return Ok(EXIT_FAILURE);
    }
    // The rollback (with its target) is stored first and linked second, so that a command
    // that dies in between leaves an unlinked record, never a link to a record that would
    // later be made to another revision.
    let id = pier_protocol::new_deployment_id();
    let clients = rollout_clients(fleet, &latest_rec, aws).await?;
    rollout::create_rollback(store, &latest_rec, &id, target, clients.as_ref(), who).await?;
    let linked = rollout::update(store, &latest, |r| {
        if r.rolled_back_by.is_some() {
            return Ok(false);
        }
        r.rolled_back_by = Some(id.clone());
        Ok(true)
    })
    .await?;
    if linked.rolled_back_by.as_deref() != Some(id.as_str()) {
        let _ = store.delete(&rollout::record_key(&id)).await;
        eprintln!(
            "{latest} was rolled back by {} meanwhile",
            linked.rolled_back_by.unwrap_or_default()
        );
        return Ok(EXIT_FAILURE);
    }
    rollout::announce_event(&linked, TriggerEvent::DeploymentRollback, clients.as_ref()).await;
    drive(
        fleet,
        clients.as_ref(),
        key.as_ref(),
        &id,
        poll,
        rollout::DEFAULT_LEASE,
        false,
    )
    .await
}

/// `pier approve ID` / `pier reject ID`: decides a deployment held for approval, recording
/// who and when.
pub async fn decide(
    fleet: &Fleet,
    deployment_id: &str,
    approved: bool,
    comment: Option<String>,
    aws: &AwsOptions,
) -> Result<i32, ControllerError> {
    decide_as(fleet, deployment_id, approved, comment, &creator(), aws).await
}

/// [`decide`], recording `who` decided (the dashboard names its user).
pub async fn decide_as(
    fleet: &Fleet,
    deployment_id: &str,
    approved: bool,
    comment: Option<String>,
    who: &str,
    aws: &AwsOptions,
) -> Result<i32, ControllerError> {
    let who = who.to_string();
    let rec = rollout::update(fleet.store.as_ref(), deployment_id, |rec| {
        if rec.status != RolloutStatus::PendingApproval {
            return Err(ControllerError::usage(
                "DEPLOYMENT_ID",
                format!(
                    "deployment {deployment_id} is {:?}, not waiting for approval",
                    rec.status
                ),
            ));
        }
        rec.approval = Some(Approval {
            approved,
            by: who.clone(),
            at: Utc::now(),
            comment: comment.clone(),
        });
        if approved {
            rec.status = RolloutStatus::InProgress;
        } else {
            rec.status = RolloutStatus::Failed;
            rec.status_reason = Some(format!("rejected by {who}"));
            rec.ended_at = Some(Utc::now());
            for h in rec.hosts.values_mut() {
                h.state = HostRolloutState::Skipped;
            }
        }
        Ok(true)
    })
    .await?;
    eprintln!("deployment {deployment_id} {:?}", rec.status);
    if !approved {
        let clients = rollout_clients(fleet, &rec, aws).await?;
        rollout::announce_event(&rec, TriggerEvent::DeploymentFailure, clients.as_ref()).await;
    }
    Ok(0)
}
