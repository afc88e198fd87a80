//! Several replicas behind one address: a policy store shared through the
//! state directory, limits shared through one Redis, and a graceful
//! SIGTERM that loses no stream.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sluice::tools::mock::Flavor;

use crate::common::*;
use crate::consumers::Redis;
use crate::deploy::{config_query, deploy, module, pinned, served_by};

/// Three replicas sharing `state` and `redis`, routing with the pinning
/// test guest (default vm01).
fn three(state: &TempDir, redis: &Redis, vm01: &str, vm02: &str) -> Vec<Sluice> {
    start_three(&replica_config(state, redis, vm01, vm02))
}

fn start_three(config: &Config) -> Vec<Sluice> {
    let config = config.to_toml();
    (0..3).map(|_| Sluice::start(&config)).collect()
}

/// One replica's config, as [`three`] starts them.
fn replica_config(state: &TempDir, redis: &Redis, vm01: &str, vm02: &str) -> Config {
    pinned(vm01, vm02, "vm01")
        .server("unready_delay", "500ms")
        .server("shutdown_timeout", "20s")
        .set("policy_store", "state_dir", state.0.display().to_string())
        .set("policy_store", "sync_interval", "200ms")
        .set("limits", "redis_url", redis.url())
        .consumer(Consumer::new("team", "sk-team").set("requests_per_minute", 100000))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_deployed_to_one_replica_serves_on_all() {
    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let (state, redis) = (TempDir::new(), Redis::start());
    let replicas = three(&state, &redis, &vm01.url(), &vm02.url());
    let client = client();
    for r in &replicas {
        assert_eq!(served_by(&client, r).await, "vm01");
    }
    let response = deploy(
        &client,
        &replicas[0],
        module("pin-backend"),
        &config_query("vm02"),
    )
    .await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let deployed = Instant::now();
    let mut converged = Duration::ZERO;
    for r in &replicas {
        while served_by(&client, r).await != "vm02" {
            assert!(
                deployed.elapsed() < Duration::from_secs(5),
                "a replica still serves the old version 5 s after the deploy"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        converged = converged.max(deployed.elapsed());
    }
    eprintln!("deploy to one replica -> all three serve it within {converged:?}");
    // A rollback on another replica reaches the first.
    let r = client
        .post(replicas[2].admin_url("/admin/policies/pin/rollback"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rolled = Instant::now();
    while served_by(&client, &replicas[0]).await != "vm01" {
        assert!(
            rolled.elapsed() < Duration::from_secs(5),
            "rollback did not reach replica 0"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listing = get_json(&client, &replicas[1].admin_url("/admin/policies")).await;
    assert_eq!(listing[0]["active_version"], 1, "{listing}");
}

/// SIGTERM to one replica under streaming load: `/ready` turns 503 first,
/// every stream it had started completes, it exits 0, and the others keep
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_while_the_other_replicas_serve() {
    let vm01 = mock_with(paced("vm01", &["m"], Flavor::Vllm, 50, 40)).await;
    let vm02 = mock("vm02", &["m"]).await;
    let (state, redis) = (TempDir::new(), Redis::start());
    let mut replicas = three(&state, &redis, &vm01.url(), &vm02.url());
    let client = client();
    let streams: Vec<_> = (0..12)
        .map(|_| {
            let (client, url) = (client.clone(), replicas[0].url("/v1/chat/completions"));
            tokio::spawn(async move {
                let response = client
                    .post(url)
                    .bearer_auth("sk-team")
                    .json(&stream_chat("m"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                let mut text = String::new();
                let mut body = response.bytes_stream();
                while let Some(chunk) = body.next().await {
                    text.push_str(&String::from_utf8_lossy(&chunk.expect("stream broken")));
                }
                text
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    replicas[0].signal("TERM");
    let signalled = Instant::now();
    let ready = client.get(replicas[0].url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "/ready turns unready first");
    for r in &replicas[1..] {
        assert_eq!(get_json(&client, &r.url("/ready")).await["ready"], true);
        assert_eq!(
            served_by(&client, r).await,
            "vm01",
            "the others keep serving"
        );
    }
    for s in streams {
        let text = s.await.unwrap();
        assert!(
            text.trim_end().ends_with("data: [DONE]"),
            "a stream was cut: …{}",
            &text[text.len().saturating_sub(200)..]
        );
        let tokens = text.matches("\"content\":\"").count();
        assert!(tokens >= 40, "only {tokens} tokens arrived");
    }
    let status = replicas[0].wait();
    assert!(status.success(), "exit status {status}");
    eprintln!(
        "SIGTERM -> drained 12 streams and exited in {:?}",
        signalled.elapsed()
    );
    for r in &replicas[1..] {
        assert_eq!(served_by(&client, r).await, "vm01");
    }
}

/// Usage written on every replica is totalled on each, through one Redis:
/// `/admin/usage` on any replica counts the fleet's requests exactly once,
/// and a Redis outage only delays the records of the requests it served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_from_every_replica_is_totalled_on_each() {
    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let (state, mut redis) = (TempDir::new(), Redis::start());
    let replicas = start_three(
        &replica_config(&state, &redis, &vm01.url(), &vm02.url())
            .set("usage", "redis_url", redis.url())
            .set("usage", "sync_interval", "100ms"),
    );
    let client = client();
    let chat_on = |r: usize| {
        let request = client
            .post(replicas[r].url("/v1/chat/completions"))
            .bearer_auth("sk-team")
            .json(&chat("m"));
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
        }
    };
    for (r, n) in [(0, 2), (1, 3), (2, 4)] {
        for _ in 0..n {
            chat_on(r).await;
        }
    }
    let totals = |expected: u64| {
        let client = client.clone();
        let urls: Vec<String> = replicas
            .iter()
            .map(|r| r.admin_url("/admin/usage?group_by=replica"))
            .collect();
        async move {
            let started = Instant::now();
            for url in urls {
                loop {
                    let rows = get_json(&client, &url).await;
                    let rows = rows["rows"].as_array().unwrap().clone();
                    let total: u64 = rows.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
                    if total == expected {
                        break;
                    }
                    assert!(
                        total < expected,
                        "a record was counted twice on {url}: {rows:?}"
                    );
                    assert!(
                        started.elapsed() < Duration::from_secs(10),
                        "{url} totals {total} of {expected} requests 10 s on: {rows:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            started.elapsed()
        }
    };
    let took = totals(9).await;
    eprintln!("9 requests on three replicas -> totalled on each within {took:?}");
    let by_replica = get_json(
        &client,
        &replicas[1].admin_url("/admin/usage?group_by=replica"),
    )
    .await;
    let mut counts: Vec<u64> = by_replica["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requests"].as_u64().unwrap())
        .collect();
    counts.sort_unstable();
    assert_eq!(counts, [2, 3, 4], "{by_replica}");
    let by_consumer = get_json(
        &client,
        &replicas[2].admin_url("/admin/usage?group_by=consumer"),
    )
    .await;
    assert_eq!(
        by_consumer["rows"][0]["group"]["consumer"], "team",
        "{by_consumer}"
    );
    assert_eq!(by_consumer["rows"][0]["requests"], 9, "{by_consumer}");
    assert!(by_replica["replica"].is_string(), "{by_replica}");

    // Redis goes away (and comes back empty): requests are still served
    // (limits fail open), and their records reach every replica after.
    let port = redis
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches("/0")
        .parse()
        .unwrap();
    let _ = redis.child.kill();
    let _ = redis.child.wait();
    for r in [0, 1, 1, 2] {
        chat_on(r).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _redis = Redis::start_on(port);
    let took = totals(13).await;
    eprintln!("Redis restarted -> the 4 requests it missed totalled on each within {took:?}");
    let metrics = get_text(&client, &replicas[1].url("/metrics")).await;
    let errors = metrics
        .lines()
        .find(|l| l.starts_with("sluice_usage_sync_errors_total"))
        .unwrap_or("");
    assert!(
        !errors.ends_with(" 0") && !errors.is_empty(),
        "the outage was not counted: {errors}"
    );
}

/// A replica that stops ships its last records on the way out, long
/// before its next round would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replica_ships_its_last_usage_records() {
    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let (state, redis) = (TempDir::new(), Redis::start());
    let config = |interval: &str| {
        replica_config(&state, &redis, &vm01.url(), &vm02.url())
            .set("usage", "redis_url", redis.url())
            .set("usage", "sync_interval", interval)
            .to_toml()
    };
    let mut slow = Sluice::start(&config("1h"));
    let watcher = Sluice::start(&config("100ms"));
    let client = client();
    for _ in 0..3 {
        served_by(&client, &slow).await;
    }
    slow.signal("TERM");
    assert!(slow.wait().success());
    let url = watcher.admin_url("/admin/usage");
    let started = Instant::now();
    loop {
        let rows = get_json(&client, &url).await;
        if rows["rows"][0]["requests"] == 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the stopped replica's records did not arrive: {rows}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
