//! What the backends' inference engines report (queue, running batch,
//! KV-cache use, LoRA adapters) and how much of this request's prompt each
//! backend probably holds in its prefix cache. Needs a host serving
//! `sluice:policy@0.2.2`.
//!
//! Both are cheap (the host reads a snapshot scraped off the request path,
//! and does a hash lookup per prompt block): call them for every backend of
//! a model on every request.
//!
//! ```no_run
//! use sluice_guest::{fleet, Decision, Request};
//!
//! /// The backend holding most of the prompt, unless its engine is queueing.
//! fn on_request(request: Request) -> Decision {
//!     let mut best: Option<(u32, String)> = None;
//!     for backend in fleet::backends_for_model(&request.model) {
//!         let queueing = backend
//!             .engine()
//!             .and_then(|e| e.current().and_then(|s| s.waiting))
//!             .is_some_and(|waiting| waiting > 4);
//!         if !backend.healthy || queueing {
//!             continue;
//!         }
//!         let matched = backend.prefix_match().matched_blocks;
//!         if best.as_ref().is_none_or(|(m, _)| matched > *m) {
//!             best = Some((matched, backend.name));
//!         }
//!     }
//!     match best {
//!         Some((_, name)) => Decision::route_to(&name),
//!         None => Decision::pass(),
//!     }
//! }
//! ```

use crate::bindings::sluice::policy::engine as host;
use crate::Backend;

pub use crate::bindings::sluice::policy::engine::{EngineSignals, PrefixBlocks};

/// What `backend`'s engine reports; `None` when no backend has that name
/// or it has no `engine` configured. See [`Backend::engine`].
pub fn signals(backend: &str) -> Option<EngineSignals> {
    host::signals(backend)
}

/// How many leading blocks of this request's prompt `backend` probably
/// holds. See [`Backend::prefix_match`].
pub fn prefix_match(backend: &str) -> PrefixBlocks {
    host::prefix_match(backend)
}

/// Requests per second the gateway recently sent `backend` (a moving
/// average over about ten seconds, retries included); 0.0 for an unknown
/// backend. See [`Backend::sent_rate`]. Needs a host serving
/// `sluice:policy@0.2.3`.
pub fn sent_rate(backend: &str) -> f64 {
    host::sent_rate(backend)
}

impl Backend {
    /// Requests per second the gateway recently sent this backend. Divided
    /// by [`Backend::weight`] it compares backends: one whose rate per
    /// unit of weight runs ahead of the others' is getting more than its
    /// configured share (what [`crate::select::Scorer`] uses to bound
    /// prefix affinity).
    pub fn sent_rate(&self) -> f64 {
        sent_rate(&self.name)
    }

    /// What this backend's inference engine last reported, with how old
    /// that is ([`EngineSignals::age_ms`], [`EngineSignals::stale`]);
    /// `None` when the backend has no `engine` configured (nothing is
    /// scraped: decide on the gateway's own counters).
    pub fn engine(&self) -> Option<EngineSignals> {
        signals(&self.name)
    }

    /// How many leading blocks of this request's prompt this backend
    /// probably holds in its prefix cache (the gateway's estimate from the
    /// prompts it sent there). Looking does not refresh anything: only the
    /// backend that serves the request is credited with its blocks.
    pub fn prefix_match(&self) -> PrefixBlocks {
        prefix_match(&self.name)
    }
}

impl EngineSignals {
    /// The signals when they describe the engine now; `None` when they are
    /// stale or were never read. Treat `None` as *saturation unknown*: the
    /// backend may be saturated, but it is not down for that alone (its
    /// health is [`Backend::healthy`]).
    pub fn current(&self) -> Option<&EngineSignals> {
        (!self.stale).then_some(self)
    }

    /// True when the engine is running or queueing requests for `adapter`
    /// (a LoRA adapter, as vLLM reports them), or has `adapter` loaded as a
    /// model (as Ollama reports them): a request for it starts without
    /// loading anything.
    pub fn has_loaded(&self, adapter: &str) -> bool {
        self.running_adapters
            .iter()
            .chain(&self.waiting_adapters)
            .chain(&self.loaded_models)
            .any(|a| a == adapter)
    }

    /// True when the engine can take one more adapter without evicting
    /// one: fewer running than its `max_lora`. `false` when unknown.
    pub fn has_adapter_room(&self) -> bool {
        self.max_adapters
            .is_some_and(|max| (self.running_adapters.len() as u64) < u64::from(max))
    }
}

impl PrefixBlocks {
    /// The share of the prompt's blocks the backend holds, 0.0..=1.0 (0.0
    /// for a prompt shorter than a block).
    ///
    /// ```
    /// use sluice_guest::engine::PrefixBlocks;
    ///
    /// let half = PrefixBlocks { matched_blocks: 3, total_blocks: 6, block_bytes: 64 };
    /// assert_eq!(half.fraction(), 0.5);
    /// assert_eq!(half.matched_bytes(), 192);
    /// ```
    pub fn fraction(&self) -> f64 {
        if self.total_blocks == 0 {
            0.0
        } else {
            f64::from(self.matched_blocks) / f64::from(self.total_blocks)
        }
    }

    /// Bytes of canonical prompt text the backend probably holds.
    pub fn matched_bytes(&self) -> u64 {
        u64::from(self.matched_blocks) * u64::from(self.block_bytes)
    }
}
