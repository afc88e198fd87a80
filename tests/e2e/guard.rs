//! Policies that guard and recover: sensitive-word filtering of prompts and
//! (streamed) answers, fallback to another model, and guests that misbehave
//! without hurting the host.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use sluice::tools::mock::Flavor;

use crate::common::*;

/// vm01 serving `m`, behind sensitive-words with this config and the
/// router.
fn guarded(url: &str, words: Value) -> String {
    Config::new()
        .backend(Backend::new("vm01", url).models(["m"]))
        .policy(Policy::builtin("sensitive-words").config(words))
        .policy(Policy::builtin("model-router"))
        .to_toml()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_prompts_never_reach_a_backend() {
    let vm01 = mock("vm01", &["m"]).await;
    let sluice = Sluice::start(&guarded(
        &vm01.url(),
        json!({"words": ["forbidden", "敏感词"], "scope": "request"}),
    ));
    let client = client();
    for text in ["tell me something FORBIDDEN", "这是一个敏感词测试"] {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": text}]});
        let response = sluice.post_chat(&client, &body).await;
        let error = expect_error(response, 400, "content_filter").await;
        assert!(
            !error.to_string().contains("敏感词"),
            "the error echoed the word: {error}"
        );
    }
    assert_eq!(vm01.stats.requests.load(Ordering::Relaxed), 0);
    let ok = client
        .post(sluice.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_prompts_reach_the_backend_masked() {
    let vm01 = mock("vm01", &["m"]).await;
    let sluice = Sluice::start(&guarded(
        &vm01.url(),
        json!({"words": ["secret", "机密"], "scope": "request", "action": "mask"}),
    ));
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "my Secret is 机密 ok"}], "temperature": 0.5});
    let response = sluice.post_chat(&client(), &body).await;
    assert_eq!(response.status(), 200);
    let seen = vm01.stats.last_request().unwrap().1;
    assert_eq!(seen["messages"][0]["content"], "my ****** is ** ok");
    assert_eq!(seen["temperature"], 0.5);
}

/// "quick brown" arrives as the tokens " quick" and " brown": the host holds
/// back enough text for the guest to see the phrase whole, and the stream
/// still arrives chunk by chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_word_split_across_chunks_is_masked_in_the_stream() {
    let vm01 = mock_with(paced("vm01", &["m"], Flavor::Vllm, 60, 12)).await;
    let sluice = Sluice::start(&guarded(
        &vm01.url(),
        json!({"words": ["quick brown"], "scope": "response", "action": "mask"}),
    ));
    let started = Instant::now();
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .json(&stream_chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(
        vm01.stats.streams_finished.load(Ordering::SeqCst),
        0,
        "the filter buffered the whole answer"
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    let mut text = String::from_utf8(first.to_vec()).unwrap();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events = events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        content(&events),
        "Hello from vm01. the *********** fox jumps over lazy dogs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_word_ends_the_stream_cleanly() {
    let vm01 = mock_with(paced("vm01", &["m"], Flavor::Ollama, 40, 16)).await;
    let sluice = Sluice::start(&guarded(
        &vm01.url(),
        json!({"words": ["brown fox"], "scope": "response"}),
    ));
    let text = client()
        .post(sluice.url("/v1/chat/completions"))
        .json(&stream_chat("m"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let stop: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(stop["choices"][0]["finish_reason"], "content_filter");
    let said = content(&events);
    assert!(
        !said.contains("brown fox") && said.starts_with("Hello from vm01."),
        "{said}"
    );
    // The backend's stream was dropped, not read to its end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(vm01.stats.streams_finished.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streamed_answers_are_masked_or_blocked() {
    let vm01 = mock("vm01", &["m"]).await;
    let masked = Sluice::start(&guarded(
        &vm01.url(),
        json!({"words": ["fox"], "patterns": ["l[a-z]zy"], "action": "mask"}),
    ));
    let answer: Value = client()
        .post(masked.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        text,
        "Hello from vm01. the quick brown *** jumps over **** dogs the quick brown ***"
    );
    assert_eq!(answer["usage"]["completion_tokens"], 16);

    let blocked = Sluice::start(&guarded(&vm01.url(), json!({"words": ["FOX"]})));
    let response = client()
        .post(blocked.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    expect_error(response, 400, "content_filter").await;
}

fn fallback_chain(qwen_url: &str, gemma_url: &str) -> String {
    Config::new()
        .backend(Backend::new("vm01", qwen_url).models(["qwen2-1-5b"]))
        .backend(Backend::new("vm02", gemma_url).models(["gemma-2-2b"]))
        .policy(Policy::builtin("sensitive-words").config(json!({"words": ["forbidden"]})))
        .policy(Policy::builtin("model-router"))
        .policy(
            Policy::builtin("fallback")
                .config(json!({"fallbacks": {"qwen2-1-5b": ["gemma-2-2b"]}})),
        )
        .to_toml()
}

/// The field's scenario: sensitive-words → model-router → fallback;
/// qwen2-1-5b's backend is down, the client asks for qwen2-1-5b and gets
/// gemma-2-2b's answer with no error, streamed or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_model_falls_back_to_another() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gemma = mock("vm02", &["gemma-2-2b"]).await;
    let sluice = Sluice::start(&fallback_chain(&format!("http://{closed}"), &gemma.url()));
    let client = client();

    let response = client
        .post(sluice.url("/v1/chat/completions"))
        .json(&chat("qwen2-1-5b"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-model"], "gemma-2-2b");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["model"], "gemma-2-2b");
    assert!(answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("Hello from vm02"));

    let text = client
        .post(sluice.url("/v1/chat/completions"))
        .json(&stream_chat("qwen2-1-5b"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["model"], "gemma-2-2b");
    assert_eq!(gemma.stats.last_request().unwrap().1["model"], "gemma-2-2b");

    // Once the dead server is marked down the router still routes there
    // and the host, sending nothing, lets the fallback move the request.
    for _ in 0..10 {
        let response = sluice.post_chat(&client, &chat("qwen2-1-5b")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-sluice-model"], "gemma-2-2b");
    }
    let health = get_json(&client, &sluice.url("/health")).await;
    assert_eq!(health["backends"][0]["healthy"], false, "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_falls_back_and_other_statuses_pass_through() {
    let qwen = mock("vm01", &["qwen2-1-5b"]).await;
    let gemma = mock("vm02", &["gemma-2-2b"]).await;
    let sluice = Sluice::start(&fallback_chain(&qwen.url(), &gemma.url()));
    let client = client();

    qwen.stats.fail_status.store(503, Ordering::Relaxed);
    let response = client
        .post(sluice.url("/v1/chat/completions"))
        .json(&stream_chat("qwen2-1-5b"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-backend"], "vm02");

    // 429 is not in the default trigger list: the client gets it as it was.
    qwen.stats.fail_status.store(429, Ordering::Relaxed);
    let response = client
        .post(sluice.url("/v1/chat/completions"))
        .json(&chat("qwen2-1-5b"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);

    // With gemma failing too, the last failure goes to the client.
    qwen.stats.fail_status.store(500, Ordering::Relaxed);
    gemma.stats.fail_status.store(502, Ordering::Relaxed);
    let response = client
        .post(sluice.url("/v1/chat/completions"))
        .json(&chat("qwen2-1-5b"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["x-sluice-backend"], "vm02");
}

/// After the first byte a stream cannot move: a backend that dies then ends
/// the client's stream with an error event and `[DONE]`, nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dying_mid_stream_ends_it_with_an_error_event() {
    let vm01 = mock_with(paced("vm01", &["m"], Flavor::Vllm, 50, 40)).await;
    let sluice = Sluice::start(&backend("vm01", &vm01.url(), &["m"], ""));
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .json(&stream_chat("m"))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    vm01.stop();
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = stream.next().await {
            text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        }
        text
    })
    .await
    .expect("the stream hung after its backend died");
    let events = events(&rest);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "backend_stream_error");
}

/// vm01 serving `m`, behind `bad` (see [`bad`]) and the router.
fn misbehaving(url: &str, bad: Policy) -> Config {
    Config::new()
        .backend(Backend::new("vm01", url).models(["m"]))
        .policy(bad)
        .policy(Policy::builtin("model-router"))
}

/// The `misbehave` guest, named `bad`, with this `on_error`.
fn bad(on_error: &str) -> Policy {
    Policy::guest("bad", "misbehave").on_error(on_error)
}

/// Each kind of bad guest costs its own request a clear 503 naming the
/// policy, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_guests_fail_closed_with_a_clear_error() {
    let vm01 = mock("vm01", &["m"]).await;
    // A small memory cap, so the memory bomb hits it well before its timeout.
    let sluice = Sluice::start(
        &misbehaving(&vm01.url(), bad("fail-closed"))
            .set("policy_runtime", "memory_limit", "8MiB")
            .to_toml(),
    );
    let client = client();
    for (behaviour, expected) in [
        ("trap", "it trapped"),
        ("loop", "it ran out of time"),
        ("host-loop", "it ran out of time"),
        ("oom", "it ran out of memory"),
        ("bad-decision", "invalid decision"),
        ("many-targets", "invalid decision"),
    ] {
        let started = Instant::now();
        let response = client
            .post(sluice.url("/v1/chat/completions"))
            .header("x-misbehave", behaviour)
            .json(&chat("m"))
            .send()
            .await
            .unwrap();
        let body = expect_error(response, 503, "policy_failed").await;
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("`bad`") && message.contains(expected),
            "{behaviour}: {message}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{behaviour} took {:?}",
            started.elapsed()
        );
    }
    // A huge rejection message is cut to size, not refused.
    let response = client
        .post(sluice.url("/v1/chat/completions"))
        .header("x-misbehave", "huge-message")
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    let body = expect_error(response, 400, "huge").await;
    assert_eq!(body["error"]["message"].as_str().unwrap().len(), 4096);

    assert_eq!(vm01.stats.requests.load(Ordering::Relaxed), 0);
    let ok = client
        .post(sluice.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let log = sluice.log();
    assert!(
        log.contains("misbehave: deliberate trap"),
        "the guest's panic message is not in the log"
    );
    let metrics = client
        .get(sluice.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for kind in ["trap", "timeout", "memory_limit", "invalid_decision"] {
        let line = format!("sluice_policy_failures_total{{policy=\"bad\",kind=\"{kind}\"}}");
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_open_guest_is_skipped() {
    let vm01 = mock("vm01", &["m"]).await;
    let sluice = Sluice::start(&misbehaving(&vm01.url(), bad("fail-open")).to_toml());
    for behaviour in ["trap", "loop", "oom"] {
        let response = client()
            .post(sluice.url("/v1/chat/completions"))
            .header("x-misbehave", behaviour)
            .json(&chat("m"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{behaviour}");
    }
}

/// While guests loop until their timeout, other requests keep flowing: a
/// looping guest yields at every epoch tick instead of holding its thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looping_guests_do_not_stall_other_requests() {
    let vm01 = mock("vm01", &["m"]).await;
    let sluice = Sluice::start(
        &misbehaving(&vm01.url(), bad("fail-closed"))
            .set("policy_runtime", "timeout", "1500ms")
            .to_toml(),
    );
    let client = client();
    let mut loops = Vec::new();
    for _ in 0..4 {
        let (client, url) = (client.clone(), sluice.url("/v1/chat/completions"));
        loops.push(tokio::spawn(async move {
            client
                .post(url)
                .header("x-misbehave", "loop")
                .json(&chat("m"))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    for _ in 0..20 {
        let response = client
            .post(sluice.url("/v1/chat/completions"))
            .json(&chat("m"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let good = started.elapsed();
    for task in loops {
        assert_eq!(task.await.unwrap(), 503);
    }
    assert!(
        good < Duration::from_millis(1000),
        "20 good requests took {good:?} beside 4 looping guests"
    );
}

/// The timeout is charged for the guest's own running, not for the time a
/// busy gateway keeps it waiting: a hundred guests each doing a few
/// milliseconds of work at once all finish, though every one of them waits
/// far longer than its timeout for its turns on the two threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_busy_executor_does_not_time_a_guest_out() {
    let vm01 = mock("vm01", &["m"]).await;
    let sluice = Sluice::start(
        &misbehaving(&vm01.url(), bad("fail-closed"))
            .set("policy_runtime", "timeout", "60ms")
            .to_toml(),
    );
    let client = client();
    let calls = (0..100).map(|_| {
        let (client, url) = (client.clone(), sluice.url("/v1/chat/completions"));
        tokio::spawn(async move {
            let started = Instant::now();
            let response = client
                .post(url)
                .header("x-misbehave", "work-3")
                .json(&chat("m"))
                .send()
                .await
                .unwrap();
            (response.status(), started.elapsed())
        })
    });
    let mut slowest = Duration::ZERO;
    for call in futures_util::future::join_all(calls).await {
        let (status, took) = call.unwrap();
        assert_eq!(status, 200, "{}", sluice.log());
        slowest = slowest.max(took);
    }
    eprintln!("slowest of 100 concurrent guests doing ~3 ms of work: {slowest:?}");
    // The guests really queued for longer than their timeout: otherwise
    // this test proves nothing.
    assert!(slowest > Duration::from_millis(60), "{slowest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_response_filter_ends_the_stream_cleanly() {
    let vm01 = mock_with(paced("vm01", &["m"], Flavor::Vllm, 5, 8)).await;
    let mut body = stream_chat("m");
    body["messages"][0]["content"] = json!("hi");
    let sluice = Sluice::start(
        &misbehaving(
            &vm01.url(),
            Policy::guest("bad", "misbehave").config(json!({"response": "trap"})),
        )
        .to_toml(),
    );
    // The mock's answer contains no "boom": the filter passes everything.
    let text = sluice
        .post_chat(&client(), &body)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(
        content(&events(&text)),
        "Hello from vm01. the quick brown fox"
    );
}

/// A streamed answer's response hook runs on one instance kept from chunk
/// to chunk (and freed when the answer ends). Each call still has its own
/// timeout: this guest works ~2 ms per chunk, the stream lasts ten times
/// the timeout, and no call is cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_response_instance_times_each_call_on_its_own() {
    let vm01 = mock_with(paced("vm01", &["m"], Flavor::Vllm, 15, 40)).await;
    let sluice = Sluice::start(
        &misbehaving(
            &vm01.url(),
            bad("fail-closed").config(json!({"response": "stop", "response_work": 2})),
        )
        .set("policy_runtime", "timeout", "60ms")
        .to_toml(),
    );
    let client = client();
    let response = sluice.post_chat(&client, &stream_chat("m")).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let mut kept_mid_stream = None;
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        if kept_mid_stream.is_none() && events(&text).len() > 10 {
            let metrics = get_text(&client, &sluice.url("/metrics")).await;
            kept_mid_stream = metric(&metrics, "sluice_policy_kept_instances");
        }
    }
    let events = events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert!(!text.contains("error"), "{text}");
    assert!(content(&events).ends_with("the quick brown fox"), "{text}");
    assert_eq!(kept_mid_stream, Some(1.0));
    let metrics = get_text(&client, &sluice.url("/metrics")).await;
    assert_eq!(metric(&metrics, "sluice_policy_kept_instances"), Some(0.0));
    assert!(
        !metrics.contains("sluice_policy_failures_total{"),
        "{metrics}"
    );
}

/// A kept instance is replaced after its share of calls: a 600-chunk stream
/// goes through three of them and every phrase in it is still masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_is_filtered_whole_across_kept_instances() {
    let vm01 = mock_with(paced("vm01", &["m"], Flavor::Vllm, 1, 600)).await;
    let sluice = Sluice::start(&guarded(
        &vm01.url(),
        json!({"words": ["quick brown"], "scope": "response", "action": "mask"}),
    ));
    let text = sluice
        .post_chat(&client(), &stream_chat("m"))
        .await
        .text()
        .await
        .unwrap();
    let events = events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let answer = content(&events);
    assert_eq!(answer.matches("***********").count(), 75, "{answer}");
    assert!(!answer.contains("quick"), "{answer}");
    assert!(
        answer.ends_with("lazy dogs the *********** fox"),
        "{answer}"
    );
}

/// A component built against the frozen 0.1.0 contract still loads and
/// routes (it picks the last backend serving the model).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_built_against_contract_0_1_still_works() {
    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .backend(Backend::new("vm02", &vm02.url()).models(["m"]))
            .policy(Policy::guest("legacy", "legacy-router"))
            .to_toml(),
    );
    let client = client();
    for _ in 0..10 {
        let response = client
            .post(sluice.url("/v1/chat/completions"))
            .json(&chat("m"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-sluice-backend"], "vm02");
    }
    let response = client
        .post(sluice.url("/v1/chat/completions"))
        .json(&chat("nope"))
        .send()
        .await
        .unwrap();
    expect_error(response, 404, "legacy_model_not_found").await;
}

/// A component built against 0.2.0 (the `pin-backend` test guest as it was
/// built before 0.2.1, kept in `tests/fixtures/`) loads on the 0.2.1 host,
/// is reported as 0.2.0, and routes and rejects as it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_built_against_contract_0_2_0_still_works() {
    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/pin_backend-0.2.0.wasm"
    );
    let sluice = Sluice::start(
        &Config::new()
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .backend(Backend::new("vm02", &vm02.url()).models(["m"]))
            .policy(Policy::new("pin", fixture).config(json!({"default": "vm02"})))
            .to_toml(),
    );
    let client = client();
    let pinned = |backend: &'static str| {
        client
            .post(sluice.url("/v1/chat/completions"))
            .header("x-pin-backend", backend)
            .json(&chat("m"))
            .send()
    };
    for backend in ["vm01", "vm02"] {
        let response = pinned(backend).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-sluice-backend"], backend);
    }
    let teapot = client
        .post(sluice.url("/v1/chat/completions"))
        .json(&json!({"model": "m", "user": "teapot", "messages": []}))
        .send()
        .await
        .unwrap();
    expect_error(teapot, 418, "teapot").await;
    let list: Value = get_json(&client, &sluice.admin_url("/admin/policies")).await;
    assert_eq!(list[0]["contract"], "0.2.0", "{list}");
}
