//! Write Sluice routing policies in Rust.
//!
//! A policy is a WebAssembly component that the Sluice host runs once per
//! request, in a fresh sandbox, to decide which GPU backend serves it. This
//! crate is everything a policy author touches: the request and fleet types,
//! the [`Policy`] trait, helpers for the common choices, and the
//! [`export_policy!`] macro that turns a type into a component.
//!
//! ```ignore
//! use sluice_guest::{export_policy, fleet, select, Decision, Policy, Request};
//!
//! struct Router;
//!
//! impl Policy for Router {
//!     fn on_request(request: Request) -> Decision {
//!         let backends = fleet::backends_for_model(&request.model);
//!         match select::rank(backends, request.id).first() {
//!             Some(best) => Decision::route_to(&best.name),
//!             None => Decision::reject(503, "no_backend_available", "nothing serves this model"),
//!         }
//!     }
//! }
//!
//! export_policy!(Router);
//! ```
//!
//! Build with `cargo build --target wasm32-wasip2 --release`; the `.wasm` in
//! `target/wasm32-wasip2/release/` is the component to deploy.

// Lets the generated code name this crate the same way from inside and
// from the policy crates that expand `export_policy!`.
extern crate self as sluice_guest;

pub mod fleet;
pub mod log;
pub mod request;
pub mod select;

mod decision;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "policy",
        pub_export_macro: true,
        export_macro_name: "__export_policy_world",
        default_bindings_module: "sluice_guest::bindings",
        runtime_path: "sluice_guest::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

pub use bindings::sluice::policy::types::{
    Backend, Decision, Edits, Endpoint, Rejection, Request, Target,
};

/// A routing policy: implement this and export it with [`export_policy!`].
pub trait Policy {
    /// Decide what happens to one request. Runs before anything is sent to
    /// a backend; see [`Decision`] for the possible answers.
    fn on_request(request: Request) -> Decision;
}

/// The policy's deploy-time configuration (the `config` table of its entry
/// in `sluice.toml`, or the JSON deployed with it), as JSON text.
pub fn config_json() -> String {
    bindings::sluice::policy::host::config()
}

/// The policy's configuration, parsed into `T`.
///
/// The host checks every policy on a trial request when it loads it, so a
/// policy that panics on a configuration error is refused at deploy time
/// rather than failing live requests:
///
/// ```ignore
/// #[derive(serde::Deserialize, Default)]
/// struct Config { aliases: std::collections::HashMap<String, String> }
///
/// let config: Config = sluice_guest::config().expect("invalid configuration");
/// ```
pub fn config<T: serde::de::DeserializeOwned>() -> Result<T, serde_json::Error> {
    serde_json::from_str(&config_json())
}

/// Export a type implementing [`Policy`] as the component's request hook.
///
/// Use it once, at the top level of the policy crate.
#[macro_export]
macro_rules! export_policy {
    ($policy:ident) => {
        impl $crate::bindings::exports::sluice::policy::request_phase::Guest for $policy {
            fn on_request(request: $crate::Request) -> $crate::Decision {
                <$policy as $crate::Policy>::on_request(request)
            }
        }
        $crate::bindings::__export_policy_world!($policy with_types_in $crate::bindings);
    };
}
