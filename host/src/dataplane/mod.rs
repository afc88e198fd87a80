//! The data plane: what happens to one client request, from the accepted
//! connection ([`server`]) to the last byte of the answer and its usage
//! record.

pub mod accounting;
pub mod body;
pub mod errors;
pub mod filter;
pub mod forward;
pub mod recording;
pub mod request_body;
pub mod server;
pub mod upstream_error;
pub mod workers;
