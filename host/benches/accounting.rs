//! Cost of accounting one request on the gateway's side: start, parsing
//! and reading each chunk of a streamed answer (first token, usage chunk),
//! finish — metrics, and the usage record handed to the SQLite writer or
//! not.
//!
//! Run: `cargo bench -p sluice --bench accounting`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice::dataplane::accounting::{Accounting, Ledger};
use sluice::usage::{UsageStore, WriterOptions};

/// A streamed answer of `tokens` chunks and a usage chunk, as vLLM sends it.
fn chunks(tokens: usize) -> Vec<String> {
    let mut out: Vec<serde_json::Value> = (0..tokens)
        .map(|i| {
            serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
                "choices": [{"index": 0, "delta": {"content": format!(" word{i}")}, "finish_reason": null}]})
        })
        .collect();
    out.push(serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m", "choices": [],
        "usage": {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}}));
    out.iter().map(|c| c.to_string()).collect()
}

fn run(label: &str, ledger: Arc<Ledger>, stream: &[String]) {
    let body = Bytes::from_static(
        br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
    );
    let account = |id: u64| {
        let mut acct = Accounting::start(
            ledger.clone(),
            id,
            "chat.completions",
            "m",
            true,
            None,
            body.clone(),
        );
        acct.answered("vm01", "m", 200);
        for chunk in stream {
            if let Ok(chunk) = serde_json::from_str::<serde_json::Value>(chunk) {
                acct.on_chunk(&chunk);
            }
        }
        acct.finish();
    };
    for id in 0..2_000 {
        account(id);
    }
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut id = 10_000;
    while Instant::now() < deadline {
        let start = Instant::now();
        for _ in 0..1_000 {
            id += 1;
            account(id);
        }
        samples.push(start.elapsed().as_nanos() as f64 / 1_000.0);
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "accounting, {label}: median {:.0} ns/request, best {:.0} ns ({} x 1000)",
        samples[samples.len() / 2],
        samples[0],
        samples.len()
    );
}

fn main() -> anyhow::Result<()> {
    let stream = chunks(32);
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store = UsageStore::open(&dir.join("usage.db"), WriterOptions::default())?;
    run(
        "32-chunk stream, no SQLite",
        Arc::new(Ledger {
            store: None,
            access_log: false,
        }),
        &stream,
    );
    run(
        "32-chunk stream, SQLite",
        Arc::new(Ledger {
            store: Some(store.clone()),
            access_log: false,
        }),
        &stream,
    );
    let written = store.shutdown(Duration::from_secs(30));
    println!(
        "all records written: {written}; dropped {}",
        store.dropped()
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
