//! A worker's kept versions and activation history: what a rollback or
//! an activation by number can return to. With a state directory each
//! kept module is a file (`workers/NAME.vN.wasm`) and the book is
//! `workers/NAME.history.json`, so a rollback after a restart goes where
//! it would have gone before; without one they are kept in memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::deploy_history::{History, How};

/// Versions of a worker kept for rollback and activation.
const KEEP_VERSIONS: usize = 10;

/// One kept version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Kept {
    pub version: u64,
    pub sha256: String,
}

/// What is known about one worker's versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Book {
    pub history: History,
    /// Oldest first.
    pub versions: Vec<Kept>,
    pub next_version: u64,
    /// The modules, when there is no state directory to keep them in.
    #[serde(skip)]
    bytes: HashMap<u64, Arc<[u8]>>,
}

impl Book {
    /// The book of worker `name` serving `version` (`bytes`) at start:
    /// the saved one when it ends with that version, else a new one.
    pub fn at_start(
        dir: Option<&Path>,
        name: &str,
        version: u64,
        sha256: &str,
        bytes: &Arc<[u8]>,
        restored: bool,
    ) -> std::io::Result<Book> {
        let saved = dir.and_then(|d| {
            let text = std::fs::read(book_file(d, name)).ok()?;
            serde_json::from_slice::<Book>(&text).ok()
        });
        let mut book = match saved {
            Some(mut book) if book.history.current() == Some(version) => {
                book.history.restarted(version);
                book
            }
            _ => Book {
                history: if restored {
                    let mut history = History::default();
                    history.restarted(version);
                    history
                } else {
                    History::begin(version, How::Config)
                },
                versions: Vec::new(),
                next_version: version + 1,
                bytes: HashMap::new(),
            },
        };
        if !book.versions.iter().any(|k| k.version == version) {
            book.add(dir, name, version, sha256, bytes)?;
        } else if let Some(dir) = dir {
            let path = module_file(dir, name, version);
            if !path.exists() {
                write_atomically(&path, bytes)?;
            }
        }
        book.save(dir, name)?;
        Ok(book)
    }

    /// Keeps `bytes` as `version` (not yet active).
    pub fn add(
        &mut self,
        dir: Option<&Path>,
        name: &str,
        version: u64,
        sha256: &str,
        bytes: &Arc<[u8]>,
    ) -> std::io::Result<()> {
        match dir {
            Some(dir) => write_atomically(&module_file(dir, name, version), bytes)?,
            None => {
                self.bytes.insert(version, bytes.clone());
            }
        }
        self.versions.push(Kept {
            version,
            sha256: sha256.to_string(),
        });
        self.next_version = self.next_version.max(version + 1);
        Ok(())
    }

    /// The module of kept `version`.
    pub fn module(&self, dir: Option<&Path>, name: &str, version: u64) -> Option<Arc<[u8]>> {
        if !self.versions.iter().any(|k| k.version == version) {
            return None;
        }
        match dir {
            Some(dir) => std::fs::read(module_file(dir, name, version))
                .ok()
                .map(Into::into),
            None => self.bytes.get(&version).cloned(),
        }
    }

    /// Drops versions no rollback can reach beyond the newest
    /// [`KEEP_VERSIONS`], with their modules.
    pub fn prune(&mut self, dir: Option<&Path>, name: &str) {
        let numbers = self.versions.iter().rev().map(|k| k.version);
        let keep = self.history.keep(numbers, KEEP_VERSIONS);
        for gone in self.versions.iter().filter(|k| !keep.contains(&k.version)) {
            self.bytes.remove(&gone.version);
            if let Some(dir) = dir {
                let _ = std::fs::remove_file(module_file(dir, name, gone.version));
            }
        }
        self.versions.retain(|k| keep.contains(&k.version));
        self.history.retain(|v| keep.contains(&v), KEEP_VERSIONS);
    }

    /// Writes the book where the next start finds it.
    pub fn save(&self, dir: Option<&Path>, name: &str) -> std::io::Result<()> {
        let Some(dir) = dir else {
            return Ok(());
        };
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_atomically(&book_file(dir, name), &text)
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

fn book_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.history.json"))
}

fn module_file(dir: &Path, name: &str, version: u64) -> PathBuf {
    dir.join(format!("{name}.v{version}.wasm"))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    std::fs::write(&temp, bytes)?;
    std::fs::rename(&temp, path)
}
