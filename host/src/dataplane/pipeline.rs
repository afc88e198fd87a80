//! The life of one API request (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`), in the order it happens. Each step lives in a module
//! of its own and is called from here only:
//!
//! 1. [`authenticate`](super::authenticate): who is calling, from the
//!    headers alone; a refused caller's body is never read.
//! 2. [`admit`](super::admit): the body read within its bounds and parsed;
//!    the consumer's model and limits checked and reserved; the prompt
//!    hashed into blocks for prefix-cache affinity; accounting starts.
//! 3. route: the policy chain's request phase chooses targets, or rejects.
//! 4. [`forward`](super::forward): to a chosen backend, queueing for a free
//!    slot, with the failure phase after a failed attempt.
//! 5. [`respond`](super::respond): the answer relayed to the client, through
//!    the response phase when a policy filters answers.
//! 6. log: when the answer's last byte is sent or the client leaves,
//!    [`accounting`](super::accounting) writes the usage record, the access
//!    line and the metrics, and settles the consumer's limits.
//!
//! Every step returns a [`GatewayError`] to refuse; the server renders it
//! in the API's shape.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use hyper::body::Incoming;

use super::accounting::Accounting;
use super::body::Body;
use super::errors::GatewayError;
use super::server::Gateway;
use super::{admit, authenticate, request_body, respond};
use crate::accounts::consumers::Consumer;
use crate::api::openai::{self, Endpoint, RequestHead};
use crate::policy::{PolicyRequest, Route, Scope};
use crate::problem::Problem;

/// What the steps after admission know of the request.
pub struct RequestCtx {
    pub id: u64,
    pub endpoint: Endpoint,
    /// Where the backend is asked: the client's path and query.
    pub path_and_query: String,
    /// The client did not ask for its stream's `usage` chunk: the gateway
    /// asks the backend anyway, to count exactly, and removes it again.
    pub strip_usage: bool,
    /// Tokens, timings and status, recorded when the answer ends.
    pub acct: Accounting,
}

/// Runs the steps; a refusal at any of them ends the request.
pub async fn run(
    gateway: &Gateway,
    endpoint: Endpoint,
    request: Request<Incoming>,
) -> Result<Response<Body>, GatewayError> {
    let (parts, body) = request.into_parts();

    // 1. Authenticate.
    let consumer = match authenticate::caller(&gateway.consumers, &parts) {
        Ok(consumer) => consumer,
        Err(e) => {
            // Refusing mid-upload would reset the connection under the
            // client, which then never sees the 401.
            request_body::linger(&parts.headers, body, gateway.body_limits.max_bytes);
            return Err(e.into());
        }
    };

    // 2. Admit.
    let body = request_body::read(&parts.headers, body, gateway.body_limits).await?;
    let head = RequestHead::parse(&body)?;
    let rules = gateway.fleet.rules();
    let admitted = admit::admit(
        &gateway.limiter,
        consumer.as_deref(),
        endpoint,
        &head,
        &body,
        &rules.prefix,
    )
    .await?;
    let mut ctx = start(gateway, endpoint, &parts, consumer.as_deref(), &head, &body);
    ctx.acct.hold(admitted.ticket);
    let request = PolicyRequest {
        id: ctx.id,
        endpoint,
        path: parts.uri.path().to_string(),
        head,
        consumer: consumer.map(|c| c.name.clone()),
        headers: Arc::new(parts.headers),
        body,
        prefix: admitted.prompt,
    };

    // 3. Route, and 4. forward, against the chain and fleet of this moment.
    let scope = gateway.scope();
    let answered = async {
        let route = route(&scope, request, ctx.strip_usage).await?;
        let answer = gateway
            .upstream
            .forward(&scope, &ctx.path_and_query, &route)
            .await?;
        Ok::<_, GatewayError>((route, answer))
    };
    let (route, answer) = match answered.await {
        Ok(answered) => answered,
        Err(error) => {
            ctx.acct.set_status(error.status().as_u16());
            ctx.acct.finish();
            return Err(error);
        }
    };

    // 5. Respond; 6. log happens when the answer's body ends.
    respond::respond(scope, route, answer, ctx.acct, ctx.strip_usage).await
}

/// Numbers the admitted request, starts its accounting and samples it for
/// `sluice policy test` when recording is on.
fn start(
    gateway: &Gateway,
    endpoint: Endpoint,
    parts: &Parts,
    consumer: Option<&Consumer>,
    head: &RequestHead,
    body: &Bytes,
) -> RequestCtx {
    let id = gateway.next_id.fetch_add(1, Ordering::Relaxed);
    let mut acct = Accounting::start(
        gateway.ledger.clone(),
        id,
        endpoint.name(),
        &head.model,
        head.stream,
        consumer.map(|c| c.name.clone()),
        body.clone(),
    );
    let streams_usage = head.stream && endpoint != Endpoint::Embeddings;
    if streams_usage && head.include_usage {
        acct.client_wants_usage();
    }
    if let Some(recorder) = gateway.recorder.as_ref().filter(|r| r.samples(id)) {
        recorder.record(
            parts.uri.path(),
            &parts.headers,
            consumer.map(|c| c.name.as_str()),
            head,
            body,
        );
    }
    RequestCtx {
        id,
        endpoint,
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        strip_usage: streams_usage && !head.include_usage,
        acct,
    }
}

/// Step 3: the request phase, then the body the backend gets (asking for
/// the stream's usage when the client did not).
async fn route(
    scope: &Scope,
    request: PolicyRequest,
    strip_usage: bool,
) -> Result<Route, GatewayError> {
    let mut route = scope.route(request).await?;
    if strip_usage {
        route.body = openai::with_include_usage(&route.body).map_err(|e| {
            GatewayError::bad_request(
                format!("The request body could not be rewritten: {e}."),
                "invalid_json",
            )
        })?;
    }
    Ok(route)
}
