//! A worker exporting `wasi:http/incoming-handler@0.2` through the `wasi`
//! crate's proxy world: what Spin 2/3 components and `cargo component`
//! HTTP templates build.

use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Tools;

impl wasi::exports::http::incoming_handler::Guest for Tools {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let (status, text) = if path.starts_with("/tools/hello") {
            (200, "hello from p2".to_string())
        } else {
            (404, format!("no tool at {path}"))
        };
        let headers = Fields::new();
        let _ = headers.set("content-type", &[b"text/plain".to_vec()]);
        let response = OutgoingResponse::new(headers);
        let _ = response.set_status_code(status);
        let Ok(body) = response.body() else {
            return;
        };
        ResponseOutparam::set(out, Ok(response));
        if let Ok(stream) = body.write() {
            let _ = stream.blocking_write_and_flush(text.as_bytes());
        }
        let _ = OutgoingBody::finish(body, None);
    }
}

wasi::http::proxy::export!(Tools);
