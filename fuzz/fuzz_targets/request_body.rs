//! The request body reader and rewriters (`sluice::api::openai`): whatever the
//! bytes, `RequestHead::parse` answers (never panics), and a body it accepts
//! can be rewritten — model replaced, `stream_options.include_usage` added —
//! into a body that parses again to the same head with only that changed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::api::openai::{with_include_usage, with_model, RequestHead};

const NEW_MODEL: &str = "fuzz\"mod\\el\u{e9}\u{1F600}";

fuzz_target!(|data: &[u8]| {
    let Ok(head) = RequestHead::parse(data) else {
        // Refused bodies must not panic the rewriters either (the server
        // only calls them on accepted bodies, but they are public).
        let _ = with_model(data, NEW_MODEL);
        let _ = with_include_usage(data);
        return;
    };
    assert!(!head.model.is_empty());

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
