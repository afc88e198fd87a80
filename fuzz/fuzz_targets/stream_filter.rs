//! The stream relay (`sluice::dataplane::filter::Filter::stream`) as the server runs it:
//! a backend's SSE answer arrives over a real HTTP/1.1 connection cut into
//! arbitrary pieces (inside events, inside `\r\n`, inside UTF-8 sequences)
//! and goes through the response hooks of `builtin:sensitive-words`
//! (mask), or through no hooks at all.
//!
//! Checked: the relay always ends (no hang, no panic); with the mask, the
//! client's text is exactly the backend's text with every listed word
//! masked — however the words were split across chunks — and the stream
//! ends in one `[DONE]` when the backend's did; without hooks, the bytes
//! pass unchanged except the `usage` chunk the gateway asked for itself.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use sluice::api::openai::Endpoint;
use sluice::config::{BackendConfig, OnError, PolicyConfig, PolicyRuntimeConfig};
use sluice::dataplane::accounting::{Accounting, Ledger};
use sluice::dataplane::body::idle::BackendBody;
use sluice::dataplane::filter::Filter;
use sluice::dataplane::forward::Answer;
use sluice::fleet::Fleet;
use sluice::policy::contract::RequestInfo;
use sluice::policy::{Chain, Route, Runtime, Scope};
use tokio::io::AsyncWriteExt;

/// What the text is made of: words to mask, their halves, case variants,
/// multi-byte characters and JSON escapes.
const PIECES: &[&str] = &[
    "secret", "SeCrEt", "sec", "ret", "s", "e", "c", "r", "t", "机密", "机", "密", "é", "😀", " ",
    "x", "\n", "\"", "\\", "ab", "秘",
];
const WORDS: &[&str] = &["secret", "机密"];

struct World {
    rt: tokio::runtime::Runtime,
    runtime: Arc<Runtime>,
    fleet: Arc<Fleet>,
    masking: Arc<Chain>,
    plain: Arc<Chain>,
    ledger: Arc<Ledger>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // The target checks the relay's framing, not policy timeouts: on a
        // starved machine (the fuzz hour at nice 19 beside two builds) a
        // response-hook call overran the 250 ms default, the filter failed
        // closed and ended the stream with its error event and [DONE], as
        // designed, which the framing checks below took for a bug.
        let runtime = Arc::new(
            Runtime::new(&PolicyRuntimeConfig {
                timeout: Duration::from_secs(10),
                ..PolicyRuntimeConfig::default()
            })
            .unwrap(),
        );
        let fleet = Arc::new(
            Fleet::new(&[BackendConfig {
                name: "b".into(),
                url: "http://127.0.0.1:9".into(),
                models: vec!["m".into()],
                max_concurrent_requests: 0,
                weight: 1,
                api_key: None,
                health_path: None,
                engine: Default::default(),
                metrics_url: None,
            }])
            .unwrap(),
        );
        let policy = |name: &str, module: &str, config: Value| PolicyConfig {
            name: name.into(),
            module: module.into(),
            config,
            on_error: OnError::FailClosed,
        };
        let router = policy("router", "builtin:model-router", json!({}));
        let words = policy(
            "words",
            "builtin:sensitive-words",
            json!({"words": WORDS, "action": "mask", "scope": "response"}),
        );
        let (masking, plain) = rt.block_on(async {
            let masking = Chain::load(&runtime, &fleet, &[words, router.clone()])
                .await
                .unwrap();
            let plain = Chain::load(&runtime, &fleet, &[router]).await.unwrap();
            (masking, plain)
        });
        assert!(masking.response_holdback().is_some());
        assert!(plain.response_holdback().is_none());
        World {
            rt,
            runtime,
            fleet,
            masking: Arc::new(masking),
            plain: Arc::new(plain),
            ledger: Arc::new(Ledger {
                store: None,
                access_log: false,
            }),
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Event {
    /// A content chunk made of these pieces.
    Text(Vec<u8>),
    /// `: ping`
    Comment,
    /// A chunk with no text (a role-only first chunk).
    Role,
}

#[derive(Arbitrary, Debug)]
struct Input {
    masking: bool,
    strip_usage: bool,
    events: Vec<Event>,
    finish: bool,
    usage: bool,
    done: bool,
    crlf: bool,
    /// Raw bytes put somewhere in the stream: no oracle then, only "ends
    /// cleanly".
    junk: Option<(u16, Vec<u8>)>,
    /// Sizes of the HTTP chunks the body is cut into (cycled).
    cuts: Vec<u8>,
}

fn text_of(pieces: &[u8]) -> String {
    pieces
        .iter()
        .map(|&p| PIECES[p as usize % PIECES.len()])
        .collect()
}

/// Every listed word masked character for character (ASCII words
/// case-insensitively). The words do not overlap themselves or each other,
/// so a left-to-right scan is the whole rule.
fn masked(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = chars.clone();
    let mut i = 0;
    'scan: while i < chars.len() {
        for word in WORDS {
            let w: Vec<char> = word.chars().collect();
            if i + w.len() <= chars.len()
                && chars[i..i + w.len()]
                    .iter()
                    .zip(&w)
                    .all(|(a, b)| a.to_lowercase().eq(b.to_lowercase()))
            {
                for c in &mut out[i..i + w.len()] {
                    *c = '*';
                }
                i += w.len();
                continue 'scan;
            }
        }
        i += 1;
    }
    out.into_iter().collect()
}

fn sse(payload: &str, crlf: bool) -> Vec<u8> {
    let end = if crlf { "\r\n\r\n" } else { "\n\n" };
    format!("data: {payload}{end}").into_bytes()
}

fn chunk(content: Option<&str>, finish: Option<&str>) -> String {
    let delta = match content {
        Some(text) => json!({"content": text}),
        None => json!({"role": "assistant"}),
    };
    json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    .to_string()
}

/// The text of the chunks of a relayed stream, and how many `[DONE]`s
/// it has (and whether one is last).
fn read_output(bytes: &[u8]) -> (String, usize, bool, bool) {
    let mut parser = sluice::api::sse::Parser::default();
    let mut events = parser
        .push(bytes)
        .expect("the relay wrote an oversized event");
    events.extend(parser.finish());
    let mut text = String::new();
    let mut done = 0;
    let mut last_is_done = false;
    let mut saw_usage = false;
    for event in events {
        last_is_done = false;
        let Some(data) = event.data else { continue };
        if data == "[DONE]" {
            done += 1;
            last_is_done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(&data)
            .unwrap_or_else(|e| panic!("the relay wrote a chunk that is not JSON ({e}): {data}"));
        if chunk["usage"].is_object() {
            saw_usage = true;
        }
        for choice in chunk["choices"].as_array().into_iter().flatten() {
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        }
    }
    (text, done, last_is_done, saw_usage)
}

async fn relay(w: &World, input: &Input, body: Vec<u8>, cuts: &[u8]) -> Vec<u8> {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let cuts = cuts.to_vec();
    let backend = tokio::spawn(async move {
        // The request first: hyper refuses an answer that comes before it.
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::io::AsyncReadExt::read(&mut server, &mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            request.extend_from_slice(&buf[..n]);
        }
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        server.write_all(head).await?;
        let mut at = 0;
        let mut i = 0;
        while at < body.len() {
            let size = cuts.get(i % cuts.len().max(1)).copied().unwrap_or(7).max(1) as usize;
            let end = (at + size).min(body.len());
            server
                .write_all(format!("{:x}\r\n", end - at).as_bytes())
                .await?;
            server.write_all(&body[at..end]).await?;
            server.write_all(b"\r\n").await?;
            tokio::task::yield_now().await;
            at = end;
            i += 1;
        }
        server.write_all(b"0\r\n\r\n").await?;
        // Keep the connection open until the client is done with it.
        let mut sink = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut server, &mut sink).await?;
        Ok::<_, std::io::Error>(())
    });
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::post("/v1/chat/completions")
        .header("host", "b")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, mut incoming) = response.into_parts();
    // The proxy reads the first frame before it answers the client.
    let first = match incoming.frame().await {
        Some(Ok(frame)) => frame.into_data().ok(),
        _ => None,
    };
    let backend_ = w.fleet.backends()[0].clone();
    let answer = Answer {
        slot: backend_.try_acquire().expect("a free slot"),
        backend: backend_,
        model: "m".into(),
        parts,
        first,
        incoming: BackendBody::new(incoming, Duration::from_secs(60)),
    };
    let chain = if input.masking { &w.masking } else { &w.plain };
    let filter = Filter {
        scope: Scope {
            runtime: w.runtime.clone(),
            fleet: w.fleet.clone(),
            chain: chain.clone(),
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
        holdback: chain.response_holdback(),
        strip_usage: input.strip_usage,
    };
    let mut acct = Accounting::start(
        w.ledger.clone(),
        1,
        "chat.completions",
        "m",
        true,
        None,
        Bytes::from_static(b"{}"),
    );
    acct.answered("b", "m", 200);
    let response = filter.stream(answer, acct);
    let out = response
        .into_body()
        .collect()
        .await
        .expect("the relay's body failed")
        .to_bytes()
        .to_vec();
    drop(sender);
    let _ = connection.await;
    let _ = backend.await;
    out
}

fuzz_target!(
    // Compiling the policies takes a while: not part of any input's time.
    init: {
        world();
    },
    |input: Input| {
    let w = world();
    let mut body = Vec::new();
    let mut text = String::new();
    for event in &input.events {
        match event {
            Event::Text(pieces) => {
                let t = text_of(pieces);
                body.extend(sse(&chunk(Some(&t), None), input.crlf));
                text.push_str(&t);
            }
            Event::Comment => body.extend_from_slice(b": ping\n\n"),
            Event::Role => body.extend(sse(&chunk(None, None), input.crlf)),
        }
    }
    if input.finish {
        body.extend(sse(&chunk(Some(""), Some("stop")), input.crlf));
    }
    if input.usage {
        let usage = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}});
        body.extend(sse(&usage.to_string(), input.crlf));
    }
    if input.done {
        body.extend(sse("[DONE]", input.crlf));
    }
    let original = body.clone();
    if let Some((at, junk)) = &input.junk {
        let at = *at as usize % (body.len() + 1);
        body.splice(at..at, junk.iter().copied());
    }
    let out = w.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), relay(w, &input, body, &input.cuts))
            .await
            .expect("the relay did not end")
    });
    if input.junk.is_some() {
        return;
    }
    let (got, done, last_is_done, saw_usage) = read_output(&out);
    assert_eq!(
        done,
        usize::from(input.done),
        "[DONE] count in {:?}",
        String::from_utf8_lossy(&out)
    );
    if input.done {
        assert!(last_is_done, "[DONE] is not last");
    }
    assert_eq!(saw_usage, input.usage && !input.strip_usage, "usage chunk");
    if input.masking {
        assert_eq!(got, masked(&text), "masked text");
    } else {
        // Byte for byte, less the usage chunk the gateway asked for.
        let mut expected = Vec::new();
        let mut parser = sluice::api::sse::Parser::default();
        for event in parser.push(&original).unwrap() {
            let usage = event
                .data
                .as_deref()
                .and_then(|d| serde_json::from_str::<Value>(d).ok())
                .is_some_and(|c| c["usage"].is_object());
            if event.data.as_deref() == Some("[DONE]") {
                expected.extend_from_slice(sluice::api::sse::DONE);
            } else if !(usage && input.strip_usage) {
                expected.extend_from_slice(&event.raw);
            }
        }
        assert_eq!(got, text);
        assert_eq!(out, expected, "pass-through changed bytes");
    }
    }
);
