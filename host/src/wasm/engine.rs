//! The wasmtime engines' settings, in one place. Policies and workers each
//! get an engine of their own — policies a pooling allocator tuned for
//! microsecond per-request instances, workers the component-model async
//! machinery `wasi:http` 0.3 needs — both with epoch interruption, driven by
//! a [`Ticker`] that lives as long as the engine is used.

use std::time::Duration;

use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::ticker::Ticker;

/// Bytes of each pooled memory and table kept mapped between instances.
const KEEP_RESIDENT: usize = 2 << 20;

/// Epoch tick of the policy engine: the granularity of policy timeouts.
pub const POLICY_TICK: Duration = Duration::from_millis(1);

/// Epoch tick of the worker engine: how often a running worker yields (and
/// can be expired).
pub const WORKER_TICK: Duration = Duration::from_millis(5);

/// An engine and the ticker that advances its epoch; the ticker stops when
/// this is dropped.
pub struct Ticking {
    pub engine: Engine,
    _ticker: Ticker,
}

/// The policy engine: a pool of `instances` instances with memories of at
/// most `memory_limit` bytes, synchronous exports, epochs every
/// [`POLICY_TICK`].
pub fn for_policies(instances: u32, memory_limit: usize) -> anyhow::Result<Ticking> {
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

    let mut config = Config::new();
    config
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .epoch_interruption(true)
        // Policies are synchronous exports; the concurrent machinery the
        // edge workers need (component-model-async) doubled the cost of
        // every policy call when left on here.
        .concurrency_support(false);
    let engine =
        Engine::new(&config).map_err(|e| anyhow::anyhow!("creating the wasm engine: {e:#}"))?;
    let ticker = Ticker::start(&engine, POLICY_TICK, "sluice-epoch")?;
    Ok(Ticking {
        engine,
        _ticker: ticker,
    })
}

/// The worker engine: on-demand allocation, component-model async (for
/// `wasi:http` 0.3), epochs every [`WORKER_TICK`].
pub fn for_workers() -> anyhow::Result<Ticking> {
    let mut config = Config::new();
    config
        .epoch_interruption(true)
        .wasm_component_model_async(true);
    let engine = Engine::new(&config)
        .map_err(|e| anyhow::anyhow!("creating the workers' wasm engine: {e:#}"))?;
    let ticker = Ticker::start(&engine, WORKER_TICK, "sluice-worker-epoch")?;
    Ok(Ticking {
        engine,
        _ticker: ticker,
    })
}
