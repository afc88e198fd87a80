//! A raw-TCP fake backend, for what no well-behaved mock would do.
//!
//! [`fake`] reads each request (HTTP/1.1, `content-length` body) and hands
//! the connection and the model asked for to a closure that writes whatever
//! bytes it likes: so a fake can simulate any backend behaviour, right or
//! wrong, down to the byte and the TCP close. [`FakeStats`] counts the
//! requests it read and the connections the gateway closed on it (a
//! cancelled backend request).
//!
//! [`misbehaving`] is the catalogue the hostile-backend tests share, one
//! scenario a model name ([`MISBEHAVIOURS`]):
//! - streams that go wrong: junk and non-UTF-8 events (`garbage`), an event
//!   over the size limit (`oversized-event`), a stream cut without `[DONE]`
//!   (`no-done`), a TCP reset mid-stream (`reset-mid-stream`), a broken
//!   chunk (`truncated-chunk`), a stream that never ends (`endless`), a
//!   stream of `huge` bytes (`huge-stream`);
//! - whole answers that go wrong: a body of `huge` bytes (`huge-json`), a
//!   reset mid-body (`reset-mid-body`), headers that never end
//!   (`endless-headers`);
//! - errors that are not JSON: an HTML 500 (`html-500`), plain text 400
//!   (`text-400`), an empty 503 (`empty-503`), truncated JSON 429
//!   (`truncated-json-429`);
//! - connections that break before an answer: reset (`reset`), closed
//!   (`close`), not HTTP at all (`not-http`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a fake backend saw.
#[derive(Default)]
pub struct FakeStats {
    pub requests: AtomicU64,
    /// Connections the gateway closed (or reset) while the fake was still
    /// sending or waiting: a cancelled backend request.
    pub closed_by_gateway: AtomicU64,
}

/// A raw-TCP backend; `serve` plays one connection after its request was
/// read (the model asked for is passed along).
pub struct Fake {
    addr: SocketAddr,
    pub stats: Arc<FakeStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fake {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Starts a fake on an ephemeral port of 127.0.0.1; it is stopped when
/// the returned [`Fake`] is dropped.
pub async fn fake<F, Fut>(serve: F) -> Fake
where
    F: Fn(TcpStream, String, Arc<FakeStats>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(FakeStats::default());
    let serve = Arc::new(serve);
    let shared = stats.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let serve = serve.clone();
            let stats = shared.clone();
            tokio::spawn(async move {
                let Some(body) = read_request(&mut stream).await else {
                    return;
                };
                stats.requests.fetch_add(1, Ordering::SeqCst);
                let model = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|b| b["model"].as_str().map(str::to_string))
                    .unwrap_or_default();
                serve(stream, model, stats).await;
            });
        }
    });
    Fake { addr, stats, task }
}

/// Reads one HTTP/1.1 request (head and `content-length` body); its body.
async fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = find(&buffer, b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    Some(buffer[head_end..head_end + length].to_vec())
}

/// Where `needle` first stands in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Waits until the peer closes the connection (or resets it); false if it
/// is still open after `limit`.
pub async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut sink = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Writes `bytes`; false when the gateway closed the connection.
pub async fn send(stream: &mut TcpStream, bytes: impl AsRef<[u8]>) -> bool {
    stream.write_all(bytes.as_ref()).await.is_ok()
}

/// Closes with a TCP reset instead of a FIN.
pub fn reset(stream: TcpStream) {
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// The head of a chunked `text/event-stream` answer, as vLLM sends it.
pub const SSE_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n";

/// One HTTP/1.1 chunk.
pub fn chunked(bytes: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", bytes.len()).into_bytes();
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
    out
}

/// One SSE event carrying a chat chunk with `text` as its content.
pub fn content_event(text: &str) -> Vec<u8> {
    let chunk = json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
    format!("data: {chunk}\n\n").into_bytes()
}

/// A fake that plays every scenario of [`MISBEHAVIOURS`], chosen by the
/// model asked for; `huge` is the size in bytes of the `huge-*` answers.
pub async fn misbehaving(huge: u64) -> Fake {
    fake(move |mut stream, model, stats| async move {
        match model.as_str() {
            // Streams.
            "garbage" => {
                let mut out = SSE_HEAD.as_bytes().to_vec();
                for event in [
                    &b"data: {not json\n\n"[..],
                    b"event: weird\nid: 7\nretry: 10\n\n",
                    b"data:\n\n",
                    b"\x00\xff\xfe binary \xc3\n\n",
                    b"data: {\"choices\":\"not an array\"}\n\n",
                    b"data: {\"choices\":[{\"index\":\"zero\",\"delta\":{\"content\":5}}]}\n\n",
                    b"data: {\"choices\":[{\"index\":4294967296,\"delta\":{\"content\":\"big index\"}}]}\n\n",
                    b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"half \xe6\x9c\"}}]}\n\n",
                    b"data: {\"usage\":\"nope\",\"choices\":[]}\n\n",
                    b"data: [DONE]\n\n",
                ] {
                    out.extend(chunked(event));
                }
                out.extend_from_slice(b"0\r\n\r\n");
                send(&mut stream, out).await;
            }
            "oversized-event" => {
                let mut out = SSE_HEAD.as_bytes().to_vec();
                out.extend(chunked(&content_event("Hello")));
                out.extend(chunked(b"data: "));
                send(&mut stream, out).await;
                for _ in 0..(3 << 20) / 65536 {
                    if !send(&mut stream, chunked(&[b'x'; 65536])).await {
                        stats.closed_by_gateway.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
                if closed_within(&mut stream, Duration::from_secs(10)).await {
                    stats.closed_by_gateway.fetch_add(1, Ordering::SeqCst);
                }
            }
            "no-done" => {
                // No length, no chunking: the body ends when the connection does.
                let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n".to_vec();
                out.extend(content_event("Hello"));
                out.extend(content_event(" world"));
                out.extend_from_slice(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" tail\"}}]}");
                send(&mut stream, out).await;
            }
            "reset-mid-stream" => {
                let mut out = SSE_HEAD.as_bytes().to_vec();
                out.extend(chunked(&content_event("Hello")));
                send(&mut stream, out).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                reset(stream);
            }
            "truncated-chunk" => {
                let mut out = SSE_HEAD.as_bytes().to_vec();
                out.extend(chunked(&content_event("Hello")));
                out.extend_from_slice(b"3e8\r\ndata: {");
                send(&mut stream, out).await;
            }
            "endless" => {
                send(&mut stream, SSE_HEAD.as_bytes().to_vec()).await;
                loop {
                    if !send(&mut stream, chunked(&content_event("more "))).await {
                        stats.closed_by_gateway.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            "huge-stream" => {
                send(&mut stream, SSE_HEAD.as_bytes().to_vec()).await;
                let event = content_event(&"y".repeat(8000));
                let mut batch = Vec::new();
                for _ in 0..16 {
                    batch.extend_from_slice(&event);
                }
                let batch = chunked(&batch);
                let mut sent = 0u64;
                while sent < huge {
                    if !send(&mut stream, batch.clone()).await {
                        return;
                    }
                    sent += batch.len() as u64;
                }
                let mut tail = chunked(b"data: [DONE]\n\n");
                tail.extend_from_slice(b"0\r\n\r\n");
                send(&mut stream, tail).await;
            }
            // Whole answers.
            "huge-json" => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
                    huge + 2
                );
                send(&mut stream, head.into_bytes()).await;
                let block = vec![b' '; 1 << 20];
                send(&mut stream, b"{".to_vec()).await;
                let mut sent = 0;
                while sent < huge {
                    let n = (huge - sent).min(block.len() as u64) as usize;
                    if !send(&mut stream, block[..n].to_vec()).await {
                        return;
                    }
                    sent += n as u64;
                }
                send(&mut stream, b"}".to_vec()).await;
            }
            "reset-mid-body" => {
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 100000\r\n\r\n{\"id\":\"x\",";
                send(&mut stream, head.as_bytes().to_vec()).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                reset(stream);
            }
            "endless-headers" => {
                send(&mut stream, b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n".to_vec()).await;
                for i in 0..100_000 {
                    if !send(&mut stream, format!("x-filler-{i}: {}\r\n", "a".repeat(100)).into_bytes()).await {
                        return;
                    }
                }
            }
            // Errors that are not JSON.
            "html-500" => {
                let body = "<html><body><h1>500 Internal Server Error</h1></body></html>";
                send(&mut stream, format!("HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/html\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes()).await;
            }
            "text-400" => {
                send(&mut stream, b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: 11\r\n\r\nBad Request".to_vec()).await;
            }
            "empty-503" => {
                send(&mut stream, b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n".to_vec()).await;
            }
            "truncated-json-429" => {
                send(&mut stream, b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 9\r\n\r\n{\"error\":".to_vec()).await;
            }
            // Connections that break before an answer.
            "reset" => reset(stream),
            "close" => drop(stream),
            "not-http" => {
                send(&mut stream, b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec()).await;
            }
            other => panic!("the fake has no scenario {other}"),
        }
    })
    .await
}

/// The models [`misbehaving`] answers, one a scenario.
pub const MISBEHAVIOURS: &[&str] = &[
    "garbage",
    "oversized-event",
    "no-done",
    "reset-mid-stream",
    "truncated-chunk",
    "endless",
    "huge-stream",
    "huge-json",
    "reset-mid-body",
    "endless-headers",
    "html-500",
    "text-400",
    "empty-503",
    "truncated-json-429",
    "reset",
    "close",
    "not-http",
];
