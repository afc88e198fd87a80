//! One wasmtime `Engine` per process, set up for per-request instances:
//! pooling allocator with copy-on-write memory images, epoch interruption
//! driven by a single ticker thread, and a memory cap per instance.
//!
//! Guests run as async calls on fibers: WASI's implementation is async
//! inside (a synchronous call would block the tokio worker on it), and at
//! every epoch tick a long-running guest yields to the executor, so one bad
//! guest never stalls other requests on its thread before its timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline,
};

use super::guest::{types, GuestState, Policy, PolicyPre};
use super::{FailureKind, PolicyError};
use crate::config::PolicyRuntimeConfig;

/// Epoch tick: the granularity of guest timeouts.
const TICK: Duration = Duration::from_millis(1);

/// Bytes of each pooled memory and table kept mapped between instances.
const KEEP_RESIDENT: usize = 2 << 20;

pub struct Runtime {
    engine: Engine,
    linker: Linker<GuestState>,
    timeout: Duration,
    pub(crate) memory_limit: usize,
    pub(crate) max_body_bytes: usize,
    stop_ticker: Arc<AtomicBool>,
}

impl Runtime {
    pub fn new(config: &PolicyRuntimeConfig) -> anyhow::Result<Runtime> {
        let instances = config.max_instances;
        let memory_limit = usize::try_from(config.memory_limit).context("memory_limit")?;
        let mut pool = PoolingAllocationConfig::new();
        // A Rust component is a few core instances (the program and the
        // canonical-ABI shims) with one memory; leave room for more.
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(4))
            .total_memories(instances)
            .total_tables(instances.saturating_mul(4))
            .total_stacks(instances)
            .max_memory_size(memory_limit)
            // Reuse a slot's pages instead of handing them back to the kernel
            // after every request: page faults and madvise's TLB shootdowns
            // were most of the per-request cost. Only the pages a guest
            // dirtied are reset (PAGEMAP_SCAN where the kernel has it).
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .pagemap_scan(Enabled::Auto);

        let mut wasm = Config::new();
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .epoch_interruption(true);
        let engine =
            Engine::new(&wasm).map_err(|e| anyhow::anyhow!("creating the wasm engine: {e:#}"))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| anyhow::anyhow!("linking WASI: {e:#}"))?;
        Policy::add_to_linker::<_, wasmtime::component::HasSelf<GuestState>>(&mut linker, |s| s)
            .map_err(|e| anyhow::anyhow!("linking the policy imports: {e:#}"))?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let stop = stop_ticker.clone();
        std::thread::Builder::new()
            .name("sluice-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .context("starting the epoch ticker")?;

        Ok(Runtime {
            engine,
            linker,
            timeout: config.timeout,
            memory_limit,
            max_body_bytes: usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX),
            stop_ticker,
        })
    }

    /// Compiles a component and resolves its imports once, so each request
    /// only instantiates. Fails with a message naming the problem: not a
    /// component, imports we do not provide, or the policy export missing.
    pub fn prepare(&self, bytes: &[u8]) -> anyhow::Result<PolicyPre<GuestState>> {
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| anyhow::anyhow!("not a valid WebAssembly component: {e:#}"))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow::anyhow!("imports something the host does not provide: {e:#}"))?;
        PolicyPre::new(pre).map_err(|e| {
            anyhow::anyhow!("does not export `sluice:policy/request-phase@0.1.0`: {e:#}")
        })
    }

    /// Runs one `on-request` call in a fresh, bounded instance.
    pub(crate) async fn on_request(
        &self,
        pre: &PolicyPre<GuestState>,
        state: GuestState,
        request: &types::Request,
    ) -> Result<types::Decision, PolicyError> {
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.memory);
        // Checked at each tick: yield to the executor while within the
        // timeout, trap past it.
        let (started, timeout) = (Instant::now(), self.timeout);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut store| {
            if started.elapsed() < timeout {
                return Ok(UpdateDeadline::Yield(1));
            }
            store.data_mut().timed_out = true;
            Ok(UpdateDeadline::Interrupt)
        });
        let outcome = match pre.instantiate_async(&mut store).await {
            Ok(policy) => policy
                .sluice_policy_request_phase()
                .call_on_request(&mut store, request)
                .await
                .map_err(|e| (FailureKind::Trap, e)),
            Err(e) => Err((FailureKind::Unavailable, e)),
        };
        outcome.map_err(|(kind, error)| {
            let state = store.data();
            let kind = if state.memory.hit {
                FailureKind::MemoryLimit
            } else if state.timed_out {
                FailureKind::Timeout
            } else {
                kind
            };
            let stderr = String::from_utf8_lossy(&state.stderr.contents())
                .trim()
                .to_string();
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
        })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}
