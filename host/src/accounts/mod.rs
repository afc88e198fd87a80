//! Accounts: who is calling ([`consumers`]: API keys, allowed models) and how
//! much they may ([`limits`]: requests and tokens per minute and day,
//! concurrency, reserved on admission and settled when the answer ends).

pub mod consumers;
pub mod limits;
