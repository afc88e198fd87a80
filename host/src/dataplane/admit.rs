//! Step 2, admit: the consumer may use the model it asked for and is within
//! its limits; its share of them (a request, a concurrency slot, the prompt
//! estimate plus `max_tokens`) is reserved now and settled when the answer
//! ends. The prompt is also cut into blocks and hashed here, once, for
//! prefix-cache affinity (`[prefix_cache]`): the policies compare backends
//! on it and the backend that serves the request is credited with it.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::errors::GatewayError;
use crate::accounts::consumers::Consumer;
use crate::accounts::limits::{reservation, Limiter, Refusal, Ticket};
use crate::api::openai::{Endpoint, RequestHead};
use crate::api::prefix::PromptBlocks;
use crate::config::PrefixCacheConfig;
use crate::metrics::metrics;

/// Bodies at least this large are parsed, counted and hashed off the
/// executor's threads.
const OFF_EXECUTOR: usize = 64 << 10;

/// What admission holds for the later steps.
pub struct Admitted {
    /// The consumer's reserved share of its limits (none when auth is off).
    pub ticket: Option<Ticket>,
    /// The prompt's blocks (empty when prefix indexing is off).
    pub prompt: PromptBlocks,
}

/// Admits the request, returning what it holds of the consumer's limits
/// and its prompt's blocks. The body is parsed (once) only when a token
/// limit needs its prompt counted or the prefix index is on.
pub async fn admit(
    limiter: &Arc<Limiter>,
    consumer: Option<&Consumer>,
    endpoint: Endpoint,
    head: &RequestHead,
    body: &Bytes,
    prefix: &PrefixCacheConfig,
) -> Result<Admitted, GatewayError> {
    if let Some(consumer) = consumer {
        if !consumer.allows(&head.model) {
            metrics().refusal(&consumer.name, "model_not_allowed");
            return Err(GatewayError::ModelNotAllowed {
                consumer: consumer.name.clone(),
                model: head.model.clone(),
            });
        }
    }
    let count = consumer
        .is_some_and(|c| c.limits.tokens_per_minute.is_some() || c.limits.tokens_per_day.is_some());
    let embeddings = endpoint == Endpoint::Embeddings;
    let hash = prefix.enabled && !embeddings;
    let (block_bytes, default_max_tokens) = (prefix.block_bytes, limiter.default_max_tokens);
    let read = move |body: &[u8]| -> (u64, PromptBlocks) {
        if !count && !hash {
            return (0, PromptBlocks::default());
        }
        let value = serde_json::from_slice::<Value>(body).ok();
        let tokens = if count {
            reservation(value.as_ref(), embeddings, default_max_tokens)
        } else {
            0
        };
        let prompt = match value.as_ref().filter(|_| hash) {
            Some(value) => PromptBlocks::of(value, block_bytes),
            None => PromptBlocks::default(),
        };
        (tokens, prompt)
    };
    let (tokens, prompt) = if body.len() < OFF_EXECUTOR {
        read(body)
    } else {
        let body = body.clone();
        tokio::task::spawn_blocking(move || read(&body))
            .await
            .unwrap_or((default_max_tokens, PromptBlocks::default()))
    };
    let Some(consumer) = consumer else {
        return Ok(Admitted {
            ticket: None,
            prompt,
        });
    };
    let ticket = limiter.admit(consumer, tokens).await.map_err(|refusal| {
        let code = match &refusal {
            Refusal::Limited { code, .. } => code,
            Refusal::StoreDown(_) => "rate_limiter_unavailable",
        };
        metrics().refusal(&consumer.name, code);
        GatewayError::from(refusal)
    })?;
    Ok(Admitted { ticket, prompt })
}
