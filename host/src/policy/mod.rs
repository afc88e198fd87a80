//! Running policies: the only module that touches wasmtime, so wasmtime's
//! API churn lands here and nowhere else.

mod chain;
pub mod contract;
mod guest;
mod kept;
pub(crate) mod runtime;
mod scope;
mod snapshot;

use std::fmt;
use std::sync::Arc;

pub use chain::{
    check_decision, hex, load_policy, module_bytes, Chain, ChainEntry, Filtered, LoadedPolicy,
    PolicyRequest, PolicySpec, Route, Shadow, ShadowExample, ShadowStats, Target,
};
pub use guest::MemoryCap;
pub use kept::KeptInstances;
pub use runtime::Runtime;
pub use scope::Scope;

/// How a policy call failed. Callers branch on it: the policy's `on_error`
/// decides whether the request fails or skips the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Ran past `policy_runtime.timeout`.
    Timeout,
    /// Grew its memory past `policy_runtime.memory_limit`.
    MemoryLimit,
    /// Trapped (a panic, an unreachable, a bad memory access).
    Trap,
    /// Returned a decision the host cannot carry out.
    InvalidDecision,
    /// Could not be instantiated (e.g. `policy_runtime.max_instances` busy).
    Unavailable,
}

impl FailureKind {
    /// The `kind` label of `sluice_policy_failures_total`.
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::MemoryLimit => "memory_limit",
            FailureKind::Trap => "trap",
            FailureKind::InvalidDecision => "invalid_decision",
            FailureKind::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::Timeout => "it ran out of time",
            FailureKind::MemoryLimit => "it ran out of memory",
            FailureKind::Trap => "it trapped",
            FailureKind::InvalidDecision => "it returned an invalid decision",
            FailureKind::Unavailable => "no instance could be created",
        })
    }
}

/// A policy call that did not produce a usable decision. The `detail` is
/// for the operator's log, not for clients.
#[derive(Debug, thiserror::Error)]
#[error("Policy `{policy}` failed: {kind}.")]
pub struct PolicyError {
    pub policy: Arc<str>,
    pub kind: FailureKind,
    pub detail: String,
}

/// Why the chain answered a request itself: a policy rejected it, failed
/// with `on_error = "fail-closed"`, or none routed it.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A policy answered with a rejection.
    #[error("{message}")]
    Rejected {
        status: http::StatusCode,
        message: String,
        code: String,
    },
    /// A policy failed and its `on_error` is fail-closed.
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("No policy in the chain routed this request for model `{model}`.")]
    NoRoute { model: String },
}

impl crate::problem::Problem for ChainError {
    fn status(&self) -> http::StatusCode {
        match self {
            ChainError::Rejected { status, .. } => *status,
            ChainError::Policy(_) | ChainError::NoRoute { .. } => {
                http::StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }
    fn code(&self) -> &str {
        match self {
            ChainError::Rejected { code, .. } => code,
            ChainError::Policy(_) => "policy_failed",
            ChainError::NoRoute { .. } => "no_route",
        }
    }
}
