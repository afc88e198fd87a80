//! Step 2, admit: the consumer may use the model it asked for and is within
//! its limits; its share of them (a request, a concurrency slot, the prompt
//! estimate plus `max_tokens`) is reserved now and settled when the answer
//! ends.

use std::sync::Arc;

use bytes::Bytes;

use super::errors::GatewayError;
use crate::accounts::consumers::Consumer;
use crate::accounts::limits::{reservation, Limiter, Refusal, Ticket};
use crate::api::openai::{Endpoint, RequestHead};
use crate::metrics::metrics;

/// Admits the request, returning what it holds of the consumer's limits.
pub async fn admit(
    limiter: &Arc<Limiter>,
    consumer: &Consumer,
    endpoint: Endpoint,
    head: &RequestHead,
    body: &Bytes,
) -> Result<Option<Ticket>, GatewayError> {
    if !consumer.allows(&head.model) {
        metrics().refusal(&consumer.name, "model_not_allowed");
        return Err(GatewayError::ModelNotAllowed {
            consumer: consumer.name.clone(),
            model: head.model.clone(),
        });
    }
    let limits = &consumer.limits;
    let tokens = if limits.tokens_per_minute.is_some() || limits.tokens_per_day.is_some() {
        reservation(
            body,
            endpoint == Endpoint::Embeddings,
            limiter.default_max_tokens,
        )
        .await
    } else {
        0
    };
    limiter.admit(consumer, tokens).await.map_err(|refusal| {
        let code = match &refusal {
            Refusal::Limited { code, .. } => code,
            Refusal::StoreDown(_) => "rate_limiter_unavailable",
        };
        metrics().refusal(&consumer.name, code);
        GatewayError::from(refusal)
    })
}
