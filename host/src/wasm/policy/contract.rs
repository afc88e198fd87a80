//! The policy contract as the host sees it, independent of the WIT version
//! a guest was built against: every versioned binding converts to these.

use crate::api::openai::Endpoint;

/// What a policy sees of one request.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub id: u64,
    pub endpoint: Endpoint,
    pub path: String,
    pub model: String,
    pub stream: bool,
    pub consumer: Option<String>,
    pub body_size: u64,
}

/// A place a policy asked the host to send a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    pub backend: String,
    pub model: Option<String>,
}

/// An answer a policy gives instead of a backend's.
#[derive(Debug, Clone)]
pub struct RejectSpec {
    pub status: u16,
    pub message: String,
    pub code: String,
}

/// A policy's answer in the request phase.
#[derive(Debug)]
pub enum Decision {
    Pass {
        model: Option<String>,
        body: Option<String>,
    },
    Route(Vec<TargetSpec>),
    Reject(RejectSpec),
}

/// The hooks a policy declared at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hooks {
    pub request: bool,
    /// Characters of streamed text to hold back between calls; `None`: the
    /// policy does not filter responses.
    pub response_holdback: Option<u32>,
    pub failure: bool,
}

impl Hooks {
    /// What a 0.1 guest has: the request hook only.
    pub const REQUEST_ONLY: Hooks = Hooks {
        request: true,
        response_holdback: None,
        failure: false,
    };
}

/// A policy's answer about a piece of the answer's text.
#[derive(Debug)]
pub enum TextDecision {
    Pass,
    Replace(String),
    Stop(RejectSpec),
}

/// How an attempt to forward failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptFailureKind {
    Connect,
    Timeout,
    Broken,
    Status,
}

/// A failed attempt, as shown to failure hooks.
#[derive(Debug, Clone)]
pub struct AttemptFailure {
    pub backend: String,
    pub model: String,
    pub kind: AttemptFailureKind,
    pub status: u16,
    pub attempt: u32,
    pub remaining: Vec<TargetSpec>,
}

/// A policy's answer after a failed attempt.
#[derive(Debug)]
pub enum FailureDecision {
    Next,
    Retry(Vec<TargetSpec>),
    GiveUp,
}
