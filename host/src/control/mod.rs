//! The control plane, beside the data plane and never in a request's way:
//! the admin API ([`admin`]), hot deploys of policies ([`deploy`]), live
//! config reload ([`reload`]) and the operator console ([`console`]).

pub mod admin;
pub mod console;
pub mod deploy;
mod node;
pub mod reload;

pub use node::Node;
