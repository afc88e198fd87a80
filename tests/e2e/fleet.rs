//! Fleet management: active health checks, recovery, timeouts and retries,
//! model discovery, `/health`, `/load-stats`, and live config reload.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice::tools::mock::{MockBackend, MockConfig};

use crate::common::*;

/// Health checks fast enough for a test.
fn fast_checks() -> Config {
    Config::new()
        .set("health_check", "interval", "100ms")
        .set("health_check", "timeout", "500ms")
        .set("health_check", "unhealthy_after", 2)
        .set("health_check", "healthy_after", 2)
}

/// Starts a mock on `addr` again after it was stopped (the port may take
/// a moment to be free).
async fn revive(addr: SocketAddr, config: MockConfig) -> MockBackend {
    for _ in 0..100 {
        if let Ok(backend) = MockBackend::start(addr, config.clone()).await {
            return backend;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("could not listen on {addr} again");
}

async fn health(client: &reqwest::Client, sluice: &Sluice) -> (u16, Value) {
    let response = client.get(sluice.url("/health")).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// The `/health` entry of one backend.
async fn backend_health(client: &reqwest::Client, sluice: &Sluice, name: &str) -> Value {
    let (_, report) = health(client, sluice).await;
    report["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in /health: {report}"))
}

/// Polls until `/health` says `name` is (or is not) healthy; the time it
/// took. Panics after `limit`.
async fn until_health(
    client: &reqwest::Client,
    sluice: &Sluice,
    name: &str,
    healthy: bool,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if backend_health(client, sluice, name).await["healthy"] == healthy {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} did not become healthy={healthy} within {limit:?}");
}

/// Sends chat requests for `model` from `workers` tasks until `stop`; every
/// answer must be 200. Returns (requests, failures).
fn steady_load(
    sluice: &Sluice,
    model: &str,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    let url = sluice.url("/v1/chat/completions");
    let model = model.to_string();
    tokio::spawn(async move {
        let sent = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..workers)
            .map(|_| {
                let (url, model, stop, sent) =
                    (url.clone(), model.clone(), stop.clone(), sent.clone());
                tokio::spawn(async move {
                    let client = client();
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        sent.fetch_add(1, Ordering::Relaxed);
                        match client.post(&url).json(&chat(&model)).send().await {
                            Ok(r) if r.status() == 200 => {
                                let _ = r.bytes().await;
                            }
                            Ok(r) => failures.push(format!(
                                "{}: {}",
                                r.status(),
                                r.text().await.unwrap_or_default()
                            )),
                            Err(e) => failures.push(e.to_string()),
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    failures
                })
            })
            .collect();
        let mut failures = Vec::new();
        for t in tasks {
            failures.extend(t.await.unwrap());
        }
        (sent.load(Ordering::Relaxed), failures)
    })
}

/// The field's `001` scenario with active checks: a backend stops, is
/// marked down within the configured checks while no request fails, comes
/// back and takes traffic again without an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_backend_is_marked_down_and_recovers_by_itself() {
    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let sluice = Sluice::start(
        &fast_checks()
            .two_backends(&vm01.url(), &vm02.url(), 2)
            .to_toml(),
    );
    let client = client();
    let (status, report) = health(&client, &sluice).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["backends"][1]["max_concurrent"], 2);

    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(&sluice, "m", 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let addr = vm02.addr;
    vm02.stop();
    let killed = Instant::now();
    let down = until_health(&client, &sluice, "vm02", false, Duration::from_secs(5)).await;
    let at_down = vm01.stats.requests.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        vm01.stats.requests.load(Ordering::Relaxed) > at_down,
        "traffic goes on to vm01"
    );
    let entry = backend_health(&client, &sluice, "vm02").await;
    assert!(entry["last_error"].as_str().is_some(), "{entry}");
    assert!(entry["last_check"].as_u64().is_some(), "{entry}");
    eprintln!(
        "vm02 killed -> marked down in {:?}",
        down.min(killed.elapsed())
    );

    let vm02 = revive(addr, MockConfig::new("vm02", &["m"])).await;
    let up = until_health(&client, &sluice, "vm02", true, Duration::from_secs(5)).await;
    eprintln!("vm02 revived -> marked up in {up:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (sent, failures) = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(
        vm02.stats.requests.load(Ordering::Relaxed) > 0,
        "traffic returned to vm02"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_when_every_backend_is_down_and_models_lists_healthy_ones() {
    let vm01 = mock("vm01", &["a"]).await;
    let vm02 = mock("vm02", &["b"]).await;
    let sluice = Sluice::start(
        &fast_checks()
            .backend(Backend::new("vm01", &vm01.url()).models(["a"]))
            .backend(Backend::new("vm02", &vm02.url()).models(["b"]))
            .to_toml(),
    );
    let client = client();
    let ids = |v: Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let models = || async {
        let r = client.get(sluice.url("/v1/models")).send().await.unwrap();
        ids(r.json().await.unwrap())
    };
    assert_eq!(models().await, ["a", "b"]);
    vm02.stop();
    until_health(&client, &sluice, "vm02", false, Duration::from_secs(5)).await;
    assert_eq!(
        models().await,
        ["a"],
        "a down backend's models are not listed"
    );
    let (status, _) = health(&client, &sluice).await;
    assert_eq!(status, 200, "one backend is still up");
    vm01.stop();
    until_health(&client, &sluice, "vm01", false, Duration::from_secs(5)).await;
    let (status, report) = health(&client, &sluice).await;
    assert_eq!(status, 503, "{report}");
    assert_eq!(report["status"], "unavailable");
    let r = sluice.post_chat(&client, &chat("a")).await;
    expect_error(r, 503, "no_backend_available").await;
}

/// A backend that accepts but never answers: the request times out there
/// and is retried on the other backend; the client sees a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_backend_times_out_and_the_request_moves_on() {
    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    vm01.stats.header_delay_ms.store(10_000, Ordering::Relaxed);
    let sluice = Sluice::start(
        &Config::new()
            .server("response_timeout", "300ms")
            .set("health_check", "enabled", false)
            .set("ejection", "after_failures", 1)
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .backend(Backend::new("vm02", &vm02.url()).models(["m"]))
            .to_toml(),
    );
    let client = client();
    for _ in 0..20 {
        let r = sluice.post_chat(&client, &chat("m")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-sluice-backend"], "vm02");
    }
    let stats: Value = get_json(&client, &sluice.url("/load-stats")).await;
    let vm01_stats = &stats["backends"][0];
    assert_eq!(vm01_stats["name"], "vm01");
    assert!(vm01_stats["failures"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(
        vm01_stats["healthy"], false,
        "ejected after its timeouts: {stats}"
    );
    assert_eq!(stats["backends"][1]["served"], 20, "{stats}");
    let model = &stats["models"][0];
    assert_eq!(model["model"], "m");
    assert_eq!(model["served"], 20);
    assert!(model["ttfb_ms"]["p50"].as_f64().unwrap() > 0.0, "{stats}");
    assert!(model["duration_ms"]["p99"].as_f64().is_some(), "{stats}");
}

/// Retryable statuses move on, others reach the client; `max_retries`
/// bounds the attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_configured_statuses_and_bound() {
    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let vm03 = mock("vm03", &["m"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .set("retry", "max_retries", 1)
            .set("retry", "on_status", vec![503])
            .steady()
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .backend(Backend::new("vm02", &vm02.url()).models(["m"]))
            .backend(Backend::new("vm03", &vm03.url()).models(["m"]))
            .to_toml(),
    );
    let client = client();
    vm01.stats.fail_status.store(503, Ordering::Relaxed);
    for _ in 0..20 {
        let r = sluice.post_chat(&client, &chat("m")).await;
        assert_eq!(r.status(), 200, "a 503 moves on");
        assert_ne!(r.headers()["x-sluice-backend"], "vm01");
    }
    vm01.stats.fail_status.store(500, Ordering::Relaxed);
    let mut passed_through = 0;
    for _ in 0..30 {
        let r = sluice.post_chat(&client, &chat("m")).await;
        if r.headers()["x-sluice-backend"] == "vm01" {
            assert_eq!(
                r.status(),
                500,
                "a 500 is not in on_status: the client gets it"
            );
            passed_through += 1;
        }
    }
    assert!(passed_through > 0);
    // Two of three failing with 503: one retry is not always enough.
    vm01.stats.fail_status.store(503, Ordering::Relaxed);
    vm02.stats.fail_status.store(503, Ordering::Relaxed);
    let before = [&vm01, &vm02, &vm03].map(|m| m.stats.requests.load(Ordering::Relaxed));
    let mut failed = 0;
    for _ in 0..30 {
        let r = sluice.post_chat(&client, &chat("m")).await;
        if r.status() != 200 {
            assert_eq!(r.status(), 503);
            failed += 1;
        }
    }
    let after = [&vm01, &vm02, &vm03].map(|m| m.stats.requests.load(Ordering::Relaxed));
    let attempts: u64 = after.iter().zip(before).map(|(a, b)| a - b).sum();
    assert!(
        failed > 0,
        "with max_retries = 1 some requests meet two 503s"
    );
    assert!(
        attempts <= 60,
        "at most two attempts per request, saw {attempts}"
    );
}

/// A request a policy marked not idempotent is sent once: a 503 or a
/// timeout from the first target reaches the client instead of a retry.
/// When nothing was sent (connection refused) it still moves on. Unmarked
/// requests are retried as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_marked_not_idempotent_is_never_sent_twice() {
    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .server("response_timeout", "500ms")
            .steady()
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .backend(Backend::new("vm02", &vm02.url()).models(["m"]))
            .backend(Backend::new("dead", "http://127.0.0.1:9").models(["m"]))
            .policy(Policy::guest("pin", "pin-backend").config(json!({"default": "vm01,vm02"})))
            .to_toml(),
    );
    let client = client();
    let send = |targets: &'static str, marked: bool| {
        let mut request = client
            .post(sluice.url("/v1/chat/completions"))
            .header("x-pin-backend", targets)
            .json(&chat("m"));
        if marked {
            request = request.header("x-not-idempotent", "1");
        }
        request.send()
    };
    let requests = |m: &MockBackend| m.stats.requests.load(Ordering::Relaxed);

    vm01.stats.fail_status.store(503, Ordering::Relaxed);
    let retried = send("vm01,vm02", false).await.unwrap();
    assert_eq!(retried.status(), 200, "unmarked: the 503 moves on");
    assert_eq!(retried.headers()["x-sluice-backend"], "vm02");
    let (one, two) = (requests(&vm01), requests(&vm02));
    let once = send("vm01,vm02", true).await.unwrap();
    assert_eq!(once.status(), 503, "marked: the client gets the 503");
    assert_eq!(requests(&vm01), one + 1);
    assert_eq!(
        requests(&vm02),
        two,
        "a marked request reached a second backend"
    );

    vm01.stats.fail_status.store(0, Ordering::Relaxed);
    vm01.stats.header_delay_ms.store(2_000, Ordering::Relaxed);
    let two = requests(&vm02);
    let timed_out = send("vm01,vm02", true).await.unwrap();
    assert_eq!(timed_out.status(), 504);
    assert_eq!(
        requests(&vm02),
        two,
        "a timed-out marked request was retried"
    );
    let moved = send("vm01,vm02", false).await.unwrap();
    assert_eq!(moved.status(), 200, "unmarked: the timeout moves on");

    // Refused: nothing was sent, so even a marked request moves on.
    let refused = send("dead,vm02", true).await.unwrap();
    assert_eq!(refused.status(), 200);
    assert_eq!(refused.headers()["x-sluice-backend"], "vm02");
}

/// A backend configured without models is asked for them, at start and at
/// every check: a model loaded later appears without a config change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_discovered_and_follow_the_backend() {
    let vm01 = mock("vm01", &["glm4-9b"]).await;
    // No `models`: they are discovered.
    let sluice = Sluice::start(
        &fast_checks()
            .backend(Backend::new("vm01", &vm01.url()))
            .to_toml(),
    );
    let client = client();
    let r = sluice.post_chat(&client, &chat("glm4-9b")).await;
    assert_eq!(r.status(), 200, "discovered before the first request");
    let r = sluice.post_chat(&client, &chat("qwen2.5-1.5b")).await;
    expect_error(r, 404, "model_not_found").await;

    let addr = vm01.addr;
    vm01.stop();
    let _vm01 = revive(addr, MockConfig::new("vm01", &["glm4-9b", "qwen2.5-1.5b"])).await;
    let start = Instant::now();
    loop {
        let r = sluice.post_chat(&client, &chat("qwen2.5-1.5b")).await;
        if r.status() == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "qwen never appeared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let entry = backend_health(&client, &sluice, "vm01").await;
    assert_eq!(entry["models"], json!(["glm4-9b", "qwen2.5-1.5b"]));
}

/// Writes a whole new file in one step (as editors and config management
/// do): the watcher polls, and could otherwise read a half-written file and
/// refuse it for the wrong reason.
fn replace_file(path: &std::path::Path, text: &str) {
    let next = path.with_extension("toml.next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// Editing the file adds a backend under load with no failed request; a
/// broken file is refused naming the key and the running config stays;
/// SIGHUP applies a changed limit at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_a_backend_under_load_and_refuses_a_bad_file() {
    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let vm03 = mock("vm03", &["m"]).await;
    let slots = |name: &str, url: &str, n: u32| {
        Backend::new(name, url)
            .models(["m"])
            .max_concurrent_requests(n)
    };
    let watched = fast_checks().server("reload_interval", "100ms");
    let two = |n: u32| {
        watched
            .clone()
            .backend(slots("vm01", &vm01.url(), n))
            .backend(slots("vm02", &vm02.url(), n))
    };
    let sluice = Sluice::start(&two(4).to_toml());
    let config_path = sluice.dir.0.join("sluice.toml");
    let client = client();
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(&sluice, "m", 6, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let vm03_slots = slots("vm03", &vm03.url(), 4);
    replace_file(&config_path, &two(4).backend(vm03_slots.clone()).to_toml());
    let start = Instant::now();
    while vm03.stats.requests.load(Ordering::Relaxed) < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "vm03 takes no traffic"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("reload -> vm03 serving in {:?}", start.elapsed());

    replace_file(
        &config_path,
        &watched
            .clone()
            .backend(slots("vm01", &vm01.url(), 4).set("max_concurrent_requests", "lots"))
            .backend(slots("vm02", &vm02.url(), 4))
            .backend(vm03_slots)
            .to_toml(),
    );
    let start = Instant::now();
    while !sluice.log().contains("config reload refused") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no refusal logged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        sluice.log().contains("max_concurrent_requests"),
        "{}",
        sluice.log()
    );
    let served = vm03.stats.requests.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        vm03.stats.requests.load(Ordering::Relaxed) > served,
        "still serving"
    );

    // Back to a valid file: vm03 removed, higher limits.
    std::fs::write(&config_path, two(7).to_toml()).unwrap();
    let start = Instant::now();
    while backend_health(&client, &sluice, "vm01").await["max_concurrent"] != 7 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "reload not applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, report) = health(&client, &sluice).await;
    assert_eq!(
        report["backends"].as_array().unwrap().len(),
        2,
        "vm03 removed"
    );
    // Requests that had read the old fleet may still reach vm03 just after.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let at_removal = vm03.stats.requests.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        vm03.stats.requests.load(Ordering::Relaxed),
        at_removal,
        "a removed backend gets no new requests"
    );
    stop.store(true, Ordering::Relaxed);
    let (sent, failures) = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}

/// With file watching off, SIGHUP reloads: a changed limit and weight
/// apply at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file() {
    let vm01 = mock("vm01", &["m"]).await;
    let config = |slots: u32| {
        Config::new()
            .server("reload_interval", "0s")
            .backend(
                Backend::new("vm01", &vm01.url())
                    .models(["m"])
                    .max_concurrent_requests(slots),
            )
            .to_toml()
    };
    let sluice = Sluice::start(&config(2));
    let client = client();
    std::fs::write(sluice.dir.0.join("sluice.toml"), config(5)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        backend_health(&client, &sluice, "vm01").await["max_concurrent"],
        2,
        "not watched: nothing changes before the signal"
    );
    std::process::Command::new("kill")
        .args(["-HUP", &sluice.pid().to_string()])
        .status()
        .unwrap();
    let start = Instant::now();
    while backend_health(&client, &sluice, "vm01").await["max_concurrent"] != 5 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "SIGHUP not applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = sluice.post_chat(&client, &chat("m")).await;
    assert_eq!(r.status(), 200);
}

/// Requests waiting for a slot when one of two full backends dies: the one
/// in flight there and those handed its freed slot move to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_full_backend_loses_no_queued_request() {
    let vm01 = mock_with(paced(
        "vm01",
        &["m"],
        sluice::tools::mock::Flavor::Vllm,
        20,
        10,
    ))
    .await;
    let vm02 = mock_with(paced(
        "vm02",
        &["m"],
        sluice::tools::mock::Flavor::Vllm,
        20,
        10,
    ))
    .await;
    let sluice = Sluice::start(
        &Config::new()
            .set("health_check", "enabled", false)
            .two_backends(&vm01.url(), &vm02.url(), 1)
            .to_toml(),
    );
    let client = client();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (client, url) = (client.clone(), sluice.url("/v1/chat/completions"));
            tokio::spawn(async move {
                let r = client.post(url).json(&chat("m")).send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    vm02.stop();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
}
