//! The generated bindings of the policy world and the host side of its
//! imports: what a guest can read of the request and the fleet, bounded.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::backends::{Backend, Fleet};

wasmtime::component::bindgen!({
    path: "../wit",
    world: "policy",
    exports: { default: async },
});

pub use self::sluice::policy::types;

/// Headers a guest never sees: they carry the client's credentials.
const HIDDEN_HEADERS: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "api-key",
];

/// How much of a guest's stderr is kept to explain a trap (panic messages).
pub const STDERR_CAPACITY: usize = 4096;

/// The per-request state of one guest instance.
pub struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub memory: MemoryCap,
    /// Set when the epoch callback interrupted the guest for its timeout.
    pub timed_out: bool,
    pub stderr: MemoryOutputPipe,
    pub fleet: Arc<Fleet>,
    pub headers: Arc<HeaderMap>,
    pub body: Bytes,
    pub max_body_bytes: usize,
    pub policy_name: Arc<str>,
    pub config_json: Arc<str>,
}

impl GuestState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        memory_limit: usize,
        fleet: Arc<Fleet>,
        headers: Arc<HeaderMap>,
        body: Bytes,
        max_body_bytes: usize,
        policy_name: Arc<str>,
        config_json: Arc<str>,
    ) -> GuestState {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        // Locked down: no preopened files, no environment, no arguments,
        // sockets denied; stderr captured (bounded) to explain panics.
        let wasi = WasiCtx::builder().stderr(stderr.clone()).build();
        GuestState {
            wasi,
            table: ResourceTable::new(),
            memory: MemoryCap {
                limit: memory_limit,
                hit: false,
            },
            timed_out: false,
            stderr,
            fleet,
            headers,
            body,
            max_body_bytes,
            policy_name,
            config_json,
        }
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps a guest's linear memory and remembers whether the cap was hit, so a
/// memory bomb is reported as such rather than as a generic trap.
pub struct MemoryCap {
    limit: usize,
    pub hit: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = true;
            wasmtime::bail!("policy memory limit of {} bytes reached", self.limit);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

fn view(b: &Backend) -> types::Backend {
    types::Backend {
        name: b.name.to_string(),
        models: b.models.clone(),
        healthy: b.is_healthy(),
        in_flight: b.in_flight(),
        max_concurrent: b.max_concurrent,
        weight: b.weight,
        latency_us: b.latency_us(),
    }
}

impl types::Host for GuestState {}

impl sluice::policy::request_data::Host for GuestState {
    fn header(&mut self, name: String) -> Option<String> {
        let name = name.to_ascii_lowercase();
        if HIDDEN_HEADERS.contains(&name.as_str()) {
            return None;
        }
        let value = self.headers.get(name.as_str())?;
        Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
    }

    fn headers(&mut self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter(|(name, _)| !HIDDEN_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_string(), value)
            })
            .collect()
    }

    fn body(&mut self) -> Option<String> {
        if self.body.len() > self.max_body_bytes {
            return None;
        }
        // The host already checked the body is JSON, hence UTF-8.
        Some(String::from_utf8_lossy(&self.body).into_owned())
    }
}

impl sluice::policy::fleet::Host for GuestState {
    fn backends_for_model(&mut self, model: String) -> Vec<types::Backend> {
        self.fleet.serving(&model).iter().map(|b| view(b)).collect()
    }

    fn backends(&mut self) -> Vec<types::Backend> {
        self.fleet.backends().iter().map(|b| view(b)).collect()
    }
}

impl sluice::policy::host::Host for GuestState {
    fn log(&mut self, level: sluice::policy::host::Level, message: String) {
        use self::sluice::policy::host::Level;
        let policy = &*self.policy_name;
        let message: String = message.chars().take(1024).collect();
        match level {
            Level::Debug => tracing::debug!(policy, "{message}"),
            Level::Info => tracing::info!(policy, "{message}"),
            Level::Warn => tracing::warn!(policy, "{message}"),
            Level::Error => tracing::error!(policy, "{message}"),
        }
    }

    fn config(&mut self) -> String {
        self.config_json.to_string()
    }
}
