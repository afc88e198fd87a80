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
