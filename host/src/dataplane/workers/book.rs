//! A worker's kept versions and activation history: what a rollback or
//! an activation by number can return to. Every worker's book is kept in
//! the state directory's `workers.json` (see [`super::shelf`]), so a
//! rollback after a restart, or on another replica, goes where it would
//! have gone here.

use serde::{Deserialize, Serialize};

use crate::deploy_history::{History, How};

/// Versions of a worker kept for rollback and activation.
const KEEP_VERSIONS: usize = 10;

/// One kept version; its module is kept under its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kept {
    pub version: u64,
    pub sha256: String,
}

/// What is known about one worker's versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Book {
    pub history: History,
    /// Oldest first.
    pub versions: Vec<Kept>,
    pub next_version: u64,
}

impl Book {
    /// A worker's first book: `version` from the config file.
    pub fn begin(version: u64, sha256: &str) -> Book {
        let mut book = Book {
            history: History::begin(version, How::Config),
            versions: Vec::new(),
            next_version: version + 1,
        };
        book.add(version, sha256);
        book
    }

    /// The version serving, and its module's hash.
    pub fn active(&self) -> Option<&Kept> {
        let version = self.history.current()?;
        self.kept(version)
    }

    pub fn kept(&self, version: u64) -> Option<&Kept> {
        self.versions.iter().find(|k| k.version == version)
    }

    /// Keeps `sha256` as `version` (not yet active).
    pub fn add(&mut self, version: u64, sha256: &str) {
        self.versions.push(Kept {
            version,
            sha256: sha256.to_string(),
        });
        self.next_version = self.next_version.max(version + 1);
    }

    /// Drops versions no rollback can reach beyond the newest
    /// [`KEEP_VERSIONS`].
    pub fn prune(&mut self) {
        let numbers = self.versions.iter().rev().map(|k| k.version);
        let keep = self.history.keep(numbers, KEEP_VERSIONS);
        self.versions.retain(|k| keep.contains(&k.version));
        self.history.retain(|v| keep.contains(&v), KEEP_VERSIONS);
    }

    /// The listing's view: what a rollback returns to, the kept version
    /// numbers and the activations, newest first.
    pub fn describe(&self, value: &mut serde_json::Value) {
        let rollback_to = self.history.rollback_target();
        value["can_roll_back"] = rollback_to.is_some().into();
        value["rollback_to"] = serde_json::json!(rollback_to);
        value["versions"] = self.versions.iter().map(|k| k.version).collect();
        value["history"] =
            serde_json::to_value(self.history.listing(crate::deploy_history::replica()))
                .unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(book: &mut Book, sha: &str) -> u64 {
        let version = book.next_version;
        book.add(version, sha);
        book.history.activate(version, How::Deploy);
        book.prune();
        version
    }

    #[test]
    fn a_book_walks_back_through_deploys() {
        let mut book = Book::begin(1, "a");
        assert_eq!(book.active().map(|k| k.version), Some(1));
        assert_eq!(deploy(&mut book, "b"), 2);
        assert_eq!(deploy(&mut book, "c"), 3);
        assert_eq!(book.active().map(|k| k.sha256.as_str()), Some("c"));
        assert_eq!(book.history.roll_back(), Some(2));
        assert_eq!(book.active().map(|k| k.sha256.as_str()), Some("b"));
        assert_eq!(book.history.roll_back(), Some(1));
        assert_eq!(book.history.roll_back(), None);
    }

    #[test]
    fn pruning_drops_what_no_rollback_reaches() {
        let mut book = Book::begin(1, "a");
        for i in 0..14 {
            deploy(&mut book, &format!("m{i}"));
        }
        let kept: Vec<u64> = book.versions.iter().map(|k| k.version).collect();
        assert_eq!(kept, (5..=15).collect::<Vec<u64>>());
        assert_eq!(book.next_version, 16);
    }
}
