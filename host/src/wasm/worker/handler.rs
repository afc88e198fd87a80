//! One request through a worker: the client's body passed in (bounded by
//! the gateway's body limit), the worker's answer passed back with the
//! gateway's own error types, so no `wasi:http` type leaves this layer.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use wasmtime_wasi_http::handler::{ExpirationError, ProxyHandler};

use super::instance::Version;

/// Why a worker's answer broke off after it began.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A worker's answer, as its instance produces it.
pub type AnswerBody = UnsyncBoxBody<Bytes, BoxError>;

/// Why a worker gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Its time ran out inside the guest's event loop.
    #[error("the worker's time ran out")]
    Expired,
    /// It trapped, ran out of memory, or answered nothing.
    #[error("{0}")]
    Failed(String),
}

/// Serves requests with fresh instances of one version of one worker.
pub struct Handler(ProxyHandler<Version>);

impl Handler {
    pub(super) fn new(handler: ProxyHandler<Version>) -> Handler {
        Handler(handler)
    }

    /// Passes `request` (its URI absolute, as `wasi:http` wants) to a fresh
    /// instance; a body longer than `max_body_bytes` fails the worker's
    /// read of it.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        max_body_bytes: u64,
    ) -> Result<Response<AnswerBody>, HandleError> {
        let (parts, body) = request.into_parts();
        let limit = usize::try_from(max_body_bytes).unwrap_or(usize::MAX);
        let body = Limited::new(body, limit)
            .map_err(move |e| match e.downcast::<hyper::Error>() {
                Ok(e) => wasmtime_wasi_http::Error::Hyper(*e),
                Err(_) => wasmtime_wasi_http::Error::HttpRequestBodySize(Some(max_body_bytes)),
            })
            .boxed_unsync();
        match self.0.handle((), Request::from_parts(parts, body)).await {
            Ok(response) => Ok(response.map(|body| body.map_err(BoxError::from).boxed_unsync())),
            Err(e) if e.is::<ExpirationError>() => Err(HandleError::Expired),
            Err(e) => Err(HandleError::Failed(format!("{e:#}"))),
        }
    }
}
