//! The state directory replicas share: named state documents written
//! atomically, content-addressed module files, one lock for changes, and
//! change detection so a replica can follow what another one wrote.
//!
//! Policy deploys (`policies.json`, `modules/`), edge worker deploys
//! (`workers.json`, `workers/modules/`) and the admin API's consumers
//! (`consumers.json`) all keep their state here. A change is made under
//! [`Store::lock`] after catching up with the document, so two replicas
//! never overwrite each other; a follower polls [`Document::changed`].

mod digest;
mod document;
mod file;
mod lock;
mod modules;

use std::path::{Path, PathBuf};

pub use digest::sha256_hex;
pub use document::Document;
pub use file::write_atomically;
pub use lock::StoreLock;
pub use modules::Modules;

/// Why the state directory could not be read or written. A caller
/// branches on [`StoreError::Locked`] (another replica holds the lock:
/// a conflict, worth retrying) versus the rest (an internal failure).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the shared state directory stays locked by another replica: {0}")]
    Locked(String),
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {}: {source}", path.display())]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl StoreError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    }
}

/// A state directory (created on first write).
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The state document `name` (a file directly in the directory).
    pub fn document(&self, name: &str) -> Document {
        Document::new(self.dir.join(name))
    }

    /// The content-addressed module files under `folder`.
    pub fn modules(&self, folder: &str) -> Modules {
        Modules::new(self.dir.join(folder))
    }

    /// Takes the directory's lock, waiting for another replica's change
    /// to end; released when the guard drops.
    pub async fn lock(&self) -> Result<StoreLock, StoreError> {
        StoreLock::take(&self.dir).await
    }

    /// [`Store::lock`] for a thread that may block (startup).
    pub fn lock_blocking(&self) -> Result<StoreLock, StoreError> {
        StoreLock::take_blocking(&self.dir)
    }
}

#[cfg(test)]
pub(crate) mod scratch {
    //! A directory for a test, removed when dropped.

    use std::path::PathBuf;

    pub struct Scratch(pub PathBuf);

    impl Scratch {
        pub fn new(what: &str) -> Scratch {
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("sluice-{what}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
