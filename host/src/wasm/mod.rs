//! The one wasm layer: everything that names a wasmtime type lives here, so
//! wasmtime's API churn lands in this folder and nowhere else. Policies
//! ([`policy`]) and edge workers ([`worker`]) both sit on it.
//!
//! Shared by both: the engines' settings ([`engine`]), the epoch ticker
//! ([`ticker`]), the memory cap ([`limits`]), bounded stores ([`store`]) and
//! compile-and-link with its error messages ([`compile`]).
//!
//! It sits below the policy engine and the data plane and imports neither:
//! what a guest may see (the fleet, the request) is passed in.

pub mod compile;
pub mod engine;
pub mod limits;
pub mod policy;
pub mod store;
pub mod ticker;
pub mod worker;

pub use compile::CompileError;
pub use limits::MemoryCap;
