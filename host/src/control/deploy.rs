//! Hot deploys: policy versions, rollback, shadows, and the chain swap.
//!
//! A new version is compiled, initialised and trialled away from the request
//! path (on a blocking thread); only then is a new chain built and swapped
//! in atomically. Each request keeps the chain it started with to its end,
//! streams included, and an old chain — with its compiled code — is freed
//! when its last request finishes. Deploys are persisted under the state
//! directory, so they survive a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::config::{OnError, PolicyConfig};
use crate::deploy_history::{ActivationListing, History, How};
use crate::fleet::LiveFleet;
use crate::policy::{
    self, Chain, ChainEntry, LoadedPolicy, PolicySpec, Runtime, Shadow, ShadowStats,
};

/// Versions of a policy kept for rollback; older ones (and their module
/// files, when nothing else uses them) are deleted.
const KEEP_VERSIONS: usize = 10;

/// Why a deploy or admin operation was refused. Callers map kinds to
/// statuses: `Invalid` 422, `NotFound` 404, `Conflict` 409, `Internal` 500.
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

/// One version of a policy, as listed and persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Version {
    pub version: u32,
    pub sha256: String,
    /// `builtin:NAME`, `config:PATH`, `api`, `watch:FILE`.
    pub source: String,
    /// Unix seconds.
    pub deployed_at: u64,
    pub config: serde_json::Value,
    /// `builtin:NAME`, or `sha256:HEX` for a file in the module store.
    pub module: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    name: String,
    on_error: OnError,
    versions: Vec<Version>,
    /// Index into `versions` of the active one.
    active: usize,
    next_version: u32,
    /// Which version served when; what a rollback returns to. Absent from
    /// state files written before it was kept (a restart starts it).
    #[serde(default)]
    history: History,
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

#[derive(Debug, Serialize)]
pub struct PolicyListing {
    pub name: String,
    pub position: usize,
    pub on_error: OnError,
    pub contract: &'static str,
    pub active_version: u32,
    pub versions: Vec<VersionListing>,
    pub shadow: Option<VersionListing>,
    /// The version a rollback returns to, if any.
    pub rollback_to: Option<u64>,
    /// Activations, newest first.
    pub history: Vec<ActivationListing>,
}

#[derive(Debug, Serialize)]
pub struct VersionListing {
    #[serde(flatten)]
    pub version: Version,
    pub active: bool,
}

#[derive(Debug, Serialize)]
pub struct ShadowReport {
    pub policy: String,
    pub active_version: u32,
    pub shadow_version: u32,
    #[serde(flatten)]
    pub stats: ShadowStats,
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
    state_dir: Option<PathBuf>,
    /// The state file as this replica last wrote or read it: another
    /// replica sharing the directory changed it when it differs.
    last_seen: std::sync::Mutex<Vec<u8>>,
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
        let saved = match &state_dir {
            Some(dir) => read_state(dir)?,
            None => None,
        };
        let restored = saved.is_some();
        let entries = match saved {
            Some(entries) => {
                tracing::info!(state = %state_file(state_dir.as_deref().unwrap_or(Path::new("."))).display(), "policy chain restored from the state directory");
                entries
            }
            None => seed_entries(configs, state_dir.as_deref())?,
        };
        let mut loaded = Vec::with_capacity(entries.len());
        for entry in &entries {
            let version = &entry.versions[entry.active];
            let policy = load_version(
                &runtime,
                &fleet.load(),
                state_dir.as_deref(),
                entry,
                version,
            )
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
            state_dir,
            last_seen: Default::default(),
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
                let active = u64::from(entry.versions[entry.active].version);
                entry.history.restarted(active);
            }
        }
        self.persist(&state)
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
            (None, Some(i)) => state.entries[i].versions[state.entries[i].active]
                .config
                .clone(),
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
        let module = self
            .store_module(&bytes, &loaded.sha256)
            .map_err(DeployError::Internal)?;
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
                    prune(entry);
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
        let entry = &state.entries[i];
        let Some(target) = entry.history.rollback_target() else {
            return Err(DeployError::Conflict(format!(
                "policy `{name}` has no earlier version to roll back to: nothing served before version {}",
                entry.versions[entry.active].version
            )));
        };
        let Some(position) = entry
            .versions
            .iter()
            .position(|v| u64::from(v.version) == target)
        else {
            return Err(DeployError::Conflict(format!(
                "policy `{name}`: version {target}, which served before, is no longer kept"
            )));
        };
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
        let entry = &state.entries[i];
        let Some(position) = entry.versions.iter().position(|v| v.version == number) else {
            let kept: Vec<String> = entry
                .versions
                .iter()
                .map(|v| v.version.to_string())
                .collect();
            return Err(DeployError::VersionNotFound(format!(
                "policy `{name}` has no version {number} (kept: {})",
                kept.join(", ")
            )));
        };
        if position == entry.active {
            return Err(DeployError::Conflict(format!(
                "version {number} of policy `{name}` is already active"
            )));
        }
        let version = self.switch(&mut state, i, position).await?;
        state.entries[i]
            .history
            .activate(u64::from(number), How::Activate);
        prune(&mut state.entries[i]);
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
            self.state_dir.as_deref(),
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

    pub async fn shadow_report(&self, name: &str) -> Result<ShadowReport, DeployError> {
        let state = self.state.lock().await;
        let i = index(&state, name)?;
        let Some((version, shadow)) = &state.shadows[i] else {
            return Err(DeployError::NotFound(format!("{name}'s shadow")));
        };
        let entry = &state.entries[i];
        Ok(ShadowReport {
            policy: name.to_string(),
            active_version: entry.versions[entry.active].version,
            shadow_version: version.version,
            stats: shadow.stats(),
        })
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
            prune(entry);
            state.loaded[i] = shadow.policy.clone();
        }
        self.commit(&state)?;
        tracing::info!(policy = name, promote, "shadow ended");
        Ok(())
    }

    pub async fn list(&self) -> Vec<PolicyListing> {
        let state = self.state.lock().await;
        state
            .entries
            .iter()
            .enumerate()
            .map(|(position, entry)| PolicyListing {
                name: entry.name.clone(),
                position,
                on_error: entry.on_error,
                contract: state.loaded[position].contract,
                active_version: entry.versions[entry.active].version,
                versions: entry
                    .versions
                    .iter()
                    .enumerate()
                    .map(|(i, v)| VersionListing {
                        version: v.clone(),
                        active: i == entry.active,
                    })
                    .collect(),
                shadow: state.shadows[position]
                    .as_ref()
                    .map(|(v, _)| VersionListing {
                        version: v.clone(),
                        active: false,
                    }),
                rollback_to: entry.history.rollback_target(),
                history: entry.history.listing(crate::deploy_history::replica()),
            })
            .collect()
    }

    /// Each policy's active module hash and config, for the watcher.
    async fn active_versions(
        &self,
    ) -> std::collections::HashMap<String, (String, serde_json::Value)> {
        let state = self.state.lock().await;
        state
            .entries
            .iter()
            .map(|e| {
                let v = &e.versions[e.active];
                (e.name.clone(), (v.sha256.clone(), v.config.clone()))
            })
            .collect()
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
        self.persist(state).map_err(DeployError::Internal)?;
        self.chain.store(Arc::new(build_chain(state)));
        Ok(())
    }

    fn persist(&self, state: &State) -> anyhow::Result<()> {
        let Some(dir) = &self.state_dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = state_file(dir);
        let temp = file.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&state.entries)?;
        std::fs::write(&temp, &bytes).with_context(|| format!("writing {}", temp.display()))?;
        std::fs::rename(&temp, &file).with_context(|| format!("replacing {}", file.display()))?;
        if let Ok(mut seen) = self.last_seen.lock() {
            *seen = bytes;
        }
        let shadows: Vec<&Version> = state.shadows.iter().flatten().map(|(v, _)| v).collect();
        remove_unused_modules(dir, &state.entries, &shadows);
        Ok(())
    }

    /// Keeps a copy of a deployed component in the state directory, named
    /// by its hash; `builtin:` bytes are never copied.
    fn store_module(&self, bytes: &[u8], sha256: &str) -> anyhow::Result<String> {
        if let Some(dir) = &self.state_dir {
            let modules = dir.join("modules");
            std::fs::create_dir_all(&modules)?;
            let path = modules.join(format!("{sha256}.wasm"));
            if !path.exists() {
                std::fs::write(&path, bytes)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Ok(format!("sha256:{sha256}"))
    }

    /// Takes the state directory's lock (other replicas sharing it wait),
    /// then catches up with what they wrote, so a change applies to the
    /// latest chain. Released when the guard drops.
    async fn lock_store(&self, state: &mut State) -> Result<Option<std::fs::File>, DeployError> {
        let Some(dir) = &self.state_dir else {
            return Ok(None);
        };
        std::fs::create_dir_all(dir).map_err(|e| DeployError::Internal(e.into()))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))
            .map_err(|e| DeployError::Internal(e.into()))?;
        let started = std::time::Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < STORE_LOCK_WAIT => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    return Err(DeployError::Conflict(format!(
                        "the shared state directory stays locked by another replica: {e}"
                    )))
                }
            }
        }
        self.sync_locked(state)
            .await
            .map_err(DeployError::Internal)?;
        Ok(Some(file))
    }

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
    async fn sync_locked(&self, state: &mut State) -> anyhow::Result<bool> {
        let Some(dir) = &self.state_dir else {
            return Ok(false);
        };
        let bytes = match std::fs::read(state_file(dir)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", state_file(dir).display()))
            }
        };
        if self.last_seen.lock().is_ok_and(|seen| *seen == bytes) {
            return Ok(false);
        }
        let entries: Vec<Entry> = serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", state_file(dir).display()))?;
        let mut loaded = Vec::with_capacity(entries.len());
        let mut shadows = Vec::with_capacity(entries.len());
        for entry in &entries {
            let version = &entry.versions[entry.active];
            let same = state.entries.iter().position(|e| {
                let active = &e.versions[e.active];
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
        if let Ok(mut seen) = self.last_seen.lock() {
            *seen = bytes;
        }
        Ok(true)
    }

    /// [`load_version`] on a blocking thread (compiling takes real CPU).
    async fn load_off_executor(
        &self,
        entry: Entry,
        version: Version,
    ) -> anyhow::Result<LoadedPolicy> {
        let (runtime, fleet, dir) = (
            self.runtime.clone(),
            self.fleet.load(),
            self.state_dir.clone(),
        );
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            handle.block_on(load_version(
                &runtime,
                &fleet,
                dir.as_deref(),
                &entry,
                &version,
            ))
        })
        .await
        .context("the load task failed")?
    }

    /// Polls `dir` every `interval`: a new or changed `NAME.wasm` (or
    /// `NAME.json`, its config) deploys policy NAME. A pair identical to the
    /// active version is left alone, so a restart does not redeploy it.
    pub async fn watch(self: Arc<Self>, dir: PathBuf, interval: Duration) {
        tracing::info!(dir = %dir.display(), "watching for policy files");
        // What was last deployed (or refused) per file, as hash + config.
        let mut seen: std::collections::HashMap<String, (String, serde_json::Value)> =
            self.active_versions().await;
        loop {
            let files = match std::fs::read_dir(&dir) {
                Ok(files) => files,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read the watched directory");
                    tokio::time::sleep(interval).await;
                    continue;
                }
            };
            for file in files.flatten() {
                let path = file.path();
                let (Some(name), Some("wasm")) = (
                    path.file_stem().and_then(|s| s.to_str()),
                    path.extension().and_then(|s| s.to_str()),
                ) else {
                    continue;
                };
                let Ok(bytes) = std::fs::read(&path) else {
                    continue;
                };
                let sha = {
                    use sha2::Digest;
                    policy::hex(&sha2::Sha256::digest(&bytes))
                };
                let config: Option<serde_json::Value> = match std::fs::read(
                    path.with_extension("json"),
                ) {
                    Ok(text) => match serde_json::from_slice(&text) {
                        Ok(config) => Some(config),
                        Err(e) => {
                            tracing::error!(file = %path.display(), error = %e, "policy config is not JSON; not deployed");
                            continue;
                        }
                    },
                    Err(_) => None,
                };
                let previous = seen.get(name);
                let effective = config
                    .clone()
                    .or_else(|| previous.map(|(_, c)| c.clone()))
                    .unwrap_or_else(|| serde_json::json!({}));
                if previous == Some(&(sha.clone(), effective.clone())) {
                    continue;
                }
                seen.insert(name.to_string(), (sha, effective));
                let request = DeployRequest {
                    config,
                    source: format!("watch:{}", path.display()),
                    ..DeployRequest::default()
                };
                match self.deploy(name, bytes, request).await {
                    Ok(v) => tracing::info!(
                        policy = name,
                        version = v.version,
                        "deployed from the watched directory"
                    ),
                    Err(e) => {
                        tracing::error!(policy = name, file = %path.display(), error = %e, "deploy from the watched directory refused")
                    }
                }
            }
            tokio::time::sleep(interval).await;
        }
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

/// Keeps every version a rollback can reach, then the newest others, up
/// to [`KEEP_VERSIONS`].
fn prune(entry: &mut Entry) {
    let active = entry.versions[entry.active].version;
    let numbers = entry.versions.iter().rev().map(|v| u64::from(v.version));
    let keep = entry.history.keep(numbers, KEEP_VERSIONS);
    entry
        .versions
        .retain(|v| keep.contains(&u64::from(v.version)));
    entry.history.retain(|v| keep.contains(&v), KEEP_VERSIONS);
    entry.active = entry
        .versions
        .iter()
        .position(|v| v.version == active)
        .unwrap_or(0);
}

/// How long a change waits for another replica's change to the shared
/// state directory.
const STORE_LOCK_WAIT: Duration = Duration::from_secs(30);

fn state_file(dir: &Path) -> PathBuf {
    dir.join("policies.json")
}

fn read_state(dir: &Path) -> anyhow::Result<Option<Vec<Entry>>> {
    let file = state_file(dir);
    match std::fs::read(&file) {
        Ok(text) => {
            let entries: Vec<Entry> = serde_json::from_slice(&text)
                .with_context(|| format!("reading {}", file.display()))?;
            Ok((!entries.is_empty()).then_some(entries))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

/// The config's policies as the first version of each.
fn seed_entries(configs: &[PolicyConfig], state_dir: Option<&Path>) -> anyhow::Result<Vec<Entry>> {
    use sha2::Digest;
    configs
        .iter()
        .map(|config| {
            let bytes = policy::module_bytes(&config.module)?;
            let sha256 = policy::hex(&sha2::Sha256::digest(&bytes));
            // Builtins stay names; files are copied into the state directory,
            // or, without one, referred to where they are.
            let module = match state_dir {
                _ if config.module.starts_with("builtin:") => config.module.clone(),
                Some(dir) => {
                    let modules = dir.join("modules");
                    std::fs::create_dir_all(&modules)?;
                    std::fs::write(modules.join(format!("{sha256}.wasm")), &bytes)?;
                    format!("sha256:{sha256}")
                }
                None => config.module.clone(),
            };
            let source = if config.module.starts_with("builtin:") {
                config.module.clone()
            } else {
                format!("config:{}", config.module)
            };
            Ok(Entry {
                name: config.name.clone(),
                on_error: config.on_error,
                versions: vec![Version {
                    version: 1,
                    sha256,
                    source,
                    deployed_at: now(),
                    config: config.config.clone(),
                    module,
                }],
                active: 0,
                next_version: 2,
                history: History::begin(1, How::Config),
            })
        })
        .collect()
}

async fn load_version(
    runtime: &Runtime,
    fleet: &Arc<crate::fleet::Fleet>,
    state_dir: Option<&Path>,
    entry: &Entry,
    version: &Version,
) -> anyhow::Result<LoadedPolicy> {
    let bytes: Vec<u8> = match version.module.strip_prefix("sha256:") {
        Some(sha) => {
            let dir = state_dir.context("a deployed module needs a state directory")?;
            let path = dir.join("modules").join(format!("{sha}.wasm"));
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?
        }
        None => policy::module_bytes(&version.module)?.into_owned(),
    };
    let spec = PolicySpec {
        name: &entry.name,
        bytes: &bytes,
        source: version.source.clone(),
        config: &version.config,
        on_error: entry.on_error,
    };
    policy::load_policy(runtime, fleet, spec).await
}

/// Deletes module files no kept version refers to.
fn remove_unused_modules(dir: &Path, entries: &[Entry], shadows: &[&Version]) {
    let used: std::collections::HashSet<String> = entries
        .iter()
        .flat_map(|e| e.versions.iter())
        .chain(shadows.iter().copied())
        .filter_map(|v| {
            v.module
                .strip_prefix("sha256:")
                .map(|s| format!("{s}.wasm"))
        })
        .collect();
    let Ok(files) = std::fs::read_dir(dir.join("modules")) else {
        return;
    };
    for file in files.flatten() {
        let name = file.file_name().to_string_lossy().into_owned();
        if !used.contains(&name) {
            let _ = std::fs::remove_file(file.path());
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
