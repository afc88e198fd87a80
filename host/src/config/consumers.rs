//! Consumers (`[[consumers]]`), how their keys are required (`[auth]`) and
//! where their counters live (`[limits]`).

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;

use super::names;
use super::policies::OnError;
use super::units::de_duration;
use super::{invalid, ConfigError};

/// Client authentication with consumers' API keys.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Every request needs `Authorization: Bearer KEY` of a consumer. Off:
    /// requests without a known key are served as anonymous (single-user
    /// setups), and a known key still identifies its consumer.
    pub required: bool,
}

/// Where consumers' counters live and what happens when that store fails.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Share counters with other replicas through Redis, e.g.
    /// `redis://127.0.0.1:6379/0`. Unset: in this process's memory.
    pub redis_url: Option<String>,
    /// When Redis fails or is slower than `redis_timeout`: `fail-open`
    /// admits the request (counted in metrics), `fail-closed` answers 503.
    pub on_store_error: OnError,
    #[serde(deserialize_with = "de_duration")]
    pub redis_timeout: Duration,
    /// Completion tokens reserved for a request that sets no `max_tokens`.
    pub default_max_tokens: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            redis_url: None,
            on_store_error: OnError::FailOpen,
            redis_timeout: Duration::from_millis(250),
            default_max_tokens: 1024,
        }
    }
}

/// A consumer: a tenant with API keys, allowed models and limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    pub name: String,
    /// `sha256:HEX` of each API key (`sluice hash-key KEY` prints it); the
    /// plaintext never goes in the file.
    pub key_hashes: Vec<String>,
    /// Models the consumer may use; empty: all.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Tokens (prompt + completion) per minute, reserved at admission.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Tokens per UTC day; over it: 429 `insufficient_quota`.
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    #[serde(default)]
    pub max_concurrent_requests: Option<u64>,
    #[serde(default)]
    pub disabled: bool,
}

impl ConsumerConfig {
    pub fn limits(&self) -> ConsumerLimits {
        ConsumerLimits {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            tokens_per_day: self.tokens_per_day,
            max_concurrent_requests: self.max_concurrent_requests,
        }
    }
}

/// A consumer's limits; unset means none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u64>,
}

impl ConsumerLimits {
    pub fn is_empty(&self) -> bool {
        *self == ConsumerLimits::default()
    }
}

pub(super) fn validate(
    auth: &AuthConfig,
    limits: &LimitsConfig,
    consumers: &[ConsumerConfig],
) -> Result<(), ConfigError> {
    if let Some(url) = &limits.redis_url {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(invalid(
                "limits.redis_url",
                format!("`{url}` must start with redis://"),
            ));
        }
    }
    if limits.redis_timeout.is_zero() {
        return Err(invalid("limits.redis_timeout", "must be greater than 0"));
    }
    let mut names = HashSet::new();
    let mut hashes = HashSet::new();
    for (i, c) in consumers.iter().enumerate() {
        let key = |field: &str| format!("consumers[{i}].{field}");
        names::check_consumer_name(&c.name).map_err(|m| invalid(key("name"), m))?;
        if !names.insert(c.name.as_str()) {
            return Err(invalid(key("name"), format!("`{}` is used twice", c.name)));
        }
        for (j, h) in c.key_hashes.iter().enumerate() {
            let hex = h.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    format!("consumers[{i}].key_hashes[{j}]"),
                    "must be `sha256:` and 64 hex digits (`sluice hash-key KEY` prints it; never put the key itself here)",
                ));
            }
            if !hashes.insert(h.to_ascii_lowercase()) {
                return Err(invalid(
                    format!("consumers[{i}].key_hashes[{j}]"),
                    "the same key is listed twice",
                ));
            }
        }
    }
    if auth.required && consumers.is_empty() {
        tracing::warn!("auth.required is on and no [[consumers]] are configured: only consumers made through the admin API can call");
    }
    Ok(())
}
