//! Policy guests on the policy engine: the bindings of every contract
//! version the host serves ([`guest`]), compiling, pre-initialising and
//! calling them in bounded instances ([`runtime`]), response-phase
//! instances kept within one answer ([`kept`]), and the contract as the
//! host sees it, whatever version a guest was built against ([`contract`]).
//! The chain that decides which policy runs when is the policy engine
//! (`policy/`), above this layer.

pub mod contract;
mod error;
mod guest;
mod kept;
mod runtime;
mod snapshot;

pub use error::{FailureKind, PolicyError};
pub use guest::CallContext;
pub use kept::{Kept, KeptInstances};
pub use runtime::{Pre, Prepared, Runtime};
