//! Consumers: who is calling, with which API keys, allowed models and
//! limits. Keys are kept only as SHA-256 hashes; the plaintext of a key made
//! by the admin API is shown once, in the answer that creates it.
//!
//! Consumers come from two places: the config file (`[[consumers]]`,
//! changed by editing the file) and the admin API (persisted in the state
//! directory). The admin API manages only its own.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::api::bearer::{self, Presented};
use crate::config::names::check_consumer_name;
use crate::config::{ConsumerConfig, ConsumerLimits};
use crate::problem::Problem;
use crate::store::{sha256_hex, Document, Store};

/// Prefix of keys Sluice makes, so a leaked one is recognisable.
const KEY_PREFIX: &str = "sk-sluice-";

/// One consumer as the gateway uses it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Consumer {
    pub name: String,
    /// `sha256:HEX` of each key.
    pub key_hashes: Vec<String>,
    /// Models it may ask for; empty: all.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub limits: ConsumerLimits,
    #[serde(default)]
    pub disabled: bool,
    /// True for consumers the admin API made (and may change).
    #[serde(default)]
    pub managed: bool,
}

impl Consumer {
    pub fn allows(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    /// What the admin API shows: everything but the key hashes.
    pub fn public(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "keys": self.key_hashes.len(),
            "models": self.models,
            "limits": self.limits,
            "disabled": self.disabled,
            "managed_by": if self.managed { "api" } else { "config" },
        })
    }
}

/// The result of presenting a key.
pub enum Identity {
    /// Auth is off and no key was presented: an anonymous caller.
    Anonymous,
    Known(Arc<Consumer>),
}

/// Why a caller is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("Missing API key: send `Authorization: Bearer KEY`.")]
    Missing,
    #[error("Incorrect API key provided.")]
    Invalid,
    #[error("The consumer `{0}` is disabled.")]
    Disabled(String),
}

impl crate::problem::Problem for AuthError {
    fn status(&self) -> http::StatusCode {
        match self {
            AuthError::Disabled(_) => http::StatusCode::FORBIDDEN,
            AuthError::Missing | AuthError::Invalid => http::StatusCode::UNAUTHORIZED,
        }
    }
    fn code(&self) -> &str {
        match self {
            AuthError::Disabled(_) => "consumer_disabled",
            AuthError::Missing | AuthError::Invalid => "invalid_api_key",
        }
    }
}

/// An admin operation refused.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("no consumer `{0}`")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("saving consumers: {0}")]
    Io(String),
}

impl Problem for ConsumerError {
    fn status(&self) -> StatusCode {
        match self {
            ConsumerError::NotFound(_) => StatusCode::NOT_FOUND,
            ConsumerError::Conflict(_) => StatusCode::CONFLICT,
            ConsumerError::Invalid(_) => StatusCode::BAD_REQUEST,
            ConsumerError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
    fn code(&self) -> &str {
        match self {
            ConsumerError::NotFound(_) => "consumer_not_found",
            ConsumerError::Conflict(_) => "conflict",
            ConsumerError::Invalid(_) => "invalid_consumer",
            ConsumerError::Io(_) => "internal_error",
        }
    }
}

/// The file's consumers and the API's.
type Sources = (Vec<Consumer>, Vec<Consumer>);

struct Index {
    by_hash: HashMap<String, Arc<Consumer>>,
    by_name: HashMap<String, Arc<Consumer>>,
}

/// Every consumer, looked up by key hash without locks.
pub struct Consumers {
    required: bool,
    index: ArcSwap<Index>,
    /// The file's consumers and the API's, to rebuild the index from.
    sources: Mutex<Sources>,
    /// `consumers.json` in the state directory, when there is one.
    file: Option<Document>,
}

impl Consumers {
    /// `required`: every request needs a key. The API's consumers are read
    /// from `state_dir` when there is one.
    pub fn new(
        required: bool,
        configs: &[ConsumerConfig],
        state_dir: Option<&Path>,
    ) -> anyhow::Result<Consumers> {
        let file = state_dir.map(|d| Store::new(d).document("consumers.json"));
        let managed: Vec<Consumer> = match &file {
            Some(file) => match file.read()? {
                Some(bytes) => {
                    let managed = file.parse(&bytes)?;
                    file.mark_seen(bytes);
                    managed
                }
                None => Vec::new(),
            },
            None => Vec::new(),
        };
        let consumers = Consumers {
            required,
            index: ArcSwap::from_pointee(Index {
                by_hash: HashMap::new(),
                by_name: HashMap::new(),
            }),
            sources: Mutex::new((from_configs(configs), managed)),
            file,
        };
        consumers.rebuild()?;
        Ok(consumers)
    }

    /// Picks up consumers another replica sharing the state directory
    /// made, rotated or disabled, every `interval`.
    pub async fn follow(self: Arc<Self>, interval: std::time::Duration) {
        let Some(file) = &self.file else {
            return;
        };
        loop {
            tokio::time::sleep(interval).await;
            let bytes = match file.changed() {
                Ok(Some(bytes)) => bytes,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("{e}");
                    continue;
                }
            };
            match file.parse::<Vec<Consumer>>(&bytes) {
                Ok(managed) => {
                    if let Ok(mut sources) = self.lock() {
                        sources.1 = managed;
                    }
                    match self.rebuild() {
                        Ok(()) => {
                            tracing::info!("consumers updated from the shared state directory")
                        }
                        Err(e) => {
                            tracing::warn!("consumers from the shared state directory refused: {e}")
                        }
                    }
                }
                Err(e) => tracing::warn!("unreadable consumers file: {e}"),
            }
            file.mark_seen(bytes);
        }
    }

    pub fn required(&self) -> bool {
        self.required
    }

    /// Identifies the caller from its `Authorization` header value.
    pub fn identify(&self, authorization: Option<&str>) -> Result<Identity, AuthError> {
        let key = match bearer::presented(authorization.map(str::as_bytes)) {
            Presented::Token(key) => key,
            Presented::Nothing if self.required => return Err(AuthError::Missing),
            // Over the bound or not text: no key is like it, and it is not
            // hashed.
            Presented::Unusable if self.required => return Err(AuthError::Invalid),
            Presented::Nothing | Presented::Unusable => return Ok(Identity::Anonymous),
        };
        let index = self.index.load();
        let hash = hash_key(key);
        // The lookup compares SHA-256 hashes, never the keys: how long it
        // takes can tell at most how much of a hash matched, which does not
        // help anyone forge a key (the reason comparing hashes is the
        // constant-time answer for many keys).
        match index.by_hash.get(&hash) {
            Some(c) => {
                if c.disabled {
                    Err(AuthError::Disabled(c.name.clone()))
                } else {
                    Ok(Identity::Known(c.clone()))
                }
            }
            _ if self.required => Err(AuthError::Invalid),
            // Auth off: a client's own key for some other service passes.
            _ => Ok(Identity::Anonymous),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Consumer>> {
        self.index.load().by_name.get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Consumer>> {
        let mut all: Vec<_> = self.index.load().by_name.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Replaces the file's consumers (config reload).
    pub fn set_configured(&self, configs: &[ConsumerConfig]) -> Result<(), ConsumerError> {
        let mut sources = self.lock()?;
        let old = std::mem::replace(&mut sources.0, from_configs(configs));
        drop(sources);
        if let Err(e) = self.rebuild() {
            self.lock()?.0 = old;
            return Err(ConsumerError::Invalid(e.to_string()));
        }
        Ok(())
    }

    /// Makes a consumer with a new key; returns it and the key's plaintext.
    pub fn create(
        &self,
        name: &str,
        models: Vec<String>,
        limits: ConsumerLimits,
    ) -> Result<(Arc<Consumer>, String), ConsumerError> {
        check_consumer_name(name).map_err(ConsumerError::Invalid)?;
        if self.get(name).is_some() {
            return Err(ConsumerError::Conflict(format!("consumer `{name}` exists")));
        }
        let key = new_key().map_err(|e| ConsumerError::Io(e.to_string()))?;
        let consumer = Consumer {
            name: name.to_string(),
            key_hashes: vec![hash_key(&key)],
            models,
            limits,
            disabled: false,
            managed: true,
        };
        self.change(|managed| {
            managed.push(consumer);
            Ok(())
        })?;
        let made = self
            .get(name)
            .ok_or_else(|| ConsumerError::NotFound(name.into()))?;
        Ok((made, key))
    }

    /// Replaces every key of an API consumer with a new one.
    pub fn rotate(&self, name: &str) -> Result<String, ConsumerError> {
        let key = new_key().map_err(|e| ConsumerError::Io(e.to_string()))?;
        let hash = hash_key(&key);
        self.change_one(name, |c| c.key_hashes = vec![hash])?;
        Ok(key)
    }

    pub fn set_disabled(&self, name: &str, disabled: bool) -> Result<(), ConsumerError> {
        self.change_one(name, |c| c.disabled = disabled)
    }

    pub fn remove(&self, name: &str) -> Result<(), ConsumerError> {
        self.configured_guard(name)?;
        self.change(|managed| {
            let before = managed.len();
            managed.retain(|c| c.name != name);
            if managed.len() == before {
                return Err(ConsumerError::NotFound(name.into()));
            }
            Ok(())
        })
    }

    fn configured_guard(&self, name: &str) -> Result<(), ConsumerError> {
        match self.get(name) {
            None => Err(ConsumerError::NotFound(name.into())),
            Some(c) if !c.managed => Err(ConsumerError::Conflict(format!(
                "consumer `{name}` is defined in the config file; change it there"
            ))),
            Some(_) => Ok(()),
        }
    }

    fn change_one(
        &self,
        name: &str,
        edit: impl FnOnce(&mut Consumer),
    ) -> Result<(), ConsumerError> {
        self.configured_guard(name)?;
        self.change(|managed| {
            let c = managed
                .iter_mut()
                .find(|c| c.name == name)
                .ok_or_else(|| ConsumerError::NotFound(name.into()))?;
            edit(c);
            Ok(())
        })
    }

    /// Edits the API's consumers, saves them, and publishes the result.
    fn change(
        &self,
        edit: impl FnOnce(&mut Vec<Consumer>) -> Result<(), ConsumerError>,
    ) -> Result<(), ConsumerError> {
        let mut sources = self.lock()?;
        let mut managed = sources.1.clone();
        edit(&mut managed)?;
        if let Some(file) = &self.file {
            file.write_json(&managed)
                .map_err(|e| ConsumerError::Io(e.to_string()))?;
        }
        sources.1 = managed;
        drop(sources);
        self.rebuild()
            .map_err(|e| ConsumerError::Invalid(e.to_string()))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Sources>, ConsumerError> {
        self.sources
            .lock()
            .map_err(|_| ConsumerError::Io("the consumers' lock is poisoned".into()))
    }

    fn rebuild(&self) -> anyhow::Result<()> {
        let sources = self
            .sources
            .lock()
            .map_err(|_| anyhow::anyhow!("the consumers' lock is poisoned"))?;
        let mut by_hash = HashMap::new();
        let mut by_name = HashMap::new();
        for c in sources.0.iter().chain(sources.1.iter()) {
            let c = Arc::new(c.clone());
            if by_name.insert(c.name.clone(), c.clone()).is_some() {
                anyhow::bail!("consumer `{}` is defined twice", c.name);
            }
            for h in &c.key_hashes {
                if by_hash.insert(h.clone(), c.clone()).is_some() {
                    anyhow::bail!("a key of consumer `{}` is used by another consumer", c.name);
                }
            }
        }
        self.index.store(Arc::new(Index { by_hash, by_name }));
        Ok(())
    }
}

fn from_configs(configs: &[ConsumerConfig]) -> Vec<Consumer> {
    configs
        .iter()
        .map(|c| Consumer {
            name: c.name.clone(),
            key_hashes: c
                .key_hashes
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            models: c.models.clone(),
            limits: c.limits(),
            disabled: c.disabled,
            managed: false,
        })
        .collect()
}

/// `sha256:HEX` of a key: what config files and the state directory hold.
pub fn hash_key(key: &str) -> String {
    format!("sha256:{}", sha256_hex(key.as_bytes()))
}

/// A new random key: the prefix and 32 characters of base62 (190 bits).
pub fn new_key() -> std::io::Result<String> {
    use std::io::Read;
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut random = [0u8; 64];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    let mut key = String::from(KEY_PREFIX);
    // Rejection sampling keeps every character uniform.
    key.extend(
        random
            .iter()
            .filter(|&&b| b < 248)
            .take(32)
            .map(|&b| ALPHABET[(b % 62) as usize] as char),
    );
    if key.len() < KEY_PREFIX.len() + 32 {
        return Err(std::io::Error::other("not enough randomness"));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str, key: &str) -> ConsumerConfig {
        ConsumerConfig {
            name: name.into(),
            key_hashes: vec![hash_key(key)],
            models: vec!["m".into()],
            requests_per_minute: None,
            tokens_per_minute: None,
            tokens_per_day: None,
            max_concurrent_requests: None,
            disabled: false,
        }
    }

    #[test]
    fn keys_identify_consumers() {
        let c = Consumers::new(true, &[config("alice", "k1")], None).unwrap();
        assert!(
            matches!(c.identify(Some("Bearer k1")), Ok(Identity::Known(a)) if a.name == "alice")
        );
        assert_eq!(
            c.identify(Some("Bearer k2")).err(),
            Some(AuthError::Invalid)
        );
        assert_eq!(c.identify(None).err(), Some(AuthError::Missing));
        assert_eq!(c.identify(Some("Basic x")).err(), Some(AuthError::Missing));
        let open = Consumers::new(false, &[config("alice", "k1")], None).unwrap();
        assert!(matches!(open.identify(None), Ok(Identity::Anonymous)));
        assert!(matches!(
            open.identify(Some("Bearer other")),
            Ok(Identity::Anonymous)
        ));
    }

    #[test]
    fn the_api_manages_its_own_consumers_and_persists_them() {
        let dir = std::env::temp_dir().join(format!("sluice-consumers-{}", std::process::id()));
        let c = Consumers::new(true, &[config("alice", "k1")], Some(&dir)).unwrap();
        let (bob, key) = c.create("bob", vec![], ConsumerLimits::default()).unwrap();
        assert!(key.starts_with(KEY_PREFIX) && key.len() == KEY_PREFIX.len() + 32);
        assert!(bob.managed && bob.allows("anything"));
        assert!(matches!(
            c.identify(Some(&format!("Bearer {key}"))),
            Ok(Identity::Known(_))
        ));
        let rotated = c.rotate("bob").unwrap();
        assert_eq!(
            c.identify(Some(&format!("Bearer {key}"))).err(),
            Some(AuthError::Invalid)
        );
        c.set_disabled("bob", true).unwrap();
        assert_eq!(
            c.identify(Some(&format!("Bearer {rotated}"))).err(),
            Some(AuthError::Disabled("bob".into()))
        );
        assert!(matches!(
            c.set_disabled("alice", true),
            Err(ConsumerError::Conflict(_))
        ));
        assert!(matches!(
            c.create("alice", vec![], Default::default()),
            Err(ConsumerError::Conflict(_))
        ));
        let text = std::fs::read_to_string(dir.join("consumers.json")).unwrap();
        assert!(!text.contains(&rotated) && text.contains(&hash_key(&rotated)));
        let again = Consumers::new(true, &[], Some(&dir)).unwrap();
        assert!(again.get("bob").unwrap().disabled, "persisted");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
