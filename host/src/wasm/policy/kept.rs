//! Response-phase instances kept for the rest of one answer. A stream calls
//! the response hooks once per chunk; a fresh instance for each chunk cost
//! several times the call itself. A kept instance never outlives its answer,
//! so nothing crosses from one request to another; how many are kept at once
//! is bounded (half the pool; past that, calls take fresh instances as
//! before), and each is replaced after [`MAX_CALLS`] calls or once it has
//! grown its memory by [`MAX_GROWTH`], so a guest that leaks per call cannot
//! hoard memory over a long stream. One that traps or runs out of time is
//! dropped; the next call gets a fresh one.

use std::time::Instant;

use tokio::sync::OwnedSemaphorePermit;
use wasmtime::Store;

use super::contract::{RequestInfo, TextDecision};
use super::guest::{v2, GuestState};
use super::runtime::{guest_error, Pre};
use super::{FailureKind, PolicyError, Runtime};

/// Calls one kept instance serves before it is replaced.
const MAX_CALLS: u32 = 256;

/// Memory growth after which a kept instance is replaced.
const MAX_GROWTH: usize = 4 << 20;

/// One live instance of a response-hook policy.
pub struct Kept {
    store: Store<GuestState>,
    policy: v2::Policy,
    calls: u32,
    _room: OwnedSemaphorePermit,
}

impl Drop for Kept {
    fn drop(&mut self) {
        crate::metrics::metrics().kept_instance(false);
    }
}

/// The instances one answer keeps, a place per response-hook policy in
/// chain order. Dropping it (at the end of the answer) frees them.
#[derive(Default)]
pub struct KeptInstances(Vec<Option<Kept>>);

impl KeptInstances {
    pub fn place(&mut self, index: usize) -> &mut Option<Kept> {
        if self.0.len() <= index {
            self.0.resize_with(index + 1, || None);
        }
        &mut self.0[index]
    }
}

impl Runtime {
    /// The response phase on `kept`'s instance, made (with `state`) when
    /// there is none and room for one; a fresh instance otherwise.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn on_response_text_kept(
        &self,
        pre: &Pre,
        kept: &mut Option<Kept>,
        state: impl FnOnce() -> GuestState,
        request: &RequestInfo,
        choice: u32,
        text: &str,
        last: bool,
    ) -> Result<TextDecision, PolicyError> {
        let Pre::V2(v2_pre) = pre else {
            return Ok(TextDecision::Pass);
        };
        let mut instance = match kept.take() {
            Some(instance) => instance,
            None => match self.kept.clone().try_acquire_owned() {
                Ok(room) => {
                    let mut store = self.store(state(), self.timeout);
                    match v2_pre.instantiate_async(&mut store).await {
                        Ok(policy) => {
                            crate::metrics::metrics().kept_instance(true);
                            Kept {
                                store,
                                policy,
                                calls: 0,
                                _room: room,
                            }
                        }
                        Err(e) => return Err(guest_error(&store, FailureKind::Unavailable, e)),
                    }
                }
                Err(_) => {
                    return self
                        .on_response_text(pre, state(), request, choice, text, last)
                        .await
                }
            },
        };
        instance.store.data_mut().call_started = Instant::now();
        instance.store.set_epoch_deadline(1);
        let outcome = instance
            .policy
            .sluice_policy_response_phase()
            .call_on_response_text(&mut instance.store, &request.into(), choice, text, last)
            .await;
        match outcome {
            Ok(decision) => {
                instance.calls += 1;
                let worn =
                    instance.calls >= MAX_CALLS || instance.store.data().memory.grown >= MAX_GROWTH;
                if !worn {
                    *kept = Some(instance);
                }
                Ok(TextDecision::from(decision))
            }
            Err(e) => Err(guest_error(&instance.store, FailureKind::Trap, e)),
        }
    }
}
