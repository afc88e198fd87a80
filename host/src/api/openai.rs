//! What the gateway needs to know of the OpenAI API: which endpoints it
//! proxies, the few body fields it reads, and the shapes it writes.

use std::borrow::Cow;

use bytes::Bytes;
use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::value::RawValue;

use http::StatusCode;

use crate::problem::Problem;

/// The proxied endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path.trim_end_matches('/') {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        }
    }
}

/// The body fields routing needs, read in one pass that also checks the
/// whole body is well-formed JSON (serde skips the rest without building it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub model: String,
    pub stream: bool,
    /// The client asked for the final `usage` chunk of a stream.
    pub include_usage: bool,
}

/// A request body the gateway cannot take: not JSON, not an object, too
/// deep, or without a model.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BadRequest {
    pub message: String,
    pub code: &'static str,
    pub param: Option<&'static str>,
}

impl BadRequest {
    pub fn new(message: impl Into<String>, code: &'static str) -> BadRequest {
        BadRequest {
            message: message.into(),
            code,
            param: None,
        }
    }
}

impl Problem for BadRequest {
    fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
    fn code(&self) -> &str {
        self.code
    }
    fn param(&self) -> Option<&'static str> {
        self.param
    }
}

/// The deepest nesting of arrays and objects a body may have: what
/// serde_json — and so the policies' SDK, the tokenizer and most backends —
/// parses. Deeper bodies would be refused downstream, or worse.
pub const MAX_DEPTH: usize = 127;

/// The longest `model` name a request may carry, in bytes. The name is
/// logged, echoed in errors, counted per consumer and handed to every
/// policy: real model names are well under 100 bytes, so a longer one is
/// refused (400 `model_too_long`) before it is copied anywhere.
pub const MAX_MODEL_BYTES: usize = 256;

impl RequestHead {
    pub fn parse(body: &[u8]) -> Result<RequestHead, BadRequest> {
        // serde_json checks UTF-8 only in the strings it reads, not in the
        // fields it skips (a prompt): check it all, or invalid text would
        // be forwarded to the backend.
        if let Err(e) = std::str::from_utf8(body) {
            return Err(BadRequest::new(
                format!(
                    "The request body is not valid UTF-8 (at byte {}).",
                    e.valid_up_to()
                ),
                "invalid_json",
            ));
        }
        #[derive(Deserialize)]
        struct Head<'a> {
            #[serde(borrow, default)]
            model: Option<Cow<'a, str>>,
            #[serde(default)]
            stream: Option<bool>,
            #[serde(default)]
            stream_options: Option<StreamOptions>,
        }
        #[derive(Deserialize)]
        struct StreamOptions {
            #[serde(default)]
            include_usage: Option<bool>,
        }
        let head: Head = serde_json::from_slice(body).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => BadRequest::new(
                    format!("The request body has a field of the wrong type: {e}."),
                    "invalid_request_body",
                ),
                _ => BadRequest::new(
                    format!("The request body is not valid JSON: {e}."),
                    "invalid_json",
                ),
            }
        })?;
        // serde reads a struct from an array too (`["m", true]`): only an
        // object is a request.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(BadRequest::new(
                "The request body must be a JSON object.",
                "invalid_request_body",
            ));
        }
        // Skipped fields are not depth-limited by serde_json either.
        if too_deep(body, MAX_DEPTH) {
            return Err(BadRequest::new(
                format!("The request body is nested deeper than {MAX_DEPTH} levels."),
                "invalid_json",
            ));
        }
        match head.model {
            // Checked on the borrowed text: a long name is refused before
            // it is copied into an owned string.
            Some(model) if model.len() > MAX_MODEL_BYTES => Err(BadRequest {
                message: format!(
                    "The model name is {} bytes long; at most {MAX_MODEL_BYTES} are accepted.",
                    model.len()
                ),
                code: "model_too_long",
                param: Some("model"),
            }),
            Some(model) if !model.is_empty() => Ok(RequestHead {
                model: model.into_owned(),
                stream: head.stream.unwrap_or(false),
                include_usage: head
                    .stream_options
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
            }),
            _ => Err(BadRequest {
                message: "You must provide a model parameter.".into(),
                code: "missing_model",
                param: Some("model"),
            }),
        }
    }
}

/// Whether arrays and objects in `body` (JSON) nest deeper than `limit`.
fn too_deep(body: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// `body` with its top-level `model` replaced. Other fields are copied as
/// raw text in their original order, so a multi-MiB prompt is moved, not
/// re-encoded.
pub fn with_model(body: &[u8], model: &str) -> Result<Bytes, serde_json::Error> {
    let mut fields: IndexMap<Cow<str>, &RawValue> = serde_json::from_slice(body)?;
    let encoded = serde_json::to_string(model)?;
    let raw = RawValue::from_string(encoded)?;
    fields.insert(Cow::Borrowed("model"), &raw);
    Ok(Bytes::from(serde_json::to_vec(&fields)?))
}

/// `body` asking for the final `usage` chunk of a stream
/// (`stream_options.include_usage`), other stream options kept.
pub fn with_include_usage(body: &[u8]) -> Result<Bytes, serde_json::Error> {
    let mut fields: IndexMap<Cow<str>, &RawValue> = serde_json::from_slice(body)?;
    let mut options: serde_json::Map<String, serde_json::Value> = match fields.get("stream_options")
    {
        Some(raw) => serde_json::from_str(raw.get()).unwrap_or_default(),
        None => serde_json::Map::new(),
    };
    options.insert("include_usage".into(), serde_json::Value::Bool(true));
    let raw = RawValue::from_string(serde_json::to_string(&options)?)?;
    fields.insert(Cow::Borrowed("stream_options"), &raw);
    Ok(Bytes::from(serde_json::to_vec(&fields)?))
}

impl Endpoint {
    /// The name used in usage records and logs.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// `GET /v1/models` in OpenAI's list shape.
pub fn model_list(models: &[String], created: u64) -> serde_json::Value {
    let data: Vec<_> = models
        .iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": created, "owned_by": "sluice"}))
        .collect();
    serde_json::json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_reads_model_and_stream() {
        let h = RequestHead::parse(
            br#"{"messages":[{"role":"user","content":"hi"}],"model":"m","stream":true}"#,
        )
        .unwrap();
        assert_eq!(
            h,
            RequestHead {
                model: "m".into(),
                stream: true,
                include_usage: false
            }
        );
        let h = RequestHead::parse(br#"{"model":"m\u00e9","stream":null}"#).unwrap();
        assert_eq!(
            h,
            RequestHead {
                model: "mé".into(),
                stream: false,
                include_usage: false
            }
        );
    }

    #[test]
    fn bad_bodies_are_told_apart() {
        let code = |b: &[u8]| RequestHead::parse(b).unwrap_err().code().to_string();
        assert_eq!(code(b"{\"model\":"), "invalid_json");
        assert_eq!(code(b"not json"), "invalid_json");
        assert_eq!(code(b"{\"messages\":[]}"), "missing_model");
        assert_eq!(code(b"{\"model\":\"\"}"), "missing_model");
        assert_eq!(code(b"{\"model\":7}"), "invalid_request_body");
        assert_eq!(code(b"[1,2]"), "invalid_request_body");
        // Found by fuzzing: an array whose first item is a string was read
        // as a request for that model, and could not be rewritten.
        assert_eq!(code(b"[\"]\"]"), "invalid_request_body");
        assert_eq!(
            code(b" [\"m\", true, {\"include_usage\": true}]"),
            "invalid_request_body"
        );
    }

    #[test]
    fn model_names_are_bounded() {
        let body = |n: usize| format!("{{\"model\":\"{}\"}}", "m".repeat(n));
        assert!(RequestHead::parse(body(MAX_MODEL_BYTES).as_bytes()).is_ok());
        let refused = RequestHead::parse(body(MAX_MODEL_BYTES + 1).as_bytes()).unwrap_err();
        assert_eq!(refused.code(), "model_too_long");
        assert_eq!(refused.param(), Some("model"));
        assert!(refused.message.len() < 200, "the name is not echoed");
        // Escapes count as the text they stand for.
        let escaped = format!("{{\"model\":\"{}\"}}", "\\u00e9".repeat(MAX_MODEL_BYTES));
        assert_eq!(
            RequestHead::parse(escaped.as_bytes()).unwrap_err().code(),
            "model_too_long"
        );
    }

    #[test]
    fn bodies_that_are_not_utf8_anywhere_are_refused() {
        let code = |b: &[u8]| RequestHead::parse(b).unwrap_err().code().to_string();
        // In a field the head reads, and in one it only skips.
        assert_eq!(code(b"{\"model\":\"m\xff\"}"), "invalid_json");
        assert_eq!(
            code(b"{\"model\":\"m\",\"messages\":[{\"content\":\"\xc0\xaf\"}]}"),
            "invalid_json"
        );
        assert_eq!(
            code(b"{\"model\":\"m\",\"user\":\"\xed\xa0\x80\"}"),
            "invalid_json"
        );
        assert!(
            RequestHead::parse("{\"model\":\"m\",\"user\":\"\u{e9}\u{1F600}\"}".as_bytes()).is_ok()
        );
    }

    #[test]
    fn bodies_nested_too_deep_are_refused() {
        let nested = |depth: usize| {
            format!(
                "{{\"model\":\"m\",\"x\":{}1{},\"s\":\"[[[[{{\\\"\"}}",
                "[".repeat(depth),
                "]".repeat(depth)
            )
        };
        // The outer object counts: `x` may nest MAX_DEPTH - 1 deep.
        assert!(RequestHead::parse(nested(MAX_DEPTH - 1).as_bytes()).is_ok());
        let refused = RequestHead::parse(nested(MAX_DEPTH).as_bytes()).unwrap_err();
        assert_eq!(refused.code(), "invalid_json");
        assert_eq!(
            RequestHead::parse(nested(1_000_000).as_bytes())
                .unwrap_err()
                .code(),
            "invalid_json"
        );
        // What is accepted, serde_json parses whole.
        serde_json::from_str::<serde_json::Value>(&nested(MAX_DEPTH - 1)).unwrap();
    }

    #[test]
    fn model_rewrite_keeps_everything_else() {
        let out = with_model(
            br#"{"model":"a","messages":[{"content":"x \" y"}],"n":1}"#,
            "b\"c",
        )
        .unwrap();
        assert_eq!(
            &out[..],
            br#"{"model":"b\"c","messages":[{"content":"x \" y"}],"n":1}"#
        );
    }
}
