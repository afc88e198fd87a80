//! Samples live requests to a JSON-lines file in the format `sluice policy
//! test` replays, so a policy author can try a new policy on real traffic
//! before deploying it.
//!
//! Off the request path: a sampled request becomes one line handed to a
//! writer task over a bounded channel; when the writer falls behind, lines
//! are dropped (and counted), never waited for. Credentials never reach the
//! file: the headers a policy cannot see are left out, and the consumer is
//! recorded by name.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderMap;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::api::openai::RequestHead;
use crate::api::CREDENTIAL_HEADERS;
use crate::config::RecordingConfig;

/// Lines waiting for the writer before new ones are dropped.
const BACKLOG: usize = 1024;

pub struct Recorder {
    /// Requests recorded per 2^32 (the sample share).
    threshold: u64,
    max_body_bytes: usize,
    lines: mpsc::Sender<String>,
    pub dropped: Arc<AtomicU64>,
}

impl Recorder {
    /// Starts the writer; `None` when recording is off.
    pub fn start(config: &RecordingConfig) -> Option<Recorder> {
        let path = config.path.clone()?;
        if config.sample <= 0.0 {
            return None;
        }
        let (lines, receiver) = mpsc::channel(BACKLOG);
        tokio::spawn(write(path, receiver, config.max_file_bytes));
        Some(Recorder {
            threshold: (config.sample * f64::from(u32::MAX)) as u64,
            max_body_bytes: usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX),
            lines,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Whether request `id` is in the sample: a hash of the id, so the
    /// choice is spread evenly and costs no random number.
    pub fn samples(&self, id: u64) -> bool {
        let mixed = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        mixed <= self.threshold
    }

    /// Queues one request's line.
    pub fn record(
        &self,
        path: &str,
        headers: &HeaderMap,
        consumer: Option<&str>,
        head: &RequestHead,
        body: &Bytes,
    ) {
        let body: Value = if body.len() <= self.max_body_bytes {
            serde_json::from_slice(body).unwrap_or(Value::Null)
        } else {
            json!({"model": head.model, "stream": head.stream})
        };
        let headers: serde_json::Map<String, Value> = headers
            .iter()
            .filter(|(name, _)| !CREDENTIAL_HEADERS.contains(&name.as_str()))
            .filter_map(|(name, value)| {
                Some((name.to_string(), Value::String(value.to_str().ok()?.into())))
            })
            .collect();
        let time_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let line = json!({
            "time_unix_ms": time_unix_ms,
            "path": path,
            "headers": headers,
            "consumer": consumer,
            "body": body,
        })
        .to_string();
        if self.lines.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Appends lines until the file reaches `max_bytes` or the gateway stops.
async fn write(path: PathBuf, mut lines: mpsc::Receiver<String>, max_bytes: u64) {
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await;
    let mut file = match file {
        Ok(file) => file,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "recording: cannot open the file; not recording");
            return;
        }
    };
    let mut size = file.metadata().await.map_or(0, |m| m.len());
    let mut batch = String::new();
    while let Some(line) = lines.recv().await {
        batch.clear();
        batch.push_str(&line);
        batch.push('\n');
        while let Ok(more) = lines.try_recv() {
            batch.push_str(&more);
            batch.push('\n');
        }
        if size + batch.len() as u64 > max_bytes {
            tracing::warn!(path = %path.display(), "recording: recording.max_file_bytes reached; stopped");
            return;
        }
        if let Err(e) = file.write_all(batch.as_bytes()).await {
            tracing::error!(path = %path.display(), error = %e, "recording: write failed; stopped");
            return;
        }
        let _ = file.flush().await;
        size += batch.len() as u64;
    }
}
