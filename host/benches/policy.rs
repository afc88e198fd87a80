//! Per-request cost of the policy chain, and per-chunk cost of response
//! filtering: fresh pooled instances of the bundled policies, their fleet
//! queries, and their decisions, driven on a tokio runtime as the gateway
//! does. Prints nanoseconds per call.
//!
//! Run: `cargo bench -p sluice --bench policy`

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use sluice::api::openai::{Endpoint, RequestHead};
use sluice::config::{BackendConfig, PolicyConfig, PolicyRuntimeConfig};
use sluice::fleet::Fleet;
use sluice::policy::{Chain, Filtered, KeptInstances, PolicyRequest, Runtime};

fn backend(name: &str, models: &[&str]) -> BackendConfig {
    BackendConfig {
        name: name.into(),
        url: "http://127.0.0.1:9".into(),
        models: models.iter().map(|m| m.to_string()).collect(),
        max_concurrent_requests: 8,
        weight: 1,
        api_key: None,
        health_path: None,
        engine: Default::default(),
        metrics_url: None,
    }
}

fn policy(name: &str, config: serde_json::Value) -> PolicyConfig {
    PolicyConfig {
        name: name.into(),
        module: format!("builtin:{name}"),
        config,
        on_error: Default::default(),
    }
}

/// A few thousand made-up words, as an operator's list would be.
fn word_list(count: usize) -> Vec<String> {
    let syllables = ["ka", "zu", "mi", "ro", "te", "shi", "no", "va", "qu", "el"];
    (0..count)
        .map(|i| {
            let mut w = String::new();
            let mut n = i + 7;
            for _ in 0..4 {
                w.push_str(syllables[n % syllables.len()]);
                n /= syllables.len();
            }
            format!("{w}{i}")
        })
        .collect()
}

/// Median and best nanoseconds per call of `f`, over batches of 1,000 for
/// about three seconds, after a warm-up.
fn measure<F: Future<Output = ()>>(
    tokio: &tokio::runtime::Runtime,
    mut f: impl FnMut() -> F,
) -> (f64, f64, usize) {
    for _ in 0..2_000 {
        tokio.block_on(f());
    }
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let start = Instant::now();
        for _ in 0..1_000 {
            tokio.block_on(f());
        }
        samples.push(start.elapsed().as_nanos() as f64 / 1_000.0);
    }
    samples.sort_by(f64::total_cmp);
    (samples[samples.len() / 2], samples[0], samples.len())
}

fn main() -> anyhow::Result<()> {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fleet = Arc::new(
        Fleet::new(&[
            backend("vm01", &["glm4-9b", "qwen2.5-1.5b"]),
            backend("vm02", &["glm4-9b", "gemma-2-2b"]),
        ])
        .map_err(anyhow::Error::msg)?,
    );
    let runtime = Arc::new(Runtime::new(&PolicyRuntimeConfig::default())?);
    let router = policy(
        "model-router",
        serde_json::json!({"aliases": {"glm4": "glm4-9b"}}),
    );
    let words = policy(
        "sensitive-words",
        serde_json::json!({"words": word_list(3_000), "action": "mask"}),
    );
    let fallback = policy(
        "fallback",
        serde_json::json!({"fallbacks": {"qwen2.5-1.5b": ["gemma-2-2b"]}}),
    );
    let headers = Arc::new(HeaderMap::new());
    let body = Bytes::from_static(
        br#"{"model":"glm4-9b","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Write a haiku about the sea and the mountains, please."}]}"#,
    );
    let request = |id| PolicyRequest {
        id,
        endpoint: Endpoint::ChatCompletions,
        path: "/v1/chat/completions".into(),
        head: RequestHead {
            model: "glm4-9b".into(),
            stream: true,
            include_usage: false,
        },
        consumer: None,
        headers: headers.clone(),
        body: body.clone(),
        prefix: Default::default(),
    };

    for (label, configs) in [
        ("model-router", vec![router.clone()]),
        (
            "sensitive-words (3,000 words) -> model-router -> fallback",
            vec![words, router, fallback],
        ),
    ] {
        let chain = tokio.block_on(Chain::load(&runtime, &fleet, &configs))?;
        let mut id = 0;
        let (median, best, n) = measure(&tokio, || {
            id += 1;
            let route = chain.decide(&runtime, &fleet, request(id));
            async move {
                assert!(route.await.is_ok());
            }
        });
        println!(
            "request phase, {label}: median {median:.0} ns/request, best {best:.0} ns ({n} x 1000)"
        );

        if chain.response_holdback().is_some() {
            let route = tokio
                .block_on(chain.decide(&runtime, &fleet, request(0)))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            // A fresh instance per chunk (the first chunk of every answer,
            // or every chunk when no room is left to keep one), then one
            // kept across an answer's chunks.
            for kept_across in [false, true] {
                let answer = std::cell::RefCell::new(KeptInstances::default());
                let (median, best, n) = measure(&tokio, || {
                    let (chain, runtime, fleet, route, answer) =
                        (&chain, &runtime, &fleet, &route, &answer);
                    async move {
                        let mut kept = if kept_across {
                            answer.take()
                        } else {
                            KeptInstances::default()
                        };
                        let filtered = chain
                            .filter_text(
                                runtime,
                                fleet,
                                route,
                                &mut kept,
                                0,
                                "kazumiro0 the quick brown".into(),
                                false,
                            )
                            .await;
                        assert!(matches!(filtered, Filtered::Text(_)));
                        answer.replace(kept);
                    }
                });
                let how = if kept_across {
                    "kept instance"
                } else {
                    "fresh instance"
                };
                println!("response phase ({how}), {label}: median {median:.0} ns/chunk, best {best:.0} ns ({n} x 1000)");
            }
        }
    }
    Ok(())
}
