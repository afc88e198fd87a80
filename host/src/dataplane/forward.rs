//! Forwarding a routed request: tries the policy's targets in order, takes a
//! concurrency slot on the backend it uses, asks the failure hooks what to
//! do when an attempt fails, and hands back the answer once its first bytes
//! are in — so until then a request (a stream too) can still move to
//! another backend or model.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::response::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::api::openai;
use crate::api::CREDENTIAL_HEADERS;
use crate::config::{RetryConfig, ServerConfig};
use crate::dataplane::body::idle::BackendBody;
use crate::dataplane::errors::GatewayError;
use crate::fleet::backends::{Backend, ModelLoad, Slot};
use crate::fleet::stats::Waiting;
use crate::fleet::Fleet;
use crate::policy::contract::{AttemptFailure, AttemptFailureKind, FailureDecision};
use crate::policy::{Route, Scope, Target};
use crate::text::error_chain;
use arc_swap::ArcSwap;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// plus `host`, which the client sets anew.
pub const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
];

/// What a backend says about its own software (`server: uvicorn`,
/// `x-powered-by`): not the client's business, and a map for an attacker.
const BACKEND_IDENTITY: [HeaderName; 2] = [header::SERVER, HeaderName::from_static("x-powered-by")];

/// Tells the client (and an operator reading a trace) which backend answered.
pub const BACKEND_HEADER: HeaderName = HeaderName::from_static("x-sluice-backend");
/// Which model answered: differs from the one asked after a fallback.
pub const MODEL_HEADER: HeaderName = HeaderName::from_static("x-sluice-model");

/// A backend's answer whose headers and first body bytes have arrived.
pub struct Answer {
    pub backend: Arc<Backend>,
    pub model: String,
    pub parts: Parts,
    /// The first frame of the body, read before answering the client;
    /// `None` when the body was empty.
    pub first: Option<Bytes>,
    /// The rest of the body, bounded in its silences.
    pub incoming: BackendBody,
    pub slot: Slot,
}

impl Answer {
    pub fn is_event_stream(&self) -> bool {
        self.parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"))
    }
}

enum Attempt {
    Answered(Answer),
    Full,
    Failed {
        kind: AttemptFailureKind,
        error: GatewayError,
        /// The backend's own error answer, for a status failure.
        answer: Option<Answer>,
    },
}

pub struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    response_timeout: Duration,
    /// Longest silence inside an answer once it has begun.
    idle_timeout: Duration,
    /// Requests waiting for a slot right now, and the bounds on that queue.
    waiting: AtomicUsize,
    max_queue: usize,
    queue_timeout: Duration,
    /// Swapped by a config reload.
    retry: ArcSwap<RetryConfig>,
}

impl Upstream {
    pub fn new(server: &ServerConfig, retry: RetryConfig) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(server.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Upstream {
            client,
            response_timeout: server.response_timeout,
            idle_timeout: server.backend_idle_timeout,
            waiting: AtomicUsize::new(0),
            max_queue: server.max_queue,
            queue_timeout: server.queue_timeout,
            retry: ArcSwap::from_pointee(retry),
        }
    }

    /// Applies a reloaded `[retry]` section to the requests that follow.
    pub fn set_retry(&self, retry: RetryConfig) {
        self.retry.store(Arc::new(retry));
    }

    /// Forwards until an attempt is answered, the failure hooks give up, or
    /// the targets run out. A backend's own error status goes to the client
    /// unless a failure hook moves the request elsewhere.
    pub async fn forward(
        &self,
        scope: &Scope,
        path_and_query: &str,
        route: &Route,
    ) -> Result<Answer, GatewayError> {
        let fleet = &scope.fleet;
        let mut queue: VecDeque<Target> = route
            .targets
            .iter()
            .map(|t| Target {
                backend: t.backend.clone(),
                model: t.model.clone(),
            })
            .collect();
        let mut bodies = Bodies::new(&route.body, &route.info.model);
        let retry = self.retry.load_full();
        let mut attempts = 0;
        let mut last: Option<(GatewayError, Option<Answer>)> = None;
        // Targets found at their limit, to wait for when nothing else is left.
        let mut full: Vec<Target> = Vec::new();
        loop {
            let (target, slot) = match queue.pop_front() {
                Some(target) => (target, None),
                None if !full.is_empty() => {
                    let (target, slot, rest) = self
                        .wait_for_slot(fleet, std::mem::take(&mut full), &route.info.model)
                        .await?;
                    // The others stay in line: if this attempt fails, the
                    // request waits for them again.
                    full = rest;
                    (target, Some(slot))
                }
                None => break,
            };
            if attempts > retry.max_retries {
                break;
            }
            if attempts > 0 && !retry.retry_delay.is_zero() && slot.is_none() {
                tokio::time::sleep(retry.retry_delay).await;
            }
            let body = bodies.for_model(&target.model)?;
            let load = fleet.model_load(&target.model).cloned();
            let (kind, error, answer) = match self
                .attempt(&target, slot, path_and_query, route, body, load.as_ref())
                .await
            {
                Attempt::Answered(answer) => return Ok(answer),
                Attempt::Full => {
                    full.push(target);
                    continue;
                }
                Attempt::Failed {
                    kind,
                    error,
                    answer,
                } => (kind, error, answer),
            };
            attempts += 1;
            let failure = AttemptFailure {
                backend: target.backend.name.to_string(),
                model: target.model.clone(),
                kind,
                status: answer.as_ref().map_or(0, |a| a.parts.status.as_u16()),
                attempt: attempts,
                remaining: queue.iter().map(Target::spec).collect(),
            };
            let decision = if !route.idempotent && kind != AttemptFailureKind::Connect {
                // It may have reached the backend: never sent twice.
                FailureDecision::GiveUp
            } else if scope.handles_failures() {
                scope.on_failure(route, &failure).await?
            } else if kind == AttemptFailureKind::Status
                && !retry.on_status.contains(&failure.status)
            {
                FailureDecision::GiveUp
            } else {
                FailureDecision::Next
            };
            tracing::info!(backend = %failure.backend, model = %failure.model, kind = ?kind, status = failure.status, attempt = attempts, decision = ?decision, "attempt failed");
            match decision {
                FailureDecision::Next => {}
                FailureDecision::Retry(targets) => {
                    queue = scope.resolve(&route.info.model, targets)?.into();
                }
                FailureDecision::GiveUp => return give_up(error, answer),
            }
            last = Some((error, answer));
        }
        match last {
            Some((error, answer)) => give_up(error, answer),
            None => Err(GatewayError::NoBackend {
                model: route.info.model.clone(),
                reason: "every backend the policy chose is at its max_concurrent_requests",
            }),
        }
    }

    /// Waits in line, first come first served, for a slot on whichever of
    /// `targets` frees one first — bounded by `max_queue` and
    /// `queue_timeout`.
    async fn wait_for_slot(
        &self,
        fleet: &Fleet,
        targets: Vec<Target>,
        model: &str,
    ) -> Result<(Target, Slot, Vec<Target>), GatewayError> {
        let waiting = self.waiting.fetch_add(1, AtomicOrdering::AcqRel);
        let _leave = Leave(&self.waiting);
        if waiting >= self.max_queue {
            return Err(GatewayError::QueueFull {
                model: model.to_string(),
                waiting,
            });
        }
        let backends: Vec<Arc<Backend>> = targets.iter().map(|t| t.backend.clone()).collect();
        let _counted: Vec<Waiting> = backends
            .iter()
            .map(|b| Waiting::new(&b.stats))
            .chain(fleet.model_load(model).map(|m| Waiting::new(&m.stats)))
            .collect();
        let lines = backends.iter().map(|b| Box::pin(b.acquire()));
        let waited =
            tokio::time::timeout(self.queue_timeout, futures_util::future::select_all(lines)).await;
        match waited.map(|(slot, index, _)| (slot, index)) {
            Ok((Some(slot), index)) => {
                let mut rest = targets;
                let target = rest.remove(index);
                Ok((target, slot, rest))
            }
            Ok((None, _)) => Err(GatewayError::NoBackend {
                model: model.to_string(),
                reason: "the backend was removed while the request waited for it",
            }),
            Err(_) => Err(GatewayError::QueueTimeout {
                model: model.to_string(),
                waited: self.queue_timeout,
            }),
        }
    }

    /// One attempt on one target: a slot (the one waited for, or one free
    /// now), the request, the response headers and the first body frame,
    /// all within `response_timeout`.
    async fn attempt(
        &self,
        target: &Target,
        slot: Option<Slot>,
        path_and_query: &str,
        route: &Route,
        body: Bytes,
        load: Option<&Arc<ModelLoad>>,
    ) -> Attempt {
        let prompt = &route.prefix.hashes;
        let backend = &target.backend;
        if !backend.is_healthy() {
            // Marked down (probes or repeated failures): nothing is sent,
            // but the failure hooks still hear of it — so a policy can fall
            // back to another model when every server of one is down.
            return Attempt::Failed {
                kind: AttemptFailureKind::Connect,
                error: GatewayError::NoBackend {
                    model: target.model.clone(),
                    reason: "every backend it was sent to is marked down",
                },
                answer: None,
            };
        }
        let Some(mut slot) = slot.or_else(|| backend.try_acquire()) else {
            return Attempt::Full;
        };
        if let Some(load) = load {
            slot.track(load.clone());
        }
        // The engine will hold this prompt's blocks (by the estimate) once
        // it has prefilled them. Credited now, as the request leaves, so the
        // conversation's next turns — and the tenant's other requests that
        // arrive while this one is still queued or prefilling — find them
        // here, instead of each landing somewhere else and spreading the
        // prefix over every cache.
        let matched = backend.prefix.send(prompt);
        let failed_model = || {
            if let Some(load) = load {
                load.stats.failures.fetch_add(1, AtomicOrdering::Relaxed);
            }
        };
        let failed = |kind, error| Attempt::Failed {
            kind,
            error,
            answer: None,
        };
        let unreachable = |detail: String| GatewayError::BackendUnreachable {
            backend: backend.name.to_string(),
            detail,
        };
        let request = match build_request(backend, path_and_query, &route.headers, body) {
            Ok(request) => request,
            Err(e) => return failed(AttemptFailureKind::Connect, unreachable(e.to_string())),
        };
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.response_timeout;
        let timeout = || {
            failed_model();
            backend.record_failure(&format!("no answer within {:?}", self.response_timeout));
            tracing::warn!(backend = %backend.name, timeout = ?self.response_timeout, "backend timed out");
            failed(
                AttemptFailureKind::Timeout,
                GatewayError::BackendTimeout {
                    backend: backend.name.to_string(),
                    timeout: self.response_timeout,
                },
            )
        };
        let response = match tokio::time::timeout_at(deadline, self.client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                failed_model();
                backend.record_failure(&error_chain(&e));
                tracing::warn!(backend = %backend.name, error = %error_chain(&e), "backend unreachable");
                // Only a refused connection proves nothing was sent.
                let kind = if e.is_connect() {
                    AttemptFailureKind::Connect
                } else {
                    AttemptFailureKind::Broken
                };
                return failed(kind, unreachable(error_chain(&e)));
            }
            Err(_) => return timeout(),
        };
        let (mut parts, mut incoming) = response.into_parts();
        let first = match tokio::time::timeout_at(deadline, incoming.frame()).await {
            Err(_) => return timeout(),
            Ok(None) => None,
            Ok(Some(Ok(frame))) => frame.into_data().ok(),
            Ok(Some(Err(e))) => {
                failed_model();
                let detail = format!(
                    "the connection broke before the answer began: {}",
                    error_chain(&e)
                );
                backend.record_failure(&detail);
                return failed(AttemptFailureKind::Broken, unreachable(detail));
            }
        };
        strip(&mut parts.headers, &HOP_BY_HOP);
        strip(&mut parts.headers, &BACKEND_IDENTITY);
        if let Ok(name) = HeaderValue::from_str(&backend.name) {
            parts.headers.insert(BACKEND_HEADER, name);
        }
        if let Ok(model) = HeaderValue::from_str(&target.model) {
            parts.headers.insert(MODEL_HEADER, model);
        }
        let status = parts.status;
        let answer = Answer {
            backend: backend.clone(),
            model: target.model.clone(),
            parts,
            first,
            incoming: BackendBody::new(incoming, self.idle_timeout),
            slot,
        };
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            if status.is_server_error() {
                failed_model();
                backend.record_failure(&format!("answered {status}"));
            }
            let error = GatewayError::BackendStatus {
                backend: backend.name.to_string(),
                status,
            };
            return Attempt::Failed {
                kind: AttemptFailureKind::Status,
                error,
                answer: Some(answer),
            };
        }
        if status.is_success() {
            backend.prefix.count_served(prompt.len(), matched);
        }
        let took = started.elapsed();
        backend.record_success(took);
        if let Some(load) = load {
            load.stats.served.fetch_add(1, AtomicOrdering::Relaxed);
            load.stats.ttfb.record_us(took.as_micros() as u64);
        }
        Attempt::Answered(answer)
    }
}

/// Leaves the queue's count when the wait ends, however it ends.
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, AtomicOrdering::AcqRel);
    }
}

/// The answer to send when the request gives up: the backend's own error
/// response when there is one, the gateway's error otherwise.
fn give_up(error: GatewayError, answer: Option<Answer>) -> Result<Answer, GatewayError> {
    answer.ok_or(error)
}

/// The request body per target model, rewritten at most once per model.
struct Bodies {
    original: Bytes,
    model: String,
    rewritten: Vec<(String, Bytes)>,
}

impl Bodies {
    fn new(original: &Bytes, model: &str) -> Bodies {
        Bodies {
            original: original.clone(),
            model: model.to_string(),
            rewritten: Vec::new(),
        }
    }

    fn for_model(&mut self, model: &str) -> Result<Bytes, GatewayError> {
        if model == self.model {
            return Ok(self.original.clone());
        }
        if let Some((_, body)) = self.rewritten.iter().find(|(m, _)| m == model) {
            return Ok(body.clone());
        }
        let body = openai::with_model(&self.original, model).map_err(|e| {
            GatewayError::bad_request(
                format!("The request body could not be rewritten: {e}."),
                "invalid_json",
            )
        })?;
        self.rewritten.push((model.to_string(), body.clone()));
        Ok(body)
    }
}

fn build_request(
    backend: &Backend,
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
            && !CREDENTIAL_HEADERS.contains(&name.as_str())
            && name != header::CONTENT_LENGTH
        {
            headers.append(name, value.clone());
        }
    }
    headers.insert(header::CONTENT_TYPE, crate::dataplane::body::Body::JSON);
    if let Some(auth) = &backend.authorization {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    Ok(request)
}

pub fn strip(headers: &mut HeaderMap, names: &[HeaderName]) {
    for name in names {
        headers.remove(name);
    }
}
