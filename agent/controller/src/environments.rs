//! Environments: named sets of defaults (AWS profile or role, region, endpoint, store, queue
//! template, signing key) in the controller's configuration file, so that one `pier` drives
//! staging and production in separate AWS accounts: `pier --env production deploy ...`.
//!
//! The file (`--controller-config`, `PIER_CONTROLLER_CONFIG`, else
//! `/etc/pier/controller.yml`) is read in two steps like the agent's: raw YAML (a syntax
//! error is `file:line:col`), then checked with every problem reported at once. Choosing an
//! environment sets, before the arguments are read, the environment variables the flags fall
//! back to (`AWS_REGION`, `AWS_PROFILE`, `PIER_ROLE_ARN`, `AWS_ENDPOINT_URL`,
//! `PIER_STATUS_BUCKET`, ...): a flag on the command line still wins over the environment,
//! and the environment wins over the shell's own variables, since choosing it is the point.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pier_protocol::problems::{ProblemList, Problems};
use serde::Deserialize;

use super::ControllerError;

/// Where the controller's configuration is read from when no path is given.
pub const DEFAULT_CONTROLLER_CONFIG: &str = "/etc/pier/controller.yml";

/// One environment's settings, each the default of a flag.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// `--region`.
    pub region: Option<String>,
    /// `--profile`.
    pub profile: Option<String>,
    /// `--role-arn`: a role assumed with the credentials found.
    pub role_arn: Option<String>,
    /// `--endpoint-url`.
    pub endpoint_url: Option<String>,
    /// `--status-bucket`: the fleet's store.
    pub status_bucket: Option<String>,
    /// `--status-prefix`.
    pub status_prefix: Option<String>,
    /// `--status-dir`: a single host's store.
    pub status_dir: Option<PathBuf>,
    /// `--queue-url-template`.
    pub queue_url_template: Option<String>,
    /// `--spool-dir`.
    pub spool_dir: Option<String>,
    /// `--signing-key`.
    pub signing_key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    environments: BTreeMap<String, Environment>,
}

impl Environment {
    /// The variables this environment sets, as (name, value).
    pub fn variables(&self) -> Vec<(&'static str, String)> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        [
            ("AWS_REGION", self.region.clone()),
            ("AWS_PROFILE", self.profile.clone()),
            ("PIER_ROLE_ARN", self.role_arn.clone()),
            ("AWS_ENDPOINT_URL", self.endpoint_url.clone()),
            ("PIER_STATUS_BUCKET", self.status_bucket.clone()),
            ("PIER_STATUS_PREFIX", self.status_prefix.clone()),
            ("PIER_STATUS_DIR", path(&self.status_dir)),
            ("PIER_QUEUE_URL_TEMPLATE", self.queue_url_template.clone()),
            ("PIER_SPOOL_DIR", self.spool_dir.clone()),
            ("PIER_SIGNING_KEY", path(&self.signing_key)),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }

    fn problems(&self, name: &str, out: &mut Problems) {
        if self.status_bucket.is_some() && self.status_dir.is_some() {
            out.push(
                format!("environments.{name}"),
                "give status_bucket or status_dir, not both",
            );
        }
        if let Some(role) = &self.role_arn {
            if !role.starts_with("arn:") || !role.contains(":role/") {
                out.push(
                    format!("environments.{name}.role_arn"),
                    format!("`{role}` is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"),
                );
            }
        }
        if let Some(url) = &self.endpoint_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                out.push(
                    format!("environments.{name}.endpoint_url"),
                    format!("`{url}` is not an http(s) URL"),
                );
            }
        }
        for (key, p) in [
            ("status_dir", &self.status_dir),
            ("signing_key", &self.signing_key),
        ] {
            if p.as_ref().is_some_and(|p| !p.is_absolute()) {
                out.push(
                    format!("environments.{name}.{key}"),
                    "must be an absolute path",
                );
            }
        }
        if let Some(t) = &self.queue_url_template {
            if !t.contains("{host}") {
                out.push(
                    format!("environments.{name}.queue_url_template"),
                    "must contain {host}",
                );
            }
        }
    }
}

/// Reads the environments of the file at `path`, every problem at once.
pub fn load(path: &Path) -> Result<BTreeMap<String, Environment>, ControllerError> {
    let text = std::fs::read_to_string(path).map_err(|e| ControllerError::io("read", path, e))?;
    parse(&path.display().to_string(), &text)
}

/// Parses a controller configuration file's text; `source` names it in errors.
pub fn parse(source: &str, text: &str) -> Result<BTreeMap<String, Environment>, ControllerError> {
    let raw: RawFile = serde_yaml::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!("{source}:{}:{}", l.line(), l.column()))
            .unwrap_or_else(|| source.to_string());
        ControllerError::usage(at, pier_protocol::quote::bounded(&e.to_string(), 300))
    })?;
    let mut problems = Problems::default();
    for (name, env) in &raw.environments {
        if !pier_protocol::is_valid_id(name) {
            problems.push(
                format!("environments.{name}"),
                "not an environment name (letters, digits, `.`, `_`, `-`)",
            );
        }
        env.problems(name, &mut problems);
    }
    if let Err(list) = problems.into_result() {
        return Err(ControllerError::usage(
            source,
            format!("{} problem(s):\n{}", list.len(), ProblemList(&list)),
        ));
    }
    Ok(raw.environments)
}

/// Picks environment `name` from the file at `path`, or says which exist.
pub fn select(path: &Path, name: &str) -> Result<Environment, ControllerError> {
    let mut envs = load(path)?;
    envs.remove(name).ok_or_else(|| {
        ControllerError::usage(
            "--env",
            format!(
                "no environment `{name}` in {}; it has: {}",
                path.display(),
                if envs.is_empty() {
                    "none".to_string()
                } else {
                    envs.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environments_are_read_and_checked() {
        let envs = parse(
            "c.yml",
            "environments:\n  staging:\n    region: eu-west-1\n    profile: staging\n    \
             status_bucket: st\n  production:\n    role_arn: arn:aws:iam::123456789012:role/pier\n    \
             status_bucket: prod\n    signing_key: /etc/pier/prod.key\n",
        )
        .unwrap();
        assert_eq!(envs.len(), 2);
        let prod = &envs["production"];
        assert!(prod.variables().contains(&(
            "PIER_ROLE_ARN",
            "arn:aws:iam::123456789012:role/pier".into()
        )));
        assert!(prod
            .variables()
            .contains(&("PIER_SIGNING_KEY", "/etc/pier/prod.key".into())));

        let e = parse(
            "c.yml",
            "environments:\n  a:\n    role_arn: nope\n    status_dir: rel\n    status_bucket: b\n",
        )
        .unwrap_err()
        .to_string();
        for want in ["a.role_arn", "a.status_dir", "not both"] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
        let e = parse("c.yml", "environments:\n  a:\n    colour: blue\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.yml:3:"), "{e}");
        assert!(e.contains("colour"), "{e}");
    }
}
