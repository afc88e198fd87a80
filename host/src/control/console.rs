//! The operator console: its static files (embedded at build time from
//! `console/`), and the live feed its charts draw — one snapshot a second of
//! the fleet and of each model's request rate, tokens/s, TTFT and error
//! rate, shared by every open console.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::fleet::LiveFleet;

mod assets {
    include!(concat!(env!("OUT_DIR"), "/console_assets.rs"));
}

/// A console file by name and its content type; `index.html` for `/`.
pub fn asset(name: &str) -> Option<(&'static [u8], &'static str)> {
    let (_, bytes) = assets::ASSETS.iter().find(|(n, _)| *n == name)?;
    let kind = match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    };
    Some((bytes, kind))
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

/// Starts the once-a-second sampler; each console subscribes to it.
pub fn start_feed(fleet: Arc<LiveFleet>) -> watch::Receiver<Arc<Value>> {
    let (tx, rx) = watch::channel(Arc::new(Value::Null));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let windows = crate::usage::live::take();
            let snapshot = fleet.load();
            let mut models: Vec<Value> = windows
                .into_iter()
                .filter(|(m, _)| snapshot.model_load(m).is_some())
                .map(|(model, mut w)| {
                    json!({
                        "model": model,
                        "requests_per_s": w.requests,
                        "tokens_per_s": w.tokens,
                        "ttft_ms_p50": median(&mut w.ttft_ms),
                        "error_rate": if w.requests == 0 { 0.0 } else { w.errors as f64 / w.requests as f64 },
                    })
                })
                .collect();
            for m in snapshot.models() {
                if !models.iter().any(|v| v["model"] == m.as_str()) {
                    models.push(json!({"model": m, "requests_per_s": 0, "tokens_per_s": 0, "ttft_ms_p50": null, "error_rate": 0.0}));
                }
            }
            let time = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let event = json!({
                "time": time,
                "fleet": fleet_json(&fleet),
                "models": models,
            });
            if tx.send(Arc::new(event)).is_err() {
                return;
            }
        }
    });
    rx
}

/// `{"health": …, "load": …}`, as `/health` and `/load-stats` show them.
pub fn fleet_json(fleet: &LiveFleet) -> Value {
    let snapshot = fleet.load();
    let (_, health) = crate::fleet::health::report(&snapshot);
    json!({"health": health, "load": crate::fleet::stats::load_stats(&snapshot)})
}
