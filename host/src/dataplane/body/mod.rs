//! The response body: a small body the gateway wrote, one it generates piece
//! by piece, or a backend's body streamed through frame by frame (never
//! buffered whole) holding the backend's concurrency slot until its last byte.

pub mod idle;
pub mod relay;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body::{Frame, SizeHint};

use crate::api::render::{self, ApiShape};
use crate::dataplane::accounting::Accounting;
use crate::dataplane::body::idle::{BackendBody, BodyError};
use crate::fleet::backends::Slot;
use crate::problem::Problem;

/// Largest answer kept to read its `usage` when it ends.
const MAX_TAPPED: usize = 8 << 20;

/// Keeps a copy of a non-streamed answer (bounded) to account it when the
/// body is dropped — hyper stops polling a body that says it has ended, so
/// the drop is the one moment every ending shares.
pub struct Tap {
    bytes: Vec<u8>,
    acct: Accounting,
}

impl Tap {
    fn see(&mut self, data: &[u8]) {
        if self.bytes.len() + data.len() <= MAX_TAPPED {
            self.bytes.extend_from_slice(data);
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // The accounting itself finishes right after, when it is dropped.
        self.acct.on_answer(&self.bytes);
    }
}

pub enum Body {
    Full(Option<Bytes>),
    /// Generated piece by piece; ends when the sender is dropped.
    Channel(tokio::sync::mpsc::Receiver<Bytes>),
    /// A stream no response hook reads, relayed as it is polled.
    Relay(Box<crate::dataplane::body::relay::Relay>),
    /// An edge worker's answer, as its instance produces it.
    Worker {
        inner: crate::wasm::worker::AnswerBody,
        worker: String,
        /// The worker's concurrency slot, held until its answer ends.
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    Backend {
        /// The first frame, read before the client was answered.
        first: Option<Bytes>,
        inner: BackendBody,
        /// Released when the stream ends or the client goes away.
        slot: Option<Slot>,
        /// Sees the bytes as they pass, for the request's accounting.
        tap: Option<Box<Tap>>,
    },
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body::Full(Some(bytes.into()))
    }

    pub fn json(value: &serde_json::Value) -> Body {
        Body::full(serde_json::to_vec(value).unwrap_or_default())
    }

    pub fn backend(first: Option<Bytes>, inner: BackendBody, slot: Slot, acct: Accounting) -> Body {
        Body::Backend {
            first,
            inner,
            slot: Some(slot),
            tap: Some(Box::new(Tap {
                bytes: Vec::new(),
                acct,
            })),
        }
    }

    pub fn worker(
        inner: crate::wasm::worker::AnswerBody,
        worker: String,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Body {
        Body::Worker {
            inner,
            worker,
            permit,
        }
    }

    pub const JSON: HeaderValue = HeaderValue::from_static("application/json");
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Channel(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
            Body::Relay(relay) => relay.poll_frame(cx).map(|f| f.map(Ok)),
            Body::Worker {
                inner,
                worker,
                permit,
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => {
                    // Ending the body short is all a proxy can say once the
                    // status line is out; the client sees it incomplete.
                    tracing::warn!(worker = worker.as_str(), error = %e, "worker's answer broke off");
                    permit.take();
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(None) => {
                    permit.take();
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            },
            Body::Backend {
                first,
                inner,
                slot,
                tap,
            } => {
                if slot.is_none() {
                    return Poll::Ready(None);
                }
                if let Some(bytes) = first.take() {
                    if let Some(tap) = tap {
                        tap.see(&bytes);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                match Pin::new(inner).poll_frame(cx) {
                    Poll::Ready(None) => {
                        slot.take();
                        tap.take();
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => {
                        slot.take();
                        tracing::warn!(error = %e, "backend answer broke off");
                        Poll::Ready(Some(Err(e)))
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(tap), Some(data)) = (tap.as_mut(), frame.data_ref()) {
                            tap.see(data);
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(bytes) => bytes.is_none(),
            Body::Channel(_) => false,
            Body::Relay(relay) => relay.is_end_stream(),
            Body::Worker { inner, .. } => inner.is_end_stream(),
            Body::Backend {
                first, inner, slot, ..
            } => slot.is_none() || (first.is_none() && inner.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Channel(_) | Body::Relay(_) => SizeHint::default(),
            Body::Worker { inner, .. } => inner.size_hint(),
            Body::Backend {
                first: None, inner, ..
            } => inner.size_hint(),
            Body::Backend { .. } => SizeHint::default(),
        }
    }
}

/// A backend that failed after its answer began streaming.
#[derive(Debug, thiserror::Error)]
#[error("The backend failed while streaming: {0}")]
pub struct StreamBrokeOff(pub String);

impl Problem for StreamBrokeOff {
    fn status(&self) -> StatusCode {
        StatusCode::BAD_GATEWAY
    }
    fn code(&self) -> &str {
        "backend_stream_error"
    }
}

/// The events that end a stream whose backend failed after the answer
/// began: an OpenAI-style error (the SDKs raise it) and `[DONE]`.
pub fn stream_error(detail: &str) -> Bytes {
    render::stream_end(ApiShape::OpenAi, &StreamBrokeOff(detail.to_string()))
}
