//! The state directory's exclusive lock (`.lock`), held across a
//! read-modify-write so replicas sharing the directory take turns.

use std::path::Path;
use std::time::{Duration, Instant};

use super::StoreError;

/// How long a change waits for another replica's change to end.
const LOCK_WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub struct StoreLock {
    _file: std::fs::File,
}

impl StoreLock {
    pub(super) async fn take(dir: &Path) -> Result<StoreLock, StoreError> {
        let file = open(dir)?;
        let started = Instant::now();
        loop {
            match try_take(&file, started)? {
                true => return Ok(StoreLock { _file: file }),
                false => tokio::time::sleep(POLL).await,
            }
        }
    }

    pub(super) fn take_blocking(dir: &Path) -> Result<StoreLock, StoreError> {
        let file = open(dir)?;
        let started = Instant::now();
        loop {
            match try_take(&file, started)? {
                true => return Ok(StoreLock { _file: file }),
                false => std::thread::sleep(POLL),
            }
        }
    }
}

fn open(dir: &Path) -> Result<std::fs::File, StoreError> {
    std::fs::create_dir_all(dir).map_err(StoreError::io("creating", dir))?;
    let path = dir.join(".lock");
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(StoreError::io("opening", &path))
}

/// `Ok(false)`: held elsewhere, try again.
fn try_take(file: &std::fs::File, started: Instant) -> Result<bool, StoreError> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < LOCK_WAIT => Ok(false),
        Err(e) => Err(StoreError::Locked(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use crate::store::scratch::Scratch;
    use crate::store::Store;

    #[tokio::test]
    async fn a_second_holder_waits_for_the_first() {
        let dir = Scratch::new("lock");
        let store = Store::new(&dir.0);
        let first = store.lock().await.unwrap();
        let other = Store::new(&dir.0);
        let waiting = tokio::spawn(async move { other.lock().await.map(|_| ()) });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "the lock is held");
        drop(first);
        waiting.await.unwrap().unwrap();
        drop(store.lock_blocking().unwrap());
    }
}
