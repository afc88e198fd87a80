//! `builtin:model-router`: sends each request to a backend that serves its
//! model, scored on everything the host can see: the gateway's in-flight
//! counts, limits and weights; the engines' queues, KV-cache use and LoRA
//! adapters where an `engine` is configured; and which backend probably
//! holds the prompt's prefix in its cache (see [`select::Scorer`]).
//!
//! Configuration (all optional):
//! ```toml
//! config = { aliases = { "glm4" = "glm4-9b" }, scoring = { queue_weight = 2.0 } }
//! ```
//! `aliases` maps a public model name to the name the backends serve; the
//! backend receives the resolved name. `scoring` sets the scorer's weights
//! and thresholds: `queue_weight`, `kv_threshold`, `kv_weight`,
//! `unknown_penalty`, `prefix_affinity`, `affinity_slack`,
//! `affinity_slack_ratio`, `min_prefix_blocks`, `adapter_penalty`,
//! `adapter_room_penalty` (meanings and defaults in the README and at
//! `sluice_guest::select::Scorer`).

use std::collections::HashMap;

use serde::Deserialize;
use sluice_guest::select::{Candidate, Scorer};
use sluice_guest::{export_policy, fleet, Decision, Policy, Request, Target};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    aliases: HashMap<String, String>,
    #[serde(default)]
    scoring: Scorer,
}

struct ModelRouter {
    config: Config,
}

impl Policy for ModelRouter {
    fn init() -> Result<Self, String> {
        let config: Config = sluice_guest::config()
            .map_err(|e| format!("model-router: invalid configuration: {e}"))?;
        config
            .scoring
            .validate()
            .map_err(|e| format!("model-router: invalid configuration: scoring.{e}"))?;
        Ok(ModelRouter { config })
    }

    fn on_request(&self, request: Request) -> Decision {
        let alias = self.config.aliases.get(&request.model);
        let model = alias.unwrap_or(&request.model);

        let serving = fleet::backends_for_model(model);
        if serving.is_empty() {
            return Decision::reject(
                404,
                "model_not_found",
                format!("The model `{}` does not exist.", request.model),
            );
        }
        let candidates = Candidate::read_all(serving.clone());
        let ranked: Vec<_> = self
            .config
            .scoring
            .rank(candidates, model, request.id)
            .into_iter()
            .map(|c| c.backend)
            .collect();
        // Every server of the model is down: route to them anyway. The host
        // sends nothing to a backend marked down, but the failure hooks
        // hear of each — so a `fallback` policy can move the request to
        // another model; without one the client gets 503.
        let ranked = if ranked.is_empty() { serving } else { ranked };
        let targets = ranked
            .iter()
            .map(|b| match alias {
                Some(resolved) => Target::with_model(&b.name, resolved),
                None => Target::new(&b.name),
            })
            .collect();
        Decision::route(targets)
    }
}

export_policy!(ModelRouter);
