//! How a policy call fails: the kinds a caller branches on, and the error
//! that names the policy and carries the detail for the operator's log.

use std::fmt;
use std::sync::Arc;

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
