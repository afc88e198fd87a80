//! The policy chain: loads the configured policies, proves each on a trial
//! request, and runs them in order for every request until one routes or
//! rejects it.

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::guest::{types, GuestState, PolicyPre};
use super::{builtin, FailureKind, PolicyError, Runtime};
use crate::backends::{Backend, Fleet};
use crate::config::{OnError, PolicyConfig};
use crate::errors::GatewayError;
use crate::openai::{Endpoint, RequestHead};

/// Bounds on what a decision may contain.
const MAX_TARGETS: usize = 64;
const MAX_MODEL_LEN: usize = 256;
const MAX_MESSAGE_LEN: usize = 4096;
const MAX_CODE_LEN: usize = 64;

/// A compiled policy, ready to instantiate per request.
pub struct LoadedPolicy {
    pub name: Arc<str>,
    /// Where it came from: `builtin:NAME` or a file path.
    pub source: String,
    pub on_error: OnError,
    config_json: Arc<str>,
    pre: PolicyPre<GuestState>,
}

/// The request as the chain sees it; policies' edits update it in place.
pub struct PolicyRequest {
    pub id: u64,
    pub endpoint: Endpoint,
    pub path: String,
    pub head: RequestHead,
    pub consumer: Option<String>,
    pub headers: Arc<HeaderMap>,
    pub body: Bytes,
}

/// Where the chain decided to send a request.
pub struct Route {
    pub targets: Vec<Target>,
    /// The request after every edit. `head.model` is the model in `body`.
    pub head: RequestHead,
    pub body: Bytes,
}

pub struct Target {
    pub backend: Arc<Backend>,
    /// The model to send to this backend.
    pub model: String,
}

enum Verdict {
    /// Hand on, with the edited head and body when the policy changed them.
    Pass(Option<(RequestHead, Bytes)>),
    Route(Route),
    Reject(GatewayError),
}

pub struct Chain {
    policies: Vec<LoadedPolicy>,
}

impl Chain {
    /// Compiles every policy and runs each once on a trial request against
    /// the real fleet; a policy that traps there is refused with its message.
    pub async fn load(
        runtime: &Runtime,
        fleet: &Arc<Fleet>,
        configs: &[PolicyConfig],
    ) -> anyhow::Result<Chain> {
        let mut policies = Vec::with_capacity(configs.len());
        for config in configs {
            let policy = load_one(runtime, config)
                .with_context(|| format!("policy `{}` ({})", config.name, config.module))?;
            trial(runtime, fleet, &policy).await.with_context(|| {
                format!(
                    "policy `{}` ({}) failed its trial request",
                    config.name, config.module
                )
            })?;
            policies.push(policy);
        }
        Ok(Chain { policies })
    }

    pub fn policies(&self) -> &[LoadedPolicy] {
        &self.policies
    }

    /// Runs the request phase: each policy in order until one routes or
    /// rejects. A failing policy fails the request or is skipped, as its
    /// `on_error` says.
    pub async fn decide(
        &self,
        runtime: &Runtime,
        fleet: &Arc<Fleet>,
        mut request: PolicyRequest,
    ) -> Result<Route, GatewayError> {
        for policy in &self.policies {
            match run_one(runtime, fleet, policy, &request).await {
                Ok(Verdict::Pass(None)) => {}
                Ok(Verdict::Pass(Some((head, body)))) => {
                    request.head = head;
                    request.body = body;
                }
                Ok(Verdict::Route(route)) => return Ok(route),
                Ok(Verdict::Reject(rejection)) => return Err(rejection),
                Err(error) => {
                    tracing::warn!(policy = %error.policy, kind = ?error.kind, detail = %error.detail, on_error = ?policy.on_error, "policy failed");
                    if policy.on_error == OnError::FailClosed {
                        return Err(error.into());
                    }
                }
            }
        }
        Err(GatewayError::NoRoute {
            model: request.head.model,
        })
    }
}

fn load_one(runtime: &Runtime, config: &PolicyConfig) -> anyhow::Result<LoadedPolicy> {
    let bytes: std::borrow::Cow<[u8]> = match config.module.strip_prefix("builtin:") {
        Some(name) => builtin::find(name)
            .with_context(|| format!("no bundled policy `{name}`"))?
            .into(),
        None => std::fs::read(&config.module)
            .with_context(|| format!("reading {}", config.module))?
            .into(),
    };
    Ok(LoadedPolicy {
        name: config.name.as_str().into(),
        source: config.module.clone(),
        on_error: config.on_error,
        config_json: serde_json::to_string(&config.config)?.into(),
        pre: runtime.prepare(&bytes)?,
    })
}

async fn trial(runtime: &Runtime, fleet: &Arc<Fleet>, policy: &LoadedPolicy) -> anyhow::Result<()> {
    let model = fleet
        .models()
        .first()
        .cloned()
        .unwrap_or_else(|| "trial".into());
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 1,
    });
    let request = PolicyRequest {
        id: 0,
        endpoint: Endpoint::ChatCompletions,
        path: "/v1/chat/completions".into(),
        head: RequestHead {
            model,
            stream: false,
        },
        consumer: None,
        headers: Arc::new(HeaderMap::new()),
        body: serde_json::to_vec(&body)?.into(),
    };
    match run_one(runtime, fleet, policy, &request).await {
        Ok(_) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("{}: {}", e.kind, e.detail)),
    }
}

/// Calls one policy on the request as it stands.
async fn run_one(
    runtime: &Runtime,
    fleet: &Arc<Fleet>,
    policy: &LoadedPolicy,
    request: &PolicyRequest,
) -> Result<Verdict, PolicyError> {
    let wit_request = types::Request {
        id: request.id,
        endpoint: match request.endpoint {
            Endpoint::ChatCompletions => types::Endpoint::ChatCompletions,
            Endpoint::Completions => types::Endpoint::Completions,
            Endpoint::Embeddings => types::Endpoint::Embeddings,
        },
        path: request.path.clone(),
        model: request.head.model.clone(),
        stream: request.head.stream,
        consumer: request.consumer.clone(),
        body_size: request.body.len() as u64,
    };
    let state = GuestState::new(
        runtime.memory_limit,
        fleet.clone(),
        request.headers.clone(),
        request.body.clone(),
        runtime.max_body_bytes,
        policy.name.clone(),
        policy.config_json.clone(),
    );
    let decision = runtime.on_request(&policy.pre, state, &wit_request).await?;
    let invalid = |detail: String| PolicyError {
        policy: policy.name.clone(),
        kind: FailureKind::InvalidDecision,
        detail,
    };
    match decision {
        types::Decision::Route(targets) => {
            let targets = resolve_targets(fleet, &request.head, targets).map_err(invalid)?;
            Ok(Verdict::Route(Route {
                targets,
                head: request.head.clone(),
                body: request.body.clone(),
            }))
        }
        types::Decision::Reject(r) => Ok(Verdict::Reject(rejection(r).map_err(invalid)?)),
        types::Decision::Pass(edits) => {
            Ok(Verdict::Pass(apply_edits(request, edits).map_err(invalid)?))
        }
    }
}

fn resolve_targets(
    fleet: &Fleet,
    head: &RequestHead,
    targets: Vec<types::Target>,
) -> Result<Vec<Target>, String> {
    if targets.is_empty() {
        return Err("route with no targets".into());
    }
    if targets.len() > MAX_TARGETS {
        return Err(format!(
            "route with {} targets (at most {MAX_TARGETS})",
            targets.len()
        ));
    }
    targets
        .into_iter()
        .map(|t| {
            let backend = fleet
                .get(&t.backend)
                .ok_or_else(|| format!("route to unknown backend `{}`", truncated(&t.backend)))?;
            let model = match t.model {
                Some(m) => check_model(m)?,
                None => head.model.clone(),
            };
            Ok(Target {
                backend: backend.clone(),
                model,
            })
        })
        .collect()
}

fn rejection(r: types::Rejection) -> Result<GatewayError, String> {
    let status = StatusCode::from_u16(r.status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .ok_or_else(|| format!("reject with status {} (must be 400..=599)", r.status))?;
    let code_ok = !r.code.is_empty()
        && r.code.len() <= MAX_CODE_LEN
        && r.code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !code_ok {
        return Err(format!(
            "reject with code `{}` (1 to {MAX_CODE_LEN} of [A-Za-z0-9_.-])",
            truncated(&r.code)
        ));
    }
    let mut message = r.message;
    if message.len() > MAX_MESSAGE_LEN {
        let mut end = MAX_MESSAGE_LEN;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    Ok(GatewayError::Rejected {
        status,
        message,
        code: r.code,
    })
}

/// The request's new head and body after `edits`, or `None` when the edits
/// change nothing.
fn apply_edits(
    request: &PolicyRequest,
    edits: types::Edits,
) -> Result<Option<(RequestHead, Bytes)>, String> {
    if edits.model.is_none() && edits.body.is_none() {
        return Ok(None);
    }
    let (mut head, mut body) = (request.head.clone(), request.body.clone());
    if let Some(new_body) = edits.body {
        head = RequestHead::parse(new_body.as_bytes()).map_err(|e| format!("edited body: {e}"))?;
        body = Bytes::from(new_body);
    }
    if let Some(model) = edits.model {
        let model = check_model(model)?;
        body =
            crate::openai::with_model(&body, &model).map_err(|e| format!("edited model: {e}"))?;
        head.model = model;
    }
    Ok(Some((head, body)))
}

fn check_model(model: String) -> Result<String, String> {
    if model.is_empty() || model.len() > MAX_MODEL_LEN {
        return Err(format!(
            "model name of {} bytes (1 to {MAX_MODEL_LEN})",
            model.len()
        ));
    }
    Ok(model)
}

fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}
