//! What the gateway knows of the APIs it speaks, with no state of its own:
//! the OpenAI request and answer shapes it reads and writes ([`openai`]),
//! server-sent events as backends send them ([`sse`]), and counting tokens
//! when a backend reports none ([`tokens`]), and bearer tokens as clients
//! present them ([`bearer`]).

pub mod bearer;
pub mod openai;
pub mod sse;
pub mod tokens;
