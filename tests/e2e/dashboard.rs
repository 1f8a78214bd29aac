//! `pier dashboard` in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`, which scripts/test.sh installs) driven over WebDriver, against the real
//! `pier dashboard` reading what real agents and the real controller wrote: on the spool (a
//! stored group's rollout in a status directory) and on moto (agents on SQS, the store in S3).
//!
//! What a person would check: the list shows the deployment the test made; its page shows
//! each host's lifecycle events in order, with the failing one's error code, script and log
//! tail; the page follows a running deployment by itself (a hook held by a gate file) without
//! a reload; the DORA page's figures are those of `pier dora --format json`; an action
//! without the token is refused and with it is done and recorded with who did it.
//!
//! With `PIER_DASHBOARD_SCREENSHOTS=DIR`, the spool test saves a PNG of each page in DIR
//! (how docs/dashboard/*.png are made).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use pier_protocol::record::{DeploymentRecord, RolloutStatus};
use serde_json::Value;

use crate::support::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const TOKEN: &str = "e2e-dashboard-token-0123456789";

/// A process killed (and reaped) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A file whose presence holds the bundle's AfterInstall; removed when dropped, so a
/// failing test does not leave a rollout waiting.
struct Gate(PathBuf);

impl Gate {
    fn close(path: &Path) -> Gate {
        std::fs::write(path, "").unwrap();
        Gate(path.to_path_buf())
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Chromium under chromedriver, or the reason there is none.
struct Browser {
    client: Client,
    _driver: Killed,
}

impl Browser {
    async fn start() -> Result<Browser, String> {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            if !Path::new(bin).exists() {
                return Err(format!(
                    "{bin} is missing (Debian's chromium and chromium-driver; scripts/test.sh \
                     installs them)"
                ));
            }
        }
        let port = free_port();
        let driver = Killed(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start {CHROMEDRIVER}: {e}"))?,
        );
        let url = format!("http://127.0.0.1:{port}");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"],
            }),
        );
        let t = Instant::now();
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => {
                    return Ok(Browser {
                        client,
                        _driver: driver,
                    })
                }
                Err(e) if t.elapsed() > Duration::from_secs(30) => {
                    return Err(format!("chromedriver gave no browser session: {e}"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    /// The text of the first element `css` selects, `None` if there is none.
    async fn text(&self, css: &str) -> Option<String> {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.ok(),
            Err(_) => None,
        }
    }

    /// An attribute of every element `css` selects.
    async fn attrs(&self, css: &str, attr: &str) -> Vec<String> {
        let mut out = Vec::new();
        for e in self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_default()
        {
            if let Ok(Some(v)) = e.attr(attr).await {
                out.push(v);
            }
        }
        out
    }

    /// Waits (bounded) until `css` selects something whose text satisfies `ok`.
    async fn wait_text(&self, what: &str, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let t = Instant::now();
        loop {
            if let Some(text) = self.text(css).await.filter(|t| ok(t)) {
                return text;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "timed out waiting for {what} ({css}); the page:\n{}",
                self.client.source().await.unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        if let Some(dir) = std::env::var_os("PIER_DASHBOARD_SCREENSHOTS") {
            let png = self.client.screenshot().await.unwrap();
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(PathBuf::from(dir).join(format!("{name}.png")), png).unwrap();
        }
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// Starts the browser or marks the test skipped, saying why.
async fn browser_or_skip() -> Option<Browser> {
    match Browser::start().await {
        Ok(b) => Some(b),
        Err(why) => {
            skip(&why);
            None
        }
    }
}

/// `pier dashboard` on a free port with [`TOKEN`], reading the store `store_args` name.
struct Dashboard {
    url: String,
    _proc: Killed,
}

impl Dashboard {
    fn start(endpoint: &str, store_args: &[&str]) -> Dashboard {
        let mut child = Command::new(pier_bin())
            .args(["dashboard", "--listen", "127.0.0.1:0"])
            .args(store_args)
            .env("PIER_DASHBOARD_TOKEN", TOKEN)
            .env("AWS_ENDPOINT_URL", endpoint)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env_remove("PIER_STATUS_BUCKET")
            .env_remove("PIER_STATUS_DIR")
            .env_remove("PIER_SIGNING_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().trim_end_matches('/').to_string();
        assert!(url.starts_with("http://127.0.0.1:"), "printed {line:?}");
        Dashboard {
            url,
            _proc: Killed(child),
        }
    }

    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

/// A bundle whose AfterInstall waits while the file `$GATE` exists, and whose
/// ValidateService fails on host `h2` (exit 3, after printing why).
fn gated_bundle(s: &Scratch) -> PathBuf {
    s.write(
        "bundle/appspec.yml",
        "version: 0.0\nos: linux\nhooks:\n  AfterInstall:\n    - location: wait.sh\n      \
         timeout: 90\n  ValidateService:\n    - location: validate.sh\n      timeout: 30\n",
    );
    s.script(
        "bundle/wait.sh",
        "#!/bin/sh\nwhile [ -f \"$GATE\" ]; do sleep 0.2; done\necho waited\n",
    );
    s.script(
        "bundle/validate.sh",
        "#!/bin/sh\necho \"checking $PIER_HOST\"\nif [ \"$PIER_HOST\" = h2 ]; then\n  \
         echo \"boom: h2 refuses the release\"\n  exit 3\nfi\n",
    );
    s.path().join("bundle")
}

fn pier_local(args: &[&str]) -> Run {
    pier_via("http://127.0.0.1:9", args)
}

/// `pier` in the background (a rollout that waits for a gate or an approval).
fn spawn_pier(args: &[&str]) -> Killed {
    Killed(
        Command::new(pier_bin())
            .args(args)
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            .env_remove("PIER_STATUS_BUCKET")
            .env_remove("PIER_STATUS_DIR")
            .env_remove("PIER_SIGNING_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The newest record of `group` in the directory store, once there is one that `ok` accepts.
fn wait_record(
    status: &Path,
    group: &str,
    ok: impl Fn(&DeploymentRecord) -> bool,
) -> DeploymentRecord {
    let t = Instant::now();
    loop {
        let mut found: Vec<DeploymentRecord> = std::fs::read_dir(status.join("deployments"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("record.json")).ok())
            .filter_map(|b| DeploymentRecord::from_json(&b).ok())
            .filter(|r| r.deployment_group == group)
            .collect();
        found.sort_by_key(|r| r.created_at);
        if let Some(r) = found.pop().filter(|r| ok(r)) {
            return r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "no matching record of {group}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every `[data-metric]` figure on the DORA page, by name, as JSON.
async fn dora_figures(b: &Browser) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for e in b
        .client
        .find_all(Locator::Css("[data-metric]"))
        .await
        .unwrap()
    {
        let name = e.attr("data-metric").await.unwrap().unwrap();
        let value = e.attr("data-value").await.unwrap().unwrap();
        out.insert(name, serde_json::from_str(&value).unwrap());
    }
    out
}

/// The same figures out of `pier dora --format json`.
fn dora_json_figures(json: &str) -> BTreeMap<String, Value> {
    let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    [
        "deployment_frequency.per_day",
        "deployment_frequency.deployments",
        "lead_time.median_seconds",
        "lead_time.p90_seconds",
        "change_failure_rate.rate",
        "change_failure_rate.failures",
        "time_to_restore.median_seconds",
        "time_to_restore.incidents",
    ]
    .iter()
    .map(|name| {
        let (a, b) = name.split_once('.').unwrap();
        (name.to_string(), v[a][b].clone())
    })
    .collect()
}

/// Checks a deployment's page: each host's events in lifecycle order, h2's ValidateService
/// failed with its script, error code and log tail.
async fn check_deployment_page(b: &Browser, hosts: &[&str]) {
    for h in hosts {
        let events = b
            .attrs(&format!("section[data-host='{h}'] li.event"), "data-event")
            .await;
        let order: Vec<&str> = pier_protocol::LifecycleEvent::ALL
            .iter()
            .map(|e| e.as_str())
            .filter(|n| events.iter().any(|x| x == n))
            .collect();
        assert_eq!(events, order, "{h}: events out of order");
        assert!(events.len() >= 5, "{h}: {events:?}");
    }
    let failure = b
        .wait_text("h2's failure", "section[data-host='h2'] .failure", |t| {
            t.contains("ValidateService")
        })
        .await;
    assert!(failure.contains("validate.sh"), "{failure}");
    assert!(failure.contains("exit 3"), "{failure}");
    let tail = b
        .text("section[data-host='h2'] pre.log-tail")
        .await
        .unwrap_or_default();
    assert!(tail.contains("boom: h2 refuses the release"), "{tail}");
    let code = b
        .text("section[data-host='h2'] .error-code")
        .await
        .unwrap_or_default();
    assert!(!code.is_empty(), "no error code shown");
    let h1 = b
        .attrs("section[data-host='h1'] li.event", "data-state")
        .await;
    assert!(!h1.iter().any(|s| s == "Failed"), "h1: {h1:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_spool_the_pages_show_follow_and_act_on_a_rollout() {
    let Some(b) = browser_or_skip().await else {
        return;
    };
    let s = Scratch::new();
    let dir = s.path().join("fleet");
    let status = s.path().join("status");
    let gate = s.path().join("gate");
    let _open = Gate::close(&gate);
    let _agents: Vec<RunningAgent> = ["h1", "h2"]
        .iter()
        .enumerate()
        .map(|(i, h)| {
            Agent::builder(dir.join(h))
                .host(h)
                .spool()
                .hook_env("PIER_HOST", h)
                .hook_env("GATE", &gate.display().to_string())
                .config(&format!(
                    "registry:\n  dir: {}\ntags:\n  role: web\navailability_zone: zone-{}\n",
                    status.display(),
                    i + 1
                ))
                .spawn()
        })
        .collect();
    let revision = s.path().join("rev.tgz");
    pier_local(&[
        "push",
        "--application",
        "shop",
        "--source",
        gated_bundle(&s).to_str().unwrap(),
        "--local-location",
        revision.to_str().unwrap(),
    ])
    .success();
    let group = s.write(
        "web.yml",
        &format!(
            "name: web\napplication: shop\nhosts: [h1, h2]\ndeployment_config: AllAtOnce\n\
             transport:\n  type: spool\n  spool_dir: \"{}/{{host}}/root/spool\"\n",
            dir.display()
        ),
    );
    let st = status.to_str().unwrap();
    pier_local(&["group", "put", group.to_str().unwrap(), "--status-dir", st]).success();
    let deploy_args = [
        "deploy",
        "--application",
        "shop",
        "--deployment-group",
        "web",
        "--revision",
        revision.to_str().unwrap(),
        "--status-dir",
        st,
        "--poll-interval",
        "0.2",
    ];
    let mut rollout = spawn_pier(&deploy_args);
    let rec = wait_record(&status, "web", |_| true);
    let id = rec.deployment_id.clone();
    let dash = Dashboard::start("http://127.0.0.1:9", &["--status-dir", st]);

    // The list shows it.
    b.goto(&dash.at("/deployments")).await;
    let row = b
        .wait_text(
            "the deployment in the list",
            &format!("tr[data-id='{id}']"),
            |t| t.contains("shop") && t.contains("web"),
        )
        .await;
    assert!(row.contains("rev.tgz"), "{row}");

    // Its page, while AfterInstall waits at the gate: then the gate opens, and the same page
    // (no reload: a mark set in it survives) shows the end.
    b.goto(&dash.at(&format!("/deployments/{id}"))).await;
    b.wait_text(
        "h1's AfterInstall running",
        "section[data-host='h1'] li[data-event='AfterInstall'][data-state='InProgress']",
        |_| true,
    )
    .await;
    b.screenshot("deployment-running").await;
    b.client
        .execute("window.pierMark = 42; return null;", vec![])
        .await
        .unwrap();
    let _ = std::fs::remove_file(&gate);
    b.wait_text(
        "h2's ValidateService failed, without a reload",
        "section[data-host='h2'] li[data-event='ValidateService'][data-state='Failed']",
        |_| true,
    )
    .await;
    b.wait_text(
        "h1's ValidateService succeeded",
        "section[data-host='h1'] li[data-event='ValidateService'][data-state='Succeeded']",
        |_| true,
    )
    .await;
    let mark = b
        .client
        .execute("return window.pierMark;", vec![])
        .await
        .unwrap();
    assert_eq!(mark, Value::from(42), "the page was reloaded");
    check_deployment_page(&b, &["h1", "h2"]).await;
    b.screenshot("deployment").await;
    rollout.0.wait().unwrap();

    // The hosts the agents registered in the same store.
    b.goto(&dash.at("/hosts")).await;
    let h1 = b
        .wait_text("h1 in the hosts", "tr[data-host='h1']", |t| {
            t.contains("healthy")
        })
        .await;
    assert!(h1.contains("role=web") && h1.contains("zone-1"), "{h1}");
    assert!(h1.contains(&id), "h1's last deployment: {h1}");
    b.screenshot("hosts").await;

    // DORA: the page's figures are pier dora's.
    b.goto(&dash.at("/dora?since=30d")).await;
    let page = dora_figures(&b).await;
    let cli = pier_local(&[
        "dora",
        "--status-dir",
        st,
        "--since",
        "30d",
        "--format",
        "json",
    ])
    .success();
    assert_eq!(page, dora_json_figures(&cli.stdout), "{}", cli.stdout);
    assert_eq!(page["deployment_frequency.deployments"], Value::from(1));
    b.screenshot("dora").await;

    // An action: a deployment held for approval. Refused without the right token, done with
    // it, and recorded with the name given.
    let mut held_args = deploy_args.to_vec();
    held_args.push("--require-approval");
    let _held = spawn_pier(&held_args);
    let held = wait_record(&status, "web", |r| {
        r.deployment_id != id && r.status == RolloutStatus::PendingApproval
    });
    b.goto(&dash.at(&format!("/deployments/{}", held.deployment_id)))
        .await;
    let approve = b
        .client
        .wait()
        .for_element(Locator::Css("button[data-action$='/approve']"))
        .await
        .unwrap();
    approve.click().await.unwrap();
    let token_field = b.client.find(Locator::Css("#confirm-token")).await.unwrap();
    token_field.clear().await.unwrap();
    token_field.send_keys("not-the-token").await.unwrap();
    b.client
        .find(Locator::Css("#confirm-actor"))
        .await
        .unwrap()
        .send_keys("Ada")
        .await
        .unwrap();
    b.client
        .find(Locator::Css("#confirm-go"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let refused = b
        .wait_text("the refusal", "#confirm-error", |t| !t.is_empty())
        .await;
    assert!(refused.contains("token"), "{refused}");
    let still = wait_record(&status, "web", |_| true);
    assert_eq!(still.status, RolloutStatus::PendingApproval);
    token_field.clear().await.unwrap();
    token_field.send_keys(TOKEN).await.unwrap();
    b.client
        .find(Locator::Css("#confirm-go"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let approved = wait_record(&status, "web", |r| r.approval.is_some());
    let by = &approved.approval.as_ref().unwrap().by;
    assert!(approved.approval.as_ref().unwrap().approved);
    assert!(by.starts_with("Ada via dashboard"), "recorded as {by}");
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_moto_the_pages_show_a_fleet_rollout_and_its_dora_figures() {
    let Some(b) = browser_or_skip().await else {
        return;
    };
    let aws = moto_clients().await;
    let bucket = new_bucket(&aws).await;
    let s = Scratch::new();
    let dir = s.path().join("fleet");
    let gate = s.path().join("gate");
    let prefix = unique("dash");
    let hosts: Vec<String> = (1..=2).map(|i| format!("h{i}")).collect();
    let mut agents = Vec::new();
    for h in &hosts {
        agents.push(
            Agent::builder(dir.join(h))
                .host(&format!("{prefix}-{h}"))
                .sqs_own_queue()
                .hook_env("PIER_HOST", h)
                .hook_env("GATE", &gate.display().to_string())
                .config("daemon:\n  poll_wait_seconds: 1\n")
                .spawn(),
        );
    }
    let push = pier(&[
        "push",
        "--application",
        "shop",
        "--source",
        gated_bundle(&s).to_str().unwrap(),
        "--s3-location",
        &format!("s3://{bucket}/{prefix}/rev.tgz"),
    ])
    .success();
    let rev = s.write("rev.json", &push.stdout);
    for h in &hosts {
        let name = format!("pier-{prefix}-{h}");
        crate::support::wait_for_queue(&aws.sqs, &name).await;
    }
    let store = [
        "--status-bucket",
        bucket.as_str(),
        "--status-prefix",
        "pier",
    ];
    let group = s.write(
        "g.yml",
        &format!(
            "name: {prefix}\napplication: shop\nhosts: [{prefix}-h1, {prefix}-h2]\n\
             deployment_config: AllAtOnce\n"
        ),
    );
    let mut put = vec!["group", "put", group.to_str().unwrap()];
    put.extend(store);
    pier(&put).success();
    let rev_arg = format!("@{}", rev.display());
    let mut args = vec![
        "deploy",
        "--application",
        "shop",
        "--deployment-group",
        &prefix,
        "--revision",
        &rev_arg,
        "--poll-interval",
        "0.5",
    ];
    args.extend(store);
    // The rollout starts with AfterInstall held at the gate; the dashboard is already up.
    // The gate opens however the test ends (else the rollout would wait for its hosts).
    let _open = Gate::close(&gate);
    let dash = Dashboard::start(moto_endpoint(), &store);
    let rollout = tokio::task::spawn_blocking({
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        move || pier(&args.iter().map(String::as_str).collect::<Vec<_>>())
    });
    let h = |n: &str| format!("{prefix}-{n}");
    // The list is a plain page: ask again until the rollout's record is there.
    let t = Instant::now();
    let id = loop {
        b.goto(&dash.at(&format!("/deployments?group={prefix}")))
            .await;
        if let Some(id) = b.attrs("#deployments tbody tr", "data-id").await.pop() {
            break id;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the rollout never showed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    b.goto(&dash.at(&format!("/deployments/{id}"))).await;
    b.wait_text(
        "h1's AfterInstall running",
        &format!(
            "section[data-host='{}'] li[data-event='AfterInstall'][data-state='InProgress']",
            h("h1")
        ),
        |_| true,
    )
    .await;
    b.client
        .execute("window.pierMark = 7; return null;", vec![])
        .await
        .unwrap();
    let _ = std::fs::remove_file(&gate);
    b.wait_text(
        "h2's ValidateService failed, without a reload",
        &format!(
            "section[data-host='{}'] li[data-event='ValidateService'][data-state='Failed']",
            h("h2")
        ),
        |_| true,
    )
    .await;
    let mark = b
        .client
        .execute("return window.pierMark;", vec![])
        .await
        .unwrap();
    assert_eq!(mark, Value::from(7), "the page was reloaded");
    let run = rollout.await.unwrap();
    let printed = run
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert_eq!(printed, id, "{}", run.all());

    // An action from the page without the token is refused, and changes nothing.
    let answer = b
        .client
        .execute(
            "return fetch(arguments[0], {method: 'POST'}).then(r => r.status);",
            vec![Value::from(format!("/api/deployments/{id}/stop"))],
        )
        .await
        .unwrap();
    assert_eq!(answer, Value::from(401));

    b.goto(&dash.at(&format!("/deployments?group={prefix}")))
        .await;
    let row = b
        .wait_text(
            "the deployment in the list",
            &format!("tr[data-id='{id}']"),
            |t| t.contains("shop"),
        )
        .await;
    assert!(row.contains("rev.tgz"), "{row}");
    b.goto(&dash.at(&format!("/deployments/{id}"))).await;
    // Hosts are named PREFIX-hN here; the page's sections carry the full ids.
    let failure = b
        .wait_text(
            "h2's failure",
            &format!("section[data-host='{}'] pre.log-tail", h("h2")),
            |t| t.contains("boom"),
        )
        .await;
    assert!(
        failure.contains("boom: h2 refuses the release"),
        "{failure}"
    );
    for host in [h("h1"), h("h2")] {
        let events = b
            .attrs(
                &format!("section[data-host='{host}'] li.event"),
                "data-event",
            )
            .await;
        let order: Vec<&str> = pier_protocol::LifecycleEvent::ALL
            .iter()
            .map(|e| e.as_str())
            .filter(|n| events.iter().any(|x| x == n))
            .collect();
        assert_eq!(events, order, "{host}: events out of order");
        assert!(events.len() >= 5, "{host}: {events:?}");
    }

    let mut dora_args = vec![
        "dora",
        "--since",
        "30d",
        "--format",
        "json",
        "--deployment-group",
        &prefix,
    ];
    dora_args.extend(store);
    b.goto(&dash.at(&format!("/dora?since=30d&group={prefix}")))
        .await;
    let page = dora_figures(&b).await;
    let cli = pier(&dora_args).success();
    assert_eq!(page, dora_json_figures(&cli.stdout), "{}", cli.stdout);
    b.close().await;
    drop(agents);
}

#[test]
fn a_public_address_without_a_token_is_refused_before_anything_is_opened() {
    let run = Command::new(pier_bin())
        .args([
            "dashboard",
            "--listen",
            "0.0.0.0:0",
            "--status-dir",
            "/nonexistent/pier",
        ])
        .env_remove("PIER_DASHBOARD_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--listen") && stderr.contains("--token"),
        "{stderr}"
    );
    // With a token it is accepted (and then stopped here).
    let s = Scratch::new();
    let mut ok = Killed(
        Command::new(pier_bin())
            .args(["dashboard", "--listen", "0.0.0.0:0", "--status-dir"])
            .arg(s.path())
            .env("PIER_DASHBOARD_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(ok.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("http://0.0.0.0:"), "{line}");
}
