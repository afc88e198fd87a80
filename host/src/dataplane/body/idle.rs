//! A backend's body with a bound on its silences: once the answer has begun,
//! a backend that sends nothing for `server.backend_idle_timeout` (a hung
//! engine, or one dripping bytes to hold the connection) ends the answer
//! with an error instead of holding the client, the connection and the
//! backend's slot forever.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// Why a backend's body ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The connection broke or the backend sent something that is not HTTP.
    #[error("{0}")]
    Broke(#[from] hyper::Error),
    /// Nothing arrived for the idle timeout.
    #[error("the backend sent nothing for {0:?} in the middle of its answer")]
    Idle(Duration),
}

pub struct BackendBody {
    inner: Incoming,
    idle: Duration,
    /// Armed for `idle` after the last frame; re-armed lazily (a frame only
    /// notes its time, so a busy stream pays a clock read per frame, not a
    /// timer reset).
    timer: Pin<Box<Sleep>>,
    last_frame: Instant,
}

impl BackendBody {
    pub fn new(inner: Incoming, idle: Duration) -> BackendBody {
        let now = Instant::now();
        BackendBody {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            last_frame: now,
        }
    }
}

impl http_body::Body for BackendBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_frame = Instant::now();
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        loop {
            let due = this.last_frame + this.idle;
            if this.timer.deadline() != due {
                this.timer.as_mut().reset(due);
            }
            match this.timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if this.last_frame + this.idle <= Instant::now() => {
                    return Poll::Ready(Some(Err(BodyError::Idle(this.idle))));
                }
                // A frame came after the timer was armed: wait from it.
                Poll::Ready(()) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
