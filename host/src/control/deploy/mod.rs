//! Hot deploys: policy versions, rollback, shadows, and the chain swap.
//!
//! A new version is compiled, initialised and trialled away from the request
//! path (on a blocking thread); only then is a new chain built and swapped
//! in atomically. Each request keeps the chain it started with to its end,
//! streams included, and an old chain — with its compiled code — is freed
//! when its last request finishes. Deploys are persisted under the state
//! directory ([`storage`]), so they survive a restart, and replicas sharing
//! it follow each other ([`follow`]).

mod follow;
mod listing;
mod storage;
mod versions;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::sync::Mutex;

use crate::config::{OnError, PolicyConfig};
use crate::deploy_history::{History, How};
use crate::fleet::LiveFleet;
use crate::policy::{self, Chain, ChainEntry, LoadedPolicy, PolicySpec, Runtime, Shadow};
use crate::store::{StoreError, StoreLock};
pub use listing::{PolicyListing, ShadowReport, VersionListing};
use storage::{load_version, seed_entries, Storage};
use versions::Entry;
pub use versions::Version;

/// Why a deploy or admin operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    Invalid(String),
    #[error("no policy named `{0}`")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0:#}")]
    Internal(anyhow::Error),
    /// A version number that is not (or no longer) kept: 404.
    #[error("{0}")]
    VersionNotFound(String),
}

impl crate::problem::Problem for DeployError {
    fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            DeployError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            DeployError::NotFound(_) | DeployError::VersionNotFound(_) => StatusCode::NOT_FOUND,
            DeployError::Conflict(_) => StatusCode::CONFLICT,
            DeployError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
    fn code(&self) -> &str {
        match self {
            DeployError::Invalid(_) => "invalid_policy",
            DeployError::NotFound(_) => "policy_not_found",
            DeployError::Conflict(_) => "conflict",
            DeployError::Internal(_) => "internal_error",
            DeployError::VersionNotFound(_) => "version_not_found",
        }
    }
}

impl From<StoreError> for DeployError {
    fn from(e: StoreError) -> DeployError {
        match e {
            StoreError::Locked(_) => DeployError::Conflict(e.to_string()),
            e => DeployError::Internal(e.into()),
        }
    }
}

/// What `deploy` was asked to do beyond the bytes.
#[derive(Debug, Clone, Default)]
pub struct DeployRequest {
    pub config: Option<serde_json::Value>,
    /// Where a new policy goes in the chain (0 = first); default last.
    pub position: Option<usize>,
    pub on_error: Option<OnError>,
    /// Run beside the active version without affecting requests.
    pub shadow: bool,
    pub source: String,
}

struct State {
    entries: Vec<Entry>,
    /// The loaded active version of each entry, same order.
    loaded: Vec<Arc<LoadedPolicy>>,
    shadows: Vec<Option<(Version, Arc<Shadow>)>>,
}

pub struct Deployer {
    runtime: Arc<Runtime>,
    fleet: Arc<LiveFleet>,
    chain: Arc<ArcSwap<Chain>>,
    state: Mutex<State>,
    /// The state directory's policy part, when there is one.
    storage: Option<Arc<Storage>>,
}

impl Deployer {
    /// Loads the chain from the state directory when it holds one (deploys
    /// survive restarts), otherwise from the config's policies.
    pub async fn start(
        runtime: Arc<Runtime>,
        fleet: Arc<LiveFleet>,
        configs: &[PolicyConfig],
        state_dir: Option<PathBuf>,
    ) -> anyhow::Result<Deployer> {
        let storage = state_dir.map(|dir| Arc::new(Storage::new(dir)));
        let saved = match &storage {
            Some(storage) => storage.read()?,
            None => None,
        };
        let restored = saved.is_some();
        let entries = match (saved, &storage) {
            (Some(entries), Some(storage)) => {
                tracing::info!(state = %storage.file().display(), "policy chain restored from the state directory");
                entries
            }
            _ => seed_entries(configs, storage.as_deref())?,
        };
        let mut loaded = Vec::with_capacity(entries.len());
        for entry in &entries {
            let version = entry.active();
            let policy = load_version(&runtime, &fleet.load(), storage.as_deref(), entry, version)
                .await
                .with_context(|| format!("policy `{}` ({})", entry.name, version.source))?;
            loaded.push(Arc::new(policy));
        }
        let shadows = vec![None; entries.len()];
        let state = State {
            entries,
            loaded,
            shadows,
        };
        let chain = Arc::new(ArcSwap::from_pointee(build_chain(&state)));
        let deployer = Deployer {
            runtime,
            fleet,
            chain,
            state: Mutex::new(state),
            storage,
        };
        deployer.record_start(restored).await?;
        Ok(deployer)
    }

    /// Persists the state at start, under the shared directory's lock;
    /// a restored policy's history records that this replica resumed it.
    async fn record_start(&self, restored: bool) -> anyhow::Result<()> {
        let mut state = self.state.lock().await;
        let _store = self.lock_store(&mut state).await?;
        if restored {
            for entry in &mut state.entries {
                let active = u64::from(entry.active().version);
                entry.history.restarted(active);
            }
        }
        self.persist(&state)?;
        Ok(())
    }

    /// The live chain; requests load it once and keep it to their end.
    pub fn chain(&self) -> &Arc<ArcSwap<Chain>> {
        &self.chain
    }

    /// Deploys a new version of `name` (a new policy when the name is new),
    /// or a shadow version beside the active one.
    pub async fn deploy(
        &self,
        name: &str,
        bytes: Vec<u8>,
        request: DeployRequest,
    ) -> Result<Version, DeployError> {
        crate::config::names::check_policy_name(name).map_err(DeployError::Invalid)?;
        let mut state = self.state.lock().await;
        let _store = self.lock_store(&mut state).await?;
        let existing = state.entries.iter().position(|e| e.name == name);
        if request.shadow && existing.is_none() {
            return Err(DeployError::NotFound(name.to_string()));
        }
        let config = match (&request.config, existing) {
            (Some(config), _) => config.clone(),
            (None, Some(i)) => state.entries[i].active().config.clone(),
            (None, None) => serde_json::json!({}),
        };
        if !config.is_object() {
            return Err(DeployError::Invalid(
                "the policy config must be a JSON object".into(),
            ));
        }
        let on_error = request
            .on_error
            .or(existing.map(|i| state.entries[i].on_error))
            .unwrap_or_default();
        let loaded = self
            .compile(name, &bytes, request.source.clone(), &config, on_error)
            .await
            .map_err(|e| DeployError::Invalid(format!("{e:#}")))?;
        // Kept under its hash (never a `builtin:` name: deploys are bytes).
        if let Some(storage) = &self.storage {
            storage.put_module(&loaded.sha256, &bytes)?;
        }
        let module = format!("sha256:{}", loaded.sha256);
        let mut version = Version {
            version: 0,
            sha256: loaded.sha256.clone(),
            source: request.source,
            deployed_at: now(),
            config,
            module,
        };
        let loaded = Arc::new(loaded);
        match existing {
            Some(i) => {
                let entry = &mut state.entries[i];
                version.version = entry.next_version;
                entry.next_version += 1;
                entry.on_error = on_error;
                if request.shadow {
                    state.shadows[i] = Some((
                        version.clone(),
                        Arc::new(Shadow::new(loaded, version.version)),
                    ));
                } else {
                    entry.versions.push(version.clone());
                    entry.active = entry.versions.len() - 1;
                    entry
                        .history
                        .activate(u64::from(version.version), How::Deploy);
                    entry.prune();
                    state.loaded[i] = loaded;
                }
            }
            None => {
                version.version = 1;
                let position = request
                    .position
                    .unwrap_or(state.entries.len())
                    .min(state.entries.len());
                state.entries.insert(
                    position,
                    Entry {
                        name: name.to_string(),
                        on_error,
                        versions: vec![version.clone()],
                        active: 0,
                        next_version: 2,
                        history: History::begin(1, How::Deploy),
                    },
                );
                state.loaded.insert(position, loaded);
                state.shadows.insert(position, None);
            }
        }
        self.commit(&state)?;
        tracing::info!(policy = name, version = version.version, sha256 = %version.sha256, shadow = request.shadow, "policy deployed");
        Ok(version)
    }

    /// Undoes the last change to `name`: the version that served before
    /// the active one became active serves again. A second rollback walks
    /// further back (see [`crate::deploy_history`]); 409 when nothing
    /// served before.
    pub async fn rollback(&self, name: &str) -> Result<Version, DeployError> {
        let mut state = self.state.lock().await;
        let _store = self.lock_store(&mut state).await?;
        let i = index(&state, name)?;
        let position = state.entries[i].rollback_position()?;
        let version = self.switch(&mut state, i, position).await?;
        state.entries[i].history.roll_back();
        self.commit(&state)?;
        tracing::info!(
            policy = name,
            version = version.version,
            "policy rolled back"
        );
        Ok(version)
    }

    /// Makes the kept version numbered `number` active; a rollback then
    /// returns to the version active before.
    pub async fn activate(&self, name: &str, number: u32) -> Result<Version, DeployError> {
        let mut state = self.state.lock().await;
        let _store = self.lock_store(&mut state).await?;
        let i = index(&state, name)?;
        let position = state.entries[i].activation_position(number)?;
        let version = self.switch(&mut state, i, position).await?;
        state.entries[i]
            .history
            .activate(u64::from(number), How::Activate);
        state.entries[i].prune();
        self.commit(&state)?;
        tracing::info!(policy = name, version = number, "policy version activated");
        Ok(version)
    }

    /// Loads `versions[position]` of entry `i` and makes it the active
    /// one (not yet committed; the history is the caller's).
    async fn switch(
        &self,
        state: &mut State,
        i: usize,
        position: usize,
    ) -> Result<Version, DeployError> {
        let entry = &state.entries[i];
        let version = entry.versions[position].clone();
        let loaded = load_version(
            &self.runtime,
            &self.fleet.load(),
            self.storage.as_deref(),
            entry,
            &version,
        )
        .await
        .map_err(|e| DeployError::Invalid(format!("{e:#}")))?;
        state.entries[i].active = position;
        state.loaded[i] = Arc::new(loaded);
        Ok(version)
    }

    /// Takes a policy out of the chain.
    pub async fn remove(&self, name: &str) -> Result<(), DeployError> {
        let mut state = self.state.lock().await;
        let _store = self.lock_store(&mut state).await?;
        let i = index(&state, name)?;
        if state.entries.len() == 1 {
            return Err(DeployError::Conflict(format!(
                "removing `{name}` would leave the chain empty, and every request would fail"
            )));
        }
        state.entries.remove(i);
        state.loaded.remove(i);
        state.shadows.remove(i);
        self.commit(&state)?;
        tracing::info!(policy = name, "policy removed from the chain");
        Ok(())
    }

    /// Makes the shadow the active version (`promote`) or drops it.
    pub async fn end_shadow(&self, name: &str, promote: bool) -> Result<(), DeployError> {
        let mut state = self.state.lock().await;
        let _store = self.lock_store(&mut state).await?;
        let i = index(&state, name)?;
        let Some((version, shadow)) = state.shadows[i].take() else {
            return Err(DeployError::NotFound(format!("{name}'s shadow")));
        };
        if promote {
            let entry = &mut state.entries[i];
            entry
                .history
                .activate(u64::from(version.version), How::Promote);
            entry.versions.push(version);
            entry.active = entry.versions.len() - 1;
            entry.prune();
            state.loaded[i] = shadow.policy.clone();
        }
        self.commit(&state)?;
        tracing::info!(policy = name, promote, "shadow ended");
        Ok(())
    }

    /// Compiles on a blocking thread: a component's compilation takes tens
    /// of milliseconds of CPU that must not stall request handling.
    async fn compile(
        &self,
        name: &str,
        bytes: &[u8],
        source: String,
        config: &serde_json::Value,
        on_error: OnError,
    ) -> anyhow::Result<LoadedPolicy> {
        let (runtime, fleet) = (self.runtime.clone(), self.fleet.load());
        let (name, bytes, config) = (name.to_string(), bytes.to_vec(), config.clone());
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            handle.block_on(async {
                let spec = PolicySpec {
                    name: &name,
                    bytes: &bytes,
                    source,
                    config: &config,
                    on_error,
                };
                policy::load_policy(&runtime, &fleet, spec).await
            })
        })
        .await
        .context("the compile task failed")?
    }

    /// Persists the state and swaps in the chain it describes.
    fn commit(&self, state: &State) -> Result<(), DeployError> {
        self.persist(state)
            .map_err(|e| DeployError::Internal(e.into()))?;
        self.chain.store(Arc::new(build_chain(state)));
        Ok(())
    }

    /// Saves the chain to the state directory, when there is one.
    fn persist(&self, state: &State) -> Result<(), StoreError> {
        let Some(storage) = &self.storage else {
            return Ok(());
        };
        let shadows: Vec<&Version> = state.shadows.iter().flatten().map(|(v, _)| v).collect();
        storage.save(&state.entries, &shadows)
    }

    /// Takes the state directory's lock (other replicas sharing it wait),
    /// then catches up with what they wrote, so a change applies to the
    /// latest chain. Released when the guard drops.
    async fn lock_store(&self, state: &mut State) -> Result<Option<StoreLock>, DeployError> {
        let Some(storage) = &self.storage else {
            return Ok(None);
        };
        let lock = storage.lock().await?;
        self.sync_locked(state)
            .await
            .map_err(DeployError::Internal)?;
        Ok(Some(lock))
    }
}

fn build_chain(state: &State) -> Chain {
    let entries = state
        .loaded
        .iter()
        .zip(&state.shadows)
        .map(|(policy, shadow)| ChainEntry {
            policy: policy.clone(),
            shadow: shadow.as_ref().map(|(_, s)| s.clone()),
        })
        .collect();
    Chain::new(entries)
}

fn index(state: &State, name: &str) -> Result<usize, DeployError> {
    state
        .entries
        .iter()
        .position(|e| e.name == name)
        .ok_or_else(|| DeployError::NotFound(name.to_string()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
