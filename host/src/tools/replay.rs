//! `sluice policy test`: runs a policy offline against recorded requests and
//! a described fleet, and prints each decision — so an author sees what a
//! policy would do with real traffic before deploying it, and can pin those
//! decisions in CI (`--expect`).
//!
//! Requests are JSON lines (what `[recording]` writes, or written by hand):
//! `{"path": "/v1/chat/completions", "headers": {"x-tenant": "a"},
//! "consumer": "alice", "body": {...}}` — only `body` is required. The
//! fleet is a TOML file with the `[[backends]]` of a `sluice.toml`, plus an
//! optional live state per backend: `[state.vm01] healthy = false,
//! in_flight = 3`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::openai::{Endpoint, RequestHead};
use crate::config::{BackendConfig, OnError, PolicyRuntimeConfig};
use crate::dataplane::errors::GatewayError;
use crate::fleet::backends::Slot;
use crate::fleet::Fleet;
use crate::policy::{
    load_policy, module_bytes, Chain, ChainEntry, ChainError, PolicyRequest, PolicySpec, Runtime,
};
use crate::problem::Problem;

/// One recorded request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recorded {
    #[serde(default = "chat_path")]
    pub path: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub consumer: Option<String>,
    pub body: Value,
    /// Written by the recorder; not used for the decision.
    #[serde(default)]
    pub time_unix_ms: Option<u64>,
}

fn chat_path() -> String {
    "/v1/chat/completions".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    backends: Vec<BackendConfig>,
    #[serde(default)]
    state: BTreeMap<String, BackendState>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendState {
    #[serde(default = "yes")]
    healthy: bool,
    #[serde(default)]
    in_flight: u32,
}

fn yes() -> bool {
    true
}

/// A fleet frozen in the described state. The slots held for `in_flight`
/// live as long as it does.
pub struct FrozenFleet {
    pub fleet: Arc<Fleet>,
    _held: Vec<Slot>,
}

/// Reads a fleet file; without one, a single backend `local` serving every
/// model the requests ask for.
pub fn fleet(path: Option<&Path>, models: &[String]) -> anyhow::Result<FrozenFleet> {
    let file = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<FleetFile>(&text)
                .with_context(|| format!("{}: not a fleet file", path.display()))?
        }
        None => FleetFile {
            backends: vec![BackendConfig {
                name: "local".into(),
                url: "http://127.0.0.1:9".into(),
                models: models.to_vec(),
                max_concurrent_requests: 0,
                weight: 1,
                api_key: None,
                health_path: None,
                engine: Default::default(),
                metrics_url: None,
            }],
            state: BTreeMap::new(),
        },
    };
    let fleet = Arc::new(Fleet::new(&file.backends).map_err(anyhow::Error::msg)?);
    let mut held = Vec::new();
    for (name, state) in &file.state {
        let backend = fleet
            .get(name)
            .with_context(|| format!("state.{name}: no backend named `{name}`"))?;
        if !state.healthy {
            for _ in 0..64 {
                backend.record_probe(Err("down in the fleet file".into()));
            }
        }
        for _ in 0..state.in_flight {
            held.push(backend.try_acquire().with_context(|| {
                format!("state.{name}.in_flight: more than its max_concurrent_requests")
            })?);
        }
    }
    Ok(FrozenFleet { fleet, _held: held })
}

/// Reads a JSON-lines file of recorded requests.
pub fn requests(path: &Path) -> anyhow::Result<Vec<Recorded>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a recorded request", path.display(), n + 1))
        })
        .collect()
}

/// Loads the policy under test as a one-policy chain.
pub async fn load(
    runtime: &Runtime,
    fleet: &Arc<Fleet>,
    module: &str,
    config: Value,
) -> anyhow::Result<Chain> {
    let bytes = module_bytes(module)?;
    let name = module
        .rsplit(['/', ':'])
        .next()
        .unwrap_or(module)
        .trim_end_matches(".wasm")
        .to_string();
    let policy = load_policy(
        runtime,
        fleet,
        PolicySpec {
            name: &name,
            bytes: &bytes,
            source: module.to_string(),
            config: &config,
            on_error: OnError::FailClosed,
        },
    )
    .await?;
    Ok(Chain::new(vec![ChainEntry {
        policy: Arc::new(policy),
        shadow: None,
    }]))
}

/// The decision for one request, as one JSON object (what is printed and
/// what `--expect` compares).
pub async fn decide(
    runtime: &Arc<Runtime>,
    fleet: &Arc<Fleet>,
    chain: &Chain,
    id: u64,
    recorded: &Recorded,
) -> Value {
    let outcome = async {
        let endpoint = Endpoint::from_path(&recorded.path).ok_or_else(|| {
            GatewayError::bad_request(format!("unknown path `{}`", recorded.path), "not_found")
        })?;
        let body = Bytes::from(recorded.body.to_string());
        let head = RequestHead::parse(&body)?;
        let mut headers = HeaderMap::new();
        for (name, value) in &recorded.headers {
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) else {
                continue;
            };
            headers.insert(name, value);
        }
        let request = PolicyRequest {
            id,
            endpoint,
            path: recorded.path.clone(),
            head,
            consumer: recorded.consumer.clone(),
            headers: Arc::new(headers),
            body,
            prefix: Default::default(),
        };
        Ok::<_, GatewayError>(chain.decide(runtime, fleet, request).await?)
    }
    .await;
    match outcome {
        Ok(route) => {
            let targets: Vec<Value> = route
                .targets
                .iter()
                .map(|t| json!({"backend": &*t.backend.name, "model": t.model}))
                .collect();
            let mut decision = json!({"decision": "route", "targets": targets});
            if !route.idempotent {
                decision["idempotent"] = json!(false);
            }
            if route.info.model != recorded.body["model"].as_str().unwrap_or_default() {
                decision["model"] = json!(route.info.model);
            }
            decision
        }
        Err(GatewayError::Chain(ChainError::Rejected {
            status,
            code,
            message,
        })) => {
            json!({"decision": "reject", "status": status.as_u16(), "code": code, "message": message})
        }
        Err(error) => json!({
            "decision": "error",
            "status": error.status().as_u16(),
            "code": error.code(),
            "message": error.to_string(),
        }),
    }
}

/// Runs every request and compares with `expected` (when given): returns
/// the printed lines and the differences.
pub async fn run(
    runtime_config: &PolicyRuntimeConfig,
    module: &str,
    config: Value,
    requests_file: &Path,
    fleet_file: Option<&Path>,
    expected_file: Option<&Path>,
) -> anyhow::Result<(Vec<Value>, Vec<String>)> {
    let recorded = requests(requests_file)?;
    let mut models: Vec<String> = recorded
        .iter()
        .filter_map(|r| r.body["model"].as_str().map(str::to_string))
        .collect();
    models.sort();
    models.dedup();
    let frozen = fleet(fleet_file, &models)?;
    let runtime = Arc::new(Runtime::new(runtime_config)?);
    let chain = load(&runtime, &frozen.fleet, module, config).await?;
    let mut decisions = Vec::with_capacity(recorded.len());
    for (n, request) in recorded.iter().enumerate() {
        decisions.push(decide(&runtime, &frozen.fleet, &chain, n as u64 + 1, request).await);
    }
    let mut differences = Vec::new();
    if let Some(path) = expected_file {
        let expected: Vec<Value> = std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(n, l)| {
                serde_json::from_str(l)
                    .with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))
            })
            .collect::<anyhow::Result<_>>()?;
        if expected.len() != decisions.len() {
            differences.push(format!(
                "{} decisions expected, {} made",
                expected.len(),
                decisions.len()
            ));
        }
        for (n, (want, got)) in expected.iter().zip(&decisions).enumerate() {
            if want != got {
                differences.push(format!("request {}: expected {want}, got {got}", n + 1));
            }
        }
    }
    Ok((decisions, differences))
}
