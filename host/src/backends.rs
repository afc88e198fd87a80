//! The fleet of GPU backends and the live state the gateway keeps on each:
//! requests in flight (the hard `max_concurrent_requests` limit is enforced
//! here, not left to policies), response latency, and passive health.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::BackendConfig;

/// Consecutive failures (connect errors, timeouts, 5xx) after which a
/// backend is taken out of rotation for [`EJECT_FOR`].
const EJECT_AFTER: u32 = 3;
const EJECT_FOR: Duration = Duration::from_secs(5);

/// A backend's base URL, split once at load so each request only appends
/// its path.
#[derive(Debug, Clone)]
pub struct BackendUrl {
    scheme: Scheme,
    authority: Authority,
    prefix: String,
}

impl BackendUrl {
    pub fn parse(url: &str) -> Result<BackendUrl, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        let scheme = uri.scheme().cloned();
        if scheme != Some(Scheme::HTTP) {
            return Err(format!(
                "`{url}` must start with http:// (TLS to backends is not supported yet)"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{url}` has no host"))?;
        if uri.query().is_some() {
            return Err(format!("`{url}` must not have a query"));
        }
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(BackendUrl {
            scheme: Scheme::HTTP,
            authority,
            prefix,
        })
    }

    /// The backend URI for a client's path and query, e.g. `/v1/models`.
    pub fn join(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{path_and_query}", self.prefix))
            .build()
    }
}

pub struct Backend {
    pub name: Arc<str>,
    pub models: Vec<String>,
    /// 0 means no limit.
    pub max_concurrent: u32,
    pub weight: u32,
    pub url: BackendUrl,
    /// `Authorization` to send to this backend, if it wants one.
    pub authorization: Option<HeaderValue>,
    in_flight: AtomicU32,
    /// Permits for `max_concurrent_requests`: waiting is first come, first
    /// served. `None` when the backend has no limit.
    limit: Option<Arc<Semaphore>>,
    latency_us: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `clock` until which the backend is ejected.
    down_until_ms: AtomicU64,
    clock: Instant,
}

impl Backend {
    fn new(config: &BackendConfig, clock: Instant) -> Result<Backend, String> {
        let authorization = match &config.api_key {
            Some(key) => Some(
                HeaderValue::from_str(&format!("Bearer {key}"))
                    .map_err(|_| "api_key has characters not allowed in a header".to_string())?,
            ),
            None => None,
        };
        Ok(Backend {
            name: config.name.as_str().into(),
            models: config.models.clone(),
            max_concurrent: config.max_concurrent_requests,
            weight: config.weight.max(1),
            url: BackendUrl::parse(&config.url)?,
            authorization,
            in_flight: AtomicU32::new(0),
            limit: (config.max_concurrent_requests > 0)
                .then(|| Arc::new(Semaphore::new(config.max_concurrent_requests as usize))),
            latency_us: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            down_until_ms: AtomicU64::new(0),
            clock,
        })
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Moving average of time to response headers; 0 before the first answer.
    pub fn latency_us(&self) -> u32 {
        self.latency_us.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        let now = self.clock.elapsed().as_millis() as u64;
        self.down_until_ms.load(Ordering::Relaxed) <= now
    }

    /// Takes one of the backend's concurrency slots, or `None` when it is at
    /// `max_concurrent_requests`. The slot is given back when dropped.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let permit = match &self.limit {
            // Fails while others wait in line: no overtaking the queue.
            Some(limit) => Some(limit.clone().try_acquire_owned().ok()?),
            None => None,
        };
        Some(Slot::new(self.clone(), permit))
    }

    /// Waits in line (first come, first served) for a slot.
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        let permit = match &self.limit {
            Some(limit) => limit.clone().acquire_owned().await.ok(),
            None => None,
        };
        Slot::new(self.clone(), permit)
    }

    /// The backend answered (any status below 500) after `latency`.
    pub fn record_success(&self, latency: Duration) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let sample = latency.as_micros().min(u32::MAX as u128) as u32;
        let old = self.latency_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            ((u64::from(old) * 4 + u64::from(sample)) / 5) as u32
        };
        // A lost update between racing requests only delays the average.
        self.latency_us.store(new, Ordering::Relaxed);
    }

    /// The backend failed a request (connect error, timeout, 5xx). After
    /// [`EJECT_AFTER`] failures in a row it is out of rotation for
    /// [`EJECT_FOR`], then gets traffic again.
    pub fn record_failure(&self) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= EJECT_AFTER {
            let until = (self.clock.elapsed() + EJECT_FOR).as_millis() as u64;
            self.down_until_ms.store(until, Ordering::Relaxed);
            self.consecutive_failures.store(0, Ordering::Relaxed);
            tracing::warn!(backend = %self.name, "ejected after {failures} failures in a row for {EJECT_FOR:?}");
        }
    }
}

/// One request's claim on a backend's concurrency, given back on drop.
pub struct Slot {
    backend: Arc<Backend>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Slot {
    fn new(backend: Arc<Backend>, permit: Option<OwnedSemaphorePermit>) -> Slot {
        backend.in_flight.fetch_add(1, Ordering::AcqRel);
        Slot {
            backend,
            _permit: permit,
        }
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every backend, indexed by name and by model.
pub struct Fleet {
    backends: Vec<Arc<Backend>>,
    by_name: HashMap<Arc<str>, Arc<Backend>>,
    by_model: HashMap<String, Vec<Arc<Backend>>>,
    models: Vec<String>,
}

impl Fleet {
    pub fn new(configs: &[BackendConfig]) -> Result<Fleet, String> {
        let clock = Instant::now();
        let mut backends = Vec::with_capacity(configs.len());
        for (i, config) in configs.iter().enumerate() {
            let backend = Backend::new(config, clock).map_err(|e| format!("backends[{i}]: {e}"))?;
            backends.push(Arc::new(backend));
        }
        let mut by_name = HashMap::new();
        let mut by_model: HashMap<String, Vec<Arc<Backend>>> = HashMap::new();
        let mut models = Vec::new();
        for b in &backends {
            by_name.insert(b.name.clone(), b.clone());
            for m in &b.models {
                let serving = by_model.entry(m.clone()).or_default();
                if serving.is_empty() {
                    models.push(m.clone());
                }
                serving.push(b.clone());
            }
        }
        Ok(Fleet {
            backends,
            by_name,
            by_model,
            models,
        })
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Backend>> {
        self.by_name.get(name)
    }

    pub fn serving(&self, model: &str) -> &[Arc<Backend>] {
        self.by_model
            .get(model)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Every model some backend serves, in configuration order.
    pub fn models(&self) -> &[String] {
        &self.models
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(max: u32) -> Fleet {
        let config = BackendConfig {
            name: "vm01".into(),
            url: "http://127.0.0.1:9/base/".into(),
            models: vec!["a".into(), "b".into()],
            max_concurrent_requests: max,
            weight: 1,
            api_key: None,
        };
        Fleet::new(&[config]).unwrap()
    }

    #[test]
    fn slots_respect_the_limit_and_come_back() {
        let f = fleet(2);
        let b = f.get("vm01").unwrap();
        let one = b.try_acquire().unwrap();
        let _two = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_none());
        drop(one);
        assert_eq!(b.in_flight(), 1);
        assert!(b.try_acquire().is_some());
    }

    #[test]
    fn repeated_failures_eject_and_success_resets() {
        let f = fleet(0);
        let b = f.get("vm01").unwrap();
        b.record_failure();
        b.record_failure();
        b.record_success(Duration::from_millis(3));
        b.record_failure();
        assert!(b.is_healthy());
        b.record_failure();
        b.record_failure();
        assert!(!b.is_healthy());
    }

    #[test]
    fn urls_join_paths() {
        let f = fleet(0);
        let uri = f.get("vm01").unwrap().url.join("/v1/models").unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:9/base/v1/models");
        assert!(BackendUrl::parse("https://x").is_err());
        assert_eq!(f.serving("b").len(), 1);
        assert_eq!(f.models(), ["a", "b"]);
    }
}
