//! The model a policy deploy changes: each policy's kept versions, which
//! one is active, and its activation history; and the walks over them
//! (what a rollback or an activation by number goes to, what is kept).

use serde::{Deserialize, Serialize};

use super::DeployError;
use crate::config::OnError;
use crate::deploy_history::History;

/// Versions of a policy kept for rollback; older ones (and their module
/// files, when nothing else uses them) are deleted.
const KEEP_VERSIONS: usize = 10;

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

impl Version {
    /// The module store's hash, for a version whose module is kept there.
    pub(super) fn stored_module(&self) -> Option<&str> {
        self.module.strip_prefix("sha256:")
    }
}

/// One policy in the chain, as persisted in `policies.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Entry {
    pub name: String,
    pub on_error: OnError,
    pub versions: Vec<Version>,
    /// Index into `versions` of the active one.
    pub active: usize,
    pub next_version: u32,
    /// Which version served when; what a rollback returns to. Absent from
    /// state files written before it was kept (a restart starts it).
    #[serde(default)]
    pub history: History,
}

impl Entry {
    pub fn active(&self) -> &Version {
        &self.versions[self.active]
    }

    /// The index of the version a rollback returns to; 409 when nothing
    /// served before, or what did is no longer kept.
    pub fn rollback_position(&self) -> Result<usize, DeployError> {
        let name = &self.name;
        let Some(target) = self.history.rollback_target() else {
            return Err(DeployError::Conflict(format!(
                "policy `{name}` has no earlier version to roll back to: nothing served before version {}",
                self.active().version
            )));
        };
        self.versions
            .iter()
            .position(|v| u64::from(v.version) == target)
            .ok_or_else(|| {
                DeployError::Conflict(format!(
                    "policy `{name}`: version {target}, which served before, is no longer kept"
                ))
            })
    }

    /// The index of kept version `number`, to activate: 404 when it is not
    /// kept, 409 when it is already active.
    pub fn activation_position(&self, number: u32) -> Result<usize, DeployError> {
        let name = &self.name;
        let Some(position) = self.versions.iter().position(|v| v.version == number) else {
            let kept: Vec<String> = self
                .versions
                .iter()
                .map(|v| v.version.to_string())
                .collect();
            return Err(DeployError::VersionNotFound(format!(
                "policy `{name}` has no version {number} (kept: {})",
                kept.join(", ")
            )));
        };
        if position == self.active {
            return Err(DeployError::Conflict(format!(
                "version {number} of policy `{name}` is already active"
            )));
        }
        Ok(position)
    }

    /// Keeps every version a rollback can reach, then the newest others, up
    /// to [`KEEP_VERSIONS`].
    pub fn prune(&mut self) {
        let active = self.active().version;
        let numbers = self.versions.iter().rev().map(|v| u64::from(v.version));
        let keep = self.history.keep(numbers, KEEP_VERSIONS);
        self.versions
            .retain(|v| keep.contains(&u64::from(v.version)));
        self.history.retain(|v| keep.contains(&v), KEEP_VERSIONS);
        self.active = self
            .versions
            .iter()
            .position(|v| v.version == active)
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy_history::How;

    fn version(n: u32) -> Version {
        Version {
            version: n,
            sha256: format!("{n:064}"),
            source: "api".into(),
            deployed_at: 0,
            config: serde_json::json!({}),
            module: format!("sha256:{n:064}"),
        }
    }

    fn entry() -> Entry {
        Entry {
            name: "router".into(),
            on_error: OnError::default(),
            versions: vec![version(1)],
            active: 0,
            next_version: 2,
            history: History::begin(1, How::Config),
        }
    }

    /// What `Deployer::deploy` does to the model.
    fn deploy(entry: &mut Entry) -> u32 {
        let n = entry.next_version;
        entry.next_version += 1;
        entry.versions.push(version(n));
        entry.active = entry.versions.len() - 1;
        entry.history.activate(u64::from(n), How::Deploy);
        entry.prune();
        n
    }

    fn roll_back(entry: &mut Entry) -> Result<u32, DeployError> {
        let position = entry.rollback_position()?;
        entry.active = position;
        entry.history.roll_back();
        Ok(entry.active().version)
    }

    #[test]
    fn rollbacks_walk_back_through_deploys_then_stop() {
        let mut e = entry();
        assert!(matches!(roll_back(&mut e), Err(DeployError::Conflict(_))));
        assert_eq!(deploy(&mut e), 2);
        assert_eq!(roll_back(&mut e).unwrap(), 1);
        assert_eq!(deploy(&mut e), 3);
        assert_eq!(deploy(&mut e), 4);
        assert_eq!(roll_back(&mut e).unwrap(), 3);
        assert_eq!(roll_back(&mut e).unwrap(), 1, "not the rolled-away 2");
        assert!(matches!(roll_back(&mut e), Err(DeployError::Conflict(_))));
    }

    #[test]
    fn activation_by_number_names_what_is_kept() {
        let mut e = entry();
        deploy(&mut e);
        assert_eq!(e.activation_position(1).unwrap(), 0);
        assert!(matches!(
            e.activation_position(2),
            Err(DeployError::Conflict(_))
        ));
        match e.activation_position(7) {
            Err(DeployError::VersionNotFound(message)) => {
                assert!(message.ends_with("(kept: 1, 2)"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pruning_keeps_what_a_rollback_reaches_and_the_newest() {
        let mut e = entry();
        for _ in 0..15 {
            deploy(&mut e);
        }
        let kept: Vec<u32> = e.versions.iter().map(|v| v.version).collect();
        // The undo stack's ten steps and the active version under them;
        // older ones go.
        assert_eq!(kept, (6..=16).collect::<Vec<u32>>());
        assert_eq!(e.active().version, 16);
        assert_eq!(roll_back(&mut e).unwrap(), 15);
    }
}
