//! `builtin:sensitive-words`: blocks or masks listed words and patterns in
//! prompts and in answers.
//!
//! Configuration:
//! ```toml
//! config = { words = ["机密", "project falcon"], patterns = ['\bsk-[a-z0-9]{20,}\b'], action = "mask" }
//! ```
//! - `words`: matched ignoring case, in any script (each character is
//!   lower-cased, so "ÄPFEL" matches "äpfel"); no entry may be empty.
//! - `patterns` (optional): regular expressions in the `regex` crate's
//!   syntax, matched ignoring case.
//! - `scope`: `"request"`, `"response"` or `"both"` (the default).
//! - `action`: `"block"` (the default) rejects the prompt or stops the
//!   answer with `content_filter`; `"mask"` replaces every character of a
//!   hit with `*`.
//! - `pattern_holdback` (default 32): how many characters a pattern match
//!   may span across two chunks of a streamed answer and still be caught.
//!
//! Of a prompt only what people wrote is scanned: `messages[].content`
//! (text or text parts), `prompt` and `input`.

mod matcher;

use serde::Deserialize;
use serde_json::Value;
use sluice_guest::{export_policy, request, Decision, Hooks, Policy, Request, TextDecision};

use crate::matcher::Matcher;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    words: Vec<String>,
    #[serde(default)]
    patterns: Vec<String>,
    #[serde(default)]
    scope: Scope,
    #[serde(default)]
    action: Action,
    #[serde(default = "default_pattern_holdback")]
    pattern_holdback: u32,
}

fn default_pattern_holdback() -> u32 {
    32
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Debug)]
#[serde(rename_all = "lowercase")]
enum Scope {
    Request,
    Response,
    #[default]
    Both,
}

impl Scope {
    fn request(self) -> bool {
        self != Scope::Response
    }

    fn response(self) -> bool {
        self != Scope::Request
    }
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Debug)]
#[serde(rename_all = "lowercase")]
enum Action {
    #[default]
    Block,
    Mask,
}

struct SensitiveWords {
    matcher: Matcher,
    scope: Scope,
    action: Action,
    holdback: u32,
}

/// What the filter makes of a prompt's body.
#[derive(Debug, PartialEq)]
enum Prompt {
    Clean,
    Blocked,
    Masked(String),
    Unreadable,
}

impl Policy for SensitiveWords {
    fn init() -> Result<Self, String> {
        let config: Config = sluice_guest::config()
            .map_err(|e| format!("sensitive-words: invalid configuration: {e}"))?;
        if config.words.is_empty() && config.patterns.is_empty() {
            return Err("sensitive-words: configure at least one of `words` and `patterns`".into());
        }
        let matcher = Matcher::new(&config.words, &config.patterns)
            .map_err(|e| format!("sensitive-words: {e}"))?;
        // A word of n characters spanning two chunks is seen whole when the
        // host holds back n - 1 of them.
        let word_holdback = u32::try_from(matcher.longest_word())
            .unwrap_or(u32::MAX)
            .saturating_sub(1);
        let pattern_holdback = if matcher.has_patterns() {
            config.pattern_holdback
        } else {
            0
        };
        Ok(SensitiveWords {
            matcher,
            scope: config.scope,
            action: config.action,
            holdback: word_holdback.max(pattern_holdback),
        })
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            request: self.scope.request(),
            response_holdback: self.scope.response().then_some(self.holdback),
            failure: false,
        }
    }

    fn on_request(&self, _request: Request) -> Decision {
        if !self.scope.request() {
            return Decision::pass();
        }
        let Some(body) = request::body() else {
            // Letting an uninspected prompt through would make the filter
            // trivially bypassable by padding.
            return Decision::reject(
                413,
                "content_filter",
                "The prompt is too large for the content filter to inspect.",
            );
        };
        match filter_prompt(&self.matcher, self.action, &body) {
            Prompt::Clean => Decision::pass(),
            Prompt::Masked(body) => Decision::pass_with_body(body),
            Prompt::Blocked => {
                Decision::reject(400, "content_filter", "The prompt contains a blocked word.")
            }
            Prompt::Unreadable => Decision::reject(
                400,
                "content_filter",
                "The prompt could not be read by the content filter.",
            ),
        }
    }

    fn on_response_text(
        &self,
        _request: &Request,
        _choice: u32,
        text: &str,
        _last: bool,
    ) -> TextDecision {
        match self.action {
            Action::Block if self.matcher.is_match(text) => TextDecision::stop(
                400,
                "content_filter",
                "The answer contained a blocked word.",
            ),
            Action::Block => TextDecision::Pass,
            Action::Mask => match self.matcher.mask(text) {
                Some(masked) => TextDecision::replace(masked),
                None => TextDecision::Pass,
            },
        }
    }
}

/// Scans the user-visible text of a JSON request body.
fn filter_prompt(matcher: &Matcher, action: Action, body: &str) -> Prompt {
    // The host has parsed the body already, so this only fails if it
    // changed its contract; refusing is safer than skipping the filter.
    let Ok(mut body) = serde_json::from_str::<Value>(body) else {
        return Prompt::Unreadable;
    };
    let mut changed = false;
    for text in visible_text_mut(&mut body) {
        match action {
            Action::Block if matcher.is_match(text) => return Prompt::Blocked,
            Action::Block => {}
            Action::Mask => {
                if let Some(masked) = matcher.mask(text) {
                    *text = masked;
                    changed = true;
                }
            }
        }
    }
    if !changed {
        return Prompt::Clean;
    }
    match serde_json::to_string(&body) {
        Ok(body) => Prompt::Masked(body),
        Err(_) => Prompt::Unreadable,
    }
}

/// The strings of a chat, completion or embedding body that people wrote,
/// as opposed to names, roles and tool arguments.
fn visible_text_mut(body: &mut Value) -> Vec<&mut String> {
    let mut texts = Vec::new();
    let Some(fields) = body.as_object_mut() else {
        return texts;
    };
    for (name, value) in fields.iter_mut() {
        match (name.as_str(), value) {
            ("messages", Value::Array(messages)) => {
                for message in messages {
                    match message.get_mut("content") {
                        Some(Value::String(text)) => texts.push(text),
                        Some(Value::Array(parts)) => {
                            for part in parts {
                                if part.get("type").and_then(Value::as_str) != Some("text") {
                                    continue;
                                }
                                if let Some(Value::String(text)) = part.get_mut("text") {
                                    texts.push(text);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            ("prompt" | "input", Value::String(text)) => texts.push(text),
            ("prompt" | "input", Value::Array(items)) => {
                // Token arrays (numbers) are not text a word list can match.
                texts.extend(items.iter_mut().filter_map(|item| match item {
                    Value::String(text) => Some(text),
                    _ => None,
                }));
            }
            _ => {}
        }
    }
    texts
}

export_policy!(SensitiveWords);

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher() -> Matcher {
        Matcher::new(&["机密".into(), "falcon".into()], &[]).expect("valid test matcher")
    }

    #[test]
    fn chat_messages_and_text_parts_are_masked() {
        let body = r#"{"model":"m","messages":[
            {"role":"system","content":"Project FALCON is 机密."},
            {"role":"user","content":[{"type":"text","text":"about falcon"},
                                      {"type":"image_url","image_url":{"url":"falcon.png"}}]}]}"#;
        let Prompt::Masked(masked) = filter_prompt(&matcher(), Action::Mask, body) else {
            panic!("expected a masked body");
        };
        let masked: Value = serde_json::from_str(&masked).expect("masked body is JSON");
        assert_eq!(masked["model"], "m");
        assert_eq!(masked["messages"][0]["content"], "Project ****** is **.");
        assert_eq!(masked["messages"][1]["content"][0]["text"], "about ******");
        assert_eq!(
            masked["messages"][1]["content"][1]["image_url"]["url"],
            "falcon.png"
        );
    }

    #[test]
    fn prompt_and_input_strings_are_scanned() {
        let m = matcher();
        for body in [
            r#"{"model":"m","prompt":"a falcon"}"#,
            r#"{"model":"m","prompt":["fine","机密"]}"#,
            r#"{"model":"m","input":"Falcon"}"#,
            r#"{"model":"m","input":[[1,2],"falcon"]}"#,
        ] {
            assert_eq!(
                filter_prompt(&m, Action::Block, body),
                Prompt::Blocked,
                "{body}"
            );
        }
    }

    #[test]
    fn other_fields_are_not_scanned() {
        let body = r#"{"model":"falcon","user":"机密","messages":[{"role":"user","name":"falcon","content":"hi"}]}"#;
        assert_eq!(
            filter_prompt(&matcher(), Action::Block, body),
            Prompt::Clean
        );
        assert_eq!(filter_prompt(&matcher(), Action::Mask, body), Prompt::Clean);
    }

    #[test]
    fn a_body_that_is_not_json_is_refused() {
        assert_eq!(
            filter_prompt(&matcher(), Action::Block, "{"),
            Prompt::Unreadable
        );
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let config: Config = serde_json::from_str(r#"{"words":["x"]}"#).expect("minimal config");
        assert_eq!(config.scope, Scope::Both);
        assert_eq!(config.action, Action::Block);
        assert_eq!(config.pattern_holdback, 32);
        assert!(serde_json::from_str::<Config>(r#"{"words":["x"],"wrods":[]}"#).is_err());
        assert!(serde_json::from_str::<Config>(r#"{"scope":"everything"}"#).is_err());
    }
}
