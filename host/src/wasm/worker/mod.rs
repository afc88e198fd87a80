//! Edge workers on the worker engine: `wasi:http` components compiled and
//! linked ([`sandbox`]), each request served by a fresh bounded instance
//! ([`instance`], [`state`], [`stderr`]), their outbound HTTP held to an
//! allow-list ([`outbound`]), and the answer handed back with the gateway's
//! own error types ([`handler`]). Mounting, routing and deploying workers is
//! the data plane's (`dataplane/workers/`), above this layer.

mod handler;
mod instance;
pub mod outbound;
mod sandbox;
mod state;
mod stderr;

use std::sync::Arc;
use std::time::Duration;

pub use handler::{AnswerBody, BoxError, HandleError, Handler};
pub use outbound::{parse_allowed_host, AllowedHost};
pub use sandbox::{Kind, Sandbox};

/// What bounds and configures one worker's instances.
#[derive(Clone)]
pub struct Bounds {
    pub worker: Arc<str>,
    pub allowed: Arc<[AllowedHost]>,
    pub env: Arc<[(String, String)]>,
    pub timeout: Duration,
    pub memory_limit: usize,
}
