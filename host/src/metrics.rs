//! Prometheus metrics, served as text at `GET /metrics`. Labels are bounded:
//! policy names, phases and failure kinds come from configuration and code,
//! never from request data.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyFailureLabels {
    pub policy: String,
    pub kind: &'static str,
}

/// `model` is the model that answered (one the fleet serves, so bounded),
/// or "none" when nothing answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub backend: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: String,
    pub backend: String,
    pub consumer: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

/// `worker` comes from configuration, so it is bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerOnlyLabels {
    pub worker: String,
}

/// `reason` is one of the scrape errors' fixed words.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScrapeErrorLabels {
    pub backend: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub consumer: String,
    pub code: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// A backend's engine as `/metrics` shows it: the signals only while they
/// are fresh (a stale value would look current to a dashboard).
pub struct EngineGauges {
    pub fresh: bool,
    pub age_seconds: Option<f64>,
    pub waiting: Option<u64>,
    pub running: Option<u64>,
    pub kv_usage: Option<f64>,
}

pub struct Metrics {
    registry: Registry,
    policy_seconds: HistogramFamily<PolicyLabels>,
    policy_failures: Family<PolicyFailureLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    ttft: HistogramFamily<ModelLabels>,
    latency: HistogramFamily<ModelLabels>,
    tokens_per_second: HistogramFamily<ModelLabels>,
    in_flight: Family<BackendLabels, Gauge>,
    healthy: Family<BackendLabels, Gauge>,
    engine_fresh: Family<BackendLabels, Gauge>,
    engine_age: Family<BackendLabels, FloatGauge>,
    engine_waiting: Family<BackendLabels, Gauge>,
    engine_running: Family<BackendLabels, Gauge>,
    engine_kv_usage: Family<BackendLabels, FloatGauge>,
    engine_scrape_errors: Family<ScrapeErrorLabels, Counter>,
    prefix_index_bytes: Family<BackendLabels, Gauge>,
    prefix_index_blocks: Family<BackendLabels, Gauge>,
    prefix_served_blocks: Family<BackendLabels, Gauge>,
    prefix_hit_blocks: Family<BackendLabels, Gauge>,
    limit_store_errors: Counter,
    kept_instances: Gauge,
    usage_sync_errors: Counter,
    usage_shipped: Counter,
    usage_copied: Counter,
    worker_requests: Family<WorkerLabels, Counter>,
    worker_refusals: Family<WorkerOnlyLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
}

fn seconds_histogram() -> Histogram {
    // 1 ms .. ~9 min.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

fn rate_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

fn policy_histogram() -> Histogram {
    // 5 µs .. ~2.6 s: a pooled instance's floor up to a guest's timeout.
    Histogram::new(exponential_buckets(5e-6, 2.0, 20))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let policy_seconds: HistogramFamily<PolicyLabels> =
        Family::new_with_constructor(policy_histogram);
    let policy_failures = Family::<PolicyFailureLabels, Counter>::default();
    registry.register(
        "sluice_policy_call_seconds",
        "Time of one policy call (instantiation included), by policy and phase",
        policy_seconds.clone(),
    );
    registry.register(
        "sluice_policy_failures",
        "Policy calls that trapped, timed out, ran out of memory or decided something invalid",
        policy_failures.clone(),
    );
    let requests = Family::<RequestLabels, Counter>::default();
    let tokens = Family::<TokenLabels, Counter>::default();
    let ttft: HistogramFamily<ModelLabels> = Family::new_with_constructor(seconds_histogram);
    let latency: HistogramFamily<ModelLabels> = Family::new_with_constructor(seconds_histogram);
    let tokens_per_second: HistogramFamily<ModelLabels> =
        Family::new_with_constructor(rate_histogram);
    let in_flight = Family::<BackendLabels, Gauge>::default();
    let healthy = Family::<BackendLabels, Gauge>::default();
    registry.register(
        "sluice_requests",
        "Proxied requests by answering model, backend and status",
        requests.clone(),
    );
    registry.register(
        "sluice_tokens",
        "Tokens by model, backend, consumer and kind (prompt, completion)",
        tokens.clone(),
    );
    registry.register(
        "sluice_time_to_first_token_seconds",
        "Time to the first token of streamed answers",
        ttft.clone(),
    );
    registry.register(
        "sluice_request_duration_seconds",
        "Time from request to the answer's last byte",
        latency.clone(),
    );
    registry.register(
        "sluice_generation_tokens_per_second",
        "Completion tokens per second after the first token",
        tokens_per_second.clone(),
    );
    registry.register(
        "sluice_backend_in_flight",
        "Requests in flight per backend",
        in_flight.clone(),
    );
    registry.register(
        "sluice_backend_healthy",
        "1 when the backend is in rotation",
        healthy.clone(),
    );
    let engine_fresh = Family::<BackendLabels, Gauge>::default();
    registry.register(
        "sluice_engine_signals_fresh",
        "1 when the backend's engine metrics were read within engine_metrics.stale_after; 0: saturation unknown",
        engine_fresh.clone(),
    );
    let engine_age = Family::<BackendLabels, FloatGauge>::default();
    registry.register(
        "sluice_engine_scrape_age_seconds",
        "Time since the last good scrape of the backend's engine metrics",
        engine_age.clone(),
    );
    let engine_waiting = Family::<BackendLabels, Gauge>::default();
    registry.register(
        "sluice_engine_requests_waiting",
        "Requests queued in the backend's engine, as it reports (fresh readings only)",
        engine_waiting.clone(),
    );
    let engine_running = Family::<BackendLabels, Gauge>::default();
    registry.register(
        "sluice_engine_requests_running",
        "Requests in the backend's engine's running batch, as it reports (fresh readings only)",
        engine_running.clone(),
    );
    let engine_kv_usage = Family::<BackendLabels, FloatGauge>::default();
    registry.register(
        "sluice_engine_kv_cache_usage",
        "KV-cache usage of the backend's engine, 0..1 (fresh readings only)",
        engine_kv_usage.clone(),
    );
    let engine_scrape_errors = Family::<ScrapeErrorLabels, Counter>::default();
    registry.register(
        "sluice_engine_scrape_errors",
        "Failed scrapes of engine metrics by backend and reason (timeout, connect, status, too_large, read, parse, missing)",
        engine_scrape_errors.clone(),
    );
    let prefix_index_bytes = Family::<BackendLabels, Gauge>::default();
    registry.register(
        "sluice_prefix_index_bytes",
        "Memory held by the backend's prefix-cache index (an estimate, bytes)",
        prefix_index_bytes.clone(),
    );
    let prefix_index_blocks = Family::<BackendLabels, Gauge>::default();
    registry.register(
        "sluice_prefix_index_blocks",
        "Prompt blocks the gateway remembers sending to the backend",
        prefix_index_blocks.clone(),
    );
    let prefix_served_blocks = Family::<BackendLabels, Gauge>::default();
    registry.register(
        "sluice_prefix_served_blocks",
        "Prompt blocks of the requests the backend served, since start (only increases)",
        prefix_served_blocks.clone(),
    );
    let prefix_hit_blocks = Family::<BackendLabels, Gauge>::default();
    registry.register(
        "sluice_prefix_hit_blocks",
        "Of those, blocks the index says the backend held already: the estimated prefix hit rate's numerator",
        prefix_hit_blocks.clone(),
    );
    let kept_instances = Gauge::default();
    registry.register(
        "sluice_policy_kept_instances",
        "Response-hook instances kept alive across the chunks of answers being streamed now",
        kept_instances.clone(),
    );
    let limit_store_errors = Counter::default();
    registry.register(
        "sluice_limit_store_errors",
        "Calls to the limits' counter store (Redis) that failed or timed out",
        limit_store_errors.clone(),
    );
    let (usage_sync_errors, usage_shipped, usage_copied) =
        (Counter::default(), Counter::default(), Counter::default());
    registry.register(
        "sluice_usage_sync_errors",
        "Rounds of sharing usage records through Redis that failed (retried next round)",
        usage_sync_errors.clone(),
    );
    registry.register(
        "sluice_usage_records_shipped",
        "This replica's usage records shipped to the shared Redis stream",
        usage_shipped.clone(),
    );
    registry.register(
        "sluice_usage_records_copied",
        "Other replicas' usage records copied from Redis into this replica's database",
        usage_copied.clone(),
    );
    let worker_requests = Family::<WorkerLabels, Counter>::default();
    registry.register(
        "sluice_worker_requests",
        "Requests answered by edge workers, by worker and status (their own or the gateway's error)",
        worker_requests.clone(),
    );
    let worker_refusals = Family::<WorkerOnlyLabels, Counter>::default();
    registry.register(
        "sluice_worker_outbound_refused",
        "Outbound requests of workers refused: host not in the worker's allowed_hosts",
        worker_refusals.clone(),
    );
    let refusals = Family::<RefusalLabels, Counter>::default();
    registry.register(
        "sluice_consumer_refusals",
        "Requests refused by consumer and code (invalid_api_key, rate_limit_exceeded, ...)",
        refusals.clone(),
    );
    Metrics {
        registry,
        limit_store_errors,
        kept_instances,
        usage_sync_errors,
        usage_shipped,
        usage_copied,
        worker_requests,
        worker_refusals,
        refusals,
        policy_seconds,
        policy_failures,
        requests,
        tokens,
        ttft,
        latency,
        tokens_per_second,
        in_flight,
        healthy,
        engine_fresh,
        engine_age,
        engine_waiting,
        engine_running,
        engine_kv_usage,
        engine_scrape_errors,
        prefix_index_bytes,
        prefix_index_blocks,
        prefix_served_blocks,
        prefix_hit_blocks,
    }
});

/// What the metrics count of one finished request (its usage record's
/// figures; labels are the answering model, backend and consumer).
pub struct Finished<'a> {
    pub model_answered: Option<&'a str>,
    pub backend: Option<&'a str>,
    pub consumer: Option<&'a str>,
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub ttft_ms: Option<f64>,
    pub latency_ms: f64,
    pub tokens_per_second: Option<f64>,
}

pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    pub fn policy_call(&self, policy: &str, phase: &'static str, took: Duration) {
        self.policy_seconds
            .get_or_create(&PolicyLabels {
                policy: policy.to_string(),
                phase,
            })
            .observe(took.as_secs_f64());
    }

    /// One more (`true`) or one fewer kept response-hook instance.
    pub fn kept_instance(&self, alive: bool) {
        if alive {
            self.kept_instances.inc();
        } else {
            self.kept_instances.dec();
        }
    }

    pub fn limit_store_error(&self) {
        self.limit_store_errors.inc();
    }

    pub fn worker_request(&self, worker: &str, status: u16) {
        self.worker_requests
            .get_or_create(&WorkerLabels {
                worker: worker.to_string(),
                status,
            })
            .inc();
    }

    pub fn worker_outbound_refused(&self, worker: &str) {
        self.worker_refusals
            .get_or_create(&WorkerOnlyLabels {
                worker: worker.to_string(),
            })
            .inc();
    }

    pub fn usage_sync_error(&self) {
        self.usage_sync_errors.inc();
    }

    pub fn usage_records_shipped(&self, n: u64) {
        self.usage_shipped.inc_by(n);
    }

    pub fn usage_records_copied(&self, n: u64) {
        self.usage_copied.inc_by(n);
    }

    /// A request refused for its credentials or its consumer's limits;
    /// `consumer` is empty when the key was unknown (bounded: consumer
    /// names come from configuration and the admin API).
    pub fn refusal(&self, consumer: &str, code: &'static str) {
        self.refusals
            .get_or_create(&RefusalLabels {
                consumer: consumer.to_string(),
                code,
            })
            .inc();
    }

    /// A policy call that failed; `kind` is one of the policy engine's
    /// fixed failure labels.
    pub fn policy_failure(&self, policy: &str, kind: &'static str) {
        self.policy_failures
            .get_or_create(&PolicyFailureLabels {
                policy: policy.to_string(),
                kind,
            })
            .inc();
    }

    /// One finished request.
    pub fn request(&self, record: &Finished<'_>) {
        let model = record.model_answered.unwrap_or("none").to_string();
        let backend = record.backend.unwrap_or_default().to_string();
        self.requests
            .get_or_create(&RequestLabels {
                model: model.clone(),
                backend: backend.clone(),
                status: record.status,
            })
            .inc();
        let consumer = record.consumer.unwrap_or_default().to_string();
        for (kind, count) in [
            ("prompt", record.prompt_tokens),
            ("completion", record.completion_tokens),
        ] {
            if count > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        model: model.clone(),
                        backend: backend.clone(),
                        consumer: consumer.clone(),
                        kind,
                    })
                    .inc_by(count);
            }
        }
        let labels = ModelLabels { model };
        if let Some(ttft) = record.ttft_ms {
            self.ttft.get_or_create(&labels).observe(ttft / 1000.0);
        }
        self.latency
            .get_or_create(&labels)
            .observe(record.latency_ms / 1000.0);
        if let Some(rate) = record.tokens_per_second {
            self.tokens_per_second.get_or_create(&labels).observe(rate);
        }
    }

    /// A backend's gauges as read now (set just before a scrape renders).
    pub fn backend(&self, backend: &str, in_flight: u32, healthy: bool) {
        let labels = BackendLabels {
            backend: backend.to_string(),
        };
        self.in_flight
            .get_or_create(&labels)
            .set(i64::from(in_flight));
        self.healthy.get_or_create(&labels).set(i64::from(healthy));
    }

    /// A backend's prefix-cache index as it is now: memory, blocks, and
    /// the blocks served and found there since start.
    pub fn prefix_index(
        &self,
        backend: &str,
        memory_bytes: usize,
        blocks: usize,
        served: (u64, u64),
    ) {
        let labels = BackendLabels {
            backend: backend.to_string(),
        };
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for (family, value) in [
            (&self.prefix_index_bytes, memory_bytes as u64),
            (&self.prefix_index_blocks, blocks as u64),
            (&self.prefix_served_blocks, served.0),
            (&self.prefix_hit_blocks, served.1),
        ] {
            family.get_or_create(&labels).set(int(value));
        }
    }

    /// A backend's engine gauges as read now (set just before a scrape
    /// renders); values not known now are removed, not left at their last.
    pub fn engine(&self, backend: &str, gauges: &EngineGauges) {
        let labels = BackendLabels {
            backend: backend.to_string(),
        };
        self.engine_fresh
            .get_or_create(&labels)
            .set(i64::from(gauges.fresh));
        match gauges.age_seconds {
            Some(age) => {
                self.engine_age.get_or_create(&labels).set(age);
            }
            None => {
                self.engine_age.remove(&labels);
            }
        }
        for (family, value) in [
            (&self.engine_waiting, gauges.waiting),
            (&self.engine_running, gauges.running),
        ] {
            match value.filter(|_| gauges.fresh) {
                Some(v) => {
                    family
                        .get_or_create(&labels)
                        .set(i64::try_from(v).unwrap_or(i64::MAX));
                }
                None => {
                    family.remove(&labels);
                }
            }
        }
        match gauges.kv_usage.filter(|_| gauges.fresh) {
            Some(v) => {
                self.engine_kv_usage.get_or_create(&labels).set(v);
            }
            None => {
                self.engine_kv_usage.remove(&labels);
            }
        }
    }

    /// A failed scrape of a backend's engine metrics.
    pub fn engine_scrape_error(&self, backend: &str, reason: &'static str) {
        self.engine_scrape_errors
            .get_or_create(&ScrapeErrorLabels {
                backend: backend.to_string(),
                reason,
            })
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
