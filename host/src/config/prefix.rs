//! `[prefix_cache]`: the gateway's estimate of what each backend holds in
//! its prefix (KV) cache — how prompts are cut into blocks and how much of
//! them is remembered per backend, for how long.

use std::time::Duration;

use serde::Deserialize;

use super::units::de_duration;
use super::{invalid, ConfigError};

/// `[prefix_cache]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefixCacheConfig {
    /// Hash prompts and keep the per-backend index (default true). Off:
    /// every `prefix-match` is 0 of 0 blocks and nothing is hashed.
    pub enabled: bool,
    /// Bytes of canonical prompt text per block (default 64: about the
    /// 16 tokens of vLLM's default KV block at ~4 bytes a token).
    pub block_bytes: u32,
    /// Blocks remembered per backend (default 131072: 8 MiB of prompt text
    /// at the default block size, ~1.3 MiB of index memory per backend).
    pub capacity: u32,
    /// Blocks not sent to a backend again for this long are forgotten
    /// (default 10m): engines evict idle prefixes too.
    #[serde(deserialize_with = "de_duration")]
    pub ttl: Duration,
}

impl Default for PrefixCacheConfig {
    fn default() -> Self {
        PrefixCacheConfig {
            enabled: true,
            block_bytes: 64,
            capacity: 131_072,
            ttl: Duration::from_secs(600),
        }
    }
}

impl PrefixCacheConfig {
    /// [`PrefixCacheConfig::validate`] for the tools that read a section
    /// of their own (`sluice policy test` fleet files).
    pub fn validate_replay(&self) -> Result<(), ConfigError> {
        self.validate()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(16..=65_536).contains(&self.block_bytes) {
            return Err(invalid(
                "prefix_cache.block_bytes",
                "must be between 16 and 65536",
            ));
        }
        if !(64..=16_777_216).contains(&self.capacity) {
            return Err(invalid(
                "prefix_cache.capacity",
                "must be between 64 and 16777216 blocks",
            ));
        }
        if self.ttl < Duration::from_secs(1) {
            return Err(invalid("prefix_cache.ttl", "must be at least 1s"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let c: PrefixCacheConfig = toml::from_str("").unwrap();
        assert_eq!(c, PrefixCacheConfig::default());
        c.validate().unwrap();
        let c: PrefixCacheConfig =
            toml::from_str("block_bytes = 128\ncapacity = 1024\nttl = \"30s\"").unwrap();
        assert_eq!((c.block_bytes, c.capacity), (128, 1024));
        assert_eq!(c.ttl, Duration::from_secs(30));
        for (bad, key) in [
            ("block_bytes = 4", "prefix_cache.block_bytes"),
            ("capacity = 1", "prefix_cache.capacity"),
            ("ttl = \"10ms\"", "prefix_cache.ttl"),
        ] {
            let c: PrefixCacheConfig = toml::from_str(bad).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with(key), "{e}");
        }
        assert!(toml::from_str::<PrefixCacheConfig>("blocks = 1").is_err());
    }
}
