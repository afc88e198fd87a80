//! Activation history of something deployed (a policy, an edge worker):
//! which version served from when to when, how each came to serve, and
//! the undo stack a rollback walks.
//!
//! The rule: `undo` lists the versions activated by a change, oldest
//! first; its last one is the active version. A deploy, a promoted shadow
//! or an explicit activation pushes its version; a rollback pops the
//! active one and returns to the one under it, so after deploy A, deploy B
//! two rollbacks go B → A → what served before A, and a third is refused.
//! A rollback is recorded among the activations but is not pushed, so it
//! never becomes something a later rollback returns to. A restart or a
//! replica following the shared state directory changes nothing here.

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Activations listed per policy or worker; older ones are dropped.
const KEEP_ACTIVATIONS: usize = 50;

/// How a version came to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum How {
    /// The first version, from the config file.
    Config,
    /// A new version uploaded (admin API, CLI, watched directory).
    Deploy,
    /// The active version undone, back to the one before it.
    Rollback,
    /// An operator named an older version by number.
    Activate,
    /// A shadow version made active.
    Promote,
    /// A replica (re)started and resumed the version the state names.
    Restart,
}

/// One stretch of one version serving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    pub version: u64,
    pub how: How,
    /// The replica that made the change (`HOST-PID`).
    pub replica: String,
    /// Unix milliseconds.
    pub from_ms: u64,
    /// Unix milliseconds; `None` while it serves.
    #[serde(default)]
    pub until_ms: Option<u64>,
    /// For a rollback: the version it undid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undid: Option<u64>,
}

/// An activation as listed by one replica: `followed` when another
/// replica made it and this one took it from the shared state directory.
#[derive(Debug, Clone, Serialize)]
pub struct ActivationListing {
    #[serde(flatten)]
    pub activation: Activation,
    pub followed: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Versions activated by a change, oldest first; the last is active.
    #[serde(default)]
    pub undo: Vec<u64>,
    /// Oldest first.
    #[serde(default)]
    pub activations: Vec<Activation>,
}

impl History {
    /// A history whose first version serves from now.
    pub fn begin(version: u64, how: How) -> History {
        let mut history = History::default();
        history.activate(version, how);
        history
    }

    /// The active version, if any has been recorded.
    pub fn current(&self) -> Option<u64> {
        self.undo.last().copied()
    }

    /// What a rollback would return to.
    pub fn rollback_target(&self) -> Option<u64> {
        self.undo.len().checked_sub(2).map(|i| self.undo[i])
    }

    /// `version` serves from now after a deploy, promote, explicit
    /// activation or first start: it becomes what a rollback undoes.
    pub fn activate(&mut self, version: u64, how: How) {
        self.undo.push(version);
        self.record(version, how, None);
    }

    /// Pops the active version; the one under it serves from now.
    /// `None` (nothing changed) when nothing served before it.
    pub fn roll_back(&mut self) -> Option<u64> {
        let target = self.rollback_target()?;
        let undid = self.undo.pop();
        self.record(target, How::Rollback, undid);
        Some(target)
    }

    /// A replica started serving `version` as the state names it. A
    /// history that does not end with it (none recorded, from an older
    /// state file) starts again from it.
    pub fn restarted(&mut self, version: u64) {
        if self.current() != Some(version) {
            self.undo = vec![version];
        }
        self.record(version, How::Restart, None);
    }

    /// Which versions to keep, at most `max` (unless the undo stack alone
    /// holds more distinct ones): every version a rollback can reach, then
    /// the newest others. `newest_first` lists the versions there are.
    pub fn keep(&self, newest_first: impl Iterator<Item = u64>, max: usize) -> HashSet<u64> {
        let mut keep: HashSet<u64> = self.undo.iter().copied().collect();
        for version in newest_first {
            if keep.len() >= max {
                break;
            }
            keep.insert(version);
        }
        keep
    }

    /// Forgets undo steps to versions no longer kept, and bounds the undo
    /// stack to `max` steps (the oldest go first). The active version stays.
    pub fn retain(&mut self, kept: impl Fn(u64) -> bool, max: usize) {
        let len = self.undo.len();
        let mut position = 0;
        self.undo.retain(|v| {
            position += 1;
            position == len || kept(*v)
        });
        if self.undo.len() > max {
            let excess = self.undo.len() - max;
            self.undo.drain(..excess);
        }
    }

    /// The activations as `replica` lists them, newest first.
    pub fn listing(&self, replica: &str) -> Vec<ActivationListing> {
        self.activations
            .iter()
            .rev()
            .map(|a| ActivationListing {
                followed: a.replica != replica,
                activation: a.clone(),
            })
            .collect()
    }

    fn record(&mut self, version: u64, how: How, undid: Option<u64>) {
        let now = now_ms();
        if let Some(last) = self.activations.last_mut() {
            last.until_ms.get_or_insert(now);
        }
        self.activations.push(Activation {
            version,
            how,
            replica: replica().to_string(),
            from_ms: now,
            until_ms: None,
            undid,
        });
        if self.activations.len() > KEEP_ACTIVATIONS {
            let excess = self.activations.len() - KEEP_ACTIVATIONS;
            self.activations.drain(..excess);
        }
    }
}

/// This process as activations name it: the host name and process id.
pub fn replica() -> &'static str {
    static REPLICA: OnceLock<String> = OnceLock::new();
    REPLICA.get_or_init(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "sluice".into());
        format!("{host}-{}", std::process::id())
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hows(history: &History) -> Vec<(u64, How)> {
        history
            .activations
            .iter()
            .map(|a| (a.version, a.how))
            .collect()
    }

    #[test]
    fn rollback_undoes_the_last_change_not_the_version_number() {
        let mut h = History::begin(1, How::Config);
        h.activate(2, How::Deploy);
        assert_eq!(h.roll_back(), Some(1));
        h.activate(3, How::Deploy);
        assert_eq!(h.roll_back(), Some(1), "back to what served before 3");
        assert_eq!(h.roll_back(), None, "nothing served before 1");
        assert_eq!(
            hows(&h),
            [
                (1, How::Config),
                (2, How::Deploy),
                (1, How::Rollback),
                (3, How::Deploy),
                (1, How::Rollback)
            ]
        );
        assert!(h.activations[..4].iter().all(|a| a.until_ms.is_some()));
        assert_eq!(h.activations[4].until_ms, None);
        assert_eq!(h.activations[4].undid, Some(3));
    }

    #[test]
    fn rollbacks_walk_back_and_are_not_undo_targets() {
        let mut h = History::begin(1, How::Config);
        h.activate(2, How::Deploy);
        h.activate(3, How::Deploy);
        assert_eq!(h.roll_back(), Some(2));
        assert_eq!(h.roll_back(), Some(1));
        assert_eq!(h.rollback_target(), None);
        // An explicit activation is a change: a rollback returns from it.
        h.activate(3, How::Activate);
        assert_eq!(h.roll_back(), Some(1));
    }

    #[test]
    fn a_restart_keeps_the_stack_and_resets_a_stale_one() {
        let mut h = History::begin(1, How::Config);
        h.activate(2, How::Deploy);
        h.restarted(2);
        assert_eq!(h.rollback_target(), Some(1));
        assert_eq!(h.activations.last().map(|a| a.how), Some(How::Restart));
        let mut old = History::default();
        old.restarted(5);
        assert_eq!((old.current(), old.rollback_target()), (Some(5), None));
    }

    #[test]
    fn keep_prefers_what_a_rollback_can_reach() {
        let mut h = History::begin(1, How::Config);
        for v in 2..=12 {
            h.activate(v, How::Deploy);
            h.roll_back();
        }
        // Eleven rejected deploys: version 1 is what serves and stays.
        let keep = h.keep((1..=12).rev(), 10);
        assert!(keep.contains(&1) && keep.contains(&12) && !keep.contains(&3));
        assert_eq!(keep.len(), 10);
        let mut h = History::begin(1, How::Config);
        for v in 2..=15 {
            h.activate(v, How::Deploy);
        }
        h.retain(|v| v > 5, 10);
        assert_eq!(h.undo, (6..=15).collect::<Vec<_>>());
    }

    #[test]
    fn listing_marks_what_another_replica_did() {
        let mut h = History::begin(1, How::Config);
        h.activations[0].replica = "other-1".into();
        h.activate(2, How::Deploy);
        let listed = h.listing(replica());
        assert_eq!(listed[0].activation.version, 2);
        assert!(!listed[0].followed);
        assert!(listed[1].followed);
    }
}
