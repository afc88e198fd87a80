//! The data plane: what happens to one client request, from the accepted
//! connection ([`server`]) to the last byte of the answer and its usage
//! record. [`pipeline`] reads as an API request's life and calls each step:
//! [`authenticate`] → [`admit`] → route (the policy chain) → [`forward`] →
//! [`respond`] → log ([`accounting`]).

pub mod accounting;
pub mod admit;
pub mod authenticate;
pub mod body;
pub mod errors;
pub mod filter;
pub mod forward;
pub mod pipeline;
pub mod recording;
pub mod request_body;
pub mod respond;
pub mod server;
pub mod upstream_error;
pub mod workers;
