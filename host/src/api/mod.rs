//! What the gateway knows of the APIs it speaks, with no state of its own:
//! the OpenAI request and answer shapes it reads and writes ([`openai`]),
//! server-sent events as backends send them ([`sse`]), and counting tokens
//! when a backend reports none ([`tokens`]).

pub mod openai;
pub mod prefix;
pub mod sse;
pub mod tokens;
