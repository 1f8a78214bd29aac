//! Deployment history: every fleet deployment record in the store, filtered and newest
//! first. `pier history` prints them (a table, or the records as JSON); `pier dora` computes
//! its metrics from them ([`crate::dora`]); the dashboard lists them. This module loads and
//! filters; what the records mean for the metrics is `dora`'s business.
//!
//! Records are the objects `deployments/{id}/record.json` of the store the other fleet
//! commands use. One that cannot be parsed is named on stderr and skipped, so one damaged
//! record does not hide the rest of the history; a store that cannot be read is an error.

use chrono::{DateTime, Duration, Utc};
use futures::stream::{self, StreamExt, TryStreamExt};

use pier_protocol::record::{DeploymentRecord, RolloutStatus};
use pier_protocol::Revision;
use pier_transport::store::ObjectStore;

use super::dora::{self, human_duration};
use super::fleet::Fleet;
use super::ControllerError;

/// How many records are read at once.
const PARALLEL_READS: usize = 16;

/// Which deployments to keep; an empty filter keeps all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryFilter {
    /// Only this application.
    pub application: Option<String>,
    /// Only this deployment group.
    pub deployment_group: Option<String>,
    /// Only deployments in this state.
    pub status: Option<RolloutStatus>,
    /// Only deployments created at or after this time.
    pub since: Option<DateTime<Utc>>,
}

impl HistoryFilter {
    /// Whether `record` passes.
    pub fn matches(&self, record: &DeploymentRecord) -> bool {
        self.application
            .as_ref()
            .is_none_or(|a| *a == record.application)
            && self
                .deployment_group
                .as_ref()
                .is_none_or(|g| *g == record.deployment_group)
            && self.status.is_none_or(|s| s == record.status)
            && self.since.is_none_or(|t| record.created_at >= t)
    }
}

/// Every readable deployment record in `store` that passes `filter`, newest (by creation)
/// first. An unparsable record is named on stderr and skipped.
pub async fn load_records(
    store: &dyn ObjectStore,
    filter: &HistoryFilter,
) -> Result<Vec<DeploymentRecord>, ControllerError> {
    let keys = store
        .list("deployments/", None, None)
        .await
        .map_err(|e| ControllerError::transport("cannot list the deployments", e))?;
    // Hosts' status records live beside the deployment records; only the latter count.
    let keys: Vec<String> = keys.into_iter().filter(|k| is_record_key(k)).collect();
    let loaded: Vec<Option<DeploymentRecord>> = stream::iter(keys)
        .map(|key| async move {
            let Some(v) = store.get(&key).await.map_err(|e| {
                ControllerError::transport(format!("cannot read the deployment record {key}"), e)
            })?
            else {
                // Deleted between the listing and the read.
                return Ok::<_, ControllerError>(None);
            };
            match DeploymentRecord::from_json(&v.bytes) {
                Ok(r) => Ok(Some(r)),
                Err(e) => {
                    eprintln!(
                        "pier: deployment record {}{key} is unreadable ({e}); skipped",
                        store.describe()
                    );
                    Ok(None)
                }
            }
        })
        .buffer_unordered(PARALLEL_READS)
        .try_collect()
        .await?;
    let mut records: Vec<DeploymentRecord> = loaded
        .into_iter()
        .flatten()
        .filter(|r| filter.matches(r))
        .collect();
    newest_first(&mut records);
    Ok(records)
}

/// `deployments/{id}/record.json`, exactly.
fn is_record_key(key: &str) -> bool {
    key.strip_prefix("deployments/")
        .and_then(|k| k.strip_suffix("/record.json"))
        .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// Sorts by creation time, newest first; ties by id so the order is stable.
fn newest_first(records: &mut [DeploymentRecord]) {
    records.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then_with(|| a.deployment_id.cmp(&b.deployment_id))
    });
}

/// Parses a `--since` value: a length back from `now` (`30d`, `12h`, `90m`, `45s`, `2w`), or
/// an RFC 3339 time (`2026-03-01T00:00:00Z`). `flag` names the flag in errors.
pub fn parse_since(
    flag: &str,
    value: &str,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, ControllerError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = parse_duration(value).map_err(|m| ControllerError::usage(flag, m))?;
    now.checked_sub_signed(d)
        .ok_or_else(|| ControllerError::usage(flag, format!("`{value}` reaches too far back")))
}

/// Parses `N` followed by a unit: `s`, `m` (minutes), `h`, `d`, `w`; `N` is a positive
/// whole number.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "`{value}` is not a length of time: a positive whole number and a unit, s, m \
             (minutes), h, d or w (e.g. 30d, 12h, 90m), or an RFC 3339 time"
        )
    };
    let value_trimmed = value.trim();
    let split = value_trimmed
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(bad)?;
    let (digits, unit) = value_trimmed.split_at(split);
    let n: i64 = digits.parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(bad());
    }
    let seconds_per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(seconds_per)
        .and_then(Duration::try_seconds)
        .ok_or_else(bad)
}

/// Output format of `pier history` and `pier dora`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Text,
    /// JSON for programs.
    Json,
}

/// What `pier history` was asked.
#[derive(Debug, Clone, Default)]
pub struct HistoryOptions {
    /// Which deployments.
    pub filter: HistoryFilter,
    /// At most this many (the newest).
    pub limit: Option<usize>,
    /// Table or JSON.
    pub format: Format,
}

/// `pier history`: the filtered deployments, newest first, as a table or a JSON array of
/// records on stdout.
pub async fn history(fleet: &Fleet, opts: &HistoryOptions) -> Result<i32, ControllerError> {
    let mut records = load_records(fleet.store.as_ref(), &opts.filter).await?;
    if let Some(n) = opts.limit {
        records.truncate(n);
    }
    match opts.format {
        Format::Json => {
            out(&(serde_json::to_string_pretty(&records).expect("records serialise") + "\n"))
        }
        Format::Text if records.is_empty() => {
            eprintln!("no deployments in {} match", fleet.store.describe())
        }
        Format::Text => out(&render_table(&records)),
    }
    Ok(0)
}

/// What `pier dora` was asked.
#[derive(Debug, Clone)]
pub struct DoraOptions {
    /// Application and group (status and since are ignored: the window decides).
    pub filter: HistoryFilter,
    /// Start of the window.
    pub since: DateTime<Utc>,
    /// End of the window, and the time unrestored incidents are aged at (the `now` that
    /// `since` was reckoned back from, so `--since 30d` is exactly 30 days).
    pub now: DateTime<Utc>,
    /// Text or JSON.
    pub format: Format,
}

/// `pier dora`: the DORA metrics of the filtered deployments over `[since, now)`.
pub async fn dora(fleet: &Fleet, opts: &DoraOptions) -> Result<i32, ControllerError> {
    // All of the history, not just the window: deployments before it tell repeats of a
    // commit and incidents still open when it starts.
    let filter = HistoryFilter {
        status: None,
        since: None,
        ..opts.filter.clone()
    };
    let now = opts.now;
    if opts.since >= now {
        return Err(ControllerError::usage(
            "--since",
            "the window must start in the past",
        ));
    }
    let report = dora_report(fleet.store.as_ref(), &filter, opts.since, now).await?;
    match opts.format {
        Format::Json => {
            out(&(serde_json::to_string_pretty(&report).expect("the report serialises") + "\n"))
        }
        Format::Text => {
            let mut scope = Vec::new();
            if let Some(a) = &filter.application {
                scope.push(format!("application {a}"));
            }
            if let Some(g) = &filter.deployment_group {
                scope.push(format!("group {g}"));
            }
            if scope.is_empty() {
                scope.push("all deployments".into());
            }
            println!(
                "DORA metrics, {}, {}",
                scope.join(", "),
                fleet.store.describe()
            );
            print!("{}", dora::render_text(&report));
        }
    }
    Ok(0)
}

/// The DORA report of the deployments `filter` keeps (its status and since are ignored) over
/// `[since, now)`: what `pier dora` prints and the dashboard shows, from one place. It reads
/// the whole history, not just the window: deployments before it tell repeats of a commit and
/// incidents still open when it starts.
pub async fn dora_report(
    store: &dyn ObjectStore,
    filter: &HistoryFilter,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<dora::DoraReport, ControllerError> {
    let filter = HistoryFilter {
        status: None,
        since: None,
        ..filter.clone()
    };
    let records = load_records(store, &filter).await?;
    Ok(dora::compute(&records, since, now, now))
}

/// Writes to stdout; a reader that went away (`| head`) is not an error worth a panic.
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// A revision in a few characters: the archive's file name, or `owner/repo@commit`.
pub fn short_revision(revision: &Revision) -> String {
    let last = |s: &str| {
        s.trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(s)
            .to_string()
    };
    match revision {
        Revision::S3 { key, .. } => last(key),
        Revision::Local { path, .. } => last(path),
        Revision::Http { url, .. } => last(url.split(['?', '#']).next().unwrap_or(url)),
        Revision::Github {
            owner,
            repo,
            commit,
            ..
        } => format!("{owner}/{repo}@{}", short(commit)),
    }
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// The records as an aligned table, one line each.
pub fn render_table(records: &[DeploymentRecord]) -> String {
    let header = [
        "ID",
        "APPLICATION",
        "GROUP",
        "REVISION",
        "COMMIT",
        "CREATOR",
        "STATUS",
        "STARTED",
        "DURATION",
        "ROLLBACK",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in records {
        let mut links = Vec::new();
        if let Some(of) = &r.rollback_of {
            links.push(format!("rolls back {of}"));
        }
        if let Some(by) = &r.rolled_back_by {
            links.push(format!("rolled back by {by}"));
        }
        rows.push(vec![
            r.deployment_id.clone(),
            r.application.clone(),
            r.deployment_group.clone(),
            short_revision(&r.revision),
            r.commit_sha
                .as_deref()
                .map(|c| short(c).to_string())
                .unwrap_or_else(|| "-".into()),
            r.creator.clone(),
            format!("{:?}", r.status),
            r.started_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
                .unwrap_or_else(|| "-".into()),
            match (r.started_at, r.ended_at) {
                (Some(s), Some(e)) => human_duration((e - s).num_seconds()),
                _ => "-".into(),
            },
            links.join(", "),
        ]);
    }
    super::aligned(&rows)
}

/// Parses a `--status` value: a [`RolloutStatus`] name in any case, with or without `-`/`_`
/// (`succeeded`, `Failed`, `pending-approval`, `InProgress`).
pub fn parse_status(flag: &str, value: &str) -> Result<RolloutStatus, ControllerError> {
    let norm: String = value
        .chars()
        .filter(|c| !matches!(c, '-' | '_'))
        .flat_map(char::to_lowercase)
        .collect();
    Ok(match norm.as_str() {
        "pendingapproval" => RolloutStatus::PendingApproval,
        "inprogress" => RolloutStatus::InProgress,
        "succeeded" => RolloutStatus::Succeeded,
        "failed" => RolloutStatus::Failed,
        "stopped" => RolloutStatus::Stopped,
        _ => {
            return Err(ControllerError::usage(
                flag,
                format!(
                    "`{value}` is not a deployment status: PendingApproval, InProgress, \
                     Succeeded, Failed or Stopped"
                ),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dora::tests::{at, rec};
    use pier_transport::store::{DirStore, Precondition};

    #[test]
    fn since_takes_days_hours_minutes_or_a_time() {
        let now = at(3, 0, 0);
        assert_eq!(
            parse_since("--since", "30d", now).unwrap(),
            now - Duration::days(30)
        );
        assert_eq!(parse_since("--since", "12h", now).unwrap(), at(2, 12, 0));
        assert_eq!(parse_since("--since", "90m", now).unwrap(), at(2, 22, 30));
        assert_eq!(
            parse_since("--since", "45s", now).unwrap(),
            now - Duration::seconds(45)
        );
        assert_eq!(
            parse_since("--since", "1w", now).unwrap(),
            now - Duration::days(7)
        );
        assert_eq!(
            parse_since("--since", "2026-03-01T00:00:00Z", now).unwrap(),
            at(1, 0, 0)
        );
        for bad in [
            "",
            "30",
            "d",
            "0d",
            "-1d",
            "1.5h",
            "3 d",
            "30x",
            "1mo",
            "99999999999999999d",
        ] {
            let e = parse_since("--since", bad, now).unwrap_err();
            assert!(e.to_string().starts_with("--since: "), "{bad}: {e}");
            assert_eq!(e.exit_code(), crate::EXIT_USAGE);
        }
    }

    #[test]
    fn statuses_in_any_spelling() {
        assert_eq!(
            parse_status("--status", "succeeded").unwrap(),
            RolloutStatus::Succeeded
        );
        assert_eq!(
            parse_status("--status", "pending-approval").unwrap(),
            RolloutStatus::PendingApproval
        );
        assert_eq!(
            parse_status("--status", "InProgress").unwrap(),
            RolloutStatus::InProgress
        );
        assert!(parse_status("--status", "done").is_err());
    }

    #[test]
    fn only_deployment_records_are_read() {
        assert!(is_record_key("deployments/d-1/record.json"));
        assert!(!is_record_key("deployments/d-1/hosts/h1.json"));
        assert!(!is_record_key("deployments/record.json"));
        assert!(!is_record_key("deployments/d-1/x/record.json"));
        assert!(!is_record_key("groups/record.json"));
    }

    #[tokio::test]
    async fn records_load_filtered_newest_first_skipping_unreadable_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path());
        let mut web_old = rec("d-1", "web", RolloutStatus::Succeeded, Some(at(1, 10, 0)));
        web_old.application = "shop".into();
        let web_new = rec("d-2", "web", RolloutStatus::Failed, Some(at(2, 10, 0)));
        let mut api = rec("d-3", "api", RolloutStatus::Succeeded, Some(at(2, 12, 0)));
        api.application = "billing".into();
        for r in [&web_old, &web_new, &api] {
            store
                .put(
                    &format!("deployments/{}/record.json", r.deployment_id),
                    r.to_json(),
                    Precondition::None,
                )
                .await
                .unwrap();
        }
        // A host's status record beside them, and a damaged record.
        store
            .put(
                "deployments/d-1/hosts/h1.json",
                b"{}".to_vec(),
                Precondition::None,
            )
            .await
            .unwrap();
        store
            .put(
                "deployments/d-9/record.json",
                b"{not json".to_vec(),
                Precondition::None,
            )
            .await
            .unwrap();

        let ids = |rs: Vec<DeploymentRecord>| -> Vec<String> {
            rs.into_iter().map(|r| r.deployment_id).collect()
        };
        let all = load_records(&store, &HistoryFilter::default())
            .await
            .unwrap();
        assert_eq!(ids(all), ["d-3", "d-2", "d-1"]);
        let f = HistoryFilter {
            application: Some("shop".into()),
            ..Default::default()
        };
        assert_eq!(ids(load_records(&store, &f).await.unwrap()), ["d-2", "d-1"]);
        let f = HistoryFilter {
            deployment_group: Some("web".into()),
            status: Some(RolloutStatus::Succeeded),
            ..Default::default()
        };
        assert_eq!(ids(load_records(&store, &f).await.unwrap()), ["d-1"]);
        // Created at or after: d-2 was created at 2 Mar 09:55.
        let f = HistoryFilter {
            since: Some(at(2, 9, 55)),
            ..Default::default()
        };
        assert_eq!(ids(load_records(&store, &f).await.unwrap()), ["d-3", "d-2"]);
    }

    #[test]
    fn the_table_is_aligned_and_shows_rollback_links() {
        let mut a = rec(
            "d-AAAAAAAAA",
            "web",
            RolloutStatus::Failed,
            Some(at(1, 10, 0)),
        );
        a.commit_sha = Some("0123456789abcdef0123".into());
        a.rolled_back_by = Some("d-B".into());
        let mut b = rec("d-B", "web", RolloutStatus::Succeeded, Some(at(1, 10, 30)));
        b.rollback_of = Some("d-AAAAAAAAA".into());
        b.revision = Revision::S3 {
            bucket: "revs".into(),
            key: "shop/web-1.2.tgz".into(),
            version_id: None,
            etag: None,
            bundle_type: pier_protocol::BundleType::Tgz,
            sha256: "a".repeat(64),
        };
        let mut c = rec("d-C", "web", RolloutStatus::PendingApproval, None);
        c.started_at = None;
        let table = render_table(&[b, a, c]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        // Every column starts at the same place on every line.
        let col = |l: &str, word: &str| l.find(word).unwrap();
        assert_eq!(
            col(lines[0], "STATUS"),
            col(lines[1], "Succeeded"),
            "{table}"
        );
        assert_eq!(col(lines[0], "STATUS"), col(lines[2], "Failed"), "{table}");
        assert!(lines[1].contains("web-1.2.tgz"), "{table}");
        assert!(lines[1].ends_with("rolls back d-AAAAAAAAA"), "{table}");
        assert!(lines[2].contains("0123456789ab "), "{table}");
        assert!(lines[2].contains("2026-03-01 09:56:00Z  4m00s"), "{table}");
        assert!(lines[2].ends_with("rolled back by d-B"), "{table}");
        assert!(lines[3].contains("PendingApproval  -  "), "{table}");
    }
}
