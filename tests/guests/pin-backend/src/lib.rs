//! Test guest: routes to the backend named in the `x-pin-backend` header, or
//! the one named like the request's consumer, or the configured `default`;
//! rewrites the model when `x-pin-model` is set,
//! and rejects with 418 when the body's `user` is "teapot" — so a test can
//! observe headers, body, config, fleet and every kind of decision.
//! `x-pin-backend` may list several backends (`vm01,vm02`): they are the
//! targets, in order. `x-not-idempotent` marks the request not idempotent.

use serde::Deserialize;
use sluice_guest::{export_policy, fleet, log, request, Decision, Policy, Request, Target};

#[derive(Deserialize)]
struct Config {
    default: String,
}

#[derive(Deserialize)]
struct Body {
    user: Option<String>,
}

struct PinBackend {
    config: Config,
}

impl Policy for PinBackend {
    fn init() -> Result<Self, String> {
        let config = sluice_guest::config().map_err(|e| format!("config needs `default`: {e}"))?;
        Ok(PinBackend { config })
    }

    fn on_request(&self, req: Request) -> Decision {
        if request::header("authorization").is_some() {
            return Decision::reject(500, "credential_leak", "the host showed a credential");
        }
        if let Some(Body { user: Some(user) }) = request::body_json::<Body>() {
            if user == "teapot" {
                return Decision::reject(418, "teapot", "short and stout");
            }
        }
        let tenant = req
            .consumer
            .clone()
            .filter(|c| fleet::backends().iter().any(|b| &b.name == c));
        let backend = request::header("x-pin-backend")
            .or(tenant)
            .unwrap_or_else(|| self.config.default.clone());
        if !fleet::backends()
            .iter()
            .any(|b| backend.split(',').any(|n| n.trim() == b.name))
        {
            log::warn(&format!("no backend named {backend}; routing anyway"));
        }
        if request::header("x-not-idempotent").is_some() {
            request::not_idempotent();
        }
        let targets = backend.split(',').map(str::trim);
        match request::header("x-pin-model") {
            Some(model) => {
                Decision::route(targets.map(|b| Target::with_model(b, &model)).collect())
            }
            None if req.model.is_empty() => Decision::reject(400, "empty_model", "empty"),
            None => Decision::route(targets.map(Target::new).collect()),
        }
    }
}

export_policy!(PinBackend);
