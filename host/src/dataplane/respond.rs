//! Step 5, respond: the backend's answer on its way to the client. An error
//! status is rewritten into the API's error shape; a stream is relayed as it
//! comes (through the response phase when a policy has response hooks); a
//! whole answer with hooks is read, filtered and sent; any other answer is
//! passed through. The body carries the request's accounting, which settles
//! when its last byte is sent (step 6, log).

use http::Response;

use super::accounting::Accounting;
use super::body::Body;
use super::errors::GatewayError;
use super::filter::Filter;
use super::forward::Answer;
use crate::api::openai::Endpoint;
use crate::policy::{Route, Scope};
use crate::problem::Problem as _;

/// The response for `answer`, which `route` reached.
pub async fn respond(
    scope: Scope,
    route: Route,
    answer: Answer,
    mut acct: Accounting,
    strip_usage: bool,
) -> Result<Response<Body>, GatewayError> {
    acct.answered(
        &answer.backend.name,
        &answer.model,
        answer.parts.status.as_u16(),
    );
    if !answer.parts.status.is_success() {
        return Ok(super::upstream_error::respond(answer, acct).await);
    }
    let holdback = scope
        .response_holdback()
        .filter(|_| route.info.endpoint != Endpoint::Embeddings);
    let filter = Filter {
        scope,
        route,
        holdback,
        strip_usage,
    };
    if answer.is_event_stream() {
        return Ok(filter.stream(answer, acct));
    }
    if filter.route.info.stream && filter.route.info.endpoint != Endpoint::Embeddings {
        // An HTML page or a JSON body where events were asked for: the
        // client's SSE parser would choke on it; it gets the API's error.
        let content_type = answer
            .parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .chars()
                    .take(100)
                    .collect()
            })
            .unwrap_or_else(|| "no content-type".to_string());
        let error = GatewayError::BackendNotAStream {
            backend: answer.backend.name.to_string(),
            content_type,
        };
        acct.set_status(error.status().as_u16());
        acct.finish();
        return Err(error);
    }
    if holdback.is_some() {
        return filter.whole(answer, acct).await;
    }
    let Answer {
        parts,
        first,
        incoming,
        slot,
        ..
    } = answer;
    Ok(Response::from_parts(
        parts,
        Body::backend(first, incoming, slot, acct),
    ))
}
