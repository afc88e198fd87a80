//! Reading client request bodies: bounded in size and in time, and refused
//! without resetting the connection under a client that is still sending.
//!
//! Closing a socket with unread bytes in it makes the kernel send a TCP
//! reset, and a reset can discard the answer the client has not read yet:
//! it then sees "connection closed" instead of our 413 or 401. So a refused
//! body is drained in the background for a bounded time and size (what
//! nginx calls a lingering close) while the answer goes out.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};

use crate::dataplane::errors::GatewayError;

/// How long a refused body is read and thrown away before the connection
/// is dropped anyway.
const LINGER: Duration = Duration::from_secs(2);

/// Size and time bounds for one request body.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: u64,
    /// The whole body must arrive within this time (slow-body clients).
    pub timeout: Duration,
}

/// Reads the whole request body, refusing one over the limit before reading
/// it when the client announced its length, and as soon as it passes the
/// limit otherwise.
pub async fn read(
    headers: &http::HeaderMap,
    mut body: Incoming,
    limits: BodyLimits,
) -> Result<Bytes, GatewayError> {
    let limit = limits.max_bytes;
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit) {
        linger(headers, body, limit);
        return Err(GatewayError::BodyTooLarge { limit });
    }
    let capacity = announced.unwrap_or(0).min(limit);
    let mut buffer = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
    let reading = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| GatewayError::ClientBody(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                if (buffer.len() + data.len()) as u64 > limit {
                    return Ok(false);
                }
                buffer.extend_from_slice(&data);
            }
        }
        Ok(true)
    };
    match tokio::time::timeout(limits.timeout, reading).await {
        Ok(Ok(true)) => Ok(buffer.freeze()),
        Ok(Ok(false)) => {
            linger(headers, body, limit);
            Err(GatewayError::BodyTooLarge { limit })
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(GatewayError::BodyTimeout {
            timeout: limits.timeout,
        }),
    }
}

/// Reads and discards what is left of a body the gateway refused, up to
/// `limit` bytes and [`LINGER`], in the background so the refusal is sent
/// at once. A client that asked `Expect: 100-continue` has sent nothing
/// yet and is never asked to: its body is dropped unread.
pub fn linger(headers: &http::HeaderMap, body: Incoming, limit: u64) {
    let waits_for_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if waits_for_continue || body.is_end_stream() {
        return;
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(LINGER, discard(body, limit)).await;
    });
}

/// Reads and discards a body, up to `limit` bytes.
pub async fn discard(mut body: Incoming, limit: u64) {
    let mut read = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        read += frame.data_ref().map_or(0, |d| d.len() as u64);
        if read > limit {
            break;
        }
    }
}
