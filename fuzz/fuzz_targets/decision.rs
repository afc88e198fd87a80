//! The check of a guest's decision (`sluice::policy::check_decision`), the
//! one gate between untrusted policy code and the proxy: whatever a guest
//! returns — unknown or thousands of backends, empty or huge models,
//! statuses outside 400..=599, edited bodies that are not requests — the
//! check answers without panicking, and an accepted edit leaves a body
//! that parses as a request with a model.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice::api::openai::{Endpoint, RequestHead};
use sluice::config::BackendConfig;
use sluice::fleet::Fleet;
use sluice::policy::contract::{Decision, RejectSpec, TargetSpec};
use sluice::policy::{check_decision, PolicyRequest};

#[derive(Arbitrary, Debug)]
enum Input {
    Pass {
        model: Option<String>,
        body: Option<String>,
    },
    Route(Vec<(Target, Option<String>)>),
    /// Thousands of copies of one target.
    ManyTargets(u16, Target),
    Reject {
        status: u16,
        message: String,
        code: String,
    },
}

#[derive(Arbitrary, Debug)]
enum Target {
    Known(bool),
    Named(String),
}

fn backend(name: &str) -> BackendConfig {
    BackendConfig {
        name: name.into(),
        url: "http://127.0.0.1:9".into(),
        models: vec!["m".into()],
        max_concurrent_requests: 0,
        weight: 1,
        api_key: None,
        health_path: None,
        engine: Default::default(),
        metrics_url: None,
    }
}

fn name(target: Target) -> String {
    match target {
        Target::Known(first) => if first { "vm01" } else { "vm02" }.into(),
        Target::Named(name) => name,
    }
}

fuzz_target!(|input: Input| {
    thread_local! {
        static FLEET: Arc<Fleet> =
            Arc::new(Fleet::new(&[backend("vm01"), backend("vm02")]).expect("a valid fleet"));
    }
    let body = Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
    let request = PolicyRequest {
        id: 1,
        endpoint: Endpoint::ChatCompletions,
        path: "/v1/chat/completions".into(),
        head: RequestHead::parse(&body).expect("the base request parses"),
        consumer: None,
        headers: Arc::new(http::HeaderMap::new()),
        body,
        prefix: Default::default(),
    };
    let decision = match input {
        Input::Pass { model, body } => Decision::Pass { model, body },
        Input::Route(targets) => Decision::Route(
            targets
                .into_iter()
                .map(|(t, model)| TargetSpec {
                    backend: name(t),
                    model,
                })
                .collect(),
        ),
        Input::ManyTargets(n, target) => {
            let backend = name(target);
            Decision::Route(
                (0..n)
                    .map(|_| TargetSpec {
                        backend: backend.clone(),
                        model: None,
                    })
                    .collect(),
            )
        }
        Input::Reject {
            status,
            message,
            code,
        } => Decision::Reject(RejectSpec {
            status,
            message,
            code,
        }),
    };
    let edited = FLEET.with(|fleet| check_decision(fleet, &request, decision));
    if let Ok(Some(body)) = edited {
        let head = RequestHead::parse(&body)
            .unwrap_or_else(|e| panic!("an accepted edit left a body that does not parse: {e:?}"));
        assert!(!head.model.is_empty());
    }
});
