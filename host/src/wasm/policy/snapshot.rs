//! Pre-initialisation: run a guest's `lifecycle.init` once and snapshot the
//! initialised instance (wasmtime's Wizer), so every per-request instance
//! starts with what `init` built — a parsed config, a word automaton — at
//! the cost of a copy-on-write mapping instead of a rebuild.

use wasmtime::component::{Instance, Lift, WasmList};
use wasmtime::Store;
use wasmtime_wizer::ComponentInstanceState;

use super::guest::GuestState;

/// Lets the snapshotter read the instrumented instance's state through the
/// accessor exports Wizer added to it.
pub struct Access<'a> {
    pub store: &'a mut Store<GuestState>,
    pub instance: Instance,
}

impl Access<'_> {
    async fn call<R: Lift + Send + Sync + 'static, Out>(
        &mut self,
        instance: &str,
        func: &str,
        read: impl FnOnce(&mut Store<GuestState>, R) -> Out,
    ) -> Out {
        // The trait gives no way to return an error: these exports were added
        // by the instrumentation a moment ago, so a failure here is a bug.
        let (_, exported) = self
            .instance
            .get_export(&mut *self.store, None, instance)
            .unwrap_or_else(|| panic!("snapshot: no export {instance}"));
        let (_, index) = self
            .instance
            .get_export(&mut *self.store, Some(&exported), func)
            .unwrap_or_else(|| panic!("snapshot: no export {instance}#{func}"));
        let typed = self
            .instance
            .get_typed_func::<(), (R,)>(&mut *self.store, index)
            .unwrap_or_else(|e| panic!("snapshot: {instance}#{func}: {e}"));
        let (value,) = typed
            .call_async(&mut *self.store, ())
            .await
            .unwrap_or_else(|e| panic!("snapshot: calling {instance}#{func}: {e}"));
        read(self.store, value)
    }
}

impl ComponentInstanceState for Access<'_> {
    async fn call_func_ret_list_u8(
        &mut self,
        instance: &str,
        func: &str,
        contents: impl FnOnce(&[u8]) + Send,
    ) {
        self.call(instance, func, |store, list: WasmList<u8>| {
            contents(list.as_le_slice(&*store))
        })
        .await
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func, |_, v: i32| v).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func, |_, v: i64| v).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call(instance, func, |_, v: f32| v.to_bits()).await
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call(instance, func, |_, v: f64| v.to_bits()).await
    }
}
