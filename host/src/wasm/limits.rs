//! The memory cap every guest instance runs under, policy or worker.

use wasmtime::ResourceLimiter;

/// Caps a guest's linear memory and remembers whether the cap was hit, so a
/// memory bomb is reported as such rather than as a generic trap.
pub struct MemoryCap {
    limit: usize,
    pub hit: bool,
    /// Bytes the guest's memories grew by since instantiation.
    pub grown: usize,
}

impl MemoryCap {
    pub fn new(limit: usize) -> MemoryCap {
        MemoryCap {
            limit,
            hit: false,
            grown: 0,
        }
    }
}

/// Tables a guest may grow to, in elements.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = true;
            wasmtime::bail!("guest memory limit of {} bytes reached", self.limit);
        }
        self.grown += desired.saturating_sub(current);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
