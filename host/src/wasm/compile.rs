//! Compile-and-link: a component's bytes compiled on an engine and its
//! imports resolved against a linker, once, so each call only instantiates.
//! The one place its error messages are written, for policies and workers
//! alike.

use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::Engine;

/// Why a component's bytes cannot be instantiated by this host.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("not a valid WebAssembly component: {0}")]
    NotAComponent(String),
    #[error("imports something the host does not provide: {0}")]
    MissingImport(String),
}

/// A component compiled and linked: ready to be checked against the world
/// it should export, then instantiated.
pub struct Linked<T: 'static> {
    pub component: Component,
    pub pre: InstancePre<T>,
}

/// Compiles `bytes` on `engine` and resolves their imports with `linker`.
pub fn compile<T: 'static>(
    engine: &Engine,
    linker: &Linker<T>,
    bytes: &[u8],
) -> Result<Linked<T>, CompileError> {
    let component =
        Component::new(engine, bytes).map_err(|e| CompileError::NotAComponent(format!("{e:#}")))?;
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| CompileError::MissingImport(format!("{e:#}")))?;
    Ok(Linked { component, pre })
}

/// Names a failure to add `what`'s imports to a linker (a startup error).
pub fn linking(what: &str, result: wasmtime::Result<()>) -> anyhow::Result<()> {
    result.map_err(|e| anyhow::anyhow!("linking {what}: {e:#}"))
}
