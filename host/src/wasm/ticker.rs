//! The epoch ticker: a thread that advances an engine's epoch at a fixed
//! tick, which is what makes running guests yield and lets their deadlines
//! fire.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use wasmtime::Engine;

/// A running ticker; dropping it stops the thread at its next tick.
pub struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Ticker {
    /// Starts a thread named `name` that advances `engine`'s epoch every
    /// `tick`.
    pub fn start(engine: &Engine, tick: Duration, name: &str) -> anyhow::Result<Ticker> {
        let stop = Arc::new(AtomicBool::new(false));
        let (engine, stopped) = (engine.clone(), stop.clone());
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .with_context(|| format!("starting the epoch ticker {name}"))?;
        Ok(Ticker { stop })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
