//! One GPU backend and the live state the gateway keeps on it: requests in
//! flight (the hard `max_concurrent_requests` limit is enforced here, not
//! left to policies), latency, and health — active (probes) and passive
//! (failing real requests).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::BackendConfig;
use crate::fleet::engine::{EngineProbe, EngineSlot, EngineView};
use crate::fleet::prefix::{PrefixCache, PrefixLimits};
use crate::fleet::rate::RecentRate;
use crate::fleet::stats::Stats;

pub use crate::config::{BackendUrl, HealthRules};

/// "No limit" is a semaphore with more permits than requests can exist, so
/// a reload can move a backend between limited and unlimited in place.
const UNLIMITED: usize = 1 << 24;

fn permits(max_concurrent: u32) -> usize {
    match max_concurrent {
        0 => UNLIMITED,
        n => n as usize,
    }
}

pub struct Backend {
    pub name: Arc<str>,
    pub url: BackendUrl,
    /// `Authorization` to send to this backend, if it wants one.
    pub authorization: Option<HeaderValue>,
    /// Path the health checker probes.
    pub health_path: String,
    /// True when the configuration lists no models: they are discovered.
    pub discovers_models: bool,
    models: ArcSwap<Vec<String>>,
    /// 0 means no limit.
    max_concurrent: AtomicU32,
    weight: AtomicU32,
    in_flight: AtomicU32,
    /// Attempts sent here per second, recently (`engine.sent-rate`).
    sent: RecentRate,
    /// Permits for `max_concurrent_requests`: waiting is first come, first
    /// served.
    limit: Arc<Semaphore>,
    pub stats: Stats,
    latency_us: AtomicU32,
    rules: Arc<ArcSwap<HealthRules>>,
    /// Passive health: failed requests in a row, ejections in a row (the
    /// back-off doubles with each), and the ejection's end in milliseconds
    /// since `clock`.
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    down_until_ms: AtomicU64,
    /// After an ejection ends, the backend waits for a good probe before it
    /// gets traffic again (when active checks are on).
    awaiting_probe: AtomicBool,
    /// Active health: the probe's verdict and its streak (positive: good
    /// probes in a row, negative: failed ones).
    probe_up: AtomicBool,
    probe_streak: AtomicI32,
    last_check_unix_ms: AtomicU64,
    /// The latest distinct errors, newest last, for the console.
    errors: Mutex<VecDeque<RecentError>>,
    /// Set when a reload removed the backend; its health checker stops.
    retired: AtomicBool,
    clock: Instant,
    /// The inference engine's own metrics, as last scraped.
    pub engine: EngineSlot,
    /// The prompt blocks recently sent here: what its prefix cache
    /// probably holds (`[prefix_cache]`).
    pub prefix: PrefixCache,
}

impl Backend {
    pub fn new(
        config: &BackendConfig,
        rules: Arc<ArcSwap<HealthRules>>,
        clock: Instant,
    ) -> Result<Backend, String> {
        let authorization = match &config.api_key {
            Some(key) => Some(
                HeaderValue::from_str(&format!("Bearer {key}"))
                    .map_err(|_| "api_key has characters not allowed in a header".to_string())?,
            ),
            None => None,
        };
        let health_path = config
            .health_path
            .clone()
            .unwrap_or_else(|| rules.load().check.path.clone());
        let url = BackendUrl::parse(&config.url)?;
        let engine = EngineSlot::new(EngineProbe::from_config(config, &url)?);
        let prefix = PrefixCache::new(PrefixLimits::from(&rules.load().prefix));
        Ok(Backend {
            name: config.name.as_str().into(),
            url,
            authorization,
            health_path,
            discovers_models: config.models.is_empty(),
            models: ArcSwap::from_pointee(config.models.clone()),
            max_concurrent: AtomicU32::new(config.max_concurrent_requests),
            weight: AtomicU32::new(config.weight.max(1)),
            in_flight: AtomicU32::new(0),
            sent: RecentRate::new(clock),
            limit: Arc::new(Semaphore::new(permits(config.max_concurrent_requests))),
            stats: Stats::default(),
            latency_us: AtomicU32::new(0),
            rules,
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            down_until_ms: AtomicU64::new(0),
            awaiting_probe: AtomicBool::new(false),
            probe_up: AtomicBool::new(true),
            probe_streak: AtomicI32::new(0),
            last_check_unix_ms: AtomicU64::new(0),
            errors: Mutex::new(VecDeque::new()),
            retired: AtomicBool::new(false),
            clock,
            engine,
            prefix,
        })
    }

    /// Whether a reload may keep this backend (and its live state) for
    /// `config`: same address, credentials, probe path and engine metrics.
    pub fn same_server(&self, config: &BackendConfig) -> bool {
        let engine = EngineProbe::from_config(config, &self.url).ok().flatten();
        let same_engine = match (engine, self.engine.probe()) {
            (None, None) => true,
            (Some(new), Some(old)) => new.kind == old.kind && new.uri == old.uri,
            _ => false,
        };
        let path = config
            .health_path
            .clone()
            .unwrap_or_else(|| self.rules.load().check.path.clone());
        BackendUrl::parse(&config.url).is_ok_and(|u| u == self.url)
            && self.authorization.as_ref().and_then(|a| a.to_str().ok())
                == config
                    .api_key
                    .as_ref()
                    .map(|k| format!("Bearer {k}"))
                    .as_deref()
            && path == self.health_path
            && self.discovers_models == config.models.is_empty()
            && same_engine
    }

    /// Applies a reload's limit, weight and models to the live backend.
    /// Requests in flight keep their slots; a lower limit takes effect as
    /// they finish.
    pub fn update(&self, config: &BackendConfig) {
        self.weight.store(config.weight.max(1), Ordering::Relaxed);
        self.prefix
            .set_limits(PrefixLimits::from(&self.rules.load().prefix));
        if !self.discovers_models {
            self.models.store(Arc::new(config.models.clone()));
        }
        let old = permits(
            self.max_concurrent
                .swap(config.max_concurrent_requests, Ordering::AcqRel),
        );
        let new = permits(config.max_concurrent_requests);
        if new > old {
            self.limit.add_permits(new - old);
        } else if new < old {
            let owed = (old - new) - self.limit.forget_permits(old - new);
            if owed > 0 {
                // The rest are held by requests in flight: take them as
                // they come back, ahead of later arrivals.
                let limit = self.limit.clone();
                tokio::spawn(async move {
                    if let Ok(permits) = limit.acquire_many_owned(owed as u32).await {
                        permits.forget();
                    }
                });
            }
        }
    }

    pub fn models(&self) -> Arc<Vec<String>> {
        self.models.load_full()
    }

    /// Replaces the discovered models; true when they changed.
    pub fn set_discovered_models(&self, models: Vec<String>) -> bool {
        if **self.models.load() == models {
            return false;
        }
        self.models.store(Arc::new(models));
        true
    }

    pub fn max_concurrent(&self) -> u32 {
        self.max_concurrent.load(Ordering::Relaxed)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Attempts sent here per second, averaged over about ten seconds.
    pub fn sent_rate(&self) -> f64 {
        self.sent.per_second(Instant::now())
    }

    /// Sets the recent rate, as `sluice policy test` describes a fleet.
    pub fn set_sent_rate(&self, per_second: f64) {
        self.sent.set(per_second, Instant::now());
    }

    /// What the backend's engine last reported and how old that is; `None`
    /// when no engine is configured.
    pub fn engine_view(&self) -> Option<EngineView> {
        let stale_after = self.rules.load().engine.stale_after();
        self.engine.view(stale_after, Instant::now())
    }

    /// Moving average of time to response headers; 0 before the first answer.
    pub fn latency_us(&self) -> u32 {
        self.latency_us.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Whether requests may go here: the probes say up, no ejection is
    /// running, and an ended ejection has been confirmed by a probe.
    pub fn is_healthy(&self) -> bool {
        if !self.probe_up.load(Ordering::Relaxed) {
            return false;
        }
        if self.down_until_ms.load(Ordering::Relaxed) > self.now_ms() {
            return false;
        }
        !(self.awaiting_probe.load(Ordering::Relaxed) && self.rules.load().check.enabled)
    }

    /// Requests are in flight: their outcome is the health signal (a
    /// failure or a timeout ejects). A probe now would prove nothing more —
    /// and some servers (llama.cpp's, by default) cut a running stream,
    /// or one about to start, when any other request arrives.
    pub fn busy(&self) -> bool {
        self.in_flight() > 0
    }

    /// How long until a running ejection ends and a probe should confirm
    /// the backend; `None` when none is pending.
    pub fn reprobe_in(&self) -> Option<Duration> {
        if !self.awaiting_probe.load(Ordering::Relaxed) {
            return None;
        }
        let until = self.down_until_ms.load(Ordering::Relaxed);
        Some(Duration::from_millis(until.saturating_sub(self.now_ms())))
    }

    /// Takes one of the backend's concurrency slots, or `None` when it is at
    /// `max_concurrent_requests`. The slot is given back when dropped.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        // Fails while others wait in line: no overtaking the queue.
        let permit = self.limit.clone().try_acquire_owned().ok()?;
        Some(Slot::new(self.clone(), permit))
    }

    /// Waits in line (first come, first served) for a slot.
    pub async fn acquire(self: &Arc<Self>) -> Option<Slot> {
        let permit = self.limit.clone().acquire_owned().await.ok()?;
        Some(Slot::new(self.clone(), permit))
    }

    /// The backend answered (any status below 500) after `latency`.
    pub fn record_success(&self, latency: Duration) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
        self.stats.served.fetch_add(1, Ordering::Relaxed);
        self.stats.ttfb.record_us(latency.as_micros() as u64);
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
    /// `ejection.after_failures` in a row — or one, right after an
    /// ejection — it is out of rotation for a back-off that doubles with
    /// every ejection in a row, up to `ejection.max`.
    pub fn record_failure(&self, error: &str) {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        self.set_last_error(error);
        let rules = self.rules.load();
        let after = rules.ejection.after_failures;
        if after == 0 {
            return;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let ejections = self.ejections.load(Ordering::Relaxed);
        if failures < after && ejections == 0 {
            return;
        }
        if self.down_until_ms.load(Ordering::Relaxed) > self.now_ms() {
            return; // already out: requests that were in flight failing too
        }
        let factor = 1u32 << ejections.min(16);
        let backoff = rules
            .ejection
            .base
            .saturating_mul(factor)
            .min(rules.ejection.max);
        self.ejections.store(ejections + 1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.down_until_ms.store(
            self.now_ms() + backoff.as_millis() as u64,
            Ordering::Relaxed,
        );
        self.awaiting_probe.store(true, Ordering::Relaxed);
        tracing::warn!(backend = %self.name, "ejected after {failures} failed requests in a row, for {backoff:?}");
    }

    /// A probe's result: marks the backend down after
    /// `health_check.unhealthy_after` failures in a row and up after
    /// `healthy_after` successes. A good probe ends the wait after an
    /// ejection; a failed one ejects again, for longer.
    pub fn record_probe(&self, result: Result<(), String>) {
        self.last_check_unix_ms.store(unix_ms(), Ordering::Relaxed);
        let rules = self.rules.load();
        let reprobe = self.awaiting_probe.load(Ordering::Relaxed)
            && self.down_until_ms.load(Ordering::Relaxed) <= self.now_ms();
        match result {
            Ok(()) => {
                let streak = self.probe_streak.load(Ordering::Relaxed).max(0) + 1;
                self.probe_streak.store(streak, Ordering::Relaxed);
                if reprobe {
                    self.awaiting_probe.store(false, Ordering::Relaxed);
                    tracing::info!(backend = %self.name, "back in rotation after its ejection");
                }
                if streak as u32 >= rules.check.healthy_after
                    && !self.probe_up.swap(true, Ordering::Relaxed)
                {
                    // The probes saw it down and now up: whatever ejected it
                    // meanwhile (the same outage, seen by requests) is over.
                    // A relapse still ejects for longer.
                    self.down_until_ms.store(0, Ordering::Relaxed);
                    self.awaiting_probe.store(false, Ordering::Relaxed);
                    tracing::info!(backend = %self.name, "marked up after {streak} good probes");
                }
            }
            Err(error) => {
                let streak = self.probe_streak.load(Ordering::Relaxed).min(0) - 1;
                self.probe_streak.store(streak, Ordering::Relaxed);
                if reprobe {
                    self.record_failure(&error);
                } else {
                    self.set_last_error(&error);
                }
                if streak.unsigned_abs() >= rules.check.unhealthy_after
                    && self.probe_up.swap(false, Ordering::Relaxed)
                {
                    tracing::warn!(backend = %self.name, error = %error, "marked down after {} failed probes", -streak);
                }
            }
        }
    }

    /// Notes an error; the same message again (a probe failing every few
    /// seconds) only counts and moves its time, so an outage does not push
    /// out everything before it.
    fn set_last_error(&self, error: &str) {
        let Ok(mut errors) = self.errors.lock() else {
            return;
        };
        let now = unix_ms();
        match errors.back_mut() {
            Some(last) if last.message == error => {
                last.last_ms = now;
                last.count += 1;
            }
            _ => {
                if errors.len() == RECENT_ERRORS {
                    errors.pop_front();
                }
                errors.push_back(RecentError {
                    first_ms: now,
                    last_ms: now,
                    count: 1,
                    message: error.to_string(),
                });
            }
        }
    }

    pub fn last_error(&self) -> Option<String> {
        Some(self.errors.lock().ok()?.back()?.message.clone())
    }

    /// The latest distinct errors, newest first.
    pub fn recent_errors(&self) -> Vec<RecentError> {
        match self.errors.lock() {
            Ok(errors) => errors.iter().rev().cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Unix time of the last probe in milliseconds; `None` before the first.
    pub fn last_check_unix_ms(&self) -> Option<u64> {
        Some(self.last_check_unix_ms.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

/// Distinct errors kept per backend.
const RECENT_ERRORS: usize = 10;

/// An error a backend gave (a failed request or probe), with how often it
/// repeated in a row.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RecentError {
    /// Unix milliseconds of its first and latest occurrence.
    pub first_ms: u64,
    pub last_ms: u64,
    pub count: u64,
    pub message: String,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One request's claim on a backend's concurrency, given back on drop,
/// when the answer's last byte has gone.
pub struct Slot {
    backend: Arc<Backend>,
    _permit: OwnedSemaphorePermit,
    /// The model's counters, once the request knows which model answers.
    model: Option<Arc<ModelLoad>>,
    since: Instant,
}

impl Slot {
    fn new(backend: Arc<Backend>, permit: OwnedSemaphorePermit) -> Slot {
        backend.in_flight.fetch_add(1, Ordering::AcqRel);
        let since = Instant::now();
        backend.sent.note(since);
        Slot {
            backend,
            _permit: permit,
            model: None,
            since,
        }
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Counts the request in flight for its model too.
    pub fn track(&mut self, model: Arc<ModelLoad>) {
        model.in_flight.fetch_add(1, Ordering::AcqRel);
        self.model = Some(model);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let us = self.since.elapsed().as_micros() as u64;
        self.backend.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.backend.stats.duration.record_us(us);
        if let Some(model) = &self.model {
            model.in_flight.fetch_sub(1, Ordering::AcqRel);
            model.stats.duration.record_us(us);
        }
    }
}

/// A model's counters, kept across reloads for as long as some backend
/// serves it.
#[derive(Default)]
pub struct ModelLoad {
    pub in_flight: AtomicU32,
    pub stats: Stats,
}

impl ModelLoad {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn config(max: u32) -> BackendConfig {
        BackendConfig {
            name: "vm01".into(),
            url: "http://127.0.0.1:9/base/".into(),
            models: vec!["a".into(), "b".into()],
            max_concurrent_requests: max,
            weight: 1,
            api_key: None,
            health_path: None,
            engine: Default::default(),
            metrics_url: None,
        }
    }

    fn backend(max: u32, rules: HealthRules) -> Arc<Backend> {
        let rules = Arc::new(ArcSwap::from_pointee(rules));
        Arc::new(Backend::new(&config(max), rules, Instant::now()).unwrap())
    }

    #[test]
    fn slots_respect_the_limit_and_come_back() {
        let b = backend(2, HealthRules::default());
        let one = b.try_acquire().unwrap();
        let _two = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_none());
        drop(one);
        assert_eq!(b.in_flight(), 1);
        assert!(b.try_acquire().is_some());
    }

    #[tokio::test]
    async fn a_reload_changes_the_limit_in_place() {
        let b = backend(1, HealthRules::default());
        let held = b.try_acquire().unwrap();
        b.update(&config(3));
        let _more = [b.try_acquire().unwrap(), b.try_acquire().unwrap()];
        assert!(b.try_acquire().is_none());
        b.update(&config(1));
        drop(held);
        tokio::task::yield_now().await;
        assert!(b.try_acquire().is_none(), "over the lowered limit");
        b.update(&config(0));
        assert!(b.try_acquire().is_some(), "unlimited");
    }

    #[test]
    fn repeated_failures_eject_and_success_resets() {
        let b = backend(0, HealthRules::default());
        b.record_failure("x");
        b.record_failure("x");
        b.record_success(Duration::from_millis(3));
        b.record_failure("x");
        assert!(b.is_healthy());
        b.record_failure("x");
        b.record_failure("x");
        assert!(!b.is_healthy());
        assert_eq!(b.last_error().as_deref(), Some("x"));
    }

    #[test]
    fn recent_errors_fold_repeats_and_keep_the_latest_ten() {
        let b = backend(0, HealthRules::default());
        for message in ["refused", "refused", "refused", "timeout"] {
            b.set_last_error(message);
        }
        let recent = b.recent_errors();
        let seen: Vec<(&str, u64)> = recent
            .iter()
            .map(|e| (e.message.as_str(), e.count))
            .collect();
        assert_eq!(seen, [("timeout", 1), ("refused", 3)]);
        for i in 0..20 {
            b.set_last_error(&format!("e{i}"));
        }
        let recent = b.recent_errors();
        assert_eq!(recent.len(), RECENT_ERRORS);
        assert_eq!(recent[0].message, "e19");
        assert_eq!(recent[9].message, "e10");
        assert_eq!(b.last_error().as_deref(), Some("e19"));
    }

    #[test]
    fn ejections_grow_and_need_a_good_probe() {
        let mut rules = HealthRules::default();
        rules.ejection.after_failures = 1;
        rules.ejection.base = Duration::ZERO;
        let b = backend(0, rules);
        b.record_failure("refused");
        // The back-off is over at once, but a probe must confirm first.
        assert_eq!(b.reprobe_in(), Some(Duration::ZERO));
        assert!(!b.is_healthy());
        b.record_probe(Err("refused".into()));
        assert!(!b.is_healthy());
        assert_eq!(b.ejections.load(Ordering::Relaxed), 2, "ejected again");
        b.record_probe(Ok(()));
        assert!(b.is_healthy());
        assert_eq!(b.reprobe_in(), None);
    }

    #[test]
    fn coming_back_up_by_probes_ends_an_ejection() {
        let b = backend(0, HealthRules::default());
        b.record_probe(Err("refused".into()));
        b.record_probe(Err("refused".into()));
        for _ in 0..3 {
            b.record_failure("refused");
        }
        assert!(b.reprobe_in().is_some_and(|d| d > Duration::from_secs(1)));
        b.record_probe(Ok(()));
        b.record_probe(Ok(()));
        assert!(b.is_healthy(), "back without waiting out the ejection");
    }

    #[test]
    fn probes_mark_down_and_up_after_their_streaks() {
        let b = backend(0, HealthRules::default());
        b.record_probe(Err("refused".into()));
        assert!(b.is_healthy(), "one failed probe is not enough");
        b.record_probe(Err("refused".into()));
        assert!(!b.is_healthy());
        b.record_probe(Ok(()));
        assert!(!b.is_healthy());
        b.record_probe(Ok(()));
        assert!(b.is_healthy());
        assert!(b.last_check_unix_ms().is_some());
    }

    #[test]
    fn urls_join_paths() {
        let b = backend(0, HealthRules::default());
        let uri = b.url.join("/v1/models").unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:9/base/v1/models");
        assert!(BackendUrl::parse("https://x").is_err());
    }
}
