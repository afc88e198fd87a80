//! End-to-end tests: the real `sluice` binary on 127.0.0.1, simulated GPU
//! backends on ephemeral ports, and a real HTTP client.

mod common;

mod abuse;
mod authoring;
mod cli;
mod consumers;
mod deploy;
mod engine;
mod errors;
mod fleet;
mod guard;
mod hostile;
mod replicas;
mod rollback;
mod routing;
mod streaming;
mod usage;
mod workers;
