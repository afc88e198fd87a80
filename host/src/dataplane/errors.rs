//! Every way a request can fail, each with its status, code and
//! retry-after ([`Problem`]); `api::render` writes it in the API's shape.
//! Errors that other modules own (a bad body, a key, a limit, the policy
//! chain) say their own status and code through [`Problem`]; this module
//! only wraps them.

use std::time::Duration;

use http::{Response, StatusCode};

use crate::accounts::consumers::AuthError;
use crate::accounts::limits::Refusal;
use crate::api::openai::BadRequest;
use crate::api::render::{self, ApiShape};
use crate::dataplane::body::Body;
use crate::policy::{ChainError, PolicyError};
use crate::problem::Problem;

/// Why the gateway answered instead of a backend. Variants say who failed:
/// the client (4xx), a policy, or a backend.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    BadRequest(#[from] BadRequest),
    #[error("The request body is larger than the limit of {limit} bytes.")]
    BodyTooLarge { limit: u64 },
    #[error("The request body did not arrive within {timeout:?}.")]
    BodyTimeout { timeout: Duration },
    #[error("Reading the request body failed: {0}")]
    ClientBody(String),
    #[error("Unknown path `{0}`.")]
    NotFound(String),
    #[error("Method {method} is not allowed on `{path}`.")]
    MethodNotAllowed { method: http::Method, path: String },
    /// A policy rejected the request, failed closed, or none routed it.
    #[error("{0}")]
    Chain(#[from] ChainError),
    #[error("No backend available for model `{model}`: {reason}.")]
    NoBackend { model: String, reason: &'static str },
    #[error("Backend `{backend}` is unreachable: {detail}.")]
    BackendUnreachable { backend: String, detail: String },
    #[error("Backend `{backend}` did not answer within {timeout:?}.")]
    BackendTimeout { backend: String, timeout: Duration },
    #[error("Backend `{backend}` answered with status {status}.")]
    BackendStatus { backend: String, status: StatusCode },
    #[error(
        "Backend `{backend}` answered a stream request with `{content_type}`, not an event stream."
    )]
    BackendNotAStream {
        backend: String,
        content_type: String,
    },
    #[error("Every backend for model `{model}` is busy and {waiting} requests already wait; retry later.")]
    QueueFull { model: String, waiting: usize },
    #[error("Every backend for model `{model}` stayed busy for {waited:?}; retry later.")]
    QueueTimeout { model: String, waited: Duration },
    /// A missing, unknown or disabled API key.
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error("Consumer `{consumer}` may not use the model `{model}`.")]
    ModelNotAllowed { consumer: String, model: String },
    /// Over one of the consumer's limits, or the limits' store is down.
    #[error("{0}")]
    Limited(#[from] Refusal),
    /// An edge worker failed to answer (trapped, timed out, ran out of
    /// memory); what it answers itself is passed on as is.
    #[error("{message}")]
    Worker {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
}

impl From<PolicyError> for GatewayError {
    fn from(error: PolicyError) -> GatewayError {
        GatewayError::Chain(ChainError::Policy(error))
    }
}

impl GatewayError {
    pub fn bad_request(message: impl Into<String>, code: &'static str) -> Self {
        GatewayError::BadRequest(BadRequest::new(message, code))
    }

    /// The error another module owns, when this one wraps one.
    fn owned(&self) -> Option<&dyn Problem> {
        match self {
            GatewayError::BadRequest(e) => Some(e),
            GatewayError::Chain(e) => Some(e),
            GatewayError::Auth(e) => Some(e),
            GatewayError::Limited(e) => Some(e),
            _ => None,
        }
    }

    /// The failure as the client's response, in OpenAI's shape.
    pub fn into_response(self) -> Response<Body> {
        render::response(ApiShape::OpenAi, &self).map(Body::full)
    }
}

impl Problem for GatewayError {
    fn status(&self) -> StatusCode {
        use GatewayError::*;
        if let Some(owned) = self.owned() {
            return owned.status();
        }
        match self {
            ClientBody(_) => StatusCode::BAD_REQUEST,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            NotFound(_) => StatusCode::NOT_FOUND,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            NoBackend { .. } | QueueFull { .. } | QueueTimeout { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            BackendUnreachable { .. } | BackendStatus { .. } | BackendNotAStream { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ModelNotAllowed { .. } => StatusCode::FORBIDDEN,
            Worker { status, .. } => *status,
            BackendTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            BadRequest(_) | Chain(_) | Auth(_) | Limited(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &str {
        use GatewayError::*;
        if let Some(owned) = self.owned() {
            return owned.code();
        }
        match self {
            ClientBody(_) => "invalid_body",
            BodyTooLarge { .. } => "request_too_large",
            BodyTimeout { .. } => "request_timeout",
            NotFound(_) => "not_found",
            MethodNotAllowed { .. } => "method_not_allowed",
            NoBackend { .. } => "no_backend_available",
            BackendUnreachable { .. } => "backend_unreachable",
            BackendTimeout { .. } => "backend_timeout",
            BackendStatus { .. } | BackendNotAStream { .. } => "backend_error",
            ModelNotAllowed { .. } => "model_not_allowed",
            QueueFull { .. } => "queue_full",
            QueueTimeout { .. } => "queue_timeout",
            Worker { code, .. } => code,
            BadRequest(_) | Chain(_) | Auth(_) | Limited(_) => "internal_error",
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::QueueFull { .. } | GatewayError::QueueTimeout { .. } => Some(1),
            other => other.owned().and_then(Problem::retry_after),
        }
    }

    fn param(&self) -> Option<&'static str> {
        self.owned().and_then(Problem::param)
    }
}
