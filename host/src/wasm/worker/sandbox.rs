//! Where workers run: the worker engine ([`engine::for_workers`]:
//! component-model async on, for `wasi:http` 0.3) and a linker with WASI 0.2
//! and 0.3 and `wasi:http` of both versions, shared by every worker.

use wasmtime::component::Linker;
use wasmtime_wasi_http::handler::{ProxyHandler, ProxyPre};

use super::handler::Handler;
use super::instance::Version;
use super::state::WorkerStore;
use super::Bounds;
use crate::wasm::compile::{compile, linking};
use crate::wasm::engine::{self, Ticking};

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

/// Adds one set of host imports to the workers' linker.
type AddImports = fn(&mut Linker<WorkerStore>) -> wasmtime::Result<()>;

/// The engine and linker every worker shares.
pub struct Sandbox {
    engine: Ticking,
    linker: Linker<WorkerStore>,
}

impl Sandbox {
    pub fn new() -> anyhow::Result<Sandbox> {
        let engine = engine::for_workers()?;
        let mut linker = Linker::new(&engine.engine);
        let imports: [(&str, AddImports); 4] = [
            ("WASI 0.2", wasmtime_wasi::p2::add_to_linker_async),
            ("WASI 0.3", wasmtime_wasi::p3::add_to_linker),
            (
                "wasi:http 0.2",
                wasmtime_wasi_http::p2::add_only_http_to_linker_async,
            ),
            ("wasi:http 0.3", wasmtime_wasi_http::p3::add_to_linker),
        ];
        for (what, add) in imports {
            linking(&format!("{what} for workers"), add(&mut linker))?;
        }
        Ok(Sandbox { engine, linker })
    }

    /// Compiles a component, resolves its imports, and makes the handler
    /// that serves its requests within `bounds`. Fails naming the problem:
    /// not a component, an import the host does not provide, or neither
    /// `wasi:http` handler exported.
    pub fn compile(&self, bytes: &[u8], bounds: Bounds) -> anyhow::Result<(Handler, Kind)> {
        let linked = compile(&self.engine.engine, &self.linker, bytes)?;
        let (pre, kind) =
            match wasmtime_wasi_http::p3::bindings::ServicePre::new(linked.pre.clone()) {
                Ok(service) => (ProxyPre::P3(service), Kind::P3),
                Err(p3_error) => {
                    match wasmtime_wasi_http::p2::bindings::ProxyPre::new(linked.pre) {
                        Ok(proxy) => (ProxyPre::P2(proxy), Kind::P2),
                        Err(p2_error) => anyhow::bail!(
                            "exports neither wasi:http/handler@0.3 ({p3_error:#}) nor \
                     wasi:http/incoming-handler@0.2 ({p2_error:#})"
                        ),
                    }
                }
            };
        let version = Version {
            engine: self.engine.engine.clone(),
            pre,
            bounds,
        };
        Ok((Handler::new(ProxyHandler::new(version)), kind))
    }
}
