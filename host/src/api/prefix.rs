//! A request's prompt as a chain of block hashes, for prefix-cache affinity.
//!
//! Inference engines keep the KV cache of recent prompts in fixed-size
//! blocks and reuse a block when everything before it matches (vLLM hashes
//! each block together with its parent's hash). The gateway cannot see the
//! engine's tokens, so it estimates the same thing on text: the prompt is
//! written out in a canonical form (the tool definitions, then each chat
//! message's role, name and text in order; or the completions prompt), cut
//! into blocks of `block_bytes` bytes, and each block's hash is chained to
//! the previous one. Two requests share their first `n` hashes exactly when
//! their canonical prompts share their first `n` whole blocks, so a growing
//! conversation finds its earlier turns' blocks, and a tenant's shared system
//! prompt is the same leading blocks for all its users.
//!
//! The trailing partial block is left out: engines only reuse full blocks.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use serde_json::Value;

/// Most blocks hashed for one request; past this a prompt's tail is not
/// indexed (a 16 MiB prompt at the default block size is 65,536 blocks).
pub const MAX_BLOCKS: usize = 65_536;

/// Separators that cannot occur inside JSON-decoded text the same way in
/// two different message layouts (role/name/text of one message, and one
/// message from the next).
const FIELD: &[u8] = &[0x1f];
const RECORD: &[u8] = &[0x1e];

/// A request's prompt as blocks: hashed once when the request is admitted,
/// then read by the policies (`prefix-match`) and credited to the backend
/// that serves it. Empty when prefix indexing is off or there is no prompt.
#[derive(Debug, Clone, Default)]
pub struct PromptBlocks {
    /// The chained block hashes, oldest first (see [`block_hashes`]).
    pub hashes: Arc<[u64]>,
    /// The block size they were cut with.
    pub block_bytes: u32,
}

impl PromptBlocks {
    /// The prompt of `body` cut into `block_bytes` blocks.
    pub fn of(body: &Value, block_bytes: u32) -> PromptBlocks {
        PromptBlocks {
            hashes: block_hashes(body, block_bytes as usize).into(),
            block_bytes,
        }
    }

    /// Full blocks in the prompt.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

/// The chained hashes of the prompt's full blocks, oldest first. Empty when
/// the body has no prompt or it is shorter than one block.
pub fn block_hashes(body: &Value, block_bytes: usize) -> Vec<u64> {
    let mut chain = Chain::new(block_bytes.max(1));
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for key in ["tools", "functions"] {
            if let Some(definitions) = body.get(key).filter(|v| !v.is_null()) {
                chain.push(definitions.to_string().as_bytes());
                chain.push(RECORD);
            }
        }
        for message in messages {
            if chain.full() {
                break;
            }
            write_message(&mut chain, message);
            chain.push(RECORD);
        }
    } else if let Some(prompt) = body.get("prompt") {
        write_prompt(&mut chain, prompt);
    }
    chain.hashes
}

fn write_message(chain: &mut Chain, message: &Value) {
    for key in ["role", "name"] {
        if let Some(text) = message.get(key).and_then(Value::as_str) {
            chain.push(text.as_bytes());
        }
        chain.push(FIELD);
    }
    match message.get("content") {
        Some(Value::String(text)) => chain.push(text.as_bytes()),
        Some(Value::Array(parts)) => {
            for part in parts {
                if let Some(text) = part.get("text").and_then(Value::as_str) {
                    chain.push(text.as_bytes());
                }
                chain.push(FIELD);
            }
        }
        _ => {}
    }
    if let Some(calls) = message.get("tool_calls").filter(|v| !v.is_null()) {
        chain.push(FIELD);
        chain.push(calls.to_string().as_bytes());
    }
}

/// A completions `prompt`: a string, or the first of an array of strings
/// (a batch of prompts shares no prefix the engine could reuse as one).
fn write_prompt(chain: &mut Chain, prompt: &Value) {
    match prompt {
        Value::String(text) => chain.push(text.as_bytes()),
        Value::Array(items) => match items.first() {
            Some(Value::String(text)) => chain.push(text.as_bytes()),
            // Token ids: hash them as their decimal text.
            Some(Value::Number(_)) => {
                for id in items {
                    chain.push(id.to_string().as_bytes());
                    chain.push(FIELD);
                }
            }
            _ => {}
        },
        _ => {}
    }
}

/// Cuts pushed bytes into blocks and chains their hashes.
struct Chain {
    block_bytes: usize,
    /// The current block's bytes so far.
    pending: Vec<u8>,
    hashes: Vec<u64>,
}

impl Chain {
    fn new(block_bytes: usize) -> Chain {
        Chain {
            block_bytes,
            pending: Vec::with_capacity(block_bytes),
            hashes: Vec::new(),
        }
    }

    fn full(&self) -> bool {
        self.hashes.len() >= MAX_BLOCKS
    }

    fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.full() {
            let take = (self.block_bytes - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == self.block_bytes {
                let parent = self.hashes.last().copied().unwrap_or(0);
                self.hashes.push(hash_block(parent, &self.pending));
                self.pending.clear();
            }
        }
    }
}

/// A fixed-key hasher (SipHash with zero keys), so one build hashes a block
/// the same way in every process: replay files and tests can rely on it.
/// The index itself lives in one replica's memory, so builds that hash
/// differently never compare hashes.
fn hash_block(parent: u64, block: &[u8]) -> u64 {
    let mut hasher = FixedState.build_hasher();
    hasher.write_u64(parent);
    hasher.write(block);
    hasher.finish()
}

struct FixedState;

impl BuildHasher for FixedState {
    type Hasher = std::hash::DefaultHasher;

    fn build_hasher(&self) -> Self::Hasher {
        std::hash::DefaultHasher::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(messages: &[(&str, &str)]) -> Value {
        let messages: Vec<Value> = messages
            .iter()
            .map(|(role, content)| json!({"role": role, "content": content}))
            .collect();
        json!({"model": "m", "messages": messages})
    }

    #[test]
    fn a_growing_conversation_keeps_its_earlier_blocks() {
        let system = "You are a careful assistant. ".repeat(40);
        let turn1 = chat(&[("system", &system), ("user", "What is a KV cache?")]);
        let turn2 = chat(&[
            ("system", &system),
            ("user", "What is a KV cache?"),
            (
                "assistant",
                &"It keeps attention keys and values. ".repeat(10),
            ),
            ("user", "And prefix caching?"),
        ]);
        let first = block_hashes(&turn1, 64);
        let second = block_hashes(&turn2, 64);
        assert!(first.len() >= 18, "{}", first.len());
        assert!(second.len() > first.len());
        // All of turn 1's full blocks but the last (which ends mid-way into
        // what turn 2 appends after it) are turn 2's first blocks.
        let shared = first
            .iter()
            .zip(&second)
            .take_while(|(a, b)| a == b)
            .count();
        assert!(shared >= first.len() - 1, "{shared} of {}", first.len());
    }

    #[test]
    fn a_different_system_prompt_shares_nothing_after_it_differs() {
        let a = block_hashes(&chat(&[("system", &"a".repeat(1000))]), 100);
        let b = block_hashes(&chat(&[("system", &format!("b{}", "a".repeat(999)))]), 100);
        assert_eq!(a.len(), b.len());
        assert!(
            a.iter().zip(&b).all(|(x, y)| x != y),
            "chained: one byte changes every later block"
        );
    }

    #[test]
    fn the_layout_of_messages_matters_not_just_the_text() {
        // The same characters split differently between messages.
        let a = block_hashes(&chat(&[("user", "ab"), ("user", &"c".repeat(200))]), 16);
        let b = block_hashes(
            &chat(&[("user", "a"), ("user", &format!("b{}", "c".repeat(200)))]),
            16,
        );
        assert_ne!(a[0], b[0]);
    }

    #[test]
    fn completions_prompts_and_short_prompts() {
        let long = json!({"model": "m", "prompt": "x".repeat(1000)});
        assert_eq!(
            block_hashes(&long, 256).len(),
            3,
            "the partial tail is left out"
        );
        let batch = json!({"model": "m", "prompt": ["x".repeat(1000), "y"]});
        assert_eq!(block_hashes(&batch, 256), block_hashes(&long, 256));
        assert!(block_hashes(&json!({"model": "m", "prompt": "hi"}), 256).is_empty());
        assert!(block_hashes(&json!({"model": "m", "input": "x".repeat(999)}), 16).is_empty());
        let ids = json!({"model": "m", "prompt": (0..400).collect::<Vec<u32>>()});
        assert!(!block_hashes(&ids, 64).is_empty());
    }

    #[test]
    fn hashes_are_deterministic() {
        let hashes = block_hashes(&json!({"prompt": "0123456789abcdef"}), 16);
        assert_eq!(hashes, vec![hash_block(0, b"0123456789abcdef")]);
        assert_eq!(
            hashes[0],
            block_hashes(&json!({"prompt": "0123456789abcdef"}), 16)[0]
        );
    }

    #[test]
    fn huge_prompts_stop_at_the_block_limit() {
        let body = json!({"prompt": "z".repeat(MAX_BLOCKS * 4 + 100)});
        assert_eq!(block_hashes(&body, 2).len(), MAX_BLOCKS);
    }
}
