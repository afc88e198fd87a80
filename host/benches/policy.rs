//! Per-request cost of the policy chain: a fresh pooled instance of
//! `builtin:model-router`, its fleet queries, and its decision, for a small
//! and a 1 MiB request. Prints nanoseconds per request.
//!
//! Run: `cargo bench -p sluice --bench policy`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use sluice::backends::Fleet;
use sluice::config::{BackendConfig, PolicyConfig, PolicyRuntimeConfig};
use sluice::openai::{Endpoint, RequestHead};
use sluice::policy::{Chain, PolicyRequest, Runtime};

fn backend(name: &str, models: &[&str]) -> BackendConfig {
    BackendConfig {
        name: name.into(),
        url: "http://127.0.0.1:9".into(),
        models: models.iter().map(|m| m.to_string()).collect(),
        max_concurrent_requests: 8,
        weight: 1,
        api_key: None,
    }
}

fn main() -> anyhow::Result<()> {
    // The gateway decides on tokio worker threads; measure it the same way.
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fleet = Arc::new(
        Fleet::new(&[
            backend("vm01", &["glm4-9b", "qwen2.5-1.5b"]),
            backend("vm02", &["glm4-9b"]),
        ])
        .map_err(anyhow::Error::msg)?,
    );
    let runtime = Runtime::new(&PolicyRuntimeConfig::default())?;
    let router = PolicyConfig {
        name: "router".into(),
        module: "builtin:model-router".into(),
        config: serde_json::json!({"aliases": {"glm4": "glm4-9b"}}),
        on_error: Default::default(),
    };
    let chain = tokio.block_on(Chain::load(&runtime, &fleet, &[router]))?;
    let headers = Arc::new(HeaderMap::new());

    let small = Bytes::from_static(
        br#"{"model":"glm4-9b","messages":[{"role":"user","content":"Hello"}]}"#,
    );
    let large = Bytes::from(format!(
        r#"{{"model":"glm4-9b","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(1 << 20)
    ));
    for (label, body) in [("small body", small), ("1 MiB body", large)] {
        let mut id = 0;
        let mut run = || {
            id += 1;
            let request = PolicyRequest {
                id,
                endpoint: Endpoint::ChatCompletions,
                path: "/v1/chat/completions".into(),
                head: RequestHead {
                    model: "glm4-9b".into(),
                    stream: false,
                },
                consumer: None,
                headers: headers.clone(),
                body: body.clone(),
            };
            tokio
                .block_on(chain.decide(&runtime, &fleet, request))
                .map(|r| r.targets.len())
        };
        // Warm up the pool's slots and the caches.
        for _ in 0..2_000 {
            run()?;
        }
        let mut samples = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let start = Instant::now();
            for _ in 0..1_000 {
                run()?;
            }
            samples.push(start.elapsed().as_nanos() as f64 / 1_000.0);
        }
        samples.sort_by(f64::total_cmp);
        println!(
            "policy chain (model-router), {label}: median {:.0} ns/request, best {:.0} ns, over {} x 1000 calls",
            samples[samples.len() / 2],
            samples[0],
            samples.len()
        );
    }
    Ok(())
}
