//! A backend's error answer, given to the client in OpenAI's shape.
//!
//! Servers fail in their own dialects: vLLM's `{"object":"error",
//! "message"}`, Ollama's `{"error":"..."}`, FastAPI's `{"detail"}`, an
//! nginx HTML page, an empty 503. OpenAI SDKs read `error.message` and
//! `error.code` from a JSON body; anything else surfaces as a confusing
//! parse failure. Errors already in OpenAI's shape pass unchanged.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::BodyExt;

use crate::api::render::{self, ApiShape};
use crate::dataplane::accounting::Accounting;
use crate::dataplane::body::Body;
use crate::dataplane::forward::Answer;
use crate::problem::Problem;

/// More than any error message needs; the rest is not read.
const MAX_ERROR_BYTES: usize = 64 << 10;
/// A backend that sends its error head and then stalls is not waited on.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest backend text quoted in the message.
const MAX_MESSAGE_CHARS: usize = 500;

/// Reads the backend's error body (bounded in size and time), frees the
/// slot and answers with the body in OpenAI's shape, status unchanged.
pub async fn respond(answer: Answer, mut acct: Accounting) -> Response<Body> {
    let Answer {
        backend,
        mut parts,
        first,
        mut incoming,
        slot,
        ..
    } = answer;
    let mut body = first.map(Vec::from).unwrap_or_default();
    let reading = async {
        while body.len() < MAX_ERROR_BYTES {
            match incoming.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        body.extend_from_slice(&data);
                    }
                }
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(READ_TIMEOUT, reading).await;
    drop(incoming);
    drop(slot);
    acct.set_status(parts.status.as_u16());
    acct.finish();
    let body = match normalize(parts.status, &backend.name, &body) {
        Some(error) => {
            parts.headers.insert(header::CONTENT_TYPE, Body::JSON);
            Bytes::from(render::body(ApiShape::OpenAi, &error).to_string())
        }
        None => Bytes::from(body),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_ENCODING);
    Response::from_parts(parts, Body::full(body))
}

/// A backend's error answer that was not in OpenAI's shape, with what it
/// said; its status stays the backend's.
#[derive(Debug, thiserror::Error)]
#[error("Backend `{backend}` answered {status}{}", said_part(.said))]
pub struct UpstreamError {
    backend: String,
    status: StatusCode,
    /// The backend's message, shortened; empty when it gave none.
    said: String,
    /// The backend's own error `type`, when its JSON named one.
    kind: Option<String>,
}

fn said_part(said: &str) -> String {
    if said.is_empty() {
        " with no message.".to_string()
    } else {
        format!(": {said}")
    }
}

impl Problem for UpstreamError {
    fn status(&self) -> StatusCode {
        self.status
    }
    fn code(&self) -> &str {
        "backend_error"
    }
    fn kind(&self) -> Option<&str> {
        self.kind.as_deref()
    }
}

/// The backend's error to rewrite in the client's shape, or `None` when
/// the body already has OpenAI's shape.
pub fn normalize(status: StatusCode, backend: &str, body: &[u8]) -> Option<UpstreamError> {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    if let Some(error) = parsed.as_ref().and_then(|v| v.get("error")) {
        if error.get("message").is_some_and(|m| m.is_string()) {
            return None;
        }
    }
    let said = parsed
        .as_ref()
        .and_then(message_of)
        .unwrap_or_else(|| text_of(body));
    let kind = parsed
        .as_ref()
        .and_then(|v| v.get("type"))
        .and_then(|t| t.as_str())
        .map(str::to_string);
    Some(UpstreamError {
        backend: backend.to_string(),
        status,
        said,
        kind,
    })
}

/// The message of a JSON error in the dialects servers use.
fn message_of(value: &serde_json::Value) -> Option<String> {
    ["error", "message", "detail"]
        .iter()
        .filter_map(|key| value.get(*key))
        .find_map(|field| match field {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        })
        .map(|s| shorten(&s))
}

/// Plain words of a text or HTML body: tags dropped, whitespace collapsed.
fn text_of(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut words = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                words.push(' ');
            }
            _ if in_tag => {}
            c => words.push(c),
        }
    }
    shorten(&words.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapped(status: StatusCode, body: &[u8]) -> serde_json::Value {
        let error = normalize(status, "vm01", body).expect("wrapped");
        render::body(ApiShape::OpenAi, &error)
    }

    fn message(status: u16, body: &str) -> String {
        let value = wrapped(StatusCode::from_u16(status).unwrap(), body.as_bytes());
        assert_eq!(value["error"]["code"], "backend_error");
        value["error"]["message"].as_str().unwrap().to_string()
    }

    #[test]
    fn openai_errors_pass_unchanged() {
        let body = r#"{"error":{"message":"too long","type":"invalid_request_error","code":null}}"#;
        assert!(normalize(StatusCode::BAD_REQUEST, "vm01", body.as_bytes()).is_none());
    }

    #[test]
    fn server_dialects_keep_their_message() {
        assert_eq!(
            message(
                400,
                r#"{"object":"error","message":"max_tokens too large","type":"BadRequestError","code":400}"#
            ),
            "Backend `vm01` answered 400 Bad Request: max_tokens too large"
        );
        assert!(message(404, r#"{"error":"model 'x' not found"}"#).ends_with("model 'x' not found"));
        assert!(message(422, r#"{"detail":[{"loc":["body"]}]}"#).contains("loc"));
    }

    #[test]
    fn html_and_empty_bodies_become_words() {
        assert_eq!(
            message(
                502,
                "<html><body><h1>502 Bad Gateway</h1>\n<hr>nginx</body></html>"
            ),
            "Backend `vm01` answered 502 Bad Gateway: 502 Bad Gateway nginx"
        );
        assert_eq!(
            message(503, ""),
            "Backend `vm01` answered 503 Service Unavailable with no message."
        );
        let long = message(500, &"é".repeat(10_000));
        assert!(long.chars().count() < 600);
        let value = wrapped(StatusCode::TOO_MANY_REQUESTS, b"slow down");
        assert_eq!(value["error"]["type"], "rate_limit_error");
        assert_eq!(value["error"]["param"], serde_json::Value::Null);
        let vllm = br#"{"object":"error","message":"m","type":"BadRequestError","code":400}"#;
        let value = wrapped(StatusCode::BAD_REQUEST, vllm);
        assert_eq!(value["error"]["type"], "BadRequestError");
    }
}
