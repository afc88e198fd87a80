//! Several replicas behind one address: a policy store shared through the
//! state directory, limits shared through one Redis, and a graceful
//! SIGTERM that loses no stream.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sluice::mock::Flavor;

use crate::common::*;
use crate::consumers::{consumer, Redis};
use crate::deploy::{config_query, deploy, module, pinned, served_by};

/// Three replicas sharing `state` and `redis`, routing with the pinning
/// test guest (default vm01).
fn three(state: &TempDir, redis: &Redis, vm01: &str, vm02: &str, extra: &str) -> Vec<Sluice> {
    let config = format!(
        "[server]\nunready_delay = \"500ms\"\nshutdown_timeout = \"20s\"\n\
         [policy_store]\nstate_dir = {:?}\nsync_interval = \"200ms\"\n\
         [limits]\nredis_url = {:?}\n{extra}{}{}",
        state.0.display().to_string(),
        redis.url(),
        consumer("team", "sk-team", "requests_per_minute = 100000"),
        pinned(vm01, vm02, "vm01"),
    );
    (0..3).map(|_| Sluice::start(&config)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_deployed_to_one_replica_serves_on_all() {
    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let (state, redis) = (TempDir::new(), Redis::start());
    let replicas = three(&state, &redis, &vm01.url(), &vm02.url(), "");
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
    let mut replicas = three(&state, &redis, &vm01.url(), &vm02.url(), "");
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
