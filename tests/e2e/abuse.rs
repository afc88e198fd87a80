//! Hostile clients and hostile backends, over real sockets. Whatever they
//! do, the client gets a clean OpenAI-shaped error or a clean stream end,
//! the gateway's memory stays bounded, the backend's slot is freed, and the
//! gateway goes on serving.
//!
//! Backends that misbehave are the raw-TCP fakes of
//! `common::fake_backend`: each answers according to the model it is asked
//! for, so one fake plays every scenario.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sluice::tools::mock::Flavor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::fake_backend::*;
use crate::common::*;

// ---------------------------------------------------------------------------
// Helpers

/// The gateway's view of a backend's slots.
async fn in_flight(client: &reqwest::Client, sluice: &Sluice, name: &str) -> u64 {
    let report = get_json(client, &sluice.url("/health")).await;
    report["backends"]
        .as_array()
        .and_then(|all| all.iter().find(|b| b["name"] == name))
        .and_then(|b| b["in_flight"].as_u64())
        .unwrap_or_else(|| panic!("no in_flight for {name}: {report}"))
}

/// Polls until the gateway holds no slot of `name`; panics after `limit`.
async fn until_slots_free(client: &reqwest::Client, sluice: &Sluice, name: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        let n = in_flight(client, sluice, name).await;
        if n == 0 {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{name} still has {n} slot(s) taken after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until the mock has nothing in flight; panics after `limit`.
async fn until_mock_idle(stats: &sluice::tools::mock::MockStats, limit: Duration) {
    let start = Instant::now();
    while stats.in_flight.load(Ordering::SeqCst) != 0 {
        assert!(
            start.elapsed() < limit,
            "the backend still works on {} request(s) after {limit:?}",
            stats.in_flight.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One well-behaved request to the mock serving `ok`: the gateway is fine.
async fn still_serves(client: &reqwest::Client, sluice: &Sluice) {
    let response = sluice.post_chat(client, &chat("ok")).await;
    assert_eq!(response.status(), 200, "the gateway stopped serving");
    let body: Value = response.json().await.unwrap();
    assert!(body["choices"][0]["message"]["content"]
        .as_str()
        .is_some_and(|t| t.starts_with("Hello")));
}

/// Reads a streamed answer to its end: the text, and the error that ended
/// it if it did not end cleanly.
async fn read_to_end(response: reqwest::Response, limit: Duration) -> (String, Option<String>) {
    let mut stream = response.bytes_stream();
    let mut bytes = Vec::new();
    let ended = tokio::time::timeout(limit, async {
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(e) => return Some(format!("{e:?}")),
            }
        }
        None
    })
    .await
    .expect("the answer did not end");
    (String::from_utf8_lossy(&bytes).into_owned(), ended)
}

fn post_raw(
    client: &reqwest::Client,
    sluice: &Sluice,
    body: impl Into<reqwest::Body>,
) -> reqwest::RequestBuilder {
    client
        .post(sluice.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
}

/// One raw HTTP/1.1 response: status, headers (lower-case), body, and
/// where the next response starts in the buffer.
type RawResponse = (u16, Vec<(String, String)>, Vec<u8>, usize);

/// Reads one HTTP/1.1 response from `buffer` at `at`.
fn parse_response(buffer: &[u8], at: usize) -> Option<RawResponse> {
    let head_end = at + find(&buffer[at..], b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buffer[at..head_end]).ok()?;
    let mut lines = head.lines();
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    if let Some(length) = header("content-length") {
        let length: usize = length.parse().ok()?;
        let end = head_end + length;
        (end <= buffer.len())
            .then(|| (status, headers.clone(), buffer[head_end..end].to_vec(), end))
    } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        let mut i = head_end;
        loop {
            let line_end = i + find(&buffer[i..], b"\r\n")?;
            let size =
                usize::from_str_radix(std::str::from_utf8(&buffer[i..line_end]).ok()?.trim(), 16)
                    .ok()?;
            i = line_end + 2;
            if size == 0 {
                // No trailers are sent: the blank line ends the body.
                return Some((status, headers.clone(), body, i + 2));
            }
            body.extend_from_slice(buffer.get(i..i + size)?);
            i += size + 2;
        }
    } else {
        Some((status, headers.clone(), Vec::new(), head_end))
    }
}

/// Asserts an OpenAI-shaped error body.
fn assert_openai_error(body: &[u8], code: &str) {
    let value: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)));
    assert!(
        value["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{value}"
    );
    assert!(value["error"]["type"].as_str().is_some(), "{value}");
    assert_eq!(value["error"]["code"], code, "{value}");
}

// ---------------------------------------------------------------------------
// Client abuse

/// Slowloris: clients that send their headers, or their body, a byte at a
/// time. Others are served meanwhile, and the slow ones are cut off rather
/// than held open for as long as they keep trickling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_do_not_block_others() {
    const LIMIT: Duration = Duration::from_secs(60);
    let ok = mock("ok", &["ok"]).await;
    let sluice = Sluice::start(&backend("ok", &ok.url(), &["ok"], ""));
    let client = client();
    let started = Instant::now();
    let mut slow = Vec::new();
    for i in 0..10 {
        let addr = sluice.addr;
        slow.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let body = serde_json::to_vec(&chat("ok")).unwrap();
            let (first, rest): (Vec<u8>, Vec<u8>) = if i % 2 == 0 {
                // Slow headers: the head never ends.
                let head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n".to_vec();
                (head, b"x-slow: ".iter().chain([b'a'; 4096].iter()).copied().collect())
            } else {
                // Slow body: the head is whole, the body trickles (padded
                // with spaces, so the trickle outlasts the test).
                let mut body = body;
                body.extend_from_slice(&[b' '; 4096]);
                let head = format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                (head.into_bytes(), body)
            };
            stream.write_all(&first).await.unwrap();
            let (mut read, mut write) = stream.into_split();
            let trickle = tokio::spawn(async move {
                for byte in rest {
                    if write.write_all(&[byte]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                // Never finish the request: hold the write side open.
                std::future::pending::<()>().await;
            });
            let mut answer = Vec::new();
            let cut = tokio::time::timeout(LIMIT, async {
                let mut buf = [0u8; 1024];
                loop {
                    match read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await
            .is_ok();
            trickle.abort();
            (i, cut, String::from_utf8_lossy(&answer).into_owned())
        }));
    }
    // Meanwhile, everyone else is served at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..5 {
        let asked = Instant::now();
        still_serves(&client, &sluice).await;
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "slow clients delay others"
        );
    }
    let mut held = Vec::new();
    for task in slow {
        let (i, cut, answer) = task.await.unwrap();
        if !cut {
            held.push(i);
        } else if !answer.is_empty() {
            // Whatever was answered before closing is an OpenAI error
            // (408 or 400), never a forwarded request.
            let (status, _, body, _) =
                parse_response(answer.as_bytes(), 0).expect("an HTTP answer");
            assert!((400..500).contains(&status), "{answer}");
            let value: Value = serde_json::from_slice(&body).unwrap();
            assert!(value["error"]["code"].is_string(), "{answer}");
        }
    }
    assert!(
        held.is_empty(),
        "connections {held:?} (even: slow headers, odd: slow body) were still open after {:?}: no read timeout",
        started.elapsed()
    );
    assert_eq!(ok.stats.requests.load(Ordering::Relaxed), 5);
}

/// A body over `server.max_body_bytes` is refused with 413 before it is
/// read: at once when `content-length` says so (the client has sent almost
/// nothing), and as soon as a chunked body passes the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_before_they_are_read() {
    let ok = mock("ok", &["ok"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .server("max_body_bytes", "64KiB")
            .backend(Backend::new("ok", &ok.url()).models(["ok"]))
            .to_toml(),
    );
    let answer_of = |mut stream: TcpStream| async move {
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if parse_response(&answer, 0).is_some() {
                    return;
                }
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .expect("no answer while the body was still being sent");
        (answer, stream)
    };

    // Announced: 10 GiB, of which 1 KiB is sent.
    let mut stream = TcpStream::connect(sluice.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 10737418240\r\n\r\n{\"model\":\"ok\",\"prompt\":\"")
        .await
        .unwrap();
    stream.write_all(&[b'x'; 1024]).await.unwrap();
    let (answer, _stream) = answer_of(stream).await;
    let (status, _, body, _) = parse_response(&answer, 0).unwrap();
    assert_eq!(status, 413);
    assert_openai_error(&body, "request_too_large");

    // Chunked, no length: 96 KiB sent, then the client stalls without
    // ending the body; the 413 must not wait for the end.
    let mut stream = TcpStream::connect(sluice.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    stream
        .write_all(&chunked(b"{\"model\":\"ok\",\"prompt\":\""))
        .await
        .unwrap();
    for _ in 0..24 {
        if stream.write_all(&chunked(&[b'x'; 4096])).await.is_err() {
            break;
        }
    }
    let (answer, _stream) = answer_of(stream).await;
    let (status, _, body, _) = parse_response(&answer, 0).unwrap();
    assert_eq!(status, 413);
    assert_openai_error(&body, "request_too_large");

    // Over h2 too, with a length announced.
    let mut h2 = h2c(sluice.addr).await;
    let request = http::Request::post(sluice.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("content-length", "1000000")
        .body(http_body_util::Full::new(Bytes::from(vec![
            b' ';
            1_000_000
        ])))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), h2.send_request(request))
        .await
        .expect("no h2 answer")
        .unwrap();
    assert_eq!(response.status(), 413);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_openai_error(&body, "request_too_large");

    assert_eq!(ok.stats.requests.load(Ordering::Relaxed), 0);
    still_serves(&client(), &sluice).await;
}

/// Bodies that are not UTF-8 anywhere — in a field the gateway reads or
/// one it only passes on — are refused as `invalid_json` and never reach a
/// backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_is_refused_wherever_it_is() {
    let ok = mock("ok", &["ok"]).await;
    let sluice = Sluice::start(&backend("ok", &ok.url(), &["ok"], ""));
    let client = client();
    let bodies: [&[u8]; 6] = [
        b"\xff\xfe{}",
        b"{\"model\":\"ok\xc3\"}",
        b"{\"model\":\"ok\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}",
        b"{\"model\":\"ok\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"over\xc0\xaflong\"}]}",
        b"{\"model\":\"ok\",\"messages\":[{\"role\":\"user\",\"content\":\"surrogate \xed\xa0\x80\"}]}",
        b"{\"model\":\"ok\",\"user\":\"cut \xe6\x9c\"}",
    ];
    for body in bodies {
        let response = post_raw(&client, &sluice, body.to_vec())
            .send()
            .await
            .unwrap();
        let shown = String::from_utf8_lossy(body).into_owned();
        assert_eq!(response.status(), 400, "{shown}");
        let value: Value = response.json().await.unwrap();
        assert_eq!(value["error"]["code"], "invalid_json", "{shown}: {value}");
    }
    assert_eq!(
        ok.stats.requests.load(Ordering::Relaxed),
        0,
        "a body that is not UTF-8 reached the backend"
    );
    still_serves(&client, &sluice).await;
}

/// JSON nested past any sane depth is refused without a stack overflow;
/// moderate nesting passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_json_is_refused_cleanly() {
    let ok = mock("ok", &["ok"]).await;
    let sluice = Sluice::start(&backend("ok", &ok.url(), &["ok"], ""));
    let client = client();
    let nested = |depth: usize, open: &str, close: &str| {
        format!(
            "{{\"model\":\"ok\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"x\":{}1{}}}",
            open.repeat(depth),
            close.repeat(depth)
        )
    };
    for body in [
        nested(1_000_000, "[", "]"),
        nested(100_000, "{\"a\":", "}"),
        // Never closed.
        format!("{{\"model\":\"ok\",\"x\":{}", "[".repeat(1_000_000)),
    ] {
        let response = post_raw(&client, &sluice, body).send().await.unwrap();
        expect_error(response, 400, "invalid_json").await;
    }
    // Not even an object: refused at its first byte.
    let body = format!("{}{}", "[".repeat(1_000_000), "]".repeat(1_000_000));
    let response = post_raw(&client, &sluice, body).send().await.unwrap();
    expect_error(response, 400, "invalid_request_body").await;
    assert_eq!(ok.stats.requests.load(Ordering::Relaxed), 0);
    let response = post_raw(&client, &sluice, nested(100, "[", "]"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    still_serves(&client, &sluice).await;
}

/// Hundreds of thousands of messages: passed on whole (streamed or not)
/// under the limit, 413 over it, and the gateway's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_messages_arrays_pass_or_are_refused() {
    let ok = mock("ok", &["ok"]).await;
    let sluice = Sluice::start(&backend("ok", &ok.url(), &["ok"], ""));
    let client = client();
    let before = rss_kib(sluice.pid());
    let messages: Vec<Value> = (0..300_000)
        .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": "hi"}))
        .collect();
    let body = json!({"model": "ok", "messages": messages});
    assert!(serde_json::to_vec(&body).unwrap().len() < 16 << 20);
    let response = sluice.post_chat(&client, &body).await;
    assert_eq!(response.status(), 200);
    let seen = ok.stats.last_request().unwrap().1;
    assert_eq!(seen["messages"].as_array().unwrap().len(), 300_000);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let response = sluice.post_chat(&client, &streamed).await;
    assert_eq!(response.status(), 200);
    let (text, error) = read_to_end(response, Duration::from_secs(30)).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(events(&text).last().map(String::as_str), Some("[DONE]"));
    let seen = ok.stats.last_request().unwrap().1;
    assert_eq!(seen["messages"].as_array().unwrap().len(), 300_000);
    assert_eq!(seen["stream_options"]["include_usage"], true);

    // Over the 16 MiB default: refused from its announced length, while
    // the client is still sending.
    let messages: Vec<Value> = (0..700_000)
        .map(|_| json!({"role": "user", "content": "hi"}))
        .collect();
    let too_big = serde_json::to_vec(&json!({"model": "ok", "messages": messages})).unwrap();
    assert!(too_big.len() > 16 << 20);
    let mut stream = TcpStream::connect(sluice.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        too_big.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The gateway may already have answered and closed.
    let _ = stream.write_all(&too_big[..64 << 10]).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while parse_response(&answer, 0).is_none() {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("no 413 while the body was being sent")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let (status, _, body, _) = parse_response(&answer, 0).unwrap();
    assert_eq!(status, 413);
    assert_openai_error(&body, "request_too_large");

    let grown = rss_kib(sluice.pid()).saturating_sub(before);
    assert!(grown < 400 << 10, "the gateway grew by {grown} KiB");
    still_serves(&client, &sluice).await;
}

/// HTTP/1.1 pipelining: requests written back to back before any answer
/// are answered in order, errors included, on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let ok = mock("ok", &["ok"]).await;
    let sluice = Sluice::start(&backend("ok", &ok.url(), &["ok"], ""));
    let post = |body: &str, last: bool| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if last { "connection: close\r\n" } else { "" }
        )
    };
    let chat_body = chat("ok").to_string();
    let stream_body = stream_chat("ok").to_string();
    let requests = [
        post(&chat_body, false),
        "GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n".to_string(),
        post("{\"model\":", false),
        post(&stream_body, false),
        "GET /nowhere HTTP/1.1\r\nhost: x\r\n\r\n".to_string(),
        post(&chat("gpt-9").to_string(), false),
        post(&chat_body, true),
    ];
    let mut stream = TcpStream::connect(sluice.addr).await.unwrap();
    stream
        .write_all(requests.concat().as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the pipelined answers did not end")
        .unwrap();
    let mut at = 0;
    let mut got = Vec::new();
    while at < answer.len() {
        let (status, headers, body, next) = parse_response(&answer, at).unwrap_or_else(|| {
            panic!(
                "unparsable answer: {}",
                String::from_utf8_lossy(&answer[at..])
            )
        });
        got.push((status, headers, body));
        at = next;
    }
    let statuses: Vec<u16> = got.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(statuses, [200, 200, 400, 200, 404, 404, 200]);
    let json = |i: usize| serde_json::from_slice::<Value>(&got[i].2).unwrap();
    assert_eq!(json(0)["object"], "chat.completion");
    assert_eq!(json(1)["object"], "list");
    assert_eq!(json(2)["error"]["code"], "invalid_json");
    let streamed = String::from_utf8(got[3].2.clone()).unwrap();
    assert_eq!(events(&streamed).last().map(String::as_str), Some("[DONE]"));
    assert!(content(&events(&streamed)).starts_with("Hello from ok"));
    assert_eq!(json(4)["error"]["code"], "not_found");
    assert_eq!(json(5)["error"]["code"], "model_not_found");
    assert_eq!(json(6)["object"], "chat.completion");
    assert_eq!(ok.stats.requests.load(Ordering::Relaxed), 3);
}

/// An HTTP/2 (prior knowledge, h2c) connection to the gateway.
async fn h2c(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}

fn h2_post(sluice: &Sluice, body: &Value) -> http::Request<http_body_util::Full<Bytes>> {
    http::Request::post(sluice.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Many concurrent streams on one h2c connection, streamed and not, queued
/// behind a backend limit: every one is answered whole. Then hundreds of
/// streams reset right after they were opened: the connection, the
/// backend's slots and the gateway are all fine afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_many_streams() {
    let ok = mock_with(paced("ok", &["ok"], Flavor::Vllm, 2, 8)).await;
    let sluice = Sluice::start(
        &Backend::new("ok", &ok.url())
            .models(["ok"])
            .max_concurrent_requests(16)
            .to_toml(),
    );
    let h2 = h2c(sluice.addr).await;
    let mut tasks = Vec::new();
    for i in 0..400 {
        let mut sender = h2.clone();
        let body = if i % 2 == 0 {
            chat("ok")
        } else {
            stream_chat("ok")
        };
        let request = h2_post(&sluice, &body);
        tasks.push(tokio::spawn(async move {
            let response = sender.send_request(request).await.unwrap();
            let status = response.status().as_u16();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap()
                .to_bytes();
            (i, status, String::from_utf8(body.to_vec()).unwrap())
        }));
    }
    let all = tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("400 h2 streams did not finish");
    for result in all {
        let (i, status, body) = result.unwrap();
        assert_eq!(status, 200, "stream {i}: {body}");
        if i % 2 == 0 {
            let value: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                value["choices"][0]["message"]["content"],
                "Hello from ok. the quick brown fox"
            );
        } else {
            assert_eq!(
                content(&events(&body)),
                "Hello from ok. the quick brown fox"
            );
            assert_eq!(events(&body).last().map(String::as_str), Some("[DONE]"));
        }
    }
    assert!(ok.stats.max_in_flight.load(Ordering::SeqCst) <= 16);

    // Rapid reset: open streams and drop them at once (RST_STREAM).
    let client = client();
    for _ in 0..500 {
        let mut sender = h2.clone();
        let request = h2_post(&sluice, &stream_chat("ok"));
        let pending = tokio::spawn(async move { sender.send_request(request).await });
        tokio::task::yield_now().await;
        pending.abort();
    }
    until_mock_idle(&ok.stats, Duration::from_secs(10)).await;
    until_slots_free(&client, &sluice, "ok", Duration::from_secs(5)).await;
    // The same connection still works — unless hyper's rapid-reset defence
    // closed it (GOAWAY ENHANCE_YOUR_CALM, "too_many_resets": how many resets
    // land before the server accepted their streams is timing) — and a new
    // connection does.
    let mut sender = h2.clone();
    let response = match sender.send_request(h2_post(&sluice, &chat("ok"))).await {
        Ok(response) => response,
        Err(e) => {
            eprintln!("the reset connection was closed: {e:?}");
            let mut fresh = h2c(sluice.addr).await;
            fresh
                .send_request(h2_post(&sluice, &chat("ok")))
                .await
                .unwrap()
        }
    };
    assert_eq!(response.status(), 200);
    still_serves(&client, &sluice).await;
}

/// A client that leaves mid-stream — HTTP/1.1 connection closed, or h2
/// stream reset; with or without a response filter — cancels the backend's
/// request (the mock stops generating) and frees the slot at once: with one
/// slot and a 2 s queue limit, a leaked slot would fail the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_cancels_the_backend_and_frees_the_slot() {
    let ok = mock_with(paced("ok", &["ok"], Flavor::Vllm, 20, 500)).await;
    let plain = Config::new().server("queue_timeout", "2s").backend(
        Backend::new("ok", &ok.url())
            .models(["ok"])
            .max_concurrent_requests(1),
    );
    let filtered = plain
        .clone()
        .policy(
            Policy::builtin("sensitive-words")
                .config(json!({"words": ["secret"], "action": "mask"})),
        )
        .policy(Policy::builtin("model-router"));
    for config in [plain, filtered] {
        let sluice = Sluice::start(&config.to_toml());
        let client = client();
        let finished = ok.stats.streams_finished.load(Ordering::SeqCst);
        for round in 0..10 {
            if round % 2 == 0 {
                let response = sluice.post_chat(&client, &stream_chat("ok")).await;
                assert_eq!(response.status(), 200, "round {round}");
                let mut stream = response.bytes_stream();
                stream.next().await.unwrap().unwrap();
                stream.next().await.unwrap().unwrap();
                drop(stream);
            } else {
                let mut h2 = h2c(sluice.addr).await;
                let response = h2
                    .send_request(h2_post(&sluice, &stream_chat("ok")))
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200, "round {round}");
                let mut body = response.into_body();
                http_body_util::BodyExt::frame(&mut body)
                    .await
                    .unwrap()
                    .unwrap();
                drop(body);
            }
            until_mock_idle(&ok.stats, Duration::from_secs(3)).await;
            until_slots_free(&client, &sluice, "ok", Duration::from_secs(3)).await;
        }
        assert_eq!(
            ok.stats.streams_finished.load(Ordering::SeqCst),
            finished,
            "a stream the client left was generated to its end"
        );
        still_serves(&client, &sluice).await;
    }
}

/// The same while the backend is silent mid-stream (a hung stream): the
/// gateway must not wait for the backend's next byte to notice the client
/// left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_a_silent_stream_frees_the_slot() {
    let fake = fake(|mut stream, _model, stats| async move {
        let mut out = SSE_HEAD.as_bytes().to_vec();
        out.extend(chunked(&content_event("Hello")));
        if stream.write_all(&out).await.is_err() {
            return;
        }
        // Then nothing, for as long as the connection stays open.
        if closed_within(&mut stream, Duration::from_secs(60)).await {
            stats.closed_by_gateway.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let ok = mock("ok", &["ok"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .steady()
            .backend(
                Backend::new("fake", &fake.url())
                    .models(["hung"])
                    .max_concurrent_requests(1),
            )
            .backend(Backend::new("ok", &ok.url()).models(["ok"]))
            .to_toml(),
    );
    let client = client();
    for round in 0..3 {
        let response = sluice.post_chat(&client, &stream_chat("hung")).await;
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        let first = stream.next().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first).contains("Hello"));
        drop(stream);
        until_slots_free(&client, &sluice, "fake", Duration::from_secs(3)).await;
        let start = Instant::now();
        while fake.stats.closed_by_gateway.load(Ordering::SeqCst) <= round {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "the backend connection was kept open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    still_serves(&client, &sluice).await;
}

// ---------------------------------------------------------------------------
// Backend abuse

/// The misbehaving fake (see [`misbehaving`]) and a well-behaved mock
/// serving `ok`, behind a gateway that keeps the fake in the fleet
/// whatever it does; `filtered`: with a response filter (sensitive-words
/// masking answers) before the router.
async fn misbehaving_fleet(
    huge: u64,
    filtered: bool,
) -> (Fake, sluice::tools::mock::MockBackend, Sluice) {
    let fake = misbehaving(huge).await;
    let ok = mock("ok", &["ok"]).await;
    let mut config = Config::new()
        .steady()
        .server("response_timeout", "10s")
        .backend(
            Backend::new("fake", &fake.url())
                .models(MISBEHAVIOURS.iter().copied())
                .max_concurrent_requests(4),
        )
        .backend(Backend::new("ok", &ok.url()).models(["ok"]));
    if filtered {
        config = config
            .policy(
                Policy::builtin("sensitive-words")
                    .config(json!({"words": ["secret"], "action": "mask", "scope": "response"})),
            )
            .policy(Policy::builtin("model-router"));
    }
    let sluice = Sluice::start(&config.to_toml());
    (fake, ok, sluice)
}

/// Malformed streams end cleanly: junk events are relayed or skipped, an
/// event over the size limit, a reset or a broken chunk ends the stream
/// with an OpenAI error event and `[DONE]`, a stream cut without `[DONE]`
/// just ends. Plain and through a response filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_backend_streams_end_cleanly() {
    for filtered in [false, true] {
        let (fake, _ok, sluice) = misbehaving_fleet(0, filtered).await;
        let client = client();

        let response = sluice.post_chat(&client, &stream_chat("garbage")).await;
        assert_eq!(response.status(), 200);
        let (text, error) = read_to_end(response, Duration::from_secs(10)).await;
        assert!(error.is_none(), "filtered={filtered}: {error:?}");
        assert_eq!(
            events(&text).last().map(String::as_str),
            Some("[DONE]"),
            "filtered={filtered}: {text}"
        );
        assert_eq!(text.matches("data: [DONE]").count(), 1, "{text}");

        for model in ["oversized-event", "reset-mid-stream", "truncated-chunk"] {
            let response = sluice.post_chat(&client, &stream_chat(model)).await;
            assert_eq!(response.status(), 200, "{model}");
            let (text, error) = read_to_end(response, Duration::from_secs(10)).await;
            assert!(
                error.is_none(),
                "{model}, filtered={filtered}: the stream broke instead of ending: {error:?}"
            );
            let events = events(&text);
            assert!(content(&events).starts_with("Hello"), "{model}: {text}");
            assert_eq!(
                events.last().map(String::as_str),
                Some("[DONE]"),
                "{model}, filtered={filtered}: {text:.300}"
            );
            let error: Value = serde_json::from_str(&events[events.len() - 2])
                .unwrap_or_else(|e| panic!("{model}, filtered={filtered}: {e}: {text:.300}"));
            assert_eq!(error["error"]["code"], "backend_stream_error", "{model}");
            assert!(
                text.len() < 64 << 10,
                "{model}: the oversized event was relayed"
            );
        }

        let response = sluice.post_chat(&client, &stream_chat("no-done")).await;
        let (text, error) = read_to_end(response, Duration::from_secs(10)).await;
        assert!(error.is_none(), "no-done, filtered={filtered}: {error:?}");
        assert!(content(&events(&text)).starts_with("Hello world"), "{text}");

        until_slots_free(&client, &sluice, "fake", Duration::from_secs(5)).await;
        let start = Instant::now();
        while fake.stats.closed_by_gateway.load(Ordering::SeqCst) < 1 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the oversized stream's connection was kept open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        still_serves(&client, &sluice).await;
    }
}

/// A stream that never ends is relayed for as long as the client reads;
/// when the client leaves, the backend connection is closed and the slot
/// freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_never_ending_stream_is_cut_when_the_client_leaves() {
    for filtered in [false, true] {
        let (fake, _ok, sluice) = misbehaving_fleet(0, filtered).await;
        let client = client();
        let response = sluice.post_chat(&client, &stream_chat("endless")).await;
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        let mut text = String::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(1) {
            text.push_str(&String::from_utf8_lossy(
                &stream.next().await.unwrap().unwrap(),
            ));
        }
        assert!(content(&events(&text)).contains("more more"), "{text:.300}");
        drop(stream);
        until_slots_free(&client, &sluice, "fake", Duration::from_secs(3)).await;
        let start = Instant::now();
        while fake.stats.closed_by_gateway.load(Ordering::SeqCst) < 1 {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "the endless backend was never cut off"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        still_serves(&client, &sluice).await;
    }
}

/// Huge answers pass through in bounded memory: a 1 GiB JSON body and a
/// 1 GiB stream reach the client whole; a filtered whole answer over the
/// filter's 64 MiB limit becomes a clean 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_backend_answers_stay_in_bounded_memory() {
    const GIB: u64 = 1 << 30;
    let (_fake, _ok, sluice) = misbehaving_fleet(GIB, false).await;
    let client = client();
    still_serves(&client, &sluice).await;
    let before = rss_kib(sluice.pid());
    let peak = Arc::new(AtomicU64::new(before));
    let pid = sluice.pid();
    let watch = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let response = sluice.post_chat(&client, &chat("huge-json")).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        total += chunk.expect("the huge body broke off").len() as u64;
    }
    assert_eq!(total, GIB + 2);

    let response = sluice.post_chat(&client, &stream_chat("huge-stream")).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut total = 0u64;
    let mut tail = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("the huge stream broke off");
        total += chunk.len() as u64;
        tail.extend_from_slice(&chunk);
        if tail.len() > 64 {
            tail.drain(..tail.len() - 64);
        }
    }
    // The fake counted its chunk framing too.
    assert!(total > GIB - (1 << 20), "{total}");
    assert!(tail.ends_with(b"data: [DONE]\n\n"));
    watch.abort();
    let grown = peak.load(Ordering::Relaxed).saturating_sub(before);
    assert!(
        grown < 100 << 10,
        "the gateway grew by {grown} KiB relaying huge answers"
    );
    until_slots_free(&client, &sluice, "fake", Duration::from_secs(3)).await;
    drop(sluice);

    // Through a response filter, a whole answer must be read before it is
    // filtered: bounded at 64 MiB, then refused.
    let (_fake, _ok, sluice) = misbehaving_fleet(256 << 20, true).await;
    still_serves(&client, &sluice).await;
    let before = rss_kib(sluice.pid());
    let response = sluice.post_chat(&client, &chat("huge-json")).await;
    expect_error(response, 502, "backend_unreachable").await;
    let grown = rss_kib(sluice.pid()).saturating_sub(before);
    assert!(
        grown < 300 << 10,
        "the gateway grew by {grown} KiB filtering a huge answer"
    );
    until_slots_free(&client, &sluice, "fake", Duration::from_secs(3)).await;
    still_serves(&client, &sluice).await;
}

/// Backends whose connection breaks before an answer — reset, closed, not
/// HTTP, headers that never end — give a clean 502; a whole answer reset
/// midway is an error for the client, never a silently short success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_backend_connections_give_clean_errors() {
    let (_fake, _ok, sluice) = misbehaving_fleet(0, false).await;
    let client = client();
    for model in ["reset", "close", "not-http", "endless-headers"] {
        for body in [chat(model), stream_chat(model)] {
            let response = sluice.post_chat(&client, &body).await;
            let error = expect_error(response, 502, "backend_unreachable").await;
            assert_eq!(error["error"]["type"], "server_error", "{model}");
        }
    }
    let response = sluice.post_chat(&client, &chat("reset-mid-body")).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.bytes().await.is_err(),
        "a body cut short by a reset looked complete to the client"
    );
    until_slots_free(&client, &sluice, "fake", Duration::from_secs(3)).await;
    still_serves(&client, &sluice).await;
}

/// Backend errors that are not JSON (HTML pages, plain text, empty bodies,
/// truncated JSON) reach the client as OpenAI-shaped errors it can parse,
/// with the backend's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_backend_errors_become_openai_errors() {
    let (_fake, _ok, sluice) = misbehaving_fleet(0, false).await;
    let client = client();
    for (model, status) in [
        ("html-500", 500),
        ("text-400", 400),
        ("empty-503", 503),
        ("truncated-json-429", 429),
    ] {
        for body in [chat(model), stream_chat(model)] {
            let response = sluice.post_chat(&client, &body).await;
            let got = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let text = response.text().await.unwrap();
            assert!(
                got == status || (status >= 500 && got == 502),
                "{model}: status {got}"
            );
            let value: Value = serde_json::from_str(&text).unwrap_or_else(|_| {
                panic!(
                    "{model}: the client got a non-JSON error ({got}, {content_type:?}): {text:?}"
                )
            });
            assert!(
                value["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{model}: {value}"
            );
            assert!(
                content_type.starts_with("application/json"),
                "{model}: {content_type}"
            );
        }
    }
    until_slots_free(&client, &sluice, "fake", Duration::from_secs(3)).await;
    still_serves(&client, &sluice).await;
}

/// Sizes and durations in the config that overflow are refused, not
/// wrapped around into a small value.
#[test]
fn overflowing_config_values_are_refused() {
    let dir = TempDir::new();
    for (key, value) in [
        ("reload_interval", "307445734561825861m"),
        ("shutdown_timeout", "5124095576030432h"),
        ("max_body_bytes", "17179869184GiB"),
    ] {
        let config = dir.write(
            "sluice.toml",
            Config::new()
                .server(key, value)
                .backend(Backend::new("vm01", "http://127.0.0.1:9").models(["m"]))
                .to_toml(),
        );
        let out = run_sluice(&["check-config"], Some(&config));
        assert!(
            !out.status.success(),
            "server.{key} = {value} was accepted: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
}

// ---------------------------------------------------------------------------
// Secrets

/// At the default log level (`info`), nothing secret reaches the log:
/// not a right or wrong API key, not the admin token, not prompt text —
/// whether the request is served, refused by auth, blocked by a policy or
/// failed by a dead backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_token_or_prompt_reaches_the_log() {
    let ok = mock("ok", &["ok"]).await;
    let sluice = Sluice::start_with(
        &Config::new()
            .auth_required()
            .consumer(Consumer::new("alice", "sk-canary-right-5e1f"))
            .policy(
                Policy::builtin("sensitive-words")
                    .config(json!({"words": ["forbidden"], "action": "block"})),
            )
            .policy(Policy::builtin("model-router"))
            .backend(Backend::new("ok", &ok.url()).models(["ok"]))
            .backend(Backend::new("dead", "http://127.0.0.1:9").models(["dead"]))
            .to_toml(),
        &[
            ("RUST_LOG", "info"),
            ("SLUICE_ADMIN_TOKEN", "adm-canary-token-9c2d"),
        ],
    );
    let client = client();
    let prompt = |model: &str, text: &str| {
        json!({"model": model, "max_tokens": 4,
               "messages": [{"role": "user", "content": text}]})
    };
    let send = |key: &'static str, body: Value| {
        client
            .post(sluice.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    let served = send("sk-canary-right-5e1f", prompt("ok", "canary-prompt-a1b2"))
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    let wrong = send("sk-canary-wrong-77aa", prompt("ok", "canary-prompt-a1b2"))
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let blocked = send(
        "sk-canary-right-5e1f",
        prompt("ok", "canary-prompt-a1b2 forbidden"),
    )
    .await
    .unwrap();
    assert_eq!(blocked.status(), 400);
    let failed = send("sk-canary-right-5e1f", prompt("dead", "canary-prompt-a1b2"))
        .await
        .unwrap();
    assert!(failed.status().is_server_error(), "{}", failed.status());
    let admin = client
        .get(sluice.admin_url("/admin/policies"))
        .bearer_auth("adm-canary-token-9c2d")
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);
    let refused = client
        .get(sluice.admin_url("/admin/policies"))
        .bearer_auth("adm-canary-wrong-31f0")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let log = sluice.log();
    assert!(
        log.contains("sluice::access") && log.contains("backend unreachable"),
        "the log is not at info level, so the test proves nothing:\n{log}"
    );
    for secret in ["sk-canary", "canary-prompt", "adm-canary", "forbidden"] {
        assert!(!log.contains(secret), "`{secret}` reached the log:\n{log}");
    }
}

/// An admin listener on a non-loopback address without a token would hand
/// deploys to anyone on the network: the gateway refuses to start.
#[test]
fn the_admin_listener_needs_a_token_off_loopback() {
    let dir = TempDir::new();
    let config = dir.write(
        "sluice.toml",
        backend("vm01", "http://127.0.0.1:9", &["m"], ""),
    );
    let out = serve_command(&config, "0.0.0.0:0")
        .env_remove("SLUICE_ADMIN_TOKEN")
        .output()
        .expect("running sluice");
    assert!(
        !out.status.success(),
        "it served without a token on 0.0.0.0"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server.admin_listen") && stderr.contains("token"),
        "{stderr}"
    );
}
