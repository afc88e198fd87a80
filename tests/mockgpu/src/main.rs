//! `mockgpu`: a fast mock of an OpenAI-compatible GPU server (vLLM-like), for
//! the benchmarks in `bench/`. It has to stay far from being the bottleneck
//! of a gateway benchmark, so:
//!
//! - every response is assembled from bytes rendered once at start (no JSON
//!   serializer runs per request or per chunk; a request costs a few
//!   `memcpy`s and three integers formatted);
//! - the request body is never parsed: `model`, `stream`,
//!   `stream_options.include_usage`, `max_tokens` and the `input` count are
//!   found by a byte scan;
//! - a stream is a hand-written `http_body::Body` with one reusable timer, not
//!   a task plus a channel per stream; tokens are scheduled on absolute
//!   deadlines (`first + i * interval`), so the pace does not drift.
//!
//! Endpoints: `POST /v1/chat/completions` and `/v1/completions` (streamed or
//! not), `POST /v1/embeddings`, `GET /v1/models`, `GET /health`, and
//! `GET /mock/stats` (requests and finished streams, as JSON).

use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio::time::{Instant, Sleep};

#[derive(Parser, Debug, Clone)]
#[command(name = "mockgpu", about = "A fast mock OpenAI-compatible GPU backend")]
struct Cli {
    /// Address to listen on (port 0 picks a free port; the address is printed
    /// on stdout as `mockgpu listening on http://ADDR`).
    #[arg(long, env = "MOCKGPU_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Comma-separated model names served; other models get 404. A name may
    /// carry its own pace as `NAME@INTER_MS` or `NAME@INTER_MS/FIRST_MS`
    /// (e.g. `fast,paced@20/100`), so one process can serve a fast model and
    /// a realistically paced one behind the same address.
    #[arg(
        long,
        env = "MOCKGPU_MODELS",
        value_delimiter = ',',
        default_value = "mock-model"
    )]
    models: Vec<String>,
    /// Tokens in an answer (a request's `max_tokens` can cut it shorter).
    #[arg(long, env = "MOCKGPU_TOKENS", default_value_t = 16)]
    tokens: usize,
    /// Delay between two tokens, in milliseconds (fractions allowed).
    #[arg(long, env = "MOCKGPU_INTER_TOKEN_MS", default_value_t = 0.0)]
    inter_token_ms: f64,
    /// Delay before the first token (prefill), in milliseconds.
    #[arg(long, env = "MOCKGPU_FIRST_TOKEN_MS", default_value_t = 0.0)]
    first_token_ms: f64,
    /// Dimension of the embedding vectors returned.
    #[arg(long, env = "MOCKGPU_EMBEDDING_DIM", default_value_t = 384)]
    embedding_dim: usize,
    /// Runtime worker threads; 1 runs a single-threaded runtime, 0 one per
    /// CPU this process may use.
    #[arg(long, env = "MOCKGPU_THREADS", default_value_t = 1)]
    threads: usize,
    /// Listen backlog.
    #[arg(long, default_value_t = 8192)]
    backlog: u32,
    /// Close a keep-alive connection that sends no new request for this many
    /// seconds (uvicorn, which vLLM runs on, closes after 5 s). 0 = never.
    #[arg(long, env = "MOCKGPU_KEEPALIVE_TIMEOUT", default_value_t = 5.0)]
    keepalive_timeout: f64,
}

/// Everything about one model's answers that can be rendered in advance.
struct ModelRender {
    /// The name as it appears inside a JSON string (escaped).
    json_name: Vec<u8>,
    first_token: Duration,
    inter_token: Duration,
    /// The full answer text (JSON-escaped), and where token `i` ends in it.
    text: Vec<u8>,
    text_ends: Vec<usize>,
    /// Streamed chat chunks after the per-stream head: role, one per token,
    /// and the two finishing chunks.
    chat_role: Bytes,
    chat_tokens: Vec<Bytes>,
    chat_finish_stop: Bytes,
    chat_finish_length: Bytes,
    /// Streamed completion chunks after the per-stream head.
    cmpl_tokens: Vec<Bytes>,
    cmpl_finish_stop: Bytes,
    cmpl_finish_length: Bytes,
    /// One embedding vector, rendered as a JSON array.
    embedding: Vec<u8>,
}

struct Shared {
    models: Vec<ModelRender>,
    tokens: usize,
    models_body: Bytes,
    ids: AtomicU64,
    requests: AtomicU64,
    streams_started: AtomicU64,
    streams_finished: AtomicU64,
}

const WORDS: [&str; 8] = [
    " the", " quick", " brown", " fox", " jumps", " over", " lazy", " dogs",
];

fn json_escape(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

fn token_text(i: usize) -> &'static str {
    if i == 0 {
        "Hello"
    } else {
        WORDS[(i - 1) % WORDS.len()]
    }
}

fn render_model(
    name: &str,
    tokens: usize,
    dim: usize,
    inter_token: Duration,
    first_token: Duration,
) -> ModelRender {
    let json_name = json_escape(name);
    let mut text = Vec::new();
    let mut text_ends = vec![0];
    let mut chat_tokens = Vec::with_capacity(tokens);
    let mut cmpl_tokens = Vec::with_capacity(tokens);
    for i in 0..tokens {
        let t = token_text(i);
        text.extend_from_slice(t.as_bytes());
        text_ends.push(text.len());
        chat_tokens.push(Bytes::from(format!(
            "{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
        )));
        cmpl_tokens.push(Bytes::from(format!(
            "{{\"index\":0,\"text\":\"{t}\",\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
        )));
    }
    let chat_finish = |reason: &str| {
        Bytes::from(format!(
            "{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"{reason}\"}}]}}\n\n"
        ))
    };
    let cmpl_finish = |reason: &str| {
        Bytes::from(format!(
            "{{\"index\":0,\"text\":\"\",\"logprobs\":null,\"finish_reason\":\"{reason}\"}}]}}\n\n"
        ))
    };
    // A deterministic, plausible-looking unit-ish vector.
    let seed = name
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let mut embedding = Vec::with_capacity(dim * 10);
    embedding.push(b'[');
    let mut x = seed | 1;
    for k in 0..dim {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let v = (x % 20000) as f32 / 10000.0 - 1.0;
        if k > 0 {
            embedding.push(b',');
        }
        let _ = write!(embedding, "{:.6}", v / (dim as f32).sqrt());
    }
    embedding.push(b']');
    ModelRender {
        json_name,
        first_token,
        inter_token,
        text,
        text_ends,
        chat_role: Bytes::from_static(
            b"{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        ),
        chat_tokens,
        chat_finish_stop: chat_finish("stop"),
        chat_finish_length: chat_finish("length"),
        cmpl_tokens,
        cmpl_finish_stop: cmpl_finish("stop"),
        cmpl_finish_length: cmpl_finish("length"),
        embedding,
    }
}

// ---------------------------------------------------------------------------
// Byte scanning of the request body (no JSON parse).

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let last_start = hay.len() - needle.len();
    let mut i = from;
    while i <= last_start {
        match hay[i..=last_start].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => {
                let at = i + p;
                if &hay[at..at + needle.len()] == needle {
                    return Some(at);
                }
                i = at + 1;
            }
        }
    }
    None
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// Position of the value of the object key `key` (given with its quotes),
/// i.e. the first byte after `"key" :`. Occurrences inside strings (preceded
/// by a backslash) are skipped. Good enough for a mock.
fn value_of(body: &[u8], key: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = find(body, key, from) {
        from = at + 1;
        if at > 0 && body[at - 1] == b'\\' {
            continue;
        }
        let i = skip_ws(body, at + key.len());
        if i < body.len() && body[i] == b':' {
            return Some(skip_ws(body, i + 1));
        }
    }
    None
}

/// The raw (still escaped) content of a string value.
fn string_value<'a>(body: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let i = value_of(body, key)?;
    if body.get(i) != Some(&b'"') {
        return None;
    }
    let start = i + 1;
    let mut j = start;
    while j < body.len() {
        match body[j] {
            b'\\' => j += 2,
            b'"' => return Some(&body[start..j]),
            _ => j += 1,
        }
    }
    None
}

fn bool_value(body: &[u8], key: &[u8]) -> bool {
    value_of(body, key).is_some_and(|i| body[i..].starts_with(b"true"))
}

fn uint_value(body: &[u8], key: &[u8]) -> Option<usize> {
    let i = value_of(body, key)?;
    let digits = body[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    std::str::from_utf8(&body[i..i + digits]).ok()?.parse().ok()
}

/// How many inputs an embeddings request has: 1 for a string or a single
/// token array, else the number of top-level array elements.
fn input_count(body: &[u8]) -> usize {
    let Some(i) = value_of(body, b"\"input\"") else {
        return 1;
    };
    if body.get(i) != Some(&b'[') {
        return 1;
    }
    let first = skip_ws(body, i + 1);
    match body.get(first) {
        Some(b']') => return 0,
        Some(b) if b.is_ascii_digit() => return 1, // one token array
        _ => {}
    }
    let (mut depth, mut count, mut j) = (0usize, 1usize, i);
    while j < body.len() {
        match body[j] {
            b'"' => {
                j += 1;
                while j < body.len() && body[j] != b'"' {
                    if body[j] == b'\\' {
                        j += 1;
                    }
                    j += 1;
                }
            }
            b'[' | b'{' => depth += 1,
            b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            b',' if depth == 1 => count += 1,
            _ => {}
        }
        j += 1;
    }
    count.min(4096)
}

// ---------------------------------------------------------------------------
// Responses.

/// A response body: either one buffer, or a paced stream of SSE events.
enum MockBody {
    Full(Option<Bytes>),
    Stream(Box<Stream>),
}

#[derive(Clone, Copy, PartialEq)]
enum Step {
    Role,
    Token(usize),
    Finish,
    Usage,
    Done,
    End,
}

struct Stream {
    shared: Arc<Shared>,
    model: usize,
    chat: bool,
    /// `data: {"id":"…","object":"…","created":…,"model":"…","choices":[`
    head: Bytes,
    count: usize,
    length_cut: bool,
    include_usage: bool,
    prompt_tokens: usize,
    start: Instant,
    step: Step,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Stream {
    fn deadline(&self, token: usize) -> Instant {
        let m = &self.shared.models[self.model];
        self.start + m.first_token + m.inter_token * token as u32
    }

    fn event(&self, tail: &Bytes) -> Bytes {
        let mut v = Vec::with_capacity(self.head.len() + tail.len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(tail);
        Bytes::from(v)
    }

    /// Waits until `deadline`; Ready at once when it has passed.
    fn wait(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        if deadline <= Instant::now() {
            return Poll::Ready(());
        }
        let sleep = match &mut self.sleep {
            Some(s) => {
                if s.deadline() != deadline {
                    s.as_mut().reset(deadline);
                }
                s
            }
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        sleep.as_mut().poll(cx)
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let s = match self.get_mut() {
            MockBody::Full(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Stream(s) => s,
        };
        let shared = s.shared.clone();
        let m = &shared.models[s.model];
        let timed = !m.first_token.is_zero() || !m.inter_token.is_zero();
        loop {
            let data = match s.step {
                Step::Role => {
                    if timed && s.wait(cx, s.deadline(0)).is_pending() {
                        return Poll::Pending;
                    }
                    s.step = Step::Token(0);
                    if !s.chat {
                        continue;
                    }
                    s.event(&m.chat_role)
                }
                Step::Token(i) if i < s.count => {
                    if timed && s.wait(cx, s.deadline(i)).is_pending() {
                        return Poll::Pending;
                    }
                    s.step = Step::Token(i + 1);
                    s.event(if s.chat {
                        &m.chat_tokens[i]
                    } else {
                        &m.cmpl_tokens[i]
                    })
                }
                Step::Token(_) => {
                    s.step = Step::Finish;
                    continue;
                }
                Step::Finish => {
                    s.step = Step::Usage;
                    s.event(match (s.chat, s.length_cut) {
                        (true, false) => &m.chat_finish_stop,
                        (true, true) => &m.chat_finish_length,
                        (false, false) => &m.cmpl_finish_stop,
                        (false, true) => &m.cmpl_finish_length,
                    })
                }
                Step::Usage => {
                    s.step = Step::Done;
                    if !s.include_usage {
                        continue;
                    }
                    let mut v = Vec::with_capacity(s.head.len() + 96);
                    v.extend_from_slice(&s.head);
                    let _ = write!(
                        v,
                        "],\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{},\"total_tokens\":{}}}}}\n\n",
                        s.prompt_tokens,
                        s.count,
                        s.prompt_tokens + s.count
                    );
                    Bytes::from(v)
                }
                Step::Done => {
                    s.step = Step::End;
                    shared.streams_finished.fetch_add(1, Ordering::Relaxed);
                    Bytes::from_static(b"data: [DONE]\n\n")
                }
                Step::End => return Poll::Ready(None),
            };
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(b) => b.is_none(),
            MockBody::Stream(s) => s.step == Step::End,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Stream(_) => SizeHint::default(),
        }
    }
}

fn full(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<MockBody> {
    let mut r = Response::new(MockBody::Full(Some(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn error(status: StatusCode, message: &str) -> Response<MockBody> {
    let body = format!(
        "{{\"error\":{{\"message\":\"{}\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":{}}}}}",
        String::from_utf8_lossy(&json_escape(message)),
        status.as_u16()
    );
    full(status, "application/json", Bytes::from(body))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `{"id":"PREFIX-ID","object":"OBJECT","created":T,"model":"M",` (without
/// the leading `data: `).
fn write_head(v: &mut Vec<u8>, shared: &Shared, prefix: &str, object: &str, model: &[u8]) {
    let id = shared.ids.fetch_add(1, Ordering::Relaxed);
    let _ = write!(
        v,
        "{{\"id\":\"{prefix}-{id:016x}\",\"object\":\"{object}\",\"created\":{},\"model\":\"",
        now_secs()
    );
    v.extend_from_slice(model);
    v.extend_from_slice(b"\",");
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let path = req.uri().path();
    if req.method() == Method::GET {
        return Ok(match path {
            "/v1/models" => full(
                StatusCode::OK,
                "application/json",
                shared.models_body.clone(),
            ),
            "/health" => full(
                StatusCode::OK,
                "application/json",
                Bytes::from_static(b"{\"status\":\"ok\"}"),
            ),
            "/mock/stats" => full(
                StatusCode::OK,
                "application/json",
                Bytes::from(format!(
                    "{{\"requests\":{},\"streams_started\":{},\"streams_finished\":{}}}",
                    shared.requests.load(Ordering::Relaxed),
                    shared.streams_started.load(Ordering::Relaxed),
                    shared.streams_finished.load(Ordering::Relaxed)
                )),
            ),
            _ => error(StatusCode::NOT_FOUND, "Not Found"),
        });
    }
    if req.method() != Method::POST {
        return Ok(error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed"));
    }
    enum Kind {
        Chat,
        Completion,
        Embedding,
    }
    let kind = match path {
        "/v1/chat/completions" => Kind::Chat,
        "/v1/completions" => Kind::Completion,
        "/v1/embeddings" => Kind::Embedding,
        _ => return Ok(error(StatusCode::NOT_FOUND, "Not Found")),
    };
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(error(StatusCode::BAD_REQUEST, "unreadable body")),
    };
    let Some(model_name) = string_value(&body, b"\"model\"") else {
        return Ok(error(StatusCode::BAD_REQUEST, "missing model"));
    };
    let Some(model) = shared.models.iter().position(|m| m.json_name == model_name) else {
        return Ok(error(
            StatusCode::NOT_FOUND,
            &format!(
                "The model `{}` does not exist.",
                String::from_utf8_lossy(model_name)
            ),
        ));
    };
    let m = &shared.models[model];
    // A rough prompt size: four bytes of JSON a token.
    let prompt_tokens = (body.len() / 4).max(1);

    if let Kind::Embedding = kind {
        let n = input_count(&body);
        let mut v = Vec::with_capacity(64 + n * (m.embedding.len() + 48));
        v.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
        for i in 0..n {
            if i > 0 {
                v.push(b',');
            }
            let _ = write!(v, "{{\"object\":\"embedding\",\"index\":{i},\"embedding\":");
            v.extend_from_slice(&m.embedding);
            v.push(b'}');
        }
        v.extend_from_slice(b"],\"model\":\"");
        v.extend_from_slice(&m.json_name);
        let _ = write!(
            v,
            "\",\"usage\":{{\"prompt_tokens\":{prompt_tokens},\"total_tokens\":{prompt_tokens}}}}}"
        );
        return Ok(full(StatusCode::OK, "application/json", Bytes::from(v)));
    }

    let chat = matches!(kind, Kind::Chat);
    let limit = uint_value(&body, b"\"max_tokens\"")
        .or_else(|| uint_value(&body, b"\"max_completion_tokens\""));
    let count = limit.map_or(shared.tokens, |l| l.min(shared.tokens));
    let length_cut = limit.is_some_and(|l| l < shared.tokens);
    let stream = bool_value(&body, b"\"stream\"");
    let (prefix, object) = match (chat, stream) {
        (true, false) => ("chatcmpl", "chat.completion"),
        (true, true) => ("chatcmpl", "chat.completion.chunk"),
        (false, _) => ("cmpl", "text_completion"),
    };

    if stream {
        let include_usage = bool_value(&body, b"\"include_usage\"");
        let mut head = Vec::with_capacity(160);
        head.extend_from_slice(b"data: ");
        write_head(&mut head, &shared, prefix, object, &m.json_name);
        head.extend_from_slice(b"\"choices\":[");
        shared.streams_started.fetch_add(1, Ordering::Relaxed);
        let s = Stream {
            shared: shared.clone(),
            model,
            chat,
            head: Bytes::from(head),
            count,
            length_cut,
            include_usage,
            prompt_tokens,
            start: Instant::now(),
            step: Step::Role,
            sleep: None,
        };
        let mut r = Response::new(MockBody::Stream(Box::new(s)));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(r);
    }

    let wait = m.first_token + m.inter_token * count as u32;
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let text = &m.text[..m.text_ends[count]];
    let mut v = Vec::with_capacity(256 + text.len());
    write_head(&mut v, &shared, prefix, object, &m.json_name);
    if chat {
        v.extend_from_slice(
            b"\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"",
        );
        v.extend_from_slice(text);
        v.extend_from_slice(b"\"},");
    } else {
        v.extend_from_slice(b"\"choices\":[{\"index\":0,\"text\":\"");
        v.extend_from_slice(text);
        v.extend_from_slice(b"\",");
    }
    let _ = write!(
        v,
        "\"logprobs\":null,\"finish_reason\":\"{}\"}}],\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{},\"total_tokens\":{}}}}}",
        if length_cut { "length" } else { "stop" },
        prompt_tokens,
        count,
        prompt_tokens + count
    );
    Ok(full(StatusCode::OK, "application/json", Bytes::from(v)))
}

fn ms(x: f64) -> Duration {
    Duration::from_secs_f64((x.max(0.0)) / 1000.0)
}

async fn serve(cli: Cli) -> std::io::Result<()> {
    let mut models = Vec::new();
    for spec in &cli.models {
        let (name, pace) = match spec.rsplit_once('@') {
            Some((name, pace)) => (name, Some(pace)),
            None => (spec.as_str(), None),
        };
        let (inter, first) = match pace {
            None => (cli.inter_token_ms, cli.first_token_ms),
            Some(p) => {
                let (i, f) = p.split_once('/').unwrap_or((p, "0"));
                let parse = |x: &str| {
                    x.trim().parse::<f64>().map_err(|_| {
                        std::io::Error::other(format!(
                            "--models {spec}: want NAME@INTER_MS[/FIRST_MS]"
                        ))
                    })
                };
                (parse(i)?, parse(f)?)
            }
        };
        models.push(render_model(
            name,
            cli.tokens,
            cli.embedding_dim,
            ms(inter),
            ms(first),
        ));
    }
    let created = now_secs();
    let list: Vec<String> = models
        .iter()
        .map(|m| {
            format!(
                "{{\"id\":\"{}\",\"object\":\"model\",\"created\":{created},\"owned_by\":\"mockgpu\",\"max_model_len\":32768}}",
                String::from_utf8_lossy(&m.json_name)
            )
        })
        .collect();
    let shared = Arc::new(Shared {
        models,
        tokens: cli.tokens,
        models_body: Bytes::from(format!(
            "{{\"object\":\"list\",\"data\":[{}]}}",
            list.join(",")
        )),
        ids: AtomicU64::new(1),
        requests: AtomicU64::new(0),
        streams_started: AtomicU64::new(0),
        streams_finished: AtomicU64::new(0),
    });

    let socket = if cli.listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(cli.listen)?;
    let listener = socket.listen(cli.backlog)?;
    println!("mockgpu listening on http://{}", listener.local_addr()?);
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true);
    if cli.keepalive_timeout > 0.0 {
        // hyper's header-read timer also runs while a kept-alive connection
        // waits for its next request: that is the idle timeout.
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs_f64(cli.keepalive_timeout));
    } else {
        http.header_read_timeout(None);
    }
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    eprintln!("mockgpu: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown() => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let conn = http.serve_connection(
            TokioIo::new(tcp),
            service_fn(move |req| handle(shared.clone(), req)),
        );
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn main() {
    let cli = Cli::parse();
    let runtime = if cli.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if cli.threads > 1 {
            b.worker_threads(cli.threads);
        }
        b.enable_all().build()
    };
    let runtime = runtime.expect("tokio runtime");
    if let Err(e) = runtime.block_on(serve(cli)) {
        eprintln!("mockgpu: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_fields() {
        let b = br#"{"messages":[{"role":"user","content":"say \"model\": \"x\""}], "model" : "glm4-9b", "stream":true,"stream_options":{"include_usage": true},"max_tokens":7}"#;
        assert_eq!(string_value(b, b"\"model\""), Some(&b"glm4-9b"[..]));
        assert!(bool_value(b, b"\"stream\""));
        assert!(bool_value(b, b"\"include_usage\""));
        assert_eq!(uint_value(b, b"\"max_tokens\""), Some(7));
        assert!(!bool_value(br#"{"stream":false}"#, b"\"stream\""));
        assert_eq!(input_count(br#"{"input":"a"}"#), 1);
        assert_eq!(input_count(br#"{"input":["a","b,]","c"]}"#), 3);
        assert_eq!(input_count(br#"{"input":[1,2,3]}"#), 1);
        assert_eq!(input_count(br#"{"input":[[1,2],[3]]}"#), 2);
    }
}
