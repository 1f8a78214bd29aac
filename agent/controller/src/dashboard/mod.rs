//! `pier dashboard`: a small web server over the store the CLI reads, for people who would
//! rather look at a rollout than read a table. Pages: the deployment list, one deployment
//! (configuration, batches, per-host timelines, live while it runs), the hosts, the DORA
//! metrics; and the actions the controller has (approve, reject, stop, roll back), each
//! behind a token. Every page has a JSON twin under `/api/`.
//!
//! What it reads and how is [`data`]'s; how it looks is [`pages`]'s (server-rendered HTML and
//! inline SVG; the only script, embedded like the style sheet, refreshes a running
//! deployment and sends actions). This module owns the server: the routes, the address
//! rules, and the guard on actions.
//!
//! # Security
//! Reading is open to whoever reaches the address, which is loopback unless `--listen` says
//! otherwise (and then a token must be configured, or the command refuses to start). Actions
//! are `POST`s that need the token in an `X-Pier-Token` header, never a cookie, so another
//! site cannot make a browser send it: a cross-site request cannot set that header without a
//! CORS preflight, which this server never grants. A `POST` must also carry an `Origin` equal
//! to the address asked for (`Host`), and on a loopback address `Host` itself must be a
//! loopback name, so a DNS-rebound name cannot read the pages either.

pub mod data;
pub mod pages;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;

use crate::fleet::Fleet;
use crate::history::{self, HistoryFilter};
use crate::status::SinkOptions;
use crate::{AwsOptions, ControllerError};

/// Where the dashboard listens unless `--listen` says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7450";
/// Rows on a page of the deployment list. Each row is one read of a record (S3 GET): 25
/// keeps a page well inside 200 ms even where the store answers one request at a time.
pub const PAGE_SIZE: usize = 25;
/// How often the index is checked for deployments it misses (written by a controller that
/// does not index, or before the index existed).
const BACKFILL_EVERY: Duration = Duration::from_secs(300);
/// The header an action's token travels in.
pub const TOKEN_HEADER: &str = "x-pier-token";

/// What `pier dashboard` was asked.
#[derive(Debug, Clone)]
pub struct DashboardOptions {
    /// `ADDR:PORT` to bind (port 0: any free port; the address chosen is printed).
    pub listen: String,
    /// The actions' token; `None`: a random one, printed at start (loopback only).
    pub token: Option<String>,
    /// The store (status bucket or directory).
    pub sink: SinkOptions,
    /// How to reach S3.
    pub aws: AwsOptions,
    /// Commit links for revisions that do not name their repository.
    pub repo_url: Option<String>,
    /// The key rollbacks are signed with (like `pier rollback --signing-key`).
    pub signing_key: Option<PathBuf>,
}

/// What every handler shares.
pub(crate) struct AppState {
    fleet: Arc<Fleet>,
    aws: AwsOptions,
    token: String,
    links: data::Links,
    signing_key: Option<PathBuf>,
    /// Whether the server is on a loopback address (then `Host` must be a loopback name).
    loopback: bool,
    port: u16,
}

type Shared = Arc<AppState>;

/// Checks the address and token rule before anything is opened: a non-loopback address
/// needs a configured token.
pub fn check_listen(listen: &str, token: Option<&str>) -> Result<SocketAddr, ControllerError> {
    let addr: SocketAddr = listen.parse().map_err(|_| {
        ControllerError::usage(
            "--listen",
            format!("`{listen}` is not ADDRESS:PORT (e.g. 127.0.0.1:7450 or [::1]:7450)"),
        )
    })?;
    if let Some(t) = token {
        if t.len() < 16 {
            return Err(ControllerError::usage(
                "--token",
                "use at least 16 characters (it is the only thing between a visitor and \
                 the approve, stop and rollback buttons)",
            ));
        }
    }
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(ControllerError::usage(
            "--listen",
            format!(
                "{addr} is reachable from other machines, and the dashboard can approve, stop \
                 and roll back deployments: give the token its actions require with --token \
                 (or PIER_DASHBOARD_TOKEN), and put TLS in front of it (a reverse proxy); or \
                 listen on 127.0.0.1 and reach it through an SSH tunnel"
            ),
        ));
    }
    Ok(addr)
}

/// A fresh random token: 32 hex digits.
fn random_token() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

/// `pier dashboard`: serves until interrupted (SIGINT or SIGTERM), then exits 0.
pub async fn run(opts: DashboardOptions) -> Result<i32, ControllerError> {
    let addr = check_listen(&opts.listen, opts.token.as_deref())?;
    let fleet = Arc::new(Fleet::open(&opts.sink, &opts.aws).await?);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ControllerError::usage("--listen", format!("cannot listen on {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| ControllerError::usage("--listen", e.to_string()))?;
    let printed_token = opts.token.is_none();
    let token = opts.token.clone().unwrap_or_else(random_token);
    let state = Arc::new(AppState {
        fleet: fleet.clone(),
        aws: opts.aws.clone(),
        token: token.clone(),
        links: data::Links {
            repo_url: opts.repo_url.clone(),
        },
        signing_key: opts.signing_key.clone(),
        loopback: local.ip().is_loopback(),
        port: local.port(),
    });
    let url = format!("http://{local}/");
    // stdout: the address alone, for scripts; stderr: the rest, for people.
    println!("{url}");
    if printed_token {
        eprintln!(
            "pier dashboard on {url} reading {}\nactions (approve, reject, stop, rollback) \
             need this token, asked for by the page: {token}\nor open {url}#token={token}",
            fleet.store.describe()
        );
    } else {
        eprintln!(
            "pier dashboard on {url} reading {}; actions need the configured token",
            fleet.store.describe()
        );
    }
    // Deployments the index misses: now, then now and again.
    let backfill_fleet = fleet.clone();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let started = std::time::Instant::now();
            match crate::index::backfill(backfill_fleet.store.as_ref()).await {
                // Said once: until then the list may miss deployments no index entry names
                // yet (made before the index existed, or by an older controller).
                Ok(n) if first => eprintln!(
                    "pier dashboard: deployment index checked in {:.1}s: {n} entr{} added",
                    started.elapsed().as_secs_f64(),
                    if n == 1 { "y" } else { "ies" }
                ),
                Ok(0) => {}
                Ok(n) => log::warn!("indexed {n} deployment(s) the index missed"),
                Err(e) => log::warn!("cannot bring the deployment index up to date: {e}"),
            }
            first = false;
            tokio::time::sleep(BACKFILL_EVERY).await;
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown())
        .await
        .map_err(|e| ControllerError::usage("--listen", format!("the server stopped: {e}")))?;
    Ok(0)
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The routes, with the host guard on all and the action guard on `POST`s.
pub(crate) fn router(state: Shared) -> Router {
    let actions = Router::new()
        .route("/api/deployments/{id}/approve", post(approve))
        .route("/api/deployments/{id}/reject", post(reject))
        .route("/api/deployments/{id}/stop", post(stop))
        .route("/api/groups/{group}/rollback", post(rollback))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard_action));
    Router::new()
        .route("/", get(|| async { Redirect::to("/deployments") }))
        .route("/deployments", get(list_page))
        .route("/deployments/{id}", get(deployment_page))
        .route("/deployments/{id}/live", get(deployment_live))
        .route("/hosts", get(hosts_page))
        .route("/dora", get(dora_page))
        .route("/api/deployments", get(list_json))
        .route("/api/deployments/{id}", get(deployment_json))
        .route("/api/hosts", get(hosts_json))
        .route("/api/dora", get(dora_json))
        .route("/assets/style.css", get(style))
        .route("/assets/dashboard.js", get(script))
        .merge(actions)
        .layer(middleware::from_fn_with_state(state.clone(), guard_host))
        .with_state(state)
}

/// A failure as the browser sees it: a status, and a sentence.
pub(crate) struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<ControllerError> for Failure {
    fn from(e: ControllerError) -> Failure {
        let code = if e.exit_code() == crate::EXIT_USAGE {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::BAD_GATEWAY
        };
        Failure(code, e.to_string())
    }
}

/// `Host` must name this server by a loopback name when it listens on loopback (a page
/// reached through a DNS-rebound name is refused).
async fn guard_host(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if s.loopback {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !is_loopback_host(host, s.port) {
            return Failure(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "this dashboard answers to 127.0.0.1:{0}, localhost:{0} or [::1]:{0} only",
                    s.port
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn is_loopback_host(host: &str, port: u16) -> bool {
    let names = ["127.0.0.1", "localhost", "[::1]"];
    names.iter().any(|n| host == format!("{n}:{port}"))
}

/// An action needs the token in [`TOKEN_HEADER`] and an `Origin` that is this server.
async fn guard_action(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Err(f) = check_action(&s.token, req.headers()) {
        return f.into_response();
    }
    next.run(req).await
}

fn check_action(token: &str, headers: &HeaderMap) -> Result<(), Failure> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let origin = headers.get(header::ORIGIN).and_then(|h| h.to_str().ok());
    match origin {
        Some(o) if o == format!("http://{host}") || o == format!("https://{host}") => {}
        Some(o) => {
            return Err(Failure(
                StatusCode::FORBIDDEN,
                format!("a request from {o} cannot act on this dashboard (cross-site)"),
            ))
        }
        None => {
            return Err(Failure(
                StatusCode::FORBIDDEN,
                "an action must come from the dashboard's own page (no Origin header)".into(),
            ))
        }
    }
    let given = headers
        .get(TOKEN_HEADER)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    if !constant_time_eq(given, token.as_bytes()) {
        return Err(Failure(
            StatusCode::UNAUTHORIZED,
            "this action needs the dashboard's token (printed by pier dashboard at start, or \
             the one it was given)"
                .into(),
        ));
    }
    Ok(())
}

/// Compares without stopping at the first difference, so the time taken does not tell how
/// much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The list's query string.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListParams {
    application: Option<String>,
    group: Option<String>,
    status: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

impl ListParams {
    fn query(&self) -> Result<data::ListQuery, Failure> {
        let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        Ok(data::ListQuery {
            application: nonempty(&self.application),
            deployment_group: nonempty(&self.group),
            status: nonempty(&self.status)
                .map(|s| history::parse_status("status", &s))
                .transpose()?,
            after: nonempty(&self.after),
            limit: self.limit.unwrap_or(PAGE_SIZE).clamp(1, 500),
        })
    }
}

async fn list_json(
    State(s): State<Shared>,
    Query(p): Query<ListParams>,
) -> Result<Json<data::ListPage>, Failure> {
    let q = p.query()?;
    Ok(Json(
        data::list(s.fleet.store.as_ref(), &q, &s.links).await?,
    ))
}

async fn list_page(
    State(s): State<Shared>,
    Query(p): Query<ListParams>,
) -> Result<Html<String>, Failure> {
    let q = p.query()?;
    let page = data::list(s.fleet.store.as_ref(), &q, &s.links).await?;
    Ok(Html(pages::list(&q, &page, &s.fleet.store.describe())))
}

async fn load_deployment(s: &AppState, id: &str) -> Result<data::DeploymentView, Failure> {
    if !pier_protocol::is_valid_id(id) {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            "not a deployment id".into(),
        ));
    }
    data::deployment(s.fleet.store.as_ref(), id, &s.links)
        .await?
        .ok_or_else(|| {
            Failure(
                StatusCode::NOT_FOUND,
                format!("no deployment {id} in {}", s.fleet.store.describe()),
            )
        })
}

async fn deployment_json(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<data::DeploymentView>, Failure> {
    Ok(Json(load_deployment(&s, &id).await?))
}

async fn deployment_page(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Html<String>, Failure> {
    let v = load_deployment(&s, &id).await?;
    Ok(Html(pages::deployment(&v)))
}

/// The part of a deployment's page that changes while it runs, for the page's script.
async fn deployment_live(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    match load_deployment(&s, &id).await {
        Ok(v) => {
            let mut r = Html(pages::deployment_live(&v)).into_response();
            let done = if v.is_final() { "1" } else { "0" };
            r.headers_mut()
                .insert("x-pier-final", HeaderValue::from_static(done));
            r
        }
        Err(f) => f.into_response(),
    }
}

async fn hosts_json(State(s): State<Shared>) -> Result<Json<Vec<data::HostView>>, Failure> {
    Ok(Json(
        data::hosts(s.fleet.store.as_ref(), Utc::now()).await?.0,
    ))
}

async fn hosts_page(State(s): State<Shared>) -> Result<Html<String>, Failure> {
    let (hosts, unreadable) = data::hosts(s.fleet.store.as_ref(), Utc::now()).await?;
    Ok(Html(pages::hosts(
        &hosts,
        &unreadable,
        &s.fleet.store.describe(),
    )))
}

/// The DORA page's query string: the CLI's `--since`, `--application`, `--deployment-group`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct DoraParams {
    since: Option<String>,
    application: Option<String>,
    group: Option<String>,
}

pub(crate) struct DoraQuery {
    since_text: String,
    filter: HistoryFilter,
}

impl DoraParams {
    fn query(&self) -> DoraQuery {
        let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        DoraQuery {
            since_text: nonempty(&self.since).unwrap_or_else(|| "30d".into()),
            filter: HistoryFilter {
                application: nonempty(&self.application),
                deployment_group: nonempty(&self.group),
                ..HistoryFilter::default()
            },
        }
    }
}

async fn dora_report(s: &AppState, q: &DoraQuery) -> Result<crate::dora::DoraReport, Failure> {
    let now = Utc::now();
    let since = history::parse_since("since", &q.since_text, now)?;
    if since >= now {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            "since: the window must start in the past".into(),
        ));
    }
    Ok(history::dora_report(s.fleet.store.as_ref(), &q.filter, since, now).await?)
}

async fn dora_json(
    State(s): State<Shared>,
    Query(p): Query<DoraParams>,
) -> Result<Json<crate::dora::DoraReport>, Failure> {
    Ok(Json(dora_report(&s, &p.query()).await?))
}

async fn dora_page(
    State(s): State<Shared>,
    Query(p): Query<DoraParams>,
) -> Result<Html<String>, Failure> {
    let q = p.query();
    let report = dora_report(&s, &q).await?;
    Ok(Html(pages::dora(
        &report,
        &q.since_text,
        q.filter.application.as_deref(),
        q.filter.deployment_group.as_deref(),
    )))
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        pages::STYLE,
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        pages::SCRIPT,
    )
}

/// What an action's request body may say: who is acting (recorded with the decision) and a
/// comment for approvals.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ActionBody {
    #[serde(default)]
    actor: Option<String>,
    #[serde(default)]
    comment: Option<String>,
    /// For a stop: roll back the hosts it reached too. For a rollback: the deployment to go
    /// back to.
    #[serde(default)]
    rollback: bool,
    #[serde(default)]
    to: Option<String>,
}

impl ActionBody {
    /// `NAME via dashboard (user@host)`, or the controller's own `user@host`: who acted, in
    /// the record.
    fn who(&self) -> String {
        let me = crate::deploy::creator();
        match self
            .actor
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
        {
            Some(a) => {
                let a: String = a.chars().filter(|c| !c.is_control()).take(64).collect();
                format!("{a} via dashboard ({me})")
            }
            None => format!("dashboard ({me})"),
        }
    }
}

fn body_of(bytes: &[u8]) -> Result<ActionBody, Failure> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(ActionBody::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("the request body: {e}")))
}

fn done(message: String) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "ok": true, "message": message }))
}

async fn decide(
    s: &AppState,
    id: &str,
    approved: bool,
    body: &[u8],
) -> Result<Json<serde_json::Value>, Failure> {
    let b = body_of(body)?;
    let who = b.who();
    crate::fleet::decide_as(&s.fleet, id, approved, b.comment.clone(), &who, &s.aws).await?;
    Ok(done(format!(
        "{id} {} by {who}",
        if approved { "approved" } else { "rejected" }
    )))
}

async fn approve(
    State(s): State<Shared>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Failure> {
    decide(&s, &id, true, &body).await
}

async fn reject(
    State(s): State<Shared>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Failure> {
    decide(&s, &id, false, &body).await
}

async fn stop(
    State(s): State<Shared>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Failure> {
    let b = body_of(&body)?;
    let who = b.who();
    if !pier_protocol::is_valid_id(&id) {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            "not a deployment id".into(),
        ));
    }
    crate::fleet::stop_as(&s.fleet, &id, false, None, &s.aws, POLL, &who).await?;
    if b.rollback {
        // Driving the rollback takes as long as the rollback: it runs on after the answer.
        let (fleet, aws, key) = (s.fleet.clone(), s.aws.clone(), s.signing_key.clone());
        let id2 = id.clone();
        tokio::spawn(async move {
            if let Err(e) =
                crate::fleet::stop_as(&fleet, &id2, true, key.as_deref(), &aws, POLL, &who).await
            {
                log::warn!("rolling back {id2}: {e}");
            }
        });
        return Ok(done(format!("{id} stopped; rolling back")));
    }
    Ok(done(format!("{id} stopped by {who}")))
}

async fn rollback(
    State(s): State<Shared>,
    Path(group): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Failure> {
    let b = body_of(&body)?;
    if !pier_protocol::is_valid_id(&group) {
        return Err(Failure(StatusCode::BAD_REQUEST, "not a group name".into()));
    }
    let (fleet, aws, key) = (s.fleet.clone(), s.aws.clone(), s.signing_key.clone());
    let g = group.clone();
    let who = b.who();
    let creator = who.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::fleet::rollback_as(
            &fleet,
            &g,
            b.to.as_deref(),
            key.as_deref(),
            &aws,
            POLL,
            Some(creator),
        )
        .await
        {
            log::warn!("rolling back group {g} (asked by {who}): {e}");
        }
    });
    Ok(done(format!("rolling back group {group}")))
}

/// How often a stop's or rollback's driver reads status (as the CLI's).
const POLL: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_address_needs_a_token() {
        assert!(check_listen("127.0.0.1:0", None).is_ok());
        assert!(check_listen("[::1]:7450", None).is_ok());
        let e = check_listen("0.0.0.0:7450", None).unwrap_err();
        assert_eq!(e.exit_code(), crate::EXIT_USAGE);
        assert!(e.to_string().contains("--token"), "{e}");
        assert!(check_listen("0.0.0.0:7450", Some("0123456789abcdef")).is_ok());
        assert!(check_listen("0.0.0.0:7450", Some("short")).is_err());
        assert!(check_listen("localhost", None).is_err());
    }

    #[test]
    fn actions_need_the_token_and_the_same_origin() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:7450"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:7450"),
        );
        assert_eq!(
            check_action("sesame", &h).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        h.insert(TOKEN_HEADER, HeaderValue::from_static("sesame"));
        assert!(check_action("sesame", &h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert_eq!(
            check_action("sesame", &h).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        h.remove(header::ORIGIN);
        assert_eq!(
            check_action("sesame", &h).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn only_loopback_names_reach_a_loopback_dashboard() {
        assert!(is_loopback_host("127.0.0.1:7450", 7450));
        assert!(is_loopback_host("localhost:7450", 7450));
        assert!(is_loopback_host("[::1]:7450", 7450));
        assert!(!is_loopback_host("rebound.example:7450", 7450));
        assert!(!is_loopback_host("127.0.0.1:80", 7450));
    }
}
