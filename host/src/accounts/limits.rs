//! Consumers' limits: requests and tokens per minute, tokens per day, and
//! concurrent requests. Tokens are reserved when a request is admitted
//! (prompt estimate + `max_tokens`) and reconciled with the real count when
//! it ends, so a burst of concurrent requests cannot overshoot a limit by
//! more than one request's reservation.
//!
//! The counters live in this process, or in Redis so that several replicas
//! enforce one limit together (each check-and-reserve is one Lua script,
//! atomic in Redis). A Redis failure never hangs a request: after
//! `limits.redis_timeout` the configured `on_store_error` decides.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::accounts::consumers::Consumer;
use crate::config::{ConsumerLimits, LimitsConfig, OnError};

/// Why a request is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{message}")]
    Limited {
        /// `rate_limit_exceeded`, or `insufficient_quota` for the daily budget.
        code: &'static str,
        message: String,
        retry_after: u64,
    },
    #[error("The rate limiter's store is unavailable: {0}")]
    StoreDown(String),
}

impl crate::problem::Problem for Refusal {
    fn status(&self) -> http::StatusCode {
        match self {
            Refusal::Limited { .. } => http::StatusCode::TOO_MANY_REQUESTS,
            Refusal::StoreDown(_) => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    fn code(&self) -> &str {
        match self {
            Refusal::Limited { code, .. } => code,
            Refusal::StoreDown(_) => "rate_limiter_unavailable",
        }
    }
    fn retry_after(&self) -> Option<u64> {
        match self {
            Refusal::Limited { retry_after, .. } => Some(*retry_after),
            Refusal::StoreDown(_) => Some(1),
        }
    }
}

/// How long a concurrency slot's release is retried while the store is
/// down: the in-flight counter's expiry in the store.
const RELEASE_RETRY_FOR: Duration = Duration::from_secs(3600);

/// Which limit refused, as the Lua script and the memory store say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hit {
    Concurrency,
    RequestsPerMinute,
    TokensPerMinute,
    TokensPerDay,
}

impl Hit {
    fn from_code(code: i64) -> Option<Hit> {
        match code {
            1 => Some(Hit::RequestsPerMinute),
            2 => Some(Hit::TokensPerMinute),
            3 => Some(Hit::TokensPerDay),
            4 => Some(Hit::Concurrency),
            _ => None,
        }
    }

    fn refusal(self, consumer: &str, limits: &ConsumerLimits, now: u64) -> Refusal {
        let to_next_minute = 60 - now % 60;
        let (code, message, retry_after) = match self {
            Hit::Concurrency => (
                "rate_limit_exceeded",
                format!(
                    "Consumer `{consumer}` has {} requests in flight, its limit.",
                    limits.max_concurrent_requests.unwrap_or(0)
                ),
                1,
            ),
            Hit::RequestsPerMinute => (
                "rate_limit_exceeded",
                format!(
                    "Consumer `{consumer}` reached its limit of {} requests per minute.",
                    limits.requests_per_minute.unwrap_or(0)
                ),
                to_next_minute,
            ),
            Hit::TokensPerMinute => (
                "rate_limit_exceeded",
                format!(
                    "Consumer `{consumer}` reached its limit of {} tokens per minute.",
                    limits.tokens_per_minute.unwrap_or(0)
                ),
                to_next_minute,
            ),
            Hit::TokensPerDay => (
                "insufficient_quota",
                format!(
                    "Consumer `{consumer}` used its budget of {} tokens for today (UTC).",
                    limits.tokens_per_day.unwrap_or(0)
                ),
                86_400 - now % 86_400,
            ),
        };
        Refusal::Limited {
            code,
            message,
            retry_after,
        }
    }
}

/// One admission: the tokens reserved and the windows they went to.
/// Settle it with the real count (an unsettled ticket keeps its whole
/// reservation); dropping it gives back the concurrency slot (a stream
/// holds it until its last byte).
pub struct Ticket {
    limiter: Arc<Limiter>,
    consumer: String,
    reserved: u64,
    minute: u64,
    day: u64,
    /// The concurrency slot held, named uniquely across replicas.
    slot: Option<String>,
}

impl Ticket {
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Replaces the reservation by what the request really used.
    pub fn settle(self, used: u64) {
        let delta = used as i64 - self.reserved as i64;
        if delta != 0 {
            self.limiter
                .adjust(&self.consumer, self.minute, self.day, delta);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.limiter.release(&self.consumer, slot);
        }
    }
}

#[derive(Default)]
struct Counters {
    minute: u64,
    requests: u64,
    minute_tokens: u64,
    day: u64,
    day_tokens: u64,
    concurrent: u64,
}

enum Store {
    Memory(Mutex<HashMap<String, Counters>>),
    Redis(redis_store::RedisStore),
}

pub struct Limiter {
    store: Store,
    on_error: OnError,
    timeout: Duration,
    pub default_max_tokens: u64,
    /// This process, among the replicas sharing a store (random).
    instance: u64,
    slots_taken: std::sync::atomic::AtomicU64,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `used + want` may pass `limit`: never, except that a request
/// is always admitted into an empty window (else a reservation larger than
/// the limit could never run).
fn over(limit: Option<u64>, used: u64, want: u64) -> bool {
    limit.is_some_and(|l| used > 0 && used.saturating_add(want) > l)
}

impl Limiter {
    pub fn new(config: &LimitsConfig) -> anyhow::Result<Limiter> {
        let store = match &config.redis_url {
            Some(url) => Store::Redis(redis_store::RedisStore::new(url)?),
            None => Store::Memory(Mutex::new(HashMap::new())),
        };
        Ok(Limiter {
            store,
            on_error: config.on_store_error,
            timeout: config.redis_timeout,
            default_max_tokens: config.default_max_tokens,
            instance: {
                use std::hash::{BuildHasher, Hasher};
                // Seeded from the OS's randomness, like every RandomState.
                let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
                hasher.write_u128(
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos()),
                );
                hasher.finish()
            },
            slots_taken: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Checks every limit of `consumer` and reserves one request, `tokens`
    /// tokens and a concurrency slot. `None` when it has no limits.
    pub async fn admit(
        self: &Arc<Self>,
        consumer: &Consumer,
        tokens: u64,
    ) -> Result<Option<Ticket>, Refusal> {
        let limits = &consumer.limits;
        if limits.is_empty() {
            return Ok(None);
        }
        let now = now_s();
        let (minute, day) = (now / 60, now / 86_400);
        let slot = limits.max_concurrent_requests.map(|_| self.slot_name());
        let slot_name = slot.as_deref().unwrap_or_default();
        let hit = match &self.store {
            Store::Memory(map) => {
                let mut map = map
                    .lock()
                    .map_err(|_| Refusal::StoreDown("the counters' lock is poisoned".into()))?;
                let c = map.entry(consumer.name.clone()).or_default();
                if c.minute != minute {
                    (c.minute, c.requests, c.minute_tokens) = (minute, 0, 0);
                }
                if c.day != day {
                    (c.day, c.day_tokens) = (day, 0);
                }
                let hit = if limits
                    .max_concurrent_requests
                    .is_some_and(|l| c.concurrent >= l)
                {
                    Some(Hit::Concurrency)
                } else if limits.requests_per_minute.is_some_and(|l| c.requests >= l) {
                    Some(Hit::RequestsPerMinute)
                } else if over(limits.tokens_per_minute, c.minute_tokens, tokens) {
                    Some(Hit::TokensPerMinute)
                } else if over(limits.tokens_per_day, c.day_tokens, tokens) {
                    Some(Hit::TokensPerDay)
                } else {
                    None
                };
                if hit.is_none() {
                    c.requests += 1;
                    c.minute_tokens += tokens;
                    c.day_tokens += tokens;
                    if limits.max_concurrent_requests.is_some() {
                        c.concurrent += 1;
                    }
                }
                hit
            }
            Store::Redis(redis) => {
                let call = redis.admit(&consumer.name, limits, tokens, minute, day, slot_name);
                match tokio::time::timeout(self.timeout, call).await {
                    Ok(Ok(code)) => Hit::from_code(code),
                    Ok(Err(e)) => return self.store_failed(&consumer.name, e.to_string()),
                    Err(_) => {
                        // The script may still run once the store answers
                        // (it was sent): take back the slot it would hold.
                        if let Some(slot) = slot {
                            self.release(&consumer.name, slot);
                        }
                        return self.store_failed(
                            &consumer.name,
                            format!("no answer within {:?}", self.timeout),
                        );
                    }
                }
            }
        };
        if let Some(hit) = hit {
            return Err(hit.refusal(&consumer.name, limits, now));
        }
        Ok(Some(Ticket {
            limiter: self.clone(),
            consumer: consumer.name.clone(),
            reserved: tokens,
            minute,
            day,
            slot,
        }))
    }

    fn store_failed(&self, consumer: &str, error: String) -> Result<Option<Ticket>, Refusal> {
        crate::metrics::metrics().limit_store_error();
        match self.on_error {
            OnError::FailOpen => {
                tracing::warn!(consumer, error = %error, "limit store failed: admitting (limits.on_store_error = fail-open)");
                Ok(None)
            }
            OnError::FailClosed => {
                tracing::warn!(consumer, error = %error, "limit store failed: refusing (limits.on_store_error = fail-closed)");
                Err(Refusal::StoreDown(error))
            }
        }
    }

    fn adjust(self: &Arc<Self>, consumer: &str, minute: u64, day: u64, delta: i64) {
        match &self.store {
            Store::Memory(map) => {
                let Ok(mut map) = map.lock() else { return };
                let Some(c) = map.get_mut(consumer) else {
                    return;
                };
                let apply = |v: &mut u64| *v = v.saturating_add_signed(delta);
                if c.minute == minute {
                    apply(&mut c.minute_tokens);
                }
                if c.day == day {
                    apply(&mut c.day_tokens);
                }
            }
            Store::Redis(redis) => {
                let (redis, consumer, timeout) =
                    (redis.clone(), consumer.to_string(), self.timeout);
                spawn(async move {
                    let call = redis.adjust(&consumer, minute, day, delta);
                    if !matches!(tokio::time::timeout(timeout, call).await, Ok(Ok(()))) {
                        crate::metrics::metrics().limit_store_error();
                        tracing::warn!(
                            consumer,
                            delta,
                            "limit store failed: a reservation was not reconciled"
                        );
                    }
                });
            }
        }
    }

    /// A name for a concurrency slot no other request of any replica has.
    fn slot_name(&self) -> String {
        let n = self
            .slots_taken
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{:016x}-{n}", self.instance)
    }

    fn release(self: &Arc<Self>, consumer: &str, slot: String) {
        match &self.store {
            Store::Memory(map) => {
                if let Ok(mut map) = map.lock() {
                    if let Some(c) = map.get_mut(consumer) {
                        c.concurrent = c.concurrent.saturating_sub(1);
                    }
                }
            }
            Store::Redis(redis) => {
                let (redis, consumer, timeout) =
                    (redis.clone(), consumer.to_string(), self.timeout);
                // The in-flight counter's expiry is renewed by every
                // admission, so a slot not given back would be lost for as
                // long as the consumer has traffic: keep trying until the
                // store answers (backing off), for as long as that expiry.
                spawn(async move {
                    let started = tokio::time::Instant::now();
                    let mut pause = Duration::from_millis(250);
                    loop {
                        let call = redis.release(&consumer, &slot);
                        if matches!(tokio::time::timeout(timeout, call).await, Ok(Ok(()))) {
                            return;
                        }
                        crate::metrics::metrics().limit_store_error();
                        if started.elapsed() >= RELEASE_RETRY_FOR {
                            tracing::error!(consumer, "limit store failed for an hour: a concurrency slot was not given back");
                            return;
                        }
                        tracing::warn!(consumer, retry_in = ?pause, "limit store failed: giving back a concurrency slot, will retry");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(30));
                    }
                });
            }
        }
    }

    /// What `consumer` has used in the current minute and day (for the
    /// admin API and the console).
    pub async fn usage(&self, consumer: &str) -> Option<serde_json::Value> {
        let now = now_s();
        let (minute, day) = (now / 60, now / 86_400);
        let (requests, minute_tokens, day_tokens, concurrent) = match &self.store {
            Store::Memory(map) => {
                let map = map.lock().ok()?;
                let c = map.get(consumer)?;
                (
                    if c.minute == minute { c.requests } else { 0 },
                    if c.minute == minute {
                        c.minute_tokens
                    } else {
                        0
                    },
                    if c.day == day { c.day_tokens } else { 0 },
                    c.concurrent,
                )
            }
            Store::Redis(redis) => {
                tokio::time::timeout(self.timeout, redis.usage(consumer, minute, day))
                    .await
                    .ok()?
                    .ok()?
            }
        };
        Some(serde_json::json!({
            "requests_this_minute": requests,
            "tokens_this_minute": minute_tokens,
            "tokens_today": day_tokens,
            "in_flight": concurrent,
        }))
    }
}

/// The tokens to reserve for a request: its prompt counted with the
/// tokenizer, plus the completion it may produce (`max_tokens`,
/// `max_completion_tokens`, or `default_max_tokens`; none for embeddings).
/// `None` (a body that is not JSON): `default_max_tokens`. Counting a
/// multi-MiB prompt takes real CPU: call it off the executor's threads for
/// large bodies (the admit step does).
pub fn reservation(
    body: Option<&serde_json::Value>,
    embeddings: bool,
    default_max_tokens: u64,
) -> u64 {
    let Some(value) = body else {
        return default_max_tokens;
    };
    let completion = if embeddings {
        0
    } else {
        value["max_completion_tokens"]
            .as_u64()
            .or(value["max_tokens"].as_u64())
            .unwrap_or(default_max_tokens)
    };
    crate::api::tokens::count_prompt(value).saturating_add(completion)
}

/// Runs `task` on the current runtime, if any (a ticket may be dropped
/// outside one at shutdown; then the update is skipped).
fn spawn(task: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(task);
    }
}

mod redis_store {
    //! The Redis side: one Lua script checks every limit and reserves
    //! atomically; counters are keyed by consumer and window and expire.
    //! Concurrency is a set of the slots held (scored by when they were
    //! taken): giving one back removes its member, which is safe to retry
    //! when the store did not answer, and a slot never given back leaves
    //! the count after an hour.

    use redis::aio::ConnectionManager;
    use redis::{AsyncCommands, Script};
    use tokio::sync::OnceCell;

    use crate::config::ConsumerLimits;

    const ADMIT: &str = r#"
local function num(k) return tonumber(redis.call('GET', k) or '0') end
local rpm_l, tpm_l, tpd_l, conc_l = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local want = tonumber(ARGV[5])
local rpm, tpm, tpd, conc = num(KEYS[1]), num(KEYS[2]), num(KEYS[3]), 0
if conc_l > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', tonumber(ARGV[6]) - 3600)
  conc = redis.call('ZCARD', KEYS[4])
end
if conc_l > 0 and conc >= conc_l then return 4 end
if rpm_l > 0 and rpm >= rpm_l then return 1 end
if tpm_l > 0 and tpm > 0 and tpm + want > tpm_l then return 2 end
if tpd_l > 0 and tpd > 0 and tpd + want > tpd_l then return 3 end
redis.call('INCR', KEYS[1]); redis.call('EXPIRE', KEYS[1], 120)
redis.call('INCRBY', KEYS[2], want); redis.call('EXPIRE', KEYS[2], 120)
redis.call('INCRBY', KEYS[3], want); redis.call('EXPIRE', KEYS[3], 172800)
if conc_l > 0 then redis.call('ZADD', KEYS[4], ARGV[6], ARGV[7]); redis.call('EXPIRE', KEYS[4], 3600) end
return 0
"#;

    /// Reconciles a reservation with the real count — only in windows that
    /// still exist: a request that outlived its minute must not recreate
    /// that minute's key without an expiry.
    const ADJUST: &str = r#"
for _, k in ipairs(KEYS) do
  if redis.call('EXISTS', k) == 1 then redis.call('INCRBY', k, ARGV[1]) end
end
return 0
"#;

    #[derive(Clone)]
    pub struct RedisStore {
        client: redis::Client,
        connection: std::sync::Arc<OnceCell<ConnectionManager>>,
        admit: std::sync::Arc<Script>,
        adjust: std::sync::Arc<Script>,
    }

    fn key(consumer: &str, what: &str) -> String {
        format!("sluice:consumer:{consumer}:{what}")
    }

    impl RedisStore {
        pub fn new(url: &str) -> anyhow::Result<RedisStore> {
            let client =
                redis::Client::open(url).map_err(|e| anyhow::anyhow!("limits.redis_url: {e}"))?;
            Ok(RedisStore {
                client,
                connection: Default::default(),
                admit: std::sync::Arc::new(Script::new(ADMIT)),
                adjust: std::sync::Arc::new(Script::new(ADJUST)),
            })
        }

        /// The shared connection, opened on first use (so the gateway
        /// starts while Redis is down); it reconnects by itself after.
        async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
            self.connection
                .get_or_try_init(|| ConnectionManager::new(self.client.clone()))
                .await
                .cloned()
        }

        pub async fn admit(
            &self,
            consumer: &str,
            limits: &ConsumerLimits,
            want: u64,
            minute: u64,
            day: u64,
            slot: &str,
        ) -> redis::RedisResult<i64> {
            let mut c = self.connection().await?;
            self.admit
                .key(key(consumer, &format!("requests:{minute}")))
                .key(key(consumer, &format!("tokens:{minute}")))
                .key(key(consumer, &format!("tokens-day:{day}")))
                .key(key(consumer, "slots"))
                .arg(limits.requests_per_minute.unwrap_or(0))
                .arg(limits.tokens_per_minute.unwrap_or(0))
                .arg(limits.tokens_per_day.unwrap_or(0))
                .arg(limits.max_concurrent_requests.unwrap_or(0))
                .arg(want)
                .arg(super::now_s())
                .arg(slot)
                .invoke_async(&mut c)
                .await
        }

        pub async fn adjust(
            &self,
            consumer: &str,
            minute: u64,
            day: u64,
            delta: i64,
        ) -> redis::RedisResult<()> {
            let mut c = self.connection().await?;
            let _: i64 = self
                .adjust
                .key(key(consumer, &format!("tokens:{minute}")))
                .key(key(consumer, &format!("tokens-day:{day}")))
                .arg(delta)
                .invoke_async(&mut c)
                .await?;
            Ok(())
        }

        /// Gives `slot` back; giving it back twice changes nothing.
        pub async fn release(&self, consumer: &str, slot: &str) -> redis::RedisResult<()> {
            let mut c = self.connection().await?;
            let _: i64 = c.zrem(key(consumer, "slots"), slot).await?;
            Ok(())
        }

        pub async fn usage(
            &self,
            consumer: &str,
            minute: u64,
            day: u64,
        ) -> redis::RedisResult<(u64, u64, u64, u64)> {
            let mut c = self.connection().await?;
            let values: Vec<Option<i64>> = c
                .mget(&[
                    key(consumer, &format!("requests:{minute}")),
                    key(consumer, &format!("tokens:{minute}")),
                    key(consumer, &format!("tokens-day:{day}")),
                ])
                .await?;
            let slots: u64 = c.zcard(key(consumer, "slots")).await?;
            let at = |i: usize| values.get(i).copied().flatten().unwrap_or(0).max(0) as u64;
            Ok((at(0), at(1), at(2), slots))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumer(limits: ConsumerLimits) -> Consumer {
        Consumer {
            name: "alice".into(),
            key_hashes: vec![],
            models: vec![],
            limits,
            disabled: false,
            managed: false,
        }
    }

    #[tokio::test]
    async fn token_reservations_never_overshoot_by_more_than_one() {
        let limiter = Arc::new(Limiter::new(&LimitsConfig::default()).unwrap());
        let alice = consumer(ConsumerLimits {
            tokens_per_minute: Some(100),
            ..Default::default()
        });
        let first = limiter.admit(&alice, 60).await.unwrap().unwrap();
        assert!(matches!(
            limiter.admit(&alice, 60).await,
            Err(Refusal::Limited {
                code: "rate_limit_exceeded",
                ..
            })
        ));
        first.settle(10);
        let _second = limiter.admit(&alice, 60).await.unwrap().unwrap();
        // Into an empty window a reservation over the limit still runs once.
        let bob = Consumer {
            name: "bob".into(),
            ..consumer(alice.limits.clone())
        };
        assert!(limiter.admit(&bob, 500).await.unwrap().is_some());
        assert!(limiter.admit(&bob, 1).await.is_err());
    }

    #[tokio::test]
    async fn concurrency_slots_come_back_on_drop() {
        let limiter = Arc::new(Limiter::new(&LimitsConfig::default()).unwrap());
        let alice = consumer(ConsumerLimits {
            max_concurrent_requests: Some(1),
            tokens_per_day: Some(1000),
            ..Default::default()
        });
        let one = limiter.admit(&alice, 1).await.unwrap().unwrap();
        assert!(limiter.admit(&alice, 1).await.is_err());
        drop(one);
        let two = limiter.admit(&alice, 999).await.unwrap().unwrap();
        two.settle(999);
        match limiter.admit(&alice, 5).await {
            Err(Refusal::Limited { code, .. }) => assert_eq!(code, "insufficient_quota"),
            other => panic!("{other:?}", other = other.is_ok()),
        }
        assert_eq!(limiter.usage("alice").await.unwrap()["tokens_today"], 1000);
    }
}
