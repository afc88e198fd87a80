//! Prometheus metrics, served as text at `GET /metrics`. Labels are bounded:
//! policy names, phases and failure kinds come from configuration and code,
//! never from request data.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::policy::FailureKind;

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

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    policy_seconds: HistogramFamily<PolicyLabels>,
    policy_failures: Family<PolicyFailureLabels, Counter>,
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
    Metrics {
        registry,
        policy_seconds,
        policy_failures,
    }
});

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

    pub fn policy_failure(&self, policy: &str, kind: FailureKind) {
        let kind = match kind {
            FailureKind::Timeout => "timeout",
            FailureKind::MemoryLimit => "memory_limit",
            FailureKind::Trap => "trap",
            FailureKind::InvalidDecision => "invalid_decision",
            FailureKind::Unavailable => "unavailable",
        };
        self.policy_failures
            .get_or_create(&PolicyFailureLabels {
                policy: policy.to_string(),
                kind,
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
