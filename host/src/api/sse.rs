//! Server-sent events from a backend, split into whole events however the
//! bytes were chunked on the wire. Bounded: an event that never ends is an
//! error, not a growing buffer.

use bytes::{Bytes, BytesMut};

/// The largest event accepted (a chunk of a few tokens is under 1 KiB).
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// One event: its raw bytes (terminator included) and its `data` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub raw: Bytes,
    /// The `data:` lines joined by `\n`; `None` for an event without data
    /// (a comment such as `: ping`).
    pub data: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("an event of the backend's stream is larger than {MAX_EVENT_BYTES} bytes")]
pub struct EventTooLarge;

#[derive(Default)]
pub struct Parser {
    buffer: BytesMut,
    /// How far `buffer` is known to hold no event end: a stream trickled in
    /// small pieces is scanned once, not once per piece.
    scanned: usize,
}

impl Parser {
    /// Adds bytes; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Event>, EventTooLarge> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        // A terminator is at most 4 bytes: one that began in the scanned
        // part may end in the new bytes.
        let mut from = self.scanned.saturating_sub(3);
        while let Some(end) = event_end(&self.buffer, from) {
            from = 0;
            let raw = self.buffer.split_to(end).freeze();
            events.push(Event {
                data: data_of(&raw),
                raw,
            });
        }
        self.scanned = self.buffer.len();
        if self.buffer.len() > MAX_EVENT_BYTES {
            self.buffer.clear();
            self.scanned = 0;
            return Err(EventTooLarge);
        }
        Ok(events)
    }

    /// What is left when the stream ends: an event missing its final blank
    /// line, if any.
    pub fn finish(&mut self) -> Option<Event> {
        self.scanned = 0;
        if self.buffer.iter().all(u8::is_ascii_whitespace) {
            self.buffer.clear();
            return None;
        }
        let raw = std::mem::take(&mut self.buffer).freeze();
        Some(Event {
            data: data_of(&raw),
            raw,
        })
    }
}

/// The length of the first complete event (through its blank line), none
/// of whose terminator starts before `from`.
fn event_end(buffer: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + 1 < buffer.len() {
        match &buffer[i..] {
            [b'\n', b'\n', ..] => return Some(i + 2),
            [b'\r', b'\n', b'\r', b'\n', ..] => return Some(i + 4),
            [b'\n', b'\r', b'\n', ..] => return Some(i + 3),
            _ => i += 1,
        }
    }
    None
}

fn data_of(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let mut data: Option<String> = None;
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("data:") {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            }
        }
    }
    data
}

/// `data: {payload}` as one event.
pub fn event(payload: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(payload.as_bytes());
    out.extend_from_slice(b"\n\n");
    out.freeze()
}

pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// Several events as one piece, so they leave in one write; a single one
/// passes without a copy.
pub fn concat(pieces: Vec<Bytes>) -> Option<Bytes> {
    if pieces.len() <= 1 {
        return pieces.into_iter().next();
    }
    let mut joined = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
    for piece in &pieces {
        joined.extend_from_slice(piece);
    }
    Some(joined.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_any_chunking() {
        let stream = b"data: {\"a\":1}\n\n: ping\n\ndata: x\ndata: y\r\n\r\ndata: [DONE]\n\n";
        for size in 1..stream.len() {
            let mut parser = Parser::default();
            let mut data = Vec::new();
            for chunk in stream.chunks(size) {
                data.extend(parser.push(chunk).unwrap().into_iter().map(|e| e.data));
            }
            assert!(parser.finish().is_none());
            assert_eq!(
                data,
                [
                    Some("{\"a\":1}".into()),
                    None,
                    Some("x\ny".into()),
                    Some("[DONE]".into())
                ],
                "chunk size {size}"
            );
        }
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut parser = Parser::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(parser.push(&big).is_err());
    }

    #[test]
    fn a_trickled_event_is_scanned_once() {
        // Byte by byte, 512 KiB: rescanning the buffer on every push took
        // minutes (quadratic); now it is linear.
        let started = std::time::Instant::now();
        let mut parser = Parser::default();
        for _ in 0..(512 << 10) {
            assert!(parser.push(b"x").unwrap().is_empty());
        }
        let events = parser.push(b"\r\n\r\ndata: y\n").unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].raw.len(), (512 << 10) + 4);
        assert!(parser.push(b"\n").unwrap()[0].data.as_deref() == Some("y"));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_missing_final_blank_line_is_recovered() {
        let mut parser = Parser::default();
        assert!(parser.push(b"data: tail").unwrap().is_empty());
        assert_eq!(parser.finish().unwrap().data.as_deref(), Some("tail"));
    }
}
