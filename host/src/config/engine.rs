//! Which inference engine a backend runs and how its own metrics are read:
//! the `engine` and `metrics_url` keys of a backend and the
//! `[engine_metrics]` section (interval, bounds, metric-name overrides).

use std::time::Duration;

use serde::Deserialize;

use super::units::{de_bytes, de_duration, de_opt_duration};
use super::{invalid, ConfigError};

/// The server software behind a backend; it decides where its metrics are
/// and what they are called.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Vllm,
    Sglang,
    Llamacpp,
    Tgi,
    Ollama,
    /// Nothing is scraped.
    #[default]
    None,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::Llamacpp => "llamacpp",
            EngineKind::Tgi => "tgi",
            EngineKind::Ollama => "ollama",
            EngineKind::None => "none",
        }
    }

    /// The path the engine serves its state on, joined to the backend's
    /// `url` when `metrics_url` is not set. Ollama has no Prometheus
    /// endpoint: its `/api/ps` lists the models loaded.
    pub fn default_metrics_path(self) -> Option<&'static str> {
        match self {
            EngineKind::Vllm | EngineKind::Sglang | EngineKind::Llamacpp | EngineKind::Tgi => {
                Some("/metrics")
            }
            EngineKind::Ollama => Some("/api/ps"),
            EngineKind::None => None,
        }
    }
}

/// `[engine_metrics]`: how often and how carefully engines are scraped.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineMetricsConfig {
    /// Time between two scrapes of one backend.
    #[serde(deserialize_with = "de_duration")]
    pub interval: Duration,
    /// A scrape not finished within this (connect, headers and body) fails.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// A metrics body larger than this is cut off and the scrape fails.
    #[serde(deserialize_with = "de_bytes")]
    pub max_bytes: u64,
    /// Signals older than this are stale: the backend's saturation is
    /// unknown (never down for that alone). Default: 4 × `interval`.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub stale_after: Option<Duration>,
    /// Metric names per engine, for engines that renamed theirs.
    pub names: EngineNamesConfig,
}

impl Default for EngineMetricsConfig {
    fn default() -> Self {
        EngineMetricsConfig {
            interval: Duration::from_millis(250),
            timeout: Duration::from_secs(1),
            max_bytes: 4 << 20,
            stale_after: None,
            names: EngineNamesConfig::default(),
        }
    }
}

impl EngineMetricsConfig {
    /// The age beyond which signals no longer count.
    pub fn stale_after(&self) -> Duration {
        self.stale_after.unwrap_or(self.interval * 4)
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.interval < Duration::from_millis(10) {
            return Err(invalid("engine_metrics.interval", "must be at least 10ms"));
        }
        if self.timeout.is_zero() {
            return Err(invalid("engine_metrics.timeout", "must be greater than 0"));
        }
        if self.max_bytes < 1024 {
            return Err(invalid("engine_metrics.max_bytes", "must be at least 1KiB"));
        }
        if self.stale_after.is_some_and(|s| s < self.interval) {
            return Err(invalid(
                "engine_metrics.stale_after",
                "must not be shorter than engine_metrics.interval",
            ));
        }
        for (engine, names) in [
            ("vllm", &self.names.vllm),
            ("sglang", &self.names.sglang),
            ("llamacpp", &self.names.llamacpp),
            ("tgi", &self.names.tgi),
        ] {
            for (field, name) in [
                ("waiting", &names.waiting),
                ("running", &names.running),
                ("kv_usage", &names.kv_usage),
                ("lora_info", &names.lora_info),
            ] {
                if let Some(name) = name {
                    check_metric_name(name).map_err(|m| {
                        invalid(format!("engine_metrics.names.{engine}.{field}"), m)
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// `[engine_metrics.names.ENGINE]` for each engine with Prometheus metrics.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineNamesConfig {
    pub vllm: MetricNames,
    pub sglang: MetricNames,
    pub llamacpp: MetricNames,
    pub tgi: MetricNames,
}

impl EngineNamesConfig {
    /// The overrides for `engine` (none for Ollama and `none`).
    pub fn of(&self, engine: EngineKind) -> Option<&MetricNames> {
        match engine {
            EngineKind::Vllm => Some(&self.vllm),
            EngineKind::Sglang => Some(&self.sglang),
            EngineKind::Llamacpp => Some(&self.llamacpp),
            EngineKind::Tgi => Some(&self.tgi),
            EngineKind::Ollama | EngineKind::None => None,
        }
    }
}

/// Metric names replacing an engine's defaults; unset keys keep them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricNames {
    /// Requests queued, not yet scheduled.
    pub waiting: Option<String>,
    /// Requests in the running batch.
    pub running: Option<String>,
    /// KV-cache usage as a fraction 0..1.
    pub kv_usage: Option<String>,
    /// vLLM's info series with `running_lora_adapters`,
    /// `waiting_lora_adapters` and `max_lora` labels.
    pub lora_info: Option<String>,
}

/// A Prometheus metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn check_metric_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
        ))
    }
}

/// A backend's `engine` and `metrics_url`, checked together.
pub(super) fn validate_backend(
    i: usize,
    engine: EngineKind,
    metrics_url: Option<&str>,
) -> Result<(), ConfigError> {
    let Some(url) = metrics_url else {
        return Ok(());
    };
    let key = format!("backends[{i}].metrics_url");
    if engine == EngineKind::None {
        return Err(invalid(
            key,
            "is set but `engine` is not (say which engine serves it: vllm, sglang, llamacpp, tgi or ollama)",
        ));
    }
    if url.starts_with('/') {
        return super::units::check_path(url).map_err(|m| invalid(key, m));
    }
    super::BackendUrl::parse(url)
        .map(|_| ())
        .map_err(|m| invalid(key, m))
}
