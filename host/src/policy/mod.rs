//! The policy engine: the chain of policies a request passes through, in
//! order, with their `on_error` rules and shadows, and the contract's three
//! phases for one request ([`Scope`]). The guests themselves run on the
//! wasm layer ([`crate::wasm::policy`]).

mod chain;
mod scope;

pub use chain::{
    check_decision, load_policy, module_bytes, Chain, ChainEntry, Filtered, LoadedPolicy,
    PolicyRequest, PolicySpec, Route, Shadow, ShadowExample, ShadowStats, Target,
};
pub use scope::Scope;

pub use crate::wasm::policy::contract;
pub use crate::wasm::policy::{FailureKind, KeptInstances, PolicyError, Runtime};

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
