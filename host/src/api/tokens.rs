//! Counting tokens when a backend reports none.
//!
//! Self-hosted servers do not always return `usage` (streams without
//! `stream_options.include_usage`, older servers, answers cut by a filter),
//! yet usage accounting needs numbers. We count with OpenAI's `cl100k_base`
//! encoding: it is not the backend model's own tokenizer, so the result is an
//! estimate (records carry `estimated: true`), but it is a stable, well-known
//! one that is usually within ~10–20% of Llama/Mistral/Qwen tokenizers on
//! English text.
//!
//! Counting is CPU work (roughly linear in the text); for multi-megabyte
//! bodies call these functions off the async executor.

use std::panic::AssertUnwindSafe;
use std::sync::LazyLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

/// The encoder, built once from the ranks embedded in `tiktoken-rs` (no
/// network). `None` if building it failed; then we estimate from words.
static CL100K: LazyLock<Option<CoreBPE>> = LazyLock::new(|| {
    // The crate unwraps while parsing its embedded table; a panic there must
    // not take a request down with it.
    match std::panic::catch_unwind(tiktoken_rs::cl100k_base) {
        Ok(Ok(bpe)) => Some(bpe),
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot load the cl100k_base tokenizer; estimating token counts from words");
            None
        }
        Err(_) => {
            tracing::warn!(
                "loading the cl100k_base tokenizer panicked; estimating token counts from words"
            );
            None
        }
    }
});

/// Tokens of every message in the chat template (`<|im_start|>role ... <|im_end|>`).
const TOKENS_PER_MESSAGE: u64 = 3;
/// A message with a `name` costs one more.
const TOKENS_PER_NAME: u64 = 1;
/// Framing of each tool or function call in an assistant message (the
/// heuristic `tiktoken-rs` uses).
const TOKENS_PER_CALL: u64 = 1;
/// Every reply is primed with `<|im_start|>assistant<|message|>`.
const REPLY_PRIMER: u64 = 3;

/// Tokens in `text` (cl100k_base; special-token text such as
/// `<|endoftext|>` counts as ordinary text, as a client's text must).
pub fn count_text(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    match CL100K.as_ref() {
        Some(bpe) => {
            // The tokenizer unwraps regex results internally; should some
            // other pathological input make it panic, estimate instead.
            match std::panic::catch_unwind(AssertUnwindSafe(|| count_bpe(bpe, text))) {
                Ok(n) => n,
                Err(_) => estimate_words(text),
            }
        }
        None => estimate_words(text),
    }
}

/// Longest whitespace run handed to the encoder in one piece. The cl100k
/// split pattern backtracks across a whitespace run, and `fancy-regex`
/// gives up (and `tiktoken-rs` panics) past a million steps: a client could
/// send a megabyte of spaces. Cutting longer runs changes the count by at
/// most a token per cut, only for such runs.
const MAX_WHITESPACE_RUN: usize = 4096;

fn count_bpe(bpe: &CoreBPE, text: &str) -> u64 {
    let mut total = 0u64;
    let mut start = 0;
    let mut run = 0;
    for (i, c) in text.char_indices() {
        if !c.is_whitespace() {
            run = 0;
            continue;
        }
        run += 1;
        if run > MAX_WHITESPACE_RUN {
            total += bpe.count_ordinary(&text[start..i]) as u64;
            start = i;
            run = 1;
        }
    }
    total + bpe.count_ordinary(&text[start..]) as u64
}

/// Loads the encoder now (about half a second) rather than in the first
/// request that needs it. Call once at startup, e.g. on a blocking thread.
pub fn warm_up() {
    LazyLock::force(&CL100K);
}

/// Tokens in a generated answer; the same as [`count_text`], named for
/// clarity where completion tokens are counted.
pub fn count_answer_text(text: &str) -> u64 {
    count_text(text)
}

/// Prompt tokens of an OpenAI request body: a chat body (`messages`), a
/// completions body (`prompt`) or an embeddings body (`input`), in that
/// order of preference. Anything else counts 0.
///
/// Chat bodies follow OpenAI's published accounting: 3 tokens per message,
/// the tokens of its role, content and name, 1 more for a name, and 3 for
/// the reply primer. Text parts of array contents count; image and audio
/// parts do not (their cost is model-specific). Tool calls in assistant
/// messages count by their function name and arguments plus 1, and `tools` /
/// `functions` definitions by their JSON text, as an approximation of the
/// hidden format servers render them in.
pub fn count_prompt(body: &Value) -> u64 {
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        let mut total = REPLY_PRIMER;
        for message in messages {
            total += TOKENS_PER_MESSAGE + count_message(message);
        }
        for key in ["tools", "functions"] {
            if let Some(definitions) = body.get(key).filter(|v| !v.is_null()) {
                total += count_text(&definitions.to_string());
            }
        }
        return total;
    }
    if let Some(prompt) = body.get("prompt") {
        return count_inputs(prompt);
    }
    if let Some(input) = body.get("input") {
        return count_inputs(input);
    }
    0
}

fn count_message(message: &Value) -> u64 {
    let mut total = 0;
    if let Some(role) = message.get("role").and_then(Value::as_str) {
        total += count_text(role);
    }
    if let Some(name) = message.get("name").and_then(Value::as_str) {
        total += count_text(name) + TOKENS_PER_NAME;
    }
    match message.get("content") {
        Some(Value::String(text)) => total += count_text(text),
        Some(Value::Array(parts)) => {
            for part in parts {
                if part.get("type").and_then(Value::as_str) == Some("text") {
                    if let Some(text) = part.get("text").and_then(Value::as_str) {
                        total += count_text(text);
                    }
                }
            }
        }
        _ => {}
    }
    let calls = message.get("tool_calls").and_then(Value::as_array);
    let functions = calls
        .into_iter()
        .flatten()
        .filter_map(|call| call.get("function"))
        // The legacy single `function_call` of assistant messages.
        .chain(message.get("function_call"));
    for function in functions {
        total += TOKENS_PER_CALL;
        for key in ["name", "arguments"] {
            if let Some(text) = function.get(key).and_then(Value::as_str) {
                total += count_text(text);
            }
        }
    }
    total
}

/// A `prompt` or `input`: a string, an array of strings, an array of token
/// ids (its length), or an array of such arrays.
fn count_inputs(value: &Value) -> u64 {
    match value {
        Value::String(text) => count_text(text),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => count_text(text),
                Value::Number(_) => 1,
                Value::Array(ids) => ids.len() as u64,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// The fallback when the encoder cannot be loaded: one token per short
/// ASCII word (one more per further 6 characters), per punctuation mark, and
/// per non-ASCII letter (CJK text is about a token per character).
fn estimate_words(text: &str) -> u64 {
    let mut total = 0u64;
    let mut word = 0u64;
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            word += 1;
            continue;
        }
        if word > 0 {
            total += 1 + (word - 1) / 6;
            word = 0;
        }
        if !c.is_whitespace() {
            total += 1;
        }
    }
    if word > 0 {
        total += 1 + (word - 1) / 6;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn known_cl100k_counts() {
        assert!(CL100K.is_some(), "cl100k_base must load");
        assert_eq!(count_text(""), 0);
        assert_eq!(count_text("hello world"), 2);
        assert_eq!(count_text("tiktoken is great!"), 6);
        assert_eq!(count_answer_text("hello world"), 2);
        // Special-token text is ordinary text from a client: not one token.
        assert!(count_text("<|endoftext|>") > 1);
    }

    #[test]
    fn chat_overhead() {
        // 3 (message) + 1 ("user") + 2 ("hello world") + 3 (reply primer).
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hello world"}]});
        assert_eq!(count_prompt(&body), 9);
        // A name: its tokens plus 1.
        let body = json!({"messages": [{"role": "user", "name": "bob", "content": "hello world"}]});
        assert_eq!(count_prompt(&body), 9 + count_text("bob") + 1);
        // Text parts count, image parts do not.
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hello world"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "tiktoken is great!"}
        ]}]});
        assert_eq!(count_prompt(&body), 9 + 6);
        // No messages: only the primer.
        assert_eq!(count_prompt(&json!({"messages": []})), 3);
    }

    /// The same messages through `tiktoken-rs`'s own implementation of the
    /// OpenAI cookbook's accounting ("How to count tokens with tiktoken").
    #[test]
    fn matches_tiktoken_rs_chat_accounting() {
        use tiktoken_rs::{ChatCompletionRequestMessage, FunctionCall};
        let messages = [
            ("system", None, "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."),
            ("system", Some("example_user"), "New synergies will help drive top-line growth."),
            ("system", Some("example_assistant"), "Things working well together will increase revenue."),
            ("system", Some("example_user"), "Let's circle back when we have more time to touch base on opportunities for increased leverage."),
            ("system", Some("example_assistant"), "Let's talk later when we're less busy about how to do better."),
            ("user", None, "This late pivot means we don't have time to boil the ocean for the client project."),
        ];
        let body = json!({"messages": messages.iter().map(|(role, name, content)| {
            let mut m = json!({"role": role, "content": content});
            if let Some(name) = name {
                m["name"] = json!(name);
            }
            m
        }).collect::<Vec<_>>()});
        let mut theirs: Vec<ChatCompletionRequestMessage> = messages
            .iter()
            .map(|(role, name, content)| ChatCompletionRequestMessage {
                role: role.to_string(),
                content: Some(content.to_string()),
                name: name.map(str::to_string),
                ..Default::default()
            })
            .collect();
        let expected = tiktoken_rs::num_tokens_from_messages("gpt-4", &theirs).expect("count");
        assert_eq!(count_prompt(&body) as usize, expected);

        // With a tool call in an assistant message.
        theirs.push(ChatCompletionRequestMessage {
            role: "assistant".into(),
            tool_calls: vec![FunctionCall {
                name: "get_weather".into(),
                arguments: "{\"city\":\"Paris\"}".into(),
            }],
            ..Default::default()
        });
        let mut body = body;
        body["messages"]
            .as_array_mut()
            .expect("array")
            .push(json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
            ]}));
        let expected = tiktoken_rs::num_tokens_from_messages("gpt-4", &theirs).expect("count");
        assert_eq!(count_prompt(&body) as usize, expected);
    }

    #[test]
    fn completions_and_embeddings_inputs() {
        assert_eq!(count_prompt(&json!({"prompt": "hello world"})), 2);
        assert_eq!(
            count_prompt(&json!({"prompt": ["hello world", "tiktoken is great!"]})),
            8
        );
        assert_eq!(count_prompt(&json!({"input": "hello world"})), 2);
        assert_eq!(
            count_prompt(&json!({"input": ["hello world", "hello world"]})),
            4
        );
        // Token ids count their length.
        assert_eq!(count_prompt(&json!({"input": [1, 2, 3, 4]})), 4);
        assert_eq!(count_prompt(&json!({"input": [[1, 2], [3, 4, 5]]})), 5);
        assert_eq!(count_prompt(&json!({"model": "m"})), 0);
    }

    #[test]
    fn tool_calls_count() {
        let plain = json!({"messages": [{"role": "assistant", "content": null}]});
        let with_call = json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
        ]}]});
        assert!(count_prompt(&with_call) > count_prompt(&plain));
    }

    #[test]
    fn word_estimate() {
        assert_eq!(estimate_words(""), 0);
        assert_eq!(estimate_words("hello world"), 2);
        // "tiktoken" is 8 letters: 2; "is", "great", "!": 1 each.
        assert_eq!(estimate_words("tiktoken is great!"), 5);
        assert_eq!(estimate_words("日本語"), 3);
    }

    #[test]
    fn long_and_odd_inputs_do_not_panic() {
        // A run this long makes the unchunked encoder panic.
        let spaces = " ".repeat(1 << 20) + "x";
        let started = std::time::Instant::now();
        let n = count_text(&spaces);
        eprintln!("1 MiB of spaces: {n} tokens in {:?}", started.elapsed());
        // Far more than the word estimate's 1: the encoder counted it.
        assert!(n > 1000, "{n}");
        // Short runs are untouched by the chunking.
        let text = format!("a{}b", " ".repeat(MAX_WHITESPACE_RUN - 1));
        let bpe = CL100K.as_ref().expect("loaded");
        assert_eq!(count_text(&text), bpe.count_ordinary(&text) as u64);
        let long_word = "a".repeat(100_000);
        assert!(count_text(&long_word) > 1000);
        let text = "lorem ipsum dolor sit amet, ".repeat(40_000); // ~1.1 MB
        let started = std::time::Instant::now();
        let n = count_text(&text);
        eprintln!(
            "counted {n} tokens in {} bytes in {:?}",
            text.len(),
            started.elapsed()
        );
        assert!(n > 100_000);
    }
}
