//! Consumers: API keys (hashed), allowed models, limits reserved at
//! admission, the admin API, and limits shared by replicas through Redis.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use sluice::accounts::consumers::hash_key;
use sluice::tools::mock::Flavor;

use crate::common::*;

async fn chat_as(
    client: &reqwest::Client,
    sluice: &Sluice,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut request = client.post(sluice.url("/v1/chat/completions")).json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

/// Waits out the end of a minute, so a test's window does not roll over
/// in the middle of it.
async fn fresh_minute() {
    let second = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if second >= 45 {
        tokio::time::sleep(Duration::from_secs(61 - second)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_checked_and_consumers_reach_policies_and_records() {
    let vm01 = mock("vm01", &["m", "secret-model"]).await;
    let alice = mock("alice", &["m"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .auth_required()
            .consumer(Consumer::new("alice", "sk-alice").models(["m"]))
            .consumer(Consumer::new("bob", "sk-bob").set("disabled", true))
            .backend(Backend::new("vm01", &vm01.url()).models(["m", "secret-model"]))
            .backend(Backend::new("alice", &alice.url()).models(["m"]))
            .policy(Policy::guest("pin", "pin-backend").config(json!({"default": "vm01"})))
            .to_toml(),
    );
    let client = client();
    let r = chat_as(&client, &sluice, None, &chat("m")).await;
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    expect_error(r, 401, "invalid_api_key").await;
    let r = chat_as(&client, &sluice, Some("sk-wrong"), &chat("m")).await;
    expect_error(r, 401, "invalid_api_key").await;
    let r = chat_as(&client, &sluice, Some("sk-bob"), &chat("m")).await;
    expect_error(r, 403, "consumer_disabled").await;
    let r = chat_as(&client, &sluice, Some("sk-alice"), &chat("secret-model")).await;
    expect_error(r, 403, "model_not_allowed").await;
    // A big upload refused for its key still gets its 401, not a reset.
    let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(3 << 20)}]});
    let r = chat_as(&client, &sluice, Some("sk-wrong"), &big).await;
    expect_error(r, 401, "invalid_api_key").await;

    // The pin-backend guest routes a consumer to the backend of its name;
    // it refuses if it ever sees the credential.
    let r = chat_as(&client, &sluice, Some("sk-alice"), &chat("m")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-sluice-backend"], "alice");
    let (_, body) = alice.stats.last_request().unwrap();
    assert_eq!(body["model"], "m");

    let start = Instant::now();
    let rows = loop {
        let usage: Value =
            get_json(&client, &sluice.admin_url("/admin/usage?group_by=consumer")).await;
        let rows = usage["rows"].as_array().unwrap().clone();
        if rows.iter().any(|r| r["group"]["consumer"] == "alice")
            || start.elapsed() > Duration::from_secs(5)
        {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let alice_row = rows
        .iter()
        .find(|r| r["group"]["consumer"] == "alice")
        .expect("alice's usage");
    assert!(alice_row["requests"].as_u64().unwrap() >= 1, "{rows:?}");
    let log = sluice.log();
    assert!(
        !log.contains("sk-alice") && !log.contains("sk-wrong"),
        "a key reached the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_creates_rotates_and_disables_consumers() {
    let vm01 = mock("vm01", &["m"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .auth_required()
            .consumer(Consumer::new("file-made", "sk-file"))
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .to_toml(),
    );
    let client = client();
    let created: Value = {
        let r = client
            .post(sluice.admin_url("/admin/consumers"))
            .json(
                &json!({"name": "carol", "models": ["m"], "limits": {"requests_per_minute": 100}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json().await.unwrap()
    };
    let key = created["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("sk-sluice-"));
    assert_eq!(
        chat_as(&client, &sluice, Some(&key), &chat("m"))
            .await
            .status(),
        200
    );

    let list: Value = get_json(&client, &sluice.admin_url("/admin/consumers")).await;
    let text = list.to_string();
    assert!(
        !text.contains(&key) && !text.contains(&hash_key(&key)),
        "{text}"
    );
    let carol = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "carol")
        .unwrap();
    assert_eq!(carol["usage"]["requests_this_minute"], 1, "{carol}");
    assert_eq!(carol["managed_by"], "api");

    let rotated: Value = client
        .post(sluice.admin_url("/admin/consumers/carol/rotate"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new_key = rotated["key"].as_str().unwrap();
    let r = chat_as(&client, &sluice, Some(&key), &chat("m")).await;
    expect_error(r, 401, "invalid_api_key").await;
    assert_eq!(
        chat_as(&client, &sluice, Some(new_key), &chat("m"))
            .await
            .status(),
        200
    );

    let r = client
        .post(sluice.admin_url("/admin/consumers/carol/disable"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = chat_as(&client, &sluice, Some(new_key), &chat("m")).await;
    expect_error(r, 403, "consumer_disabled").await;
    let r = client
        .post(sluice.admin_url("/admin/consumers/file-made/disable"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        409,
        "the file's consumers are changed in the file"
    );

    // Consumers made by the API survive a restart.
    let sluice = sluice.restart();
    let r = chat_as(&client, &sluice, Some(new_key), &chat("m")).await;
    expect_error(r, 403, "consumer_disabled").await;
    client
        .post(sluice.admin_url("/admin/consumers/carol/enable"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        chat_as(&client, &sluice, Some(new_key), &chat("m"))
            .await
            .status(),
        200
    );
}

/// 100 concurrent requests against a token limit: reservations at
/// admission keep the total within one request's reservation of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_limit_holds_under_a_hundred_concurrent_requests() {
    let vm01 = mock_with(paced(
        "vm01",
        &["m"],
        sluice::tools::mock::Flavor::Vllm,
        5,
        16,
    ))
    .await;
    const LIMIT: u64 = 400;
    let sluice = Sluice::start(
        &Config::new()
            .consumer(Consumer::new("dave", "sk-dave").set("tokens_per_minute", LIMIT as i64))
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .to_toml(),
    );
    let client = client();
    fresh_minute().await;
    let mut body = chat("m");
    body["max_tokens"] = json!(16);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (client, url, body) = (
                client.clone(),
                sluice.url("/v1/chat/completions"),
                body.clone(),
            );
            tokio::spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth("sk-dave")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let retry_after = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                let body: Value = r.json().await.unwrap();
                (status, retry_after, body)
            })
        })
        .collect();
    let (mut ok, mut limited, mut used) = (0u64, 0, 0u64);
    for t in tasks {
        let (status, retry_after, body) = t.await.unwrap();
        match status {
            200 => {
                ok += 1;
                used += body["usage"]["total_tokens"].as_u64().unwrap();
            }
            429 => {
                limited += 1;
                assert_eq!(body["error"]["code"], "rate_limit_exceeded");
                assert_eq!(body["error"]["type"], "rate_limit_error");
                let after: u64 = retry_after.expect("Retry-After").parse().unwrap();
                assert!((1..=60).contains(&after));
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let per_request = used / ok.max(1);
    eprintln!("{ok} admitted, {limited} refused, {used} tokens used of {LIMIT}");
    assert!(ok >= 1 && limited >= 1);
    assert!(
        used <= LIMIT + per_request + 16,
        "{used} tokens used by {ok} requests overshoots {LIMIT} by more than one request"
    );
    assert!(ok + limited == 100);
}

/// A `redis-server` on a free loopback port, stopped when dropped.
pub struct Redis {
    pub child: Child,
    port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Redis::start_on(port)
    }

    /// A redis-server on `port` (again, after one was killed there).
    pub fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (apt install redis-server; scripts/test-all.sh does)");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two replicas sharing one Redis enforce one limit; when Redis goes away
/// the configured policy answers at once, never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_limit_through_redis() {
    let vm01 = mock("vm01", &["m"]).await;
    let mut redis = Redis::start();
    let config = |on_error: &str| {
        Config::new()
            .set("limits", "redis_url", redis.url())
            .set("limits", "on_store_error", on_error)
            .set("limits", "redis_timeout", "300ms")
            .consumer(Consumer::new("erin", "sk-erin").set("requests_per_minute", 10))
            .consumer(Consumer::new("fred", "sk-fred").set("tokens_per_day", 100000))
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .to_toml()
    };
    let a = Sluice::start(&config("fail-closed"));
    let b = Sluice::start(&config("fail-open"));
    let client = client();
    fresh_minute().await;
    // 30 at once, half through each replica: the Lua script admits exactly
    // the limit, however the two interleave.
    let body = chat("m");
    let answers = futures_util::future::join_all((0..30).map(|i| {
        let replica = if i % 2 == 0 { &a } else { &b };
        chat_as(&client, replica, Some("sk-erin"), &body)
    }))
    .await;
    let mut ok = 0;
    for r in answers {
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                expect_error(r, 429, "rate_limit_exceeded").await;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        ok, 10,
        "two replicas admitted {ok} of 30 concurrent requests under one limit of 10 per minute"
    );

    // Tokens: reserved at admission (prompt + max_tokens) on one replica,
    // settled to the real count in Redis, seen so by the other.
    let mut body = chat("m");
    body["max_tokens"] = json!(500);
    let r = chat_as(&client, &a, Some("sk-fred"), &body).await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    let used = answer["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used > 0 && used < 500, "{answer}");
    let settled = Instant::now();
    loop {
        let consumers = get_json(&client, &b.admin_url("/admin/consumers")).await;
        let fred = consumers
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "fred")
            .unwrap()
            .clone();
        if fred["usage"]["tokens_today"] == json!(used) {
            break;
        }
        assert!(
            settled.elapsed() < Duration::from_secs(5),
            "the reservation was not settled to {used}: {fred}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let _ = redis.child.kill();
    let _ = redis.child.wait();
    let started = Instant::now();
    let r = chat_as(&client, &a, Some("sk-erin"), &chat("m")).await;
    expect_error(r, 503, "rate_limiter_unavailable").await;
    let r = chat_as(&client, &b, Some("sk-erin"), &chat("m")).await;
    assert_eq!(r.status(), 200, "fail-open admits while Redis is down");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a Redis outage must not hang requests"
    );
    for replica in [&a, &b] {
        let metrics = get_text(&client, &replica.url("/metrics")).await;
        let errors = metric(&metrics, "sluice_limit_store_errors_total");
        assert!(
            errors.is_some_and(|n| n >= 1.0),
            "the outage was not counted: {errors:?}"
        );
    }

    // Redis back on its port: the fail-closed replica admits again by
    // itself (its connection reconnects), counting from a fresh store.
    let _redis = Redis::start_on(redis.port);
    let back = Instant::now();
    loop {
        let r = chat_as(&client, &a, Some("sk-erin"), &chat("m")).await;
        if r.status() == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "no recovery after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "Redis back -> fail-closed replica admitting again in {:?}",
        back.elapsed()
    );
}

/// Sends one Redis command (RESP) and returns the first line of its answer.
fn redis_command(redis: &Redis, args: &[&str]) -> String {
    use std::io::{BufRead, Write};
    let url = redis.url();
    let addr = url
        .trim_start_matches("redis://")
        .trim_end_matches("/0")
        .to_string();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let mut command = format!("*{}\r\n", args.len());
    for a in args {
        command.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.write_all(command.as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .unwrap();
    line.trim().to_string()
}

/// A concurrency slot whose release the store did not answer (Redis
/// paused for writes while the stream ended) is given back once Redis
/// answers again: the consumer's one slot is free for its next request,
/// and giving back again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_slot_comes_back_after_the_store_missed_its_release() {
    let vm01 = mock_with(paced("vm01", &["m"], Flavor::Vllm, 50, 40)).await;
    let redis = Redis::start();
    let sluice = Sluice::start(
        &Config::new()
            .set("limits", "redis_url", redis.url())
            .set("limits", "redis_timeout", "200ms")
            .consumer(Consumer::new("gail", "sk-gail").set("max_concurrent_requests", 1))
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .to_toml(),
    );
    let client = client();
    let first = chat_as(&client, &sluice, Some("sk-gail"), &stream_chat("m")).await;
    assert_eq!(first.status(), 200);
    // Writes wait for 3 s: the 2 s stream ends in that time, and the slot's
    // release times out.
    assert_eq!(
        redis_command(&redis, &["CLIENT", "PAUSE", "3000", "WRITE"]),
        "+OK"
    );
    let text = first.text().await.unwrap();
    assert!(text.contains("[DONE]"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let next = chat_as(&client, &sluice, Some("sk-gail"), &chat("m")).await;
        match next.status().as_u16() {
            200 => break,
            429 | 503 if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => panic!(
                "the slot never came back ({other}): {}",
                next.text().await.unwrap_or_default()
            ),
        }
    }
    // Exactly one slot again: two at once, one is refused.
    let slow = chat_as(&client, &sluice, Some("sk-gail"), &stream_chat("m")).await;
    assert_eq!(slow.status(), 200);
    let second = chat_as(&client, &sluice, Some("sk-gail"), &chat("m")).await;
    assert_eq!(second.status(), 429, "the limit is still one");
    drop(slow);
    let metrics = get_text(&client, &sluice.url("/metrics")).await;
    assert!(
        metric(&metrics, "sluice_limit_store_errors_total").unwrap_or(0.0) >= 1.0,
        "the missed release is counted"
    );
}
