//! Step 1, authenticate: who is calling. A key that is missing (when auth is
//! required), unknown or disabled is refused here, before the body is read.

use std::sync::Arc;

use http::header;
use http::request::Parts;

use super::server::Playground;
use crate::accounts::consumers::{AuthError, Consumer, Consumers, Identity};
use crate::metrics::metrics;

/// The calling consumer, or `None` for an anonymous caller (auth off) and
/// for the console's playground, which the admin token already let in.
pub fn caller(consumers: &Consumers, parts: &Parts) -> Result<Option<Arc<Consumer>>, AuthError> {
    if parts.extensions.get::<Playground>().is_some() {
        return Ok(None);
    }
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match consumers.identify(authorization) {
        Ok(Identity::Known(consumer)) => Ok(Some(consumer)),
        Ok(Identity::Anonymous) => Ok(None),
        Err(e) => {
            let (consumer, code) = match &e {
                AuthError::Disabled(name) => (name.as_str(), "consumer_disabled"),
                AuthError::Missing | AuthError::Invalid => ("", "invalid_api_key"),
            };
            metrics().refusal(consumer, code);
            Err(e)
        }
    }
}
