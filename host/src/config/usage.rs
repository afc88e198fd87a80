//! `[usage]` (the per-request records) and `[recording]` (samples for
//! `sluice policy test`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::{de_bytes, de_duration};
use super::{invalid, ConfigError};

/// Per-request usage records.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// SQLite file for usage records. Default: `sluice-usage.db` next to
    /// the config file.
    pub database: Option<PathBuf>,
    /// Keep no records on disk (metrics and the access log still count).
    pub disabled: bool,
    /// One structured log line per request (never the prompt text).
    pub access_log: bool,
    /// Share records with the other replicas through this Redis, so that
    /// each replica's database (and `/admin/usage`) holds the whole fleet's.
    pub redis_url: Option<String>,
    /// The Redis stream the replicas of one fleet share.
    pub redis_key: String,
    /// The stream is trimmed to about this many records: a replica away for
    /// longer than they last misses the trimmed ones (and logs it).
    pub redis_max_records: u64,
    /// How often records are shipped to and copied from Redis.
    #[serde(deserialize_with = "de_duration")]
    pub sync_interval: Duration,
    /// This replica's name in the records (`group_by=replica`). Default: the
    /// one saved in the database, first made from `HOSTNAME`.
    pub replica: Option<String>,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            database: None,
            disabled: false,
            access_log: true,
            redis_url: None,
            redis_key: "sluice:usage".into(),
            // ~1M records are a few hundred MiB in Redis: days of a busy fleet.
            redis_max_records: 1_000_000,
            sync_interval: Duration::from_secs(1),
            replica: None,
        }
    }
}

/// Sampling live requests to a JSON-lines file that `sluice policy test`
/// replays: metadata and the body (bounded), never credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingConfig {
    /// The file to append to (relative to the config file); unset: off.
    pub path: Option<PathBuf>,
    /// Share of requests recorded, 0.0 to 1.0.
    pub sample: f64,
    /// Bodies larger than this are recorded as their `model` and `stream`
    /// only (enough to replay routing).
    #[serde(deserialize_with = "de_bytes")]
    pub max_body_bytes: u64,
    /// Recording stops when the file reaches this size.
    #[serde(deserialize_with = "de_bytes")]
    pub max_file_bytes: u64,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        RecordingConfig {
            path: None,
            sample: 0.01,
            max_body_bytes: 64 << 10,
            max_file_bytes: 100 << 20,
        }
    }
}

impl UsageConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.redis_url {
            if !url.starts_with("redis://") {
                return Err(invalid(
                    "usage.redis_url",
                    format!("`{url}` must start with redis://"),
                ));
            }
            if self.disabled {
                return Err(invalid(
                    "usage.redis_url",
                    "shares usage records, but usage.disabled keeps none",
                ));
            }
        }
        if self.redis_key.is_empty() {
            return Err(invalid("usage.redis_key", "must not be empty"));
        }
        if self.redis_max_records < 1000 {
            return Err(invalid(
                "usage.redis_max_records",
                "must be at least 1000 (replicas copy records in batches of 500)",
            ));
        }
        if self.sync_interval.is_zero() {
            return Err(invalid("usage.sync_interval", "must be greater than 0"));
        }
        if let Some(name) = &self.replica {
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                return Err(invalid(
                    "usage.replica",
                    "must be 1 to 128 printable characters",
                ));
            }
        }
        Ok(())
    }
}

impl RecordingConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample) {
            return Err(invalid("recording.sample", "must be between 0.0 and 1.0"));
        }
        Ok(())
    }
}
