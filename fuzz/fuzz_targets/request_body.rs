//! The request body reader and rewriters (`sluice::api::openai`): whatever the
//! bytes, `RequestHead::parse` answers (never panics), and a body it accepts
//! can be rewritten — model replaced, `stream_options.include_usage` added —
//! into a body that parses again to the same head with only that changed.
//! An accepted `model` is within `MAX_MODEL_BYTES`, and logged on one line.
//! The same bytes are also read as an `Authorization` header (the bearer
//! token both listeners read) and as a client-chosen string in a log line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::api::bearer::{self, Presented, MAX_TOKEN_BYTES};
use sluice::api::openai::{with_include_usage, with_model, RequestHead, MAX_MODEL_BYTES};
use sluice::text::LogSafe;

/// The header paths: the token read is bounded, trimmed and never empty,
/// and any client text is logged without a control character.
fn header_paths(data: &[u8]) {
    match bearer::presented(Some(data)) {
        Presented::Token(token) => {
            assert!(!token.is_empty() && token.len() <= MAX_TOKEN_BYTES);
            assert_eq!(token, token.trim_matches(' '));
            assert!(data[..6].eq_ignore_ascii_case(b"bearer"));
        }
        Presented::Nothing | Presented::Unusable => {}
    }
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        let _ = bearer::presented(Some(value.as_bytes()));
    }
    logged_on_one_line(&String::from_utf8_lossy(data));
}

fn logged_on_one_line(text: &str) {
    let logged = LogSafe(text).to_string();
    assert!(
        !logged.chars().any(char::is_control),
        "a control character reaches the log: {logged:?}"
    );
}

const NEW_MODEL: &str = "fuzz\"mod\\el\u{e9}\u{1F600}";

fuzz_target!(|data: &[u8]| {
    header_paths(data);
    let Ok(head) = RequestHead::parse(data) else {
        // Refused bodies must not panic the rewriters either (the server
        // only calls them on accepted bodies, but they are public).
        let _ = with_model(data, NEW_MODEL);
        let _ = with_include_usage(data);
        return;
    };
    assert!(!head.model.is_empty());
    assert!(head.model.len() <= MAX_MODEL_BYTES);
    logged_on_one_line(&head.model);

    let renamed = with_model(data, NEW_MODEL)
        .unwrap_or_else(|e| panic!("an accepted body could not take a new model: {e}"));
    let again = RequestHead::parse(&renamed)
        .unwrap_or_else(|e| panic!("a body with a new model does not parse: {e:?}"));
    assert_eq!(again.model, NEW_MODEL);
    assert_eq!(again.stream, head.stream);
    assert_eq!(again.include_usage, head.include_usage);

    let usage = with_include_usage(data)
        .unwrap_or_else(|e| panic!("an accepted body could not ask for usage: {e}"));
    let again = RequestHead::parse(&usage)
        .unwrap_or_else(|e| panic!("a body asking for usage does not parse: {e:?}"));
    assert_eq!(again.model, head.model);
    assert_eq!(again.stream, head.stream);
    assert!(again.include_usage);

    // As the server chains them: a policy's new model, then usage.
    let both = with_include_usage(&renamed).expect("rewriting a rewritten body");
    let again = RequestHead::parse(&both).expect("a twice rewritten body parses");
    assert_eq!(again.model, NEW_MODEL);
    assert!(again.include_usage);
});
