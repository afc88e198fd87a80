//! The simulated engine inside a mock backend: a running batch of limited
//! size with a waiting queue in front, a KV cache of limited capacity in
//! blocks that remembers prompt prefixes (chained block hashes, least
//! recently used evicted first, as vLLM's prefix cache does), prefill time
//! proportional to the prompt tokens not already cached, and `/metrics`
//! with vLLM's (or SGLang's) names showing that state. Faults a test can
//! switch on make the metrics endpoint hang, answer garbage or answer a
//! huge body.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Whose metric names `/metrics` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsFlavor {
    Vllm,
    Sglang,
}

/// The engine's size and pace.
#[derive(Debug, Clone)]
pub struct EngineModel {
    /// KV-cache capacity in blocks.
    pub kv_blocks: u32,
    /// Tokens per KV block (vLLM's default is 16).
    pub block_tokens: u32,
    /// Prefill time per prompt token not found in the cache.
    pub prefill_per_token: Duration,
    /// Requests decoded at once; more wait in the queue.
    pub max_batch: u32,
    pub metrics: MetricsFlavor,
}

impl Default for EngineModel {
    fn default() -> Self {
        EngineModel {
            kv_blocks: 1024,
            block_tokens: 16,
            prefill_per_token: Duration::ZERO,
            max_batch: 64,
            metrics: MetricsFlavor::Vllm,
        }
    }
}

/// What `/metrics` does, for tests of a misbehaving engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MetricsFault {
    None = 0,
    /// Never answers.
    Hang = 1,
    /// Answers 200 with text that is not metrics.
    Garbage = 2,
    /// Answers 200 with a body of 100 MiB, streamed.
    Huge = 3,
}

/// The live engine of one mock backend.
pub struct Engine {
    model: EngineModel,
    batch: Arc<Semaphore>,
    waiting: AtomicU64,
    running: AtomicU64,
    /// KV blocks held by running requests.
    blocks_in_use: AtomicU64,
    cache: Mutex<PrefixCache>,
    /// Held by the request being prefilled.
    prefill_lane: tokio::sync::Mutex<()>,
    /// Prompt tokens asked for and found in the cache, ever.
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    fault: AtomicU8,
    model_name: String,
}

/// Counts a request as waiting until dropped (also when its client goes
/// away while it waits).
struct Queued<'a>(&'a Engine);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request's place in the running batch and its KV blocks, given back
/// when dropped.
pub struct Seat {
    engine: Arc<Engine>,
    _permit: OwnedSemaphorePermit,
    blocks: u64,
    /// How long this request's prefill takes.
    pub prefill: Duration,
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.engine.running.fetch_sub(1, Ordering::Relaxed);
        self.engine
            .blocks_in_use
            .fetch_sub(self.blocks, Ordering::Relaxed);
    }
}

impl Engine {
    pub fn new(model: EngineModel, model_name: &str) -> Arc<Engine> {
        let max_batch = model.max_batch.max(1) as usize;
        let capacity = model.kv_blocks.max(1) as usize;
        Arc::new(Engine {
            model,
            batch: Arc::new(Semaphore::new(max_batch)),
            waiting: AtomicU64::new(0),
            running: AtomicU64::new(0),
            blocks_in_use: AtomicU64::new(0),
            cache: Mutex::new(PrefixCache::new(capacity)),
            prefill_lane: tokio::sync::Mutex::new(()),
            prefix_queries: AtomicU64::new(0),
            prefix_hits: AtomicU64::new(0),
            fault: AtomicU8::new(MetricsFault::None as u8),
            model_name: model_name.to_string(),
        })
    }

    pub fn set_fault(&self, fault: MetricsFault) {
        self.fault.store(fault as u8, Ordering::Relaxed);
    }

    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Relaxed)
    }

    /// Blocks held by running requests over capacity, 0..1.
    pub fn kv_usage(&self) -> f64 {
        let used = self.blocks_in_use.load(Ordering::Relaxed) as f64;
        (used / f64::from(self.model.kv_blocks.max(1))).min(1.0)
    }

    /// Waits for a place in the batch, then for the prefill lane (one
    /// prefill at a time: it is compute-bound, and a GPU that prefills
    /// two prompts at once takes as long as doing them in turn), looks the
    /// prompt's blocks up in the cache and prefills the tokens after the
    /// cached prefix. Returns once the first token could be sampled;
    /// `answer_tokens` are the blocks decode will fill. A request counts as
    /// waiting until its prefill starts, then as running.
    pub async fn admit(self: &Arc<Self>, prompt: &[&str], answer_tokens: u32) -> Option<Seat> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let queued = Queued(self);
        let permit = self.batch.clone().acquire_owned().await.ok()?;
        let lane = self.prefill_lane.lock().await;
        drop(queued);
        let block = self.model.block_tokens.max(1) as usize;
        let hashes = block_hashes(prompt, block);
        let cached_blocks = match self.cache.lock() {
            Ok(mut cache) => cache.lookup_and_insert(&hashes),
            Err(_) => 0,
        };
        let cached_tokens = (cached_blocks * block).min(prompt.len());
        let uncached = (prompt.len() - cached_tokens) as u32;
        self.prefix_queries
            .fetch_add(prompt.len() as u64, Ordering::Relaxed);
        self.prefix_hits
            .fetch_add(cached_tokens as u64, Ordering::Relaxed);
        let blocks = (prompt.len() + answer_tokens as usize).div_ceil(block) as u64;
        self.blocks_in_use.fetch_add(blocks, Ordering::Relaxed);
        self.running.fetch_add(1, Ordering::Relaxed);
        let seat = Seat {
            engine: self.clone(),
            _permit: permit,
            blocks,
            prefill: self.model.prefill_per_token * uncached,
        };
        tokio::time::sleep(seat.prefill).await;
        drop(lane);
        Some(seat)
    }

    /// The `/metrics` body, or the fault's misbehaviour.
    pub async fn metrics(&self) -> MetricsAnswer {
        match self.fault.load(Ordering::Relaxed) {
            1 => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                MetricsAnswer::Text(String::new())
            }
            2 => MetricsAnswer::Text("<html><body>502 Bad Gateway</body></html>\n".into()),
            3 => {
                let (tx, rx) = mpsc::channel(4);
                tokio::spawn(async move {
                    let chunk = Bytes::from(vec![b'#'; 64 << 10]);
                    for _ in 0..1600 {
                        if tx.send(chunk.clone()).await.is_err() {
                            return;
                        }
                    }
                });
                MetricsAnswer::Stream(rx)
            }
            _ => MetricsAnswer::Text(self.exposition()),
        }
    }

    fn exposition(&self) -> String {
        let labels = format!(
            "{{engine=\"0\",model_name=\"{}\"}}",
            self.model_name.replace(['"', '\\', '\n'], "_")
        );
        let (waiting, running, kv) = (self.waiting(), self.running(), self.kv_usage());
        let (queries, hits) = (
            self.prefix_queries.load(Ordering::Relaxed),
            self.prefix_hits.load(Ordering::Relaxed),
        );
        let gauge = |name: &str, help: &str, value: String| {
            format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name}{labels} {value}\n")
        };
        let counter = |name: &str, help: &str, value: u64| {
            format!("# HELP {name} {help}\n# TYPE {name} counter\n{name}{labels} {value}.0\n")
        };
        match self.model.metrics {
            MetricsFlavor::Vllm => [
                gauge(
                    "vllm:num_requests_running",
                    "Number of requests in model execution batches.",
                    format!("{running}.0"),
                ),
                gauge(
                    "vllm:num_requests_waiting",
                    "Number of requests waiting to be processed.",
                    format!("{waiting}.0"),
                ),
                gauge(
                    "vllm:kv_cache_usage_perc",
                    "KV-cache usage. 1 means 100 percent usage.",
                    format!("{kv}"),
                ),
                counter(
                    "vllm:prefix_cache_queries_total",
                    "Prefix cache queries, in terms of number of queried tokens.",
                    queries,
                ),
                counter(
                    "vllm:prefix_cache_hits_total",
                    "Prefix cache hits, in terms of number of cached tokens.",
                    hits,
                ),
            ]
            .concat(),
            MetricsFlavor::Sglang => {
                let rate = if queries == 0 {
                    0.0
                } else {
                    hits as f64 / queries as f64
                };
                [
                    gauge(
                        "sglang:num_running_reqs",
                        "The number of running requests.",
                        format!("{running}.0"),
                    ),
                    gauge(
                        "sglang:num_queue_reqs",
                        "The number of requests in the waiting queue.",
                        format!("{waiting}.0"),
                    ),
                    gauge("sglang:token_usage", "The token usage.", format!("{kv}")),
                    gauge(
                        "sglang:cache_hit_rate",
                        "The prefix cache hit rate.",
                        format!("{rate}"),
                    ),
                ]
                .concat()
            }
        }
    }
}

/// What `/metrics` answers.
pub enum MetricsAnswer {
    Text(String),
    Stream(mpsc::Receiver<Bytes>),
}

/// The prompt as the engine would tokenize it, roughly: the words of each
/// chat message after its role, or of the completions prompt.
pub fn prompt_words(body: &Value) -> Vec<&str> {
    let mut words = Vec::new();
    if let Some(messages) = body["messages"].as_array() {
        for m in messages {
            words.push(m["role"].as_str().unwrap_or("user"));
            if let Some(text) = m["content"].as_str() {
                words.extend(text.split_whitespace());
            }
        }
    } else {
        match &body["prompt"] {
            Value::Array(parts) => {
                for p in parts {
                    words.extend(p.as_str().unwrap_or_default().split_whitespace());
                }
            }
            prompt => words.extend(prompt.as_str().unwrap_or_default().split_whitespace()),
        }
    }
    words
}

/// One hash per full block of `block` tokens, each chained to the one
/// before, so equal hashes mean equal prefixes.
fn block_hashes(tokens: &[&str], block: usize) -> Vec<u64> {
    let mut previous = 0u64;
    tokens
        .chunks_exact(block)
        .map(|chunk| {
            let mut h = DefaultHasher::new();
            previous.hash(&mut h);
            chunk.hash(&mut h);
            previous = h.finish();
            previous
        })
        .collect()
}

/// Cached blocks by hash, least recently used evicted first.
struct PrefixCache {
    capacity: usize,
    tick: u64,
    by_hash: HashMap<u64, u64>,
    by_age: BTreeMap<u64, u64>,
}

impl PrefixCache {
    fn new(capacity: usize) -> PrefixCache {
        PrefixCache {
            capacity,
            tick: 0,
            by_hash: HashMap::new(),
            by_age: BTreeMap::new(),
        }
    }

    /// How many leading blocks were cached; then every block is cached
    /// (and fresh).
    fn lookup_and_insert(&mut self, hashes: &[u64]) -> usize {
        let hits = hashes
            .iter()
            .take_while(|h| self.by_hash.contains_key(h))
            .count();
        for &h in hashes {
            self.tick += 1;
            if let Some(old) = self.by_hash.insert(h, self.tick) {
                self.by_age.remove(&old);
            }
            self.by_age.insert(self.tick, h);
        }
        while self.by_hash.len() > self.capacity {
            let Some((_, h)) = self.by_age.pop_first() else {
                break;
            };
            self.by_hash.remove(&h);
        }
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_finds_shared_prefixes_and_evicts_the_oldest() {
        let mut cache = PrefixCache::new(4);
        let a: Vec<&str> = "s s s s t t t t u u".split(' ').collect();
        let hashes = block_hashes(&a, 4);
        assert_eq!(hashes.len(), 2, "only full blocks");
        assert_eq!(cache.lookup_and_insert(&hashes), 0);
        assert_eq!(cache.lookup_and_insert(&hashes), 2);
        let b: Vec<&str> = "s s s s x x x x".split(' ').collect();
        assert_eq!(cache.lookup_and_insert(&block_hashes(&b, 4)), 1);
        let c: Vec<&str> = "y y y y z z z z".split(' ').collect();
        cache.lookup_and_insert(&block_hashes(&c, 4));
        // Capacity 4: the oldest block (a's second) is gone.
        assert_eq!(cache.lookup_and_insert(&hashes), 1);
    }

    #[tokio::test]
    async fn the_batch_is_bounded_and_prefill_shrinks_with_the_cache() {
        let engine = Engine::new(
            EngineModel {
                kv_blocks: 8,
                block_tokens: 2,
                prefill_per_token: Duration::from_millis(1),
                max_batch: 1,
                metrics: MetricsFlavor::Vllm,
            },
            "m",
        );
        let prompt = ["a", "b", "c", "d", "e"];
        let first = engine.admit(&prompt, 3).await.unwrap();
        assert_eq!(first.prefill, Duration::from_millis(5));
        assert_eq!(engine.kv_usage(), 0.5);
        let e = engine.clone();
        let second = tokio::spawn(async move { e.admit(&["a", "b", "c", "d", "e"], 3).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!((engine.waiting(), engine.running()), (1, 1));
        let MetricsAnswer::Text(text) = engine.metrics().await else {
            panic!("no text");
        };
        assert!(
            text.contains("vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 1.0"),
            "{text}"
        );
        drop(first);
        let second = second.await.unwrap().unwrap();
        assert_eq!(
            second.prefill,
            Duration::from_millis(1),
            "4 of 5 tokens cached"
        );
        assert_eq!(engine.waiting(), 0);
    }
}
