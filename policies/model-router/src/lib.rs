//! `builtin:model-router`: sends each request to a backend that serves its
//! model, spread by weight and live load.
//!
//! Configuration (all optional):
//! ```toml
//! config = { aliases = { "glm4" = "glm4-9b" } }
//! ```
//! `aliases` maps a public model name to the name the backends serve; the
//! backend receives the resolved name.

use std::collections::HashMap;

use serde::Deserialize;
use sluice_guest::{export_policy, fleet, select, Decision, Policy, Request, Target};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    aliases: HashMap<String, String>,
}

struct ModelRouter {
    config: Config,
}

impl Policy for ModelRouter {
    fn init() -> Result<Self, String> {
        let config = sluice_guest::config()
            .map_err(|e| format!("model-router: invalid configuration: {e}"))?;
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
        let ranked = select::rank(serving.clone(), request.id);
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
