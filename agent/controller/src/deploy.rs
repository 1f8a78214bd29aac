//! `pier deploy`: send one deployment to a set of hosts, and optionally follow it to the end.
//!
//! The revision is resolved first ([`super::revision::resolve`]: its sha256 must be known),
//! then one [`Command`] per host is built (one deployment id for all, the creator
//! `$USER@hostname`, the commit the revision was pushed from, where to write status) and
//! checked exactly as an agent will check it. Every host's queue is found before anything is
//! sent, so a host without a queue does not leave a half-sent deployment behind. The SQS
//! transport sends to the queue `pier-{host}` (or a `--queue-url-template`), the spool
//! transport drops `{deployment_id}.json` into the host's spool directory. With
//! `--signing-key`, what is sent is the command's exact bytes in a signed envelope
//! ([`pier_protocol::signature::sign`]); the key is read before anything is sent. With `--wait`,
//! [`follow`] reads every host's status record until all are final, printing each event as
//! it changes, and the exit code says whether every host succeeded.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::revision::{resolve, RevisionInfo, RevisionOverrides};
use super::status::{describe_sink, duration, event_word, failure_report, open_sink, SinkOptions};
use super::{AwsOptions, ControllerError, EXIT_FAILURE};
use pier_protocol::{
    is_valid_id, parse_events, Command, DeploymentStatus, EventState, FileExistsBehavior,
    StatusRecord, StatusSinkSpec, StatusTarget, COMMAND_VERSION,
};
use pier_sys::backoff::Backoff;
use pier_transport::spool::Spool;
use pier_transport::sqs::{QueueSpec, SqsQueue};
use pier_transport::StatusSink;

/// The spool directory of a single host's agent by default (`ROOT/spool` under the agent's
/// default root).
pub(crate) fn default_spool_dir() -> String {
    format!(
        "{}/{}",
        pier_protocol::DEFAULT_ROOT_DIR,
        pier_protocol::SPOOL_DIR_NAME
    )
}

/// How commands reach the hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// One SQS queue per host.
    Sqs,
    /// A local spool directory per host.
    Spool,
}

/// What `pier deploy` was asked to do, as given on the command line (checked by [`deploy`]).
#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// `--application`.
    pub application: String,
    /// `--deployment-group`: the group's name.
    pub deployment_group: String,
    /// `--deployment-group-id`: defaults to the group's name.
    pub deployment_group_id: Option<String>,
    /// `--revision`: `s3://BUCKET/KEY[?versionId=V]`, a local path, `@revision.json`, or an
    /// `http(s)://` URL.
    pub revision: String,
    /// `--sha256` and `--bundle-type`, for revisions that do not record them.
    pub overrides: RevisionOverrides,
    /// `--hosts`: the target host ids.
    pub hosts: Vec<String>,
    /// `--transport`; `None` picks SQS when a queue template or status bucket is given, the
    /// spool otherwise.
    pub transport: Option<TransportKind>,
    /// `--spool-dir`: one host's spool, or a template containing `{host}`.
    pub spool_dir: Option<String>,
    /// `--queue-url-template`: `https://.../pier-{host}` instead of looking queues up by name.
    pub queue_url_template: Option<String>,
    /// Where hosts write status.
    pub sink: SinkOptions,
    /// `--events`: a subset of lifecycle events.
    pub events: Option<Vec<String>>,
    /// `--file-exists-behavior`.
    pub file_exists_behavior: Option<String>,
    /// `--ignore-application-stop-failures`.
    pub ignore_application_stop_failures: bool,
    /// `--signing-key` (or `PIER_SIGNING_KEY`): sign each command with this secret key file.
    pub signing_key: Option<PathBuf>,
    /// `--wait`: follow the deployment to its end.
    pub wait: bool,
    /// `--timeout`: give up waiting after this long.
    pub timeout: Option<Duration>,
    /// How often status is read while waiting.
    pub poll_interval: Duration,
    /// How to reach AWS.
    pub aws: AwsOptions,
}

/// Where one host's command goes.
enum Destination {
    Sqs(SqsQueue),
    Spool(PathBuf),
}

impl Destination {
    fn describe(&self) -> String {
        match self {
            Destination::Sqs(q) => format!("SQS queue {}", q.url()),
            Destination::Spool(d) => format!("spool {}", d.display()),
        }
    }
}

/// Sends the deployment and, with `--wait`, follows it. Prints the deployment id on stdout
/// (alone on its line, for scripts) and everything else on stderr. Returns the exit code: 0
/// when sent (or, waiting, when every host succeeded), 1 when a host failed or the wait
/// timed out.
pub async fn deploy(opts: &DeployOptions) -> Result<i32, ControllerError> {
    check_hosts(&opts.hosts)?;
    let group_id = match &opts.deployment_group_id {
        Some(id) => id.clone(),
        None if is_valid_id(&opts.deployment_group) => opts.deployment_group.clone(),
        None => {
            return Err(ControllerError::usage(
                "--deployment-group-id",
                format!(
                    "the group name `{}` cannot serve as its id (letters, digits, `.`, `_`, \
                     `-` only); pass --deployment-group-id",
                    opts.deployment_group
                ),
            ))
        }
    };
    check_events(opts.events.as_deref())?;
    if let Some(b) = &opts.file_exists_behavior {
        if let Err(e) = b.parse::<FileExistsBehavior>() {
            return Err(ControllerError::usage(
                "--file-exists-behavior",
                e.to_string(),
            ));
        }
    }
    let transport = opts.transport.unwrap_or(
        if opts.queue_url_template.is_some() || opts.sink.status_bucket.is_some() {
            TransportKind::Sqs
        } else {
            TransportKind::Spool
        },
    );
    let sink_spec = opts.sink.spec(transport == TransportKind::Spool)?;
    let signing_key = opts
        .signing_key
        .as_deref()
        .map(super::signing::load_signing_key)
        .transpose()?;
    let info = with_retries("reading the revision", || {
        resolve(&opts.revision, &opts.overrides, &opts.aws)
    })
    .await?;
    let target = StatusTarget {
        sink: sink_spec.clone(),
        notify_queue_url: None,
    };
    let deployment_id = pier_protocol::new_deployment_id();
    let cmd = build_command(&deployment_id, opts, &group_id, &info, target)?;
    let body = match &signing_key {
        Some(key) => {
            eprintln!("signing with key {}", key.public_key().key_id());
            pier_protocol::signature::sign(&cmd.to_json(), key)
        }
        None => cmd.to_json(),
    };

    index_adhoc(&sink_spec, &deployment_id, opts).await;

    let destinations = with_retries("finding the hosts' queues", || {
        destinations(opts, transport)
    })
    .await?;
    for (host, dest) in opts.hosts.iter().zip(&destinations) {
        match dest {
            Destination::Sqs(q) => {
                // A send whose answer was lost may have arrived: sending it again is safe,
                // as an agent runs a deployment id once however often it is delivered.
                with_retries(&format!("sending to {host}"), || async {
                    q.send(&body).await.map_err(|e| {
                        ControllerError::transport(
                            format!("host {host}: cannot send the command"),
                            e,
                        )
                    })
                })
                .await?;
            }
            Destination::Spool(dir) => {
                Spool::submit(dir, &format!("{deployment_id}.json"), &body).map_err(|e| {
                    ControllerError::transport(format!("host {host}: cannot spool the command"), e)
                })?;
            }
        }
        eprintln!("{host}: sent to {}", dest.describe());
    }
    println!("{deployment_id}");
    eprintln!(
        "deployment {deployment_id} of {} to {} host(s); status in {}",
        super::revision::describe(&info),
        opts.hosts.len(),
        describe_sink(&sink_spec)
    );
    if !opts.wait {
        return Ok(0);
    }
    let sink = open_sink(&sink_spec, &opts.aws).await?;
    let outcome = follow(
        sink.as_ref(),
        &deployment_id,
        &opts.hosts,
        opts.timeout,
        opts.poll_interval,
    )
    .await;
    Ok(report(&deployment_id, &opts.hosts, &outcome))
}

fn check_hosts(hosts: &[String]) -> Result<(), ControllerError> {
    if hosts.is_empty() {
        return Err(ControllerError::usage(
            "--hosts",
            "name at least one host: --hosts H1,H2",
        ));
    }
    for (i, h) in hosts.iter().enumerate() {
        if !is_valid_id(h) {
            return Err(ControllerError::usage(
                "--hosts",
                format!("`{h}` is not a host id (letters, digits, `.`, `_`, `-`)"),
            ));
        }
        if hosts[..i].contains(h) {
            return Err(ControllerError::usage(
                "--hosts",
                format!("`{h}` is listed twice"),
            ));
        }
    }
    Ok(())
}

/// Refuses unknown events and events out of lifecycle order before anything is sent, with
/// the rule the agent itself applies.
pub(crate) fn check_events(events: Option<&[String]>) -> Result<(), ControllerError> {
    if let Some(events) = events {
        parse_events(events).map_err(|e| ControllerError::usage("--events", e.to_string()))?;
    }
    Ok(())
}

/// The command every host gets, checked with the agent's own parser so that a command the
/// agents would reject is never sent.
pub(crate) fn build_command(
    deployment_id: &str,
    opts: &DeployOptions,
    group_id: &str,
    info: &RevisionInfo,
    status: StatusTarget,
) -> Result<Command, ControllerError> {
    let cmd = Command {
        version: COMMAND_VERSION,
        deployment_id: deployment_id.to_string(),
        application_name: opts.application.clone(),
        deployment_group_name: opts.deployment_group.clone(),
        deployment_group_id: group_id.to_string(),
        revision: info.revision.clone(),
        events: opts.events.clone(),
        file_exists_behavior: opts.file_exists_behavior.clone(),
        is_rollback: false,
        creator: Some(creator()),
        commit_sha: info.commit.clone(),
        ignore_application_stop_failures: opts.ignore_application_stop_failures,
        status,
        created_at: chrono::Utc::now(),
    };
    Command::from_json(&cmd.to_json())?;
    Ok(cmd)
}

/// Puts a `--hosts` deployment in the deployment index ([`super::index`]) of its status
/// store, so the dashboard lists it beside stored-group rollouts. It has no record of its
/// own: the hosts' status records are all there is. Best effort: a store this user cannot
/// write (an agent's status directory owned by root) costs the deployment nothing, and the
/// dashboard's backfill finds it later.
async fn index_adhoc(spec: &StatusSinkSpec, deployment_id: &str, opts: &DeployOptions) {
    let clients = match spec {
        StatusSinkSpec::S3 { .. } => match opts.aws.clients().await {
            Ok(c) => Some(c),
            Err(_) => return,
        },
        StatusSinkSpec::Local { .. } => None,
    };
    let Ok(store) = pier_transport::open_store(spec, clients.as_ref()) else {
        return;
    };
    if let Err(e) = super::index::add(
        store.as_ref(),
        deployment_id,
        chrono::Utc::now(),
        &opts.application,
        &opts.deployment_group,
    )
    .await
    {
        log::info!("deployment {deployment_id} not indexed: {e}");
    }
}

/// `$USER@hostname`, for the deployment's history.
pub(crate) fn creator() -> String {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_else(|| "unknown".into());
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{host}")
}

/// Every host's destination, in host order; fails before anything is sent.
async fn destinations(
    opts: &DeployOptions,
    transport: TransportKind,
) -> Result<Vec<Destination>, ControllerError> {
    match transport {
        TransportKind::Spool => {
            let default = default_spool_dir();
            let template = opts.spool_dir.as_deref().unwrap_or(&default);
            if !template.contains("{host}") && opts.hosts.len() > 1 {
                return Err(ControllerError::usage(
                    "--spool-dir",
                    "several hosts cannot share one spool directory (each would take the \
                     others' commands): use a template such as /srv/{host}/spool",
                ));
            }
            opts.hosts
                .iter()
                .map(|h| {
                    let dir = PathBuf::from(template.replace("{host}", h));
                    Ok(Destination::Spool(super::absolute(&dir)?))
                })
                .collect()
        }
        TransportKind::Sqs => {
            if let Some(t) = &opts.queue_url_template {
                if !t.contains("{host}") && opts.hosts.len() > 1 {
                    return Err(ControllerError::usage(
                        "--queue-url-template",
                        "must contain {host} when deploying to several hosts",
                    ));
                }
            }
            let clients = opts.aws.clients().await?;
            let mut out = Vec::new();
            for h in &opts.hosts {
                let spec = QueueSpec {
                    url: opts
                        .queue_url_template
                        .as_ref()
                        .map(|t| t.replace("{host}", h)),
                    // Creating a host's queue is its agent's business: a queue nobody
                    // polls would swallow the command silently.
                    create: false,
                    ..QueueSpec::for_host(h)
                };
                let q = SqsQueue::open(clients.sqs.clone(), &spec)
                    .await
                    .map_err(|e| {
                        ControllerError::transport(
                            format!(
                                "host {h}: cannot find its queue `{}` (is its agent set up? \
                                 or pass --queue-url-template)",
                                spec.name
                            ),
                            e,
                        )
                    })?;
                out.push(Destination::Sqs(q));
            }
            Ok(out)
        }
    }
}

/// Runs `op` until it succeeds, fails for good, or has failed transiently (a network fault,
/// a 5xx) through the network backoff's attempts, saying on stderr what it retries.
pub(crate) async fn with_retries<T, F, Fut>(what: &str, mut op: F) -> Result<T, ControllerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ControllerError>>,
{
    let mut backoff = Backoff::network();
    loop {
        match op().await {
            Err(e) if e.is_transient() => match backoff.next_delay() {
                Some(delay) => {
                    eprintln!("{what}: {e}; retrying in {} ms", delay.as_millis());
                    tokio::time::sleep(delay).await;
                }
                None => return Err(e),
            },
            done => return done,
        }
    }
}

/// How following a deployment ended.
#[derive(Debug, Clone)]
pub(crate) struct FollowOutcome {
    /// Each host's last record (`None`: never reported).
    pub(crate) records: HashMap<String, StatusRecord>,
    /// Whether the timeout passed before every host was final.
    pub(crate) timed_out: bool,
    /// Whether the operator interrupted the wait (Ctrl-C).
    pub(crate) interrupted: bool,
}

/// Reads every host's record every `poll` until all are final (or `timeout` passes),
/// printing each event's changes on stderr as `host: Event Status (duration)`. A read that
/// fails is reported once per host and retried at the next poll: the records stay in the
/// store, so a hiccup loses nothing.
pub(crate) async fn follow(
    sink: &dyn StatusSink,
    deployment_id: &str,
    hosts: &[String],
    timeout: Option<Duration>,
    poll: Duration,
) -> FollowOutcome {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut records: HashMap<String, StatusRecord> = HashMap::new();
    let mut shown: HashMap<(String, String), EventState> = HashMap::new();
    let mut warned: HashMap<String, String> = HashMap::new();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        for host in hosts {
            if records.get(host).is_some_and(|r| r.status.is_final()) {
                continue;
            }
            match sink.read(deployment_id, host).await {
                Ok(Some(rec)) => {
                    print_changes(&rec, &mut shown);
                    if rec.status.is_final() {
                        eprintln!("{host}: {}", super::status::overall_word(rec.status));
                    }
                    records.insert(host.clone(), rec);
                    warned.remove(host);
                }
                Ok(None) => {}
                Err(e) => {
                    let msg = e.to_string();
                    if warned.get(host) != Some(&msg) {
                        eprintln!("{host}: cannot read status yet ({msg}); retrying");
                        warned.insert(host.clone(), msg);
                    }
                }
            }
        }
        let done = hosts
            .iter()
            .all(|h| records.get(h).is_some_and(|r| r.status.is_final()));
        if done {
            return FollowOutcome {
                records,
                timed_out: false,
                interrupted: false,
            };
        }
        let now = tokio::time::Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return FollowOutcome {
                records,
                timed_out: true,
                interrupted: false,
            };
        }
        let wake = deadline.map_or(now + poll, |d| d.min(now + poll));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = &mut ctrl_c => {
                return FollowOutcome { records, timed_out: false, interrupted: true };
            }
        }
    }
}

fn print_changes(rec: &StatusRecord, shown: &mut HashMap<(String, String), EventState>) {
    for e in &rec.events {
        if e.status == EventState::Pending {
            continue;
        }
        let key = (rec.host_id.clone(), e.name.clone());
        if shown.get(&key) == Some(&e.status) {
            continue;
        }
        let took = duration(e.started, e.ended)
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        let code = e
            .diagnostics
            .as_ref()
            .map(|d| format!(" [{}]", d.error_code))
            .unwrap_or_default();
        eprintln!(
            "{}: {:<18} {}{took}{code}",
            rec.host_id,
            e.name,
            event_word(e)
        );
        shown.insert(key, e.status);
    }
}

/// Prints the end of a followed deployment on stderr and returns the exit code: 0 only when
/// every host succeeded; otherwise each failed host's report, and the hosts that never
/// finished.
pub(crate) fn report(deployment_id: &str, hosts: &[String], outcome: &FollowOutcome) -> i32 {
    let mut ok = true;
    for h in hosts {
        match outcome.records.get(h) {
            Some(r) if r.status == DeploymentStatus::Succeeded => {}
            Some(r) if r.status == DeploymentStatus::Failed => {
                ok = false;
                eprint!("{}", failure_report(r));
            }
            Some(_) => {
                ok = false;
                eprintln!("{h}: still in progress");
            }
            None => {
                ok = false;
                eprintln!(
                    "{h}: no status yet; is its agent running and polling its queue or spool?"
                );
            }
        }
    }
    if outcome.interrupted {
        eprintln!("stopped waiting; the deployment goes on: pier status {deployment_id} shows it");
    } else if outcome.timed_out {
        eprintln!(
            "timed out waiting for deployment {deployment_id}; pier status {deployment_id} \
             shows where it is"
        );
    }
    if ok {
        eprintln!("deployment {deployment_id} succeeded on every host");
        0
    } else {
        eprintln!("deployment {deployment_id} did not succeed on every host");
        EXIT_FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3_error(transient: bool) -> ControllerError {
        ControllerError::S3 {
            op: "HeadObject",
            location: "s3://b/k".into(),
            message: "connection reset".into(),
            transient,
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_and_lasting_ones_are_not() {
        let calls = std::cell::Cell::new(0);
        let got = with_retries("test", || async {
            calls.set(calls.get() + 1);
            if calls.get() < 3 {
                Err(s3_error(true))
            } else {
                Ok(calls.get())
            }
        })
        .await;
        assert_eq!(got.unwrap(), 3);

        calls.set(0);
        let got: Result<(), _> = with_retries("test", || async {
            calls.set(calls.get() + 1);
            Err(s3_error(false))
        })
        .await;
        assert!(got.is_err());
        assert_eq!(calls.get(), 1, "a lasting failure is not retried");
    }

    #[test]
    fn hosts_and_events_are_checked() {
        assert!(check_hosts(&["a".into(), "b-1.x".into()]).is_ok());
        for bad in [
            vec![],
            vec!["a/b".to_string()],
            vec!["a".into(), "a".into()],
        ] {
            let e = check_hosts(&bad).unwrap_err();
            assert!(e.to_string().starts_with("--hosts:"), "{e}");
        }
        let e = check_events(Some(&["Install".into(), "Deploy".into()])).unwrap_err();
        assert!(e.to_string().contains("`Deploy`"), "{e}");
    }
}
