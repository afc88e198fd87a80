//! Edge workers: a spin-sdk 7 component (`wasi:http/handler@0.3.0`) and a
//! `wasi:http/incoming-handler@0.2` component, built from source, mounted
//! on `/tools/*` next to the OpenAI API.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use sluice::tools::mock::MockBackend;

/// The `tools` worker on `/tools/*`, built from the test guest `module`.
fn tools(module: &str) -> Worker {
    Worker::guest("tools", "/tools/*", module)
}

/// A gateway with one backend and this worker.
async fn start(worker: Worker) -> (MockBackend, Sluice) {
    let vm01 = mock("vm01", &["m"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .worker(worker)
            .to_toml(),
    );
    (vm01, sluice)
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, String) {
    let response = client.get(url).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spin_worker_answers_on_its_route_next_to_the_openai_api() {
    let (_vm01, sluice) = start(tools("spin-tools")).await;
    let client = client();
    assert_eq!(
        get(&client, &sluice.url("/tools/hello")).await,
        (200, "hello from spin".into())
    );
    let echoed = client
        .post(sluice.url("/tools/echo"))
        .body("a body of 21 bytes..!")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.status(), 200);
    assert_eq!(
        echoed.text().await.unwrap(),
        "echo 21 bytes: a body of 21 bytes..!"
    );
    let (status, text) = get(&client, &sluice.url("/tools/nothing-here")).await;
    assert_eq!(
        (status, text.as_str()),
        (404, "no tool at /tools/nothing-here")
    );
    // The OpenAI API and the gateway's own paths are untouched.
    let chat = client
        .post(sluice.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);
    assert_eq!(get(&client, &sluice.url("/ready")).await.0, 200);
    let listing = get_json(&client, &sluice.admin_url("/admin/workers")).await;
    assert_eq!(listing[0]["name"], "tools", "{listing}");
    assert_eq!(listing[0]["kind"], "wasi:http/handler@0.3", "{listing}");
    assert_eq!(listing[0]["version"], 1, "{listing}");

    // A worker's bounds changed in the file: reloading says they wait for
    // a restart (only modules are replaced live), and the worker serves on.
    let path = sluice.dir.0.join("sluice.toml");
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        config.replace(
            "route = \"/tools/*\"",
            "route = \"/tools/*\"\ntimeout = \"5s\"",
        ),
    )
    .unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &sluice.pid().to_string()])
        .status()
        .unwrap();
    let asked = std::time::Instant::now();
    while !sluice.log().contains("PUT /admin/workers/NAME") {
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(5),
            "no warning about the changed [[workers]]: {}",
            sluice.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        get(&client, &sluice.url("/tools/hello")).await,
        (200, "hello from spin".into())
    );
}

/// Outbound HTTP reaches the listed host and nothing else: the refused
/// request never opens a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_calls_only_the_hosts_it_lists() {
    let vm01 = mock("vm01", &["m"]).await;
    let unlisted = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let unlisted_addr = unlisted.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let seen = connections.clone();
    tokio::spawn(async move {
        while let Ok((_socket, _)) = unlisted.accept().await {
            seen.fetch_add(1, Ordering::Relaxed);
        }
    });
    let allowed = vm01.addr.to_string();
    let sluice = Sluice::start(
        &Config::new()
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .worker(tools("spin-tools").set("allowed_hosts", vec![allowed.as_str()]))
            .to_toml(),
    );
    let client = client();
    let (status, text) = get(
        &client,
        &sluice.url(&format!("/tools/fetch?url=http://{allowed}/v1/models")),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.starts_with("fetched 200: {"), "{text}");
    assert!(text.contains("\"m\""), "{text}");

    for url in [
        format!("http://{unlisted_addr}/steal"),
        format!("http://localhost:{}/v1/models", vm01.addr.port()),
    ] {
        let (status, text) = get(&client, &sluice.url(&format!("/tools/fetch?url={url}"))).await;
        assert_eq!(status, 502, "{url}: {text}");
        assert!(text.contains("HttpRequestDenied"), "{url}: {text}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(connections.load(Ordering::Relaxed), 0);
    let metrics = get_text(&client, &sluice.url("/metrics")).await;
    assert!(
        metrics.contains("sluice_worker_outbound_refused_total{worker=\"tools\"} 2"),
        "{metrics}"
    );
}

/// The policies' bounds hold for workers: a loop ends at the timeout, a
/// memory bomb at the cap, each with an OpenAI-shaped error, and the next
/// request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_or_hoarding_worker_is_ended_and_the_next_request_served() {
    let (_vm01, sluice) = start(
        tools("spin-tools")
            .set("timeout", "500ms")
            .set("memory_limit", "32MiB"),
    )
    .await;
    let client = client();
    let started = Instant::now();
    let spin = client.get(sluice.url("/tools/spin")).send().await.unwrap();
    assert_eq!(spin.status(), 504);
    let error: serde_json::Value = spin.json().await.unwrap();
    assert_eq!(error["error"]["code"], "worker_timeout", "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    let eat = client.get(sluice.url("/tools/eat")).send().await.unwrap();
    assert_eq!(eat.status(), 502);
    let error: serde_json::Value = eat.json().await.unwrap();
    assert_eq!(error["error"]["code"], "worker_failed", "{error}");
    assert_eq!(error["error"]["type"], "server_error", "{error}");

    // Both at once with ordinary requests: those are answered.
    let bad: Vec<_> = ["/tools/spin", "/tools/eat", "/tools/spin"]
        .into_iter()
        .map(|path| tokio::spawn(client.get(sluice.url(path)).send()))
        .collect();
    for _ in 0..20 {
        assert_eq!(
            get(&client, &sluice.url("/tools/hello")).await,
            (200, "hello from spin".into())
        );
    }
    for b in bad {
        assert!(b.await.unwrap().unwrap().status().is_server_error());
    }
    assert_eq!(get(&client, &sluice.url("/ready")).await.0, 200);
}

/// Replacing the module under load: 20 deploys alternating between the
/// spin-sdk component and the 0.2 component while four clients keep
/// asking. No request fails, every answer comes whole from one version,
/// and each deploy serves the very next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_hot_replaced_under_load_with_no_failed_request() {
    let (_vm01, sluice) = start(tools("spin-tools")).await;
    let client = client();
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (client, url) = (client.clone(), sluice.url("/tools/hello"));
            let (stop, served) = (stop.clone(), served.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (status, text) = get(&client, &url).await;
                    assert_eq!(status, 200, "{text}");
                    assert!(
                        text == "hello from spin" || text == "hello from p2",
                        "a torn answer: {text}"
                    );
                    served.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let modules = [
        (
            std::fs::read(test_guest("p2-tools")).unwrap(),
            "hello from p2",
            "wasi:http/incoming-handler@0.2",
        ),
        (
            std::fs::read(test_guest("spin-tools")).unwrap(),
            "hello from spin",
            "wasi:http/handler@0.3",
        ),
    ];
    for round in 0..20 {
        let (bytes, answer, kind) = &modules[round % 2];
        let response = client
            .put(sluice.admin_url("/admin/workers/tools"))
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let deployed: serde_json::Value = response.json().await.unwrap();
        assert_eq!(deployed["version"], round as u64 + 2, "{deployed}");
        assert_eq!(deployed["kind"], *kind, "{deployed}");
        assert_eq!(get(&client, &sluice.url("/tools/hello")).await.1, *answer);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let served = served.load(Ordering::Relaxed);
    assert!(served > 100, "only {served} requests under load");
    eprintln!("20 worker deploys under load: {served} requests, none failed");

    // The last deploy (v21) was the spin component; a rollback brings back
    // what served before it (p2, v20), a second one what served before
    // that (spin, v19).
    for answer in ["hello from p2", "hello from spin"] {
        let response = client
            .post(sluice.admin_url("/admin/workers/tools/rollback"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(get(&client, &sluice.url("/tools/hello")).await.1, answer);
    }
    // A module that is not a worker is refused, naming why; the worker
    // keeps serving.
    let refused = client
        .put(sluice.admin_url("/admin/workers/tools"))
        .body(std::fs::read(test_guest("pin-backend")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let error: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_module", "{error}");
    assert_eq!(
        get(&client, &sluice.url("/tools/hello")).await.1,
        "hello from spin"
    );
    let unknown = client
        .put(sluice.admin_url("/admin/workers/nobody"))
        .body(modules[0].0.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // A restart serves the last deployed version.
    let sluice = sluice.restart();
    assert_eq!(
        get(&client, &sluice.url("/tools/hello")).await.1,
        "hello from spin"
    );
    let listing = get_json(&client, &sluice.admin_url("/admin/workers")).await;
    // 1 at start, 20 deploys (v21), 2 rollbacks back to v19.
    assert_eq!(listing[0]["version"], 19, "{listing}");
}

/// `max_concurrent_requests` bounds the instances alive: beyond it a
/// request waits a second, then gets 503 `worker_busy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_answers_503_instead_of_piling_up_instances() {
    let (_vm01, sluice) = start(
        tools("spin-tools")
            .set("timeout", "3s")
            .set("max_concurrent_requests", 1),
    )
    .await;
    let client = client();
    assert_eq!(get(&client, &sluice.url("/tools/hello")).await.0, 200);
    let looping = tokio::spawn(client.get(sluice.url("/tools/spin")).send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let busy = client.get(sluice.url("/tools/hello")).send().await.unwrap();
    assert_eq!(busy.status(), 503);
    let error: serde_json::Value = busy.json().await.unwrap();
    assert_eq!(error["error"]["code"], "worker_busy", "{error}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(looping.await.unwrap().unwrap().status(), 504);
    assert_eq!(get(&client, &sluice.url("/tools/hello")).await.0, 200);
}
