//! A named state document (`policies.json`, `workers.json`,
//! `consumers.json`): read whole, replaced atomically, and compared with
//! what this replica last wrote or read, so a follower sees another
//! replica's change.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{de::DeserializeOwned, Serialize};

use super::{file::write_atomically, StoreError};

#[derive(Debug)]
pub struct Document {
    path: PathBuf,
    /// The bytes this replica last wrote or took in.
    seen: Mutex<Option<Vec<u8>>>,
}

impl Document {
    pub(super) fn new(path: PathBuf) -> Document {
        Document {
            path,
            seen: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The document's bytes; `None` when it was never written.
    pub fn read(&self) -> Result<Option<Vec<u8>>, StoreError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("reading", &self.path)(e)),
        }
    }

    /// The document parsed as JSON.
    pub fn parse<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|source| StoreError::Format {
            path: self.path.clone(),
            source,
        })
    }

    /// Replaces the document with `value` as pretty JSON (and marks it seen).
    pub fn write_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Format {
            path: self.path.clone(),
            source,
        })?;
        write_atomically(&self.path, &bytes)?;
        self.mark_seen(bytes);
        Ok(())
    }

    /// The document's bytes when they differ from what this replica last
    /// saw (another replica wrote it); `None` when unchanged or absent.
    /// The caller marks them seen once it has taken them in.
    pub fn changed(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(bytes) = self.read()? else {
            return Ok(None);
        };
        let same = self
            .seen
            .lock()
            .is_ok_and(|seen| seen.as_deref() == Some(&bytes[..]));
        Ok((!same).then_some(bytes))
    }

    pub fn mark_seen(&self, bytes: Vec<u8>) {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::store::scratch::Scratch;
    use crate::store::Store;

    #[test]
    fn a_follower_sees_what_another_writer_wrote_once() {
        let dir = Scratch::new("document");
        let (mine, theirs) = (
            Store::new(&dir.0).document("state.json"),
            Store::new(&dir.0).document("state.json"),
        );
        assert_eq!(mine.read().unwrap(), None);
        assert_eq!(mine.changed().unwrap(), None, "absent is unchanged");
        mine.write_json(&[1, 2]).unwrap();
        assert_eq!(mine.changed().unwrap(), None, "its own write");
        let bytes = theirs.changed().unwrap().expect("new to the other");
        assert_eq!(theirs.parse::<Vec<u32>>(&bytes).unwrap(), [1, 2]);
        theirs.mark_seen(bytes);
        assert_eq!(theirs.changed().unwrap(), None);
        theirs.write_json(&[3]).unwrap();
        let bytes = mine.changed().unwrap().expect("the other's write");
        assert_eq!(mine.parse::<Vec<u32>>(&bytes).unwrap(), [3]);
        assert!(mine.parse::<String>(&bytes).is_err());
    }
}
