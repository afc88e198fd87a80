//! Cost per request of consumer auth and limits: identifying the caller
//! from its key (SHA-256 + lookup), then admitting it (check and reserve),
//! settling the reservation and giving back its concurrency slot — with
//! the counters in memory, and in a real Redis when `redis-server` is on
//! the PATH (started here on a free loopback port, stopped at the end).
//!
//! Run: `cargo bench -p sluice --bench limits`

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::accounts::consumers::{hash_key, Consumers, Identity};
use sluice::accounts::limits::Limiter;
use sluice::config::{ConsumerConfig, LimitsConfig};

fn consumer() -> ConsumerConfig {
    ConsumerConfig {
        name: "alice".into(),
        key_hashes: vec![hash_key("sk-alice")],
        models: vec![],
        requests_per_minute: Some(u64::MAX / 4),
        tokens_per_minute: Some(u64::MAX / 4),
        tokens_per_day: Some(u64::MAX / 4),
        max_concurrent_requests: Some(1_000_000),
        disabled: false,
    }
}

/// Median and p99 of `once` over ~3 s, in microseconds.
async fn measure<F, Fut>(label: &str, mut once: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..1_000 {
        once().await;
    }
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let start = Instant::now();
        once().await;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{label:<44} median {:>8.2} µs   p99 {:>8.2} µs   ({} runs)",
        at(0.5),
        at(0.99),
        samples.len()
    );
}

async fn limits(label: &str, config: LimitsConfig, consumers: &Consumers) {
    let limiter = Arc::new(Limiter::new(&config).expect("limiter"));
    measure(label, || async {
        let Ok(Identity::Known(c)) = consumers.identify(Some("Bearer sk-alice")) else {
            panic!("the key is not known");
        };
        let ticket = limiter
            .admit(&c, 100)
            .await
            .expect("admitted")
            .expect("limits");
        ticket.settle(80);
    })
    .await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let consumers = Consumers::new(true, &[consumer()], None).expect("consumers");
    measure("auth only (hash the key, look it up)", || async {
        assert!(matches!(
            consumers.identify(Some("Bearer sk-alice")),
            Ok(Identity::Known(_))
        ));
    })
    .await;
    limits(
        "auth + limits, counters in memory",
        LimitsConfig::default(),
        &consumers,
    )
    .await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let redis = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .stdout(std::process::Stdio::null())
        .spawn();
    let Ok(mut redis) = redis else {
        println!("auth + limits, counters in Redis: redis-server not found, not measured");
        return;
    };
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let config = LimitsConfig {
        redis_url: Some(format!("redis://127.0.0.1:{port}/0")),
        ..LimitsConfig::default()
    };
    limits(
        "auth + limits, counters in Redis (loopback)",
        config,
        &consumers,
    )
    .await;
    let _ = redis.kill();
    let _ = redis.wait();
}
