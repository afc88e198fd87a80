//! The policy chain: loads the configured policies, proves each on a trial
//! request, and runs the phases of a request through them — the request
//! phase until one routes or rejects, failure hooks in order until one
//! decides, response filters one after the other.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::{ChainError, FailureKind, KeptInstances, PolicyError, Runtime};
use crate::api::openai::{Endpoint, RequestHead};
use crate::api::prefix::PromptBlocks;
use crate::bundled as builtin;
use crate::config::{OnError, PolicyConfig};
use crate::fleet::backends::Backend;
use crate::fleet::Fleet;
use crate::metrics::metrics;
use crate::problem::Problem;
use crate::wasm::policy::contract::{
    AttemptFailure, AttemptFailureKind, Decision, FailureDecision, Hooks, RejectSpec, RequestInfo,
    TargetSpec, TextDecision,
};
use crate::wasm::policy::{CallContext, Pre};

/// Bounds on what a decision may contain.
const MAX_TARGETS: usize = 64;
const MAX_MODEL_LEN: usize = 256;
const MAX_MESSAGE_LEN: usize = 4096;
const MAX_CODE_LEN: usize = 64;
/// Replacement text may grow a chunk, but not without bound.
const MAX_REPLACEMENT_GROWTH: usize = 64 * 1024;

/// A compiled policy, ready to instantiate per call.
pub struct LoadedPolicy {
    pub name: Arc<str>,
    /// Where it came from: `builtin:NAME`, a file path, `api`, `watch:FILE`.
    pub source: String,
    /// SHA-256 of the component as deployed.
    pub sha256: String,
    pub on_error: OnError,
    /// The contract version it was built against.
    pub contract: &'static str,
    pub hooks: Hooks,
    config_json: Arc<str>,
    pre: Pre,
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
    /// The prompt's blocks, hashed once at admission (of the client's
    /// body: a policy that rewrites the messages does not change them).
    pub prefix: PromptBlocks,
}

impl PolicyRequest {
    fn info(&self) -> RequestInfo {
        RequestInfo {
            id: self.id,
            endpoint: self.endpoint,
            path: self.path.clone(),
            model: self.head.model.clone(),
            stream: self.head.stream,
            consumer: self.consumer.clone(),
            body_size: self.body.len() as u64,
        }
    }
}

/// Where the chain decided to send a request, and the request as the
/// later phases (failure, response) see it.
pub struct Route {
    pub targets: Vec<Target>,
    /// False when a policy marked the request not safe to send twice: no
    /// retry or fallback once it may have reached a backend.
    pub idempotent: bool,
    /// The request after every edit; `info.model` is the model in `body`.
    pub info: RequestInfo,
    pub headers: Arc<HeaderMap>,
    pub body: Bytes,
    /// The prompt's blocks, credited to the backend that serves it.
    pub prefix: PromptBlocks,
}

#[derive(Clone)]
pub struct Target {
    pub backend: Arc<Backend>,
    /// The model to send to this backend.
    pub model: String,
}

impl Target {
    pub fn spec(&self) -> TargetSpec {
        TargetSpec {
            backend: self.backend.name.to_string(),
            model: Some(self.model.clone()),
        }
    }
}

/// What the response filters made of a piece of text.
pub enum Filtered {
    Text(String),
    Stop(ChainError),
}

enum Verdict {
    /// Hand on, with the edited head and body when the policy changed them.
    Pass(Option<(RequestHead, Bytes)>),
    Route(Vec<Target>),
    Reject(ChainError),
}

/// What to load: a component's bytes and how to run it.
pub struct PolicySpec<'a> {
    pub name: &'a str,
    pub bytes: &'a [u8],
    pub source: String,
    pub config: &'a serde_json::Value,
    pub on_error: OnError,
}

/// One place in the chain: the active policy, and optionally a shadow
/// version that runs beside it on live requests without affecting them.
#[derive(Clone)]
pub struct ChainEntry {
    pub policy: Arc<LoadedPolicy>,
    pub shadow: Option<Arc<Shadow>>,
}

/// A shadow version and what it has shown so far.
pub struct Shadow {
    pub policy: Arc<LoadedPolicy>,
    pub version: u32,
    stats: std::sync::Mutex<ShadowStats>,
}

/// How often a shadow decided differently from the active version.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ShadowStats {
    pub compared: u64,
    pub differed: u64,
    /// The most recent differences, newest last (at most [`SHADOW_EXAMPLES`]).
    pub examples: std::collections::VecDeque<ShadowExample>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ShadowExample {
    pub request_id: u64,
    pub model: String,
    pub active: String,
    pub shadow: String,
}

const SHADOW_EXAMPLES: usize = 20;

impl Shadow {
    pub fn new(policy: Arc<LoadedPolicy>, version: u32) -> Shadow {
        Shadow {
            policy,
            version,
            stats: Default::default(),
        }
    }

    pub fn stats(&self) -> ShadowStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn record(&self, example: ShadowExample) {
        let Ok(mut stats) = self.stats.lock() else {
            return;
        };
        stats.compared += 1;
        if example.active != example.shadow {
            stats.differed += 1;
            if stats.examples.len() == SHADOW_EXAMPLES {
                stats.examples.pop_front();
            }
            stats.examples.push_back(example);
        }
    }
}

pub struct Chain {
    entries: Vec<ChainEntry>,
}

impl Chain {
    pub fn new(entries: Vec<ChainEntry>) -> Chain {
        Chain { entries }
    }

    /// Compiles, initialises and trials the configured policies, in order.
    pub async fn load(
        runtime: &Runtime,
        fleet: &Arc<Fleet>,
        configs: &[PolicyConfig],
    ) -> anyhow::Result<Chain> {
        let mut entries = Vec::with_capacity(configs.len());
        for config in configs {
            let bytes = module_bytes(&config.module)?;
            let spec = PolicySpec {
                name: &config.name,
                bytes: &bytes,
                source: config.module.clone(),
                config: &config.config,
                on_error: config.on_error,
            };
            let policy = load_policy(runtime, fleet, spec)
                .await
                .with_context(|| format!("policy `{}` ({})", config.name, config.module))?;
            entries.push(ChainEntry {
                policy: Arc::new(policy),
                shadow: None,
            });
        }
        Ok(Chain { entries })
    }

    pub fn entries(&self) -> &[ChainEntry] {
        &self.entries
    }

    pub fn policies(&self) -> impl Iterator<Item = &LoadedPolicy> {
        self.entries.iter().map(|e| e.policy.as_ref())
    }

    /// Characters of streamed text the response filters need held back, or
    /// `None` when no policy filters responses (they then stream untouched).
    pub fn response_holdback(&self) -> Option<usize> {
        self.policies()
            .filter_map(|p| p.hooks.response_holdback)
            .max()
            .map(|h| h as usize)
    }

    pub fn handles_failures(&self) -> bool {
        self.policies().any(|p| p.hooks.failure)
    }

    /// Runs the request phase: each policy in order until one routes or
    /// rejects. A failing policy fails the request or is skipped, as its
    /// `on_error` says.
    pub async fn decide(
        &self,
        runtime: &Arc<Runtime>,
        fleet: &Arc<Fleet>,
        mut request: PolicyRequest,
    ) -> Result<Route, ChainError> {
        let mut idempotent = true;
        for entry in self.entries.iter().filter(|e| e.policy.hooks.request) {
            let policy = entry.policy.as_ref();
            let verdict = run_request_phase(runtime, fleet, policy, &request)
                .await
                .map(|(verdict, said)| {
                    idempotent = said.unwrap_or(idempotent);
                    verdict
                });
            if let Some(shadow) = &entry.shadow {
                run_shadow(runtime, fleet, shadow, &request, summary(&verdict));
            }
            match verdict {
                Ok(Verdict::Pass(None)) => {}
                Ok(Verdict::Pass(Some((head, body)))) => {
                    request.head = head;
                    request.body = body;
                }
                Ok(Verdict::Route(targets)) => {
                    return Ok(Route {
                        targets,
                        idempotent,
                        info: request.info(),
                        headers: request.headers,
                        body: request.body,
                        prefix: request.prefix,
                    })
                }
                Ok(Verdict::Reject(rejection)) => return Err(rejection),
                Err(error) => skip_or_fail(policy, error)?,
            }
        }
        Err(ChainError::NoRoute {
            model: request.head.model,
        })
    }

    /// Asks the failure hooks, in order, what to do after a failed attempt;
    /// the first that does not answer `next` decides.
    pub async fn on_failure(
        &self,
        runtime: &Runtime,
        fleet: &Arc<Fleet>,
        route: &Route,
        failure: &AttemptFailure,
    ) -> Result<FailureDecision, ChainError> {
        for policy in self.policies().filter(|p| p.hooks.failure) {
            let state = runtime.state(context(
                fleet,
                policy,
                &route.headers,
                &route.body,
                &route.prefix,
            ));
            let started = Instant::now();
            let decision = runtime
                .on_failure(&policy.pre, state, &route.info, failure)
                .await;
            metrics().policy_call(&policy.name, "failure", started.elapsed());
            match decision {
                Ok(FailureDecision::Next) => {}
                Ok(decision) => return Ok(decision),
                Err(error) => skip_or_fail(policy, error)?,
            }
        }
        Ok(FailureDecision::Next)
    }

    /// Checks a failure hook's retry targets like a route's.
    pub fn resolve(
        &self,
        fleet: &Fleet,
        model: &str,
        targets: Vec<TargetSpec>,
    ) -> Result<Vec<Target>, ChainError> {
        resolve_targets(fleet, model, targets).map_err(|detail| {
            ChainError::Policy(PolicyError {
                policy: "failure hook".into(),
                kind: FailureKind::InvalidDecision,
                detail,
            })
        })
    }

    /// Runs `text` through every response filter in order: each sees what
    /// the one before released. `kept` holds the answer's instances from
    /// one call to the next.
    #[allow(clippy::too_many_arguments)]
    pub async fn filter_text(
        &self,
        runtime: &Runtime,
        fleet: &Arc<Fleet>,
        route: &Route,
        kept: &mut KeptInstances,
        choice: u32,
        mut text: String,
        last: bool,
    ) -> Filtered {
        for (index, policy) in self
            .policies()
            .filter(|p| p.hooks.response_holdback.is_some())
            .enumerate()
        {
            let state = || {
                runtime.state(context(
                    fleet,
                    policy,
                    &route.headers,
                    &route.body,
                    &route.prefix,
                ))
            };
            let started = Instant::now();
            let decision = runtime
                .on_response_text_kept(
                    &policy.pre,
                    kept.place(index),
                    state,
                    &route.info,
                    choice,
                    &text,
                    last,
                )
                .await;
            metrics().policy_call(&policy.name, "response", started.elapsed());
            match decision {
                Ok(TextDecision::Pass) => {}
                Ok(TextDecision::Replace(replacement))
                    if replacement.len() <= text.len() + MAX_REPLACEMENT_GROWTH =>
                {
                    text = replacement
                }
                Ok(TextDecision::Replace(replacement)) => {
                    let error = invalid(
                        policy,
                        format!(
                            "replacement of {} bytes for {} bytes of text",
                            replacement.len(),
                            text.len()
                        ),
                    );
                    if let Err(e) = skip_or_fail(policy, error) {
                        return Filtered::Stop(e);
                    }
                }
                Ok(TextDecision::Stop(spec)) => {
                    return Filtered::Stop(
                        rejection(spec)
                            .unwrap_or_else(|detail| ChainError::Policy(invalid(policy, detail))),
                    );
                }
                Err(error) => {
                    if let Err(e) = skip_or_fail(policy, error) {
                        return Filtered::Stop(e);
                    }
                }
            }
        }
        Filtered::Text(text)
    }
}

/// Logs a policy failure; `Ok` when the policy is fail-open and can be
/// skipped, the error to answer with when it is fail-closed.
fn skip_or_fail(policy: &LoadedPolicy, error: PolicyError) -> Result<(), ChainError> {
    crate::metrics::metrics().policy_failure(&policy.name, error.kind.label());
    tracing::warn!(policy = %error.policy, kind = ?error.kind, detail = %error.detail, on_error = ?policy.on_error, "policy failed");
    match policy.on_error {
        OnError::FailClosed => Err(error.into()),
        OnError::FailOpen => Ok(()),
    }
}

fn invalid(policy: &LoadedPolicy, detail: String) -> PolicyError {
    PolicyError {
        policy: policy.name.clone(),
        kind: FailureKind::InvalidDecision,
        detail,
    }
}

fn context(
    fleet: &Arc<Fleet>,
    policy: &LoadedPolicy,
    headers: &Arc<HeaderMap>,
    body: &Bytes,
    prefix: &PromptBlocks,
) -> CallContext {
    CallContext {
        fleet: fleet.clone(),
        headers: headers.clone(),
        body: body.clone(),
        prefix: prefix.clone(),
        policy_name: policy.name.clone(),
        config_json: policy.config_json.clone(),
    }
}

/// The bytes of `builtin:NAME` or of a component file.
pub fn module_bytes(module: &str) -> anyhow::Result<std::borrow::Cow<'static, [u8]>> {
    Ok(match module.strip_prefix("builtin:") {
        Some(name) => builtin::find(name)
            .with_context(|| format!("no bundled policy `{name}`"))?
            .into(),
        None => std::fs::read(module)
            .with_context(|| format!("reading {module}"))?
            .into(),
    })
}

/// Compiles, initialises (and snapshots) a policy, then proves it on a
/// trial request against the real fleet. Every failure names its cause.
pub async fn load_policy(
    runtime: &Runtime,
    fleet: &Arc<Fleet>,
    spec: PolicySpec<'_>,
) -> anyhow::Result<LoadedPolicy> {
    let name: Arc<str> = spec.name.into();
    let config_json: Arc<str> = serde_json::to_string(spec.config)?.into();
    let prepared = runtime
        .prepare(
            spec.bytes,
            CallContext {
                fleet: fleet.clone(),
                headers: Arc::new(HeaderMap::new()),
                body: Bytes::new(),
                prefix: PromptBlocks::default(),
                policy_name: name.clone(),
                config_json: config_json.clone(),
            },
        )
        .await?;
    let policy = LoadedPolicy {
        name,
        source: spec.source,
        sha256: crate::store::sha256_hex(spec.bytes),
        on_error: spec.on_error,
        contract: prepared.contract,
        hooks: prepared.hooks,
        config_json,
        pre: prepared.pre,
    };
    if policy.hooks.request {
        trial(runtime, fleet, &policy)
            .await
            .context("failed its trial request")?;
    }
    Ok(policy)
}

/// Runs a shadow version on a copy of the request, off the request's path,
/// and records whether it decided like the active version.
fn run_shadow(
    runtime: &Arc<Runtime>,
    fleet: &Arc<Fleet>,
    shadow: &Arc<Shadow>,
    request: &PolicyRequest,
    active: String,
) {
    let (runtime, fleet, shadow) = (runtime.clone(), fleet.clone(), shadow.clone());
    let copy = PolicyRequest {
        id: request.id,
        endpoint: request.endpoint,
        path: request.path.clone(),
        head: request.head.clone(),
        consumer: request.consumer.clone(),
        headers: request.headers.clone(),
        body: request.body.clone(),
        prefix: request.prefix.clone(),
    };
    tokio::spawn(async move {
        let verdict = run_request_phase(&runtime, &fleet, &shadow.policy, &copy)
            .await
            .map(|(verdict, _)| verdict);
        shadow.record(ShadowExample {
            request_id: copy.id,
            model: copy.head.model,
            active,
            shadow: summary(&verdict),
        });
    });
}

/// A decision in a few words, for comparing a shadow with the active policy.
fn summary(verdict: &Result<Verdict, PolicyError>) -> String {
    match verdict {
        Ok(Verdict::Pass(None)) => "pass".into(),
        Ok(Verdict::Pass(Some((head, _)))) => format!("pass (edited, model {})", head.model),
        Ok(Verdict::Route(targets)) => {
            let targets: Vec<String> = targets
                .iter()
                .map(|t| format!("{}:{}", t.backend.name, t.model))
                .collect();
            format!("route {}", targets.join(" > "))
        }
        Ok(Verdict::Reject(e)) => format!("reject {} {}", e.status().as_u16(), e.code()),
        Err(e) => format!("error: {}", e.kind),
    }
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
            include_usage: false,
        },
        consumer: None,
        headers: Arc::new(HeaderMap::new()),
        body: serde_json::to_vec(&body)?.into(),
        prefix: PromptBlocks::default(),
    };
    if let Err(e) = run_request_phase(runtime, fleet, policy, &request).await {
        anyhow::bail!("{}: {}", e.kind, e.detail);
    }
    if !policy.hooks.failure {
        undeclared_failure_hook(runtime, fleet, policy, &request).await?;
    }
    Ok(())
}

/// A policy whose `on_failure` answers something other than `next` but
/// whose hooks do not declare `failure` would never be called: an author's
/// mistake that is silent at run time, so it is refused here, loudly.
async fn undeclared_failure_hook(
    runtime: &Runtime,
    fleet: &Arc<Fleet>,
    policy: &LoadedPolicy,
    request: &PolicyRequest,
) -> anyhow::Result<()> {
    let failure = AttemptFailure {
        backend: fleet
            .backends()
            .first()
            .map_or_else(|| "trial".to_string(), |b| b.name.to_string()),
        model: request.head.model.clone(),
        kind: AttemptFailureKind::Connect,
        status: 0,
        attempt: 1,
        remaining: Vec::new(),
    };
    let state = runtime.state(context(
        fleet,
        policy,
        &request.headers,
        &request.body,
        &request.prefix,
    ));
    match runtime
        .on_failure(&policy.pre, state, &request.info(), &failure)
        .await
    {
        Ok(FailureDecision::Next) | Err(_) => Ok(()),
        Ok(decision) => anyhow::bail!(
            "its on_failure answered {decision:?} to a trial connect failure, but its hooks() \
             does not set `failure: true`, so the host would never call it; declare the hook"
        ),
    }
}

/// Calls one policy's request hook on the request as it stands.
async fn run_request_phase(
    runtime: &Runtime,
    fleet: &Arc<Fleet>,
    policy: &LoadedPolicy,
    request: &PolicyRequest,
) -> Result<(Verdict, Option<bool>), PolicyError> {
    let state = runtime.state(context(
        fleet,
        policy,
        &request.headers,
        &request.body,
        &request.prefix,
    ));
    let started = Instant::now();
    let decision = runtime
        .on_request(&policy.pre, state, &request.info())
        .await;
    metrics().policy_call(&policy.name, "request", started.elapsed());
    let (decision, idempotent) = decision?;
    let verdict = verdict(fleet, request, decision).map_err(|detail| invalid(policy, detail))?;
    Ok((verdict, idempotent))
}

/// What the host does with a guest's decision, or why it is invalid: the
/// one place a decision from untrusted code is checked.
fn verdict(fleet: &Fleet, request: &PolicyRequest, decision: Decision) -> Result<Verdict, String> {
    Ok(match decision {
        Decision::Route(targets) => {
            Verdict::Route(resolve_targets(fleet, &request.head.model, targets)?)
        }
        Decision::Reject(spec) => Verdict::Reject(rejection(spec)?),
        Decision::Pass { model, body } => Verdict::Pass(apply_edits(request, model, body)?),
    })
}

/// Checks a decision as if a policy had returned it for `request`: the
/// request body after its edits, or why it is invalid. For the fuzz target
/// `decision`; requests go through the same check.
pub fn check_decision(
    fleet: &Fleet,
    request: &PolicyRequest,
    decision: Decision,
) -> Result<Option<Bytes>, String> {
    Ok(match verdict(fleet, request, decision)? {
        Verdict::Pass(Some((_, body))) => Some(body),
        Verdict::Pass(None) | Verdict::Route(_) | Verdict::Reject(_) => None,
    })
}

fn resolve_targets(
    fleet: &Fleet,
    model: &str,
    targets: Vec<TargetSpec>,
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
                None => model.to_string(),
            };
            Ok(Target {
                backend: backend.clone(),
                model,
            })
        })
        .collect()
}

fn rejection(r: RejectSpec) -> Result<ChainError, String> {
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
    Ok(ChainError::Rejected {
        status,
        message,
        code: r.code,
    })
}

/// The request's new head and body after a policy's edits, or `None` when
/// they change nothing.
fn apply_edits(
    request: &PolicyRequest,
    model: Option<String>,
    body: Option<String>,
) -> Result<Option<(RequestHead, Bytes)>, String> {
    if model.is_none() && body.is_none() {
        return Ok(None);
    }
    let (mut head, mut new_body) = (request.head.clone(), request.body.clone());
    if let Some(edited) = body {
        head = RequestHead::parse(edited.as_bytes()).map_err(|e| format!("edited body: {e}"))?;
        new_body = Bytes::from(edited);
    }
    if let Some(model) = model {
        let model = check_model(model)?;
        new_body = crate::api::openai::with_model(&new_body, &model)
            .map_err(|e| format!("edited model: {e}"))?;
        head.model = model;
    }
    Ok(Some((head, new_body)))
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
