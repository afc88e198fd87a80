//! Choosing among backends: weighted, load-aware, reproducible — on the
//! gateway's own counters ([`rank`]), or on everything the host can see,
//! engine signals and prefix-cache contents included ([`Scorer`]).

use serde::Deserialize;

use crate::engine::{EngineSignals, PrefixBlocks};
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

/// A backend with what its engine reports and how much of this request's
/// prompt it probably holds: what [`Scorer::rank`] weighs.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub backend: Backend,
    /// `None` when the backend has no engine configured.
    pub engine: Option<EngineSignals>,
    pub prefix: PrefixBlocks,
    /// Requests per second the gateway recently sent it
    /// ([`Backend::sent_rate`]).
    pub sent_rate: f64,
}

impl Candidate {
    /// A candidate with nothing but the gateway's counters: no engine, no
    /// prefix (for tests, and for hosts older than 0.2.2).
    pub fn plain(backend: Backend) -> Candidate {
        Candidate {
            backend,
            engine: None,
            prefix: PrefixBlocks {
                matched_blocks: 0,
                total_blocks: 0,
                block_bytes: 0,
            },
            sent_rate: 0.0,
        }
    }

    /// Reads each backend's engine signals, recent rate and prefix match
    /// from the host (three cheap calls per backend; the prefix lookups
    /// stop once the prompt turns out to have no full block). Needs a host
    /// serving `sluice:policy@0.2.3`.
    pub fn read_all(backends: Vec<Backend>) -> Vec<Candidate> {
        let mut prompt_blocks = None;
        backends
            .into_iter()
            .map(|backend| {
                let mut candidate = Candidate::plain(backend);
                candidate.engine = candidate.backend.engine();
                candidate.sent_rate = candidate.backend.sent_rate();
                if prompt_blocks != Some(0) {
                    candidate.prefix = candidate.backend.prefix_match();
                    prompt_blocks = Some(candidate.prefix.total_blocks);
                }
                candidate
            })
            .collect()
    }
}

/// How [`Scorer::rank`] weighs backends. Each backend gets a *cost*, in
/// units of "requests in flight per unit of weight":
///
/// - its load: the larger of the gateway's `in_flight` and the engine's
///   running batch, plus `queue_weight` × the engine's waiting queue, all
///   divided by the backend's weight;
/// - `kv_weight` × how far its KV-cache usage is past `kv_threshold`
///   (0 below it, `kv_weight` when full);
/// - `unknown_penalty` when its engine's signals are stale or were never
///   read: saturation unknown, so it gets less, but never nothing (it is
///   not down for that alone);
/// - when the request's model is a LoRA adapter (or a model) that some
///   engine reports loaded, `adapter_room_penalty` for a backend that does
///   not have it but has room for one more adapter, `adapter_penalty` for
///   one that would have to evict.
///
/// The first choice is drawn at random with probability proportional to
/// `weight × e^-cost` (as [`rank`], so configured weights hold as the split
/// between equally loaded backends). With `prefix_affinity`, the draw is
/// first narrowed to the backends holding the most leading blocks of the
/// prompt (at least `min_prefix_blocks`) — but only among those that are
/// not running ahead of the others, so a hot prefix cannot pile its tenant
/// onto one GPU while others idle, and a prompt every client shares cannot
/// erase the configured weights:
///
/// - its cost is within `affinity_slack` (or `affinity_slack_ratio` × the
///   least cost, whichever is larger) of the least loaded backend's: the
///   load right now;
/// - its recent request rate per unit of weight ([`Backend::sent_rate`])
///   is at most (1 + `affinity_balance`) × that of the other open
///   backends, plus `affinity_rate_floor` requests/s (so a quiet fleet
///   keeps every conversation where its cache is): the share over the
///   last seconds. A backend past its share loses its prefixes' pull —
///   its prompts go to the backends within theirs, which then hold them
///   too — until the others catch up, so the split over time follows the
///   weights within `affinity_balance`, however the prompts repeat.
///
/// Every field has a default (shown in brackets below); a policy can read
/// it from its configuration:
///
/// ```
/// use sluice_guest::select::Scorer;
///
/// let scorer: Scorer = serde_json::from_str(r#"{"queue_weight": 2.0}"#).unwrap();
/// assert_eq!(scorer.queue_weight, 2.0);
/// assert_eq!(scorer.kv_threshold, Scorer::default().kv_threshold);
/// assert!(scorer.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scorer {
    /// Cost of one request waiting in the engine's queue, relative to one
    /// in its running batch [1.0].
    pub queue_weight: f64,
    /// KV-cache usage (0..1) past which a backend costs more [0.8].
    pub kv_threshold: f64,
    /// Cost of a full KV cache; scales linearly from `kv_threshold` [8.0].
    pub kv_weight: f64,
    /// Cost of a backend whose engine signals are stale or unknown [2.0].
    pub unknown_penalty: f64,
    /// Keep a prompt where its prefix is cached [true].
    pub prefix_affinity: bool,
    /// How much more than the least loaded backend's cost a backend may
    /// cost and still win on its prefix [16.0]: a cached long prompt saves
    /// a prefill worth many requests of decode, so only a real pile-up
    /// (a deep engine queue) should move a conversation off its cache —
    /// moving it costs a full prefill elsewhere, which queues there in turn
    /// (bench/prefix.py: at 2.0, bursts spread each tenant over ~3 of 4
    /// backends and the engines' hit rate fell from 87 % to 41 %).
    pub affinity_slack: f64,
    /// The same, as a share of the least cost, for busy fleets [1.0]: a
    /// backend up to twice as loaded as the least may keep its prefixes.
    pub affinity_slack_ratio: f64,
    /// How far past its share of the recent traffic a backend may run and
    /// still win on its prefix, as a fraction of that share — what it would
    /// be sent at the other backends' pace per unit of weight [0.5]: no
    /// backend takes more than ~1.5× its share for long.
    pub affinity_balance: f64,
    /// Requests per second a backend may run past its share and still win
    /// on its prefix [2.0]: in a fleet this quiet (one agent, a few chats)
    /// balance matters less than the cache, and a conversation should not
    /// be moved off its cache because the other backends happen to idle.
    pub affinity_rate_floor: f64,
    /// Fewest matched blocks that count as affinity [1].
    pub min_prefix_blocks: u32,
    /// Cost of a backend that would have to evict an adapter to load the
    /// requested one [4.0].
    pub adapter_penalty: f64,
    /// Cost of a backend that would have to load the requested adapter but
    /// has room for it [1.0].
    pub adapter_room_penalty: f64,
}

impl Default for Scorer {
    fn default() -> Self {
        Scorer {
            queue_weight: 1.0,
            kv_threshold: 0.8,
            kv_weight: 8.0,
            unknown_penalty: 2.0,
            prefix_affinity: true,
            affinity_slack: 16.0,
            affinity_slack_ratio: 1.0,
            affinity_balance: 0.5,
            affinity_rate_floor: 2.0,
            min_prefix_blocks: 1,
            adapter_penalty: 4.0,
            adapter_room_penalty: 1.0,
        }
    }
}

impl Scorer {
    /// Checks the values make sense; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("queue_weight", self.queue_weight),
            ("kv_weight", self.kv_weight),
            ("unknown_penalty", self.unknown_penalty),
            ("affinity_slack", self.affinity_slack),
            ("affinity_slack_ratio", self.affinity_slack_ratio),
            ("affinity_balance", self.affinity_balance),
            ("affinity_rate_floor", self.affinity_rate_floor),
            ("adapter_penalty", self.adapter_penalty),
            ("adapter_room_penalty", self.adapter_room_penalty),
        ] {
            if !(value.is_finite() && (0.0..=1e6).contains(&value)) {
                return Err(format!("{name} must be between 0 and 1000000"));
            }
        }
        if !(0.0..1.0).contains(&self.kv_threshold) {
            return Err("kv_threshold must be at least 0 and below 1".into());
        }
        Ok(())
    }

    /// A candidate's cost (see [`Scorer`]); `adapter` is the requested
    /// model when some engine reports it loaded as an adapter.
    pub fn cost(&self, candidate: &Candidate, adapter: Option<&str>) -> f64 {
        let weight = f64::from(candidate.backend.weight.max(1));
        let mut load = f64::from(candidate.backend.in_flight);
        let mut extra = 0.0;
        match candidate.engine.as_ref().map(EngineSignals::current) {
            // No engine configured: the gateway's counters are all there is.
            None => {
                if adapter.is_some() {
                    extra += self.adapter_room_penalty;
                }
            }
            Some(None) => extra += self.unknown_penalty,
            Some(Some(signals)) => {
                if let Some(running) = signals.running {
                    load = load.max(running as f64);
                }
                if let Some(waiting) = signals.waiting {
                    load += self.queue_weight * waiting as f64;
                }
                if let Some(kv) = signals.kv_cache_usage {
                    let past = (kv - self.kv_threshold) / (1.0 - self.kv_threshold);
                    extra += self.kv_weight * past.clamp(0.0, 1.0);
                }
                if let Some(adapter) = adapter {
                    if !signals.has_loaded(adapter) {
                        extra += if signals.has_adapter_room() {
                            self.adapter_room_penalty
                        } else {
                            self.adapter_penalty
                        };
                    }
                }
            }
        }
        load / weight + extra
    }

    /// Orders `candidates` for a request for `model`, best first: down
    /// backends left out, the first drawn as described at [`Scorer`], the
    /// rest by ascending cost with backends at their limit last (so the
    /// host has somewhere to go when the first fills up meanwhile).
    ///
    /// ```
    /// use sluice_guest::select::{Candidate, Scorer};
    /// use sluice_guest::{Backend, EngineSignals};
    ///
    /// let gpu = |name: &str, waiting: u64| {
    ///     let mut c = Candidate::plain(Backend {
    ///         name: name.into(),
    ///         models: vec!["m".into()],
    ///         healthy: true,
    ///         in_flight: 0,
    ///         max_concurrent: 0,
    ///         weight: 1,
    ///         latency_us: 0,
    ///     });
    ///     c.engine = Some(EngineSignals {
    ///         engine: "vllm".into(),
    ///         waiting: Some(waiting),
    ///         running: Some(8),
    ///         kv_cache_usage: Some(0.4),
    ///         running_adapters: vec![],
    ///         waiting_adapters: vec![],
    ///         max_adapters: None,
    ///         loaded_models: vec![],
    ///         age_ms: Some(100),
    ///         stale: false,
    ///     });
    ///     c
    /// };
    /// // vm01's engine has 30 requests queued: vm02 is chosen.
    /// let order = Scorer::default().rank(vec![gpu("vm01", 30), gpu("vm02", 0)], "m", 7);
    /// assert_eq!(order[0].backend.name, "vm02");
    /// ```
    pub fn rank(&self, candidates: Vec<Candidate>, model: &str, seed: u64) -> Vec<Candidate> {
        let healthy: Vec<Candidate> = candidates
            .into_iter()
            .filter(|c| c.backend.healthy)
            .collect();
        let adapter = healthy
            .iter()
            .filter_map(|c| c.engine.as_ref().and_then(EngineSignals::current))
            .any(|s| s.has_loaded(model))
            .then_some(model);
        let mut scored: Vec<(f64, Candidate)> = healthy
            .into_iter()
            .map(|c| (self.cost(&c, adapter), c))
            .collect();
        scored.sort_by(|(a_cost, a), (b_cost, b)| {
            b.backend
                .has_capacity()
                .cmp(&a.backend.has_capacity())
                .then(a_cost.total_cmp(b_cost))
        });
        let open = scored
            .iter()
            .take_while(|(_, c)| c.backend.has_capacity())
            .count();
        if open > 1 {
            let pool = self.affinity_pool(&scored[..open]);
            let chosen = draw(&scored, &pool, seed);
            let first = scored.remove(chosen);
            scored.insert(0, first);
        }
        scored.into_iter().map(|(_, c)| c).collect()
    }

    /// The indices of `open` (sorted by cost) the first choice is drawn
    /// from: the backends holding the most of the prompt among those not
    /// running ahead (see [`Scorer`]), or all of them when none holds
    /// enough.
    fn affinity_pool(&self, open: &[(f64, Candidate)]) -> Vec<usize> {
        let all: Vec<usize> = (0..open.len()).collect();
        let min_blocks = self.min_prefix_blocks.max(1);
        let matched = |i: usize| open[i].1.prefix.matched_blocks;
        if !self.prefix_affinity || all.iter().all(|&i| matched(i) < min_blocks) {
            return all;
        }
        let least = open[0].0;
        let slack = self.affinity_slack.max(self.affinity_slack_ratio * least);
        let weight = |i: usize| f64::from(open[i].1.backend.weight.max(1));
        let total_rate: f64 = open.iter().map(|(_, c)| c.sent_rate).sum();
        let total_weight: f64 = all.iter().map(|&i| weight(i)).sum();
        // What a backend would be sent at the pace of the others (per unit
        // of weight): measured against the others, not a mean it is part of,
        // so a heavily weighted backend taking everything is caught too.
        let within_share = |i: usize| {
            let others_weight = total_weight - weight(i);
            if others_weight <= 0.0 {
                return true;
            }
            let share = (total_rate - open[i].1.sent_rate) * weight(i) / others_weight;
            open[i].1.sent_rate <= (1.0 + self.affinity_balance) * share + self.affinity_rate_floor
        };
        let eligible: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&i| open[i].0 <= least + slack && within_share(i))
            .collect();
        let Some(best) = eligible.iter().map(|&i| matched(i)).max() else {
            return all;
        };
        if best < min_blocks {
            // The backends holding the prompt are past their share: the
            // others take it, and will hold it too.
            return eligible;
        }
        eligible
            .into_iter()
            .filter(|&i| matched(i) == best)
            .collect()
    }
}

/// Draws one of `pool` (indices into `scored`) with probability
/// proportional to `weight × e^-cost`.
fn draw(scored: &[(f64, Candidate)], pool: &[usize], seed: u64) -> usize {
    // Measuring from the pool's least cost keeps every exponent small.
    let least = pool
        .iter()
        .map(|&i| scored[i].0)
        .fold(f64::INFINITY, f64::min);
    let share =
        |i: usize| f64::from(scored[i].1.backend.weight.max(1)) * (least - scored[i].0).exp();
    let total: f64 = pool.iter().map(|&i| share(i)).sum();
    let mut point = Rng::new(seed).next_f64() * total;
    for &i in pool {
        point -= share(i);
        if point < 0.0 {
            return i;
        }
    }
    pool[pool.len() - 1]
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

    fn signals(waiting: u64, running: u64, kv: f64, stale: bool) -> EngineSignals {
        EngineSignals {
            engine: "vllm".into(),
            waiting: Some(waiting),
            running: Some(running),
            kv_cache_usage: Some(kv),
            running_adapters: vec![],
            waiting_adapters: vec![],
            max_adapters: Some(2),
            loaded_models: vec![],
            age_ms: Some(if stale { 10_000 } else { 100 }),
            stale,
        }
    }

    fn candidate(name: &str, engine: Option<EngineSignals>, matched: u32) -> Candidate {
        let mut c = Candidate::plain(backend(name, 1, 0, 0, true));
        c.engine = engine;
        c.prefix = PrefixBlocks {
            matched_blocks: matched,
            total_blocks: 10,
            block_bytes: 64,
        };
        c
    }

    fn scorer_counts(fleet: &[Candidate], model: &str, draws: u64) -> Vec<usize> {
        let scorer = Scorer {
            prefix_affinity: true,
            ..Scorer::default()
        };
        let mut counts = vec![0; fleet.len()];
        for seed in 0..draws {
            let first = &scorer.rank(fleet.to_vec(), model, seed)[0];
            counts[fleet
                .iter()
                .position(|c| c.backend.name == first.backend.name)
                .unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn the_scorer_without_signals_draws_like_rank() {
        let fleet = [
            backend("a", 3, 2, 0, true),
            backend("b", 1, 1, 4, true),
            backend("c", 2, 0, 0, true),
        ];
        for seed in 0..500 {
            let plain: Vec<String> = rank(fleet.to_vec(), seed)
                .into_iter()
                .map(|b| b.name)
                .collect();
            let candidates = fleet.iter().cloned().map(Candidate::plain).collect();
            let scored: Vec<String> = Scorer::default()
                .rank(candidates, "m", seed)
                .into_iter()
                .map(|c| c.backend.name)
                .collect();
            assert_eq!(plain, scored, "seed {seed}");
        }
    }

    #[test]
    fn a_deep_queue_or_a_full_kv_cache_gets_almost_nothing() {
        let room = Some(signals(0, 4, 0.3, false));
        let queue = [
            candidate("queued", Some(signals(40, 16, 0.5, false)), 0),
            candidate("room", room.clone(), 0),
        ];
        assert!(scorer_counts(&queue, "m", 2_000)[0] < 10);
        let full = [
            candidate("full", Some(signals(0, 4, 0.99, false)), 0),
            candidate("room", room, 0),
        ];
        assert!(scorer_counts(&full, "m", 2_000)[0] < 20);
    }

    #[test]
    fn stale_signals_mean_less_traffic_not_none() {
        let fleet = [
            candidate("stale", Some(signals(0, 0, 0.0, true)), 0),
            candidate("fresh", Some(signals(0, 0, 0.0, false)), 0),
        ];
        let counts = scorer_counts(&fleet, "m", 4_000);
        assert!((150..900).contains(&counts[0]), "{counts:?}");
        // Alone, it gets everything.
        let alone = Scorer::default().rank(vec![fleet[0].clone()], "m", 1);
        assert_eq!(alone[0].backend.name, "stale");
    }

    #[test]
    fn prefix_affinity_holds_among_the_near_least_loaded_only() {
        let mut holder = candidate("holder", None, 8);
        let other = candidate("other", None, 2);
        holder.backend.in_flight = 2;
        let fleet = [holder.clone(), other.clone()];
        assert_eq!(scorer_counts(&fleet, "m", 500), [500, 0]);
        // Much busier than the other: load wins.
        holder.backend.in_flight = 40;
        let fleet = [holder, other];
        assert!(scorer_counts(&fleet, "m", 500)[0] < 20);
    }

    #[test]
    fn a_holder_past_its_share_of_the_traffic_loses_its_pull() {
        let mut holder = candidate("holder", None, 8);
        let mut other = candidate("other", None, 0);
        other.sent_rate = 9.0;
        holder.sent_rate = 20.0;
        let fleet = [holder.clone(), other.clone()];
        // 20 req/s against the other's 9 (+50% and 2): the other takes it.
        assert_eq!(scorer_counts(&fleet, "m", 500), [0, 500]);
        holder.sent_rate = 11.0;
        let fleet = [holder, other];
        assert_eq!(scorer_counts(&fleet, "m", 500), [500, 0]);
    }

    /// One prompt sent over and over (every client shares it) to two equally
    /// fast backends weighted 3:1: the backend that cached it first keeps
    /// it only while within its share, then the other caches it too, and
    /// the split follows the weights.
    #[test]
    fn a_prompt_everyone_sends_still_splits_by_the_weights() {
        let scorer = Scorer::default();
        let mut fleet = [candidate("a", None, 0), candidate("b", None, 0)];
        fleet[0].backend.weight = 75;
        fleet[1].backend.weight = 25;
        let mut served = [0u32; 2];
        // Requests 10 ms apart; the rate decays with a 10 s time constant.
        let decay = (-0.01f64 / 10.0).exp();
        for seed in 0..2_000 {
            let first = scorer.rank(fleet.to_vec(), "m", seed)[0]
                .backend
                .name
                .clone();
            let i = usize::from(first == "b");
            served[i] += 1;
            for c in fleet.iter_mut() {
                c.sent_rate *= decay;
            }
            fleet[i].sent_rate += 0.1;
            fleet[i].prefix.matched_blocks = 10;
        }
        assert!((1_400..=1_600).contains(&served[0]), "{served:?}");
    }

    #[test]
    fn an_adapter_goes_where_it_is_loaded() {
        let mut loaded = signals(0, 4, 0.3, false);
        loaded.running_adapters = vec!["sql-lora".into(), "chat-lora".into()];
        let mut full = signals(0, 4, 0.3, false);
        full.running_adapters = vec!["a".into(), "b".into()];
        let fleet = [
            candidate("without", Some(full), 0),
            candidate("with", Some(loaded), 0),
        ];
        let counts = scorer_counts(&fleet, "sql-lora", 2_000);
        assert!(counts[0] < 60, "{counts:?}");
        // A base-model request is not steered.
        let counts = scorer_counts(&fleet, "m", 2_000);
        assert!((800..1_200).contains(&counts[0]), "{counts:?}");
    }
}
