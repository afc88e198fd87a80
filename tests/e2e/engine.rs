//! Engine signals: what the engines report about themselves (queue, batch,
//! KV cache) is scraped off the request path and shown in `/health` and
//! `/metrics`; a metrics endpoint that hangs, answers garbage or answers a
//! huge body costs the requests nothing and leaves the backend up, its
//! saturation unknown.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice::tools::mock::MockConfig;
use sluice::tools::mock_engine::{EngineModel, MetricsFault, MetricsFlavor};

use crate::common::*;

/// Scrapes fast enough for a test.
const FAST_SCRAPES: &str = r#"
[engine_metrics]
interval = "50ms"
timeout = "300ms"
stale_after = "400ms"
"#;

fn engine_mock(name: &str, model: EngineModel) -> MockConfig {
    let mut config = MockConfig::new(name, &["m"]);
    config.engine = Some(model);
    config
}

/// Polls `/health` until `check` holds for backend `name`'s entry; panics
/// with the last entry after `limit`.
async fn until_backend(
    client: &reqwest::Client,
    sluice: &Sluice,
    name: &str,
    limit: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < limit {
        let report = get_json(client, &sluice.url("/health")).await;
        if let Some(entry) = report["backends"]
            .as_array()
            .and_then(|all| all.iter().find(|b| b["name"] == name))
        {
            if check(entry) {
                return entry.clone();
            }
            last = entry.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{name} never matched within {limit:?}; last: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_queue_and_a_full_kv_cache_show_in_health_and_metrics() {
    let mut config = engine_mock(
        "gpu",
        EngineModel {
            kv_blocks: 4,
            block_tokens: 4,
            max_batch: 1,
            ..EngineModel::default()
        },
    );
    config.token_interval = Duration::from_millis(60);
    config.answer_tokens = 10;
    let gpu = mock_with(config).await;
    let sluice = Sluice::start(&format!(
        "{}{FAST_SCRAPES}",
        backend("gpu", &gpu.url(), &["m"], "engine = \"vllm\"")
    ));
    let client = client();
    let idle = until_backend(&client, &sluice, "gpu", Duration::from_secs(5), |b| {
        b["engine"]["status"] == "fresh"
    })
    .await;
    assert_eq!(idle["engine"]["engine"], "vllm");
    assert_eq!(idle["engine"]["signals"]["waiting"], 0, "{idle}");

    let long_prompt = "tell me a long story about a fox that jumps over lazy dogs ".repeat(3);
    let requests: Vec<_> = (0..5)
        .map(|_| {
            let client = client.clone();
            let url = sluice.url("/v1/chat/completions");
            let body =
                json!({"model": "m", "messages": [{"role": "user", "content": long_prompt}]});
            tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap().status() })
        })
        .collect();
    let busy = until_backend(&client, &sluice, "gpu", Duration::from_secs(5), |b| {
        b["engine"]["signals"]["waiting"].as_u64() >= Some(3)
    })
    .await;
    let signals = &busy["engine"]["signals"];
    assert_eq!(signals["running"], 1, "{busy}");
    assert!(signals["kv_usage"].as_f64().unwrap() > 0.9, "{busy}");
    assert_eq!(busy["healthy"], true);
    let metrics = get_text(&client, &sluice.url("/metrics")).await;
    let waiting = metric(&metrics, "sluice_engine_requests_waiting{backend=\"gpu\"}");
    assert!(waiting.is_some_and(|w| w >= 2.0), "{metrics}");
    assert_eq!(
        metric(&metrics, "sluice_engine_signals_fresh{backend=\"gpu\"}"),
        Some(1.0)
    );
    assert!(
        metric(&metrics, "sluice_engine_kv_cache_usage{backend=\"gpu\"}").is_some_and(|k| k > 0.9)
    );
    for r in requests {
        assert_eq!(r.await.unwrap(), 200);
    }
}

/// Three engines whose metrics misbehave (one hangs, one answers garbage
/// after a good start, one answers 100 MiB): chat requests go on as if
/// nothing happened, each backend stays up, and `/health` says why its
/// saturation is unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_garbage_and_huge_metrics_cost_the_requests_nothing() {
    let sglang = EngineModel {
        metrics: MetricsFlavor::Sglang,
        ..EngineModel::default()
    };
    let hang = mock_with(engine_mock("hang", EngineModel::default())).await;
    let garbage = mock_with(engine_mock("garbage", sglang)).await;
    let huge = mock_with(engine_mock("huge", EngineModel::default())).await;
    let fault = |m: &sluice::tools::mock::MockBackend, f| m.engine.as_ref().unwrap().set_fault(f);
    fault(&hang, MetricsFault::Hang);
    fault(&huge, MetricsFault::Huge);
    let sluice = Sluice::start(&format!(
        "{}{}{}{FAST_SCRAPES}",
        backend("hang", &hang.url(), &["m"], "engine = \"vllm\""),
        backend("garbage", &garbage.url(), &["m"], "engine = \"sglang\""),
        backend("huge", &huge.url(), &["m"], "engine = \"vllm\""),
    ));
    let client = client();
    let seen = until_backend(&client, &sluice, "garbage", Duration::from_secs(5), |b| {
        b["engine"]["status"] == "fresh"
    })
    .await;
    assert_eq!(seen["engine"]["signals"]["waiting"], 0, "{seen}");
    fault(&garbage, MetricsFault::Garbage);

    let started = Instant::now();
    let mut served = std::collections::HashMap::<String, u32>::new();
    let url = sluice.url("/v1/chat/completions");
    for _ in 0..60 {
        let by = chat_backend(&client, &url, "m").await;
        *served.entry(by).or_default() += 1;
    }
    assert_eq!(served.len(), 3, "every backend still serves: {served:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "60 requests took {:?}",
        started.elapsed()
    );

    for (name, status, reason) in [
        ("hang", "unknown", "timeout"),
        ("garbage", "stale", "parse"),
        ("huge", "unknown", "too_large"),
    ] {
        let entry = until_backend(&client, &sluice, name, Duration::from_secs(5), |b| {
            b["engine"]["status"] == status && b["engine"]["error_reason"] == reason
        })
        .await;
        assert_eq!(entry["healthy"], true, "{entry}");
        assert!(
            entry["engine"]["error"]
                .as_str()
                .is_some_and(|e| !e.is_empty()),
            "{entry}"
        );
    }
    let metrics = get_text(&client, &sluice.url("/metrics")).await;
    for (name, reason) in [
        ("hang", "timeout"),
        ("garbage", "parse"),
        ("huge", "too_large"),
    ] {
        let errors = metric(
            &metrics,
            &format!("sluice_engine_scrape_errors_total{{backend=\"{name}\",reason=\"{reason}\"}}"),
        );
        assert!(errors.is_some_and(|n| n >= 1.0), "{name}: {metrics}");
        assert_eq!(
            metric(
                &metrics,
                &format!("sluice_engine_signals_fresh{{backend=\"{name}\"}}")
            ),
            Some(0.0)
        );
        assert_eq!(
            metric(
                &metrics,
                &format!("sluice_engine_requests_waiting{{backend=\"{name}\"}}")
            ),
            None,
            "no stale value shown as current"
        );
    }
}

/// A metrics endpoint on 127.0.0.1 answering whatever text the test sets:
/// an engine's report without an engine (the backend itself is a plain
/// mock, pointed here by `metrics_url`).
struct FakeMetrics {
    url: String,
    text: std::sync::Arc<std::sync::Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeMetrics {
    async fn start(text: &str) -> FakeMetrics {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/metrics", listener.local_addr().unwrap());
        let text = std::sync::Arc::new(std::sync::Mutex::new(text.to_string()));
        let shared = text.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let text = shared.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16384 {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body = text.lock().unwrap().clone();
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        FakeMetrics { url, text, task }
    }

    fn set(&self, text: &str) {
        *self.text.lock().unwrap() = text.to_string();
    }

    /// The backend keys that read this endpoint as a vLLM engine's.
    fn keys(&self) -> String {
        format!("engine = \"vllm\"\nmetrics_url = {:?}", self.url)
    }
}

impl Drop for FakeMetrics {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What vLLM reports, in its own metric names.
fn vllm(waiting: u32, running: u32, kv: f64) -> String {
    format!(
        "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"m\"}} {waiting}\n\
         # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"m\"}} {running}\n\
         # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{model_name=\"m\"}} {kv}\n"
    )
}

/// `n` chat requests one after another; how many each backend answered.
async fn split(
    client: &reqwest::Client,
    sluice: &Sluice,
    model: &str,
    n: usize,
) -> std::collections::HashMap<String, usize> {
    let url = sluice.url("/v1/chat/completions");
    let mut served = std::collections::HashMap::new();
    for _ in 0..n {
        *served
            .entry(chat_backend(client, &url, model).await)
            .or_default() += 1;
    }
    served
}

/// Waits until `/health` shows each named backend's engine with `waiting`
/// as given (a fresh reading of what the fake endpoint says now).
async fn until_waiting(client: &reqwest::Client, sluice: &Sluice, expect: &[(&str, u64)]) {
    for (name, waiting) in expect {
        until_backend(client, sluice, name, Duration::from_secs(5), |b| {
            b["engine"]["status"] == "fresh" && b["engine"]["signals"]["waiting"] == *waiting
        })
        .await;
    }
}

/// One engine reports a deep queue, another a nearly full KV cache, the
/// third has room: the router sends (almost) everything to the third. When
/// the reports change, so does the traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_queue_or_a_full_kv_cache_gets_almost_no_new_requests() {
    let (vm01, vm02, vm03) = (
        mock("vm01", &["m"]).await,
        mock("vm02", &["m"]).await,
        mock("vm03", &["m"]).await,
    );
    let queued = FakeMetrics::start(&vllm(40, 16, 0.5)).await;
    let full = FakeMetrics::start(&vllm(1, 4, 0.99)).await;
    let room = FakeMetrics::start(&vllm(0, 4, 0.3)).await;
    let sluice = Sluice::start(&format!(
        "{}{}{}{FAST_SCRAPES}",
        backend("vm01", &vm01.url(), &["m"], &queued.keys()),
        backend("vm02", &vm02.url(), &["m"], &full.keys()),
        backend("vm03", &vm03.url(), &["m"], &room.keys()),
    ));
    let client = client();
    until_waiting(&client, &sluice, &[("vm01", 40), ("vm02", 1), ("vm03", 0)]).await;
    let served = split(&client, &sluice, "m", 60).await;
    assert!(served.get("vm03").copied().unwrap_or(0) >= 58, "{served:?}");

    // vm03's engine fills up, vm01's queue drains: the traffic follows.
    room.set(&vllm(50, 16, 0.6));
    queued.set(&vllm(0, 2, 0.2));
    until_waiting(&client, &sluice, &[("vm01", 0), ("vm03", 50)]).await;
    let served = split(&client, &sluice, "m", 60).await;
    assert!(served.get("vm01").copied().unwrap_or(0) >= 58, "{served:?}");
}

/// Metrics that were never readable (garbage from the start) and metrics
/// that went stale (good once, garbage since) leave a backend up with its
/// saturation unknown: it gets less than a backend with fresh signals and
/// room, but not nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_and_garbage_metrics_mean_less_traffic_never_down() {
    let (vm01, vm02, vm03) = (
        mock("vm01", &["m"]).await,
        mock("vm02", &["m"]).await,
        mock("vm03", &["m"]).await,
    );
    let fresh = FakeMetrics::start(&vllm(0, 0, 0.1)).await;
    let garbage = FakeMetrics::start("<html>this is not metrics</html>").await;
    let stale = FakeMetrics::start(&vllm(0, 0, 0.1)).await;
    let sluice = Sluice::start(&format!(
        "{}{}{}{FAST_SCRAPES}",
        backend("vm01", &vm01.url(), &["m"], &fresh.keys()),
        backend("vm02", &vm02.url(), &["m"], &garbage.keys()),
        backend("vm03", &vm03.url(), &["m"], &stale.keys()),
    ));
    let client = client();
    until_waiting(&client, &sluice, &[("vm01", 0), ("vm03", 0)]).await;
    stale.set("garbage now");
    for (name, status) in [("vm02", "unknown"), ("vm03", "stale")] {
        until_backend(&client, &sluice, name, Duration::from_secs(5), |b| {
            b["engine"]["status"] == status
        })
        .await;
    }
    let served = split(&client, &sluice, "m", 150).await;
    for name in ["vm02", "vm03"] {
        let n = served.get(name).copied().unwrap_or(0);
        assert!((2..=40).contains(&n), "{name}: {served:?}");
    }
    assert!(served.get("vm01").copied().unwrap_or(0) >= 80, "{served:?}");
    let report = get_json(&client, &sluice.url("/health")).await;
    for b in report["backends"].as_array().unwrap() {
        assert_eq!(b["healthy"], true, "{b}");
    }
}

/// A chat request whose prompt is conversation `c`'s first `turns` turns:
/// its own long system prompt, then user and assistant messages.
fn conversation(c: usize, turns: usize) -> Value {
    let mut messages = vec![json!({
        "role": "system",
        "content": format!("You are assistant number {c}. {}", "Answer briefly and kindly. ".repeat(30)),
    })];
    for t in 0..turns {
        messages.push(json!({"role": "user", "content": format!("Question {t} of conversation {c}: {}", "why? ".repeat(20))}));
        if t + 1 < turns {
            messages.push(json!({"role": "assistant", "content": format!("Answer {t}: {}", "because. ".repeat(20))}));
        }
    }
    json!({"model": "m", "messages": messages})
}

/// Eight conversations of five turns each, all at once, on two backends
/// without engine metrics: each later turn goes where the earlier turns
/// went (its prefix is cached there) far more often than chance, yet
/// neither backend gets the lion's share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_stick_to_their_prefix_while_load_stays_balanced() {
    let paced = |name: &str| {
        let mut config = MockConfig::new(name, &["m"]);
        config.first_token_delay = Duration::from_millis(20);
        config
    };
    let vm01 = mock_with(paced("vm01")).await;
    let vm02 = mock_with(paced("vm02")).await;
    let sluice = Sluice::start(&format!(
        "{}{}[[policies]]\nname = \"router\"\nmodule = \"builtin:model-router\"\nconfig = {{ scoring = {{ prefix_affinity = true }} }}\n",
        backend("vm01", &vm01.url(), &["m"], ""),
        backend("vm02", &vm02.url(), &["m"], ""),
    ));
    let client = client();
    let url = sluice.url("/v1/chat/completions");
    let tasks: Vec<_> = (0..8)
        .map(|c| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut served = Vec::new();
                for turn in 1..=5 {
                    let response = client
                        .post(&url)
                        .json(&conversation(c, turn))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    served.push(
                        response.headers()["x-sluice-backend"]
                            .to_str()
                            .unwrap()
                            .to_string(),
                    );
                    response.bytes().await.unwrap();
                }
                served
            })
        })
        .collect();
    let (mut stayed, mut moves, mut on_vm01) = (0, 0, 0);
    for task in tasks {
        let served = task.await.unwrap();
        on_vm01 += served.iter().filter(|b| *b == "vm01").count();
        for pair in served.windows(2) {
            if pair[0] == pair[1] {
                stayed += 1;
            } else {
                moves += 1;
            }
        }
    }
    // Chance would keep about half of the 32 later turns in place.
    assert!(stayed >= 26, "{stayed} stayed, {moves} moved");
    assert!((8..=32).contains(&on_vm01), "vm01 served {on_vm01} of 40");
    let report = get_json(&client, &sluice.url("/health")).await;
    let hits: f64 = report["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["prefix_index"]["hit_blocks"].as_f64().unwrap())
        .sum();
    assert!(hits > 0.0, "{report}");
    let metrics = get_text(&client, &sluice.url("/metrics")).await;
    assert!(
        metric(&metrics, "sluice_prefix_index_bytes{backend=\"vm01\"}").is_some_and(|b| b > 0.0),
        "{metrics}"
    );
}

/// What vLLM reports of its LoRA adapters (`vllm:lora_requests_info`).
fn vllm_lora(running: &str, max: u32) -> String {
    format!(
        "{}# TYPE vllm:lora_requests_info gauge\nvllm:lora_requests_info{{max_lora=\"{max}\",running_lora_adapters=\"{running}\",waiting_lora_adapters=\"\"}} 1.7e9\n",
        vllm(0, 2, 0.3)
    )
}

/// Two backends serve the base model and the `sql-lora` adapter; only one
/// has the adapter loaded (the other is full of others): requests for the
/// adapter go there, requests for the base model are spread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapters_requests_go_where_it_is_loaded() {
    let models = ["m", "sql-lora"];
    let (vm01, vm02) = (mock("vm01", &models).await, mock("vm02", &models).await);
    let without = FakeMetrics::start(&vllm_lora("chat-lora", 1)).await;
    let with = FakeMetrics::start(&vllm_lora("sql-lora", 1)).await;
    let sluice = Sluice::start(&format!(
        "{}{}{FAST_SCRAPES}",
        backend("vm01", &vm01.url(), &models, &without.keys()),
        backend("vm02", &vm02.url(), &models, &with.keys()),
    ));
    let client = client();
    until_waiting(&client, &sluice, &[("vm01", 0), ("vm02", 0)]).await;
    let served = split(&client, &sluice, "sql-lora", 50).await;
    assert!(served.get("vm02").copied().unwrap_or(0) >= 46, "{served:?}");
    let served = split(&client, &sluice, "m", 50).await;
    assert!(served.get("vm01").copied().unwrap_or(0) >= 12, "{served:?}");
    assert!(served.get("vm02").copied().unwrap_or(0) >= 12, "{served:?}");
}

/// A component built against 0.2.1 (the `pin-backend` test guest, kept in
/// `tests/fixtures/`) loads on the current host, is reported as 0.2.1, and
/// routes, rejects and marks requests not idempotent as it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_built_against_contract_0_2_1_still_works() {
    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/pin_backend-0.2.1.wasm"
    );
    let sluice = Sluice::start(&format!(
        "{}{}[[policies]]\nname = \"pin\"\nmodule = {fixture:?}\nconfig = {{ default = \"vm02\" }}\n",
        backend("vm01", &vm01.url(), &["m"], ""),
        backend("vm02", &vm02.url(), &["m"], ""),
    ));
    let client = client();
    for backend in ["vm01", "vm02"] {
        let response = client
            .post(sluice.url("/v1/chat/completions"))
            .header("x-pin-backend", backend)
            .json(&chat("m"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-sluice-backend"], backend);
    }
    // Not idempotent (the 0.2.1 import): vm01 answers 503, and the request
    // is not sent again to vm02 (unmarked, it would be).
    vm01.stats
        .fail_status
        .store(503, std::sync::atomic::Ordering::Relaxed);
    let response = client
        .post(sluice.url("/v1/chat/completions"))
        .header("x-pin-backend", "vm01,vm02")
        .header("x-not-idempotent", "1")
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503, "{:?}", response.text().await);
    assert_eq!(
        vm02.stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let teapot = client
        .post(sluice.url("/v1/chat/completions"))
        .json(&json!({"model": "m", "user": "teapot", "messages": []}))
        .send()
        .await
        .unwrap();
    expect_error(teapot, 418, "teapot").await;
    let list: Value = get_json(&client, &sluice.admin_url("/admin/policies")).await;
    assert_eq!(list[0]["contract"], "0.2.1", "{list}");
}

/// The bundled router as built against 0.2.2 (kept in `tests/fixtures/`)
/// loads on the 0.2.3 host, is reported as 0.2.2, and still reads the
/// engines through its 0.2.2 import: a deep queue gets (almost) nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_built_against_contract_0_2_2_still_reads_the_engines() {
    let (vm01, vm02) = (mock("vm01", &["m"]).await, mock("vm02", &["m"]).await);
    let queued = FakeMetrics::start(&vllm(40, 16, 0.5)).await;
    let room = FakeMetrics::start(&vllm(0, 4, 0.3)).await;
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/model_router-0.2.2.wasm"
    );
    let sluice = Sluice::start(&format!(
        "{}{}{FAST_SCRAPES}[[policies]]\nname = \"router\"\nmodule = {fixture:?}\n",
        backend("vm01", &vm01.url(), &["m"], &queued.keys()),
        backend("vm02", &vm02.url(), &["m"], &room.keys()),
    ));
    let client = client();
    until_waiting(&client, &sluice, &[("vm01", 40), ("vm02", 0)]).await;
    let served = split(&client, &sluice, "m", 40).await;
    assert!(served.get("vm02").copied().unwrap_or(0) >= 38, "{served:?}");
    let list: Value = get_json(&client, &sluice.admin_url("/admin/policies")).await;
    assert_eq!(list[0]["contract"], "0.2.2", "{list}");
}
