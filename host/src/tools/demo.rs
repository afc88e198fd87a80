//! `sluice demo`: the gateway and two simulated GPU servers in one process,
//! in the field's first scenario (glm4-9b on vm01 and vm02, qwen2.5-1.5b
//! only on vm01), so the whole request path can be tried with no setup.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{BackendConfig, Config, PolicyConfig};
use crate::dataplane::server;
use crate::tools::mock::{Flavor, MockBackend, MockConfig};

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
    let vm01 = MockBackend::start(
        local,
        pace(
            MockConfig::new("vm01", &["glm4-9b", "qwen2.5-1.5b"]),
            Flavor::Vllm,
        ),
    )
    .await?;
    let vm02 = MockBackend::start(
        local,
        pace(MockConfig::new("vm02", &["glm4-9b"]), Flavor::Ollama),
    )
    .await?;

    let backend = |name: &str, url: String, models: &[&str]| BackendConfig {
        name: name.into(),
        url,
        models: models.iter().map(|m| m.to_string()).collect(),
        max_concurrent_requests: 8,
        weight: 1,
        api_key: None,
        health_path: None,
        engine: Default::default(),
        metrics_url: None,
    };
    let mut config = Config {
        backends: vec![
            backend("vm01", vm01.url(), &["glm4-9b", "qwen2.5-1.5b"]),
            backend("vm02", vm02.url(), &["glm4-9b"]),
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
  vm01 (simulated vLLM)   {vm01_url}  serves glm4-9b, qwen2.5-1.5b
  vm02 (simulated Ollama) {vm02_url}  serves glm4-9b
  policy chain: builtin:model-router (aliases glm4 -> glm4-9b, qwen -> qwen2.5-1.5b)

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
    );
    server::serve(
        listener,
        move |r| gateway.clone().handle(r),
        shutdown,
        options,
    )
    .await
}
