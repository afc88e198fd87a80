//! Compiling, pre-initialising and calling policies on the policy engine
//! ([`engine::for_policies`]: pooling allocator with copy-on-write memory
//! images, epoch interruption driven by a single ticker thread), each call
//! in a bounded instance (memory cap, timeout).
//!
//! Guests run as async calls on fibers: WASI's implementation is async
//! inside (a synchronous call would block the tokio worker on it), and at
//! every epoch tick a long-running guest yields to the executor, so one bad
//! guest never stalls other requests on its thread before its timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store, UpdateDeadline};

use super::contract::{
    AttemptFailure, Decision, FailureDecision, Hooks, RequestInfo, TextDecision,
};
use super::guest::{v1, v2, CallContext, GuestState};
use super::snapshot::Access;
use super::{FailureKind, PolicyError};
use crate::config::PolicyRuntimeConfig;
use crate::wasm::compile::{compile, linking};
use crate::wasm::engine::{self, Ticking, POLICY_TICK as TICK};
use crate::wasm::store;

/// A guest call still running after this much time is throttled: it runs
/// one tick in every `THROTTLE_PERIOD`, so guests that loop until their
/// timeout cannot crowd out the microsecond calls of everyone else.
const THROTTLE_AFTER: Duration = Duration::from_millis(2);
const THROTTLE_PERIOD: Duration = Duration::from_millis(5);

/// A call ends after this many timeouts of wall time, however much of it
/// was spent waiting for the executor.
const WALL_CAP: u32 = 20;

/// When a yielded guest was polled again (nanoseconds after its call began;
/// 0 until then).
#[derive(Default)]
struct Resumed(AtomicU64);

impl Resumed {
    fn mark(&self, started: Instant) {
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.store(nanos.max(1), Ordering::Relaxed);
    }

    /// The moment it resumed, as time since its call began; zero if it has
    /// not yet.
    fn at(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// Time `lifecycle.init` may take: it runs once, off the request path, and
/// may build large tables.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A policy compiled, linked and (for 0.2 guests) initialised: ready to
/// instantiate per call.
pub enum Pre {
    V1(v1::PolicyPre<GuestState>),
    V2(v2::PolicyPre<GuestState>),
}

pub struct Prepared {
    pub pre: Pre,
    pub hooks: Hooks,
    /// The contract version the component was built against.
    pub contract: &'static str,
}

/// Runs `$call` (an expression using `$policy` and `$store`) in a fresh
/// instance from `$pre`, mapping every failure to a [`PolicyError`].
macro_rules! in_instance {
    ($runtime:expr, $state:expr, $pre:expr, |$store:ident, $policy:ident| $call:expr) => {{
        let mut $store = $runtime.store($state, $runtime.timeout);
        let outcome = match $pre.instantiate_async(&mut $store).await {
            Ok($policy) => $call.await.map_err(|e| (FailureKind::Trap, e)),
            Err(e) => Err((FailureKind::Unavailable, e)),
        };
        outcome.map_err(|(kind, error)| guest_error(&$store, kind, error))
    }};
}

/// The policy engine, its linker, and the bounds of every call.
pub struct Runtime {
    engine: Ticking,
    linker: Linker<GuestState>,
    pub(super) timeout: Duration,
    memory_limit: usize,
    max_body_bytes: usize,
    /// Room for instances kept across one answer's response calls (see
    /// [`super::kept`]): half the pool, the rest stays for fresh calls.
    pub(super) kept: Arc<tokio::sync::Semaphore>,
}

impl Runtime {
    pub fn new(config: &PolicyRuntimeConfig) -> anyhow::Result<Runtime> {
        let instances = config.max_instances;
        let memory_limit = usize::try_from(config.memory_limit).context("memory_limit")?;
        let engine = engine::for_policies(instances, memory_limit)?;

        let mut linker = Linker::new(&engine.engine);
        linking("WASI", wasmtime_wasi::p2::add_to_linker_async(&mut linker))?;
        linking(
            "the 0.2 policy imports",
            v2::Policy::add_to_linker::<_, HasSelf<GuestState>>(&mut linker, |s| s),
        )?;
        linking(
            "the 0.1 policy imports",
            v1::Policy::add_to_linker::<_, HasSelf<GuestState>>(&mut linker, |s| s),
        )?;

        Ok(Runtime {
            engine,
            linker,
            timeout: config.timeout,
            memory_limit,
            max_body_bytes: usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX),
            kept: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(instances / 2).unwrap_or(0).max(1),
            )),
        })
    }

    fn engine(&self) -> &Engine {
        &self.engine.engine
    }

    /// A call's state, bounded by this runtime's limits.
    pub fn state(&self, context: CallContext) -> GuestState {
        GuestState::new(context, self.memory_limit, self.max_body_bytes)
    }

    /// A store for one call: memory capped, and at every epoch tick the
    /// guest yields to the executor — throttled once it has overrun
    /// [`THROTTLE_AFTER`] — until `timeout`, then traps. The time a guest
    /// spends queued after a yield, waiting for a busy executor to run it
    /// again, is not charged to it: on a saturated core that wait, not the
    /// guest, failed requests. [`WALL_CAP`] timeouts still end any call.
    pub(super) fn store(&self, state: GuestState, timeout: Duration) -> Store<GuestState> {
        let mut store = store::bounded(self.engine(), state);
        let mut started = store.data().call_started;
        let mut queued = Duration::ZERO;
        let mut last_yield: Option<(Instant, Duration, Arc<Resumed>)> = None;
        store.epoch_deadline_callback(move |mut store| {
            let now = Instant::now();
            if store.data().call_started != started {
                // A kept instance began another call: its own clock.
                started = store.data().call_started;
                queued = Duration::ZERO;
                last_yield = None;
            }
            if let Some((yielded, pause, resumed)) = last_yield.take() {
                let away = resumed.at().saturating_sub(yielded - started);
                queued += away.saturating_sub(pause);
            }
            let wall = now - started;
            let charged = wall.saturating_sub(queued);
            if charged >= timeout || wall >= timeout * WALL_CAP {
                store.data_mut().timed_out = true;
                return Ok(UpdateDeadline::Interrupt);
            }
            // Past THROTTLE_AFTER the pause is part of the guest's time.
            let pause = if charged < THROTTLE_AFTER {
                Duration::ZERO
            } else {
                THROTTLE_PERIOD.saturating_sub(TICK).min(timeout - charged)
            };
            let resumed = Arc::new(Resumed::default());
            last_yield = Some((now, pause, resumed.clone()));
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    if pause.is_zero() {
                        tokio::task::yield_now().await;
                    } else {
                        tokio::time::sleep(pause).await;
                    }
                    resumed.mark(started);
                }),
            ))
        });
        store
    }

    /// Compiles a component, resolves its imports once, and — for a 0.2
    /// guest — runs `lifecycle.init` and snapshots the result, so each call
    /// only instantiates. Fails with a message naming the problem: not a
    /// component, imports the host does not provide, neither contract's
    /// exports, or `init` refusing or trapping.
    pub async fn prepare(&self, bytes: &[u8], context: CallContext) -> anyhow::Result<Prepared> {
        let linked = compile(self.engine(), &self.linker, bytes)?;
        let v2_error = match v2::PolicyPre::new(linked.pre.clone()) {
            Ok(_) => {
                let contract = v2_contract(&linked.component, self.engine());
                return self.prepare_v2(bytes, context, contract).await;
            }
            Err(e) => e,
        };
        match v1::PolicyPre::new(linked.pre) {
            Ok(pre) => Ok(Prepared {
                pre: Pre::V1(pre),
                hooks: Hooks::REQUEST_ONLY,
                contract: "0.1.0",
            }),
            Err(_) => anyhow::bail!(
                "does not export the policy world of sluice:policy@0.2 (nor @0.1.0): {v2_error:#}"
            ),
        }
    }

    async fn prepare_v2(
        &self,
        bytes: &[u8],
        context: CallContext,
        contract: &'static str,
    ) -> anyhow::Result<Prepared> {
        let wizer = wasmtime_wizer::Wizer::new();
        let (cx, instrumented) = wizer
            .instrument_component(bytes)
            .map_err(|e| anyhow::anyhow!("cannot be pre-initialised: {e:#}"))?;
        let pre = self.link_v2(&instrumented)?;
        let mut store = self.store(self.state(context), INIT_TIMEOUT);
        let instance = pre
            .instance_pre()
            .instantiate_async(&mut store)
            .await
            .map_err(|e| anyhow::anyhow!("cannot be instantiated: {e:#}"))?;
        let policy =
            v2::Policy::new(&mut store, &instance).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let hooks = match policy.sluice_policy_lifecycle().call_init(&mut store).await {
            Ok(Ok(hooks)) => Hooks::from(hooks),
            Ok(Err(message)) => anyhow::bail!("init refused: {message}"),
            Err(e) => {
                let error = guest_error(&store, FailureKind::Trap, e);
                anyhow::bail!("init failed: {}: {}", error.kind, error.detail)
            }
        };
        let snapshot = wizer
            .snapshot_component(
                &cx,
                &mut Access {
                    store: &mut store,
                    instance,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("snapshot after init failed: {e:#}"))?;
        Ok(Prepared {
            pre: Pre::V2(self.link_v2(&snapshot)?),
            hooks,
            contract,
        })
    }

    fn link_v2(&self, bytes: &[u8]) -> anyhow::Result<v2::PolicyPre<GuestState>> {
        let linked = compile(self.engine(), &self.linker, bytes)?;
        v2::PolicyPre::new(linked.pre).map_err(|e| anyhow::anyhow!("{e:#}"))
    }

    /// The request phase, in a fresh bounded instance.
    pub(crate) async fn on_request(
        &self,
        pre: &Pre,
        state: GuestState,
        request: &RequestInfo,
    ) -> Result<(Decision, Option<bool>), PolicyError> {
        match pre {
            Pre::V2(pre) => in_instance!(self, state, pre, |store, policy| async {
                let decision = policy
                    .sluice_policy_request_phase()
                    .call_on_request(&mut store, &request.into())
                    .await?;
                Ok((Decision::from(decision), store.data().idempotent))
            }),
            Pre::V1(pre) => in_instance!(self, state, pre, |store, policy| policy
                .sluice_policy_request_phase()
                .call_on_request(&mut store, &request.into()))
            .map(|d| (Decision::from(d), None)),
        }
    }

    /// The response phase (0.2 guests that declared it).
    pub(crate) async fn on_response_text(
        &self,
        pre: &Pre,
        state: GuestState,
        request: &RequestInfo,
        choice: u32,
        text: &str,
        last: bool,
    ) -> Result<TextDecision, PolicyError> {
        match pre {
            Pre::V2(pre) => in_instance!(self, state, pre, |store, policy| policy
                .sluice_policy_response_phase()
                .call_on_response_text(&mut store, &request.into(), choice, text, last))
            .map(TextDecision::from),
            Pre::V1(_) => Ok(TextDecision::Pass),
        }
    }

    /// The failure phase (0.2 guests that declared it).
    pub(crate) async fn on_failure(
        &self,
        pre: &Pre,
        state: GuestState,
        request: &RequestInfo,
        failure: &AttemptFailure,
    ) -> Result<FailureDecision, PolicyError> {
        match pre {
            Pre::V2(pre) => in_instance!(self, state, pre, |store, policy| policy
                .sluice_policy_failure_phase()
                .call_on_failure(&mut store, &request.into(), &failure.into()))
            .map(FailureDecision::from),
            Pre::V1(_) => Ok(FailureDecision::Next),
        }
    }
}

/// Which 0.2 minor a component was built against, from its exports' names
/// (all link to the current 0.2 bindings).
fn v2_contract(component: &Component, engine: &Engine) -> &'static str {
    const MINORS: [&str; 3] = ["0.2.0", "0.2.1", "0.2.2"];
    component
        .component_type()
        .exports(engine)
        .find_map(|(name, _)| {
            let version = name.strip_prefix("sluice:policy/lifecycle@")?;
            MINORS.into_iter().find(|m| *m == version)
        })
        .unwrap_or("0.2.3")
}

/// Names what went wrong in a guest call: the memory cap, the timeout, or a
/// trap, with the guest's own stderr (panic messages) for the log.
pub(super) fn guest_error(
    store: &Store<GuestState>,
    kind: FailureKind,
    error: wasmtime::Error,
) -> PolicyError {
    let state = store.data();
    let kind = if state.memory.hit {
        FailureKind::MemoryLimit
    } else if state.timed_out {
        FailureKind::Timeout
    } else {
        kind
    };
    let stderr = String::from_utf8_lossy(&state.stderr()).trim().to_string();
    let detail = if stderr.is_empty() {
        format!("{error:#}")
    } else {
        format!("{error:#}; guest stderr: {stderr}")
    };
    PolicyError {
        policy: state.policy_name.clone(),
        kind,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_versions_are_told_apart() {
        let runtime = Runtime::new(&PolicyRuntimeConfig::default()).unwrap();
        let current = Component::new(
            runtime.engine(),
            crate::bundled::find("model-router").unwrap(),
        )
        .unwrap();
        let names: Vec<String> = current
            .component_type()
            .exports(runtime.engine())
            .map(|(n, _)| n.to_string())
            .collect();
        eprintln!("{names:?}");
        assert_eq!(v2_contract(&current, runtime.engine()), "0.2.3");
        for (fixture, version) in [
            (
                &include_bytes!("../../../../tests/fixtures/pin_backend-0.2.0.wasm")[..],
                "0.2.0",
            ),
            (
                &include_bytes!("../../../../tests/fixtures/pin_backend-0.2.1.wasm")[..],
                "0.2.1",
            ),
            (
                &include_bytes!("../../../../tests/fixtures/model_router-0.2.2.wasm")[..],
                "0.2.2",
            ),
        ] {
            let old = Component::new(runtime.engine(), fixture).unwrap();
            assert_eq!(v2_contract(&old, runtime.engine()), version);
        }
    }
}
