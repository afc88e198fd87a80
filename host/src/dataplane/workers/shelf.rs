//! Where worker deploys are kept: every worker's [`Book`] in the state
//! directory's `workers.json`, each kept module as
//! `workers/modules/<sha256>.wasm`; without a state directory, in memory.
//! Replicas sharing the directory change it under its lock and follow
//! each other's changes (see [`crate::store`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::book::Book;
use crate::store::{sha256_hex, Document, Modules, Store, StoreError, StoreLock};

/// Every worker's book, by name.
pub type Books = BTreeMap<String, Book>;

pub struct Shelf {
    disk: Option<Disk>,
    /// Modules by hash, when there is no state directory.
    memory: Mutex<HashMap<String, Arc<[u8]>>>,
}

struct Disk {
    store: Store,
    books: Document,
    modules: Modules,
}

impl Shelf {
    pub fn new(state_dir: Option<&Path>) -> Shelf {
        let disk = state_dir.map(|dir| {
            let store = Store::new(dir);
            Disk {
                books: store.document("workers.json"),
                modules: store.modules("workers/modules"),
                store,
            }
        });
        Shelf {
            disk,
            memory: Mutex::default(),
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.disk.as_ref().map(|d| d.store.dir())
    }

    /// The state directory's lock, for a change; `None` without one.
    pub async fn lock(&self) -> Result<Option<StoreLock>, StoreError> {
        match &self.disk {
            Some(disk) => disk.store.lock().await.map(Some),
            None => Ok(None),
        }
    }

    /// [`Shelf::lock`] at startup.
    pub fn lock_blocking(&self) -> Result<Option<StoreLock>, StoreError> {
        match &self.disk {
            Some(disk) => disk.store.lock_blocking().map(Some),
            None => Ok(None),
        }
    }

    /// The saved books (none saved: empty).
    pub fn read(&self) -> Result<Books, StoreError> {
        let Some(disk) = &self.disk else {
            return Ok(Books::new());
        };
        match disk.books.read()? {
            Some(bytes) => disk.books.parse(&bytes),
            None => Ok(Books::new()),
        }
    }

    /// The books another replica saved since this one last wrote or took
    /// them in, with their bytes for [`Shelf::mark_seen`].
    pub fn changed(&self) -> Result<Option<(Vec<u8>, Books)>, StoreError> {
        let Some(disk) = &self.disk else {
            return Ok(None);
        };
        let Some(bytes) = disk.books.changed()? else {
            return Ok(None);
        };
        let books = disk.books.parse(&bytes)?;
        Ok(Some((bytes, books)))
    }

    pub fn mark_seen(&self, bytes: Vec<u8>) {
        if let Some(disk) = &self.disk {
            disk.books.mark_seen(bytes);
        }
    }

    /// Saves `books`, then drops the modules no kept version refers to.
    pub fn save(&self, books: &Books) -> Result<(), StoreError> {
        let used: HashSet<&str> = books
            .values()
            .flat_map(|b| b.versions.iter())
            .map(|k| k.sha256.as_str())
            .collect();
        match &self.disk {
            Some(disk) => {
                disk.books.write_json(books)?;
                disk.modules.retain(&used);
            }
            None => {
                if let Ok(mut memory) = self.memory.lock() {
                    memory.retain(|sha, _| used.contains(sha.as_str()));
                }
            }
        }
        Ok(())
    }

    /// Keeps a module under its hash.
    pub fn put(&self, sha256: &str, bytes: &Arc<[u8]>) -> Result<(), StoreError> {
        match &self.disk {
            Some(disk) => disk.modules.put_as(sha256, bytes),
            None => {
                if let Ok(mut memory) = self.memory.lock() {
                    memory.insert(sha256.to_string(), bytes.clone());
                }
                Ok(())
            }
        }
    }

    /// The module kept under `sha256`, if it is.
    pub fn module(&self, sha256: &str) -> Option<Arc<[u8]>> {
        match &self.disk {
            Some(disk) => disk.modules.get(sha256).ok().map(Into::into),
            None => self.memory.lock().ok()?.get(sha256).cloned(),
        }
    }

    /// The book of `name` as a state directory written before
    /// `workers.json` kept it (`workers/NAME.history.json`, its modules as
    /// `workers/NAME.vN.wasm`), its modules moved into the module store.
    pub fn migrate(&self, name: &str) -> Option<Book> {
        let disk = self.disk.as_ref()?;
        let old = disk.store.dir().join("workers");
        let text = std::fs::read(old.join(format!("{name}.history.json"))).ok()?;
        let mut book: Book = serde_json::from_slice(&text).ok()?;
        book.versions.retain(|kept| {
            let path: PathBuf = old.join(format!("{name}.v{}.wasm", kept.version));
            std::fs::read(path).is_ok_and(|bytes| {
                sha256_hex(&bytes) == kept.sha256
                    && disk.modules.put_as(&kept.sha256, &bytes).is_ok()
            })
        });
        tracing::info!(worker = name, "worker history moved to workers.json");
        Some(book)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy_history::How;
    use crate::store::scratch::Scratch;

    fn module(text: &str) -> (String, Arc<[u8]>) {
        (sha256_hex(text.as_bytes()), text.as_bytes().into())
    }

    #[test]
    fn books_and_modules_reach_another_replica_and_unused_modules_go() {
        let dir = Scratch::new("worker-shelf");
        let (mine, theirs) = (Shelf::new(Some(&dir.0)), Shelf::new(Some(&dir.0)));
        let (a, a_bytes) = module("a");
        let (b, b_bytes) = module("b");
        mine.put(&a, &a_bytes).unwrap();
        mine.put(&b, &b_bytes).unwrap();
        let mut book = Book::begin(1, &a);
        mine.save(&Books::from([("tools".to_string(), book.clone())]))
            .unwrap();
        assert!(mine.module(&b).is_none(), "nothing keeps b");
        assert!(mine.changed().unwrap().is_none(), "its own save");

        let (bytes, books) = theirs.changed().unwrap().expect("the other's save");
        assert_eq!(books["tools"], book);
        assert_eq!(theirs.module(&a).as_deref(), Some(&b"a"[..]));
        theirs.mark_seen(bytes);
        assert!(theirs.changed().unwrap().is_none());
        assert_eq!(theirs.read().unwrap()["tools"], book);

        book.add(2, &b);
        book.history.activate(2, How::Deploy);
        theirs.put(&b, &b_bytes).unwrap();
        theirs
            .save(&Books::from([("tools".to_string(), book.clone())]))
            .unwrap();
        let (_, books) = mine.changed().unwrap().expect("back the other way");
        assert_eq!(books["tools"].active().map(|k| k.version), Some(2));
    }

    #[test]
    fn without_a_state_directory_modules_stay_in_memory() {
        let shelf = Shelf::new(None);
        let (a, bytes) = module("a");
        shelf.put(&a, &bytes).unwrap();
        assert!(shelf.module(&a).is_some());
        assert!(shelf.changed().unwrap().is_none());
        shelf.save(&Books::new()).unwrap();
        assert!(shelf.module(&a).is_none(), "no book keeps it");
    }

    #[test]
    fn an_older_state_directory_is_taken_over() {
        let dir = Scratch::new("worker-migrate");
        let old = dir.0.join("workers");
        std::fs::create_dir_all(&old).unwrap();
        let (a, _) = module("a");
        let book = Book::begin(1, &a);
        std::fs::write(
            old.join("tools.history.json"),
            serde_json::to_vec(&book).unwrap(),
        )
        .unwrap();
        std::fs::write(old.join("tools.v1.wasm"), "a").unwrap();
        let shelf = Shelf::new(Some(&dir.0));
        assert_eq!(shelf.migrate("tools"), Some(book));
        assert_eq!(shelf.module(&a).as_deref(), Some(&b"a"[..]));
        assert_eq!(shelf.migrate("other"), None);
    }
}
