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
