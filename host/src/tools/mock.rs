//! A simulated GPU backend: an OpenAI-compatible server that answers like
//! vLLM or like Ollama's OpenAI endpoint, streaming tokens at a set pace,
//! honouring `max_tokens`, and reporting `usage` the way each does. It
//! serves `sluice demo`, the end-to-end tests and the benchmarks, and keeps
//! counters a test can read (requests, peak concurrency, finished streams).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::dataplane::body::Body;
use crate::tools::mock_engine::{prompt_words, Engine, EngineModel, MetricsAnswer};

/// The longest answer `sluice mock-backend --answer-tokens` may make. The
/// answer is built in memory before it is sent (a few dozen bytes a
/// token); 100 million tokens took 16 GB and starved the signal handler.
pub const MAX_ANSWER_TOKENS: u32 = 100_000;

/// Which server's habits to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Flavor {
    /// A role-only first chunk, one chunk per write, errors as
    /// `{"object":"error",...}`.
    Vllm,
    /// The role in every delta, the last chunks and `[DONE]` in one write,
    /// errors in OpenAI's shape.
    Ollama,
}

#[derive(Debug, Clone)]
pub struct MockConfig {
    pub name: String,
    pub models: Vec<String>,
    pub flavor: Flavor,
    /// Delay before the first token (prefill).
    pub first_token_delay: Duration,
    /// Delay between tokens.
    pub token_interval: Duration,
    /// Length of an answer when `max_tokens` does not cut it short (at
    /// most [`MAX_ANSWER_TOKENS`]).
    pub answer_tokens: u32,
    /// False: never report `usage`, asked or not (as llama.cpp's server
    /// does in streams).
    pub reports_usage: bool,
    /// A simulated engine (batch, queue, prefix cache, `/metrics`); `None`:
    /// every request is served at once, and there is no `/metrics`.
    pub engine: Option<EngineModel>,
}

impl MockConfig {
    pub fn new(name: &str, models: &[&str]) -> MockConfig {
        MockConfig {
            name: name.into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            flavor: Flavor::Vllm,
            first_token_delay: Duration::ZERO,
            token_interval: Duration::ZERO,
            answer_tokens: 16,
            reports_usage: true,
            engine: None,
        }
    }
}

/// What the mock saw, and knobs a test can turn while it runs.
#[derive(Default)]
pub struct MockStats {
    pub requests: AtomicU64,
    pub in_flight: AtomicU32,
    pub max_in_flight: AtomicU32,
    /// Streams whose last byte (`[DONE]`) was sent.
    pub streams_finished: AtomicU64,
    /// When non-zero, every generation request gets this status.
    pub fail_status: AtomicU16,
    /// Delay before response headers, in milliseconds (a hung backend).
    pub header_delay_ms: AtomicU64,
    last_request: Mutex<Option<(String, Value)>>,
}

impl MockStats {
    /// The path and JSON body of the last generation request.
    pub fn last_request(&self) -> Option<(String, Value)> {
        self.last_request.lock().ok()?.clone()
    }
}

pub struct MockBackend {
    pub addr: SocketAddr,
    pub stats: Arc<MockStats>,
    /// The simulated engine, when configured.
    pub engine: Option<Arc<Engine>>,
    stop: watch::Sender<bool>,
}

impl MockBackend {
    /// Starts serving on `addr` (port 0 picks a free port).
    pub async fn start(addr: SocketAddr, config: MockConfig) -> std::io::Result<MockBackend> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(MockStats::default());
        let (stop, stopped) = watch::channel(false);
        let engine = config
            .engine
            .clone()
            .map(|model| Engine::new(model, config.models.first().map_or("", String::as_str)));
        let shared = Arc::new(Shared {
            config,
            stats: stats.clone(),
            ids: AtomicU64::new(1),
            engine: engine.clone(),
        });
        tokio::spawn(accept_loop(listener, shared, stopped));
        Ok(MockBackend {
            addr,
            stats,
            engine,
            stop,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening and drops every open connection, like a killed server.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for MockBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Shared {
    config: MockConfig,
    stats: Arc<MockStats>,
    ids: AtomicU64,
    engine: Option<Arc<Engine>>,
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = stopped.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut stopped = stopped.clone();
        let connection = builder
            .serve_connection(
                TokioIo::new(stream),
                service_fn(move |request| {
                    let shared = shared.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(shared, request).await) }
                }),
            )
            .into_owned();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                _ = stopped.changed() => {}
            }
        });
    }
}

/// Counts a request in flight at the mock until dropped.
struct InFlight(Arc<MockStats>);

impl InFlight {
    fn enter(stats: &Arc<MockStats>) -> InFlight {
        let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(stats.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_string();
    if request.method() == Method::GET && path == "/v1/models" {
        let owner = match shared.config.flavor {
            Flavor::Vllm => "vllm",
            Flavor::Ollama => "library",
        };
        let data: Vec<Value> = shared
            .config
            .models
            .iter()
            .map(|m| json!({"id": m, "object": "model", "created": now(), "owned_by": owner}))
            .collect();
        return json_response(StatusCode::OK, &json!({"object": "list", "data": data}));
    }
    if let (&Method::GET, "/metrics", Some(engine)) =
        (request.method(), path.as_str(), &shared.engine)
    {
        let mut response = match engine.metrics().await {
            MetricsAnswer::Text(text) => Response::new(Body::full(text)),
            MetricsAnswer::Stream(rx) => Response::new(Body::Channel(rx)),
        };
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return response;
    }
    if request.method() != Method::POST {
        return error(&shared, StatusCode::NOT_FOUND, "Not Found");
    }
    let stats = shared.stats.clone();
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let in_flight = InFlight::enter(&stats);
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return error(&shared, StatusCode::BAD_REQUEST, "unreadable body"),
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(&shared, StatusCode::BAD_REQUEST, "body is not JSON");
    };
    if let Ok(mut last) = stats.last_request.lock() {
        *last = Some((path.clone(), body.clone()));
    }
    let delay = stats.header_delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let fail = stats.fail_status.load(Ordering::Relaxed);
    if fail != 0 {
        let status = StatusCode::from_u16(fail).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(&shared, status, "simulated failure");
    }
    let model = body["model"].as_str().unwrap_or_default().to_string();
    if !shared.config.models.contains(&model) {
        return error(
            &shared,
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist."),
        );
    }
    match path.as_str() {
        "/v1/chat/completions" | "/v1/completions" => {
            generate(shared, &path, model, &body, in_flight).await
        }
        "/v1/embeddings" => embeddings(&model, &body),
        _ => error(&shared, StatusCode::NOT_FOUND, "Not Found"),
    }
}

/// The words of a simulated answer: deterministic, so tests can predict them.
fn answer(config: &MockConfig, count: u32) -> Vec<String> {
    const WORDS: [&str; 8] = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dogs",
    ];
    let mut tokens = vec![
        "Hello".to_string(),
        " from".to_string(),
        format!(" {}", config.name),
        ".".to_string(),
    ];
    let mut i = 0;
    while tokens.len() < count as usize {
        tokens.push(format!(" {}", WORDS[i % WORDS.len()]));
        i += 1;
    }
    tokens.truncate(count as usize);
    tokens
}

/// A rough prompt token count: words plus a few per chat message, as a
/// tokenizer's template would add.
fn prompt_tokens(body: &Value) -> u64 {
    let words = |v: &Value| {
        v.as_str()
            .map_or(0, |s| s.split_whitespace().count() as u64)
    };
    if let Some(messages) = body["messages"].as_array() {
        messages.iter().map(|m| words(&m["content"]) + 4).sum()
    } else {
        match &body["prompt"] {
            Value::Array(parts) => parts.iter().map(words).sum(),
            prompt => words(prompt),
        }
    }
}

async fn generate(
    shared: Arc<Shared>,
    path: &str,
    model: String,
    body: &Value,
    in_flight: InFlight,
) -> Response<Body> {
    let config = &shared.config;
    let chat = path == "/v1/chat/completions";
    let limit = body["max_tokens"]
        .as_u64()
        .or(body["max_completion_tokens"].as_u64())
        .unwrap_or(u64::from(config.answer_tokens));
    let count = limit
        .min(u64::from(config.answer_tokens))
        .min(u64::from(MAX_ANSWER_TOKENS)) as u32;
    let finish = if u64::from(config.answer_tokens) > limit {
        "length"
    } else {
        "stop"
    };
    let tokens = answer(config, count);
    let usage = json!({
        "prompt_tokens": prompt_tokens(body),
        "completion_tokens": count,
        "total_tokens": prompt_tokens(body) + u64::from(count),
    });
    let id = format!(
        "{}-{}",
        if chat { "chatcmpl" } else { "cmpl" },
        shared.ids.fetch_add(1, Ordering::Relaxed)
    );
    let stream = body["stream"].as_bool().unwrap_or(false);
    let words: Vec<String> = match &shared.engine {
        Some(_) => prompt_words(body).into_iter().map(str::to_string).collect(),
        None => Vec::new(),
    };
    if !stream {
        // Prefilled on return.
        let seat = admit(&shared, &words, count).await;
        tokio::time::sleep(config.first_token_delay + config.token_interval * count).await;
        drop(seat);
        let text: String = tokens.concat();
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        };
        let object = if chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        drop(in_flight);
        let mut answer = json!({"id": id, "object": object, "created": now(), "model": model, "choices": [choice], "usage": usage});
        if !config.reports_usage {
            answer.as_object_mut().map(|a| a.remove("usage"));
        }
        return json_response(StatusCode::OK, &answer);
    }
    let include_usage = config.reports_usage
        && body["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false);
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let shared = shared.clone();
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let config = &shared.config;
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = |delta: Value, finish: Option<&str>| {
            let choice = if chat {
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            } else {
                json!({"index": 0, "text": delta["content"].as_str().unwrap_or(""), "logprobs": null, "finish_reason": finish})
            };
            let mut c = json!({"id": id, "object": object, "created": now(), "model": model, "choices": [choice]});
            if config.flavor == Flavor::Ollama {
                c["system_fingerprint"] = json!("fp_ollama");
            }
            sse(&c)
        };
        // Prefilled on return.
        let _seat = admit(&shared, &words, count).await;
        tokio::time::sleep(config.first_token_delay).await;
        if config.flavor == Flavor::Vllm
            && chat
            && tx
                .send(chunk(json!({"role": "assistant", "content": ""}), None))
                .await
                .is_err()
        {
            return;
        }
        for (i, token) in tokens.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(config.token_interval).await;
            }
            let delta = match config.flavor {
                Flavor::Ollama => json!({"role": "assistant", "content": token}),
                Flavor::Vllm => json!({"content": token}),
            };
            if tx.send(chunk(delta, None)).await.is_err() {
                return;
            }
        }
        let mut tail = chunk(json!({}), Some(finish)).to_vec();
        if include_usage {
            let mut u = json!({"id": id, "object": object, "created": now(), "model": model, "choices": [], "usage": usage});
            if config.flavor == Flavor::Ollama {
                u["system_fingerprint"] = json!("fp_ollama");
            }
            tail.extend_from_slice(&sse(&u));
        }
        tail.extend_from_slice(b"data: [DONE]\n\n");
        let pieces: Vec<Bytes> = match config.flavor {
            // Ollama writes its last events together; vLLM one per write.
            Flavor::Ollama => vec![Bytes::from(tail)],
            Flavor::Vllm => split_events(&tail),
        };
        for piece in pieces {
            if tx.send(piece).await.is_err() {
                return;
            }
        }
        shared
            .stats
            .streams_finished
            .fetch_add(1, Ordering::Relaxed);
    });
    let mut response = Response::new(Body::Channel(rx));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    response
}

/// A place in the simulated engine's batch (waiting for one in its
/// queue), its prompt prefilled; `None` without an engine.
async fn admit(
    shared: &Shared,
    words: &[String],
    answer_tokens: u32,
) -> Option<crate::tools::mock_engine::Seat> {
    let engine = shared.engine.as_ref()?;
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    engine.admit(&words, answer_tokens).await
}

fn split_events(bytes: &[u8]) -> Vec<Bytes> {
    let text = String::from_utf8_lossy(bytes);
    text.split_inclusive("\n\n")
        .map(|e| Bytes::from(e.to_string()))
        .collect()
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn embeddings(model: &str, body: &Value) -> Response<Body> {
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().unwrap_or_default().to_string())
            .collect(),
        _ => vec![],
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let seed = text
                .bytes()
                .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
            let vector: Vec<f32> = (0..8)
                .map(|k| ((seed.rotate_left(k * 4) % 2000) as f32 / 1000.0) - 1.0)
                .collect();
            json!({"object": "embedding", "index": i, "embedding": vector})
        })
        .collect();
    let tokens: usize = inputs.iter().map(|s| s.split_whitespace().count()).sum();
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
}

fn error(shared: &Shared, status: StatusCode, message: &str) -> Response<Body> {
    let body = match shared.config.flavor {
        Flavor::Vllm => {
            json!({"object": "error", "message": message, "type": "BadRequestError", "param": null, "code": status.as_u16()})
        }
        Flavor::Ollama => {
            json!({"error": {"message": message, "type": "api_error", "param": null, "code": null}})
        }
    };
    json_response(status, &body)
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Body::json(value));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, Body::JSON);
    response
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
