//! Choosing among backends: weighted, load-aware, reproducible.

use crate::Backend;

/// Orders `backends` for one request, best first.
///
/// Backends that are down are left out. The first place is drawn at random
/// among backends with spare capacity, each with probability proportional to
/// `weight × e^-(in_flight / weight)`: its weight, discounted by its load
/// *per unit of weight*. When equally fast backends carry load in
/// proportion to their weights the discounts are equal, so the weights hold
/// as the traffic split at any concurrency (a discount by plain `in_flight`
/// would pull 3:1 towards 2:1 under load); a slower backend piles up
/// requests and gets fewer; and the draw never piles every request onto
/// whichever backend looked least loaded a moment ago. The rest follow by
/// ascending load per weight, backends at their limit last, so the host has
/// somewhere to go when the first choice fills up in the meantime.
///
/// `seed` is usually the request id, which makes the order reproducible.
///
/// ```
/// use sluice_guest::{select, Backend};
///
/// let gpu = |name: &str, healthy: bool, in_flight: u32| Backend {
///     name: name.into(),
///     models: vec!["glm4-9b".into()],
///     healthy,
///     in_flight,
///     max_concurrent: 2,
///     weight: 1,
///     latency_us: 0,
/// };
/// let fleet = vec![gpu("vm01", true, 2), gpu("vm02", false, 0), gpu("vm03", true, 0)];
/// let order = select::rank(fleet, 42);
/// // vm02 is down, vm01 is at its limit of 2: vm03 first, vm01 as the spare.
/// let names: Vec<&str> = order.iter().map(|b| b.name.as_str()).collect();
/// assert_eq!(names, ["vm03", "vm01"]);
/// ```
pub fn rank(backends: Vec<Backend>, seed: u64) -> Vec<Backend> {
    let mut ranked: Vec<Backend> = backends.into_iter().filter(|b| b.healthy).collect();
    ranked.sort_by(|a, b| {
        b.has_capacity()
            .cmp(&a.has_capacity())
            .then(a.load().total_cmp(&b.load()))
    });
    let open = ranked.iter().take_while(|b| b.has_capacity()).count();
    if open > 1 {
        // Sorted by load: the first open backend has the least. Measuring
        // from it keeps every exponent small (no underflow to zero).
        let least = ranked[0].load();
        let share = |b: &Backend| f64::from(b.weight.max(1)) * (least - b.load()).exp();
        let total: f64 = ranked[..open].iter().map(share).sum();
        let mut point = Rng::new(seed).next_f64() * total;
        let mut chosen = open - 1;
        for (i, b) in ranked[..open].iter().enumerate() {
            point -= share(b);
            if point < 0.0 {
                chosen = i;
                break;
            }
        }
        let first = ranked.remove(chosen);
        ranked.insert(0, first);
    }
    ranked
}

/// A small, fast pseudo-random generator (SplitMix64) for policies that
/// need reproducible randomness: seed it with the request id.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform float in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, weight: u32, in_flight: u32, max: u32, healthy: bool) -> Backend {
        Backend {
            name: name.into(),
            models: vec!["m".into()],
            healthy,
            in_flight,
            max_concurrent: max,
            weight,
            latency_us: 0,
        }
    }

    fn first_counts(fleet: &[Backend], draws: u64) -> Vec<usize> {
        let mut counts = vec![0; fleet.len()];
        for seed in 0..draws {
            let first = &rank(fleet.to_vec(), seed)[0];
            counts[fleet.iter().position(|b| b.name == first.name).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn idle_backends_split_by_weight() {
        let fleet = [backend("a", 3, 0, 0, true), backend("b", 1, 0, 0, true)];
        let counts = first_counts(&fleet, 10_000);
        assert!((7_200..7_800).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn down_backends_are_left_out_and_full_ones_go_last() {
        let fleet = [
            backend("down", 1, 0, 0, false),
            backend("full", 1, 2, 2, true),
            backend("open", 1, 1, 2, true),
        ];
        let names: Vec<_> = rank(fleet.to_vec(), 7)
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert_eq!(names, ["open", "full"]);
    }

    /// Closed-loop clients on equally fast backends (each request ends
    /// after an exponential time): the split follows the weights whatever
    /// the concurrency, and a backend four times slower gets far less.
    fn closed_loop(weights: &[u32], speeds: &[f64], clients: usize) -> Vec<f64> {
        let mut rng = Rng::new(99);
        let mut fleet: Vec<Backend> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| backend(&format!("b{i}"), w, 0, 0, true))
            .collect();
        let mut counts = vec![0u32; fleet.len()];
        let mut ends: Vec<(f64, usize)> = Vec::new();
        let mut now = 0.0;
        for n in 0..(clients + 20_000) {
            if n >= clients {
                let next = (0..ends.len())
                    .min_by(|&a, &b| ends[a].0.total_cmp(&ends[b].0))
                    .unwrap();
                let (t, i) = ends.swap_remove(next);
                now = t;
                fleet[i].in_flight -= 1;
            }
            let first = rank(fleet.clone(), rng.next_u64())[0].name.clone();
            let i = fleet.iter().position(|b| b.name == first).unwrap();
            fleet[i].in_flight += 1;
            counts[i] += 1;
            let service = -(1.0 - rng.next_f64()).ln() / speeds[i];
            ends.push((now + service, i));
        }
        let total: u32 = counts.iter().sum();
        counts
            .iter()
            .map(|&c| f64::from(c) / f64::from(total))
            .collect()
    }

    #[test]
    fn weights_hold_under_concurrency() {
        for clients in [1, 2, 4, 8, 16, 32] {
            let split = closed_loop(&[3, 1], &[1.0, 1.0], clients);
            assert!(
                (0.71..0.79).contains(&split[0]),
                "{clients} clients: {split:?}"
            );
        }
        let slow = closed_loop(&[1, 1], &[1.0, 0.25], 8);
        assert!(slow[1] < 0.3, "{slow:?}");
    }

    #[test]
    fn busier_backends_are_chosen_less() {
        let fleet = [
            backend("busy", 1, 9, 0, true),
            backend("idle", 1, 0, 0, true),
        ];
        let counts = first_counts(&fleet, 10_000);
        assert!(counts[0] < 1_500, "{counts:?}");
    }
}
