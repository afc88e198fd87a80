//! A worker as a Spin user writes one: `#[http_service]` from spin-sdk 7,
//! which exports `wasi:http/handler@0.3.0`. Each path exercises one thing
//! the host promises: answering, reading the body, outbound calls (to
//! allowed hosts only), and staying bounded when the guest loops or eats
//! memory.

use http_body_util::BodyExt;
use spin_sdk::http::{send, IntoResponse, Request, StatusCode};
use spin_sdk::http_service;

#[http_service]
async fn handle(request: Request) -> impl IntoResponse {
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    match path.as_str() {
        "/tools/hello" => (StatusCode::OK, "hello from spin".to_string()),
        "/tools/echo" => match request.into_body().collect().await {
            Ok(body) => {
                let bytes = body.to_bytes();
                (
                    StatusCode::OK,
                    format!(
                        "echo {} bytes: {}",
                        bytes.len(),
                        String::from_utf8_lossy(&bytes)
                    ),
                )
            }
            Err(e) => (StatusCode::BAD_REQUEST, format!("body: {e:?}")),
        },
        "/tools/fetch" => {
            let url = query.strip_prefix("url=").unwrap_or("").to_string();
            let outgoing = match spin_sdk::http::Request::get(url).body(String::new()) {
                Ok(r) => r,
                Err(e) => return (StatusCode::BAD_REQUEST, format!("bad url: {e}")),
            };
            match send(outgoing).await {
                Ok(response) => {
                    let status = response.status();
                    let body = match response.into_body().collect().await {
                        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                        Err(e) => format!("(body broke: {e:?})"),
                    };
                    (
                        StatusCode::OK,
                        format!("fetched {}: {body}", status.as_u16()),
                    )
                }
                Err(e) => (StatusCode::BAD_GATEWAY, format!("refused: {e:?}")),
            }
        }
        "/tools/spin" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "/tools/eat" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        _ => (StatusCode::NOT_FOUND, format!("no tool at {path}")),
    }
}
