//! The policy chain (`[[policies]]`), the bounds on every policy call
//! (`[policy_runtime]`) and where deployed versions live (`[policy_store]`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::names;
use super::units::{de_bytes, de_duration};
use super::{invalid, ConfigError};

/// Bounds on every policy call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyRuntimeConfig {
    /// CPU time one policy call may take before it is interrupted.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Linear memory one policy instance may grow to.
    #[serde(deserialize_with = "de_bytes")]
    pub memory_limit: u64,
    /// Policy instances alive at once (one per request being decided).
    pub max_instances: u32,
    /// Largest body a policy may read through `request-data.body`.
    #[serde(deserialize_with = "de_bytes")]
    pub max_body_bytes: u64,
}

impl Default for PolicyRuntimeConfig {
    fn default() -> Self {
        PolicyRuntimeConfig {
            // A policy needs tens of µs of CPU. Waits for a saturated
            // executor are not charged to the guest, but ticks land on a busy
            // machine late: keep a wide margin. Loops are throttled anyway.
            timeout: Duration::from_millis(250),
            memory_limit: 64 << 20,
            max_instances: 1000,
            max_body_bytes: 1 << 20,
        }
    }
}

/// Where deployed policies live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyStoreConfig {
    /// Deployed versions and the chain, so deploys survive a restart.
    /// Default: `sluice-state` next to the config file.
    pub state_dir: Option<PathBuf>,
    /// Dropping `NAME.wasm` (and optionally `NAME.json`) here deploys it.
    pub watch_dir: Option<PathBuf>,
    /// How often the watched directory is scanned.
    #[serde(deserialize_with = "de_duration")]
    pub watch_interval: Duration,
    /// How often `state_dir` is checked for a chain another replica sharing
    /// it deployed; `0s` turns following off.
    #[serde(deserialize_with = "de_duration")]
    pub sync_interval: Duration,
}

impl Default for PolicyStoreConfig {
    fn default() -> Self {
        PolicyStoreConfig {
            state_dir: None,
            watch_dir: None,
            watch_interval: Duration::from_secs(1),
            sync_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    /// `builtin:NAME` for a bundled policy, or a path to a `.wasm`
    /// component (relative paths are relative to the config file).
    pub module: String,
    /// Handed to the guest as JSON.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// What happens to a request when this policy traps, times out, runs
    /// out of memory or returns an invalid decision.
    #[serde(default)]
    pub on_error: OnError,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Answer 503 naming the policy.
    #[default]
    FailClosed,
    /// Skip the policy and go on with the chain.
    FailOpen,
}

impl PolicyConfig {
    /// `builtin:model-router` with no configuration: the chain when none is
    /// configured.
    pub(super) fn default_router() -> PolicyConfig {
        PolicyConfig {
            name: "router".into(),
            module: "builtin:model-router".into(),
            config: empty_object(),
            on_error: OnError::FailClosed,
        }
    }
}

impl PolicyRuntimeConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.timeout.is_zero() {
            return Err(invalid("policy_runtime.timeout", "must be greater than 0"));
        }
        if self.memory_limit < (1 << 20) {
            return Err(invalid(
                "policy_runtime.memory_limit",
                "must be at least 1MiB",
            ));
        }
        if self.max_instances == 0 {
            return Err(invalid(
                "policy_runtime.max_instances",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

pub(super) fn validate(policies: &[PolicyConfig]) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    for (i, p) in policies.iter().enumerate() {
        let key = |field: &str| format!("policies[{i}].{field}");
        names::check_policy_name(&p.name).map_err(|m| invalid(key("name"), m))?;
        if !names.insert(p.name.as_str()) {
            return Err(invalid(key("name"), format!("`{}` is used twice", p.name)));
        }
        match p.module.strip_prefix("builtin:") {
            Some(builtin) if crate::bundled::find(builtin).is_none() => {
                return Err(invalid(
                    key("module"),
                    format!(
                        "no bundled policy `{builtin}` (bundled: {})",
                        crate::bundled::names().join(", ")
                    ),
                ));
            }
            Some(_) => {}
            None if !Path::new(&p.module).is_file() => {
                return Err(invalid(key("module"), format!("no file at {}", p.module)));
            }
            None => {}
        }
        if !p.config.is_object() {
            return Err(invalid(key("config"), "must be a table"));
        }
    }
    Ok(())
}
