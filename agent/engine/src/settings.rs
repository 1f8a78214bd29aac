//! What the engine is told by whoever builds it: where the deployment root is, how many
//! revisions to keep, how hooks run and how large a bundle may be. The agent fills these from
//! its configuration file; the engine never reads that file itself.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the engine needs to know about this host's setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSettings {
    /// The deployment root: revisions, logs, journals, per-group state.
    pub root_dir: PathBuf,
    /// Deployments kept per deployment group (the last successful and the running one are
    /// always kept on top of this).
    pub max_revisions: usize,
    pub hooks: HookSettings,
    pub bundle: BundleLimits,
    /// How Install recognises a file it placed before as unchanged.
    pub install_verify: crate::install::Verify,
}

/// What reaches a hook's environment besides the CodeDeploy variables.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HookEnvPolicy {
    /// Names copied from the agent's own environment when set there (never `AWS_*`).
    pub pass: Vec<String>,
    /// Fixed values set for every hook.
    pub set: BTreeMap<String, String>,
}

impl HookEnvPolicy {
    /// The variables this policy gives a hook, read from `lookup` (the agent's environment).
    pub fn resolve(&self, lookup: impl Fn(&str) -> Option<String>) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for name in &self.pass {
            if let Some(v) = lookup(name) {
                out.push((name.clone(), v));
            }
        }
        for (k, v) in &self.set {
            out.retain(|(n, _)| n != k);
            out.push((k.clone(), v.clone()));
        }
        out
    }
}

/// Hook runner settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSettings {
    /// Time between SIGTERM and SIGKILL when a hook times out or is cancelled.
    pub kill_grace: Duration,
    /// `scripts.log` is rotated when it passes this size.
    pub log_max_bytes: u64,
    /// How many rotated `scripts.log.N` files are kept.
    pub log_keep: usize,
    pub env: HookEnvPolicy,
    /// Caps on each hook's tasks and memory, enforced through its cgroup (not in the
    /// process-group fallback, which logs that once).
    pub limits: crate::hooks::HookLimits,
}

/// Limits on bundles, against archive bombs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleLimits {
    pub max_bytes: u64,
    pub max_entries: u64,
}
