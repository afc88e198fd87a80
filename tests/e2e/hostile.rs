//! Issue 27: what a black-box attack found, each over real sockets — client
//! strings bounded and logged on one line, auth on every door, names that
//! URLs cannot rewrite, admin tokens that are real, a mock backend that
//! cannot be asked for 16 GB, and what the data port shows.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::common::fake_backend::{fake, send};
use crate::common::*;

/// The `sluice::access` lines of a log.
fn access_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("sluice::access"))
        .collect()
}

/// Polls `log` until it has `n` access lines (they are written when the
/// answer ends, just after the client has it).
async fn until_access_lines(sluice: &Sluice, n: usize) -> String {
    let started = Instant::now();
    loop {
        let log = sluice.log();
        if access_lines(&log).len() >= n || started.elapsed() > Duration::from_secs(5) {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Item 1: ten clients at once send a 15 MB model name. Each gets a 400
/// naming the bound (not echoing the name), the log lines stay short, and
/// the gateway's memory comes back near where it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_model_name_is_refused_and_leaves_no_trace() {
    let ok = mock("ok", &["ok"]).await;
    let sluice = Sluice::start_with(
        &Config::new()
            .auth_required()
            .consumer(Consumer::new("alice", "sk-alice").models(["ok"]))
            .backend(Backend::new("ok", &ok.url()).models(["ok"]))
            .to_toml(),
        &[("RUST_LOG", "info")],
    );
    let client = client();
    let send_as = |body: String| {
        client
            .post(sluice.url("/v1/chat/completions"))
            .bearer_auth("sk-alice")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let served = send_as(chat("ok").to_string()).await.unwrap();
    assert_eq!(served.status(), 200);
    let before = rss_kib(sluice.pid());

    let huge = serde_json::to_string(&json!({
        "model": "m".repeat(15_000_000),
        "messages": [{"role": "user", "content": "hi"}],
    }))
    .unwrap();
    let answers = join_all((0..10).map(|_| send_as(huge.clone()))).await;
    for answer in answers {
        let body = expect_error(answer.unwrap(), 400, "model_too_long").await;
        assert_eq!(body["error"]["param"], "model", "{body}");
        assert!(body.to_string().len() < 1024, "the name was echoed");
    }
    // Just over the bound, from a consumer who may not use it: still the
    // 400, not a 403 echoing the name.
    let long = json!({"model": "m".repeat(257), "messages": []}).to_string();
    expect_error(send_as(long).await.unwrap(), 400, "model_too_long").await;

    let log = until_access_lines(&sluice, 1).await;
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
    assert!(
        !log.contains("mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm"),
        "the name reached the log"
    );

    // The bodies were read (up to server.max_body_bytes) and dropped. The
    // allocator keeps some of the 150 MB of bodies it held (72 MiB once on
    // CI's run of session 10; 706 MB before the bound).
    let started = Instant::now();
    let mut after = rss_kib(sluice.pid());
    while after > before + 96 * 1024 && started.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = rss_kib(sluice.pid());
    }
    assert!(
        after <= before + 96 * 1024,
        "RSS {before} KiB before, {after} KiB after the huge names"
    );
    let served = send_as(chat("ok").to_string()).await.unwrap();
    assert_eq!(served.status(), 200);
}

/// Item 2: a model name with a newline, ANSI escapes and BEL writes one
/// access line, with those characters escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_name_cannot_forge_a_log_line() {
    let ok = mock("ok", &["ok"]).await;
    let sluice = Sluice::start_with(
        &backend("ok", &ok.url(), &["ok"], ""),
        &[("RUST_LOG", "info")],
    );
    let client = client();
    let forged =
        "x\n2026-12-03T00:00:00Z  INFO sluice::access: request model=ok status=200\u{1b}[2J\u{7}";
    let response = sluice.post_chat(&client, &chat(forged)).await;
    assert_eq!(response.status(), 404);
    until_access_lines(&sluice, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = sluice.log();
    let lines = access_lines(&log);
    assert_eq!(lines.len(), 1, "one request, one access line:\n{log}");
    assert!(lines[0].contains(r#""x\n2026-12-03"#), "{}", lines[0]);
    // The log's own colours are escapes too; the client's are not among them.
    assert!(
        !log.contains("\u{1b}[2J") && !log.contains('\u{7}'),
        "{log:?}"
    );
}

/// Item 3: with `auth.required`, `GET /v1/models` needs a key and lists
/// what that key may use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_list_needs_a_key_and_shows_only_its_models() {
    let both = mock("both", &["a", "b"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .auth_required()
            .consumer(Consumer::new("alice", "sk-alice").models(["a"]))
            .consumer(Consumer::new("bob", "sk-bob"))
            .backend(Backend::new("both", &both.url()).models(["a", "b"]))
            .to_toml(),
    );
    let client = client();
    let list = |key: Option<&'static str>| {
        let mut request = client.get(sluice.url("/v1/models"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    expect_error(list(None).await.unwrap(), 401, "invalid_api_key").await;
    expect_error(
        list(Some("sk-nobody")).await.unwrap(),
        401,
        "invalid_api_key",
    )
    .await;
    let ids = |v: Value| -> Vec<String> {
        let mut ids: Vec<String> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let alice: Value = list(Some("sk-alice")).await.unwrap().json().await.unwrap();
    assert_eq!(ids(alice), ["a"]);
    let bob: Value = list(Some("sk-bob")).await.unwrap().json().await.unwrap();
    assert_eq!(ids(bob), ["a", "b"]);
}

/// Item 4: the admin API reads the bearer scheme in any case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_takes_bearer_in_any_case() {
    let sluice = Sluice::start_with(
        &backend("vm01", "http://127.0.0.1:9", &["m"], ""),
        &[("SLUICE_ADMIN_TOKEN", "tok")],
    );
    let client = client();
    for (header, status) in [
        ("Bearer tok", 200),
        ("bearer tok", 200),
        ("BEARER  tok", 200),
        ("bearer wrong", 401),
        ("Basic dG9r", 401),
        ("tok", 401),
    ] {
        let response = client
            .get(sluice.admin_url("/admin/policies"))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{header}");
    }
}

/// Runs `sluice serve` that must refuse to start; its stderr.
fn refused_serve(config: &str, admin_listen: &str, env: &[(&str, &str)]) -> String {
    let dir = TempDir::new();
    let path = dir.write("sluice.toml", config);
    let mut child = serve_command(&path, admin_listen)
        .env_remove("SLUICE_ADMIN_TOKEN")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running sluice");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("it started");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Item 5: blank admin tokens, and short ones off loopback, are refused
/// at start naming where the token came from.
#[test]
fn admin_tokens_must_be_real() {
    let fleet = Config::new().backend(Backend::new("vm01", "http://127.0.0.1:9").models(["m"]));
    let stderr = refused_serve(
        &fleet.to_toml(),
        "127.0.0.1:0",
        &[("SLUICE_ADMIN_TOKEN", " \t")],
    );
    assert!(
        stderr.contains("SLUICE_ADMIN_TOKEN") && stderr.contains("whitespace"),
        "{stderr}"
    );
    let stderr = refused_serve(
        &fleet.to_toml(),
        "0.0.0.0:0",
        &[("SLUICE_ADMIN_TOKEN", "x")],
    );
    assert!(
        stderr.contains("SLUICE_ADMIN_TOKEN") && stderr.contains("at least 16"),
        "{stderr}"
    );
    let dir = TempDir::new();
    let file = dir.write("admin.token", "  \n");
    let with_file = fleet.server("admin_token_file", file.display().to_string());
    let stderr = refused_serve(&with_file.to_toml(), "127.0.0.1:0", &[]);
    assert!(stderr.contains("server.admin_token_file"), "{stderr}");
}

/// Sends one raw HTTP/1.1 request (paths exactly as given, `..` included);
/// the status line.
async fn raw_status(addr: &str, request: String) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reader = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut line)
        .await
        .unwrap();
    line
}

/// Item 6: `..` and other names outside the pattern are refused in the
/// admin API, the config file and the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_outside_the_pattern_are_refused_everywhere() {
    let sluice = Sluice::start(&backend("vm01", "http://127.0.0.1:9", &["m"], ""));
    let admin = sluice.admin_url("");
    let addr = admin.trim_start_matches("http://").trim_end_matches('/');
    let put = raw_status(
        addr,
        "PUT /admin/policies/.. HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nconnection: close\r\n\r\nwasm".to_string(),
    )
    .await;
    assert!(put.contains(" 422 ") || put.contains(" 400 "), "{put}");
    let client = client();
    for name in ["..", ".", "-rf", "a/b"] {
        let response = client
            .post(sluice.admin_url("/admin/consumers"))
            .json(&json!({"name": name}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{name}");
    }
    let dir = TempDir::new();
    let fleet = Config::new().backend(Backend::new("vm01", "http://127.0.0.1:9").models(["m"]));
    for (config, key) in [
        (
            fleet
                .clone()
                .consumer(Consumer::new("..", "sk-dots").set("key_hashes", Vec::<String>::new())),
            "consumers[0].name",
        ),
        (
            fleet
                .clone()
                .policy(Policy::new(".hidden", "builtin:model-router")),
            "policies[0].name",
        ),
    ] {
        let path = dir.write("sluice.toml", config.to_toml());
        let out = run_sluice(&["check-config"], Some(&path));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(key), "{stderr}");
    }
    let out = Command::new(BIN)
        .args(["policy", "rollback", ".."])
        .env("SLUICE_ADMIN_URL", "http://127.0.0.1:9")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("starting with a letter or a digit"),
        "{stderr}"
    );
}

/// Item 7: the mock backend refuses an answer length it cannot hold, and
/// stops on SIGTERM mid-stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_backend_is_bounded_and_stops_on_sigterm() {
    let out = Command::new(BIN)
        .args([
            "mock-backend",
            "--listen",
            "127.0.0.1:0",
            "--answer-tokens",
            "100000000",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("answer-tokens") && stderr.contains("100000"),
        "{stderr}"
    );

    let mut child = Command::new(BIN)
        .args([
            "mock-backend",
            "--listen",
            "127.0.0.1:0",
            "--answer-tokens",
            "100000",
            "--token-interval-ms",
            "5",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    let response = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(&stream_chat("mock-model"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    futures_util::StreamExt::next(&mut stream).await;
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!("the mock ignored SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Decided: the data port shows only whether the gateway is healthy by
/// default; backend URLs, errors and consumer names are on the admin
/// listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_port_shows_a_health_summary_by_default() {
    let ok = mock("ok", &["ok"]).await;
    let sluice = Sluice::start_with(
        &backend("ok", &ok.url(), &["ok"], ""),
        &[("SLUICE_STATUS_ENDPOINTS", "summary")],
    );
    let client = client();
    let health = client.get(sluice.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health, json!({"healthy": true}));
    for path in ["/metrics", "/load-stats"] {
        let response = client.get(sluice.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    let full = get_json(&client, &sluice.admin_url("/health")).await;
    assert!(full.to_string().contains(&ok.url()), "{full}");
    let metrics = get_text(&client, &sluice.admin_url("/metrics")).await;
    assert!(metrics.contains("sluice_backend_healthy"), "{metrics}");
    get_json(&client, &sluice.admin_url("/load-stats")).await;
}

/// Decided: the backend's `server` and `x-powered-by` headers do not reach
/// clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_software_is_not_announced() {
    let fake = fake(|mut stream, _model, _stats| async move {
        let body = json!({"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]})
        .to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\nserver: uvicorn\r\nx-powered-by: vllm/0.6\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        send(&mut stream, head + &body).await;
    })
    .await;
    let sluice = Sluice::start(
        &Config::new()
            .set("health_check", "enabled", false)
            .backend(Backend::new("fake", &fake.url()).models(["m"]))
            .to_toml(),
    );
    let response = sluice.post_chat(&client(), &chat("m")).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers().get("server").is_none(),
        "{:?}",
        response.headers()
    );
    assert!(response.headers().get("x-powered-by").is_none());
}

/// Decided: a stream request answered with an HTML page (status 200) gets
/// the API's error, not the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_answered_with_html_becomes_an_api_error() {
    let fake = fake(|mut stream, _model, _stats| async move {
        let body = "<html><body>Welcome to nginx!</body></html>";
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        send(&mut stream, head + body).await;
    })
    .await;
    let sluice = Sluice::start(
        &Config::new()
            .set("health_check", "enabled", false)
            .backend(Backend::new("fake", &fake.url()).models(["m"]))
            .to_toml(),
    );
    let response = sluice.post_chat(&client(), &stream_chat("m")).await;
    let body = expect_error(response, 502, "backend_error").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("text/html") && !message.contains("nginx"),
        "{message}"
    );
}

/// One chunk of a chunked HTTP/1.1 body.
fn http_chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

/// One streamed chat delta as an SSE event.
fn delta_event(text: &str) -> String {
    let chunk = json!({"id": "x", "object": "chat.completion.chunk", "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
    format!("data: {chunk}\n\n")
}

const SSE_HEAD: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

/// Decided: once an answer has begun, a backend that sends nothing for
/// `server.backend_idle_timeout` is cut off — a stream ends with an error
/// event, a plain answer breaks off — while one that keeps sending, however
/// slowly, within the bound is relayed whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_silent_mid_answer_is_cut_off_after_the_idle_timeout() {
    // One chunk, then silence for far longer than the test waits.
    let stalls = fake(|mut stream, model, _stats| async move {
        if model == "plain" {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"id\":";
            send(&mut stream, head).await;
        } else {
            send(&mut stream, format!("{SSE_HEAD}{}", http_chunk(&delta_event("hel")))).await;
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    // Eight chunks 300 ms apart: 2.4 s in all, never 1 s of silence.
    let drips = fake(|mut stream, _model, _stats| async move {
        send(&mut stream, SSE_HEAD).await;
        for i in 0..8 {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            if !send(&mut stream, http_chunk(&delta_event(&format!("t{i} ")))).await {
                return;
            }
        }
        send(&mut stream, http_chunk("data: [DONE]\n\n") + "0\r\n\r\n").await;
    })
    .await;
    let sluice = Sluice::start(&format!(
        "[server]\nbackend_idle_timeout = \"1s\"\n[health_check]\nenabled = false\n{}{}",
        backend("stalls", &stalls.url(), &["stalled", "plain"], ""),
        backend("drips", &drips.url(), &["dripped"], "")
    ));
    let client = client();

    let started = Instant::now();
    let response = sluice.post_chat(&client, &stream_chat("stalled")).await;
    assert_eq!(response.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(15), response.text())
        .await
        .expect("the stream was not cut off")
        .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "cut off after {took:?}");
    assert!(
        text.contains("\"hel\""),
        "the first chunk is relayed: {text}"
    );
    assert!(
        text.contains("sent nothing for 1s"),
        "an error event names the silence: {text}"
    );

    let started = Instant::now();
    let response = sluice.post_chat(&client, &chat("plain")).await;
    assert_eq!(response.status(), 200);
    let read = tokio::time::timeout(Duration::from_secs(15), response.bytes())
        .await
        .expect("the plain answer was not cut off");
    assert!(read.is_err(), "a body 990 bytes short cannot read whole");
    assert!(started.elapsed() < Duration::from_secs(8));

    let response = sluice.post_chat(&client, &stream_chat("dripped")).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    for i in 0..8 {
        assert!(
            text.contains(&format!("t{i} ")),
            "chunk {i} missing: {text}"
        );
    }
    assert!(!text.contains("sent nothing"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}
