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
//! in_flight = 3`, what its engine reports (`[state.vm01.engine] waiting =
//! 12, kv_cache_usage = 0.9`, for a backend with an `engine` set), and the
//! prompts it has cached (`[[state.vm01.cached]]` request bodies: their
//! blocks go into its prefix index, so `prefix-match` finds them). An
//! optional `[prefix_cache] block_bytes` sets the block size.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::openai::{Endpoint, RequestHead};
use crate::api::prefix::PromptBlocks;
use crate::config::{BackendConfig, OnError, PolicyRuntimeConfig, PrefixCacheConfig};
use crate::dataplane::errors::GatewayError;
use crate::fleet::backends::Slot;
use crate::fleet::engine::{EngineSignals, LoraState};
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
    #[serde(default)]
    prefix_cache: PrefixCacheConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendState {
    #[serde(default = "yes")]
    healthy: bool,
    #[serde(default)]
    in_flight: u32,
    /// What the backend's engine reports (it needs an `engine` set).
    #[serde(default)]
    engine: Option<EngineState>,
    /// Request bodies whose prompts the backend holds in its prefix cache.
    #[serde(default)]
    cached: Vec<Value>,
    /// Requests per second the gateway recently sent it
    /// (`engine.sent-rate`).
    #[serde(default)]
    sent_rate: f64,
}

/// `[state.NAME.engine]`: the figures of `engine.signals`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EngineState {
    waiting: Option<u64>,
    running: Option<u64>,
    kv_cache_usage: Option<f64>,
    #[serde(default)]
    running_adapters: Vec<String>,
    #[serde(default)]
    waiting_adapters: Vec<String>,
    max_adapters: Option<u32>,
    loaded_models: Option<Vec<String>>,
    /// The reading is older than `stale_after`: saturation unknown.
    #[serde(default)]
    stale: bool,
}

impl EngineState {
    fn signals(&self) -> EngineSignals {
        let lora = !(self.running_adapters.is_empty()
            && self.waiting_adapters.is_empty()
            && self.max_adapters.is_none());
        EngineSignals {
            waiting: self.waiting,
            running: self.running,
            kv_usage: self.kv_cache_usage,
            lora: lora.then(|| LoraState {
                running: self.running_adapters.clone(),
                waiting: self.waiting_adapters.clone(),
                max: self.max_adapters,
            }),
            models_loaded: self.loaded_models.clone(),
        }
    }
}

fn yes() -> bool {
    true
}

/// A fleet frozen in the described state. The slots held for `in_flight`
/// live as long as it does.
pub struct FrozenFleet {
    pub fleet: Arc<Fleet>,
    /// The block size prompts are cut into (`[prefix_cache] block_bytes`).
    pub block_bytes: u32,
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
            prefix_cache: PrefixCacheConfig::default(),
        },
    };
    file.prefix_cache
        .validate_replay()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let block_bytes = file.prefix_cache.block_bytes;
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
        anyhow::ensure!(
            state.sent_rate.is_finite() && state.sent_rate >= 0.0,
            "state.{name}.sent_rate: must be a number of requests per second, 0 or more"
        );
        backend.set_sent_rate(state.sent_rate);
        if let Some(engine) = &state.engine {
            anyhow::ensure!(
                backend.engine.probe().is_some(),
                "state.{name}.engine: the backend has no `engine` set"
            );
            // A stale reading is dated long before now; a fresh one ahead
            // of it, so it stays fresh however long the replay runs.
            let day = Duration::from_secs(86_400);
            let at = match engine.stale {
                false => Instant::now().checked_add(day),
                true => Instant::now().checked_sub(day),
            };
            if let Some(at) = at {
                backend.engine.record(Ok(engine.signals()), at);
            }
        }
        for body in &state.cached {
            backend
                .prefix
                .insert(&PromptBlocks::of(body, block_bytes).hashes);
        }
    }
    Ok(FrozenFleet {
        fleet,
        block_bytes,
        _held: held,
    })
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
    block_bytes: u32,
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
            prefix: PromptBlocks::of(&recorded.body, block_bytes),
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
        let id = n as u64 + 1;
        let decision = decide(
            &runtime,
            &frozen.fleet,
            &chain,
            id,
            request,
            frozen.block_bytes,
        );
        decisions.push(decision.await);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(turns: &[&str]) -> Value {
        let messages: Vec<Value> = turns
            .iter()
            .map(|t| json!({"role": "user", "content": t}))
            .collect();
        json!({"model": "m", "messages": messages})
    }

    /// A fleet file describes engine state and cached prompts; the bundled
    /// router decides on them offline.
    #[tokio::test]
    async fn fleet_files_describe_engines_and_prefix_caches() {
        let dir = std::env::temp_dir().join(format!("sluice-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let system = "You are a careful assistant. ".repeat(20);
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let fleet_file = write(
            "fleet.toml",
            &format!(
                "[[backends]]\nname = \"vm01\"\nurl = \"http://10.0.0.1:8000\"\nmodels = [\"m\"]\nengine = \"vllm\"\n\
                 [[backends]]\nname = \"vm02\"\nurl = \"http://10.0.0.2:8000\"\nmodels = [\"m\"]\nengine = \"vllm\"\n\
                 [[backends]]\nname = \"vm03\"\nurl = \"http://10.0.0.3:8000\"\nmodels = [\"m\"]\nengine = \"vllm\"\n\
                 [state.vm01.engine]\nwaiting = 0\nrunning = 1\nkv_cache_usage = 0.2\n\
                 [[state.vm01.cached]]\nmodel = \"m\"\nmessages = [{{ role = \"user\", content = {system:?} }}]\n\
                 [state.vm02.engine]\nwaiting = 0\nrunning = 1\nkv_cache_usage = 0.2\n\
                 [state.vm03.engine]\nwaiting = 0\nrunning = 0\nstale = true\n"
            ),
        );
        let requests = (0..20)
            .map(|i| json!({"body": chat(&[&system, &format!("question {i}")])}).to_string())
            .collect::<Vec<_>>()
            .join("\n");
        let requests_file = write("requests.jsonl", &requests);
        let router = |fleet_file: std::path::PathBuf| {
            let requests_file = requests_file.clone();
            async move {
                let runtime = PolicyRuntimeConfig::default();
                let module = "builtin:model-router";
                let (decisions, _) = run(
                    &runtime,
                    module,
                    json!({"scoring": {"prefix_affinity": true}}),
                    &requests_file,
                    Some(&fleet_file),
                    None,
                )
                .await
                .unwrap();
                decisions
            }
        };
        let decisions = router(fleet_file.clone()).await;
        for d in &decisions {
            assert_eq!(d["targets"][0]["backend"], "vm01", "{d}");
        }

        // Variants of the fleet file: how many requests vm01 still gets.
        let original = std::fs::read_to_string(&fleet_file).unwrap();
        let on_vm01 = |from: &str, to: &str| {
            let text = original.replacen(from, to, 1);
            assert_ne!(text, original);
            let path = write("variant.toml", &text);
            async move {
                let decisions = router(path).await;
                decisions
                    .iter()
                    .filter(|d| d["targets"][0]["backend"] == "vm01")
                    .count()
            }
        };
        // vm01's engine is queueing now: its prefix no longer wins.
        let busy = on_vm01("waiting = 0\nrunning = 1", "waiting = 30\nrunning = 16").await;
        assert_eq!(busy, 0);
        // vm01 is idle but has had far more than its share of the recent
        // traffic: its prefix no longer wins either.
        let ahead = on_vm01(
            "[state.vm01.engine]",
            "[state.vm01]\nsent_rate = 30.0\n[state.vm02]\nsent_rate = 10.0\n[state.vm03]\nsent_rate = 10.0\n[state.vm01.engine]",
        )
        .await;
        assert_eq!(ahead, 0);
        // Within its share, it keeps them.
        let within = on_vm01(
            "[state.vm01.engine]",
            "[state.vm01]\nsent_rate = 12.0\n[state.vm02]\nsent_rate = 10.0\n[state.vm03]\nsent_rate = 10.0\n[state.vm01.engine]",
        )
        .await;
        assert_eq!(within, 20);
        let bad = write(
            "bad.toml",
            "[[backends]]\nname = \"vm01\"\nurl = \"http://10.0.0.1:8000\"\n[state.vm01.engine]\nwaiting = 1\n",
        );
        let error = fleet(Some(&bad), &[]).err().unwrap().to_string();
        assert!(error.contains("no `engine` set"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
