//! The watched directory: a new or changed `NAME.wasm` (or `NAME.json`,
//! its config) dropped there deploys policy NAME.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{DeployRequest, Deployer};
use crate::store::sha256_hex;

impl Deployer {
    /// Polls `dir` every `interval`: a new or changed `NAME.wasm` (or
    /// `NAME.json`, its config) deploys policy NAME. A pair identical to the
    /// active version is left alone, so a restart does not redeploy it.
    pub async fn watch(self: Arc<Self>, dir: PathBuf, interval: Duration) {
        tracing::info!(dir = %dir.display(), "watching for policy files");
        // What was last deployed (or refused) per file, as hash + config.
        let mut seen: HashMap<String, (String, serde_json::Value)> = self.active_versions().await;
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
                let sha = sha256_hex(&bytes);
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

    /// Each policy's active module hash and config, for the watcher.
    async fn active_versions(&self) -> HashMap<String, (String, serde_json::Value)> {
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
}
