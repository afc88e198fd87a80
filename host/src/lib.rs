//! Sluice: an OpenAI-compatible gateway for self-hosted GPU fleets whose
//! routing decisions are WebAssembly components.
//!
//! The modules follow a request: [`server`] accepts it, [`openai`] reads
//! what routing needs, [`policy`] runs the guest chain, [`fleet`] and
//! [`backends`] hold the backends, their limits and health ([`health`]
//! probes them, [`reload`] applies config changes), [`proxy`] forwards and
//! streams the answer.

pub mod accounting;
pub mod admin;
pub mod admin_client;
pub mod backends;
pub mod body;
pub mod config;
pub mod console;
pub mod consumers;
pub mod demo;
pub mod deploy;
pub mod deploy_history;
pub mod errors;
pub mod filter;
pub mod fleet;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod mock;
pub mod openai;
pub mod policy;
pub mod proxy;
pub mod recording;
pub mod relay;
pub mod reload;
pub mod replay;
pub mod request_body;
pub mod scaffold;
pub mod server;
pub mod sse;
pub mod stats;
pub mod tokens;
pub mod upstream_error;
pub mod usage;
pub mod usage_sync;
pub mod workers;
