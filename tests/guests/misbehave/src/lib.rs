//! Test guest: misbehaves on demand, so the host's tests can check that a
//! bad policy costs one request and never the gateway.
//!
//! The `x-misbehave` request header picks what `on_request` does:
//! `trap`, `loop` (burn fuel forever), `oom` (allocate until memory runs
//! out), `bad-decision` (route to a backend that does not exist),
//! `huge-message` (reject with a 2 MiB message), `many-targets` (route to
//! 10,000 targets), `host-loop` (call the fleet import forever). Without
//! the header, or with any other value, it passes.
//!
//! Configuration (all optional):
//! ```toml
//! config = { fail_init = true, response = "trap", always = "trap", response_work = 2 }
//! ```
//! `fail_init` makes `init` refuse the policy. `always` is the behaviour
//! used when the request has no `x-misbehave` header (so even the host's
//! trial request misbehaves). `response` (`"trap"`,
//! `"loop"` or `"stop"`) turns on the response hook, which does that when
//! the answer's text contains "boom". `response_work` makes every response
//! call first do that many units of work (about a millisecond each).
//! `undeclared_failure` makes `on_failure` give up while `hooks()` does not
//! declare the failure hook (an author's mistake the host refuses).

use std::hint::black_box;

use serde::Deserialize;
use sluice_guest::{
    export_policy, fleet, request, Decision, Failure, FailureDecision, Hooks, Policy, Request,
    Target, TextDecision,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    fail_init: bool,
    response: Option<OnBoom>,
    always: Option<String>,
    #[serde(default)]
    response_work: u64,
    #[serde(default)]
    undeclared_failure: bool,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum OnBoom {
    Trap,
    Loop,
    Stop,
}

struct Misbehave {
    response: Option<OnBoom>,
    always: Option<String>,
    response_work: u64,
    undeclared_failure: bool,
}

impl Policy for Misbehave {
    fn init() -> Result<Self, String> {
        let config: Config =
            sluice_guest::config().map_err(|e| format!("misbehave: invalid configuration: {e}"))?;
        if config.fail_init {
            return Err("misbehave: init refused".into());
        }
        Ok(Misbehave {
            response: config.response,
            always: config.always,
            response_work: config.response_work,
            undeclared_failure: config.undeclared_failure,
        })
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            request: true,
            // No holdback: the tests control where "boom" falls in a chunk.
            response_holdback: self.response.map(|_| 0),
            failure: false,
        }
    }

    fn on_request(&self, _request: Request) -> Decision {
        let behaviour = request::header("x-misbehave").or_else(|| self.always.clone());
        match behaviour.as_deref() {
            Some("trap") => panic!("misbehave: deliberate trap"),
            Some("loop") => spin(),
            Some("oom") => hoard(),
            Some("bad-decision") => Decision::route_to("no-such-backend"),
            Some("huge-message") => Decision::reject(400, "huge", "x".repeat(2 << 20)),
            Some("many-targets") => many_targets(),
            Some(work) if work.starts_with("work-") => {
                busy(work["work-".len()..].parse().unwrap_or(1));
                Decision::pass()
            }
            Some("host-loop") => loop {
                black_box(fleet::backends());
            },
            _ => Decision::pass(),
        }
    }

    fn on_failure(&self, _request: &Request, _failure: &Failure) -> FailureDecision {
        if self.undeclared_failure {
            FailureDecision::GiveUp
        } else {
            FailureDecision::Next
        }
    }

    fn on_response_text(
        &self,
        _request: &Request,
        _choice: u32,
        text: &str,
        _last: bool,
    ) -> TextDecision {
        busy(self.response_work);
        if !text.contains("boom") {
            return TextDecision::Pass;
        }
        match self.response {
            Some(OnBoom::Trap) => panic!("misbehave: deliberate trap in the response"),
            Some(OnBoom::Loop) => spin(),
            Some(OnBoom::Stop) => TextDecision::stop(400, "content_filter", "stopped"),
            None => TextDecision::Pass,
        }
    }
}

/// Loops forever; `black_box` keeps the optimiser from proving the loop
/// does nothing and removing it.
/// A fixed amount of work — `units` of 100,000 steps, about a millisecond
/// each here — however long the host takes to run it.
fn busy(units: u64) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..units * 100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x = black_box(x ^ (x << 17));
    }
}

fn spin() -> ! {
    let mut turns: u64 = 0;
    loop {
        turns = black_box(turns.wrapping_add(1));
    }
}

/// Allocates 1 MiB after 1 MiB and keeps them all. Filling each buffer
/// writes every page, so the memory is really committed rather than
/// merely reserved.
fn hoard() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(black_box(vec![0xA5; 1 << 20]));
        black_box(&hoard);
    }
}

/// 10,000 targets naming real backends (cycled), so that only the count is
/// wrong with the decision; made-up names when the fleet is empty.
fn many_targets() -> Decision {
    let names: Vec<String> = fleet::backends().into_iter().map(|b| b.name).collect();
    let targets = (0..10_000)
        .map(|i| match names.get(i % names.len().max(1)) {
            Some(name) => Target::new(name),
            None => Target::new(&format!("misbehave-{i}")),
        })
        .collect();
    Decision::route(targets)
}

export_policy!(Misbehave);
