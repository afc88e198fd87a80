//! The parts of the request that are fetched only when a policy asks.

use crate::bindings::sluice::policy::request_data as host;

/// A request header by name (case-insensitive). Credentials such as
/// `authorization` are never visible to policies.
pub fn header(name: &str) -> Option<String> {
    host::header(name)
}

/// All visible request headers as (lower-case name, value) pairs.
pub fn headers() -> Vec<(String, String)> {
    host::headers()
}

/// The JSON body as text, after earlier policies' edits; `None` when it is
/// larger than the host lets policies see (`policy_runtime.max_body_bytes`).
pub fn body() -> Option<String> {
    host::body()
}

/// The JSON body parsed into `T`; `None` when it is not visible or does not
/// parse as `T`.
pub fn body_json<T: serde::de::DeserializeOwned>() -> Option<T> {
    serde_json::from_str(&body()?).ok()
}

/// Marks the request as not safe to send twice (a tool call with side
/// effects, a backend that bills every attempt): once it may have reached
/// a backend — a timeout, a broken connection, an error status — the host
/// gives the client that failure instead of retrying or falling back. It
/// still moves on when nothing was sent (connection refused, target down
/// or full). Call it from `on_request`; the last policy to call
/// [`set_idempotent`] wins. Needs a host serving `sluice:policy@0.2.1`.
///
/// ```no_run
/// use sluice_guest::{request, Decision, Request};
///
/// fn on_request(req: Request) -> Decision {
///     if request::header("x-tool-call").is_some() {
///         request::not_idempotent();
///     }
///     Decision::pass()
/// }
/// ```
pub fn not_idempotent() {
    set_idempotent(false);
}

/// Says whether the request may be sent to a backend more than once
/// (every request may, until a policy says otherwise). See
/// [`not_idempotent`].
pub fn set_idempotent(idempotent: bool) {
    crate::bindings::sluice::policy::request_options::set_idempotent(idempotent);
}
