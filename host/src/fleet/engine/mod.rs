//! What the inference engines say about themselves — requests waiting and
//! running, KV-cache usage, LoRA adapters — scraped off the request path
//! ([`scrape`]) from their own metrics ([`parse`], [`names`]) and kept per
//! backend in a snapshot a request reads without locks.
//!
//! Signals older than `engine_metrics.stale_after`, or never read, leave a
//! backend's saturation *unknown*: scoring must treat it as possibly
//! saturated, never as down for that alone.

pub mod names;
pub mod parse;
pub mod scrape;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::Uri;
use serde::Serialize;
use serde_json::{json, Value};

pub use crate::config::EngineKind;
use crate::config::{BackendConfig, BackendUrl};

/// One reading of an engine's state; `None` where the engine does not
/// report that signal (or this build of it does not).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EngineSignals {
    /// Requests queued in the engine, not yet scheduled (summed over
    /// data-parallel engines).
    pub waiting: Option<u64>,
    /// Requests in the engine's running batch (summed likewise).
    pub running: Option<u64>,
    /// KV-cache usage, 0..1 (the fullest of data-parallel engines).
    pub kv_usage: Option<f64>,
    /// LoRA adapters, where the engine reports them (vLLM).
    pub lora: Option<LoraState>,
    /// Models loaded in memory (Ollama's `/api/ps`).
    pub models_loaded: Option<Vec<String>>,
}

/// The LoRA adapters an engine is serving and queueing for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoraState {
    pub running: Vec<String>,
    pub waiting: Vec<String>,
    /// Adapters the engine can hold at once.
    pub max: Option<u32>,
}

/// Why a scrape failed; `reason()` is the metric label.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScrapeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("the answer is larger than {0} bytes")]
    TooLarge(u64),
    #[error("reading the answer: {0}")]
    Read(String),
    #[error("not readable: {0}")]
    Parse(String),
    #[error("none of the expected metrics ({0}) is there")]
    Missing(String),
}

impl ScrapeError {
    /// A fixed word per kind, for metric labels and `/health`.
    pub fn reason(&self) -> &'static str {
        match self {
            ScrapeError::Timeout(_) => "timeout",
            ScrapeError::Connect(_) => "connect",
            ScrapeError::Status(_) => "status",
            ScrapeError::TooLarge(_) => "too_large",
            ScrapeError::Read(_) => "read",
            ScrapeError::Parse(_) => "parse",
            ScrapeError::Missing(_) => "missing",
        }
    }
}

/// Where one backend's engine state is read.
#[derive(Debug, Clone)]
pub struct EngineProbe {
    pub kind: EngineKind,
    pub uri: Uri,
}

impl EngineProbe {
    /// The probe a backend's config asks for; `None` for `engine = "none"`.
    pub fn from_config(config: &BackendConfig, url: &BackendUrl) -> Result<Option<Self>, String> {
        let Some(default_path) = config.engine.default_metrics_path() else {
            return Ok(None);
        };
        let uri = match config.metrics_url.as_deref() {
            None => url.join(default_path),
            Some(path) if path.starts_with('/') => url.join(path),
            Some(full) => {
                BackendUrl::parse(full)?;
                full.parse::<Uri>().map_err(http::Error::from)
            }
        }
        .map_err(|e| format!("bad metrics_url: {e}"))?;
        Ok(Some(EngineProbe {
            kind: config.engine,
            uri,
        }))
    }
}

/// The last scrape's outcome and the last good reading.
#[derive(Debug, Default)]
struct ScrapeState {
    signals: Option<Arc<EngineSignals>>,
    good_at: Option<Instant>,
    /// The latest scrape's error; cleared by a good one.
    error: Option<ScrapeError>,
}

/// A backend's engine: where to read it and what was read last.
pub struct EngineSlot {
    probe: Option<EngineProbe>,
    state: ArcSwap<ScrapeState>,
}

impl EngineSlot {
    pub fn new(probe: Option<EngineProbe>) -> EngineSlot {
        EngineSlot {
            probe,
            state: ArcSwap::from_pointee(ScrapeState::default()),
        }
    }

    pub fn probe(&self) -> Option<&EngineProbe> {
        self.probe.as_ref()
    }

    /// Stores a scrape's outcome; a failure keeps the last good reading
    /// (it goes stale by itself).
    pub fn record(&self, result: Result<EngineSignals, ScrapeError>, at: Instant) {
        let old = self.state.load();
        let next = match result {
            Ok(signals) => ScrapeState {
                signals: Some(Arc::new(signals)),
                good_at: Some(at),
                error: None,
            },
            Err(error) => ScrapeState {
                signals: old.signals.clone(),
                good_at: old.good_at,
                error: Some(error),
            },
        };
        self.state.store(Arc::new(next));
    }

    /// What is known now; `None` when the backend has no engine set.
    pub fn view(&self, stale_after: Duration, now: Instant) -> Option<EngineView> {
        let probe = self.probe.as_ref()?;
        let state = self.state.load();
        let age = state.good_at.map(|t| now.saturating_duration_since(t));
        let freshness = match age {
            None => Freshness::Unknown,
            Some(age) if age > stale_after => Freshness::Stale,
            Some(_) => Freshness::Fresh,
        };
        Some(EngineView {
            engine: probe.kind,
            signals: state.signals.clone(),
            age,
            freshness,
            error: state.error.clone(),
        })
    }
}

/// Whether an engine's last good reading still counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Freshness {
    /// Read within `stale_after`.
    Fresh,
    /// Read once, but longer ago than `stale_after`.
    Stale,
    /// Never read.
    Unknown,
}

/// A backend's engine state as a request (or the later policy contract)
/// sees it.
#[derive(Debug, Clone)]
pub struct EngineView {
    pub engine: EngineKind,
    /// The last good reading, however old.
    pub signals: Option<Arc<EngineSignals>>,
    /// Time since the last good reading; `None` before the first.
    pub age: Option<Duration>,
    pub freshness: Freshness,
    /// The latest scrape's error, when it failed.
    pub error: Option<ScrapeError>,
}

impl EngineView {
    /// The signals to score on; `None` means saturation unknown (stale or
    /// never read): treat the backend as possibly saturated, not as down.
    pub fn current(&self) -> Option<&EngineSignals> {
        match self.freshness {
            Freshness::Fresh => self.signals.as_deref(),
            Freshness::Stale | Freshness::Unknown => None,
        }
    }

    /// The figures `/metrics` shows.
    pub fn gauges(&self) -> crate::metrics::EngineGauges {
        let signals = self.signals.as_deref();
        crate::metrics::EngineGauges {
            fresh: self.freshness == Freshness::Fresh,
            age_seconds: self.age.map(|a| a.as_secs_f64()),
            waiting: signals.and_then(|s| s.waiting),
            running: signals.and_then(|s| s.running),
            kv_usage: signals.and_then(|s| s.kv_usage),
        }
    }

    /// The `engine` object of a backend in `/health`.
    pub fn to_json(&self) -> Value {
        json!({
            "engine": self.engine.as_str(),
            "status": self.freshness,
            "signals": self.signals.as_deref(),
            "age_ms": self.age.map(|a| a.as_millis() as u64),
            "error": self.error.as_ref().map(ToString::to_string),
            "error_reason": self.error.as_ref().map(ScrapeError::reason),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> EngineSlot {
        EngineSlot::new(Some(EngineProbe {
            kind: EngineKind::Vllm,
            uri: Uri::from_static("http://127.0.0.1:9/metrics"),
        }))
    }

    #[test]
    fn readings_go_stale_and_failures_keep_the_last_good_one() {
        let slot = slot();
        let t0 = Instant::now();
        let stale = Duration::from_secs(1);
        let v = slot.view(stale, t0).unwrap();
        assert_eq!(v.freshness, Freshness::Unknown);
        assert!(v.current().is_none());
        let signals = EngineSignals {
            waiting: Some(3),
            ..Default::default()
        };
        slot.record(Ok(signals.clone()), t0);
        assert_eq!(slot.view(stale, t0).unwrap().current(), Some(&signals));
        slot.record(Err(ScrapeError::Status(500)), t0);
        let v = slot.view(stale, t0 + Duration::from_millis(500)).unwrap();
        assert_eq!(v.current(), Some(&signals), "still fresh");
        assert_eq!(v.error, Some(ScrapeError::Status(500)));
        let v = slot.view(stale, t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(v.freshness, Freshness::Stale);
        assert!(v.current().is_none());
        assert_eq!(v.to_json()["error_reason"], "status");
    }

    #[test]
    fn probes_find_the_engines_metrics() {
        let url = BackendUrl::parse("http://10.0.0.5:8000").unwrap();
        let mut config: BackendConfig =
            toml::from_str("name = \"b\"\nurl = \"http://10.0.0.5:8000\"\nengine = \"ollama\"")
                .unwrap();
        let probe = EngineProbe::from_config(&config, &url).unwrap().unwrap();
        assert_eq!(probe.uri.to_string(), "http://10.0.0.5:8000/api/ps");
        config.engine = EngineKind::Sglang;
        config.metrics_url = Some("http://10.0.0.5:9100/metrics".into());
        let probe = EngineProbe::from_config(&config, &url).unwrap().unwrap();
        assert_eq!(probe.uri.to_string(), "http://10.0.0.5:9100/metrics");
        config.metrics_url = Some("/prom".into());
        let probe = EngineProbe::from_config(&config, &url).unwrap().unwrap();
        assert_eq!(probe.uri.to_string(), "http://10.0.0.5:8000/prom");
        config.engine = EngineKind::None;
        assert!(EngineProbe::from_config(&config, &url).unwrap().is_none());
    }
}
