//! Live counters for `/load-stats`: per backend and per model, requests in
//! flight, waiting, served and failed, and latency percentiles. Lock-free,
//! since every request touches them.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use serde_json::{json, Value};

use crate::fleet::Fleet;

/// Buckets per doubling of latency: quarter-octaves, so a percentile is
/// off by at most ~19%.
const STEPS_PER_OCTAVE: u32 = 4;
/// Covers 1 µs .. 2^32 µs (over an hour).
const BUCKETS: usize = 32 * STEPS_PER_OCTAVE as usize + 1;

/// A latency histogram with logarithmic buckets, in microseconds.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Histogram {
    pub fn record_us(&self, us: u64) {
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The upper bound of the bucket holding the `q` quantile, in µs;
    /// `None` before the first sample.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(upper_bound(i));
            }
        }
        Some(upper_bound(BUCKETS - 1))
    }

    /// p50, p90 and p99 in milliseconds, as JSON.
    pub fn summary_ms(&self) -> Value {
        let ms = |q| self.quantile_us(q).map(|us| us as f64 / 1000.0);
        json!({"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99)})
    }
}

fn bucket_of(us: u64) -> usize {
    if us <= 1 {
        return 0;
    }
    let octave = 63 - us.leading_zeros();
    // The two bits below the leading one pick the quarter.
    let quarter = if octave >= 2 {
        (us >> (octave - 2)) & 3
    } else {
        (us << (2 - octave)) & 3
    } as u32;
    ((octave * STEPS_PER_OCTAVE + quarter) as usize + 1).min(BUCKETS - 1)
}

fn upper_bound(bucket: usize) -> u64 {
    if bucket == 0 {
        return 1;
    }
    let b = bucket as u32 - 1;
    let (octave, quarter) = (b / STEPS_PER_OCTAVE, b % STEPS_PER_OCTAVE);
    let base = 1u64 << octave;
    base + (base * u64::from(quarter + 1)) / u64::from(STEPS_PER_OCTAVE)
}

/// What happened to the requests of one backend or one model.
#[derive(Default)]
pub struct Stats {
    /// Requests waiting in the queue for a slot.
    pub queued: AtomicU32,
    /// Requests answered by a backend (status below 500).
    pub served: AtomicU64,
    /// Attempts that failed (connect, timeout, broken, 5xx).
    pub failures: AtomicU64,
    /// Time to the answer's first byte.
    pub ttfb: Histogram,
    /// Time until the answer's last byte (the slot's whole life).
    pub duration: Histogram,
}

impl Stats {
    pub fn queued(&self) -> u32 {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Served, failed, and the latency percentiles, as JSON fields.
    pub fn to_json(&self, in_flight: u32) -> Value {
        json!({
            "in_flight": in_flight,
            "queued": self.queued(),
            "served": self.served(),
            "failures": self.failures(),
            "ttfb_ms": self.ttfb.summary_ms(),
            "duration_ms": self.duration.summary_ms(),
        })
    }
}

/// Counts one waiter on `stats` until dropped.
pub struct Waiting<'a>(&'a Stats);

impl<'a> Waiting<'a> {
    pub fn new(stats: &'a Stats) -> Waiting<'a> {
        stats.queued.fetch_add(1, Ordering::Relaxed);
        Waiting(stats)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /load-stats`: per backend and per model, in flight, queued,
/// served, failures and latency percentiles since start.
pub fn load_stats(fleet: &Fleet) -> Value {
    let backends: Vec<Value> = fleet
        .backends()
        .iter()
        .map(|b| {
            let mut v = b.stats.to_json(b.in_flight());
            v["name"] = json!(&*b.name);
            v["healthy"] = json!(b.is_healthy());
            v["max_concurrent"] = json!(b.max_concurrent());
            v["weight"] = json!(b.weight());
            v
        })
        .collect();
    let models: Vec<Value> = fleet
        .models()
        .iter()
        .filter_map(|m| {
            let load = fleet.model_load(m)?;
            let mut v = load.stats.to_json(load.in_flight());
            v["model"] = json!(m);
            v["backends"] = json!(fleet
                .serving(m)
                .iter()
                .map(|b| &*b.name)
                .collect::<Vec<_>>());
            Some(v)
        })
        .collect();
    json!({"backends": backends, "models": models})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_land_within_a_bucket() {
        let h = Histogram::default();
        assert_eq!(h.quantile_us(0.5), None);
        for us in 1..=1000u64 {
            h.record_us(us * 1000);
        }
        let p50 = h.quantile_us(0.5).unwrap();
        assert!((500_000..=620_000).contains(&p50), "{p50}");
        let p99 = h.quantile_us(0.99).unwrap();
        assert!((990_000..=1_200_000).contains(&p99), "{p99}");
        assert_eq!(h.count(), 1000);
    }

    #[test]
    fn buckets_are_monotonic() {
        let mut last = 0;
        for us in [0u64, 1, 2, 3, 4, 5, 7, 8, 100, 1 << 20, u64::MAX] {
            let b = bucket_of(us);
            assert!(b >= last, "{us}");
            assert!(upper_bound(b) >= us.min(upper_bound(BUCKETS - 1)), "{us}");
            last = b;
        }
    }
}
