//! What the admin API lists about policies: each one's versions, shadow,
//! rollback target and activation history, and a shadow's comparison.

use serde::Serialize;

use super::versions::Version;
use super::{index, DeployError, Deployer};
use crate::config::OnError;
use crate::deploy_history::ActivationListing;
use crate::policy::ShadowStats;

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

impl Deployer {
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
}
