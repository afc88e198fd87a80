//! Following the replicas that share the state directory: what another
//! one deployed, rolled back or removed is loaded here, and the chain it
//! describes swapped in, within about one sync interval.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use super::storage::load_version;
use super::versions::{Entry, Version};
use super::{build_chain, Deployer, State};
use crate::policy::LoadedPolicy;

impl Deployer {
    /// Polls the state directory every `interval` and swaps in a chain
    /// another replica sharing it deployed (each converges within about
    /// one interval).
    pub async fn follow(self: Arc<Self>, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            let mut state = self.state.lock().await;
            match self.sync_locked(&mut state).await {
                Ok(true) => tracing::info!("policy chain updated from the shared state directory"),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    "reading the shared state directory failed, keeping the chain: {e:#}"
                ),
            }
        }
    }

    /// Loads the state file when it differs from what this replica last
    /// saw. Policies whose active version did not change are kept loaded;
    /// shadows of changed ones end (shadows are per replica).
    pub(super) async fn sync_locked(&self, state: &mut State) -> anyhow::Result<bool> {
        let Some(storage) = &self.storage else {
            return Ok(false);
        };
        let Some((bytes, entries)) = storage.changed()? else {
            return Ok(false);
        };
        let mut loaded = Vec::with_capacity(entries.len());
        let mut shadows = Vec::with_capacity(entries.len());
        for entry in &entries {
            let version = entry.active();
            let same = state.entries.iter().position(|e| {
                let active = e.active();
                e.name == entry.name
                    && e.on_error == entry.on_error
                    && active.sha256 == version.sha256
                    && active.config == version.config
            });
            match same {
                Some(i) => {
                    loaded.push(state.loaded[i].clone());
                    shadows.push(state.shadows[i].clone());
                }
                None => {
                    let policy = self
                        .load_off_executor(entry.clone(), version.clone())
                        .await
                        .with_context(|| {
                            format!("policy `{}` version {}", entry.name, version.version)
                        })?;
                    loaded.push(Arc::new(policy));
                    shadows.push(None);
                }
            }
        }
        *state = State {
            entries,
            loaded,
            shadows,
        };
        self.chain.store(Arc::new(build_chain(state)));
        storage.mark_seen(bytes);
        Ok(true)
    }

    /// [`load_version`] on a blocking thread (compiling takes real CPU).
    async fn load_off_executor(
        &self,
        entry: Entry,
        version: Version,
    ) -> anyhow::Result<LoadedPolicy> {
        let (runtime, fleet, storage) = (
            self.runtime.clone(),
            self.fleet.load(),
            self.storage.clone(),
        );
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            handle.block_on(load_version(
                &runtime,
                &fleet,
                storage.as_deref(),
                &entry,
                &version,
            ))
        })
        .await
        .context("the load task failed")?
    }
}
