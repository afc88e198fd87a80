//! Routing by model, balancing by weight and load, aliases, custom guests.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use serde_json::json;
use sluice::tools::mock::Flavor;

use crate::common::*;

async fn served_by(
    client: &reqwest::Client,
    sluice: &Sluice,
    model: &str,
    n: usize,
) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let response = client
            .post(sluice.url("/v1/chat/completions"))
            .json(&chat(model))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let backend = response.headers()["x-sluice-backend"]
            .to_str()
            .unwrap()
            .to_string();
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains(&backend));
        *counts.entry(backend).or_default() += 1;
    }
    counts
}

/// The field's first scenario: glm4-9b on vm01 and vm02, qwen2.5-1.5b only
/// on vm01.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glm4_spreads_over_both_and_qwen_stays_on_vm01() {
    let vm01 = mock("vm01", &["glm4-9b", "qwen2.5-1.5b"]).await;
    let vm02 = mock("vm02", &["glm4-9b"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .backend(Backend::new("vm01", &vm01.url()).models(["glm4-9b", "qwen2.5-1.5b"]))
            .backend(Backend::new("vm02", &vm02.url()).models(["glm4-9b"]))
            .to_toml(),
    );
    let client = client();

    let glm = served_by(&client, &sluice, "glm4-9b", 400).await;
    let (a, b) = (glm["vm01"], glm["vm02"]);
    assert!(
        (140..=260).contains(&a) && a + b == 400,
        "glm4-9b split {glm:?}"
    );

    let qwen = served_by(&client, &sluice, "qwen2.5-1.5b", 100).await;
    assert_eq!(
        qwen.get("vm01"),
        Some(&100),
        "qwen2.5-1.5b went to {qwen:?}"
    );
    assert_eq!(
        vm02.stats.requests.load(Ordering::Relaxed),
        b as u64,
        "vm02 saw only glm4-9b"
    );
    assert_eq!(vm01.stats.requests.load(Ordering::Relaxed), a as u64 + 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_set_the_split() {
    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]).weight(3))
            .backend(Backend::new("vm02", &vm02.url()).models(["m"]).weight(1))
            .to_toml(),
    );
    let counts = served_by(&client(), &sluice, "m", 800).await;
    let share = counts["vm01"] as f64 / 800.0;
    assert!(
        (0.68..=0.82).contains(&share),
        "3:1 weights gave {counts:?}"
    );
}

/// 8 clients at once on two equally fast backends weighted 3:1: the split
/// stays near 75/25 (a discount by plain in-flight count gave ~66 %).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_hold_with_concurrent_clients() {
    let pace = |name| {
        let mut config = paced(name, &["m"], Flavor::Vllm, 0, 4);
        config.first_token_delay = std::time::Duration::from_millis(8);
        config
    };
    let vm01 = mock_with(pace("vm01")).await;
    let vm02 = mock_with(pace("vm02")).await;
    let sluice = Sluice::start(
        &Config::new()
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]).weight(3))
            .backend(Backend::new("vm02", &vm02.url()).models(["m"]).weight(1))
            .to_toml(),
    );
    let counts = concurrent_split(&sluice, 8, 60).await;
    let share = counts.get("vm01").copied().unwrap_or(0) as f64 / 480.0;
    assert!(
        (0.69..=0.81).contains(&share),
        "3:1 weights with 8 clients gave {counts:?}"
    );
}

/// Equal weights, but vm02 takes eight times longer per request: its
/// requests pile up and it gets clearly less than half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_gets_less() {
    let mut fast = paced("vm01", &["m"], Flavor::Vllm, 0, 4);
    fast.first_token_delay = std::time::Duration::from_millis(5);
    let mut slow = paced("vm02", &["m"], Flavor::Vllm, 0, 4);
    slow.first_token_delay = std::time::Duration::from_millis(40);
    let vm01 = mock_with(fast).await;
    let vm02 = mock_with(slow).await;
    let sluice = Sluice::start(
        &Config::new()
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .backend(Backend::new("vm02", &vm02.url()).models(["m"]))
            .to_toml(),
    );
    let counts = concurrent_split(&sluice, 8, 40).await;
    let share = counts.get("vm02").copied().unwrap_or(0) as f64 / 320.0;
    assert!(share < 0.3, "the slow backend got {counts:?}");
}

/// `clients` tasks each sending `each` chat requests one after another;
/// how many each backend answered.
async fn concurrent_split(sluice: &Sluice, clients: usize, each: usize) -> HashMap<String, usize> {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let client = client();
            let url = sluice.url("/v1/chat/completions");
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..each {
                    seen.push(chat_backend(&client, &url, "m").await);
                }
                seen
            })
        })
        .collect();
    let mut counts = HashMap::new();
    for task in tasks {
        for backend in task.await.unwrap() {
            *counts.entry(backend).or_default() += 1;
        }
    }
    counts
}

/// Under concurrent load the router prefers the less busy backend, and the
/// host never lets a backend past its `max_concurrent_requests`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_respect_max_concurrent_requests() {
    let vm01 = mock_with(paced("vm01", &["m"], Flavor::Vllm, 40, 8)).await;
    let vm02 = mock_with(paced("vm02", &["m"], Flavor::Ollama, 40, 8)).await;
    let sluice = Sluice::start(
        &Config::new()
            .two_backends(&vm01.url(), &vm02.url(), 2)
            .to_toml(),
    );
    let client = client();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, url) = (client.clone(), sluice.url("/v1/chat/completions"));
        tasks.push(tokio::spawn(async move {
            let body = stream_chat("m");
            let response = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap()
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap().ends_with("data: [DONE]\n\n"));
    }
    assert!(vm01.stats.max_in_flight.load(Ordering::SeqCst) <= 2);
    assert!(vm02.stats.max_in_flight.load(Ordering::SeqCst) <= 2);
    assert_eq!(
        vm01.stats.requests.load(Ordering::SeqCst),
        2,
        "load spread evenly"
    );
    assert_eq!(
        vm02.stats.requests.load(Ordering::SeqCst),
        2,
        "load spread evenly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_reach_the_backend_as_the_real_name() {
    let vm01 = mock("vm01", &["glm4-9b"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .backend(Backend::new("vm01", &vm01.url()).models(["glm4-9b"]))
            .policy(Policy::builtin("model-router").config(json!({"aliases": {"glm4": "glm4-9b"}})))
            .to_toml(),
    );
    let mut body = chat("glm4");
    body["temperature"] = json!(0.25);
    let response = sluice.post_chat(&client(), &body).await;
    assert_eq!(response.status(), 200);
    let (path, seen) = vm01.stats.last_request().unwrap();
    assert_eq!(path, "/v1/chat/completions");
    assert_eq!(seen["model"], "glm4-9b");
    assert_eq!(seen["temperature"], 0.25);
    assert_eq!(seen["messages"], body["messages"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_endpoint_lists_the_fleet() {
    let vm01 = mock("vm01", &["glm4-9b", "qwen2.5-1.5b"]).await;
    let vm02 = mock("vm02", &["glm4-9b"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .backend(Backend::new("vm01", &vm01.url()).models(["glm4-9b", "qwen2.5-1.5b"]))
            .backend(Backend::new("vm02", &vm02.url()).models(["glm4-9b"]))
            .to_toml(),
    );
    let list: serde_json::Value = client()
        .get(sluice.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["glm4-9b", "qwen2.5-1.5b"]);
    assert_eq!(list["data"][0]["object"], "model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_embeddings_are_proxied() {
    let vm01 = mock("vm01", &["m", "embed"]).await;
    let sluice = Sluice::start(&backend("vm01", &vm01.url(), &["m", "embed"], ""));
    let client = client();
    let completion: serde_json::Value = client
        .post(sluice.url("/v1/completions"))
        .json(&json!({"model": "m", "prompt": "Once upon", "max_tokens": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(completion["choices"][0]["text"], "Hello from vm01");
    assert_eq!(completion["usage"]["completion_tokens"], 3);

    let embedding: serde_json::Value = client
        .post(sluice.url("/v1/embeddings"))
        .json(&json!({"model": "embed", "input": ["a", "b c"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(embedding["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        embedding["data"][1]["embedding"].as_array().unwrap().len(),
        8
    );
}

/// A policy built from source by the test build (`tests/guests/pin-backend`)
/// loaded from a file: it reads headers, the body and its config, and every
/// kind of decision it makes is carried out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_from_a_file_sees_headers_body_and_config() {
    let vm01 = mock("vm01", &["m", "other"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .backend(Backend::new("vm01", &vm01.url()).models(["m", "other"]))
            .backend(Backend::new("vm02", &vm02.url()).models(["m"]))
            .policy(Policy::guest("pin", "pin-backend").config(json!({"default": "vm02"})))
            .to_toml(),
    );
    let client = client();
    let send = |headers: &[(&str, &str)], body: serde_json::Value| {
        let mut request = client.post(sluice.url("/v1/chat/completions")).json(&body);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        request.send()
    };
    let backend_of = |r: &reqwest::Response| {
        r.headers()["x-sluice-backend"]
            .to_str()
            .unwrap()
            .to_string()
    };

    // Config default, then a header, with a credential the guest must not see.
    let r = send(&[("authorization", "Bearer sk-secret")], chat("m"))
        .await
        .unwrap();
    assert_eq!((r.status().as_u16(), backend_of(&r)), (200, "vm02".into()));
    let r = send(&[("x-pin-backend", "vm01")], chat("m")).await.unwrap();
    assert_eq!(backend_of(&r), "vm01");

    // A target with another model: the backend receives that model.
    let r = send(
        &[("x-pin-backend", "vm01"), ("x-pin-model", "other")],
        chat("m"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(vm01.stats.last_request().unwrap().1["model"], "other");

    // A rejection decided from the body.
    let mut body = chat("m");
    body["user"] = json!("teapot");
    let r = send(&[], body).await.unwrap();
    let error = expect_error(r, 418, "teapot").await;
    assert_eq!(error["error"]["message"], "short and stout");
}
