//! Running policies: the only module that touches wasmtime, so wasmtime's
//! API churn lands here and nowhere else.

pub mod builtin;
mod chain;
pub mod contract;
mod guest;
mod kept;
pub(crate) mod runtime;
mod snapshot;

use std::fmt;
use std::sync::Arc;

pub use chain::{
    check_decision, hex, load_policy, module_bytes, Chain, ChainEntry, Filtered, LoadedPolicy,
    PolicyRequest, PolicySpec, Route, Shadow, ShadowExample, ShadowStats, Target,
};
pub use guest::{MemoryCap, HIDDEN_HEADERS};
pub use kept::KeptInstances;
pub use runtime::Runtime;

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
