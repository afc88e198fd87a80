//! A streamed answer that no response hook reads, relayed from inside the
//! client's body. Without hooks nothing in the relay waits on a guest, so it
//! needs no task and no channel: each backend read is split into events,
//! accounted, and everything it completed goes out as one frame — one write,
//! however many events the backend sent together. Events pass byte for byte,
//! except the `usage` chunk the gateway asked for on the client's behalf —
//! and one it writes when the client asked for usage and the backend sent
//! none.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame};

use crate::api::sse;
use crate::dataplane::accounting::Accounting;
use crate::dataplane::body::idle::{BackendBody, BodyError};
use crate::fleet::backends::Slot;

pub struct Relay {
    /// The first frame, read before the client was answered.
    first: Option<Bytes>,
    /// The backend's body and its concurrency slot, dropped as soon as the
    /// stream ends so the slot is free before the client reads the tail.
    backend: Option<(BackendBody, Slot)>,
    parser: sse::Parser,
    /// Finished (and so recorded) when the stream ends.
    acct: Option<Accounting>,
    strip_usage: bool,
    /// The count of a stream whose backend reported no usage, running off
    /// the executor; `[DONE]` waits for it.
    estimate: Option<tokio::task::JoinHandle<(u64, u64)>>,
}

impl Relay {
    pub fn new(
        first: Option<Bytes>,
        incoming: BackendBody,
        slot: Slot,
        acct: Accounting,
        strip_usage: bool,
    ) -> Relay {
        Relay {
            first,
            backend: Some((incoming, slot)),
            parser: sse::Parser::default(),
            acct: Some(acct),
            strip_usage,
            estimate: None,
        }
    }

    pub fn is_end_stream(&self) -> bool {
        self.backend.is_none() && self.estimate.is_none()
    }

    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame<Bytes>>> {
        loop {
            if let Some(estimate) = self.estimate.as_mut() {
                let counted = ready!(Pin::new(estimate).poll(cx));
                self.estimate = None;
                let mut out = Vec::new();
                if let (Ok(counted), Some(acct)) = (counted, self.acct.as_mut()) {
                    out.push(acct.supply_usage(counted));
                }
                out.push(Bytes::from_static(sse::DONE));
                self.end();
                return Poll::Ready(sse::concat(out).map(Frame::data));
            }
            if self.backend.is_none() {
                return Poll::Ready(None);
            }
            let mut out = Vec::new();
            let ended = match self.first.take() {
                Some(bytes) => self.read(&bytes, &mut out),
                None => match ready!(self.poll_backend(cx)) {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(bytes) => self.read(&bytes, &mut out),
                        Err(_) => false,
                    },
                    Some(Err(e)) => {
                        out.push(crate::dataplane::body::stream_error(&e.to_string()));
                        true
                    }
                    None => {
                        if let Some(event) = self.parser.finish() {
                            self.event(event, &mut out);
                        }
                        true
                    }
                },
            };
            if ended {
                self.end();
            }
            if let Some(bytes) = sse::concat(out) {
                return Poll::Ready(Some(Frame::data(bytes)));
            }
        }
    }

    fn poll_backend(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.backend.as_mut() {
            Some((incoming, _)) => Pin::new(incoming).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    /// Takes one read's bytes; true when the stream is over.
    fn read(&mut self, bytes: &[u8], out: &mut Vec<Bytes>) -> bool {
        match self.parser.push(bytes) {
            Ok(events) => events.into_iter().any(|event| self.event(event, out)),
            Err(e) => {
                out.push(crate::dataplane::body::stream_error(&e.to_string()));
                true
            }
        }
    }

    /// Adds what to send for one event; true after `[DONE]`.
    fn event(&mut self, event: sse::Event, out: &mut Vec<Bytes>) -> bool {
        let Some(data) = event.data.as_deref() else {
            out.push(event.raw);
            return false;
        };
        if data.trim() == "[DONE]" {
            match self.acct.as_ref().filter(|acct| acct.usage_missing()) {
                Some(acct) => {
                    self.estimate = Some(tokio::task::spawn_blocking(acct.estimator()));
                }
                None => out.push(Bytes::from_static(sse::DONE)),
            }
            return true;
        }
        let usage_only = match self.acct.as_mut() {
            Some(acct) => acct.on_chunk_json(data),
            None => false,
        };
        if !(usage_only && self.strip_usage) {
            out.push(event.raw);
        }
        false
    }

    /// Lets go of the backend; the accounting ends too, unless a usage
    /// estimate is still to be sent.
    fn end(&mut self) {
        self.backend = None;
        if self.estimate.is_some() {
            return;
        }
        if let Some(acct) = self.acct.take() {
            acct.finish();
        }
    }
}
