//! Accounting of one request, from arrival to the last byte of its answer:
//! tokens (as the backend reported them, or counted with a tokenizer and
//! marked estimated), time to first token, latency, tokens per second. When
//! the request ends — or the client goes away — the record goes to the
//! usage store, the metrics and the access log, never blocking the request.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::Value;

use crate::metrics::metrics;
use crate::text::LogSafe;
use crate::usage::{now_ms, UsageRecord, UsageStore};

/// Answer text kept for estimating tokens when a backend reports none.
const MAX_ANSWER_TEXT: usize = 4 << 20;

/// Where records go.
#[derive(Clone)]
pub struct Ledger {
    pub store: Option<UsageStore>,
    /// One structured log line per request (no prompt text).
    pub access_log: bool,
}

pub struct Accounting {
    ledger: Arc<Ledger>,
    record: UsageRecord,
    started: Instant,
    first_token: Option<Instant>,
    reported: Option<(u64, u64)>,
    answer_text: String,
    request_body: Bytes,
    /// The consumer's reservation, settled with the real count at the end.
    ticket: Option<crate::accounts::limits::Ticket>,
    finished: bool,
    /// The client asked for a stream's `usage` chunk: if the backend sends
    /// none (llama.cpp's server ignores the option), the gateway writes one
    /// from its estimate, in the envelope of the chunks it relayed.
    wants_usage: bool,
    envelope: Option<Envelope>,
    /// `reported` is the gateway's estimate, not the backend's count.
    reported_estimated: bool,
}

/// The fields every chunk of a stream repeats, kept to write the usage
/// chunk a backend left out.
struct Envelope {
    id: String,
    object: String,
    created: u64,
    model: String,
}

impl Accounting {
    pub fn start(
        ledger: Arc<Ledger>,
        request_id: u64,
        endpoint: &str,
        model: &str,
        stream: bool,
        consumer: Option<String>,
        body: Bytes,
    ) -> Accounting {
        Accounting {
            ledger,
            record: UsageRecord {
                at_ms: now_ms(),
                request_id,
                consumer,
                endpoint: endpoint.to_string(),
                model_requested: model.to_string(),
                model_answered: None,
                backend: None,
                status: 0,
                stream,
                prompt_tokens: 0,
                completion_tokens: 0,
                estimated: false,
                ttft_ms: None,
                latency_ms: 0.0,
                tokens_per_second: None,
                filtered: false,
                fell_back: false,
            },
            started: Instant::now(),
            first_token: None,
            reported: None,
            answer_text: String::new(),
            request_body: body,
            ticket: None,
            finished: false,
            wants_usage: false,
            envelope: None,
            reported_estimated: false,
        }
    }

    /// The client asked for the final `usage` chunk of its stream.
    pub fn client_wants_usage(&mut self) {
        self.wants_usage = true;
    }

    /// The stream reached its end and the client, who asked for usage, has
    /// none from the backend: the gateway must supply it.
    pub fn usage_missing(&self) -> bool {
        self.wants_usage && self.reported.is_none()
    }

    /// The count of the prompt and of the answer so far, to run off the
    /// executor (a multi-MiB prompt takes real CPU).
    pub fn estimator(&self) -> impl FnOnce() -> (u64, u64) + Send + 'static {
        let body = self.request_body.clone();
        let text = self.answer_text.clone();
        let embeddings = self.record.endpoint == "embeddings";
        move || estimate(&body, &text, embeddings)
    }

    /// Takes the estimate as the request's usage and returns the usage
    /// chunk to send before `[DONE]`, in the stream's own envelope.
    pub fn supply_usage(&mut self, (prompt, completion): (u64, u64)) -> Bytes {
        self.reported = Some((prompt, completion));
        self.reported_estimated = true;
        let chat = self.record.endpoint != "completions";
        let envelope = self.envelope.take().unwrap_or_else(|| Envelope {
            id: format!("sluice-{}", self.record.request_id),
            object: String::new(),
            created: now_secs(),
            model: self
                .record
                .model_answered
                .clone()
                .unwrap_or_else(|| self.record.model_requested.clone()),
        });
        let object = if envelope.object.is_empty() {
            if chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            }
        } else {
            envelope.object.as_str()
        };
        let chunk = serde_json::json!({
            "id": envelope.id,
            "object": object,
            "created": envelope.created,
            "model": envelope.model,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        });
        crate::api::sse::event(&chunk.to_string())
    }

    /// Keeps the consumer's admission until the request ends.
    pub fn hold(&mut self, ticket: Option<crate::accounts::limits::Ticket>) {
        self.ticket = ticket;
    }

    /// A backend answered with `status`.
    pub fn answered(&mut self, backend: &str, model: &str, status: u16) {
        self.record.backend = Some(backend.to_string());
        self.record.fell_back = model != self.record.model_requested;
        self.record.model_answered = Some(model.to_string());
        self.record.status = status;
    }

    pub fn set_status(&mut self, status: u16) {
        self.record.status = status;
    }

    pub fn filtered(&mut self) {
        self.record.filtered = true;
    }

    /// Looks at one streamed chunk: the first text marks the first token,
    /// `usage` is what the backend reports. True when the chunk is the
    /// usage-only chunk (`choices` empty).
    pub fn on_chunk(&mut self, chunk: &Value) -> bool {
        if let Some(choices) = chunk["choices"].as_array() {
            for choice in choices {
                let text = choice["delta"]["content"]
                    .as_str()
                    .or(choice["text"].as_str())
                    .unwrap_or("");
                if !text.is_empty() {
                    self.first_token.get_or_insert_with(Instant::now);
                    self.keep_text(text);
                }
            }
        }
        if self.wants_usage && self.envelope.is_none() {
            let text = |key: &str| chunk[key].as_str().unwrap_or_default().to_string();
            self.envelope = Some(Envelope {
                id: text("id"),
                object: text("object"),
                created: chunk["created"].as_u64().unwrap_or_else(now_secs),
                model: text("model"),
            });
        }
        self.note_usage(&chunk["usage"]);
        chunk["choices"].as_array().is_some_and(Vec::is_empty) && chunk["usage"].is_object()
    }

    /// `on_chunk` for a chunk still in its JSON text: read through a typed
    /// view that borrows the text instead of building a tree (most of the
    /// cost of relaying a stream was that tree); a chunk of an unusual shape
    /// takes the general path.
    pub fn on_chunk_json(&mut self, data: &str) -> bool {
        let Ok(peek) = serde_json::from_str::<Peek>(data) else {
            return match serde_json::from_str::<Value>(data) {
                Ok(chunk) => self.on_chunk(&chunk),
                Err(_) => false,
            };
        };
        for choice in peek.choices.iter().flatten() {
            let text = choice.delta.as_ref().and_then(|d| d.content.as_deref());
            let text = text.or(choice.text.as_deref()).unwrap_or("");
            if !text.is_empty() {
                self.first_token.get_or_insert_with(Instant::now);
                self.keep_text(text);
            }
        }
        if self.wants_usage && self.envelope.is_none() {
            self.envelope = Some(Envelope {
                id: peek.id.unwrap_or_default().into_owned(),
                object: peek.object.unwrap_or_default().into_owned(),
                created: peek.created.unwrap_or_else(now_secs),
                model: peek.model.unwrap_or_default().into_owned(),
            });
        }
        self.note_peeked_usage(peek.usage.as_ref());
        peek.choices.is_some_and(|c| c.is_empty()) && peek.usage.is_some()
    }

    /// Looks at a whole (non-streamed) answer.
    pub fn on_answer(&mut self, answer: &[u8]) {
        if let Ok(peek) = serde_json::from_slice::<Peek>(answer) {
            for choice in peek.choices.iter().flatten() {
                let text = choice.message.as_ref().and_then(|m| m.content.as_deref());
                if let Some(text) = text.or(choice.text.as_deref()) {
                    self.keep_text(text);
                }
            }
            return self.note_peeked_usage(peek.usage.as_ref());
        }
        let Ok(answer) = serde_json::from_slice::<Value>(answer) else {
            return;
        };
        if let Some(choices) = answer["choices"].as_array() {
            for choice in choices {
                if let Some(text) = choice["message"]["content"]
                    .as_str()
                    .or(choice["text"].as_str())
                {
                    self.keep_text(text);
                }
            }
        }
        self.note_usage(&answer["usage"]);
    }

    fn keep_text(&mut self, text: &str) {
        if self.answer_text.len() + text.len() <= MAX_ANSWER_TEXT {
            self.answer_text.push_str(text);
        }
    }

    fn note_usage(&mut self, usage: &Value) {
        if let (Some(prompt), completion) = (
            usage["prompt_tokens"].as_u64(),
            usage["completion_tokens"].as_u64(),
        ) {
            self.reported = Some((prompt, completion.unwrap_or(0)));
        }
    }

    fn note_peeked_usage(&mut self, usage: Option<&PeekUsage>) {
        if let Some(PeekUsage {
            prompt_tokens: Some(prompt),
            completion_tokens,
        }) = usage
        {
            self.reported = Some((*prompt, completion_tokens.unwrap_or(0)));
        }
    }

    /// Ends the request's accounting (also done on drop, e.g. when the
    /// client disconnects mid-stream).
    pub fn finish(mut self) {
        self.close();
    }

    fn close(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let now = Instant::now();
        let mut record = self.record.clone();
        record.latency_ms = ms(now - self.started);
        record.ttft_ms = self.first_token.map(|t| ms(t - self.started));
        let generation = self.first_token.map(|t| now - t);
        let ledger = self.ledger.clone();
        let ticket = self.ticket.take();
        match self.reported {
            Some((prompt, completion)) => {
                record.prompt_tokens = prompt;
                record.completion_tokens = completion;
                record.estimated = self.reported_estimated;
                settle(&ledger, record, generation, ticket);
            }
            None if record.status >= 400 || record.status == 0 => {
                settle(&ledger, record, generation, ticket)
            }
            None => {
                // Counting a multi-MiB prompt takes real CPU: never on the
                // executor's threads.
                let body = std::mem::take(&mut self.request_body);
                let text = std::mem::take(&mut self.answer_text);
                let endpoint_embeddings = record.endpoint == "embeddings";
                let handle = tokio::runtime::Handle::try_current();
                let count = move || {
                    let mut record = record;
                    (record.prompt_tokens, record.completion_tokens) =
                        estimate(&body, &text, endpoint_embeddings);
                    record.estimated = true;
                    settle(&ledger, record, generation, ticket);
                };
                match handle {
                    Ok(handle) => drop(handle.spawn_blocking(count)),
                    Err(_) => count(),
                }
            }
        }
    }
}

fn now_secs() -> u64 {
    u64::try_from(now_ms() / 1000).unwrap_or(0)
}

/// Tokens of a prompt (the request body) and of an answer's text, counted
/// with the tokenizer.
fn estimate(body: &[u8], answer_text: &str, embeddings: bool) -> (u64, u64) {
    let prompt = serde_json::from_slice::<Value>(body)
        .map(|body| crate::api::tokens::count_prompt(&body))
        .unwrap_or(0);
    let completion = if embeddings {
        0
    } else {
        crate::api::tokens::count_answer_text(answer_text)
    };
    (prompt, completion)
}

/// The parts of a chunk or an answer the accounting reads; everything else
/// is skipped without being built.
#[derive(serde::Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    object: Option<Cow<'a, str>>,
    #[serde(default)]
    created: Option<u64>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: Option<Vec<PeekChoice<'a>>>,
    #[serde(default)]
    usage: Option<PeekUsage>,
}

#[derive(serde::Deserialize)]
struct PeekChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<PeekContent<'a>>,
    #[serde(borrow, default)]
    message: Option<PeekContent<'a>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct PeekContent<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct PeekUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

impl Drop for Accounting {
    fn drop(&mut self) {
        if !self.finished && self.record.status == 0 {
            // The client went away before an answer: 499, as nginx says.
            self.record.status = 499;
        }
        self.close();
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The consumer's reservation, metrics, the access log line, and the usage
/// store.
fn settle(
    ledger: &Ledger,
    mut record: UsageRecord,
    generation: Option<std::time::Duration>,
    ticket: Option<crate::accounts::limits::Ticket>,
) {
    if let Some(ticket) = ticket {
        ticket.settle(record.prompt_tokens + record.completion_tokens);
    }
    if let Some(generation) = generation.filter(|g| !g.is_zero() && record.completion_tokens > 1) {
        record.tokens_per_second = Some(record.completion_tokens as f64 / generation.as_secs_f64());
    }
    metrics().request(&record.finished());
    crate::usage::live::record(&record);
    if ledger.access_log {
        tracing::info!(
            target: "sluice::access",
            request_id = record.request_id,
            endpoint = %record.endpoint,
            // Client-chosen (or derived) text, escaped: one request, one line.
            model = %LogSafe(&record.model_requested),
            model_answered = %LogSafe(record.model_answered.as_deref().unwrap_or("")),
            backend = %LogSafe(record.backend.as_deref().unwrap_or("")),
            consumer = %LogSafe(record.consumer.as_deref().unwrap_or("")),
            status = record.status,
            stream = record.stream,
            prompt_tokens = record.prompt_tokens,
            completion_tokens = record.completion_tokens,
            estimated = record.estimated,
            ttft_ms = record.ttft_ms.unwrap_or(0.0),
            latency_ms = record.latency_ms,
            tokens_per_second = record.tokens_per_second.unwrap_or(0.0),
            filtered = record.filtered,
            fell_back = record.fell_back,
            "request"
        );
    }
    if let Some(store) = &ledger.store {
        store.record(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> Accounting {
        let ledger = Arc::new(Ledger {
            store: None,
            access_log: false,
        });
        Accounting::start(ledger, 1, "chat", "m", true, None, Bytes::new())
    }

    /// The typed view reads what the general path reads, whatever the shape.
    #[test]
    fn the_typed_view_agrees_with_the_general_path() {
        let chunks = [
            r#"{"choices":[{"index":0,"delta":{"content":"Hel\"lo"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":null},"text":"x"}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":[{"type":"text"}]}}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":7.5}}"#,
            r#"{"choices":null,"usage":null}"#,
            r#"{"choices":[{"text":"plain"}],"usage":{"completion_tokens":2}}"#,
            r#"{"choices":[{"delta":{"content":"a"}}],"choices":[]}"#,
            r#"[1,2]"#,
            r#"not json"#,
        ];
        for chunk in chunks {
            let (mut typed, mut general) = (fresh(), fresh());
            let a = typed.on_chunk_json(chunk);
            let b = serde_json::from_str::<Value>(chunk).is_ok_and(|v| general.on_chunk(&v));
            assert_eq!(a, b, "{chunk}");
            assert_eq!(typed.reported, general.reported, "{chunk}");
            assert_eq!(typed.answer_text, general.answer_text, "{chunk}");
            assert_eq!(
                typed.first_token.is_some(),
                general.first_token.is_some(),
                "{chunk}"
            );
        }
    }

    #[test]
    fn a_whole_answer_is_read_through_the_typed_view() {
        let mut acct = fresh();
        acct.on_answer(
            br#"{"choices":[{"message":{"role":"assistant","content":"Hi there"}}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#,
        );
        assert_eq!(acct.reported, Some((5, 2)));
        assert_eq!(acct.answer_text, "Hi there");
    }
}
