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

/// Roughly what one remembered block costs: the hash, the hash table's
/// control byte, and its spare room.
const BYTES_PER_BLOCK: usize = 10;

/// One backend's index. Cheap to share (`&self` everywhere).
#[derive(Debug)]
pub struct PrefixCache {
    limits: PrefixLimits,
    state: Mutex<Generations>,
}

#[derive(Debug)]
struct Generations {
    current: HashSet<u64>,
    previous: HashSet<u64>,
    /// When `current` began.
    since: Instant,
}

impl PrefixCache {
    pub fn new(limits: PrefixLimits) -> PrefixCache {
        PrefixCache {
            limits,
            state: Mutex::new(Generations {
                current: HashSet::new(),
                previous: HashSet::new(),
                since: Instant::now(),
            }),
        }
    }

    pub fn limits(&self) -> PrefixLimits {
        self.limits
    }

    /// How many of `blocks` (a request's chained hashes, oldest first) this
    /// backend probably holds, counted from the first: the blocks an engine
    /// could reuse. Matched blocks count as used again.
    pub fn matched(&self, blocks: &[u64]) -> usize {
        if blocks.is_empty() {
            return 0;
        }
        let mut state = self.lock();
        state.age(self.limits, Instant::now());
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
        state.rotate_if_full(self.limits);
        matched
    }

    /// Remembers that `blocks` were sent to this backend (it now holds them).
    pub fn insert(&self, blocks: &[u64]) {
        if blocks.is_empty() {
            return;
        }
        let mut state = self.lock();
        state.age(self.limits, Instant::now());
        // A prompt larger than the whole index keeps its first blocks: they
        // are the ones every later turn shares.
        for block in blocks.iter().take(self.limits.capacity / 2) {
            state.previous.remove(block);
            state.current.insert(*block);
            state.rotate_if_full(self.limits);
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
    fn age(&mut self, limits: PrefixLimits, now: Instant) {
        let age = now.saturating_duration_since(self.since);
        if age >= limits.ttl {
            self.previous = HashSet::new();
            self.current = HashSet::new();
            self.since = now;
        } else if age >= limits.ttl / 2 {
            self.previous = std::mem::take(&mut self.current);
            self.since = now;
        }
    }

    fn rotate_if_full(&mut self, limits: PrefixLimits) {
        if self.current.len() >= (limits.capacity / 2).max(1) {
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
