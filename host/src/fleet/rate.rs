//! How many requests per second the gateway recently sent one backend: an
//! exponentially weighted moving average of the event rate, read at any
//! moment (it decays while nothing is sent). Policies compare backends by
//! it (`engine.sent-rate`) to keep cache-aware routing within the weights.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The averaging's time constant: an event's weight falls to 1/e after it.
pub const TIME_CONSTANT: Duration = Duration::from_secs(10);

/// An event rate, averaged over about [`TIME_CONSTANT`].
#[derive(Debug)]
pub struct RecentRate {
    /// The rate as of `at`, in events per second.
    state: Mutex<(f64, Instant)>,
}

impl RecentRate {
    pub fn new(now: Instant) -> RecentRate {
        RecentRate {
            state: Mutex::new((0.0, now)),
        }
    }

    /// Counts one event at `now`.
    pub fn note(&self, now: Instant) {
        let tau = TIME_CONSTANT.as_secs_f64();
        if let Ok(mut state) = self.state.lock() {
            let decayed = decay(state.0, state.1, now);
            // Each event adds 1/τ: a steady r events/s settles at r.
            *state = (decayed + 1.0 / tau, now.max(state.1));
        }
    }

    /// Sets the rate as of `now`, and holds it there for a day (for a
    /// replay's fleet, described frozen).
    pub fn set(&self, per_second: f64, now: Instant) {
        if let Ok(mut state) = self.state.lock() {
            let until = now.checked_add(Duration::from_secs(86_400)).unwrap_or(now);
            *state = (per_second, until);
        }
    }

    /// Events per second at `now`.
    pub fn per_second(&self, now: Instant) -> f64 {
        match self.state.lock() {
            Ok(state) => decay(state.0, state.1, now),
            Err(_) => 0.0,
        }
    }
}

fn decay(rate: f64, at: Instant, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(at).as_secs_f64();
    rate * (-elapsed / TIME_CONSTANT.as_secs_f64()).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_rate_is_read_back_and_decays_when_traffic_stops() {
        let start = Instant::now();
        let rate = RecentRate::new(start);
        // 20 events per second for 60 s (six time constants).
        for i in 0..1200u64 {
            rate.note(start + Duration::from_millis(50 * i));
        }
        let end = start + Duration::from_secs(60);
        let steady = rate.per_second(end);
        assert!((19.0..=21.0).contains(&steady), "{steady}");
        let later = rate.per_second(end + TIME_CONSTANT);
        assert!(
            (later - steady / std::f64::consts::E).abs() < 0.1,
            "{later}"
        );
        assert_eq!(RecentRate::new(start).per_second(end), 0.0);
    }
}
