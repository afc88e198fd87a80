//! The live fleet as the host sees it at the moment of the call.

use crate::bindings::sluice::policy::fleet as host;
use crate::Backend;

/// The backends that serve `model`, in configuration order. Empty when no
/// backend serves it (the model does not exist, as far as the fleet knows).
pub fn backends_for_model(model: &str) -> Vec<Backend> {
    host::backends_for_model(model)
}

/// Every configured backend, in configuration order.
pub fn backends() -> Vec<Backend> {
    host::backends()
}

impl Backend {
    /// True when the backend is below its `max_concurrent_requests` (or has
    /// no limit).
    pub fn has_capacity(&self) -> bool {
        self.max_concurrent == 0 || self.in_flight < self.max_concurrent
    }

    /// True when the backend lists `model` among the models it serves.
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }

    /// In-flight requests per unit of weight: the figure least-load
    /// balancing compares.
    pub fn load(&self) -> f64 {
        f64::from(self.in_flight) / f64::from(self.weight.max(1))
    }
}
