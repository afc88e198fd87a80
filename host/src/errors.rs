//! Every way a request can fail, and the one function that turns a failure
//! into an OpenAI-shaped response (`{"error":{"message","type","code"}}`).

use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::Body;
use crate::policy::PolicyError;

/// Why the gateway answered instead of a backend. Variants say who failed:
/// the client (4xx), a policy, or a backend.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{message}")]
    BadRequest {
        message: String,
        code: &'static str,
        param: Option<&'static str>,
    },
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
    /// A policy answered with a rejection.
    #[error("{message}")]
    Rejected {
        status: StatusCode,
        message: String,
        code: String,
    },
    /// A policy failed and its `on_error` is fail-closed.
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("No policy in the chain routed this request for model `{model}`.")]
    NoRoute { model: String },
    #[error("No backend available for model `{model}`: {reason}.")]
    NoBackend { model: String, reason: &'static str },
    #[error("Backend `{backend}` is unreachable: {detail}.")]
    BackendUnreachable { backend: String, detail: String },
    #[error("Backend `{backend}` did not answer within {timeout:?}.")]
    BackendTimeout { backend: String, timeout: Duration },
    #[error("Backend `{backend}` answered with status {status}.")]
    BackendStatus { backend: String, status: StatusCode },
    #[error("Every backend for model `{model}` is busy and {waiting} requests already wait; retry later.")]
    QueueFull { model: String, waiting: usize },
    #[error("Every backend for model `{model}` stayed busy for {waited:?}; retry later.")]
    QueueTimeout { model: String, waited: Duration },
    #[error("The admin API needs a valid `Authorization: Bearer` token.")]
    AdminUnauthorized,
    /// A missing, unknown or disabled API key.
    #[error("{0}")]
    Auth(#[from] crate::consumers::AuthError),
    #[error("Consumer `{consumer}` may not use the model `{model}`.")]
    ModelNotAllowed { consumer: String, model: String },
    /// Over one of the consumer's limits, or the limits' store is down.
    #[error("{0}")]
    Limited(#[from] crate::limits::Refusal),
    /// An admin operation refused (bad module, unknown policy, conflict).
    #[error("{message}")]
    Admin {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
    /// An edge worker failed to answer (trapped, timed out, ran out of
    /// memory); what it answers itself is passed on as is.
    #[error("{message}")]
    Worker {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
}

impl GatewayError {
    pub fn bad_request(message: impl Into<String>, code: &'static str) -> Self {
        GatewayError::BadRequest {
            message: message.into(),
            code,
            param: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        use GatewayError::*;
        match self {
            BadRequest { .. } | ClientBody(_) => StatusCode::BAD_REQUEST,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            NotFound(_) => StatusCode::NOT_FOUND,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Rejected { status, .. } => *status,
            Policy(_)
            | NoRoute { .. }
            | NoBackend { .. }
            | QueueFull { .. }
            | QueueTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            BackendUnreachable { .. } | BackendStatus { .. } => StatusCode::BAD_GATEWAY,
            AdminUnauthorized => StatusCode::UNAUTHORIZED,
            Auth(crate::consumers::AuthError::Disabled(_)) | ModelNotAllowed { .. } => {
                StatusCode::FORBIDDEN
            }
            Auth(_) => StatusCode::UNAUTHORIZED,
            Limited(crate::limits::Refusal::Limited { .. }) => StatusCode::TOO_MANY_REQUESTS,
            Limited(crate::limits::Refusal::StoreDown(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Admin { status, .. } | Worker { status, .. } => *status,
            BackendTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The machine-readable `code` of the error body.
    pub fn code(&self) -> &str {
        use GatewayError::*;
        match self {
            BadRequest { code, .. } => code,
            ClientBody(_) => "invalid_body",
            BodyTooLarge { .. } => "request_too_large",
            BodyTimeout { .. } => "request_timeout",
            NotFound(_) => "not_found",
            MethodNotAllowed { .. } => "method_not_allowed",
            Rejected { code, .. } => code,
            Policy(_) => "policy_failed",
            NoRoute { .. } => "no_route",
            NoBackend { .. } => "no_backend_available",
            BackendUnreachable { .. } => "backend_unreachable",
            BackendTimeout { .. } => "backend_timeout",
            BackendStatus { .. } => "backend_error",
            AdminUnauthorized => "invalid_admin_token",
            Auth(crate::consumers::AuthError::Disabled(_)) => "consumer_disabled",
            Auth(_) => "invalid_api_key",
            ModelNotAllowed { .. } => "model_not_allowed",
            Limited(crate::limits::Refusal::Limited { code, .. }) => code,
            Limited(crate::limits::Refusal::StoreDown(_)) => "rate_limiter_unavailable",
            QueueFull { .. } => "queue_full",
            QueueTimeout { .. } => "queue_timeout",
            Admin { code, .. } | Worker { code, .. } => code,
        }
    }

    /// The one place a failure becomes an HTTP response.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let kind = error_type(status);
        let param = match &self {
            GatewayError::BadRequest { param, .. } => *param,
            _ => None,
        };
        let body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": kind,
                "param": param,
                "code": self.code(),
            }
        });
        let mut response = Response::new(Body::json(&body));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, Body::JSON);
        let retry_after = match &self {
            GatewayError::QueueFull { .. }
            | GatewayError::QueueTimeout { .. }
            | GatewayError::Limited(crate::limits::Refusal::StoreDown(_)) => Some(1),
            GatewayError::Limited(crate::limits::Refusal::Limited { retry_after, .. }) => {
                Some(*retry_after)
            }
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        response
    }
}

/// OpenAI's error `type` for a status.
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}
