//! The typed, validated configuration (`sluice.toml`).
//!
//! Parsing rejects unknown keys and wrong types (the TOML error names the
//! line and key); [`Config::validate`] then checks what types cannot say,
//! again naming the key, so an operator never has to guess which line is bad.
//! Each section lives in its own file with its defaults and its checks:
//! `server`, `backends` (with health checks, ejection and retries),
//! `engine` (scraping the inference engines), `policies`, `consumers`,
//! `usage`, `workers`; `units` reads durations and sizes, `names` is the
//! one naming rule.

mod backends;
mod consumers;
mod engine;
pub mod names;
mod policies;
mod prefix;
mod server;
#[cfg(test)]
mod tests;
mod units;
mod url;
mod usage;
mod workers;

pub use backends::{
    BackendConfig, EjectionConfig, HealthCheckConfig, HealthRules, RetryConfig, ServersSection,
};
pub use consumers::{AuthConfig, ConsumerConfig, ConsumerLimits, LimitsConfig};
pub use engine::{EngineKind, EngineMetricsConfig, EngineNamesConfig, MetricNames};
pub use policies::{OnError, PolicyConfig, PolicyRuntimeConfig, PolicyStoreConfig};
pub use prefix::PrefixCacheConfig;
pub use server::{ServerConfig, StatusEndpoints, DEFAULT_ADMIN_LISTEN};
pub use units::{parse_bytes, parse_duration};
pub use url::BackendUrl;
pub use usage::{RecordingConfig, UsageConfig};
pub use workers::{WorkerConfig, RESERVED_PATHS};

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A configuration problem, with the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub policy_runtime: PolicyRuntimeConfig,
    #[serde(default)]
    pub policy_store: PolicyStoreConfig,
    #[serde(default)]
    pub usage: UsageConfig,
    #[serde(default)]
    pub recording: RecordingConfig,
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    #[serde(default)]
    pub ejection: EjectionConfig,
    #[serde(default)]
    pub engine_metrics: EngineMetricsConfig,
    #[serde(default)]
    pub prefix_cache: PrefixCacheConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub consumers: Vec<ConsumerConfig>,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// vllm-router's `servers.toml` shape (`[servers] servers = [{ url,
    /// max_concurrent_requests }]`), read as backends named after their
    /// address whose models are asked of them: an operator moving from it
    /// keeps the file. Empty once parsed.
    #[serde(default)]
    pub servers: ServersSection,
    /// The policy chain, run in order for every request. Empty means the
    /// default chain: `builtin:model-router` with no configuration.
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
    /// HTTP components mounted on routes next to the OpenAI API.
    #[serde(default)]
    pub workers: Vec<WorkerConfig>,
}

impl Config {
    /// Reads, parses and validates a config file. Relative module paths are
    /// resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                file: path.to_owned(),
                message,
            },
            other => other,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let store = &mut config.policy_store;
        store.state_dir = Some(
            base.join(
                store
                    .state_dir
                    .take()
                    .unwrap_or_else(|| "sluice-state".into()),
            ),
        );
        store.watch_dir = store.watch_dir.take().map(|d| base.join(d));
        config.recording.path = config.recording.path.take().map(|p| base.join(p));
        let usage = &mut config.usage;
        usage.database = Some(
            base.join(
                usage
                    .database
                    .take()
                    .unwrap_or_else(|| "sluice-usage.db".into()),
            ),
        );
        config.server.admin_token_file =
            config.server.admin_token_file.take().map(|f| base.join(f));
        for worker in &mut config.workers {
            if Path::new(&worker.module).is_relative() {
                worker.module = base.join(&worker.module).to_string_lossy().into_owned();
            }
        }
        for policy in &mut config.policies {
            if !policy.module.starts_with("builtin:") && Path::new(&policy.module).is_relative() {
                policy.module = base.join(&policy.module).to_string_lossy().into_owned();
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without validating it.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        let servers = std::mem::take(&mut config.servers).into_backends()?;
        config.backends.extend(servers);
        Ok(config)
    }

    /// Checks what the types cannot: uniqueness, URLs, ranges, modules.
    /// Each section checks itself and names its own keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.recording.validate()?;
        self.policy_runtime.validate()?;
        backends::validate(&self.backends)?;
        self.engine_metrics.validate()?;
        self.prefix_cache.validate()?;
        consumers::validate(&self.auth, &self.limits, &self.consumers)?;
        self.usage.validate()?;
        workers::validate(&self.workers)?;
        self.health_check.validate()?;
        self.ejection.validate()?;
        self.retry.validate()?;
        policies::validate(&self.policies)
    }

    /// The health and ejection rules for the fleet.
    pub fn health_rules(&self) -> HealthRules {
        HealthRules {
            check: self.health_check.clone(),
            ejection: self.ejection.clone(),
            engine: self.engine_metrics.clone(),
            prefix: self.prefix_cache.clone(),
        }
    }

    /// The chain to run: the configured policies, or the default router.
    pub fn policy_chain(&self) -> Vec<PolicyConfig> {
        if self.policies.is_empty() {
            vec![PolicyConfig::default_router()]
        } else {
            self.policies.clone()
        }
    }
}
