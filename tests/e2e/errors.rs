//! Every way a request can fail gets an OpenAI-shaped error with the right
//! status, and nothing reaches a backend that should not.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use sluice::tools::mock::Flavor;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors() {
    let vm01 = mock("vm01", &["m"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .server("max_body_bytes", "64KiB")
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .to_toml(),
    );
    let client = client();
    let post = |body: Vec<u8>| {
        client
            .post(sluice.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    expect_error(
        post(b"{\"model\": \"m\", ".to_vec()).await.unwrap(),
        400,
        "invalid_json",
    )
    .await;
    expect_error(
        post(b"\xff\xfe".to_vec()).await.unwrap(),
        400,
        "invalid_json",
    )
    .await;
    let missing = expect_error(
        post(br#"{"messages":[]}"#.to_vec()).await.unwrap(),
        400,
        "missing_model",
    )
    .await;
    assert_eq!(missing["error"]["param"], "model");
    assert_eq!(missing["error"]["type"], "invalid_request_error");
    expect_error(
        post(br#"{"model":["m"]}"#.to_vec()).await.unwrap(),
        400,
        "invalid_request_body",
    )
    .await;
    let unknown = expect_error(
        post(serde_json::to_vec(&chat("gpt-9")).unwrap())
            .await
            .unwrap(),
        404,
        "model_not_found",
    )
    .await;
    assert!(unknown["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gpt-9"));

    // Over the limit, announced by content-length and streamed chunked.
    let big = serde_json::to_vec(&json!({"model": "m", "prompt": "x".repeat(100_000)})).unwrap();
    expect_error(post(big.clone()).await.unwrap(), 413, "request_too_large").await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(8192).map(|c| Ok(c.to_vec())).collect();
    let chunked = client
        .post(sluice.url("/v1/chat/completions"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    expect_error(chunked, 413, "request_too_large").await;

    expect_error(
        client.get(sluice.url("/v1/nothing")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    let wrong_method = client
        .get(sluice.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.headers()["allow"], "POST");
    expect_error(wrong_method, 405, "method_not_allowed").await;

    assert_eq!(
        vm01.stats.requests.load(Ordering::Relaxed),
        0,
        "a bad request reached the backend"
    );
}

/// Long-context prompts of several MiB pass under the default limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_megabyte_prompts_pass() {
    let vm01 = mock("vm01", &["m"]).await;
    let sluice = Sluice::start(&backend("vm01", &vm01.url(), &["m"], ""));
    let prompt = "token ".repeat(1_500_000);
    let body = json!({"model": "m", "messages": [{"role": "user", "content": prompt}]});
    let response = sluice.post_chat(&client(), &body).await;
    assert_eq!(response.status(), 200);
    let seen = vm01.stats.last_request().unwrap().1;
    assert_eq!(
        seen["messages"][0]["content"].as_str().unwrap().len(),
        prompt.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_backend_is_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let sluice = Sluice::start(&backend("vm01", &format!("http://{closed}"), &["m"], ""));
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    let body = expect_error(response, 502, "backend_unreachable").await;
    assert_eq!(body["error"]["type"], "server_error");
}

/// The policy lists both backends; the dead one is skipped and the live one
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_backend_fails_over_to_the_next_target() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let vm02 = mock("vm02", &["m"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .backend(Backend::new("vm01", &format!("http://{closed}")).models(["m"]))
            .backend(Backend::new("vm02", &vm02.url()).models(["m"]))
            .to_toml(),
    );
    let client = client();
    for _ in 0..20 {
        let response = client
            .post(sluice.url("/v1/chat/completions"))
            .json(&chat("m"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-sluice-backend"], "vm02");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_backend_is_504() {
    let vm01 = mock("vm01", &["m"]).await;
    vm01.stats.header_delay_ms.store(5_000, Ordering::Relaxed);
    let sluice = Sluice::start(
        &Config::new()
            .server("response_timeout", "300ms")
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .to_toml(),
    );
    let started = std::time::Instant::now();
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    expect_error(response, 504, "backend_timeout").await;
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}

/// With its only backend at `max_concurrent_requests`, a request waits in
/// line; past `queue_timeout` it gets 503 with `Retry-After`, and past
/// `max_queue` it gets that at once. The GPU is never overloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backend_queues_within_bounds() {
    let vm01 = mock_with(paced("vm01", &["m"], Flavor::Vllm, 100, 10)).await;
    let sluice = Sluice::start(
        &Config::new()
            .server("queue_timeout", "300ms")
            .server("max_queue", 1)
            .backend(
                Backend::new("vm01", &vm01.url())
                    .models(["m"])
                    .max_concurrent_requests(1),
            )
            .to_toml(),
    );
    let client = client();
    let body = stream_chat("m");
    let holding = sluice.post_chat(&client, &body).await;
    assert_eq!(holding.status(), 200);

    let waiter = {
        let (client, url) = (client.clone(), sluice.url("/v1/chat/completions"));
        tokio::spawn(async move { client.post(url).json(&chat("m")).send().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = client
        .post(sluice.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.headers()["retry-after"], "1");
    expect_error(refused, 503, "queue_full").await;
    let timed_out = waiter.await.unwrap();
    assert_eq!(timed_out.headers()["retry-after"], "1");
    expect_error(timed_out, 503, "queue_timeout").await;

    // The slot comes back when the stream ends.
    holding.text().await.unwrap();
    let response = client
        .post(sluice.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(vm01.stats.max_in_flight.load(Ordering::SeqCst), 1);
}

/// Twenty slow streams over two backends limited to two each: never more
/// than two in flight per backend (measured at the backends), the rest wait
/// in line, and all of them complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_streams_queue_behind_two_slots_each() {
    let vm01 = mock_with(paced("vm01", &["m"], Flavor::Vllm, 20, 8)).await;
    let vm02 = mock_with(paced("vm02", &["m"], Flavor::Ollama, 20, 8)).await;
    let sluice = Sluice::start(
        &Config::new()
            .two_backends(&vm01.url(), &vm02.url(), 2)
            .to_toml(),
    );
    let client = client();
    let mut streams = Vec::new();
    for _ in 0..20 {
        let (client, url) = (client.clone(), sluice.url("/v1/chat/completions"));
        streams.push(tokio::spawn(async move {
            let body = stream_chat("m");
            let response = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap()
        }));
    }
    for stream in streams {
        assert!(stream.await.unwrap().ends_with("data: [DONE]\n\n"));
    }
    assert!(vm01.stats.max_in_flight.load(Ordering::SeqCst) <= 2);
    assert!(vm02.stats.max_in_flight.load(Ordering::SeqCst) <= 2);
    let served =
        vm01.stats.requests.load(Ordering::SeqCst) + vm02.stats.requests.load(Ordering::SeqCst);
    assert_eq!(served, 20);
}

/// A backend's own error status goes to the client unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_pass_through() {
    let vm01 = mock("vm01", &["m"]).await;
    vm01.stats.fail_status.store(429, Ordering::Relaxed);
    let sluice = Sluice::start(&backend("vm01", &vm01.url(), &["m"], ""));
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["x-sluice-backend"], "vm01");
}

/// A policy that names a backend that does not exist fails closed with 503
/// naming the policy; with `on_error = "fail-open"` the chain goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_decisions_fail_closed_or_open_as_configured() {
    let vm01 = mock("vm01", &["m"]).await;
    let chain = |on_error: &str| {
        Config::new()
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .policy(
                Policy::guest("pin", "pin-backend")
                    .config(json!({"default": "vm01"}))
                    .on_error(on_error),
            )
            .policy(Policy::builtin("model-router"))
            .to_toml()
    };
    let closed = Sluice::start(&chain("fail-closed"));
    let response = client()
        .post(closed.url("/v1/chat/completions"))
        .header("x-pin-backend", "nope")
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    let body = expect_error(response, 503, "policy_failed").await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("`pin`"),
        "{body}"
    );
    assert!(
        closed.log().contains("unknown backend `nope`"),
        "{}",
        closed.log()
    );

    let open = Sluice::start(&chain("fail-open"));
    let response = client()
        .post(open.url("/v1/chat/completions"))
        .header("x-pin-backend", "nope")
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}
