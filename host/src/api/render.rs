//! The one renderer of errors: a [`Problem`] written in the shape of the API
//! a request came in on — a whole error response, or the event that ends a
//! stream already under way. Gateway errors, backends' errors rewritten,
//! in-stream failures and the admin API's errors all leave through here,
//! so a client's SDK reads the same `type` and `code` for the same problem
//! however it reaches it.
//!
//! A second shape (Anthropic's `{"type":"error","error":{"type","message"}}`
//! for the Messages front door) is one more [`ApiShape`] variant and its arm
//! in each function below.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

use crate::api::sse;
use crate::problem::Problem;

/// The API whose error shape a client reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiShape {
    /// `{"error":{"message","type","param","code"}}`.
    OpenAi,
}

/// The error `type` a shape gives a status.
pub fn error_type(shape: ApiShape, status: StatusCode) -> &'static str {
    match shape {
        ApiShape::OpenAi => match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        },
    }
}

/// The whole error body for `problem`.
pub fn body(shape: ApiShape, problem: &dyn Problem) -> Value {
    let kind = problem
        .kind()
        .unwrap_or_else(|| error_type(shape, problem.status()));
    match shape {
        ApiShape::OpenAi => json!({
            "error": {
                "message": problem.to_string(),
                "type": kind,
                "param": problem.param(),
                "code": problem.code(),
            }
        }),
    }
}

/// The events that end a stream with `problem` once its answer has begun
/// (the status line is out, so the body says it): the error event, then
/// the shape's end of stream.
pub fn stream_end(shape: ApiShape, problem: &dyn Problem) -> Bytes {
    match shape {
        ApiShape::OpenAi => {
            let mut out = sse::event(&body(shape, problem).to_string()).to_vec();
            out.extend_from_slice(sse::DONE);
            Bytes::from(out)
        }
    }
}

/// The events that end a stream the response filters stopped: the shape's
/// last chunk saying why (`finish_reason: "content_filter"`, as OpenAI ends
/// one), then its end of stream. `envelope` is the stream's last chunk
/// without its choices (id, model, created…); `chat` tells a chat stream
/// (`delta`) from a completions one (`text`).
pub fn stopped_stream(shape: ApiShape, envelope: &Value, index: u32, chat: bool) -> [Bytes; 2] {
    match shape {
        ApiShape::OpenAi => {
            let mut chunk = envelope.clone();
            let choice = if chat {
                json!({"index": index, "delta": {}, "finish_reason": "content_filter"})
            } else {
                json!({"index": index, "text": "", "finish_reason": "content_filter"})
            };
            chunk["choices"] = Value::Array(vec![choice]);
            [
                sse::event(&chunk.to_string()),
                Bytes::from_static(sse::DONE),
            ]
        }
    }
}

/// The whole error response for `problem`: its status, the body, and the
/// headers its status calls for — `Retry-After` when it has one, the
/// `WWW-Authenticate` challenge every 401 carries (RFC 9110 §15.5.2), and
/// `Allow` on a 405 (every API path takes POST).
pub fn response(shape: ApiShape, problem: &dyn Problem) -> Response<Bytes> {
    let status = problem.status();
    let bytes = serde_json::to_vec(&body(shape, problem)).unwrap_or_default();
    let mut response = Response::new(Bytes::from(bytes));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(seconds) = problem.retry_after() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{message}")]
    struct Example {
        status: StatusCode,
        code: &'static str,
        message: String,
        kind: Option<&'static str>,
        param: Option<&'static str>,
        retry: Option<u64>,
    }

    impl Problem for Example {
        fn status(&self) -> StatusCode {
            self.status
        }
        fn code(&self) -> &str {
            self.code
        }
        fn retry_after(&self) -> Option<u64> {
            self.retry
        }
        fn param(&self) -> Option<&'static str> {
            self.param
        }
        fn kind(&self) -> Option<&str> {
            self.kind
        }
    }

    fn example(status: u16, code: &'static str, message: &str) -> Example {
        Example {
            status: StatusCode::from_u16(status).unwrap(),
            code,
            message: message.into(),
            kind: None,
            param: None,
            retry: None,
        }
    }

    #[test]
    fn openai_body_has_its_four_fields() {
        let mut missing = example(400, "missing_model", "No `model`.");
        missing.param = Some("model");
        assert_eq!(
            body(ApiShape::OpenAi, &missing),
            json!({"error": {
                "message": "No `model`.",
                "type": "invalid_request_error",
                "param": "model",
                "code": "missing_model",
            }})
        );
        let text = body(ApiShape::OpenAi, &example(503, "queue_full", "busy")).to_string();
        assert!(text.contains(r#""param":null"#), "{text}");
    }

    #[test]
    fn type_follows_the_status_unless_the_problem_names_one() {
        let types: Vec<_> = [400, 401, 403, 404, 413, 429, 500, 502, 503, 504]
            .iter()
            .map(|s| body(ApiShape::OpenAi, &example(*s, "c", "m"))["error"]["type"].clone())
            .collect();
        assert_eq!(
            types,
            [
                "invalid_request_error",
                "authentication_error",
                "permission_error",
                "invalid_request_error",
                "invalid_request_error",
                "rate_limit_error",
                "server_error",
                "server_error",
                "server_error",
                "server_error"
            ]
        );
        let mut named = example(400, "backend_error", "m");
        named.kind = Some("BadRequestError");
        assert_eq!(
            body(ApiShape::OpenAi, &named)["error"]["type"],
            "BadRequestError"
        );
    }

    #[test]
    fn messages_are_escaped() {
        let nasty = "a \"quote\", a \\ backslash,\na newline, \u{1} and </script> é";
        let value = body(ApiShape::OpenAi, &example(502, "c", nasty));
        let text = value.to_string();
        assert!(!text.contains('\n'), "{text}");
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["error"]["message"], nasty);
        // In a stream, a newline in the message must not end the event.
        let events = stream_end(ApiShape::OpenAi, &example(502, "c", nasty));
        let text = std::str::from_utf8(&events).unwrap();
        assert_eq!(text.matches("\n\n").count(), 2, "{text}");
    }

    #[test]
    fn stream_end_is_the_error_event_then_done() {
        let problem = example(502, "backend_stream_error", "it broke");
        let events = stream_end(ApiShape::OpenAi, &problem);
        let text = std::str::from_utf8(&events).unwrap();
        let (event, rest) = text.split_once("\n\n").unwrap();
        assert_eq!(rest, "data: [DONE]\n\n");
        let event: Value = serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap();
        // The same problem says the same thing whole and in a stream.
        assert_eq!(event, body(ApiShape::OpenAi, &problem));
    }

    #[test]
    fn response_carries_status_body_and_the_headers_its_status_needs() {
        let mut full = example(503, "queue_full", "busy");
        full.retry = Some(1);
        let r = response(ApiShape::OpenAi, &full);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert!(r.headers().get(header::WWW_AUTHENTICATE).is_none());
        let back: Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(back, body(ApiShape::OpenAi, &full));

        let r = response(ApiShape::OpenAi, &example(401, "invalid_api_key", "no"));
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(
            r.headers().get_all(header::WWW_AUTHENTICATE).iter().count(),
            1
        );
        let r = response(ApiShape::OpenAi, &example(405, "method_not_allowed", "no"));
        assert_eq!(r.headers()[header::ALLOW], "POST");
    }

    #[test]
    fn stopped_streams_end_with_content_filter_then_done() {
        let envelope = json!({"id": "c1", "object": "chat.completion.chunk"});
        let [chunk, done] = stopped_stream(ApiShape::OpenAi, &envelope, 2, true);
        let data = |chunk: &Bytes| -> Value {
            let text = std::str::from_utf8(chunk).unwrap();
            let data = text.strip_prefix("data: ").unwrap().strip_suffix("\n\n");
            serde_json::from_str(data.expect("one event")).unwrap()
        };
        assert_eq!(
            data(&chunk),
            json!({"id": "c1", "object": "chat.completion.chunk", "choices": [
                {"index": 2, "delta": {}, "finish_reason": "content_filter"}
            ]})
        );
        assert_eq!(&done[..], sse::DONE);
        let [chunk, _] = stopped_stream(ApiShape::OpenAi, &json!({}), 0, false);
        assert_eq!(
            data(&chunk)["choices"][0],
            json!({"index": 0, "text": "", "finish_reason": "content_filter"})
        );
    }
}
