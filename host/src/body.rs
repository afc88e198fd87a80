//! The response body: a small body the gateway wrote, one it generates piece
//! by piece, or a backend's body streamed through frame by frame (never
//! buffered whole) holding the backend's concurrency slot until its last byte.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderValue;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use crate::backends::Slot;

pub enum Body {
    Full(Option<Bytes>),
    /// Generated piece by piece; ends when the sender is dropped.
    Channel(tokio::sync::mpsc::Receiver<Bytes>),
    Backend {
        inner: Incoming,
        /// Released when the stream ends or the client goes away.
        slot: Option<Slot>,
    },
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body::Full(Some(bytes.into()))
    }

    pub fn json(value: &serde_json::Value) -> Body {
        Body::full(serde_json::to_vec(value).unwrap_or_default())
    }

    pub fn backend(inner: Incoming, slot: Slot) -> Body {
        Body::Backend {
            inner,
            slot: Some(slot),
        }
    }

    pub const JSON: HeaderValue = HeaderValue::from_static("application/json");
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Channel(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
            Body::Backend { inner, slot } => {
                let polled = Pin::new(inner).poll_frame(cx);
                if let Poll::Ready(None | Some(Err(_))) = &polled {
                    slot.take();
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(bytes) => bytes.is_none(),
            Body::Channel(_) => false,
            Body::Backend { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Channel(_) => SizeHint::default(),
            Body::Backend { inner, .. } => inner.size_hint(),
        }
    }
}
