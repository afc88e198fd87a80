//! Where policy deploys are kept in the state directory: the chain as
//! `policies.json`, each deployed module as `modules/<sha256>.wasm`.
//! Without a state directory nothing is kept, and modules are referred
//! to where they are.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;

use super::versions::{Entry, Version};
use crate::config::PolicyConfig;
use crate::deploy_history::{History, How};
use crate::policy::{self, LoadedPolicy, PolicySpec, Runtime};
use crate::store::{sha256_hex, Document, Modules, Store, StoreError, StoreLock};

/// A chain another replica saved: its bytes (for [`Storage::mark_seen`]) and
/// its entries.
pub(super) type SavedChain = (Vec<u8>, Vec<Entry>);

pub(super) struct Storage {
    store: Store,
    chain: Document,
    modules: Modules,
}

impl Storage {
    pub fn new(dir: PathBuf) -> Storage {
        let store = Store::new(dir);
        Storage {
            chain: store.document("policies.json"),
            modules: store.modules("modules"),
            store,
        }
    }

    pub fn file(&self) -> &Path {
        self.chain.path()
    }

    pub async fn lock(&self) -> Result<StoreLock, StoreError> {
        self.store.lock().await
    }

    /// The saved chain; `None` when there is none (or it is empty).
    pub fn read(&self) -> Result<Option<Vec<Entry>>, StoreError> {
        let Some(bytes) = self.chain.read()? else {
            return Ok(None);
        };
        let entries: Vec<Entry> = self.chain.parse(&bytes)?;
        Ok((!entries.is_empty()).then_some(entries))
    }

    /// The chain another replica saved since this one last wrote or took
    /// one in, with its bytes for [`Storage::mark_seen`].
    pub fn changed(&self) -> Result<Option<SavedChain>, StoreError> {
        let Some(bytes) = self.chain.changed()? else {
            return Ok(None);
        };
        let entries = self.chain.parse(&bytes)?;
        Ok(Some((bytes, entries)))
    }

    pub fn mark_seen(&self, bytes: Vec<u8>) {
        self.chain.mark_seen(bytes);
    }

    /// Saves the chain, then deletes the module files no kept version (nor
    /// a running shadow) refers to.
    pub fn save(&self, entries: &[Entry], shadows: &[&Version]) -> Result<(), StoreError> {
        self.chain.write_json(entries)?;
        let used: HashSet<&str> = entries
            .iter()
            .flat_map(|e| e.versions.iter())
            .chain(shadows.iter().copied())
            .filter_map(Version::stored_module)
            .collect();
        self.modules.retain(&used);
        Ok(())
    }

    /// Keeps a deployed component's bytes, named by their hash.
    pub fn put_module(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.modules.put_as(sha256, bytes)
    }
}

/// A deployed version's module reference: `builtin:` names stay names;
/// other bytes go to the module store, or, without one, are referred to
/// where they are (`fallback`).
pub(super) fn module_reference(
    storage: Option<&Storage>,
    fallback: &str,
    sha256: &str,
    bytes: &[u8],
) -> Result<String, StoreError> {
    match storage {
        _ if fallback.starts_with("builtin:") => Ok(fallback.to_string()),
        Some(storage) => {
            storage.put_module(sha256, bytes)?;
            Ok(format!("sha256:{sha256}"))
        }
        None => Ok(fallback.to_string()),
    }
}

/// The config's policies as the first version of each.
pub(super) fn seed_entries(
    configs: &[PolicyConfig],
    storage: Option<&Storage>,
) -> anyhow::Result<Vec<Entry>> {
    configs
        .iter()
        .map(|config| {
            let bytes = policy::module_bytes(&config.module)?;
            let sha256 = sha256_hex(&bytes);
            let module = module_reference(storage, &config.module, &sha256, &bytes)?;
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
                    deployed_at: super::now(),
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

/// The bytes of `version`'s module.
fn module_bytes(storage: Option<&Storage>, version: &Version) -> anyhow::Result<Vec<u8>> {
    match version.stored_module() {
        Some(sha) => {
            let storage = storage.context("a deployed module needs a state directory")?;
            Ok(storage.modules.get(sha)?)
        }
        None => Ok(policy::module_bytes(&version.module)?.into_owned()),
    }
}

/// Compiles and initialises `version` of `entry`.
pub(super) async fn load_version(
    runtime: &Runtime,
    fleet: &Arc<crate::fleet::Fleet>,
    storage: Option<&Storage>,
    entry: &Entry,
    version: &Version,
) -> anyhow::Result<LoadedPolicy> {
    let bytes = module_bytes(storage, version)?;
    let spec = PolicySpec {
        name: &entry.name,
        bytes: &bytes,
        source: version.source.clone(),
        config: &version.config,
        on_error: entry.on_error,
    };
    policy::load_policy(runtime, fleet, spec).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::scratch::Scratch;

    fn entry(name: &str, modules: &[&str]) -> Entry {
        let versions: Vec<Version> = modules
            .iter()
            .enumerate()
            .map(|(i, module)| Version {
                version: i as u32 + 1,
                sha256: module.trim_start_matches("sha256:").into(),
                source: "api".into(),
                deployed_at: 0,
                config: serde_json::json!({}),
                module: module.to_string(),
            })
            .collect();
        Entry {
            name: name.into(),
            on_error: Default::default(),
            active: versions.len() - 1,
            next_version: versions.len() as u32 + 1,
            versions,
            history: History::begin(1, How::Config),
        }
    }

    #[test]
    fn a_saved_chain_reads_back_and_unused_modules_go() {
        let dir = Scratch::new("policy-storage");
        let storage = Storage::new(dir.0.clone());
        assert!(storage.read().unwrap().is_none());
        let (a, b, c) = (sha256_hex(b"a"), sha256_hex(b"b"), sha256_hex(b"c"));
        for (sha, bytes) in [(&a, b"a"), (&b, b"b"), (&c, b"c")] {
            storage.put_module(sha, bytes).unwrap();
        }
        let router = entry("router", &["builtin:model-router", &format!("sha256:{a}")]);
        let shadow = entry("x", &[&format!("sha256:{c}")]).versions.remove(0);
        storage.save(&[router], &[&shadow]).unwrap();
        let read = storage.read().unwrap().unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].versions[1].module, format!("sha256:{a}"));
        assert_eq!(
            module_bytes(Some(&storage), &read[0].versions[1]).unwrap(),
            b"a"
        );
        assert!(storage.modules.get(&b).is_err(), "nothing refers to b");
        assert!(storage.modules.get(&c).is_ok(), "the shadow's");
    }

    #[test]
    fn a_replica_sees_the_chain_another_saved() {
        let dir = Scratch::new("policy-follow");
        let (mine, theirs) = (Storage::new(dir.0.clone()), Storage::new(dir.0.clone()));
        mine.save(&[entry("router", &["builtin:model-router"])], &[])
            .unwrap();
        assert!(mine.changed().unwrap().is_none(), "its own save");
        let (bytes, entries) = theirs.changed().unwrap().expect("the other's save");
        assert_eq!(entries[0].name, "router");
        theirs.mark_seen(bytes);
        assert!(theirs.changed().unwrap().is_none());
    }

    #[test]
    fn modules_without_a_state_directory_stay_where_they_are() {
        let dir = Scratch::new("policy-reference");
        let storage = Storage::new(dir.0.clone());
        let sha = sha256_hex(b"m");
        assert_eq!(
            module_reference(None, "guests/m.wasm", &sha, b"m").unwrap(),
            "guests/m.wasm"
        );
        assert_eq!(
            module_reference(Some(&storage), "builtin:model-router", &sha, b"m").unwrap(),
            "builtin:model-router"
        );
        assert_eq!(
            module_reference(Some(&storage), "guests/m.wasm", &sha, b"m").unwrap(),
            format!("sha256:{sha}")
        );
        assert_eq!(storage.modules.get(&sha).unwrap(), b"m");
    }
}
