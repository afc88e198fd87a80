//! Content-addressed module files: `<sha256>.wasm`, written once, shared
//! by every version (and replica) that deploys the same bytes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::{file::write_atomically, sha256_hex, StoreError};

/// One folder of module files.
#[derive(Debug, Clone)]
pub struct Modules {
    dir: PathBuf,
}

impl Modules {
    pub(super) fn new(dir: PathBuf) -> Modules {
        Modules { dir }
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.wasm"))
    }

    /// Keeps `bytes` under their hash (already there: left alone) and
    /// returns the hash.
    pub fn put(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let sha256 = sha256_hex(bytes);
        self.put_as(&sha256, bytes)?;
        Ok(sha256)
    }

    /// [`Modules::put`] when the caller already hashed `bytes`.
    pub fn put_as(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.path(sha256);
        if path.exists() {
            return Ok(());
        }
        write_atomically(&path, bytes)
    }

    pub fn get(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path(sha256);
        std::fs::read(&path).map_err(StoreError::io("reading", &path))
    }

    /// Deletes the module files whose hash is not in `used` (what no kept
    /// version refers to any more). Other files are left alone.
    pub fn retain(&self, used: &HashSet<&str>) {
        let Ok(files) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for file in files.flatten() {
            let name = file.file_name();
            let Some(sha256) = name.to_str().and_then(module_hash) else {
                continue;
            };
            if !used.contains(sha256) {
                let _ = std::fs::remove_file(file.path());
            }
        }
    }
}

/// The hash a module file is named by, if `name` is one.
fn module_hash(name: &str) -> Option<&str> {
    let stem = Path::new(name).file_stem()?.to_str()?;
    (name.ends_with(".wasm") && stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(stem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::scratch::Scratch;
    use crate::store::Store;

    #[test]
    fn modules_are_named_by_hash_and_unused_ones_go() {
        let dir = Scratch::new("modules");
        let modules = Store::new(&dir.0).modules("modules");
        let a = modules.put(b"module a").unwrap();
        let b = modules.put(b"module b").unwrap();
        assert_eq!(a, sha256_hex(b"module a"));
        assert_eq!(modules.put(b"module a").unwrap(), a, "the same bytes, once");
        assert_eq!(modules.get(&b).unwrap(), b"module b");
        std::fs::write(dir.0.join("modules").join("notes.txt"), "kept").unwrap();
        modules.retain(&HashSet::from([a.as_str()]));
        assert!(modules.get(&a).is_ok());
        assert!(matches!(modules.get(&b), Err(StoreError::Io { .. })));
        assert!(dir.0.join("modules").join("notes.txt").exists());
    }
}
