//! Test guest: a router built against the frozen `sluice:policy@0.1.0`
//! contract, without the SDK, so the host's tests can check that a 0.1
//! component still loads and routes after the contract has moved on.
//!
//! It routes to the LAST backend serving the request's model (model-router
//! would pick by weight and load, so a test can tell the two apart), logs
//! the choice, and rejects with 404 `legacy_model_not_found` when nothing
//! serves the model. No configuration.

wit_bindgen::generate!({
    path: "../../../wit/archive/0.1.0",
    world: "policy",
});

use exports::sluice::policy::request_phase::Guest;
use sluice::policy::fleet;
use sluice::policy::host::{log, Level};
use sluice::policy::types::{Decision, Rejection, Request, Target};

struct LegacyRouter;

impl Guest for LegacyRouter {
    fn on_request(request: Request) -> Decision {
        let Some(last) = fleet::backends_for_model(&request.model).pop() else {
            return Decision::Reject(Rejection {
                status: 404,
                message: format!("The model `{}` does not exist.", request.model),
                code: "legacy_model_not_found".into(),
            });
        };
        log(
            Level::Info,
            &format!("legacy-router: `{}` to {}", request.model, last.name),
        );
        Decision::Route(vec![Target {
            backend: last.name,
            model: None,
        }])
    }
}

export!(LegacyRouter);
