//! Token accounting: exact counts for streams without changing what the
//! client sees, estimates marked as such, Prometheus metrics, and usage
//! records in SQLite that survive a graceful shutdown.

use std::time::Duration;

use serde_json::{json, Value};
use sluice::tools::mock::Flavor;

use crate::common::*;

/// The stream with the per-response `id` and `created` numbers blanked,
/// so two runs of the same request compare byte for byte.
fn normalised(stream: &str) -> String {
    let mut out = String::new();
    let mut rest = stream;
    while let Some(i) = rest.find(|c: char| c.is_ascii_digit()) {
        let before = &rest[..i];
        let digits = rest[i..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len() - i);
        out.push_str(before);
        if before.ends_with("\"created\":") || before.ends_with("chatcmpl-") {
            out.push('N');
        } else {
            out.push_str(&rest[i..i + digits]);
        }
        rest = &rest[i + digits..];
    }
    out.push_str(rest);
    out
}

async fn usage_totals(client: &reqwest::Client, sluice: &Sluice) -> Value {
    // Records reach SQLite within the writer's flush interval (a stream
    // counted with the tokenizer later, off the executor): read until two
    // reads 300 ms apart agree, for at most 10 s.
    let read =
        || async { get_json(client, &sluice.admin_url("/admin/usage")).await["rows"][0].clone() };
    let started = std::time::Instant::now();
    let mut last = Value::Null;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = read().await;
        if (!now.is_null() && now == last) || started.elapsed() > Duration::from_secs(10) {
            return now;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_counted_exactly_and_clients_see_what_they_asked_for() {
    let vm01 = mock_with(paced("vm01", &["m"], Flavor::Vllm, 0, 8)).await;
    let sluice = Sluice::start(&backend("vm01", &vm01.url(), &["m"], ""));
    let client = client();
    let mut body = stream_chat("m");

    let via_sluice = sluice.post_chat(&client, &body).await.text().await.unwrap();
    assert_eq!(
        vm01.stats.last_request().unwrap().1["stream_options"]["include_usage"],
        true
    );
    let direct = client
        .post(format!("{}/v1/chat/completions", vm01.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !via_sluice.contains("\"usage\""),
        "the usage the gateway asked for reached the client"
    );
    assert_eq!(
        normalised(&via_sluice),
        normalised(&direct),
        "the client's stream changed"
    );

    let totals = usage_totals(&client, &sluice).await;
    assert_eq!(totals["requests"], 1);
    assert_eq!(totals["completion_tokens"], 8);
    assert_eq!(totals["prompt_tokens"], 6);
    assert_eq!(totals["estimated_requests"], 0);
    assert!(totals["avg_ttft_ms"].as_f64().is_some());

    body["stream_options"] = json!({"include_usage": true});
    let asked = sluice.post_chat(&client, &body).await.text().await.unwrap();
    assert!(asked.contains("\"completion_tokens\":8"), "{asked}");
}

/// The usage chunk of a stream, if any: `choices` empty, `usage` set.
fn usage_chunks(stream: &str) -> Vec<Value> {
    stream
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter(|chunk| chunk["usage"].is_object())
        .collect()
}

/// llama.cpp's server ignores `include_usage`: a client that asked for it
/// still gets the usage chunk — the gateway's estimate, the same numbers
/// it records — just before `[DONE]`, in the stream's envelope, whether
/// or not a response hook reads the stream. A client that did not ask
/// gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_asking_for_usage_gets_it_when_the_backend_sends_none() {
    let mut config = paced("vm01", &["m"], Flavor::Vllm, 0, 8);
    config.reports_usage = false;
    let vm01 = mock_with(config).await;
    let plain = Config::new().backend(Backend::new("vm01", &vm01.url()).models(["m"]));
    let hooked = plain
        .clone()
        .policy(
            Policy::builtin("sensitive-words")
                .config(serde_json::json!({"words": ["secret"], "scope": "response"})),
        )
        .policy(Policy::builtin("model-router"));
    for (policies, config) in [("none", plain), ("a response hook", hooked)] {
        let sluice = Sluice::start(&config.to_toml());
        let client = client();
        let mut body = stream_chat("m");
        let plain = sluice.post_chat(&client, &body).await.text().await.unwrap();
        assert!(usage_chunks(&plain).is_empty(), "{plain}");

        body["stream_options"] = json!({"include_usage": true});
        let asked = sluice.post_chat(&client, &body).await.text().await.unwrap();
        let chunks = usage_chunks(&asked);
        assert_eq!(chunks.len(), 1, "policies {policies:?}: {asked}");
        let usage = &chunks[0];
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["object"], "chat.completion.chunk");
        assert_eq!(usage["model"], "m");
        assert!(usage["id"].as_str().is_some_and(|id| !id.is_empty()));
        let data: Vec<&str> = asked
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "{asked}");
        let before_done: Value = serde_json::from_str(data[data.len() - 2]).unwrap();
        assert_eq!(
            &before_done, usage,
            "the usage chunk is not the last before [DONE]"
        );
        let expected = sluice::api::tokens::count_text("Hello from vm01. the quick brown fox");
        assert_eq!(usage["usage"]["completion_tokens"], expected);
        let prompt = sluice::api::tokens::count_prompt(&stream_chat("m"));
        assert_eq!(usage["usage"]["prompt_tokens"], prompt);
        assert_eq!(usage["usage"]["total_tokens"], prompt + expected);

        let totals = usage_totals(&client, &sluice).await;
        assert_eq!(totals["requests"], 2);
        assert_eq!(totals["estimated_requests"], 2);
        assert_eq!(totals["completion_tokens"], 2 * expected);
    }
}

/// A backend that never reports usage (as llama.cpp's server in streams):
/// the gateway counts with a tokenizer and marks the record estimated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_without_usage_is_counted_with_a_tokenizer() {
    let mut config = paced("vm01", &["m"], Flavor::Ollama, 0, 8);
    config.reports_usage = false;
    let vm01 = mock_with(config).await;
    let sluice = Sluice::start(&backend("vm01", &vm01.url(), &["m"], ""));
    let client = client();
    let body = stream_chat("m");
    sluice.post_chat(&client, &body).await.text().await.unwrap();
    let totals = usage_totals(&client, &sluice).await;
    assert_eq!(totals["estimated_requests"], 1);
    let expected = sluice::api::tokens::count_text("Hello from vm01. the quick brown fox");
    assert_eq!(totals["completion_tokens"], expected);
    assert_eq!(
        totals["prompt_tokens"],
        sluice::api::tokens::count_prompt(&chat("m"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_with_a_real_prometheus_parser() {
    let vm01 = mock("vm01", &["m"]).await;
    let sluice = Sluice::start(&backend("vm01", &vm01.url(), &["m"], ""));
    let client = client();
    for stream in [false, true] {
        let mut body = chat("m");
        body["stream"] = json!(stream);
        sluice.post_chat(&client, &body).await.text().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = client
        .get(sluice.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let parser = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
names = {s.name for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples}
print("\n".join(sorted(names)))
"#;
    let mut python = std::process::Command::new("python3")
        .args(["-c", parser])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    python
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = python.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the parser refused /metrics: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let names = String::from_utf8_lossy(&output.stdout);
    for name in [
        "sluice_requests_total",
        "sluice_tokens_total",
        "sluice_time_to_first_token_seconds_bucket",
        "sluice_request_duration_seconds_count",
        "sluice_backend_in_flight",
        "sluice_policy_call_seconds_bucket",
    ] {
        assert!(
            names.lines().any(|l| l == name),
            "{name} missing from {names}"
        );
    }
    let tokens: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("sluice_tokens_total"))
        .collect();
    assert!(tokens.contains(&"sluice_tokens_total{model=\"m\",backend=\"vm01\",consumer=\"\",kind=\"completion\"} 32"), "{tokens:?}");
}

/// SIGTERM while streams are running: they finish within the drain time,
/// and every request's record is in SQLite after the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_survives_a_graceful_shutdown_under_load() {
    let vm01 = mock_with(paced("vm01", &["m"], Flavor::Vllm, 50, 12)).await;
    let mut sluice = Sluice::start(&backend("vm01", &vm01.url(), &["m"], ""));
    let client = client();
    let mut quick = Vec::new();
    for i in 0..100 {
        let (client, url) = (client.clone(), sluice.url("/v1/chat/completions"));
        quick.push(tokio::spawn(async move {
            let mut body = chat("m");
            body["max_tokens"] = json!(2);
            body["stream"] = json!(i % 2 == 0);
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }));
    }
    for task in quick {
        task.await.unwrap();
    }
    let mut slow = Vec::new();
    for _ in 0..10 {
        let (client, url) = (client.clone(), sluice.url("/v1/chat/completions"));
        slow.push(tokio::spawn(async move {
            let body = stream_chat("m");
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = sluice.terminate();
        (status, sluice)
    });
    for task in slow {
        let text = task.await.unwrap();
        assert!(
            text.ends_with("data: [DONE]\n\n"),
            "a stream was cut by the shutdown: {text}"
        );
    }
    let (status, sluice) = status.await.unwrap();
    assert!(status.success(), "{status}");
    let db = rusqlite::Connection::open(sluice.dir.0.join("sluice-usage.db")).unwrap();
    let (rows, tokens): (i64, i64) = db
        .query_row(
            "SELECT COUNT(*), SUM(completion_tokens) FROM usage",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let estimated: i64 = db
        .query_row("SELECT COUNT(*) FROM usage WHERE estimated", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!((rows, estimated), (110, 0));
    assert_eq!(tokens, 100 * 2 + 10 * 12);
}
