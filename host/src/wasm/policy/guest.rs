//! The generated bindings of every contract version the host serves, the
//! host side of their imports (what a guest can read of the request and the
//! fleet, bounded), and the conversions to the version-independent
//! [`contract`](super::contract) types.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::contract::{
    AttemptFailure, AttemptFailureKind, Decision, FailureDecision, Hooks, RejectSpec, RequestInfo,
    TargetSpec, TextDecision,
};
use crate::api::openai::Endpoint;
use crate::api::prefix::PromptBlocks;
use crate::api::CREDENTIAL_HEADERS;
use crate::fleet::Fleet;
use crate::wasm::limits::MemoryCap;
use crate::wasm::store::Capped;

/// `sluice:policy@0.2.3`: the current contract (`wit/policy.wit`). It also
/// serves 0.2.0, 0.2.1 and 0.2.2 components: wasmtime matches their
/// `@0.2.x` names to `@0.2.3` (semver-compatible), and each minor since
/// 0.2.0 only added imports.
pub mod v2 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "policy",
        exports: { default: async },
    });
}

/// `sluice:policy@0.1.0`: frozen; components built against it keep working.
pub mod v1 {
    wasmtime::component::bindgen!({
        path: "../wit/archive/0.1.0",
        world: "policy",
        exports: { default: async },
    });
}

/// How much of a guest's stderr is kept to explain a trap (panic messages).
pub const STDERR_CAPACITY: usize = 4096;

/// The per-call state of one guest instance.
pub struct GuestState {
    /// Built on the guest's first WASI call: most calls make none, and the
    /// context (random sources, clocks, pipes) costs allocations per call.
    wasi: Option<(WasiCtx, MemoryOutputPipe)>,
    table: ResourceTable,
    pub memory: MemoryCap,
    /// Set when the epoch callback interrupted the guest for its timeout.
    pub timed_out: bool,
    /// When the current call began: its timeout counts from here (an
    /// instance kept across calls starts each call afresh).
    pub call_started: std::time::Instant,
    pub fleet: Arc<Fleet>,
    pub headers: Arc<HeaderMap>,
    pub body: Bytes,
    /// The request's prompt blocks, for `engine.prefix-match`.
    pub prefix: PromptBlocks,
    pub max_body_bytes: usize,
    pub policy_name: Arc<str>,
    pub config_json: Arc<str>,
    /// What the guest said through `request-options.set-idempotent`.
    pub idempotent: Option<bool>,
}

/// What a call's state is made from, besides the runtime's limits.
pub struct CallContext {
    pub fleet: Arc<Fleet>,
    pub headers: Arc<HeaderMap>,
    pub body: Bytes,
    pub prefix: PromptBlocks,
    pub policy_name: Arc<str>,
    pub config_json: Arc<str>,
}

impl GuestState {
    pub fn new(context: CallContext, memory_limit: usize, max_body_bytes: usize) -> GuestState {
        GuestState {
            wasi: None,
            table: ResourceTable::new(),
            memory: MemoryCap::new(memory_limit),
            timed_out: false,
            call_started: std::time::Instant::now(),
            fleet: context.fleet,
            headers: context.headers,
            body: context.body,
            prefix: context.prefix,
            max_body_bytes,
            policy_name: context.policy_name,
            config_json: context.config_json,
            idempotent: None,
        }
    }

    fn header(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        if CREDENTIAL_HEADERS.contains(&name.as_str()) {
            return None;
        }
        let value = self.headers.get(name.as_str())?;
        Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
    }

    fn visible_headers(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter(|(name, _)| !CREDENTIAL_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_string(), value)
            })
            .collect()
    }

    fn visible_body(&self) -> Option<String> {
        if self.body.len() > self.max_body_bytes {
            return None;
        }
        // The host already checked the body is JSON, hence UTF-8.
        Some(String::from_utf8_lossy(&self.body).into_owned())
    }

    fn log(&self, level: tracing::Level, message: &str) {
        let policy = &*self.policy_name;
        let message: String = message.chars().take(1024).collect();
        match level {
            tracing::Level::DEBUG | tracing::Level::TRACE => tracing::debug!(policy, "{message}"),
            tracing::Level::INFO => tracing::info!(policy, "{message}"),
            tracing::Level::WARN => tracing::warn!(policy, "{message}"),
            tracing::Level::ERROR => tracing::error!(policy, "{message}"),
        }
    }
}

impl GuestState {
    /// What the guest wrote to stderr (its panic message, usually).
    pub fn stderr(&self) -> bytes::Bytes {
        match &self.wasi {
            Some((_, stderr)) => stderr.contents(),
            None => bytes::Bytes::new(),
        }
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let (ctx, _) = self.wasi.get_or_insert_with(|| {
            // Locked down: no preopened files, no environment, no arguments,
            // sockets denied; stderr captured (bounded) to explain panics.
            let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
            (WasiCtx::builder().stderr(stderr.clone()).build(), stderr)
        });
        WasiCtxView {
            ctx,
            table: &mut self.table,
        }
    }
}

impl Capped for GuestState {
    fn memory_cap(&mut self) -> &mut MemoryCap {
        &mut self.memory
    }
}

/// The imports and the shared conversions, identical in every version.
macro_rules! versioned {
    ($v:ident) => {
        impl $v::sluice::policy::types::Host for GuestState {}

        impl $v::sluice::policy::request_data::Host for GuestState {
            fn header(&mut self, name: String) -> Option<String> {
                GuestState::header(self, &name)
            }

            fn headers(&mut self) -> Vec<(String, String)> {
                self.visible_headers()
            }

            fn body(&mut self) -> Option<String> {
                self.visible_body()
            }
        }

        impl $v::sluice::policy::fleet::Host for GuestState {
            fn backends_for_model(
                &mut self,
                model: String,
            ) -> Vec<$v::sluice::policy::types::Backend> {
                self.fleet
                    .serving(&model)
                    .iter()
                    .map(|b| b.as_ref().into())
                    .collect()
            }

            fn backends(&mut self) -> Vec<$v::sluice::policy::types::Backend> {
                self.fleet
                    .backends()
                    .iter()
                    .map(|b| b.as_ref().into())
                    .collect()
            }
        }

        impl $v::sluice::policy::host::Host for GuestState {
            fn log(&mut self, level: $v::sluice::policy::host::Level, message: String) {
                use $v::sluice::policy::host::Level;
                let level = match level {
                    Level::Debug => tracing::Level::DEBUG,
                    Level::Info => tracing::Level::INFO,
                    Level::Warn => tracing::Level::WARN,
                    Level::Error => tracing::Level::ERROR,
                };
                GuestState::log(self, level, &message);
            }

            fn config(&mut self) -> String {
                self.config_json.to_string()
            }
        }

        impl From<&crate::fleet::backends::Backend> for $v::sluice::policy::types::Backend {
            fn from(b: &crate::fleet::backends::Backend) -> Self {
                $v::sluice::policy::types::Backend {
                    name: b.name.to_string(),
                    models: b.models().to_vec(),
                    healthy: b.is_healthy(),
                    in_flight: b.in_flight(),
                    max_concurrent: b.max_concurrent(),
                    weight: b.weight(),
                    latency_us: b.latency_us(),
                }
            }
        }

        impl From<&RequestInfo> for $v::sluice::policy::types::Request {
            fn from(r: &RequestInfo) -> Self {
                use $v::sluice::policy::types::Endpoint as E;
                $v::sluice::policy::types::Request {
                    id: r.id,
                    endpoint: match r.endpoint {
                        Endpoint::ChatCompletions => E::ChatCompletions,
                        Endpoint::Completions => E::Completions,
                        Endpoint::Embeddings => E::Embeddings,
                    },
                    path: r.path.clone(),
                    model: r.model.clone(),
                    stream: r.stream,
                    consumer: r.consumer.clone(),
                    body_size: r.body_size,
                }
            }
        }

        impl From<$v::sluice::policy::types::Target> for TargetSpec {
            fn from(t: $v::sluice::policy::types::Target) -> Self {
                TargetSpec {
                    backend: t.backend,
                    model: t.model,
                }
            }
        }

        impl From<$v::sluice::policy::types::Rejection> for RejectSpec {
            fn from(r: $v::sluice::policy::types::Rejection) -> Self {
                RejectSpec {
                    status: r.status,
                    message: r.message,
                    code: r.code,
                }
            }
        }

        impl From<$v::sluice::policy::types::Decision> for Decision {
            fn from(d: $v::sluice::policy::types::Decision) -> Self {
                use $v::sluice::policy::types::Decision as D;
                match d {
                    D::Pass(edits) => Decision::Pass {
                        model: edits.model,
                        body: edits.body,
                    },
                    D::Route(targets) => {
                        Decision::Route(targets.into_iter().map(Into::into).collect())
                    }
                    D::Reject(r) => Decision::Reject(r.into()),
                }
            }
        }
    };
}

versioned!(v1);
versioned!(v2);

impl v2::sluice::policy::request_options::Host for GuestState {
    fn set_idempotent(&mut self, idempotent: bool) {
        self.idempotent = Some(idempotent);
    }
}

impl v2::sluice::policy::engine::Host for GuestState {
    fn signals(&mut self, backend: String) -> Option<v2::sluice::policy::engine::EngineSignals> {
        let view = self.fleet.engine(&backend)?;
        let signals = view.signals.as_deref();
        let lora = signals.and_then(|s| s.lora.as_ref());
        Some(v2::sluice::policy::engine::EngineSignals {
            engine: view.engine.as_str().to_string(),
            waiting: signals.and_then(|s| s.waiting),
            running: signals.and_then(|s| s.running),
            kv_cache_usage: signals.and_then(|s| s.kv_usage),
            running_adapters: lora.map(|l| l.running.clone()).unwrap_or_default(),
            waiting_adapters: lora.map(|l| l.waiting.clone()).unwrap_or_default(),
            max_adapters: lora.and_then(|l| l.max),
            loaded_models: signals
                .and_then(|s| s.models_loaded.clone())
                .unwrap_or_default(),
            age_ms: view
                .age
                .map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)),
            stale: view.current().is_none(),
        })
    }

    fn prefix_match(&mut self, backend: String) -> v2::sluice::policy::engine::PrefixBlocks {
        let blocks = &self.prefix.hashes;
        let matched = match self.fleet.get(&backend) {
            Some(b) if !blocks.is_empty() => b.prefix.peek(blocks),
            _ => 0,
        };
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        v2::sluice::policy::engine::PrefixBlocks {
            matched_blocks: count(matched),
            total_blocks: count(blocks.len()),
            block_bytes: self.prefix.block_bytes,
        }
    }

    fn sent_rate(&mut self, backend: String) -> f64 {
        self.fleet.get(&backend).map_or(0.0, |b| b.sent_rate())
    }
}

impl From<v2::sluice::policy::types::Hooks> for Hooks {
    fn from(h: v2::sluice::policy::types::Hooks) -> Self {
        Hooks {
            request: h.request,
            response_holdback: h.response_holdback,
            failure: h.failure,
        }
    }
}

impl From<v2::sluice::policy::types::TextDecision> for TextDecision {
    fn from(d: v2::sluice::policy::types::TextDecision) -> Self {
        use v2::sluice::policy::types::TextDecision as D;
        match d {
            D::Pass => TextDecision::Pass,
            D::Replace(text) => TextDecision::Replace(text),
            D::Stop(r) => TextDecision::Stop(r.into()),
        }
    }
}

impl From<v2::sluice::policy::types::FailureDecision> for FailureDecision {
    fn from(d: v2::sluice::policy::types::FailureDecision) -> Self {
        use v2::sluice::policy::types::FailureDecision as D;
        match d {
            D::Next => FailureDecision::Next,
            D::Retry(targets) => {
                FailureDecision::Retry(targets.into_iter().map(Into::into).collect())
            }
            D::GiveUp => FailureDecision::GiveUp,
        }
    }
}

impl From<&AttemptFailure> for v2::sluice::policy::types::Failure {
    fn from(f: &AttemptFailure) -> Self {
        use v2::sluice::policy::types::{FailureKind as K, Target};
        v2::sluice::policy::types::Failure {
            backend: f.backend.clone(),
            model: f.model.clone(),
            kind: match f.kind {
                AttemptFailureKind::Connect => K::Connect,
                AttemptFailureKind::Timeout => K::Timeout,
                AttemptFailureKind::Broken => K::Broken,
                AttemptFailureKind::Status => K::Status,
            },
            status: f.status,
            attempt: f.attempt,
            remaining: f
                .remaining
                .iter()
                .map(|t| Target {
                    backend: t.backend.clone(),
                    model: t.model.clone(),
                })
                .collect(),
        }
    }
}
