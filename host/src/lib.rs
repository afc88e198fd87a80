//! Sluice: an OpenAI-compatible gateway for self-hosted GPU fleets whose
//! routing decisions are WebAssembly components.
//!
//! Folders show the architecture, and imports run one way, from the top of
//! this list to the bottom (no module imports one above it):
//!
//! - [`tools`]: the developer tools — demo, mock GPU engine, replay,
//!   scaffold, the admin API's command-line client.
//! - [`control`]: the control plane — admin API, hot deploys, config reload,
//!   operator console.
//! - [`dataplane`]: a request's life, as named steps ([`dataplane::server`]
//!   accepts it; authenticate → admit → route → forward → respond → log).
//! - [`workers`]: edge workers, `wasi:http` components mounted on routes.
//! - [`policy`]: the policy engine — the guest chain and its contract.
//! - [`wasm`]: the one wasm layer under policies and workers — engines,
//!   epoch ticker, memory caps, compile-and-link, the guests' bindings; the
//!   only module that names a type of the WebAssembly runtime.
//! - [`accounts`]: consumers, their keys and limits. [`usage`]: the usage
//!   ledger (SQLite, shared between replicas through Redis).
//! - [`fleet`]: the backends, their live state, health and statistics.
//! - [`api`]: what the gateway knows of the APIs it speaks (OpenAI bodies,
//!   server-sent events, token counts).
//! - [`metrics`], [`problem`], [`text`], [`deploy_history`], [`store`] (the
//!   state directory replicas share), [`config`],
//!   [`bundled`]: shared at the bottom.

pub mod accounts;
pub mod api;
pub mod bundled;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod deploy_history;
pub mod fleet;
pub mod metrics;
pub mod policy;
pub mod problem;
pub mod store;
pub mod text;
pub mod tools;
pub mod usage;
pub mod wasm;
