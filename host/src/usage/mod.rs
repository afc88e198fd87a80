//! Per-request usage records, persisted to SQLite off the request path.
//!
//! The request path only ever calls [`UsageStore::record`], which hands the
//! record to one background writer thread through a bounded queue and never
//! blocks: when the queue is full (the disk is slow, the database is locked)
//! the record is counted as dropped instead of slowing the answer down. The
//! writer batches records into one transaction each, because a transaction
//! per request costs far more than its insert. Reads ([`UsageStore::query`]) use
//! their own connection; WAL mode lets them run while the writer commits.
//!
//! Every record carries the name of the replica that wrote it, so that
//! replicas sharing their records ([`crate::usage::sync`]) can hold the whole
//! fleet's usage in each database without counting a record twice.

pub mod live;
mod query;
mod record;
mod schema;
pub mod sync;
#[cfg(test)]
mod tests;
mod writer;

pub use query::{parse_group_by, GroupBy, UsageQuery, UsageRow};
pub use record::{now_ms, UsageRecord};
pub(crate) use schema::{
    insert_record, meta_get, meta_set, record_from_row, BUSY_TIMEOUT, INSERT, RECORD_COLUMNS,
};
pub use writer::WriterOptions;

use schema::{prepare_replica, SCHEMA};
use writer::{write_loop, Writer, WriterCounters};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rusqlite::Connection;

/// The usage database and its writer. Clones share both.
#[derive(Clone)]
pub struct UsageStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for UsageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageStore")
            .field("path", &self.inner.path)
            .field("written", &self.written())
            .field("dropped", &self.dropped())
            .field("failed", &self.failed())
            .finish()
    }
}

struct Inner {
    path: PathBuf,
    replica: String,
    /// Sharing with other replicas, once [`UsageStore::share`] started it.
    sync: Mutex<Option<crate::usage::sync::Syncer>>,
    /// `None` once shutdown began. Dropping the only sender is how the
    /// writer learns to finish: it drains what is queued, then sees the
    /// channel disconnected. The lock is only written once, at shutdown.
    sender: RwLock<Option<SyncSender<UsageRecord>>>,
    dropped: AtomicU64,
    counters: Arc<WriterCounters>,
    /// Milliseconds since `started` of the last "queue full" warning, plus
    /// one (0 means never), so the warning is logged at most once a second.
    last_warning: AtomicU64,
    started: Instant,
    writer: Mutex<Option<Writer>>,
}

impl UsageStore {
    /// Opens (creating if needed) the database at `path`, creates the schema
    /// and starts the writer thread.
    pub fn open(path: &Path, options: WriterOptions) -> anyhow::Result<UsageStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the directory of {}", path.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("opening the usage database {}", path.display()))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL: readers never block the writer and a commit is one append;
        // NORMAL: no fsync per commit (a power cut may lose the last commits,
        // never corrupt the file), which is right for usage accounting.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), %mode, "usage database is not in WAL mode");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("creating the usage schema in {}", path.display()))?;
        let replica = prepare_replica(&conn, options.replica.as_deref())
            .with_context(|| format!("naming this replica in {}", path.display()))?;

        let (sender, receiver) = mpsc::sync_channel(options.queue.max(1));
        let (finished_tx, finished) = mpsc::channel::<()>();
        let counters = Arc::new(WriterCounters::default());
        let batch = options.batch.max(1);
        let flush_interval = options.flush_interval;
        let thread_counters = counters.clone();
        let thread_replica = replica.clone();
        let handle = std::thread::Builder::new()
            .name("sluice-usage".into())
            .spawn(move || {
                // Dropped when this thread ends, however it ends.
                let _finished = finished_tx;
                write_loop(
                    conn,
                    receiver,
                    (batch, flush_interval),
                    &thread_replica,
                    &thread_counters,
                );
            })
            .context("starting the usage writer thread")?;

        Ok(UsageStore {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                replica,
                sync: Mutex::new(None),
                sender: RwLock::new(Some(sender)),
                dropped: AtomicU64::new(0),
                counters,
                last_warning: AtomicU64::new(0),
                started: Instant::now(),
                writer: Mutex::new(Some(Writer { handle, finished })),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The name this store's own records carry.
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    /// Starts sharing records with the other replicas that use the same
    /// Redis: this store's records are shipped there and theirs are copied
    /// here, so [`UsageStore::query`] on any replica totals the fleet.
    pub fn share(&self, options: crate::usage::sync::SyncOptions) -> anyhow::Result<()> {
        let syncer =
            crate::usage::sync::Syncer::start(&self.inner.path, &self.inner.replica, options)?;
        let mut sync = self
            .inner
            .sync
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *sync = Some(syncer);
        Ok(())
    }

    /// Queues one record for the writer. Never blocks: if the queue is full,
    /// or shutdown has begun, the record is dropped and counted.
    pub fn record(&self, record: UsageRecord) {
        let full = {
            // A poisoned lock only means a thread panicked while holding it;
            // the Option inside is still valid.
            let sender = self
                .inner
                .sender
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match sender.as_ref() {
                Some(sender) => match sender.try_send(record) {
                    Ok(()) => return,
                    Err(TrySendError::Full(_)) => true,
                    Err(TrySendError::Disconnected(_)) => false,
                },
                None => false,
            }
        };
        let dropped = self.inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        self.warn_dropped(dropped, full);
    }

    fn warn_dropped(&self, dropped: u64, full: bool) {
        let now =
            u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let last = self.inner.last_warning.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < 1000 {
            return;
        }
        // Only the thread that wins the exchange logs.
        if self
            .inner
            .last_warning
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            if full {
                tracing::warn!(dropped, "usage queue is full; dropping usage records");
            } else {
                tracing::warn!(dropped, "usage store is shut down; dropping usage records");
            }
        }
    }

    /// Records dropped because the queue was full or the store shut down.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Records committed to the database.
    pub fn written(&self) -> u64 {
        self.inner.counters.written.load(Ordering::Relaxed)
    }

    /// Records lost because their batch failed to write.
    pub fn failed(&self) -> u64 {
        self.inner.counters.failed.load(Ordering::Relaxed)
    }

    /// Stops accepting records, lets the writer commit everything already
    /// queued, and joins it. Returns true when the writer finished within
    /// `timeout` and no batch ever failed to write, i.e. every record that
    /// was accepted is in the database.
    ///
    /// **Blocks** the calling thread for up to `timeout`: from async code use
    /// [`UsageStore::shutdown_async`] (or `spawn_blocking`). Calling it again
    /// is cheap; after a timeout, a later call waits again.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        // Dropping the only sender: the writer drains the queue, then stops.
        self.inner
            .sender
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let mut writer = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(running) = writer.take() {
            match running.finished.recv_timeout(timeout) {
                Err(RecvTimeoutError::Timeout) => {
                    tracing::warn!(
                        ?timeout,
                        "usage writer did not finish in time; queued records may be lost"
                    );
                    *writer = Some(running);
                    return false;
                }
                // Ok never happens (nothing is sent); Disconnected = the
                // thread ended, so joining is immediate.
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                    if running.handle.join().is_err() {
                        tracing::error!("usage writer panicked");
                        return false;
                    }
                }
            }
        }
        drop(writer);
        // Everything is committed: one last shipment, so the other replicas
        // see this one's last records.
        let syncer = self
            .inner
            .sync
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(syncer) = syncer {
            syncer.stop(timeout);
        }
        self.failed() == 0
    }

    /// [`UsageStore::shutdown`] on tokio's blocking pool, for async callers.
    pub async fn shutdown_async(&self, timeout: Duration) -> bool {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.shutdown(timeout))
            .await
            .unwrap_or(false)
    }

    /// Totals over the records in `[from_ms, to_ms)`, grouped by the query's
    /// keys and ordered by them. Without keys, one row of totals (none if
    /// there are no records). Blocks on disk I/O: from async code, run it
    /// with `spawn_blocking`.
    pub fn query(&self, query: &UsageQuery) -> anyhow::Result<Vec<UsageRow>> {
        query::run(&self.inner.path, query)
    }
}
