//! Atomic file replacement: a reader (another replica, a restart) sees
//! the old file or the new one, never half of one.

use std::path::Path;

use super::StoreError;

/// Writes `bytes` to a temporary file beside `path`, then renames it over
/// `path`, creating the parent directory when needed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(StoreError::io("creating", parent))?;
    }
    // The process id keeps two replicas' temporary files apart.
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".{}.tmp", std::process::id()));
    let temp = std::path::PathBuf::from(temp);
    std::fs::write(&temp, bytes).map_err(StoreError::io("writing", &temp))?;
    std::fs::rename(&temp, path).map_err(StoreError::io("replacing", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::scratch::Scratch;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = Scratch::new("atomic");
        let path = dir.0.join("sub").join("state.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.0.join("sub"))
            .unwrap()
            .flatten()
            .map(|f| f.file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }
}
