//! What one backend probably holds in its prefix cache: the prompt blocks
//! (see [`crate::api::prefix`]) the gateway recently sent it.
//!
//! An estimate, not the engine's truth: the engine evicts under its own
//! memory pressure and the gateway cannot see it. The index approximates
//! that with a bounded, least-recently-used set of block hashes that also
//! ages: blocks not sent again within `ttl` are forgotten.
//!
//! The set is two generations (the "two hash sets" approximation of LRU):
//! new and touched blocks go into the current generation; when it holds half
//! the capacity, or is older than half the `ttl`, it becomes the previous
//! one and the old previous generation is dropped. A lookup that finds a
//! block in the previous generation moves it forward. Every operation is a
//! hash lookup, memory never exceeds `capacity` entries, and a block
//! survives at least `capacity / 2` newer insertions or `ttl / 2`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bounds of one backend's index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixLimits {
    /// Most blocks remembered.
    pub capacity: usize,
    /// Blocks not seen again for this long are forgotten.
    pub ttl: Duration,
}

impl Default for PrefixLimits {
    fn default() -> Self {
        PrefixLimits {
            capacity: 131_072,
            ttl: Duration::from_secs(600),
        }
    }
}

impl From<&crate::config::PrefixCacheConfig> for PrefixLimits {
    fn from(config: &crate::config::PrefixCacheConfig) -> Self {
        PrefixLimits {
            capacity: config.capacity as usize,
            ttl: config.ttl,
        }
    }
}

/// Roughly what one remembered block costs: the hash, the hash table's
/// control byte, and its spare room.
const BYTES_PER_BLOCK: usize = 10;

/// One backend's index. Cheap to share (`&self` everywhere).
#[derive(Debug)]
pub struct PrefixCache {
    state: Mutex<Generations>,
    /// Blocks of the prompts served here, and how many of them it held
    /// (by this estimate) when they arrived: the prefix hit rate.
    served_blocks: AtomicU64,
    hit_blocks: AtomicU64,
}

#[derive(Debug)]
struct Generations {
    /// Changed by a config reload.
    limits: PrefixLimits,
    current: HashSet<u64>,
    previous: HashSet<u64>,
    /// When `current` began.
    since: Instant,
}

impl PrefixCache {
    pub fn new(limits: PrefixLimits) -> PrefixCache {
        PrefixCache {
            state: Mutex::new(Generations {
                limits,
                current: HashSet::new(),
                previous: HashSet::new(),
                since: Instant::now(),
            }),
            served_blocks: AtomicU64::new(0),
            hit_blocks: AtomicU64::new(0),
        }
    }

    /// Credits a served request's prompt to this backend: counts how many
    /// of its leading blocks were here already, then remembers them all.
    /// Returns the blocks matched.
    pub fn serve(&self, blocks: &[u64]) -> usize {
        let matched = self.send(blocks);
        self.count_served(blocks.len(), matched);
        matched
    }

    /// A request's prompt leaves for this backend: counts how many of its
    /// leading blocks were here already, then remembers them all. Returns
    /// the blocks matched, for [`PrefixCache::count_served`] once it is
    /// answered.
    pub fn send(&self, blocks: &[u64]) -> usize {
        if blocks.is_empty() {
            return 0;
        }
        let matched = self.matched(blocks);
        self.insert(blocks);
        matched
    }

    /// Counts an answered request's prompt in the hit rate: `blocks` in
    /// it, `matched` of them found here when it was sent.
    pub fn count_served(&self, blocks: usize, matched: usize) {
        if blocks == 0 {
            return;
        }
        self.served_blocks
            .fetch_add(blocks as u64, Ordering::Relaxed);
        self.hit_blocks.fetch_add(matched as u64, Ordering::Relaxed);
    }

    /// Blocks of served prompts, and how many of them were found here.
    pub fn served(&self) -> (u64, u64) {
        (
            self.served_blocks.load(Ordering::Relaxed),
            self.hit_blocks.load(Ordering::Relaxed),
        )
    }

    /// What `/health` shows of the index.
    pub fn to_json(&self) -> serde_json::Value {
        let (served, hit) = self.served();
        serde_json::json!({
            "blocks": self.len(),
            "memory_bytes": self.memory_bytes(),
            "served_blocks": served,
            "hit_blocks": hit,
            "hit_rate": if served == 0 { None } else { Some(hit as f64 / served as f64) },
        })
    }

    pub fn limits(&self) -> PrefixLimits {
        self.lock().limits
    }

    /// Applies reloaded limits; a smaller capacity takes effect as the
    /// generations turn over.
    pub fn set_limits(&self, limits: PrefixLimits) {
        self.lock().limits = limits;
    }

    /// Like [`PrefixCache::matched`], without counting the blocks as used:
    /// what a policy sees when it compares backends (only the one that
    /// serves the request gets its blocks refreshed, by `insert`).
    pub fn peek(&self, blocks: &[u64]) -> usize {
        if blocks.is_empty() {
            return 0;
        }
        let mut state = self.lock();
        state.age(Instant::now());
        blocks
            .iter()
            .take_while(|b| state.current.contains(b) || state.previous.contains(b))
            .count()
    }

    /// How many of `blocks` (a request's chained hashes, oldest first) this
    /// backend probably holds, counted from the first: the blocks an engine
    /// could reuse. Matched blocks count as used again.
    pub fn matched(&self, blocks: &[u64]) -> usize {
        if blocks.is_empty() {
            return 0;
        }
        let mut state = self.lock();
        state.age(Instant::now());
        let mut matched = 0;
        for block in blocks {
            if state.current.contains(block) {
                matched += 1;
            } else if state.previous.remove(block) {
                state.current.insert(*block);
                matched += 1;
            } else {
                break;
            }
        }
        state.rotate_if_full();
        matched
    }

    /// Remembers that `blocks` were sent to this backend (it now holds them).
    pub fn insert(&self, blocks: &[u64]) {
        if blocks.is_empty() {
            return;
        }
        let mut state = self.lock();
        state.age(Instant::now());
        // A prompt larger than the whole index keeps its first blocks: they
        // are the ones every later turn shares.
        for block in blocks.iter().take(state.limits.capacity / 2) {
            state.previous.remove(block);
            state.current.insert(*block);
            state.rotate_if_full();
        }
    }

    /// Blocks remembered now.
    pub fn len(&self) -> usize {
        let state = self.lock();
        state.current.len() + state.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An estimate of the memory the index holds, in bytes.
    pub fn memory_bytes(&self) -> usize {
        let state = self.lock();
        (state.current.capacity() + state.previous.capacity()) * BYTES_PER_BLOCK
    }

    /// Forgets everything (the backend restarted or was replaced).
    pub fn clear(&self) {
        let mut state = self.lock();
        state.current = HashSet::new();
        state.previous = HashSet::new();
        state.since = Instant::now();
    }

    /// The lock is held for hash lookups only. A panic while holding it
    /// cannot leave the sets inconsistent in a way that matters to an
    /// estimate, so a poisoned lock is used as is.
    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Generations {
    /// Drops what is older than the ttl: a current generation older than
    /// half of it becomes the previous one; one older than all of it (an
    /// idle backend) and its predecessor are both gone.
    fn age(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.since);
        if age >= self.limits.ttl {
            self.previous = HashSet::new();
            self.current = HashSet::new();
            self.since = now;
        } else if age >= self.limits.ttl / 2 {
            self.previous = std::mem::take(&mut self.current);
            self.since = now;
        }
    }

    fn rotate_if_full(&mut self) {
        if self.current.len() >= (self.limits.capacity / 2).max(1) {
            self.previous = std::mem::take(&mut self.current);
            self.since = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(capacity: usize) -> PrefixCache {
        PrefixCache::new(PrefixLimits {
            capacity,
            ttl: Duration::from_secs(600),
        })
    }

    #[test]
    fn matches_count_leading_blocks_only() {
        let c = cache(100);
        c.insert(&[1, 2, 3, 4]);
        assert_eq!(c.matched(&[1, 2, 3, 4, 5, 6]), 4);
        assert_eq!(c.matched(&[1, 2, 9, 4]), 2, "a gap ends the match");
        assert_eq!(c.matched(&[9, 1, 2]), 0);
        assert_eq!(c.matched(&[]), 0);
    }

    #[test]
    fn memory_is_bounded_and_recent_blocks_survive() {
        let c = cache(1_000);
        c.insert(&[7, 8]);
        for round in 0..50u64 {
            let blocks: Vec<u64> = (0..100).map(|i| 1_000 + round * 100 + i).collect();
            c.insert(&blocks);
            // Touching 7 and 8 keeps them recent.
            assert_eq!(c.matched(&[7, 8]), 2, "round {round}");
            assert!(c.len() <= 1_000, "{}", c.len());
        }
        // The oldest untouched blocks are gone, the newest are there.
        assert_eq!(c.matched(&[1_000]), 0);
        assert_eq!(c.matched(&[1_000 + 49 * 100 + 99]), 1);
        assert!(c.memory_bytes() > 0);
    }

    #[test]
    fn a_prompt_larger_than_the_index_keeps_its_head() {
        let c = cache(10);
        let blocks: Vec<u64> = (0..100).collect();
        c.insert(&blocks);
        assert!(c.len() <= 10);
        assert_eq!(c.matched(&blocks), 5);
    }

    #[test]
    fn serving_counts_hits() {
        let c = cache(100);
        assert_eq!(c.serve(&[1, 2, 3]), 0);
        assert_eq!(c.serve(&[1, 2, 3, 4]), 3);
        assert_eq!(c.served(), (7, 3));
        assert_eq!(c.to_json()["blocks"], 4);
    }

    /// A prompt is credited when it leaves, before its answer: a second
    /// request sent meanwhile finds it; the hit rate counts answers only.
    #[test]
    fn sending_credits_at_once_and_answers_count_hits() {
        let c = cache(100);
        let first = c.send(&[1, 2, 3]);
        assert_eq!((first, c.peek(&[1, 2, 3, 9])), (0, 3));
        assert_eq!(c.served(), (0, 0), "nothing answered yet");
        let second = c.send(&[1, 2, 3, 4]);
        c.count_served(4, second);
        assert_eq!(c.served(), (4, 3));
    }

    #[test]
    fn peeking_does_not_refresh() {
        let c = cache(8);
        c.insert(&[1, 2]);
        assert_eq!(c.peek(&[1, 2, 3]), 2);
        // Two newer blocks fill the current generation (half the capacity):
        // 1 and 2 move to the previous one. A peek leaves them there, so
        // four more push them out.
        c.insert(&[10, 11]);
        assert_eq!(c.peek(&[1, 2]), 2);
        c.insert(&[12, 13, 14, 15]);
        assert_eq!(c.peek(&[1, 2]), 0);
        // `matched` would have kept them.
        c.insert(&[1, 2, 10, 11]);
        assert_eq!(c.matched(&[1, 2]), 2);
        c.insert(&[20, 21, 22, 23]);
        assert_eq!(c.peek(&[1, 2]), 2);
        c.set_limits(PrefixLimits {
            capacity: 8,
            ttl: Duration::from_secs(1),
        });
        assert_eq!(c.limits().capacity, 8);
    }

    #[test]
    fn blocks_age_out() {
        let c = PrefixCache::new(PrefixLimits {
            capacity: 100,
            ttl: Duration::from_millis(60),
        });
        c.insert(&[1, 2]);
        std::thread::sleep(Duration::from_millis(35));
        // Past half the ttl: still found (in the previous generation) and
        // moved forward by the lookup.
        assert_eq!(c.matched(&[1, 2]), 2);
        std::thread::sleep(Duration::from_millis(70));
        assert_eq!(c.matched(&[1, 2]), 0, "idle past the ttl");
        assert!(c.is_empty());
    }
}
