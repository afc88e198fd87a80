//! The background thread that batches usage records into SQLite
//! transactions, and how it queues.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::record::UsageRecord;
use super::schema::{insert_record, INSERT};

/// How the background writer queues and batches.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Records that may wait for the writer; beyond this they are dropped.
    pub queue: usize,
    /// Most records written in one transaction.
    pub batch: usize,
    /// After the first record of a batch arrives, how long the writer waits
    /// for more before it commits. Bounds how stale the database can be.
    pub flush_interval: Duration,
    /// The name this store's own records carry. `None`: the name kept in
    /// the database, or a new one (`HOSTNAME-xxxxxxxx`) saved there, so a
    /// restarted replica keeps its name.
    pub replica: Option<String>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            // ~16k records is several seconds of a busy gateway: enough to
            // ride out a slow fsync, small enough (a few MiB) to not matter.
            queue: 16_384,
            batch: 512,
            flush_interval: Duration::from_millis(200),
            replica: None,
        }
    }
}

pub(super) struct Writer {
    pub(super) handle: JoinHandle<()>,
    /// Disconnects when the writer thread ends (its sender is dropped), so
    /// shutdown can wait with a timeout, which `JoinHandle` cannot.
    pub(super) finished: Receiver<()>,
}

#[derive(Default)]
pub(super) struct WriterCounters {
    pub(super) written: AtomicU64,
    pub(super) failed: AtomicU64,
}

/// `(batch_max, flush_interval)`: at most this many records per
/// transaction, waiting at most this long for more after the first.
pub(super) fn write_loop(
    mut conn: Connection,
    receiver: Receiver<UsageRecord>,
    (batch_max, flush_interval): (usize, Duration),
    replica: &str,
    counters: &WriterCounters,
) {
    let mut batch = Vec::with_capacity(batch_max);
    // `recv` fails only once every sender is gone and the queue is empty.
    while let Ok(first) = receiver.recv() {
        batch.push(first);
        let deadline = Instant::now() + flush_interval;
        let mut disconnected = false;
        while batch.len() < batch_max {
            let left = deadline.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(left) {
                Ok(record) => batch.push(record),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        match write_batch(&mut conn, &batch, replica) {
            Ok(()) => {
                counters
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Err(error) => {
                counters
                    .failed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                tracing::error!(records = batch.len(), %error, "writing usage records failed");
            }
        }
        batch.clear();
        if disconnected {
            break;
        }
    }
    // Closing checkpoints the WAL into the database file.
    if let Err((_, error)) = conn.close() {
        tracing::warn!(%error, "closing the usage database failed");
    }
}

fn write_batch(
    conn: &mut Connection,
    batch: &[UsageRecord],
    replica: &str,
) -> rusqlite::Result<()> {
    // IMMEDIATE takes the write lock up front, waiting (busy timeout) for
    // another writer, rather than failing mid-transaction on an upgrade.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut insert = tx.prepare_cached(INSERT)?;
        for r in batch {
            insert_record(&mut insert, r, replica)?;
        }
    }
    tx.commit()
}
