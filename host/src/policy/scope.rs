//! The three phases of the policy contract as the host runs them for one
//! request: the request phase (route or reject), the failure phase (what to
//! do after a failed attempt) and the response phase (the answer's text).
//! A [`Scope`] holds what they run against — the chain, the fleet and the
//! runtime as they were when the request arrived — so a deploy or a reload
//! during a long answer changes nothing for it.

use std::sync::Arc;

use super::contract::{AttemptFailure, FailureDecision, TargetSpec};
use super::{Chain, ChainError, Filtered, KeptInstances, PolicyRequest, Route, Runtime, Target};
use crate::fleet::Fleet;

/// One request's view of the policy engine.
#[derive(Clone)]
pub struct Scope {
    pub runtime: Arc<Runtime>,
    pub fleet: Arc<Fleet>,
    pub chain: Arc<Chain>,
}

impl Scope {
    /// The request phase: each policy in order until one routes or rejects.
    pub async fn route(&self, request: PolicyRequest) -> Result<Route, ChainError> {
        self.chain.decide(&self.runtime, &self.fleet, request).await
    }

    /// Whether any policy has a failure hook (else a failed attempt simply
    /// moves on to the next target).
    pub fn handles_failures(&self) -> bool {
        self.chain.handles_failures()
    }

    /// The failure phase: what to do after a failed attempt.
    pub async fn on_failure(
        &self,
        route: &Route,
        failure: &AttemptFailure,
    ) -> Result<FailureDecision, ChainError> {
        self.chain
            .on_failure(&self.runtime, &self.fleet, route, failure)
            .await
    }

    /// A failure hook's retry targets, checked like a route's.
    pub fn resolve(
        &self,
        model: &str,
        targets: Vec<TargetSpec>,
    ) -> Result<Vec<Target>, ChainError> {
        self.chain.resolve(&self.fleet, model, targets)
    }

    /// Characters the response hooks need held back; `None`: no hooks.
    pub fn response_holdback(&self) -> Option<usize> {
        self.chain.response_holdback()
    }

    /// The response phase: a piece of the answer's text through every
    /// response hook in order.
    pub async fn filter_text(
        &self,
        route: &Route,
        kept: &mut KeptInstances,
        choice: u32,
        text: String,
        last: bool,
    ) -> Filtered {
        self.chain
            .filter_text(&self.runtime, &self.fleet, route, kept, choice, text, last)
            .await
    }
}
