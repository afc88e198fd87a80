//! Write to the host's log; lines are tagged with the policy's name.

use crate::bindings::sluice::policy::host::{log, Level};

/// Log at debug level.
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Log at info level.
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Log at warn level.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Log at error level.
pub fn error(message: &str) {
    log(Level::Error, message);
}
