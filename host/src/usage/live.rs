//! The last second of finished requests, per model: what the operator
//! console's live charts draw (request rate, tokens/s, TTFT, error rate).
//! Every finished request is counted here; the console takes the window
//! once a second.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use super::UsageRecord;

/// What finished in the current second, per model.
#[derive(Default)]
pub struct Window {
    pub requests: u64,
    pub errors: u64,
    pub tokens: u64,
    pub ttft_ms: Vec<f64>,
}

static WINDOWS: LazyLock<Mutex<HashMap<String, Window>>> = LazyLock::new(Default::default);

/// Most TTFT samples kept per model per second (a median needs no more).
const MAX_SAMPLES: usize = 4096;

/// Counts one finished request into the current second.
pub fn record(record: &UsageRecord) {
    let Ok(mut windows) = WINDOWS.lock() else {
        return;
    };
    let model = record
        .model_answered
        .as_deref()
        .unwrap_or(&record.model_requested);
    // Unknown models (404s) are counted under the name asked; the map is
    // emptied every second, so it stays small whatever clients send.
    let w = windows.entry(model.to_string()).or_default();
    w.requests += 1;
    if record.status >= 500 || record.status == 0 {
        w.errors += 1;
    }
    w.tokens += record.prompt_tokens + record.completion_tokens;
    if let Some(ttft) = record.ttft_ms {
        if w.ttft_ms.len() < MAX_SAMPLES {
            w.ttft_ms.push(ttft);
        }
    }
}

/// The window so far, per model, leaving an empty one in its place.
pub fn take() -> HashMap<String, Window> {
    WINDOWS
        .lock()
        .map(|mut w| std::mem::take(&mut *w))
        .unwrap_or_default()
}
