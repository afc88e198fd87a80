//! `sluice demo`: the gateway and three simulated GPU servers in one
//! process, in the field's first scenario (glm4-9b on vm01 and vm02,
//! qwen2.5-1.5b only on vm01) plus vm03, a simulated SGLang serving glm4-9b,
//! so the whole request path can be tried with no setup. vm01 and vm03 run
//! the simulated engine (a KV cache that remembers prompt prefixes, prefill
//! time per uncached token, a bounded batch, `/metrics`), and the gateway
//! scrapes them: the console shows their queues, KV-cache use and prefix
//! hit rates, and a conversation that resends its history goes back where
//! its prefix is cached.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{BackendConfig, Config, EngineKind, PolicyConfig};
use crate::dataplane::server;
use crate::tools::mock::{Flavor, MockBackend, MockConfig};
use crate::tools::mock_engine::{EngineModel, MetricsFlavor};

/// A small GPU: 2,048 blocks of 16 tokens, 0.2 ms per uncached prompt token.
fn engine(metrics: MetricsFlavor) -> Option<EngineModel> {
    Some(EngineModel {
        kv_blocks: 2048,
        block_tokens: 16,
        prefill_per_token: Duration::from_micros(200),
        max_batch: 16,
        metrics,
    })
}

pub async fn run(
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let pace = |mut config: MockConfig, flavor| {
        config.flavor = flavor;
        config.first_token_delay = Duration::from_millis(120);
        config.token_interval = Duration::from_millis(25);
        config.answer_tokens = 48;
        config
    };
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut vm01 = pace(
        MockConfig::new("vm01", &["glm4-9b", "qwen2.5-1.5b"]),
        Flavor::Vllm,
    );
    vm01.engine = engine(MetricsFlavor::Vllm);
    let vm01 = MockBackend::start(local, vm01).await?;
    let vm02 = MockBackend::start(
        local,
        pace(MockConfig::new("vm02", &["glm4-9b"]), Flavor::Ollama),
    )
    .await?;
    let mut vm03 = pace(MockConfig::new("vm03", &["glm4-9b"]), Flavor::Vllm);
    vm03.engine = engine(MetricsFlavor::Sglang);
    let vm03 = MockBackend::start(local, vm03).await?;

    let backend = |name: &str, url: String, models: &[&str], engine| BackendConfig {
        name: name.into(),
        url,
        models: models.iter().map(|m| m.to_string()).collect(),
        max_concurrent_requests: 8,
        weight: 1,
        api_key: None,
        health_path: None,
        engine,
        metrics_url: None,
    };
    let mut config = Config {
        backends: vec![
            backend(
                "vm01",
                vm01.url(),
                &["glm4-9b", "qwen2.5-1.5b"],
                EngineKind::Vllm,
            ),
            backend("vm02", vm02.url(), &["glm4-9b"], EngineKind::None),
            backend("vm03", vm03.url(), &["glm4-9b"], EngineKind::Sglang),
        ],
        policies: vec![PolicyConfig {
            name: "router".into(),
            module: "builtin:model-router".into(),
            config: serde_json::json!({"aliases": {"glm4": "glm4-9b", "qwen": "qwen2.5-1.5b"}}),
            on_error: Default::default(),
        }],
        ..Config::default()
    };
    config.server.listen = listen;
    config.validate()?;

    let node = crate::control::Node::start(&config).await?;
    let gateway = node.gateway.clone();
    gateway.checker.start().await;
    let listener = server::bind(listen).await?;
    let addr = listener.local_addr()?;
    // The console, on the admin API's own loopback listener. The demo sets
    // no admin token, so the page opens without asking for one.
    let admin_listener = server::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let console = admin_listener.local_addr()?;
    let admin = std::sync::Arc::new(crate::control::admin::Admin {
        deployer: node.deployer.clone(),
        token: None,
        usage: gateway.ledger.store.clone(),
        gateway: gateway.clone(),
        feed: crate::control::console::start_feed(gateway.fleet.clone()),
    });
    let options = server::ServeOptions {
        drain: Duration::from_secs(5),
        header_timeout: Duration::from_secs(10),
    };
    tokio::spawn(server::serve(
        admin_listener,
        move |r| admin.clone().handle(r),
        std::future::pending(),
        options,
    ));
    println!(
        r#"
Sluice demo: gateway on http://{addr}
  vm01 (simulated vLLM)   {vm01_url}  serves glm4-9b, qwen2.5-1.5b  (engine metrics scraped)
  vm02 (simulated Ollama) {vm02_url}  serves glm4-9b                (no engine metrics)
  vm03 (simulated SGLang) {vm03_url}  serves glm4-9b                (engine metrics scraped)
  policy chain: builtin:model-router (aliases glm4 -> glm4-9b, qwen -> qwen2.5-1.5b),
  scoring on engine queues and KV cache, and prefix affinity: a conversation that resends
  its history goes back where its prefix is cached (the console shows each backend's hits)

Console: http://{console}/  (fleet, live charts, policies, usage, playground; the demo
  sets no admin token, so it opens without signing in — loopback only)

Try (the x-sluice-backend response header says who answered):
  curl -si http://{addr}/v1/models
  curl -s http://{addr}/health        # each backend's health, in flight, last error
  curl -s http://{addr}/load-stats    # served, failures, latency percentiles per backend and model
  curl -si http://{addr}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"glm4-9b","messages":[{{"role":"user","content":"Hi"}}]}}'
  curl -sN http://{addr}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"qwen","stream":true,"messages":[{{"role":"user","content":"Hi"}}]}}'
  curl -si http://{addr}/v1/chat/completions -d '{{"model":"gpt-9"}}'

Ctrl-C stops it."#,
        vm01_url = vm01.url(),
        vm02_url = vm02.url(),
        vm03_url = vm03.url(),
    );
    server::serve(
        listener,
        move |r| gateway.clone().handle(r),
        shutdown,
        options,
    )
    .await
}
