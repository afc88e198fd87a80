//! What the gateway knows of the APIs it speaks, with no state of its own:
//! the OpenAI request and answer shapes it reads and writes ([`openai`]),
//! server-sent events as backends send them ([`sse`]), counting tokens
//! when a backend reports none ([`tokens`]), the one renderer of errors in
//! an API's shape ([`render`]), bearer tokens as clients present them
//! ([`bearer`]), and the headers that carry a client's credentials.

pub mod bearer;
pub mod openai;
pub mod prefix;
pub mod render;
pub mod sse;
pub mod tokens;

/// Headers that carry a client's credentials (lowercase, as `http` names
/// them): policies and recordings never see them, and they never travel to
/// a backend (one that needs a key gets its configured `api_key`).
pub const CREDENTIAL_HEADERS: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "api-key",
];
