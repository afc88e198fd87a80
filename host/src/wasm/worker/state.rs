//! The state of one worker instance's store: WASI locked down (no files,
//! no sockets, only the configured environment), `wasi:http` with the
//! worker's outbound allow-list, and its memory cap.

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::outbound::Outbound;
use super::stderr::{BoundedStderr, STDERR_WRITE_BUDGET};
use super::Bounds;
use crate::wasm::limits::MemoryCap;
use crate::wasm::store::Capped;

/// The state of one worker instance's store.
pub struct WorkerStore {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: Outbound,
    pub(super) memory: MemoryCap,
}

impl WorkerStore {
    pub(super) fn new(bounds: &Bounds) -> WorkerStore {
        let mut wasi = WasiCtx::builder();
        // No files, no sockets (outbound HTTP goes through the allow-list),
        // only the configured environment; stderr to ours, bounded per
        // instance so a chatty worker cannot flood the gateway's log.
        wasi.stderr(wasmtime_wasi::cli::AsyncStdoutStream::new(
            STDERR_WRITE_BUDGET,
            BoundedStderr::new(bounds.worker.clone()),
        ))
        .allow_tcp(false)
        .allow_udp(false);
        for (key, value) in bounds.env.iter() {
            wasi.env(key, value);
        }
        WorkerStore {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: Outbound {
                worker: bounds.worker.clone(),
                allowed: bounds.allowed.clone(),
            },
            memory: MemoryCap::new(bounds.memory_limit),
        }
    }

    pub(super) fn view(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            hooks: &mut self.hooks,
            table: &mut self.table,
            ctx: &mut self.http,
        }
    }
}

impl WasiView for WorkerStore {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for WorkerStore {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        self.view()
    }
}

impl Capped for WorkerStore {
    fn memory_cap(&mut self) -> &mut MemoryCap {
        &mut self.memory
    }
}
