//! The dashboard's HTML: every page rendered here, on the server, from [`super::data`]'s
//! structures, with charts as inline SVG. The browser gets finished markup, one style sheet
//! and one small script (both embedded in the binary with `include_str!`), and fetches
//! nothing from anywhere else. Everything that came from a record is escaped ([`esc`]).

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use pier_protocol::record::{DeploymentRecord, MinimumHealthyHosts, RolloutStatus};
use pier_protocol::registry::HostHealth;
use pier_protocol::{EventState, EventStatus, StatusRecord};

use super::data::{DeploymentView, HostView, ListPage, ListQuery, Summary};
use crate::dora::{self, human_duration, DoraReport};
use crate::hosts::Unreadable;

/// The style sheet, served at `/assets/style.css`.
pub const STYLE: &str = include_str!("assets/style.css");
/// The script, served at `/assets/dashboard.js`: live refresh and actions.
pub const SCRIPT: &str = include_str!("assets/dashboard.js");

/// Escapes text for HTML content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query-string value.
fn q(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn layout(title: &str, nav: &str, body: &str) -> String {
    let tab = |name: &str, href: &str| {
        let class = if name == nav { " class=\"here\"" } else { "" };
        format!("<a href=\"{href}\"{class}>{name}</a>")
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · pier</title><link rel=\"stylesheet\" href=\"/assets/style.css\">\
         <script src=\"/assets/dashboard.js\" defer></script></head>\n<body>\
         <header><span class=\"brand\">pier</span><nav>{}{}{}</nav>\
         <span id=\"token-state\" class=\"token\"></span></header>\n<main>{}</main>\n\
         <dialog id=\"confirm\"><form method=\"dialog\"><p id=\"confirm-text\"></p>\
         <label>Your name (recorded) <input id=\"confirm-actor\" autocomplete=\"name\"></label>\
         <label>Token <input id=\"confirm-token\" type=\"password\" autocomplete=\"off\"></label>\
         <p id=\"confirm-error\" class=\"error\"></p>\
         <menu><button value=\"cancel\" formnovalidate>Cancel</button>\
         <button id=\"confirm-go\" value=\"go\" class=\"danger\">Confirm</button></menu>\
         </form></dialog></body></html>\n",
        esc(title),
        tab("Deployments", "/deployments"),
        tab("Hosts", "/hosts"),
        tab("DORA", "/dora"),
        body
    )
}

fn status_class(s: RolloutStatus) -> &'static str {
    match s {
        RolloutStatus::PendingApproval => "pending",
        RolloutStatus::InProgress => "running",
        RolloutStatus::Succeeded => "ok",
        RolloutStatus::Failed => "failed",
        RolloutStatus::Stopped => "stopped",
    }
}

fn status_badge(s: RolloutStatus) -> String {
    format!("<span class=\"badge {}\">{s:?}</span>", status_class(s))
}

fn time(t: Option<DateTime<Utc>>) -> String {
    match t {
        Some(t) => format!(
            "<time datetime=\"{}\">{}</time>",
            t.to_rfc3339(),
            t.format("%Y-%m-%d %H:%M:%SZ")
        ),
        None => "-".into(),
    }
}

fn took(s: &Summary) -> String {
    match (s.started_at, s.ended_at) {
        (Some(a), Some(b)) => human_duration((b - a).num_seconds()),
        (Some(a), None) => format!("{} so far", human_duration((Utc::now() - a).num_seconds())),
        _ => "-".into(),
    }
}

fn commit_cell(s: &Summary) -> String {
    match (&s.commit_sha, &s.commit_url) {
        (Some(sha), Some(url)) => format!(
            "<a class=\"sha\" href=\"{}\" rel=\"noreferrer\">{}</a>",
            esc(url),
            esc(sha.get(..12).unwrap_or(sha))
        ),
        (Some(sha), None) => format!(
            "<span class=\"sha\">{}</span>",
            esc(sha.get(..12).unwrap_or(sha))
        ),
        _ => "-".into(),
    }
}

fn dep_link(id: &str) -> String {
    format!("<a href=\"/deployments/{0}\">{0}</a>", esc(id))
}

fn rollback_links(s: &Summary) -> String {
    let mut parts = Vec::new();
    if let Some(of) = &s.rollback_of {
        parts.push(format!("rolls back {}", dep_link(of)));
    }
    if let Some(by) = &s.rolled_back_by {
        parts.push(format!("rolled back by {}", dep_link(by)));
    }
    parts.join(", ")
}

/// The deployment list.
pub fn list(query: &ListQuery, page: &ListPage, store: &str) -> String {
    let mut b = String::new();
    let sel = |v: &str| {
        if query.status.map(|s| format!("{s:?}")).as_deref() == Some(v) {
            " selected"
        } else {
            ""
        }
    };
    let _ = write!(
        b,
        "<h1>Deployments</h1><p class=\"where\">{}</p>\
         <form class=\"filters\" method=\"get\" action=\"/deployments\">\
         <label>Application <input name=\"application\" value=\"{}\"></label>\
         <label>Group <input name=\"group\" value=\"{}\"></label>\
         <label>Status <select name=\"status\"><option value=\"\">any</option>",
        esc(store),
        esc(query.application.as_deref().unwrap_or("")),
        esc(query.deployment_group.as_deref().unwrap_or("")),
    );
    for s in [
        "PendingApproval",
        "InProgress",
        "Succeeded",
        "Failed",
        "Stopped",
    ] {
        let _ = write!(b, "<option{}>{s}</option>", sel(s));
    }
    b.push_str("</select></label><button>Filter</button></form>");
    if page.deployments.is_empty() {
        b.push_str("<p class=\"empty\">No deployments match.</p>");
    } else {
        b.push_str(
            "<table id=\"deployments\"><thead><tr><th>Deployment</th><th>Application</th>\
             <th>Group</th><th>Revision</th><th>Commit</th><th>Creator</th><th>Status</th>\
             <th>Created</th><th>Duration</th><th>Hosts</th><th>Rollback</th></tr></thead><tbody>",
        );
        for s in &page.deployments {
            let _ = write!(
                b,
                "<tr data-id=\"{id}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                dep_link(&s.deployment_id),
                esc(&s.application),
                esc(&s.deployment_group),
                esc(s.revision.as_deref().unwrap_or("-")),
                commit_cell(s),
                esc(s.creator.as_deref().unwrap_or("-")),
                status_badge(s.status),
                time(Some(s.created_at)),
                took(s),
                s.hosts,
                rollback_links(s),
                id = esc(&s.deployment_id),
            );
        }
        b.push_str("</tbody></table>");
    }
    let filters = format!(
        "application={}&group={}&status={}",
        q(query.application.as_deref().unwrap_or("")),
        q(query.deployment_group.as_deref().unwrap_or("")),
        q(&query.status.map(|s| format!("{s:?}")).unwrap_or_default()),
    );
    b.push_str("<p class=\"pager\">");
    if query.after.is_some() {
        let _ = write!(b, "<a href=\"/deployments?{filters}\">« newest</a> ");
    }
    if let Some(next) = &page.next {
        let _ = write!(
            b,
            "<a id=\"older\" href=\"/deployments?{filters}&after={}\">older »</a>",
            q(next)
        );
    }
    b.push_str("</p>");
    layout("Deployments", "Deployments", &b)
}

/// One deployment: the header and configuration (fixed), and the live part.
pub fn deployment(v: &DeploymentView) -> String {
    let s = &v.summary;
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Deployment {}</h1><div id=\"live\" data-id=\"{}\" data-final=\"{}\">{}</div>",
        esc(&s.deployment_id),
        esc(&s.deployment_id),
        v.is_final(),
        deployment_live(v)
    );
    layout(&s.deployment_id, "Deployments", &b)
}

/// The part of a deployment's page that changes while it runs: status, actions, batches,
/// timelines. The page's script replaces it with a fresh copy until the deployment is final.
pub fn deployment_live(v: &DeploymentView) -> String {
    let s = &v.summary;
    let mut b = String::new();
    let _ = write!(
        b,
        "<dl class=\"facts\"><dt>Status</dt><dd id=\"status\">{}</dd>\
         <dt>Application</dt><dd>{}</dd><dt>Group</dt><dd>{}</dd>\
         <dt>Revision</dt><dd>{}</dd><dt>Commit</dt><dd>{}</dd><dt>Creator</dt><dd>{}</dd>\
         <dt>Created</dt><dd>{}</dd><dt>Started</dt><dd>{}</dd><dt>Ended</dt><dd>{}</dd>\
         <dt>Duration</dt><dd>{}</dd>",
        status_badge(s.status),
        esc(&s.application),
        esc(&s.deployment_group),
        esc(s.revision.as_deref().unwrap_or("-")),
        commit_cell(s),
        esc(s.creator.as_deref().unwrap_or("-")),
        time(Some(s.created_at)),
        time(s.started_at),
        time(s.ended_at),
        took(s),
    );
    let links = rollback_links(s);
    if !links.is_empty() {
        let _ = write!(b, "<dt>Rollback</dt><dd>{links}</dd>");
    }
    if let Some(r) = &v.record {
        config_facts(&mut b, r);
    } else {
        b.push_str(
            "<dt>Kind</dt><dd>sent to its hosts directly (<code>pier deploy --hosts</code>): \
             no rollout record, the hosts' reports are all there is</dd>",
        );
    }
    b.push_str("</dl>");
    if let Some(r) = &v.record {
        actions(&mut b, r);
        batches(&mut b, r);
    }
    timelines(&mut b, v);
    let _ = write!(
        b,
        "<p class=\"where\">read {}{}</p>",
        time(Some(v.read_at)),
        if v.is_final() {
            ""
        } else {
            " · updates by itself while it runs"
        }
    );
    b
}

fn config_facts(b: &mut String, r: &DeploymentRecord) {
    let minimum = match r.minimum_healthy_hosts {
        MinimumHealthyHosts::HostCount(n) => format!("{n} host(s)"),
        MinimumHealthyHosts::FleetPercent(p) => format!("{p} % of the fleet"),
    };
    let _ = write!(
        b,
        "<dt>Configuration</dt><dd>{} (minimum healthy: {minimum})</dd>",
        esc(&r.config_name),
    );
    if let Some(reason) = &r.status_reason {
        let _ = write!(b, "<dt>Reason</dt><dd>{}</dd>", esc(reason));
    }
    if let Some(a) = &r.approval {
        let _ = write!(
            b,
            "<dt>Approval</dt><dd>{} by {} at {}{}</dd>",
            if a.approved { "approved" } else { "rejected" },
            esc(&a.by),
            time(Some(a.at)),
            a.comment
                .as_deref()
                .map(|c| format!(": {}", esc(c)))
                .unwrap_or_default()
        );
    }
    if !r.baked_zones.is_empty() {
        let _ = write!(
            b,
            "<dt>Zones baked</dt><dd>{}</dd>",
            esc(&r.baked_zones.join(", "))
        );
    }
    if let Some(t) = r.bake_until {
        let _ = write!(b, "<dt>Baking until</dt><dd>{}</dd>", time(Some(t)));
    }
}

/// The buttons of what can be done now. The script asks for confirmation and the token.
fn actions(b: &mut String, r: &DeploymentRecord) {
    let id = esc(&r.deployment_id);
    let mut buttons = Vec::new();
    if r.status == RolloutStatus::PendingApproval {
        buttons.push(format!(
            "<button data-action=\"/api/deployments/{id}/approve\" data-confirm=\"Approve \
             {id}? Its rollout starts.\">Approve</button>"
        ));
        buttons.push(format!(
            "<button class=\"danger\" data-action=\"/api/deployments/{id}/reject\" \
             data-confirm=\"Reject {id}? Nothing will be sent.\">Reject</button>"
        ));
    }
    if !r.status.is_final() {
        buttons.push(format!(
            "<button class=\"danger\" data-action=\"/api/deployments/{id}/stop\" \
             data-confirm=\"Stop {id}? Hosts already sent finish on their own.\">Stop</button>"
        ));
        buttons.push(format!(
            "<button class=\"danger\" data-action=\"/api/deployments/{id}/stop\" \
             data-body='{{\"rollback\":true}}' data-confirm=\"Stop {id} and roll back the \
             hosts it reached to the group's last successful revision?\">Stop and roll back\
             </button>"
        ));
    }
    if r.status.is_final() && r.rolled_back_by.is_none() && r.rollback_of.is_none() {
        let g = esc(&r.deployment_group);
        buttons.push(format!(
            "<button class=\"danger\" data-action=\"/api/groups/{g}/rollback\" \
             data-confirm=\"Roll back group {g}? The hosts that got its latest deployment go \
             back to its last successful revision.\">Roll back group {g}</button>"
        ));
    }
    if !buttons.is_empty() {
        let _ = write!(
            b,
            "<div class=\"actions\">{}<span id=\"action-result\"></span></div>",
            buttons.join("")
        );
    }
}

fn batches(b: &mut String, r: &DeploymentRecord) {
    if r.batches.is_empty() {
        return;
    }
    b.push_str("<h2>Batches</h2><ol class=\"batches\">");
    for batch in &r.batches {
        let hosts: Vec<String> = batch
            .hosts
            .iter()
            .map(|h| {
                let hr = r.hosts.get(h);
                let state = hr
                    .map(|x| format!("{:?}", x.state))
                    .unwrap_or_else(|| "?".into());
                let zone = hr
                    .and_then(|x| x.availability_zone.as_deref())
                    .map(|z| format!(" {}", esc(z)))
                    .unwrap_or_default();
                format!(
                    "<span class=\"host {}\">{}{zone} · {state}</span>",
                    state.to_lowercase(),
                    esc(h)
                )
            })
            .collect();
        let _ = write!(
            b,
            "<li>batch {} from {}: {}</li>",
            batch.index + 1,
            time(Some(batch.started_at)),
            hosts.join(" ")
        );
    }
    b.push_str("</ol>");
}

fn event_class(s: EventState) -> &'static str {
    match s {
        EventState::Pending => "pending",
        EventState::InProgress => "running",
        EventState::Succeeded => "ok",
        EventState::Failed | EventState::TimedOut => "failed",
        EventState::Skipped => "skipped",
    }
}

/// Per host, one row per lifecycle event, in order, with a bar placed and sized by its time
/// on a common axis (the deployment's first start to its last end, or now while it runs).
fn timelines(b: &mut String, v: &DeploymentView) {
    b.push_str("<h2>Hosts</h2>");
    let all = || v.hosts.values().flatten().flat_map(|r| r.events.iter());
    let start = all().filter_map(|e| e.started).min();
    let end = all()
        .filter_map(|e| e.ended.or(e.started.map(|_| v.read_at)))
        .max();
    let (Some(t0), Some(t1)) = (start, end) else {
        b.push_str("<p class=\"empty\">No host has reported yet.</p>");
        for h in v.hosts.keys() {
            let _ = write!(
                b,
                "<section class=\"host-timeline\" data-host=\"{0}\"><h3>{0}</h3>\
                 <p>no status yet</p></section>",
                esc(h)
            );
        }
        return;
    };
    let span_ms = ((t1 - t0).num_milliseconds()).max(1) as f64;
    let _ = write!(
        b,
        "<p class=\"axis\">{} → {} ({})</p>",
        time(Some(t0)),
        time(Some(t1)),
        human_duration((t1 - t0).num_seconds())
    );
    for (host, rec) in &v.hosts {
        let _ = write!(
            b,
            "<section class=\"host-timeline\" data-host=\"{0}\"><h3>{0} {1}</h3>",
            esc(host),
            rec.as_ref()
                .map(|r| format!(
                    "<span class=\"badge {}\">{:?}</span>",
                    match r.status {
                        pier_protocol::DeploymentStatus::InProgress => "running",
                        pier_protocol::DeploymentStatus::Succeeded => "ok",
                        pier_protocol::DeploymentStatus::Failed => "failed",
                    },
                    r.status
                ))
                .unwrap_or_else(|| "<span class=\"badge pending\">no status yet</span>".into())
        );
        let Some(rec) = rec else {
            b.push_str("</section>");
            continue;
        };
        b.push_str("<ol class=\"events\">");
        for e in &rec.events {
            event_row(b, e, t0, span_ms, v.read_at);
        }
        b.push_str("</ol>");
        if let Some(err) = &rec.error {
            let _ = write!(b, "<p class=\"error\">{}</p>", esc(err));
        }
        failure_detail(b, rec);
        b.push_str("</section>");
    }
}

fn event_row(b: &mut String, e: &EventStatus, t0: DateTime<Utc>, span_ms: f64, now: DateTime<Utc>) {
    let class = event_class(e.status);
    let bar = match e.started {
        Some(s) => {
            let end = e.ended.unwrap_or(now);
            let left = ((s - t0).num_milliseconds() as f64 / span_ms * 100.0).clamp(0.0, 100.0);
            let width = ((end - s).num_milliseconds() as f64 / span_ms * 100.0)
                .clamp(0.4, 100.0 - left.min(99.6));
            format!(
                "<span class=\"bar {class}\" style=\"left:{left:.2}%;width:{width:.2}%\"></span>"
            )
        }
        None => String::new(),
    };
    let dur = match (e.started, e.ended) {
        (Some(s), Some(x)) if (x - s).num_milliseconds() < 1000 => {
            format!("{}ms", (x - s).num_milliseconds())
        }
        (Some(s), Some(x)) => format!("{:.1}s", (x - s).num_milliseconds() as f64 / 1000.0),
        (Some(s), None) => format!("{:.0}s…", (now - s).num_milliseconds() as f64 / 1000.0),
        _ => String::new(),
    };
    let _ = write!(
        b,
        "<li class=\"event {class}\" data-event=\"{}\" data-state=\"{:?}\"><span class=\"name\">{}</span>\
         <span class=\"track\">{bar}</span><span class=\"dur\">{dur}</span>\
         <span class=\"state\">{:?}{}</span></li>",
        esc(&e.name),
        e.status,
        esc(&e.name),
        e.status,
        if e.ignored { " (ignored)" } else { "" }
    );
}

/// The failing event's error code, script, exit code and log tail.
fn failure_detail(b: &mut String, rec: &StatusRecord) {
    let Some(e) = rec
        .events
        .iter()
        .find(|e| matches!(e.status, EventState::Failed | EventState::TimedOut))
    else {
        return;
    };
    let d = e.diagnostics.as_ref();
    let script = e
        .failing_script
        .as_deref()
        .or(d.and_then(|d| d.script_name.as_deref()));
    let _ = write!(
        b,
        "<div class=\"failure\" data-event=\"{}\"><p><strong>{}</strong> {:?}",
        esc(&e.name),
        esc(&e.name),
        e.status
    );
    if let Some(d) = d {
        let _ = write!(
            b,
            " · error code <code class=\"error-code\">{}</code>",
            esc(&serde_json::to_value(d.error_code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| format!("{:?}", d.error_code)))
        );
    }
    if let Some(s) = script {
        let _ = write!(b, " · script <code class=\"script\">{}</code>", esc(s));
    }
    if let Some(c) = e.exit_code {
        let _ = write!(b, " · exit {c}");
    }
    b.push_str("</p>");
    if let Some(m) = d.map(|d| d.message.as_str()).filter(|m| !m.is_empty()) {
        let _ = write!(b, "<p>{}</p>", esc(m));
    }
    if let Some(tail) = e
        .log_tail
        .as_deref()
        .or(d.and_then(|d| d.log_tail.as_deref()))
    {
        let _ = write!(b, "<pre class=\"log-tail\">{}</pre>", esc(tail));
    }
    b.push_str("</div>");
}

/// The hosts page.
pub fn hosts(hosts: &[HostView], unreadable: &[Unreadable], store: &str) -> String {
    let mut b = String::new();
    let count = |h: HostHealth| hosts.iter().filter(|v| v.health == h).count();
    let _ = write!(
        b,
        "<h1>Hosts</h1><p class=\"where\">{} · {} host(s): {} healthy, {} stale, {} stopped</p>",
        esc(store),
        hosts.len(),
        count(HostHealth::Healthy),
        count(HostHealth::Stale),
        count(HostHealth::Stopped)
    );
    if hosts.is_empty() {
        b.push_str(
            "<p class=\"empty\">No host has announced itself in this store. Agents do at \
             start (agent.yml <code>registry:</code>).</p>",
        );
    } else {
        b.push_str(
            "<table id=\"hosts\"><thead><tr><th>Host</th><th>Health</th><th>Heartbeat</th>\
             <th>Zone</th><th>Tags</th><th>Version</th><th>Last deployment</th><th>Queue</th>\
             </tr></thead><tbody>",
        );
        for h in hosts {
            let (class, word) = match h.health {
                HostHealth::Healthy => ("ok", "healthy"),
                HostHealth::Stale => ("stale", "STALE"),
                HostHealth::Stopped => ("stopped", "stopped"),
            };
            let tags: Vec<String> = h
                .entry
                .tags
                .iter()
                .map(|(k, v)| format!("<span class=\"tag\">{}={}</span>", esc(k), esc(v)))
                .collect();
            let last = h
                .last_deployment
                .as_ref()
                .map(|d| {
                    format!(
                        "{} {}",
                        dep_link(&d.deployment_id),
                        d.status.map(|s| format!("{s:?}")).unwrap_or_default()
                    )
                })
                .unwrap_or_else(|| "-".into());
            let _ = write!(
                b,
                "<tr class=\"{class}\" data-host=\"{}\"><td>{}</td><td><span class=\"badge \
                 {class}\">{word}</span></td><td>{} ago</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{last}</td><td class=\"queue\">{}</td></tr>",
                esc(&h.entry.host_id),
                esc(&h.entry.host_id),
                human_duration(h.heartbeat_age_seconds),
                esc(h.entry.availability_zone.as_deref().unwrap_or("-")),
                tags.join(" "),
                esc(&h.entry.agent_version),
                esc(h.entry.queue.as_deref().unwrap_or("-")),
            );
        }
        b.push_str("</tbody></table>");
        if count(HostHealth::Stale) > 0 {
            b.push_str(
                "<p class=\"note\">STALE: no heartbeat for three intervals; the agent may be \
                 down or unable to reach the store.</p>",
            );
        }
    }
    for u in unreadable {
        let _ = write!(
            b,
            "<p class=\"error\">skipped {}: {}</p>",
            esc(&u.key),
            esc(&u.reason)
        );
    }
    layout("Hosts", "Hosts", &b)
}

/// A metric's figure with the raw value in `data-value` (what tests compare with `pier dora
/// --format json`) and a met/missed mark.
fn figure(
    b: &mut String,
    name: &str,
    label: &str,
    shown: &str,
    raw: &serde_json::Value,
    met: Option<Option<bool>>,
) {
    // `None`: a figure with no target of its own (a count beside the metric).
    let (class, mark) = match met {
        Some(Some(true)) => ("met", "target met"),
        Some(Some(false)) => ("missed", "target missed"),
        Some(None) => ("none", "nothing to judge"),
        None => ("count", ""),
    };
    let _ = write!(
        b,
        "<div class=\"figure {class}\" data-metric=\"{}\" data-value=\"{}\"><span class=\"label\">{}</span>\
         <span class=\"value\">{}</span><span class=\"mark\">{mark}</span></div>",
        esc(name),
        esc(&raw.to_string()),
        esc(label),
        esc(shown)
    );
}

fn secs(v: Option<i64>) -> String {
    v.map(human_duration).unwrap_or_else(|| "-".into())
}

/// The DORA page: the window form, four cards each with its numbers and a chart.
pub fn dora(r: &DoraReport, since: &str, application: Option<&str>, group: Option<&str>) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>DORA metrics</h1><form class=\"filters\" method=\"get\" action=\"/dora\">\
         <label>Window <input name=\"since\" value=\"{}\" size=\"8\" title=\"30d, 12h, 90m, 2w or an RFC 3339 start\"></label>\
         <label>Application <input name=\"application\" value=\"{}\"></label>\
         <label>Group <input name=\"group\" value=\"{}\"></label><button>Show</button>\
         <span class=\"quick\"><a href=\"/dora?since=7d\">7 days</a> <a href=\"/dora?since=30d\">30 days</a> \
         <a href=\"/dora?since=90d\">90 days</a></span></form>\
         <p class=\"where\">{} → {} · the same computation as <code>pier dora --format json</code> \
         (<a href=\"/api/dora?since={}&application={}&group={}\">JSON</a>)</p>",
        esc(since),
        esc(application.unwrap_or("")),
        esc(group.unwrap_or("")),
        time(Some(r.window_start)),
        time(Some(r.window_end)),
        q(since),
        q(application.unwrap_or("")),
        q(group.unwrap_or("")),
    );
    let c = &r.deployments;
    let _ = write!(
        b,
        "<p class=\"counts\" data-counts=\"{}\">{} succeeded, {} failed, {} stopped, {} rollbacks, \
         {} rejected, {} unfinished</p><div class=\"cards\">",
        esc(&serde_json::to_string(c).unwrap_or_default()),
        c.succeeded,
        c.failed,
        c.stopped,
        c.rollbacks,
        c.rejected,
        c.unfinished
    );
    let json = |v: &dyn erased::Ser| v.json();

    // Deployment frequency.
    let f = &r.deployment_frequency;
    b.push_str("<section class=\"card\"><h2>Deployment frequency</h2>");
    figure(
        &mut b,
        "deployment_frequency.per_day",
        "per day",
        &f.per_day
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "-".into()),
        &json(&f.per_day),
        Some(f.target.met),
    );
    figure(
        &mut b,
        "deployment_frequency.deployments",
        "successful changes",
        &f.deployments.to_string(),
        &json(&f.deployments),
        None,
    );
    b.push_str(&frequency_chart(r));
    let _ = write!(
        b,
        "<p class=\"goal\">target: {}</p></section>",
        esc(&f.target.goal)
    );

    // Lead time.
    let l = &r.lead_time;
    b.push_str("<section class=\"card\"><h2>Lead time for changes</h2>");
    figure(
        &mut b,
        "lead_time.median_seconds",
        "median",
        &secs(l.median_seconds),
        &json(&l.median_seconds),
        Some(l.target.met),
    );
    figure(
        &mut b,
        "lead_time.p90_seconds",
        "90th percentile",
        &secs(l.p90_seconds),
        &json(&l.p90_seconds),
        None,
    );
    b.push_str(&duration_chart(
        &[("median", l.median_seconds), ("p90", l.p90_seconds)],
        dora::LEAD_TIME_TARGET_SECONDS,
    ));
    let _ = write!(
        b,
        "<p class=\"goal\">target: {} · {} measured, {} unknown, {} repeats</p></section>",
        esc(&l.target.goal),
        l.measured,
        l.unknown,
        l.repeats
    );

    // Change failure rate.
    let cf = &r.change_failure_rate;
    b.push_str("<section class=\"card\"><h2>Change failure rate</h2>");
    figure(
        &mut b,
        "change_failure_rate.rate",
        "rate",
        &cf.rate
            .map(|x| format!("{:.1} %", x * 100.0))
            .unwrap_or_else(|| "-".into()),
        &json(&cf.rate),
        Some(cf.target.met),
    );
    figure(
        &mut b,
        "change_failure_rate.failures",
        "failures",
        &format!("{} of {}", cf.failures, cf.changes),
        &json(&cf.failures),
        None,
    );
    b.push_str(&rate_chart(cf.rate, dora::CHANGE_FAILURE_RATE_TARGET));
    let _ = write!(
        b,
        "<p class=\"goal\">target: {}</p></section>",
        esc(&cf.target.goal)
    );

    // Time to restore.
    let t = &r.time_to_restore;
    b.push_str("<section class=\"card\"><h2>Time to restore service</h2>");
    figure(
        &mut b,
        "time_to_restore.median_seconds",
        "median",
        &secs(t.median_seconds),
        &json(&t.median_seconds),
        Some(t.target.met),
    );
    figure(
        &mut b,
        "time_to_restore.incidents",
        "incidents",
        &format!(
            "{} ({} restored, {} not)",
            t.incidents, t.restored, t.unrestored
        ),
        &json(&t.incidents),
        None,
    );
    b.push_str(&duration_chart(
        &[
            ("median", t.median_seconds),
            ("max", t.max_seconds),
            ("oldest open", t.oldest_unrestored_seconds),
        ],
        dora::RESTORE_TARGET_SECONDS,
    ));
    let _ = write!(
        b,
        "<p class=\"goal\">target: {}</p></section>",
        esc(&t.target.goal)
    );
    b.push_str("</div>");
    layout("DORA", "DORA", &b)
}

/// Serialising the figures' raw values without naming each type.
mod erased {
    pub trait Ser {
        fn json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
        }
    }
}

const CHART_W: f64 = 480.0;
const CHART_H: f64 = 140.0;

/// Successful changes per day as bars (failures stacked in red), the target as a dashed line.
fn frequency_chart(r: &DoraReport) -> String {
    let days = &r.deployment_frequency.daily;
    if days.is_empty() {
        return String::new();
    }
    let target = dora::FREQUENCY_TARGET_PER_DAY;
    let top = days
        .iter()
        .map(|d| (d.deployments + d.failures) as f64)
        .fold(target * 1.5, f64::max);
    let slot = CHART_W / days.len() as f64;
    let y = |v: f64| CHART_H - v / top * CHART_H;
    let mut s = format!(
        "<svg class=\"chart\" viewBox=\"0 -12 {CHART_W} {}\" role=\"img\" aria-label=\"deployments per day\">",
        CHART_H + 28.0
    );
    for (i, d) in days.iter().enumerate() {
        let x = i as f64 * slot + slot * 0.15;
        let w = (slot * 0.7).max(1.0);
        let ok_h = d.deployments as f64 / top * CHART_H;
        let fail_h = d.failures as f64 / top * CHART_H;
        let _ = write!(
            s,
            "<rect class=\"ok\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{ok_h:.1}\"><title>{}: {} deployed, {} failed</title></rect>",
            CHART_H - ok_h,
            d.date,
            d.deployments,
            d.failures
        );
        if d.failures > 0 {
            let _ = write!(
                s,
                "<rect class=\"failed\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{fail_h:.1}\"/>",
                CHART_H - ok_h - fail_h
            );
        }
    }
    let ty = y(target);
    let _ = write!(
        s,
        "<line class=\"target\" x1=\"0\" x2=\"{CHART_W}\" y1=\"{ty:.1}\" y2=\"{ty:.1}\"/>\
         <text class=\"target\" x=\"2\" y=\"{:.1}\">target {target}/day</text>\
         <text x=\"0\" y=\"{}\">{}</text><text x=\"{CHART_W}\" y=\"{}\" text-anchor=\"end\">{}</text></svg>",
        ty - 3.0,
        CHART_H + 14.0,
        days[0].date,
        CHART_H + 14.0,
        days[days.len() - 1].date
    );
    s
}

/// Horizontal bars of durations, with the target as a dashed line.
fn duration_chart(bars: &[(&str, Option<i64>)], target: i64) -> String {
    let top = bars
        .iter()
        .filter_map(|(_, v)| *v)
        .fold(target as f64 * 1.5, |a, v| a.max(v as f64));
    let row = 26.0;
    let h = row * bars.len() as f64 + 18.0;
    let label_w = 90.0;
    // Room on the right for the value's label ("2h46m", "36m47s").
    let scale = |v: f64| v / top * (CHART_W - label_w - 110.0);
    let mut s = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {CHART_W} {h}\" role=\"img\" aria-label=\"durations against the target\">"
    );
    for (i, (name, v)) in bars.iter().enumerate() {
        let yy = i as f64 * row + 4.0;
        let _ = write!(
            s,
            "<text x=\"0\" y=\"{:.1}\">{}</text>",
            yy + 14.0,
            esc(name)
        );
        match v {
            Some(v) => {
                let class = if *v < target { "ok" } else { "failed" };
                let _ = write!(
                    s,
                    "<rect class=\"{class}\" x=\"{label_w}\" y=\"{yy:.1}\" width=\"{:.1}\" height=\"18\"/>\
                     <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                    scale(*v as f64).max(1.0),
                    label_w + scale(*v as f64).max(1.0) + 4.0,
                    yy + 14.0,
                    human_duration(*v)
                );
            }
            None => {
                let _ = write!(
                    s,
                    "<text x=\"{label_w}\" y=\"{:.1}\">no data</text>",
                    yy + 14.0
                );
            }
        }
    }
    let tx = label_w + scale(target as f64);
    let _ = write!(
        s,
        "<line class=\"target\" x1=\"{tx:.1}\" x2=\"{tx:.1}\" y1=\"0\" y2=\"{:.1}\"/>\
         <text class=\"target\" x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">target {}</text></svg>",
        h - 14.0,
        h - 2.0,
        human_duration(target)
    );
    s
}

/// The rate as a bar from 0 to (at least) twice the target, the target as a dashed line.
fn rate_chart(rate: Option<f64>, target: f64) -> String {
    let top = rate
        .unwrap_or(0.0)
        .max(target * 2.0)
        .min(1.0)
        .max(target * 1.2);
    let w = CHART_W - 10.0;
    let mut s = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {CHART_W} 48\" role=\"img\" aria-label=\"change failure rate against the target\">\
         <rect class=\"track\" x=\"0\" y=\"4\" width=\"{w}\" height=\"18\"/>"
    );
    if let Some(r) = rate {
        let class = if r < target { "ok" } else { "failed" };
        let _ = write!(
            s,
            "<rect class=\"{class}\" x=\"0\" y=\"4\" width=\"{:.1}\" height=\"18\"/>",
            (r / top * w).max(1.0)
        );
    }
    let tx = target / top * w;
    let _ = write!(
        s,
        "<line class=\"target\" x1=\"{tx:.1}\" x2=\"{tx:.1}\" y1=\"0\" y2=\"26\"/>\
         <text class=\"target\" x=\"{tx:.1}\" y=\"40\" text-anchor=\"middle\">target {:.0} %</text></svg>",
        target * 100.0
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_records_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        assert_eq!(
            q("index/deployments/1~d-1~a%20b"),
            "index%2Fdeployments%2F1%7Ed-1%7Ea%2520b"
        );
    }
}
