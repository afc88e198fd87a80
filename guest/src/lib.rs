//! Write Sluice routing policies in Rust.
//!
//! A policy is a WebAssembly component that the Sluice host runs once per
//! request, in a fresh sandbox, to decide which GPU backend serves it. This
//! crate is everything a policy author touches: the request and fleet types,
//! the [`Policy`] trait, helpers for the common choices, and the
//! [`export_policy!`] macro that turns a type into a component.
//!
//! ```no_run
//! use sluice_guest::{export_policy, fleet, select, Decision, Policy, Request};
//!
//! struct Router;
//!
//! impl Policy for Router {
//!     fn init() -> Result<Self, String> {
//!         Ok(Router)
//!     }
//!
//!     fn on_request(&self, request: Request) -> Decision {
//!         let backends = fleet::backends_for_model(&request.model);
//!         match select::rank(backends, request.id).first() {
//!             Some(best) => Decision::route_to(&best.name),
//!             None => Decision::reject(503, "no_backend_available", "nothing serves this model"),
//!         }
//!     }
//! }
//!
//! export_policy!(Router);
//! # fn main() {}
//! ```
//!
//! Every example in this documentation is compiled (and, where it needs
//! nothing from the host, run) by `cargo test -p sluice-guest`.
//!
//! ## Life of a policy
//! When the host loads a policy it calls [`Policy::init`] once, then takes a
//! snapshot of the instance. Every request runs in a fresh copy of that
//! snapshot: whatever `init` built (a parsed config, a word automaton) is
//! there at no cost, and nothing a request changes survives it.
//!
//! The hooks, in the order a request meets them:
//! - [`Policy::on_request`]: route, reject or pass on (every policy);
//! - [`Policy::on_failure`]: a backend failed before the client saw a byte
//!   (only if [`Policy::hooks`] sets `failure`);
//! - [`Policy::on_response_text`]: the answer's text, as it streams (only if
//!   [`Policy::hooks`] sets `response_holdback`).
//!
//! Build with `cargo build --target wasm32-wasip2 --release`; the `.wasm` in
//! `target/wasm32-wasip2/release/` is the component to deploy.

// Lets the generated code name this crate the same way from inside and
// from the policy crates that expand `export_policy!`.
extern crate self as sluice_guest;

pub mod engine;
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
    Backend, Decision, Edits, Endpoint, Failure, FailureDecision, FailureKind, Hooks, Rejection,
    Request, Target, TextDecision,
};
pub use engine::{EngineSignals, PrefixBlocks};

/// A policy: implement this and export it with [`export_policy!`]. Only
/// [`Policy::init`] is required; every hook has a default that does nothing.
pub trait Policy: Sized + 'static {
    /// Builds the policy's state, once, when the host loads it: read the
    /// configuration ([`config`]), build lookup tables. An error refuses the
    /// deploy with its message.
    ///
    /// ```no_run
    /// use std::collections::HashMap;
    /// use sluice_guest::{export_policy, Policy};
    ///
    /// /// `config = { aliases = { gpt-4o = "qwen2.5-72b" } }` in sluice.toml.
    /// #[derive(serde::Deserialize)]
    /// struct Config {
    ///     aliases: HashMap<String, String>,
    /// }
    ///
    /// struct Aliases(Config);
    ///
    /// impl Policy for Aliases {
    ///     fn init() -> Result<Self, String> {
    ///         let config: Config = sluice_guest::config().map_err(|e| e.to_string())?;
    ///         if config.aliases.is_empty() {
    ///             return Err("config.aliases: name at least one alias".into());
    ///         }
    ///         Ok(Aliases(config))
    ///     }
    /// }
    ///
    /// export_policy!(Aliases);
    /// # fn main() {}
    /// ```
    fn init() -> Result<Self, String>;

    /// Which hooks the host should call. The default is `on_request` only;
    /// a policy that only filters answers or handles failures turns
    /// `request` off and costs nothing in the request phase.
    ///
    /// ```
    /// use sluice_guest::{Hooks, Policy};
    ///
    /// /// Filters answers only: no request-phase call at all.
    /// struct Filter;
    ///
    /// impl Policy for Filter {
    ///     fn init() -> Result<Self, String> {
    ///         Ok(Filter)
    ///     }
    ///
    ///     fn hooks(&self) -> Hooks {
    ///         Hooks {
    ///             request: false,
    ///             // The longest word we look for, minus one.
    ///             response_holdback: Some(31),
    ///             failure: false,
    ///         }
    ///     }
    /// }
    ///
    /// assert!(!Filter.hooks().request);
    /// ```
    fn hooks(&self) -> Hooks {
        Hooks {
            request: true,
            response_holdback: None,
            failure: false,
        }
    }

    /// Decide what happens to one request, before anything is sent to a
    /// backend. The default passes it on to the next policy.
    ///
    /// Keep the choice in a plain function of its inputs and it can be
    /// tested natively, without a host:
    ///
    /// ```
    /// use sluice_guest::{fleet, select, Backend, Decision, Endpoint, Policy, Request};
    ///
    /// struct Tenants;
    ///
    /// /// Team `batch` goes to the batch pool; everyone else to the best
    /// /// backend for the model.
    /// fn choose(request: &Request, backends: Vec<Backend>) -> Decision {
    ///     if request.consumer.as_deref() == Some("batch") {
    ///         return Decision::route_to("batch-pool");
    ///     }
    ///     match select::rank(backends, request.id).first() {
    ///         Some(best) => Decision::route_to(&best.name),
    ///         None => Decision::reject(503, "no_backend_available", "nothing serves this model"),
    ///     }
    /// }
    ///
    /// impl Policy for Tenants {
    ///     fn init() -> Result<Self, String> {
    ///         Ok(Tenants)
    ///     }
    ///
    ///     fn on_request(&self, request: Request) -> Decision {
    ///         let backends = fleet::backends_for_model(&request.model);
    ///         choose(&request, backends)
    ///     }
    /// }
    ///
    /// let request = Request {
    ///     id: 7,
    ///     endpoint: Endpoint::ChatCompletions,
    ///     path: "/v1/chat/completions".into(),
    ///     model: "qwen2.5-7b".into(),
    ///     stream: false,
    ///     consumer: Some("batch".into()),
    ///     body_size: 120,
    /// };
    /// assert!(matches!(choose(&request, vec![]), Decision::Route(t) if t[0].backend == "batch-pool"));
    /// let anonymous = Request { consumer: None, ..request };
    /// assert!(matches!(choose(&anonymous, vec![]), Decision::Reject(r) if r.status == 503));
    /// ```
    fn on_request(&self, request: Request) -> Decision {
        let _ = request;
        Decision::pass()
    }

    /// Filter the answer's text for choice `choice`. For a stream, `text` is
    /// what was held back last time followed by the new chunk's text, and
    /// the host keeps the last `response_holdback` characters of what you
    /// return for the next call; `last` is true on the final call. Called
    /// only when [`Policy::hooks`] sets `response_holdback`. The calls for
    /// one answer may run on one instance or on fresh ones: keep no state
    /// between them.
    ///
    /// ```
    /// use sluice_guest::{Endpoint, Hooks, Policy, Request, TextDecision};
    ///
    /// /// Masks one word in answers; stops the answer on another.
    /// struct Mask;
    ///
    /// impl Policy for Mask {
    ///     fn init() -> Result<Self, String> {
    ///         Ok(Mask)
    ///     }
    ///
    ///     fn hooks(&self) -> Hooks {
    ///         // "password" is 8 characters: hold back 7 so it is seen whole
    ///         // even when it arrives split over two chunks.
    ///         Hooks { request: false, response_holdback: Some(7), failure: false }
    ///     }
    ///
    ///     fn on_response_text(&self, _: &Request, _: u32, text: &str, _: bool) -> TextDecision {
    ///         if text.contains("rm -rf /") {
    ///             TextDecision::stop(400, "content_filter", "The answer was stopped.")
    ///         } else if text.contains("password") {
    ///             TextDecision::replace(text.replace("password", "********"))
    ///         } else {
    ///             TextDecision::Pass
    ///         }
    ///     }
    /// }
    ///
    /// let request = Request {
    ///     id: 1,
    ///     endpoint: Endpoint::ChatCompletions,
    ///     path: "/v1/chat/completions".into(),
    ///     model: "m".into(),
    ///     stream: true,
    ///     consumer: None,
    ///     body_size: 60,
    /// };
    /// let masked = Mask.on_response_text(&request, 0, "the password is", false);
    /// assert!(matches!(masked, TextDecision::Replace(t) if t == "the ******** is"));
    /// assert!(matches!(Mask.on_response_text(&request, 0, "hello", true), TextDecision::Pass));
    /// ```
    fn on_response_text(
        &self,
        request: &Request,
        choice: u32,
        text: &str,
        last: bool,
    ) -> TextDecision {
        let _ = (request, choice, text, last);
        TextDecision::Pass
    }

    /// A backend failed before any byte reached the client: go on with the
    /// remaining targets, retry elsewhere (another model makes it a
    /// fallback), or give up. Called only when [`Policy::hooks`] sets
    /// `failure`. Forgetting that is caught at deploy: the host calls this
    /// once on a trial connect failure, and refuses a policy that answers
    /// anything but [`FailureDecision::Next`] without declaring the hook.
    ///
    /// ```
    /// use sluice_guest::{
    ///     Endpoint, Failure, FailureDecision, FailureKind, Hooks, Policy, Request, Target,
    /// };
    ///
    /// /// When `qwen2-1-5b` fails with a 5xx and nothing else serves it,
    /// /// `gemma-2-2b` on `vm02` answers instead.
    /// struct Fallback;
    ///
    /// impl Policy for Fallback {
    ///     fn init() -> Result<Self, String> {
    ///         Ok(Fallback)
    ///     }
    ///
    ///     fn hooks(&self) -> Hooks {
    ///         Hooks { request: false, response_holdback: None, failure: true }
    ///     }
    ///
    ///     fn on_failure(&self, request: &Request, failure: &Failure) -> FailureDecision {
    ///         let server_error = failure.kind != FailureKind::Status || failure.status >= 500;
    ///         if !failure.remaining.is_empty() || !server_error {
    ///             return FailureDecision::Next;
    ///         }
    ///         match request.model.as_str() {
    ///             "qwen2-1-5b" => FailureDecision::retry(vec![Target::with_model("vm02", "gemma-2-2b")]),
    ///             _ => FailureDecision::GiveUp,
    ///         }
    ///     }
    /// }
    ///
    /// let request = Request {
    ///     id: 3,
    ///     endpoint: Endpoint::ChatCompletions,
    ///     path: "/v1/chat/completions".into(),
    ///     model: "qwen2-1-5b".into(),
    ///     stream: false,
    ///     consumer: None,
    ///     body_size: 80,
    /// };
    /// let failure = Failure {
    ///     backend: "vm01".into(),
    ///     model: "qwen2-1-5b".into(),
    ///     kind: FailureKind::Status,
    ///     status: 503,
    ///     attempt: 1,
    ///     remaining: vec![],
    /// };
    /// match Fallback.on_failure(&request, &failure) {
    ///     FailureDecision::Retry(targets) => {
    ///         assert_eq!(targets[0].model.as_deref(), Some("gemma-2-2b"))
    ///     }
    ///     _ => panic!("expected a fallback"),
    /// }
    /// ```
    fn on_failure(&self, request: &Request, failure: &Failure) -> FailureDecision {
        let _ = (request, failure);
        FailureDecision::Next
    }
}

/// Holds the exported policy's state. Guests are single-threaded, so a
/// plain cell is enough; `export_policy!` puts one in a static.
#[doc(hidden)]
pub struct Instance<P>(std::cell::UnsafeCell<Option<P>>);

// SAFETY: a component instance runs on one thread and never re-enters its
// own exports, so the cell is never accessed concurrently.
unsafe impl<P> Sync for Instance<P> {}

impl<P: Policy> Instance<P> {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Instance(std::cell::UnsafeCell::new(None))
    }

    /// The policy, built by `init` on first use (the host normally runs
    /// `init` before snapshotting, so this is already done).
    pub fn get(&self) -> Result<&P, String> {
        // SAFETY: see `Sync` above; the reference never outlives one export call.
        let slot = unsafe { &mut *self.0.get() };
        if slot.is_none() {
            *slot = Some(P::init()?);
        }
        Ok(slot.as_ref().expect("just set"))
    }

    /// [`Instance::get`] for the hooks, where an `init` error can only trap.
    pub fn policy(&self) -> &P {
        self.get()
            .unwrap_or_else(|e| panic!("policy init failed: {e}"))
    }
}

/// The policy's deploy-time configuration (the `config` table of its entry
/// in `sluice.toml`, or the JSON deployed with it), as JSON text.
pub fn config_json() -> String {
    bindings::sluice::policy::host::config()
}

/// The policy's configuration, parsed into `T`.
///
/// Read it in [`Policy::init`], so a bad configuration refuses the deploy
/// instead of failing requests (example at [`Policy::init`]).
pub fn config<T: serde::de::DeserializeOwned>() -> Result<T, serde_json::Error> {
    serde_json::from_str(&config_json())
}

/// Export a type implementing [`Policy`] as the component's hooks.
///
/// Use it once, at the top level of the policy crate.
#[macro_export]
macro_rules! export_policy {
    ($policy:ident) => {
        static __SLUICE_POLICY: $crate::Instance<$policy> = $crate::Instance::new();

        impl $crate::bindings::exports::sluice::policy::lifecycle::Guest for $policy {
            fn init() -> Result<$crate::Hooks, String> {
                __SLUICE_POLICY.get().map(|p| <$policy as $crate::Policy>::hooks(p))
            }
        }

        impl $crate::bindings::exports::sluice::policy::request_phase::Guest for $policy {
            fn on_request(request: $crate::Request) -> $crate::Decision {
                <$policy as $crate::Policy>::on_request(__SLUICE_POLICY.policy(), request)
            }
        }

        impl $crate::bindings::exports::sluice::policy::response_phase::Guest for $policy {
            fn on_response_text(request: $crate::Request, choice: u32, text: String, last: bool) -> $crate::TextDecision {
                <$policy as $crate::Policy>::on_response_text(__SLUICE_POLICY.policy(), &request, choice, &text, last)
            }
        }

        impl $crate::bindings::exports::sluice::policy::failure_phase::Guest for $policy {
            fn on_failure(request: $crate::Request, failure: $crate::Failure) -> $crate::FailureDecision {
                <$policy as $crate::Policy>::on_failure(__SLUICE_POLICY.policy(), &request, &failure)
            }
        }

        $crate::bindings::__export_policy_world!($policy with_types_in $crate::bindings);
    };
}
