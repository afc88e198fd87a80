//! `[[workers]]`: edge workers mounted on routes beside the OpenAI API.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;

use super::names;
use super::units::{de_bytes, de_duration};
use super::{invalid, ConfigError};

/// An edge worker: a `wasi:http` component (0.2 `incoming-handler` or 0.3
/// `handler`, what spin-sdk builds) answering every request on its route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    pub name: String,
    /// `/tools/*` (the prefix and everything under it) or an exact path.
    pub route: String,
    /// A `.wasm` component; relative to the config file.
    pub module: String,
    /// Hosts the worker may call (`host` for any port, or `host:port`);
    /// every other outbound request is refused.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Environment variables the worker sees (its only configuration).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Until the response headers, and again for the body after them.
    #[serde(default = "worker_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Linear memory cap per request.
    #[serde(default = "worker_memory", deserialize_with = "de_bytes")]
    pub memory_limit: u64,
    /// Requests the worker runs at once (each in its own instance, with up
    /// to `memory_limit`); more wait up to a second, then get 503.
    #[serde(default = "worker_concurrency")]
    pub max_concurrent_requests: u32,
}

fn worker_concurrency() -> u32 {
    64
}

fn worker_timeout() -> Duration {
    Duration::from_secs(30)
}

fn worker_memory() -> u64 {
    128 << 20
}

/// Paths the gateway answers itself; no worker route may cover them.
pub const RESERVED_PATHS: [&str; 5] = ["/v1", "/health", "/ready", "/metrics", "/load-stats"];

pub(super) fn validate(workers: &[WorkerConfig]) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    let mut routes = HashSet::new();
    for (i, w) in workers.iter().enumerate() {
        let key = |field: &str| format!("workers[{i}].{field}");
        names::check_worker_name(&w.name).map_err(|m| invalid(key("name"), m))?;
        if !names.insert(w.name.as_str()) {
            return Err(invalid(key("name"), format!("`{}` is used twice", w.name)));
        }
        let prefix = names::route_prefix(&w.route).map_err(|m| invalid(key("route"), m))?;
        if let Some(reserved) = RESERVED_PATHS
            .iter()
            .find(|r| prefix.starts_with(*r) || (w.route.ends_with('*') && r.starts_with(prefix)))
        {
            return Err(invalid(
                key("route"),
                format!(
                    "`{}` covers `{reserved}`, which the gateway answers itself",
                    w.route
                ),
            ));
        }
        if !routes.insert(w.route.as_str()) {
            return Err(invalid(
                key("route"),
                format!("`{}` is used twice", w.route),
            ));
        }
        for (j, host) in w.allowed_hosts.iter().enumerate() {
            names::host_and_port(host)
                .map(|_| ())
                .map_err(|m| invalid(format!("workers[{i}].allowed_hosts[{j}]"), m))?;
        }
        if w.timeout.is_zero() {
            return Err(invalid(key("timeout"), "must be greater than 0"));
        }
        if w.memory_limit < (1 << 20) {
            return Err(invalid(key("memory_limit"), "must be at least 1MiB"));
        }
        if w.max_concurrent_requests == 0 {
            return Err(invalid(
                key("max_concurrent_requests"),
                "must be at least 1",
            ));
        }
    }
    Ok(())
}
