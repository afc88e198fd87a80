//! Answers on their way back: through the chain's response hooks, and past
//! the request's accounting. The host does the framing and the guest sees
//! text: for a stream, each chunk's `delta.content` (or `text`) plus what
//! was held back, holding back only as many characters as the policies
//! asked for, so a word split across chunks is still seen whole and time to
//! first token barely moves. Without response hooks a stream's events pass
//! byte for byte, except the `usage` chunk the gateway asked for on the
//! client's behalf, which is read and removed.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{header, Response};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::api::openai::Endpoint;
use crate::api::render::{self, ApiShape};
use crate::api::sse;
use crate::dataplane::accounting::Accounting;
use crate::dataplane::body::idle::BackendBody;
use crate::dataplane::body::Body;
use crate::dataplane::errors::GatewayError;
use crate::dataplane::forward::Answer;
use crate::policy::{Filtered, KeptInstances, Route, Scope};

/// The largest non-streamed answer that is filtered (it must be read whole).
const MAX_WHOLE_ANSWER: usize = 64 << 20;

/// Everything a filtered answer needs, owned, so a stream's task can outlive
/// the request handler.
pub struct Filter {
    pub scope: Scope,
    pub route: Route,
    /// Characters the response hooks need held back; `None`: no hooks.
    pub holdback: Option<usize>,
    /// The client did not ask for the stream's `usage` chunk; the gateway
    /// did, for its accounting, and removes it.
    pub strip_usage: bool,
}

impl Filter {
    fn chat(&self) -> bool {
        self.route.info.endpoint == Endpoint::ChatCompletions
    }

    async fn text(
        &self,
        kept: &mut KeptInstances,
        choice: u32,
        text: String,
        last: bool,
    ) -> Filtered {
        self.scope
            .filter_text(&self.route, kept, choice, text, last)
            .await
    }

    /// Relays a streamed answer in a task that feeds the client's body.
    pub fn stream(self, answer: Answer, acct: Accounting) -> Response<Body> {
        let Answer {
            mut parts,
            first,
            incoming,
            slot,
            ..
        } = answer;
        parts.headers.remove(header::CONTENT_LENGTH);
        if self.holdback.is_none() {
            let relay = crate::dataplane::body::relay::Relay::new(
                first,
                incoming,
                slot,
                acct,
                self.strip_usage,
            );
            return Response::from_parts(parts, Body::Relay(Box::new(relay)));
        }
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            // Dropping the backend's body at the end (or on a stop) closes
            // its connection and frees its slot.
            let _slot = slot;
            self.pump(first, incoming, tx, acct).await;
        });
        Response::from_parts(parts, Body::Channel(rx))
    }

    async fn pump(
        &self,
        first: Option<Bytes>,
        mut incoming: BackendBody,
        tx: mpsc::Sender<Bytes>,
        acct: Accounting,
    ) {
        let mut parser = sse::Parser::default();
        let mut state = StreamState {
            pending: BTreeMap::new(),
            envelope: None,
            done: false,
            acct,
            kept: KeptInstances::default(),
        };
        let mut next = first;
        loop {
            let bytes = match next.take() {
                Some(bytes) => bytes,
                // A client that leaves while the backend is silent (a long
                // prefill, a hung stream) must not hold the slot until the
                // backend's next byte: returning drops the backend's body.
                None => match tokio::select! {
                    frame = incoming.frame() => frame,
                    () = tx.closed() => return,
                } {
                    None => break,
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => data,
                        Err(_) => continue,
                    },
                    Some(Err(e)) => return self.fail(&mut state, &tx, &e.to_string()).await,
                },
            };
            let events = match parser.push(&bytes) {
                Ok(events) => events,
                Err(e) => return self.fail(&mut state, &tx, &e.to_string()).await,
            };
            // What one read completed leaves in one write.
            let mut batch = Vec::new();
            let mut stop = false;
            for event in events {
                let (out, end) = self.event(&mut state, event).await;
                batch.extend(out);
                if end {
                    stop = true;
                    break;
                }
            }
            if let Some(bytes) = sse::concat(batch) {
                if tx.send(bytes).await.is_err() {
                    return;
                }
            }
            if stop {
                return;
            }
        }
        let mut out = Vec::new();
        if let Some(event) = parser.finish() {
            out.extend(self.event(&mut state, event).await.0);
        }
        if !state.done {
            out.extend(self.flush(&mut state).await.0);
        }
        for piece in out {
            if tx.send(piece).await.is_err() {
                return;
            }
        }
    }

    /// Ends a stream whose backend failed: the text held back so far
    /// (through the filters as the last of it — the client has the rest),
    /// then the error event and `[DONE]`.
    async fn fail(&self, state: &mut StreamState, tx: &mpsc::Sender<Bytes>, detail: &str) {
        let (mut out, stopped) = self.flush(state).await;
        if !stopped {
            out.push(crate::dataplane::body::stream_error(detail));
        }
        for piece in out {
            if tx.send(piece).await.is_err() {
                return;
            }
        }
    }

    /// What to send for one backend event, and whether the stream ends.
    async fn event(&self, state: &mut StreamState, event: sse::Event) -> (Vec<Bytes>, bool) {
        let Some(data) = event.data.as_deref() else {
            return (vec![event.raw], false);
        };
        if data.trim() == "[DONE]" {
            let (mut out, stopped) = self.flush(state).await;
            if !stopped {
                if state.acct.usage_missing() {
                    if let Ok(counted) = tokio::task::spawn_blocking(state.acct.estimator()).await {
                        out.push(state.acct.supply_usage(counted));
                    }
                }
                out.push(Bytes::from_static(sse::DONE));
            }
            state.done = true;
            return (out, true);
        }
        let Ok(mut chunk) = serde_json::from_str::<Value>(data) else {
            return (vec![event.raw], false);
        };
        if state.acct.on_chunk(&chunk) && self.strip_usage {
            return (Vec::new(), false);
        }
        let Some(holdback) = self.holdback else {
            return (vec![event.raw], false);
        };
        let Some(choices) = chunk.get_mut("choices").and_then(Value::as_array_mut) else {
            return (vec![event.raw], false);
        };
        if choices.is_empty() {
            return (vec![event.raw], false);
        }
        let envelope = envelope_of(&chunk);
        let chat = self.chat();
        let count = chunk["choices"].as_array().map_or(0, Vec::len);
        for i in 0..count {
            let choice = &mut chunk["choices"][i];
            let index = choice["index"].as_u64().unwrap_or(0) as u32;
            let finished = !choice["finish_reason"].is_null();
            // Indexing mutably into a number or a string panics: a chunk
            // of the wrong shape passes as it is.
            if !has_text_field(choice, chat, "delta") {
                continue;
            }
            let field = text_field(choice, chat);
            let new_text = field.as_str().unwrap_or("").to_string();
            if new_text.is_empty() && !finished {
                continue;
            }
            let mut text = state.pending.remove(&index).unwrap_or_default();
            text.push_str(&new_text);
            if text.is_empty() {
                continue;
            }
            let original_len = text.len();
            match self
                .text(&mut state.kept, index, text.clone(), finished)
                .await
            {
                Filtered::Text(filtered) => {
                    if filtered.len() != original_len || filtered != text {
                        state.acct.filtered();
                    }
                    let (release, keep) = if finished {
                        (filtered, String::new())
                    } else {
                        split_tail(filtered, holdback)
                    };
                    if !keep.is_empty() {
                        state.pending.insert(index, keep);
                    }
                    *text_field(&mut chunk["choices"][i], chat) = Value::String(release);
                }
                Filtered::Stop(error) => {
                    state.acct.filtered();
                    tracing::info!(request = self.route.info.id, %error, "response filter stopped the stream");
                    return (
                        render::stopped_stream(ApiShape::OpenAi, &envelope, index, chat).to_vec(),
                        true,
                    );
                }
            }
        }
        state.envelope = Some(envelope);
        (vec![sse::event(&chunk.to_string())], false)
    }

    /// Runs what is still held back through the filters one last time and
    /// sends it as a chunk of its own.
    async fn flush(&self, state: &mut StreamState) -> (Vec<Bytes>, bool) {
        let chat = self.chat();
        let envelope = state
            .envelope
            .clone()
            .unwrap_or_else(|| serde_json::json!({}));
        let mut out = Vec::new();
        for (index, text) in std::mem::take(&mut state.pending) {
            match self.text(&mut state.kept, index, text, true).await {
                Filtered::Text(release) if release.is_empty() => {}
                Filtered::Text(release) => {
                    let mut chunk = envelope.clone();
                    let mut choice = serde_json::json!({"index": index, "finish_reason": null});
                    *text_field(&mut choice, chat) = Value::String(release);
                    chunk["choices"] = Value::Array(vec![choice]);
                    out.push(sse::event(&chunk.to_string()));
                }
                Filtered::Stop(_) => {
                    state.acct.filtered();
                    out.extend(render::stopped_stream(
                        ApiShape::OpenAi,
                        &envelope,
                        index,
                        chat,
                    ));
                    return (out, true);
                }
            }
        }
        (out, false)
    }

    /// Filters a non-streamed answer: read whole (bounded), each choice's
    /// text through the filters, re-encoded.
    pub async fn whole(
        self,
        answer: Answer,
        mut acct: Accounting,
    ) -> Result<Response<Body>, GatewayError> {
        let Answer {
            mut parts,
            first,
            incoming,
            slot,
            backend,
            ..
        } = answer;
        let mut bytes = first.map(|b| b.to_vec()).unwrap_or_default();
        let mut limited = http_body_util::Limited::new(incoming, MAX_WHOLE_ANSWER);
        while let Some(frame) = limited.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        bytes.extend_from_slice(&data);
                    }
                }
                Err(e) => {
                    return Err(GatewayError::BackendUnreachable {
                        backend: backend.name.to_string(),
                        detail: format!("the answer broke off: {e}"),
                    })
                }
            }
        }
        drop(slot);
        acct.on_answer(&bytes);
        let Ok(mut answer) = serde_json::from_slice::<Value>(&bytes) else {
            return Ok(Response::from_parts(parts, Body::full(bytes)));
        };
        let chat = self.chat();
        let mut kept = KeptInstances::default();
        let count = answer["choices"].as_array().map_or(0, Vec::len);
        for i in 0..count {
            let choice = &mut answer["choices"][i];
            let index = choice["index"].as_u64().unwrap_or(0) as u32;
            if !has_text_field(choice, chat, "message") {
                continue;
            }
            let field = if chat {
                &mut choice["message"]["content"]
            } else {
                &mut choice["text"]
            };
            let Some(text) = field.as_str().map(str::to_string) else {
                continue;
            };
            match self.text(&mut kept, index, text, true).await {
                Filtered::Text(filtered) => {
                    *text_field_whole(&mut answer["choices"][i], chat) = Value::String(filtered)
                }
                Filtered::Stop(error) => return Err(error.into()),
            }
        }
        parts.headers.remove(header::CONTENT_LENGTH);
        Ok(Response::from_parts(parts, Body::json(&answer)))
    }
}

struct StreamState {
    /// Text held back per choice index.
    pending: BTreeMap<u32, String>,
    /// The last chunk's fields other than `choices`, to frame chunks the
    /// host writes itself.
    envelope: Option<Value>,
    done: bool,
    /// Finishes (on drop) when the relay ends, however it ends.
    acct: Accounting,
    /// The response hooks' instances, kept from chunk to chunk.
    kept: KeptInstances,
}

fn envelope_of(chunk: &Value) -> Value {
    let mut envelope = chunk.clone();
    if let Some(object) = envelope.as_object_mut() {
        object.remove("choices");
        object.remove("usage");
    }
    envelope
}

/// Whether `choice` can hold its text where the filters write it: an
/// object whose `outer` (`delta` or `message`, for chat) is an object or
/// absent.
fn has_text_field(choice: &Value, chat: bool, outer: &str) -> bool {
    let Some(choice) = choice.as_object() else {
        return false;
    };
    !chat
        || choice
            .get(outer)
            .is_none_or(|v| v.is_object() || v.is_null())
}

/// The field holding a streamed choice's text.
fn text_field(choice: &mut Value, chat: bool) -> &mut Value {
    if chat {
        &mut choice["delta"]["content"]
    } else {
        &mut choice["text"]
    }
}

fn text_field_whole(choice: &mut Value, chat: bool) -> &mut Value {
    if chat {
        &mut choice["message"]["content"]
    } else {
        &mut choice["text"]
    }
}

/// Splits off the last `keep` characters: (released, held back).
fn split_tail(text: String, keep: usize) -> (String, String) {
    let chars = text.chars().count();
    if chars <= keep {
        return (String::new(), text);
    }
    let at = text
        .char_indices()
        .nth(chars - keep)
        .map_or(text.len(), |(i, _)| i);
    let held = text[at..].to_string();
    let mut released = text;
    released.truncate(at);
    (released, held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_of_the_wrong_shape_are_left_alone() {
        // Found by fuzzing: `{"choices":[{"delta":5}]}` from a backend
        // panicked the relay of a filtered stream.
        let no = |v: Value, chat| !has_text_field(&v, chat, "delta");
        assert!(no(serde_json::json!(5), true));
        assert!(no(serde_json::json!("x"), false));
        assert!(no(serde_json::json!({"delta": 5}), true));
        assert!(no(serde_json::json!({"delta": [1]}), true));
        assert!(has_text_field(
            &serde_json::json!({"delta": 5, "text": "t"}),
            false,
            "delta"
        ));
        assert!(has_text_field(
            &serde_json::json!({"delta": null}),
            true,
            "delta"
        ));
        assert!(has_text_field(
            &serde_json::json!({"index": 0}),
            true,
            "delta"
        ));
    }

    #[test]
    fn tails_split_on_characters() {
        assert_eq!(
            split_tail("héllo wörld".into(), 3),
            ("héllo wö".into(), "rld".into())
        );
        assert_eq!(
            split_tail("敏感词汇".into(), 2),
            ("敏感".into(), "词汇".into())
        );
        assert_eq!(split_tail("ab".into(), 5), ("".into(), "ab".into()));
        assert_eq!(split_tail("ab".into(), 0), ("ab".into(), "".into()));
    }
}

/// The relay against a real backend connection: a blocking fake on a
/// thread, hyper's client, the bundled policies.
#[cfg(test)]
mod relay_tests {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    use serde_json::json;

    use super::Filter;
    use crate::api::openai::Endpoint;
    use crate::config::{BackendConfig, OnError, PolicyConfig, PolicyRuntimeConfig};
    use crate::dataplane::accounting::{Accounting, Ledger};
    use crate::dataplane::forward::Answer;
    use crate::fleet::Fleet;
    use crate::policy::contract::RequestInfo;
    use crate::policy::{Chain, Route, Runtime, Scope};

    const HEAD: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

    fn hello_chunk() -> Vec<u8> {
        let event = format!(
            "data: {}\n\n",
            json!({"choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": null}]})
        );
        format!("{:x}\r\n{event}\r\n", event.len()).into_bytes()
    }

    /// Starts a relay of what `backend` (run on its own thread, after the
    /// request was read) sends; `mask`: through `builtin:sensitive-words`.
    async fn relay(
        mask: bool,
        backend: impl FnOnce(std::net::TcpStream) + Send + 'static,
    ) -> (
        http::Response<crate::dataplane::body::Body>,
        Arc<crate::fleet::backends::Backend>,
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            backend(stream);
        });
        let runtime = Arc::new(Runtime::new(&PolicyRuntimeConfig::default()).unwrap());
        let fleet = Arc::new(
            Fleet::new(&[BackendConfig {
                name: "b".into(),
                url: format!("http://{addr}"),
                models: vec!["m".into()],
                max_concurrent_requests: 1,
                weight: 1,
                api_key: None,
                health_path: None,
                engine: Default::default(),
                metrics_url: None,
            }])
            .unwrap(),
        );
        let mut policies = vec![PolicyConfig {
            name: "router".into(),
            module: "builtin:model-router".into(),
            config: json!({}),
            on_error: OnError::FailClosed,
        }];
        if mask {
            policies.insert(
                0,
                PolicyConfig {
                    name: "words".into(),
                    module: "builtin:sensitive-words".into(),
                    config: json!({"words": ["secret"], "action": "mask", "scope": "response"}),
                    on_error: OnError::FailClosed,
                },
            );
        }
        let chain = Arc::new(Chain::load(&runtime, &fleet, &policies).await.unwrap());
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = http::Request::post("/v1/chat/completions")
            .header("host", "b")
            .body(Empty::new())
            .unwrap();
        let (parts, mut incoming) = sender.send_request(request).await.unwrap().into_parts();
        let first = incoming.frame().await.unwrap().unwrap().into_data().ok();
        let backend = fleet.backends()[0].clone();
        let answer = Answer {
            slot: backend.try_acquire().unwrap(),
            backend: backend.clone(),
            model: "m".into(),
            parts,
            first,
            incoming: super::BackendBody::new(incoming, std::time::Duration::from_secs(60)),
        };
        let filter = Filter {
            holdback: chain.response_holdback(),
            scope: Scope {
                runtime,
                fleet,
                chain,
            },
            route: Route {
                idempotent: true,
                targets: Vec::new(),
                info: RequestInfo {
                    id: 1,
                    endpoint: Endpoint::ChatCompletions,
                    path: "/v1/chat/completions".into(),
                    model: "m".into(),
                    stream: true,
                    consumer: None,
                    body_size: 2,
                },
                headers: Arc::new(http::HeaderMap::new()),
                body: Bytes::from_static(b"{}"),
                prefix: Default::default(),
            },
            strip_usage: false,
        };
        let ledger = Arc::new(Ledger {
            store: None,
            access_log: false,
        });
        let acct = Accounting::start(ledger, 1, "chat.completions", "m", true, None, Bytes::new());
        (filter.stream(answer, acct), backend)
    }

    /// A backend breaking off mid-stream: the text held back for the
    /// filters still reaches the client, before the error event.
    #[tokio::test]
    async fn held_text_is_flushed_before_the_error_event() {
        let (response, _) = relay(true, |mut stream| {
            stream.write_all(HEAD).unwrap();
            stream.write_all(&hello_chunk()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            // Closed with the chunked body unfinished.
        })
        .await;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body);
        let hello = text
            .find("\"Hello\"")
            .unwrap_or_else(|| panic!("held text lost: {text}"));
        let error = text.find("backend_stream_error").expect("no error event");
        assert!(hello < error, "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }

    /// A client leaving while the backend is silent mid-stream: the
    /// backend's connection is closed and its slot freed at once, not at
    /// the backend's next byte.
    #[tokio::test]
    async fn a_client_leaving_a_silent_stream_frees_the_backend() {
        let (closed_tx, closed_rx) = std::sync::mpsc::channel();
        let (response, backend) = relay(false, move |mut stream| {
            stream.write_all(HEAD).unwrap();
            stream.write_all(&hello_chunk()).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut sink = [0u8; 64];
            let closed = matches!(stream.read(&mut sink), Ok(0) | Err(_));
            let _ = closed_tx.send((closed, Instant::now()));
        })
        .await;
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(String::from_utf8_lossy(&first).contains("Hello"));
        assert_eq!(backend.in_flight(), 1);
        let left = Instant::now();
        drop(body);
        let (closed, at) = tokio::task::spawn_blocking(move || closed_rx.recv().unwrap())
            .await
            .unwrap();
        assert!(closed);
        assert!(
            at - left < Duration::from_secs(5),
            "closed after {:?}",
            at - left
        );
        for _ in 0..100 {
            if backend.in_flight() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the slot was not freed");
    }
}
