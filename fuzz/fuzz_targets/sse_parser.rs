//! The backend stream splitter (`sluice::api::sse::Parser`): the same bytes cut
//! at arbitrary places (UTF-8 sequences and `\r\n` pairs included) give the
//! same events as in one piece, no byte is lost or invented, and every
//! event's `data` is what its `data:` lines say.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::api::sse::{Event, Parser};

/// The first bytes of an input: sizes of the pieces the rest (the stream)
/// is cut into, cycled; 0 counts as 1. The rest is the stream as is, so a
/// seed is 4 bytes and then real SSE text.
const CUTS: usize = 4;

fn feed(pieces: &[&[u8]]) -> Option<(Vec<Event>, Option<Event>)> {
    let mut parser = Parser::default();
    let mut events = Vec::new();
    for piece in pieces {
        events.extend(parser.push(piece).ok()?);
    }
    let rest = parser.finish();
    // After finish the parser is empty: finishing again yields nothing.
    assert!(parser.finish().is_none());
    Some((events, rest))
}

/// What the `data` of an event is, by the SSE rules the parser follows.
fn expected_data(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let values: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|v| v.strip_prefix(' ').unwrap_or(v))
        .collect();
    (!values.is_empty()).then(|| values.join("\n"))
}

fuzz_target!(|data: &[u8]| {
    let (cuts, stream) = data.split_at(data.len().min(CUTS));
    let whole = feed(&[stream]);
    let mut pieces = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let size = cuts.get(i % cuts.len().max(1)).copied().unwrap_or(1).max(1) as usize;
        let end = (at + size).min(stream.len());
        pieces.push(&stream[at..end]);
        at = end;
        i += 1;
    }
    let cut = feed(&pieces);
    let one_by_one: Vec<&[u8]> = stream.chunks(1).collect();
    let bytewise = feed(&one_by_one);
    let (Some(whole), Some(cut), Some(bytewise)) = (whole, cut, bytewise) else {
        return; // an event over the size limit: refused, not buffered
    };
    assert_eq!(whole, cut, "cutting the stream changed its events");
    assert_eq!(whole, bytewise, "feeding byte by byte changed the events");

    let (events, rest) = whole;
    let mut rebuilt = Vec::new();
    for event in &events {
        let raw = &event.raw[..];
        assert!(
            raw.ends_with(b"\n\n") || raw.ends_with(b"\n\r\n"),
            "an event without its blank line: {raw:?}"
        );
        assert_eq!(event.data, expected_data(raw));
        rebuilt.extend_from_slice(raw);
    }
    match rest {
        Some(rest) => {
            assert!(!rest.raw.iter().all(u8::is_ascii_whitespace));
            assert_eq!(rest.data, expected_data(&rest.raw));
            rebuilt.extend_from_slice(&rest.raw);
            assert_eq!(rebuilt, stream, "bytes were lost or invented");
        }
        None => {
            assert!(stream[rebuilt.len()..].iter().all(u8::is_ascii_whitespace));
            assert_eq!(rebuilt, stream[..rebuilt.len()]);
        }
    }
});
