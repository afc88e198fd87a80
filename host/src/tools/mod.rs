//! Developer tools built into the `sluice` binary: the demo ([`demo`]), a
//! simulated GPU engine ([`mock`]), replaying recorded traffic through a
//! policy ([`replay`]), a new policy crate ([`scaffold`]), and the admin
//! API from the command line ([`admin_client`]).

pub mod admin_client;
pub mod demo;
pub mod mock;
pub mod mock_engine;
pub mod replay;
pub mod scaffold;
