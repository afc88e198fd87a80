//! `builtin:fallback`: when a backend fails before the client has seen a
//! byte of the answer, tries the model's other backends, then the
//! configured fallback models in order.
//!
//! Configuration:
//! ```toml
//! config = { fallbacks = { "qwen2-1-5b" = ["gemma-2-2b", "tinyllama"] }, on_status = [502, 503] }
//! ```
//! - `fallbacks`: for a requested model, the models to try, in order, once
//!   its own backends have failed. The backend receives the fallback
//!   model's name. Chains do not continue into the fallbacks' own entries.
//! - `on_status` (optional): the HTTP statuses, 400..=599, that count as a
//!   failure worth retrying; by default every 5xx.
//! - `on_connect_failure` (default true): whether a refused connection, a
//!   timeout or a connection broken before the answer count too.
//! - `retry_other_backends` (default true): try the backends the host has
//!   left for the failed model before moving to the next fallback model.
//!
//! Any other failure is sent to the client as it is.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;
use sluice_guest::{
    export_policy, fleet, log, select, Backend, Failure, FailureDecision, FailureKind, Hooks,
    Policy, Request, Target,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    fallbacks: HashMap<String, Vec<String>>,
    on_status: Option<Vec<u16>>,
    #[serde(default = "enabled")]
    on_connect_failure: bool,
    #[serde(default = "enabled")]
    retry_other_backends: bool,
}

fn enabled() -> bool {
    true
}

impl Config {
    fn validate(&self) -> Result<(), String> {
        for status in self.on_status.iter().flatten() {
            if !(400..=599).contains(status) {
                return Err(format!(
                    "`on_status` has {status}, which is not an error status (400..=599)"
                ));
            }
        }
        for (model, fallbacks) in &self.fallbacks {
            if model.is_empty() {
                return Err("`fallbacks` has an empty model name".into());
            }
            // A model twice in one chain would send the walk back to an
            // earlier position, and round it could go until the host's
            // attempt limit.
            let mut seen = HashSet::from([model.as_str()]);
            for fallback in fallbacks {
                if fallback.is_empty() {
                    return Err(format!("`fallbacks.{model}` has an empty model name"));
                }
                if !seen.insert(fallback.as_str()) {
                    return Err(format!("`fallbacks.{model}` names `{fallback}` twice"));
                }
            }
        }
        Ok(())
    }

    /// Whether this failure is one the configuration wants retried.
    fn triggers(&self, failure: &Failure) -> bool {
        match failure.kind {
            FailureKind::Connect | FailureKind::Timeout | FailureKind::Broken => {
                self.on_connect_failure
            }
            FailureKind::Status => match &self.on_status {
                Some(statuses) => statuses.contains(&failure.status),
                None => (500..=599).contains(&failure.status),
            },
        }
    }
}

struct Fallback {
    config: Config,
}

impl Policy for Fallback {
    fn init() -> Result<Self, String> {
        let config: Config =
            sluice_guest::config().map_err(|e| format!("fallback: invalid configuration: {e}"))?;
        config.validate().map_err(|e| format!("fallback: {e}"))?;
        Ok(Fallback { config })
    }

    fn hooks(&self) -> Hooks {
        // Failures only: the request phase never instantiates this policy.
        Hooks {
            request: false,
            response_holdback: None,
            failure: true,
        }
    }

    fn on_failure(&self, request: &Request, failure: &Failure) -> FailureDecision {
        let decision = decide(&self.config, request, failure, fleet::backends_for_model);
        if let FailureDecision::Retry(targets) = &decision {
            if let Some(model) = targets.first().and_then(|t| t.model.as_deref()) {
                log::info(&format!(
                    "`{}` failed on {} ({}); falling back to `{model}` on {} backend(s)",
                    failure.model,
                    failure.backend,
                    describe(failure),
                    targets.len(),
                ));
            }
        }
        decision
    }
}

/// The decision for one failure, with the fleet lookup passed in so that
/// the logic runs without a host.
fn decide(
    config: &Config,
    request: &Request,
    failure: &Failure,
    mut serving: impl FnMut(&str) -> Vec<Backend>,
) -> FailureDecision {
    if !config.triggers(failure) {
        return FailureDecision::GiveUp;
    }
    if config.retry_other_backends && !failure.remaining.is_empty() {
        return FailureDecision::Next;
    }
    let fallbacks = config
        .fallbacks
        .get(&request.model)
        .map_or(&[][..], Vec::as_slice);
    // Each attempt gets its own draw, so a retry does not land on the
    // backend the same seed favoured last time.
    let seed = request.id.wrapping_add(u64::from(failure.attempt));
    for model in next_models(&request.model, fallbacks, &failure.model) {
        let ranked = select::rank(serving(model), seed);
        if !ranked.is_empty() {
            let targets = ranked
                .iter()
                .map(|b| Target::with_model(&b.name, model))
                .collect();
            return FailureDecision::retry(targets);
        }
    }
    FailureDecision::GiveUp
}

/// The models left to try in the chain `[requested] + fallbacks` once
/// `failed` has failed: those after it, or all the fallbacks when `failed`
/// is not in the chain (an alias another policy resolved, say).
fn next_models<'a>(requested: &str, fallbacks: &'a [String], failed: &str) -> &'a [String] {
    if failed == requested {
        return fallbacks;
    }
    match fallbacks.iter().position(|m| m == failed) {
        Some(at) => &fallbacks[at + 1..],
        None => fallbacks,
    }
}

fn describe(failure: &Failure) -> String {
    match failure.kind {
        FailureKind::Connect => "connection failed".into(),
        FailureKind::Timeout => "timed out".into(),
        FailureKind::Broken => "connection broke".into(),
        FailureKind::Status => format!("status {}", failure.status),
    }
}

export_policy!(Fallback);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_guest::Endpoint;

    fn config(json: &str) -> Config {
        let config: Config = serde_json::from_str(json).expect("valid test config");
        config.validate().expect("valid test config");
        config
    }

    fn request(model: &str) -> Request {
        Request {
            id: 7,
            endpoint: Endpoint::ChatCompletions,
            path: "/v1/chat/completions".into(),
            model: model.into(),
            stream: false,
            consumer: None,
            body_size: 100,
        }
    }

    fn failure(model: &str, kind: FailureKind, status: u16, remaining: &[&str]) -> Failure {
        Failure {
            backend: "failed".into(),
            model: model.into(),
            kind,
            status,
            attempt: 1,
            remaining: remaining.iter().map(|b| Target::new(b)).collect(),
        }
    }

    fn backend(name: &str, model: &str, healthy: bool) -> Backend {
        Backend {
            name: name.into(),
            models: vec![model.into()],
            healthy,
            in_flight: 0,
            max_concurrent: 0,
            weight: 1,
            latency_us: 0,
        }
    }

    /// A fleet lookup over a fixed list of backends.
    fn fleet(backends: &[Backend]) -> impl FnMut(&str) -> Vec<Backend> + '_ {
        |model| {
            backends
                .iter()
                .filter(|b| b.serves(model))
                .cloned()
                .collect()
        }
    }

    /// (backend, model) of each retry target; panics on other decisions.
    fn retried(decision: FailureDecision) -> Vec<(String, String)> {
        match decision {
            FailureDecision::Retry(targets) => targets
                .into_iter()
                .map(|t| (t.backend, t.model.unwrap_or_default()))
                .collect(),
            FailureDecision::Next => panic!("expected retry, got next"),
            FailureDecision::GiveUp => panic!("expected retry, got give-up"),
        }
    }

    const CHAIN: &str = r#"{"fallbacks":{"big":["mid","small"]}}"#;

    #[test]
    fn the_chain_continues_after_the_failed_model() {
        let fallbacks = ["mid".to_string(), "small".to_string()];
        assert_eq!(next_models("big", &fallbacks, "big"), &fallbacks[..]);
        assert_eq!(next_models("big", &fallbacks, "mid"), &fallbacks[1..]);
        assert!(next_models("big", &fallbacks, "small").is_empty());
        assert_eq!(
            next_models("big", &fallbacks, "big-resolved"),
            &fallbacks[..]
        );
        assert!(next_models("lonely", &[], "lonely").is_empty());
    }

    #[test]
    fn other_backends_of_the_model_go_first() {
        let c = config(CHAIN);
        let f = failure("big", FailureKind::Status, 503, &["big-2"]);
        let decision = decide(&c, &request("big"), &f, fleet(&[]));
        assert!(matches!(decision, FailureDecision::Next));
    }

    #[test]
    fn falls_back_to_every_backend_of_the_next_model_that_is_up() {
        let fleet_ = [
            backend("mid-1", "mid", true),
            backend("mid-2", "mid", true),
            backend("mid-down", "mid", false),
            backend("small-1", "small", true),
        ];
        let c = config(CHAIN);
        let f = failure("big", FailureKind::Connect, 0, &[]);
        let mut targets = retried(decide(&c, &request("big"), &f, fleet(&fleet_)));
        targets.sort();
        assert_eq!(
            targets,
            [
                ("mid-1".into(), "mid".into()),
                ("mid-2".into(), "mid".into())
            ]
        );

        let f = failure("mid", FailureKind::Timeout, 0, &[]);
        let targets = retried(decide(&c, &request("big"), &f, fleet(&fleet_)));
        assert_eq!(targets, [("small-1".into(), "small".into())]);
    }

    #[test]
    fn models_with_nothing_up_are_skipped() {
        let fleet_ = [
            backend("mid-down", "mid", false),
            backend("small-1", "small", true),
        ];
        let c = config(CHAIN);
        let f = failure("big", FailureKind::Broken, 0, &[]);
        let targets = retried(decide(&c, &request("big"), &f, fleet(&fleet_)));
        assert_eq!(targets, [("small-1".into(), "small".into())]);
    }

    #[test]
    fn gives_up_at_the_end_of_the_chain() {
        let fleet_ = [backend("mid-1", "mid", true)];
        let c = config(CHAIN);
        let f = failure("small", FailureKind::Status, 500, &[]);
        let decision = decide(&c, &request("big"), &f, fleet(&fleet_));
        assert!(matches!(decision, FailureDecision::GiveUp));
        let decision = decide(&c, &request("other"), &f, fleet(&fleet_));
        assert!(matches!(decision, FailureDecision::GiveUp));
    }

    #[test]
    fn only_configured_failures_trigger() {
        let fleet_ = [backend("mid-1", "mid", true)];
        let default = config(CHAIN);
        let picky = config(
            r#"{"fallbacks":{"big":["mid"]},"on_status":[429,503],"on_connect_failure":false}"#,
        );
        let cases = [
            (&default, FailureKind::Status, 500, true),
            (&default, FailureKind::Status, 599, true),
            (&default, FailureKind::Status, 429, false),
            (&default, FailureKind::Timeout, 0, true),
            (&picky, FailureKind::Status, 429, true),
            (&picky, FailureKind::Status, 503, true),
            (&picky, FailureKind::Status, 500, false),
            (&picky, FailureKind::Connect, 0, false),
            (&picky, FailureKind::Broken, 0, false),
        ];
        for (c, kind, status, expected) in cases {
            let f = failure("big", kind, status, &[]);
            let decision = decide(c, &request("big"), &f, fleet(&fleet_));
            let fell_back = matches!(decision, FailureDecision::Retry(_));
            assert_eq!(fell_back, expected, "{kind:?} {status}");
        }
    }

    #[test]
    fn without_retry_other_backends_the_fallback_comes_first() {
        let fleet_ = [backend("mid-1", "mid", true)];
        let c = config(r#"{"fallbacks":{"big":["mid"]},"retry_other_backends":false}"#);
        let f = failure("big", FailureKind::Status, 502, &["big-2"]);
        let targets = retried(decide(&c, &request("big"), &f, fleet(&fleet_)));
        assert_eq!(targets, [("mid-1".into(), "mid".into())]);
    }

    #[test]
    fn bad_configurations_are_refused() {
        for json in [
            r#"{"on_status":[200]}"#,
            r#"{"on_status":[600]}"#,
            r#"{"fallbacks":{"":["a"]}}"#,
            r#"{"fallbacks":{"a":["b",""]}}"#,
            r#"{"fallbacks":{"a":["b","a"]}}"#,
            r#"{"fallbacks":{"a":["b","b"]}}"#,
        ] {
            let config: Config = serde_json::from_str(json).expect("parses");
            assert!(config.validate().is_err(), "{json}");
        }
        assert!(serde_json::from_str::<Config>(r#"{"fallback":{}}"#).is_err());
        assert!(serde_json::from_str::<Config>(r#"{"on_status":[70000]}"#).is_err());
    }
}
