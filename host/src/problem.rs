//! What an error that reaches a client says about itself, whichever module
//! it comes from: its HTTP status, its machine-readable code, when to retry,
//! and which request field was at fault. Each module's error implements
//! [`Problem`]; the one renderer (`api::render`) writes it in the shape
//! of the API the request came in on.

use http::StatusCode;

pub trait Problem: std::error::Error {
    /// The HTTP status of the answer.
    fn status(&self) -> StatusCode;
    /// The machine-readable `code` of the error body.
    fn code(&self) -> &str;
    /// Seconds a client should wait before trying again (`Retry-After`).
    fn retry_after(&self) -> Option<u64> {
        None
    }
    /// The request field at fault (`param`).
    fn param(&self) -> Option<&'static str> {
        None
    }
    /// The error's `type` when whoever failed named one (a backend's own);
    /// `None`: the API's shape derives it from the status.
    fn kind(&self) -> Option<&str> {
        None
    }
}
