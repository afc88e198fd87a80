//! `[[backends]]` (and vllm-router's `[servers]` shape), and the rules
//! every backend follows: `[health_check]`, `[ejection]`, `[retry]`.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;

use super::engine::{self, EngineKind, EngineMetricsConfig};
use super::prefix::PrefixCacheConfig;
use super::units::{check_path, de_duration, de_opt_duration};
use super::{invalid, BackendUrl, ConfigError};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    /// Base URL of an OpenAI-compatible server, e.g. `http://10.0.0.5:8000`.
    /// The client's path (`/v1/chat/completions`) is appended to it.
    pub url: String,
    /// The model names this backend serves. Empty or absent: asked of the
    /// backend (`GET /v1/models`) at start and at every health check.
    #[serde(default)]
    pub models: Vec<String>,
    /// Hard limit on requests in flight to this backend; 0 means none.
    #[serde(default)]
    pub max_concurrent_requests: u32,
    /// Relative share of traffic among backends serving the same model.
    #[serde(default = "one")]
    pub weight: u32,
    /// Sent to the backend as `Authorization: Bearer …` (the client's own
    /// credential never is).
    #[serde(default)]
    pub api_key: Option<String>,
    /// Path probed by health checks instead of `health_check.path`.
    #[serde(default)]
    pub health_path: Option<String>,
    /// The inference engine behind `url`, whose own metrics (queue, batch,
    /// KV cache) are scraped off the request path; `none`: not scraped.
    #[serde(default)]
    pub engine: EngineKind,
    /// Where the engine's metrics are: a URL, or a path joined to `url`.
    /// Default: the engine's usual path (`/metrics`; `/api/ps` for Ollama).
    #[serde(default)]
    pub metrics_url: Option<String>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServersSection {
    #[serde(default)]
    servers: Vec<ServerEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerEntry {
    url: String,
    #[serde(default)]
    max_concurrent_requests: u32,
}

impl ServersSection {
    /// The servers as backends, each named after its `host:port`.
    pub(super) fn into_backends(self) -> Result<Vec<BackendConfig>, ConfigError> {
        let mut backends = Vec::new();
        for (i, server) in self.servers.into_iter().enumerate() {
            let key = format!("servers.servers[{i}].url");
            let url = BackendUrl::parse(&server.url).map_err(|m| invalid(&key, m))?;
            let name = url.authority().to_string();
            if backends.iter().any(|b: &BackendConfig| b.name == name) {
                return Err(invalid(key, format!("`{name}` is listed twice")));
            }
            backends.push(BackendConfig {
                name,
                url: server.url,
                models: Vec::new(),
                max_concurrent_requests: server.max_concurrent_requests,
                weight: 1,
                api_key: None,
                health_path: None,
                engine: EngineKind::None,
                metrics_url: None,
            });
        }
        Ok(backends)
    }
}

/// Active health checks: the host probes every backend on its own, so a
/// dead server is found before a client's request does.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Probe backends at all (model discovery probes regardless).
    pub enabled: bool,
    /// Time between two probes of one backend.
    #[serde(deserialize_with = "de_duration")]
    pub interval: Duration,
    /// A probe not answered within this counts as failed.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Failed probes in a row that mark a backend down.
    pub unhealthy_after: u32,
    /// Successful probes in a row that mark it up again.
    pub healthy_after: u32,
    /// A probe slower than this counts as failed (an overloaded server).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_response_time: Option<Duration>,
    /// Path probed with GET; a backend's `health_path` wins. It must be one
    /// the server really has: `/v1/models` works on vLLM, Ollama, SGLang,
    /// TGI and llama.cpp; vLLM also has `/health`.
    pub path: String,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            enabled: true,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            unhealthy_after: 2,
            healthy_after: 2,
            max_response_time: None,
            path: "/v1/models".into(),
        }
    }
}

/// Passive ejection: real requests failing in a row take a backend out of
/// rotation for a back-off that doubles while it keeps failing.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EjectionConfig {
    /// Failed requests in a row (connect errors, timeouts, 5xx) that eject a
    /// backend; 0 turns passive ejection off.
    pub after_failures: u32,
    /// First ejection's length; each ejection in a row doubles it.
    #[serde(deserialize_with = "de_duration")]
    pub base: Duration,
    /// Longest ejection.
    #[serde(deserialize_with = "de_duration")]
    pub max: Duration,
}

impl Default for EjectionConfig {
    fn default() -> Self {
        EjectionConfig {
            after_failures: 3,
            base: Duration::from_secs(5),
            max: Duration::from_secs(120),
        }
    }
}

/// Moving a failed request to the next backend the policy listed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts after the first, whatever the policies ask (at most 10).
    pub max_retries: u32,
    /// Pause before each retry.
    #[serde(deserialize_with = "de_duration")]
    pub retry_delay: Duration,
    /// Backend statuses that move the request on when no failure hook
    /// decides otherwise; other error statuses go to the client.
    pub on_status: Vec<u16>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 3,
            retry_delay: Duration::ZERO,
            on_status: vec![502, 503, 504],
        }
    }
}

/// The health and ejection rules every backend follows, and how engines
/// are scraped; swapped whole by a config reload.
#[derive(Debug, Clone, Default)]
pub struct HealthRules {
    pub check: HealthCheckConfig,
    pub ejection: EjectionConfig,
    pub engine: EngineMetricsConfig,
    pub prefix: PrefixCacheConfig,
}

pub(super) fn validate(backends: &[BackendConfig]) -> Result<(), ConfigError> {
    if backends.is_empty() {
        return Err(invalid(
            "backends",
            "at least one [[backends]] entry (or [servers] servers = [...]) is required",
        ));
    }
    let mut names = HashSet::new();
    for (i, b) in backends.iter().enumerate() {
        let key = |field: &str| format!("backends[{i}].{field}");
        if b.name.is_empty() {
            return Err(invalid(key("name"), "must not be empty"));
        }
        if !names.insert(b.name.as_str()) {
            return Err(invalid(key("name"), format!("`{}` is used twice", b.name)));
        }
        BackendUrl::parse(&b.url).map_err(|m| invalid(key("url"), m))?;
        if let Some(path) = &b.health_path {
            check_path(path).map_err(|m| invalid(key("health_path"), m))?;
        }
        if let Some(empty) = b.models.iter().position(String::is_empty) {
            return Err(invalid(
                format!("backends[{i}].models[{empty}]"),
                "must not be empty",
            ));
        }
        if b.weight == 0 {
            return Err(invalid(key("weight"), "must be at least 1"));
        }
        engine::validate_backend(i, b.engine, b.metrics_url.as_deref())?;
    }
    Ok(())
}

impl HealthCheckConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        check_path(&self.path).map_err(|m| invalid("health_check.path", m))?;
        if self.interval < Duration::from_millis(10) {
            return Err(invalid("health_check.interval", "must be at least 10ms"));
        }
        if self.timeout.is_zero() {
            return Err(invalid("health_check.timeout", "must be greater than 0"));
        }
        if self.unhealthy_after == 0 {
            return Err(invalid(
                "health_check.unhealthy_after",
                "must be at least 1",
            ));
        }
        if self.healthy_after == 0 {
            return Err(invalid("health_check.healthy_after", "must be at least 1"));
        }
        Ok(())
    }
}

impl EjectionConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.base > self.max {
            return Err(invalid(
                "ejection.base",
                "must not be longer than ejection.max",
            ));
        }
        Ok(())
    }
}

impl RetryConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_retries > 10 {
            return Err(invalid("retry.max_retries", "must be at most 10"));
        }
        if let Some(bad) = self.on_status.iter().position(|s| !(400..=599).contains(s)) {
            return Err(invalid(
                format!("retry.on_status[{bad}]"),
                "must be an error status (400..=599)",
            ));
        }
        Ok(())
    }
}
