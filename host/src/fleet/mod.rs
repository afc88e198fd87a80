//! The fleet: every backend, indexed by name and by model.
//!
//! A [`Fleet`] is an immutable snapshot a request reads without locks;
//! [`LiveFleet`] publishes a new one when a config reload adds or removes
//! backends or a health check discovers a model. Backends that survive a
//! reload are the same objects in the new snapshot, so their requests in
//! flight, queues and health carry over.

pub mod backends;
pub mod engine;
pub mod health;
pub mod prefix;
pub mod rate;
pub mod stats;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::config::BackendConfig;
use crate::fleet::backends::{Backend, HealthRules, ModelLoad};

pub struct Fleet {
    backends: Vec<Arc<Backend>>,
    by_name: HashMap<Arc<str>, Arc<Backend>>,
    by_model: HashMap<String, Vec<Arc<Backend>>>,
    models: Vec<String>,
    load: HashMap<String, Arc<ModelLoad>>,
}

impl Fleet {
    fn build(backends: Vec<Arc<Backend>>, registry: &mut HashMap<String, Arc<ModelLoad>>) -> Fleet {
        let mut by_name = HashMap::new();
        let mut by_model: HashMap<String, Vec<Arc<Backend>>> = HashMap::new();
        let mut models = Vec::new();
        for b in &backends {
            by_name.insert(b.name.clone(), b.clone());
            for m in b.models().iter() {
                let serving = by_model.entry(m.clone()).or_default();
                if serving.is_empty() {
                    models.push(m.clone());
                }
                serving.push(b.clone());
            }
        }
        let load = models
            .iter()
            .map(|m| (m.clone(), registry.entry(m.clone()).or_default().clone()))
            .collect();
        Fleet {
            backends,
            by_name,
            by_model,
            models,
            load,
        }
    }

    /// A fleet of fresh backends, with no health checks running (tools and
    /// tests; the server uses [`LiveFleet`]).
    pub fn new(configs: &[BackendConfig]) -> Result<Fleet, String> {
        let rules = Arc::new(ArcSwap::from_pointee(HealthRules::default()));
        let backends = new_backends(configs, &rules)?;
        Ok(Fleet::build(backends, &mut HashMap::new()))
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Backend>> {
        self.by_name.get(name)
    }

    pub fn serving(&self, model: &str) -> &[Arc<Backend>] {
        self.by_model
            .get(model)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Every model some backend serves, in configuration order.
    pub fn models(&self) -> &[String] {
        &self.models
    }

    /// The models at least one healthy backend serves.
    pub fn healthy_models(&self) -> Vec<String> {
        self.models
            .iter()
            .filter(|m| self.serving(m).iter().any(|b| b.is_healthy()))
            .cloned()
            .collect()
    }

    /// What a backend's inference engine reports (queue, batch, KV cache,
    /// LoRA adapters) and how fresh it is; `None` for an unknown backend or
    /// one without an `engine`. Cheap: one atomic load.
    pub fn engine(&self, backend: &str) -> Option<engine::EngineView> {
        self.get(backend)?.engine_view()
    }

    /// The counters of a model the fleet serves.
    pub fn model_load(&self, model: &str) -> Option<&Arc<ModelLoad>> {
        self.load.get(model)
    }
}

fn new_backends(
    configs: &[BackendConfig],
    rules: &Arc<ArcSwap<HealthRules>>,
) -> Result<Vec<Arc<Backend>>, String> {
    configs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Backend::new(c, rules.clone(), Instant::now())
                .map(Arc::new)
                .map_err(|e| format!("backends[{i}]: {e}"))
        })
        .collect()
}

/// What a reload changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub kept: Vec<String>,
}

/// The current [`Fleet`], replaced whole when backends or models change.
pub struct LiveFleet {
    current: ArcSwap<Fleet>,
    rules: Arc<ArcSwap<HealthRules>>,
    /// Every model's counters, so they outlive the snapshots.
    registry: Mutex<HashMap<String, Arc<ModelLoad>>>,
}

impl LiveFleet {
    pub fn new(configs: &[BackendConfig], rules: HealthRules) -> Result<LiveFleet, String> {
        let rules = Arc::new(ArcSwap::from_pointee(rules));
        let backends = new_backends(configs, &rules)?;
        let mut registry = HashMap::new();
        let fleet = Fleet::build(backends, &mut registry);
        Ok(LiveFleet {
            current: ArcSwap::from_pointee(fleet),
            rules,
            registry: Mutex::new(registry),
        })
    }

    /// The snapshot to use for one request (cheap; no lock).
    pub fn load(&self) -> Arc<Fleet> {
        self.current.load_full()
    }

    pub fn rules(&self) -> Arc<HealthRules> {
        self.rules.load_full()
    }

    /// Publishes a snapshot of the current backends again, after one of
    /// them changed its models.
    pub fn refresh(&self) {
        let Ok(mut registry) = self.registry.lock() else {
            return;
        };
        let backends = self.current.load().backends.clone();
        self.current
            .store(Arc::new(Fleet::build(backends, &mut registry)));
    }

    /// Applies a reloaded configuration: backends with the same name and
    /// server stay (with new limits, weights and models), others are added
    /// or retired. Requests in flight finish where they are. Returns the
    /// change and the backends that need a health checker.
    pub fn reload(
        &self,
        configs: &[BackendConfig],
        rules: HealthRules,
    ) -> Result<(ReloadSummary, Vec<Arc<Backend>>), String> {
        let Ok(mut registry) = self.registry.lock() else {
            return Err("the fleet's lock is poisoned".into());
        };
        let old = self.current.load_full();
        let mut backends = Vec::with_capacity(configs.len());
        let mut added = Vec::new();
        let mut summary = ReloadSummary::default();
        let old_rules = self.rules.swap(Arc::new(rules));
        // First build what is new, so a bad entry changes nothing.
        let mut kept = Vec::new();
        for (i, config) in configs.iter().enumerate() {
            match old.get(&config.name) {
                Some(b) if b.same_server(config) => {
                    kept.push((b.clone(), config));
                    summary.kept.push(config.name.clone());
                    backends.push(b.clone());
                }
                _ => {
                    let b = match Backend::new(config, self.rules.clone(), Instant::now()) {
                        Ok(b) => Arc::new(b),
                        Err(e) => {
                            self.rules.store(old_rules);
                            return Err(format!("backends[{i}]: {e}"));
                        }
                    };
                    summary.added.push(config.name.clone());
                    added.push(b.clone());
                    backends.push(b);
                }
            }
        }
        for (b, config) in kept {
            b.update(config);
        }
        for b in old.backends() {
            if !backends.iter().any(|n| Arc::ptr_eq(n, b)) {
                b.retire();
                summary.removed.push(b.name.to_string());
            }
        }
        self.current
            .store(Arc::new(Fleet::build(backends, &mut registry)));
        Ok((summary, added))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str, port: u16, models: &[&str], max: u32) -> BackendConfig {
        BackendConfig {
            name: name.into(),
            url: format!("http://127.0.0.1:{port}"),
            models: models.iter().map(|m| m.to_string()).collect(),
            max_concurrent_requests: max,
            weight: 1,
            api_key: None,
            health_path: None,
            engine: Default::default(),
            metrics_url: None,
        }
    }

    #[test]
    fn snapshots_index_by_model() {
        let f = Fleet::new(&[config("a", 1, &["m", "n"], 0), config("b", 2, &["n"], 0)]).unwrap();
        assert_eq!(f.serving("n").len(), 2);
        assert_eq!(f.models(), ["m", "n"]);
        assert!(f.model_load("m").is_some());
        assert!(f.get("c").is_none());
    }

    #[tokio::test]
    async fn reload_keeps_live_backends_and_retires_removed_ones() {
        let live = LiveFleet::new(
            &[config("a", 1, &["m"], 1), config("b", 2, &["m"], 0)],
            HealthRules::default(),
        )
        .unwrap();
        let before = live.load();
        let slot = before.get("a").unwrap().try_acquire().unwrap();
        let (summary, added) = live
            .reload(
                &[config("a", 1, &["m", "x"], 2), config("c", 3, &["m"], 0)],
                HealthRules::default(),
            )
            .unwrap();
        assert_eq!(summary.kept, ["a"]);
        assert_eq!(summary.added, ["c"]);
        assert_eq!(summary.removed, ["b"]);
        assert_eq!(added.len(), 1);
        let after = live.load();
        let a = after.get("a").unwrap();
        assert!(Arc::ptr_eq(a, before.get("a").unwrap()));
        assert_eq!(a.in_flight(), 1, "the request in flight carried over");
        assert!(a.try_acquire().is_some(), "the new limit of 2 applies");
        assert!(before.get("b").unwrap().is_retired());
        assert_eq!(after.serving("x").len(), 1);
        drop(slot);
    }
}
