//! Server-sent events go to the client as the backend produces them.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use sluice::tools::mock::Flavor;

use crate::common::*;

async fn first_chunk_arrives_early(flavor: Flavor) {
    // Ten tokens 100 ms apart: the backend needs about a second.
    let vm01 = mock_with(paced("vm01", &["m"], flavor, 100, 10)).await;
    let sluice = Sluice::start(&backend("vm01", &vm01.url(), &["m"], ""));
    let body = stream_chat("m");
    let started = Instant::now();
    let response = sluice.post_chat(&client(), &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    assert_eq!(
        vm01.stats.streams_finished.load(Ordering::SeqCst),
        0,
        "first chunk came only after the backend finished"
    );
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "first chunk after {:?}",
        started.elapsed()
    );

    let mut text = String::from_utf8(first.to_vec()).unwrap();
    let mut chunks = 1;
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        chunks += 1;
    }
    assert!(
        chunks >= 10,
        "only {chunks} chunks: the answer was buffered"
    );
    let events = events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        content(&events),
        "Hello from vm01. the quick brown fox jumps over"
    );
    assert!(
        !text.contains("\"usage\""),
        "usage sent though the client did not ask"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_stream_reaches_the_client_incrementally() {
    first_chunk_arrives_early(Flavor::Vllm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_stream_reaches_the_client_incrementally() {
    first_chunk_arrives_early(Flavor::Ollama).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_chunk_passes_through_when_asked() {
    let vm01 = mock_with(paced("vm01", &["m"], Flavor::Vllm, 0, 5)).await;
    let sluice = Sluice::start(&backend("vm01", &vm01.url(), &["m"], ""));
    let mut body = stream_chat("m");
    body["stream_options"] = json!({"include_usage": true});
    let text = sluice
        .post_chat(&client(), &body)
        .await
        .text()
        .await
        .unwrap();
    let events = events(&text);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
}

/// A non-streaming answer is passed through byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_body_is_unchanged() {
    let vm01 = mock("vm01", &["m"]).await;
    let sluice = Sluice::start(&backend("vm01", &vm01.url(), &["m"], ""));
    let client = client();
    let via_sluice: Value = client
        .post(sluice.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let direct: Value = client
        .post(format!("{}/v1/chat/completions", vm01.url()))
        .json(&chat("m"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let strip = |mut v: Value| {
        v["id"] = Value::Null;
        v["created"] = Value::Null;
        v
    };
    assert_eq!(strip(via_sluice), strip(direct));
}
