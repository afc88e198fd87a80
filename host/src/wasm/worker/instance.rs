//! How a worker's instances are made and ended: a fresh, bounded instance
//! per request (memory capped, yielding at every epoch tick), dropped once
//! its one request is answered or its time runs out.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use wasmtime::component::GuestTaskId;
use wasmtime::{Engine, Store, StoreContextMut, UpdateDeadline};
use wasmtime_wasi_http::handler::{
    HandlerState, Instance, ProxyPre, ShouldAccept, WorkerExpiration, WorkerState, WorkerStatus,
};

use super::state::WorkerStore;
use super::Bounds;
use crate::wasm::store;

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
        let mut store = store::bounded(&self.engine, WorkerStore::new(&self.bounds));
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
/// still ended (it yields every [`crate::wasm::engine::WORKER_TICK`]).
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
