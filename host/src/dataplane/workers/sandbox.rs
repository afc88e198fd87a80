//! Where workers run: their own wasmtime engine (component-model async on,
//! for `wasi:http` 0.3), a linker with WASI 0.2 and 0.3 and `wasi:http` of
//! both versions, and a fresh, bounded instance per request.
//!
//! The bounds are the policies': memory capped per instance, and an epoch
//! ticker that makes a looping guest yield so its request can expire
//! (`timeout`) and its instance be dropped. Each instance serves one
//! request, so nothing a request leaves behind reaches another.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, GuestTaskId, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreContextMut, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::handler::{
    HandlerState, Instance, ProxyPre, ShouldAccept, WorkerExpiration, WorkerState, WorkerStatus,
};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::outbound::{AllowedHost, Outbound};
use crate::policy::MemoryCap;

/// How often a running worker yields (and can be expired).
const TICK: Duration = Duration::from_millis(5);

/// Which `wasi:http` world a component exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `wasi:http/incoming-handler@0.2.x` (the `wasi` crate, Spin 2/3).
    P2,
    /// `wasi:http/handler@0.3.x` (spin-sdk 7's `#[http_service]`).
    P3,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::P2 => "wasi:http/incoming-handler@0.2",
            Kind::P3 => "wasi:http/handler@0.3",
        }
    }
}

/// The engine and linker every worker shares.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<WorkerStore>,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl Sandbox {
    pub fn new() -> anyhow::Result<Sandbox> {
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .wasm_component_model_async(true);
        let engine = Engine::new(&config)
            .map_err(|e| anyhow::anyhow!("creating the workers' wasm engine: {e:#}"))?;
        let mut linker = Linker::new(&engine);
        let link = |what: &str, result: wasmtime::Result<()>| {
            result.map_err(|e| anyhow::anyhow!("linking {what} for workers: {e:#}"))
        };
        link(
            "WASI 0.2",
            wasmtime_wasi::p2::add_to_linker_async(&mut linker),
        )?;
        link("WASI 0.3", wasmtime_wasi::p3::add_to_linker(&mut linker))?;
        link(
            "wasi:http 0.2",
            wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker),
        )?;
        link(
            "wasi:http 0.3",
            wasmtime_wasi_http::p3::add_to_linker(&mut linker),
        )?;

        let stop_ticker =
            crate::policy::runtime::start_ticker(&engine, TICK, "sluice-worker-epoch")?;
        Ok(Sandbox {
            engine,
            linker,
            stop_ticker,
        })
    }

    /// Compiles a component and resolves its imports. Fails naming the
    /// problem: not a component, an import the host does not provide, or
    /// neither `wasi:http` handler exported.
    pub fn compile(&self, bytes: &[u8]) -> anyhow::Result<(ProxyPre<WorkerStore>, Kind)> {
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| anyhow::anyhow!("not a valid WebAssembly component: {e:#}"))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow::anyhow!("imports something the host does not provide: {e:#}"))?;
        let p3_error = match wasmtime_wasi_http::p3::bindings::ServicePre::new(pre.clone()) {
            Ok(service) => return Ok((ProxyPre::P3(service), Kind::P3)),
            Err(e) => e,
        };
        match wasmtime_wasi_http::p2::bindings::ProxyPre::new(pre) {
            Ok(proxy) => Ok((ProxyPre::P2(proxy), Kind::P2)),
            Err(p2_error) => anyhow::bail!(
                "exports neither wasi:http/handler@0.3 ({p3_error:#}) nor \
                 wasi:http/incoming-handler@0.2 ({p2_error:#})"
            ),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// What bounds and configures one worker's instances.
#[derive(Clone)]
pub struct Bounds {
    pub worker: Arc<str>,
    pub allowed: Arc<[AllowedHost]>,
    pub env: Arc<[(String, String)]>,
    pub timeout: Duration,
    pub memory_limit: usize,
}

/// The most one worker instance (one request) writes to the gateway's
/// stderr; what it writes beyond is dropped, with one line saying so.
const STDERR_LIMIT: usize = 64 << 10;
/// How much one stderr write may carry.
const STDERR_WRITE_BUDGET: usize = 4096;

/// A worker instance's stderr: passed to the gateway's, up to
/// [`STDERR_LIMIT`] bytes, then swallowed (the worker never sees a failed
/// write, which would make a panicking `eprintln!` out of a chatty log).
struct BoundedStderr {
    worker: Arc<str>,
    left: usize,
}

impl BoundedStderr {
    fn new(worker: Arc<str>) -> BoundedStderr {
        BoundedStderr {
            worker,
            left: STDERR_LIMIT,
        }
    }
}

impl tokio::io::AsyncWrite for BoundedStderr {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::io::Write;
        if self.left > 0 {
            let take = buf.len().min(self.left);
            self.left -= take;
            let mut stderr = std::io::stderr().lock();
            let _ = stderr.write_all(&buf[..take]);
            if self.left == 0 {
                let _ = writeln!(
                    stderr,
                    "\n[worker `{}` wrote more than {STDERR_LIMIT} bytes to stderr in one request; the rest is dropped]",
                    self.worker
                );
            }
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The state of one worker instance's store.
pub struct WorkerStore {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: Outbound,
    memory: MemoryCap,
}

impl WorkerStore {
    fn new(bounds: &Bounds) -> WorkerStore {
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

    fn view(&mut self) -> WasiHttpCtxView<'_> {
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

/// One deployed version of a worker: how to make its instances.
pub struct Version {
    pub engine: Engine,
    pub pre: ProxyPre<WorkerStore>,
    pub bounds: Bounds,
}

impl HandlerState for Version {
    type StoreData = WorkerStore;
    type WorkerExpiration = Expiry;
    type WorkerState = OneRequest;

    async fn instantiate(&self) -> wasmtime::Result<Instance<WorkerStore, Expiry, OneRequest>> {
        let mut store = Store::new(&self.engine, WorkerStore::new(&self.bounds));
        store.limiter(|s| &mut s.memory);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
        let proxy = self.pre.instantiate_async(&mut store).await?;
        Ok(Instance {
            store,
            proxy,
            view: WorkerStore::view,
            expiration: Expiry::new(self.bounds.timeout),
            state: OneRequest {
                worker: self.bounds.worker.clone(),
                timeout: self.bounds.timeout,
            },
        })
    }
}

/// Each instance takes one request, then is dropped once it is done.
pub struct OneRequest {
    worker: Arc<str>,
    timeout: Duration,
}

impl WorkerState for OneRequest {
    type StoreData = WorkerStore;
    type RequestData = ();

    fn should_accept_request(&self, _concurrent: usize, total: usize) -> ShouldAccept {
        if total == 0 {
            ShouldAccept::Yes
        } else {
            ShouldAccept::Never
        }
    }

    fn on_request_start(
        &self,
        _store: StoreContextMut<'_, WorkerStore>,
        _data: (),
        _task: GuestTaskId,
    ) -> Pin<Box<dyn Future<Output = ()> + 'static + Send + Sync>> {
        Box::pin(tokio::time::sleep(self.timeout))
    }

    fn drop(&self, store: Store<WorkerStore>, result: wasmtime::Result<()>) {
        if let Err(error) = result {
            let memory = store.data().memory.hit;
            tracing::warn!(
                worker = &*self.worker,
                memory_limit_hit = memory,
                error = format!("{error:#}"),
                "worker instance ended with an error"
            );
        }
    }
}

/// Ends an instance whose request (or the body after it) ran past the
/// timeout — polled outside the guest, so a guest that never returns is
/// still ended (it yields every [`TICK`]).
pub struct Expiry {
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Expiry {
    fn new(timeout: Duration) -> Expiry {
        Expiry {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl WorkerExpiration for Expiry {
    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        status: WorkerStatus,
        start: Instant,
    ) -> Poll<()> {
        let this = self.get_mut();
        let limit = match status {
            WorkerStatus::Requests | WorkerStatus::PostReturn => this.timeout,
            // Idle: the one request is answered and nothing runs; a moment's
            // grace for the instance to notice by itself.
            WorkerStatus::Idle => Duration::from_secs(1),
        };
        let deadline = tokio::time::Instant::from_std(start + limit);
        if this.sleep.deadline() != deadline {
            this.sleep.as_mut().reset(deadline);
        }
        this.sleep.as_mut().poll(cx)
    }
}
