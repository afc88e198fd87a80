//! Constructors that make decisions read like what they do.

use crate::{Decision, Edits, FailureDecision, Rejection, Target, TextDecision};

impl Decision {
    /// No routing opinion: the next policy in the chain decides.
    pub fn pass() -> Self {
        Decision::Pass(Edits::default())
    }

    /// Hand on to the next policy with the request's model replaced.
    pub fn pass_with_model(model: impl Into<String>) -> Self {
        Decision::Pass(Edits {
            model: Some(model.into()),
            body: None,
        })
    }

    /// Hand on to the next policy with the whole JSON body replaced.
    pub fn pass_with_body(body: impl Into<String>) -> Self {
        Decision::Pass(Edits {
            model: None,
            body: Some(body.into()),
        })
    }

    /// Forward to one backend, with the request's model unchanged.
    pub fn route_to(backend: &str) -> Self {
        Decision::Route(vec![Target::new(backend)])
    }

    /// Forward to these targets, tried in order.
    pub fn route(targets: Vec<Target>) -> Self {
        Decision::Route(targets)
    }

    /// Answer the client with an OpenAI-shaped error; nothing reaches a
    /// backend. `status` must be 400..=599.
    pub fn reject(status: u16, code: &str, message: impl Into<String>) -> Self {
        Decision::Reject(Rejection {
            status,
            code: code.to_string(),
            message: message.into(),
        })
    }
}

impl TextDecision {
    /// Release this text instead of the original.
    pub fn replace(text: impl Into<String>) -> Self {
        TextDecision::Replace(text.into())
    }

    /// End the answer: a stream ends with `finish_reason: "content_filter"`,
    /// a non-streamed answer becomes this error.
    pub fn stop(status: u16, code: &str, message: impl Into<String>) -> Self {
        TextDecision::Stop(Rejection {
            status,
            code: code.to_string(),
            message: message.into(),
        })
    }
}

impl FailureDecision {
    /// Try these targets instead of the remaining ones.
    pub fn retry(targets: Vec<Target>) -> Self {
        FailureDecision::Retry(targets)
    }
}

impl Target {
    /// Send to `backend` with the request's model unchanged.
    pub fn new(backend: &str) -> Self {
        Target {
            backend: backend.to_string(),
            model: None,
        }
    }

    /// Send to `backend` under another model name (an alias resolved, a
    /// fallback model).
    pub fn with_model(backend: &str, model: &str) -> Self {
        Target {
            backend: backend.to_string(),
            model: Some(model.to_string()),
        }
    }
}

#[allow(clippy::derivable_impls)]
impl Default for Edits {
    fn default() -> Self {
        Edits {
            model: None,
            body: None,
        }
    }
}
