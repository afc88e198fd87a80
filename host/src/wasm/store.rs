//! Stores bounded the same way for every guest: the state's [`MemoryCap`]
//! installed as the limiter, and the first epoch deadline one tick away
//! (what happens at the deadline is the caller's epoch callback).

use wasmtime::{Engine, Store};

use super::limits::MemoryCap;

/// A store's state that carries the cap its guest's memory grows under.
pub trait Capped: Send + 'static {
    fn memory_cap(&mut self) -> &mut MemoryCap;
}

/// A store for one instance on `engine`: memory capped, first deadline at
/// the next epoch tick.
pub fn bounded<T: Capped>(engine: &Engine, state: T) -> Store<T> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| s.memory_cap());
    store.set_epoch_deadline(1);
    store
}
