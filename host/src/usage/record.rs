//! One request's usage, as the request path hands it to the store.

use std::time::{SystemTime, UNIX_EPOCH};

/// One request's usage, as the gateway records it when the request ends.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UsageRecord {
    /// Unix milliseconds when the request arrived.
    pub at_ms: i64,
    pub request_id: u64,
    pub consumer: Option<String>,
    /// `"chat.completions"`, `"completions"` or `"embeddings"`.
    pub endpoint: String,
    pub model_requested: String,
    pub model_answered: Option<String>,
    pub backend: Option<String>,
    pub status: u16,
    pub stream: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The counts came from our tokenizer, not from the backend.
    pub estimated: bool,
    /// Time to first token (streams).
    pub ttft_ms: Option<f64>,
    pub latency_ms: f64,
    /// Completion tokens / generation time.
    pub tokens_per_second: Option<f64>,
    /// A response filter changed or stopped the answer.
    pub filtered: bool,
    /// Answered by another model than the one requested.
    pub fell_back: bool,
}

impl UsageRecord {
    /// What the Prometheus metrics count of this record.
    pub fn finished(&self) -> crate::metrics::Finished<'_> {
        crate::metrics::Finished {
            model_answered: self.model_answered.as_deref(),
            backend: self.backend.as_deref(),
            consumer: self.consumer.as_deref(),
            status: self.status,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            ttft_ms: self.ttft_ms,
            latency_ms: self.latency_ms,
            tokens_per_second: self.tokens_per_second,
        }
    }
}

/// Unix milliseconds now, for [`UsageRecord::at_ms`].
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
