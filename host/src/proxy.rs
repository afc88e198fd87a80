//! Forwarding a routed request: tries the policy's targets in order, takes a
//! concurrency slot on the backend it uses, and streams the answer back
//! without buffering it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::body::Body;
use crate::errors::GatewayError;
use crate::openai;
use crate::policy::Route;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// plus `host` and `content-length`, which the client sets anew.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
];

/// The client's credentials never travel to a backend; a backend that needs
/// one gets its configured `api_key`.
const CREDENTIALS: [HeaderName; 5] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
];

/// Tells the client (and an operator reading a trace) which backend answered.
pub const BACKEND_HEADER: HeaderName = HeaderName::from_static("x-sluice-backend");

pub struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    response_timeout: Duration,
}

impl Upstream {
    pub fn new(connect_timeout: Duration, response_timeout: Duration) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Upstream {
            client,
            response_timeout,
        }
    }

    /// Sends the request to the first target that has a free slot and
    /// answers; moves on when a backend is full, unreachable or too slow to
    /// send its headers. A backend's own error statuses go to the client.
    pub async fn forward(
        &self,
        path_and_query: &str,
        headers: &HeaderMap,
        route: Route,
    ) -> Result<Response<Body>, GatewayError> {
        let mut last_error = None;
        let mut rewritten: Option<(String, Bytes)> = None;
        for target in &route.targets {
            let backend = &target.backend;
            let Some(slot) = backend.try_acquire() else {
                continue;
            };
            let body = if target.model == route.head.model {
                route.body.clone()
            } else {
                match &rewritten {
                    Some((model, body)) if *model == target.model => body.clone(),
                    _ => {
                        let body = openai::with_model(&route.body, &target.model).map_err(|e| {
                            GatewayError::bad_request(
                                format!("The request body could not be rewritten: {e}."),
                                "invalid_json",
                            )
                        })?;
                        rewritten = Some((target.model.clone(), body.clone()));
                        body
                    }
                }
            };
            let request = build_request(backend, path_and_query, headers, body).map_err(|e| {
                GatewayError::BackendUnreachable {
                    backend: backend.name.to_string(),
                    detail: e.to_string(),
                }
            })?;
            let started = Instant::now();
            match tokio::time::timeout(self.response_timeout, self.client.request(request)).await {
                Ok(Ok(response)) => {
                    if response.status().is_server_error() {
                        backend.record_failure();
                    } else {
                        backend.record_success(started.elapsed());
                    }
                    let (mut parts, incoming) = response.into_parts();
                    strip(&mut parts.headers, &HOP_BY_HOP);
                    if let Ok(name) = HeaderValue::from_str(&backend.name) {
                        parts.headers.insert(BACKEND_HEADER, name);
                    }
                    return Ok(Response::from_parts(parts, Body::backend(incoming, slot)));
                }
                Ok(Err(e)) => {
                    backend.record_failure();
                    tracing::warn!(backend = %backend.name, error = %error_chain(&e), "backend unreachable");
                    last_error = Some(GatewayError::BackendUnreachable {
                        backend: backend.name.to_string(),
                        detail: error_chain(&e),
                    });
                }
                Err(_) => {
                    backend.record_failure();
                    tracing::warn!(backend = %backend.name, timeout = ?self.response_timeout, "backend timed out");
                    last_error = Some(GatewayError::BackendTimeout {
                        backend: backend.name.to_string(),
                        timeout: self.response_timeout,
                    });
                }
            }
        }
        Err(last_error.unwrap_or(GatewayError::NoBackend {
            model: route.head.model,
            reason: "every backend the policy chose is at its max_concurrent_requests",
        }))
    }
}

fn build_request(
    backend: &crate::backends::Backend,
    path_and_query: &str,
    client_headers: &HeaderMap,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, http::Error> {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(backend.url.join(path_and_query)?)
        .body(Full::new(body))?;
    let headers = request.headers_mut();
    for (name, value) in client_headers {
        if !HOP_BY_HOP.contains(name)
            && !CREDENTIALS.contains(name)
            && name != header::CONTENT_LENGTH
        {
            headers.append(name, value.clone());
        }
    }
    headers.insert(header::CONTENT_TYPE, Body::JSON);
    if let Some(auth) = &backend.authorization {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    Ok(request)
}

fn strip(headers: &mut HeaderMap, names: &[HeaderName]) {
    for name in names {
        headers.remove(name);
    }
}

/// "connect error: Connection refused (os error 111)" rather than just
/// "client error (Connect)".
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
