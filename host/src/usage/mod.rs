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
pub mod sync;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rusqlite::{params, Connection, OpenFlags};

/// One request's usage, as the gateway records it when the request ends.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UsageRecord {
    /// Unix milliseconds when the request arrived.
    pub at_ms: i64,
    pub request_id: u64,
    pub consumer: Option<String>,
    /// `"chat.completions"`, `"completions"` or `"embeddings"`.
    pub endpoint: String,
    pub model_requested: String,
    pub model_answered: Option<String>,
    pub backend: Option<String>,
    pub status: u16,
    pub stream: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The counts came from our tokenizer, not from the backend.
    pub estimated: bool,
    /// Time to first token (streams).
    pub ttft_ms: Option<f64>,
    pub latency_ms: f64,
    /// Completion tokens / generation time.
    pub tokens_per_second: Option<f64>,
    /// A response filter changed or stopped the answer.
    pub filtered: bool,
    /// Answered by another model than the one requested.
    pub fell_back: bool,
}

impl UsageRecord {
    /// What the Prometheus metrics count of this record.
    pub fn finished(&self) -> crate::metrics::Finished<'_> {
        crate::metrics::Finished {
            model_answered: self.model_answered.as_deref(),
            backend: self.backend.as_deref(),
            consumer: self.consumer.as_deref(),
            status: self.status,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            ttft_ms: self.ttft_ms,
            latency_ms: self.latency_ms,
            tokens_per_second: self.tokens_per_second,
        }
    }
}

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

/// What a usage total is grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Consumer,
    Model,
    Backend,
    Day,
    Replica,
}

impl GroupBy {
    /// The key in [`UsageRow::group`] and in `parse_group_by`'s input.
    pub fn name(self) -> &'static str {
        match self {
            GroupBy::Consumer => "consumer",
            GroupBy::Model => "model",
            GroupBy::Backend => "backend",
            GroupBy::Day => "day",
            GroupBy::Replica => "replica",
        }
    }

    /// The SQL expression for this key. Only these fixed strings ever reach
    /// the SQL text; everything from a caller is a bound parameter.
    fn column(self) -> &'static str {
        match self {
            GroupBy::Consumer => "consumer",
            GroupBy::Model => "model_requested",
            GroupBy::Backend => "backend",
            GroupBy::Day => "date(at_ms / 1000, 'unixepoch')",
            GroupBy::Replica => "replica",
        }
    }
}

/// Parses a comma-separated list such as `consumer,day`. Blank items are
/// ignored and repeats are kept once; an unknown word is an error naming it.
pub fn parse_group_by(text: &str) -> Result<Vec<GroupBy>, String> {
    let mut keys = Vec::new();
    for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let key = match word.to_ascii_lowercase().as_str() {
            "consumer" => GroupBy::Consumer,
            "model" => GroupBy::Model,
            "backend" => GroupBy::Backend,
            "day" => GroupBy::Day,
            "replica" => GroupBy::Replica,
            _ => {
                return Err(format!(
                    "unknown group_by `{word}`; expected consumer, model, backend, day or replica"
                ))
            }
        };
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// Which totals [`UsageStore::query`] returns.
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    pub group_by: Vec<GroupBy>,
    /// Inclusive lower bound on `at_ms`.
    pub from_ms: Option<i64>,
    /// Exclusive upper bound on `at_ms`.
    pub to_ms: Option<i64>,
}

/// Totals for one group.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UsageRow {
    /// One entry per group key (`"consumer"`, `"model"`, `"backend"`,
    /// `"day"`, `"replica"`); `None` where the records had no value.
    pub group: BTreeMap<String, Option<String>>,
    pub requests: u64,
    /// Requests answered with status >= 400.
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Requests whose counts came from our tokenizer.
    pub estimated_requests: u64,
    pub avg_latency_ms: f64,
    pub avg_ttft_ms: Option<f64>,
}

/// Unix milliseconds now, for [`UsageRecord::at_ms`].
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

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

struct Writer {
    handle: JoinHandle<()>,
    /// Disconnects when the writer thread ends (its sender is dropped), so
    /// shutdown can wait with a timeout, which `JoinHandle` cannot.
    finished: Receiver<()>,
}

#[derive(Default)]
struct WriterCounters {
    written: AtomicU64,
    failed: AtomicU64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage (
    at_ms             INTEGER NOT NULL,
    request_id        INTEGER NOT NULL,
    consumer          TEXT,
    endpoint          TEXT    NOT NULL,
    model_requested   TEXT    NOT NULL,
    model_answered    TEXT,
    backend           TEXT,
    status            INTEGER NOT NULL,
    stream            INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    estimated         INTEGER NOT NULL,
    ttft_ms           REAL,
    latency_ms        REAL    NOT NULL,
    tokens_per_second REAL,
    filtered          INTEGER NOT NULL,
    fell_back         INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_at_ms ON usage (at_ms);
CREATE TABLE IF NOT EXISTS usage_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// Added after the first release: databases made before it get the column
/// (their rows become this replica's) and the index on open.
const REPLICA_COLUMN: &str = "ALTER TABLE usage ADD COLUMN replica TEXT";
/// A record is one replica's request: the same record arriving twice (a
/// retried shipment) is stored once.
const ORIGIN_INDEX: &str =
    "CREATE UNIQUE INDEX IF NOT EXISTS usage_origin ON usage (replica, request_id, at_ms)";

/// The record columns, in [`UsageRecord`]'s order, for SELECTs that read
/// records back with [`record_from_row`].
pub(crate) const RECORD_COLUMNS: &str = "at_ms, request_id, consumer, endpoint, model_requested, \
    model_answered, backend, status, stream, prompt_tokens, completion_tokens, estimated, \
    ttft_ms, latency_ms, tokens_per_second, filtered, fell_back";

/// `OR IGNORE`: only the origin index can refuse a row, and only for a
/// record already stored.
pub(crate) const INSERT: &str = "
INSERT OR IGNORE INTO usage (
    at_ms, request_id, consumer, endpoint, model_requested, model_answered,
    backend, status, stream, prompt_tokens, completion_tokens, estimated,
    ttft_ms, latency_ms, tokens_per_second, filtered, fell_back, replica
) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)
";

/// How long a connection waits for a lock held by another connection (an
/// operator's `sqlite3` shell, a long read) before the statement fails.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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
        let conn = Connection::open_with_flags(
            &self.inner.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening the usage database {}", self.inner.path.display()))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "query_only", true)?;

        let mut keys: Vec<GroupBy> = Vec::new();
        for key in &query.group_by {
            if !keys.contains(key) {
                keys.push(*key);
            }
        }
        let columns: Vec<&str> = keys.iter().map(|k| k.column()).collect();

        let mut sql = String::from("SELECT ");
        for column in &columns {
            sql.push_str(column);
            sql.push_str(", ");
        }
        sql.push_str(
            "COUNT(*), SUM(status >= 400), SUM(prompt_tokens), SUM(completion_tokens), \
             SUM(estimated), AVG(latency_ms), AVG(ttft_ms) FROM usage",
        );
        let mut conditions = Vec::new();
        let mut bound: Vec<i64> = Vec::new();
        if let Some(from) = query.from_ms {
            conditions.push("at_ms >= ?");
            bound.push(from);
        }
        if let Some(to) = query.to_ms {
            conditions.push("at_ms < ?");
            bound.push(to);
        }
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        if !columns.is_empty() {
            let list = columns.join(", ");
            sql.push_str(" GROUP BY ");
            sql.push_str(&list);
            sql.push_str(" ORDER BY ");
            sql.push_str(&list);
        }

        let mut statement = conn.prepare(&sql).context("preparing the usage query")?;
        let n = keys.len();
        let rows = statement.query_map(rusqlite::params_from_iter(bound.iter()), |row| {
            let mut group = BTreeMap::new();
            for (i, key) in keys.iter().enumerate() {
                group.insert(key.name().to_string(), row.get::<_, Option<String>>(i)?);
            }
            let count = |i: usize| -> rusqlite::Result<u64> {
                Ok(from_sql_count(row.get::<_, Option<i64>>(i)?.unwrap_or(0)))
            };
            let prompt_tokens = count(n + 2)?;
            let completion_tokens = count(n + 3)?;
            Ok(UsageRow {
                group,
                requests: count(n)?,
                errors: count(n + 1)?,
                prompt_tokens,
                completion_tokens,
                total_tokens: prompt_tokens.saturating_add(completion_tokens),
                estimated_requests: count(n + 4)?,
                avg_latency_ms: row.get::<_, Option<f64>>(n + 5)?.unwrap_or(0.0),
                avg_ttft_ms: row.get(n + 6)?,
            })
        })?;
        let mut out = Vec::new();
        for row in rows {
            let row = row.context("reading usage totals")?;
            // An aggregate without GROUP BY yields one all-zero row even over
            // no records; callers expect no rows then.
            if row.requests > 0 {
                out.push(row);
            }
        }
        Ok(out)
    }
}

/// SQLite integers are i64: counts above i64::MAX are saturated (they will
/// not happen), while request ids are stored bit-for-bit and read back
/// exactly.
fn to_sql_count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn from_sql_count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// `(batch_max, flush_interval)`: at most this many records per
/// transaction, waiting at most this long for more after the first.
fn write_loop(
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

/// Inserts one record as `replica`'s; false when it was already stored.
pub(crate) fn insert_record(
    insert: &mut rusqlite::CachedStatement<'_>,
    r: &UsageRecord,
    replica: &str,
) -> rusqlite::Result<bool> {
    let added = insert.execute(params![
        r.at_ms,
        // Bit-for-bit, so ids above i64::MAX survive the round trip.
        r.request_id as i64,
        r.consumer,
        r.endpoint,
        r.model_requested,
        r.model_answered,
        r.backend,
        r.status,
        r.stream,
        to_sql_count(r.prompt_tokens),
        to_sql_count(r.completion_tokens),
        r.estimated,
        r.ttft_ms,
        r.latency_ms,
        r.tokens_per_second,
        r.filtered,
        r.fell_back,
        replica,
    ])?;
    Ok(added == 1)
}

/// Reads a record from a row selected with [`RECORD_COLUMNS`] starting at
/// column `at`.
pub(crate) fn record_from_row(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<UsageRecord> {
    Ok(UsageRecord {
        at_ms: row.get(at)?,
        request_id: row.get::<_, i64>(at + 1)? as u64,
        consumer: row.get(at + 2)?,
        endpoint: row.get(at + 3)?,
        model_requested: row.get(at + 4)?,
        model_answered: row.get(at + 5)?,
        backend: row.get(at + 6)?,
        status: row.get(at + 7)?,
        stream: row.get(at + 8)?,
        prompt_tokens: from_sql_count(row.get(at + 9)?),
        completion_tokens: from_sql_count(row.get(at + 10)?),
        estimated: row.get(at + 11)?,
        ttft_ms: row.get(at + 12)?,
        latency_ms: row.get(at + 13)?,
        tokens_per_second: row.get(at + 14)?,
        filtered: row.get(at + 15)?,
        fell_back: row.get(at + 16)?,
    })
}

/// A value kept in the database's `usage_meta` table.
pub(crate) fn meta_get(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    use rusqlite::OptionalExtension as _;
    conn.query_row(
        "SELECT value FROM usage_meta WHERE key = ?1",
        [key],
        |row| row.get(0),
    )
    .optional()
}

pub(crate) fn meta_set(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO usage_meta (key, value) VALUES (?1, ?2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

/// Brings an older database up to the replica-aware schema and returns this
/// replica's name: `configured`, else the one saved, else a new one (saved).
fn prepare_replica(conn: &Connection, configured: Option<&str>) -> rusqlite::Result<String> {
    let replica = match (configured, meta_get(conn, "replica")?) {
        (Some(name), _) => name.to_string(),
        (None, Some(saved)) => saved,
        (None, None) => new_replica_name(),
    };
    meta_set(conn, "replica", &replica)?;
    let has_column = conn
        .prepare("SELECT 1 FROM pragma_table_info('usage') WHERE name = 'replica'")?
        .exists([])?;
    if !has_column {
        conn.execute_batch(REPLICA_COLUMN)?;
    }
    // Rows from before the column (or an interrupted upgrade) are ours.
    conn.execute(
        "UPDATE usage SET replica = ?1 WHERE replica IS NULL",
        [&replica],
    )?;
    conn.execute_batch(ORIGIN_INDEX)?;
    Ok(replica)
}

/// `HOSTNAME-xxxxxxxx`: readable in a pod (HOSTNAME is the pod's name),
/// unique among replicas that share a host name.
fn new_replica_name() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.write_u32(std::process::id());
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sluice".into());
    format!("{host}-{:08x}", hasher.finish() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "sluice-usage-{name}-{}-{}-{}",
                std::process::id(),
                now_ms(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }

        fn db(&self) -> PathBuf {
            self.0.join("usage.sqlite")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fast() -> WriterOptions {
        WriterOptions {
            flush_interval: Duration::from_millis(10),
            ..WriterOptions::default()
        }
    }

    fn record(at_ms: i64, id: u64, consumer: Option<&str>, model: &str) -> UsageRecord {
        UsageRecord {
            at_ms,
            request_id: id,
            consumer: consumer.map(str::to_string),
            endpoint: "chat.completions".into(),
            model_requested: model.into(),
            model_answered: Some(model.into()),
            backend: Some("gpu-1".into()),
            status: 200,
            stream: false,
            prompt_tokens: 10,
            completion_tokens: 5,
            estimated: false,
            ttft_ms: None,
            latency_ms: 100.0,
            tokens_per_second: None,
            filtered: false,
            fell_back: false,
        }
    }

    fn read_all(path: &Path) -> Vec<UsageRecord> {
        let conn = Connection::open(path).expect("open");
        let mut statement = conn
            .prepare(&format!(
                "SELECT {RECORD_COLUMNS} FROM usage ORDER BY rowid"
            ))
            .expect("prepare");
        let rows = statement
            .query_map([], |row| record_from_row(row, 0))
            .expect("query");
        rows.collect::<Result<_, _>>().expect("rows")
    }

    fn count_rows(path: &Path) -> i64 {
        let conn = Connection::open(path).expect("open");
        conn.query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0))
            .expect("count")
    }

    #[test]
    fn records_round_trip_exactly() {
        let dir = TempDir::new("roundtrip");
        let store = UsageStore::open(&dir.db(), fast()).expect("open");
        let full = UsageRecord {
            at_ms: 1_700_000_000_123,
            request_id: u64::MAX - 7,
            consumer: Some("team-a".into()),
            endpoint: "chat.completions".into(),
            model_requested: "llama-3-70b".into(),
            model_answered: Some("llama-3-8b".into()),
            backend: Some("gpu-2".into()),
            status: 503,
            stream: true,
            prompt_tokens: 1234,
            completion_tokens: 567,
            estimated: true,
            ttft_ms: Some(87.25),
            latency_ms: 1523.5,
            tokens_per_second: Some(41.125),
            filtered: true,
            fell_back: true,
        };
        let empty = UsageRecord {
            at_ms: 0,
            request_id: 0,
            consumer: None,
            endpoint: "embeddings".into(),
            model_requested: "e5".into(),
            model_answered: None,
            backend: None,
            status: 0,
            stream: false,
            prompt_tokens: 0,
            completion_tokens: 0,
            estimated: false,
            ttft_ms: None,
            latency_ms: 0.0,
            tokens_per_second: None,
            filtered: false,
            fell_back: false,
        };
        store.record(full.clone());
        store.record(empty.clone());
        assert!(store.shutdown(Duration::from_secs(10)));
        assert_eq!(store.written(), 2);
        assert_eq!(read_all(&dir.db()), vec![full, empty]);
    }

    #[test]
    fn groups_by_model() {
        let dir = TempDir::new("model");
        let store = UsageStore::open(&dir.db(), fast()).expect("open");
        store.record(record(1_000, 1, Some("a"), "m1"));
        store.record(UsageRecord {
            status: 500,
            estimated: true,
            ttft_ms: Some(20.0),
            latency_ms: 300.0,
            ..record(2_000, 2, Some("b"), "m1")
        });
        store.record(record(3_000, 3, None, "m2"));
        assert!(store.shutdown(Duration::from_secs(10)));

        let rows = store
            .query(&UsageQuery {
                group_by: vec![GroupBy::Model],
                ..UsageQuery::default()
            })
            .expect("query");
        assert_eq!(rows.len(), 2);
        let m1 = &rows[0];
        assert_eq!(m1.group.get("model"), Some(&Some("m1".to_string())));
        assert_eq!(m1.requests, 2);
        assert_eq!(m1.errors, 1);
        assert_eq!(m1.prompt_tokens, 20);
        assert_eq!(m1.completion_tokens, 10);
        assert_eq!(m1.total_tokens, 30);
        assert_eq!(m1.estimated_requests, 1);
        assert_eq!(m1.avg_latency_ms, 200.0);
        assert_eq!(m1.avg_ttft_ms, Some(20.0));
        let m2 = &rows[1];
        assert_eq!(m2.group.get("model"), Some(&Some("m2".to_string())));
        assert_eq!(m2.requests, 1);
        assert_eq!(m2.errors, 0);
        assert_eq!(m2.avg_ttft_ms, None);

        // No keys: one row of totals.
        let totals = store.query(&UsageQuery::default()).expect("query");
        assert_eq!(totals.len(), 1);
        assert!(totals[0].group.is_empty());
        assert_eq!(totals[0].requests, 3);
        assert_eq!(totals[0].total_tokens, 45);
    }

    #[test]
    fn groups_by_consumer_and_day_within_a_range() {
        const DAY: i64 = 86_400_000;
        // 2024-01-01T00:00:00Z
        let jan1 = 1_704_067_200_000;
        let dir = TempDir::new("consumer-day");
        let store = UsageStore::open(&dir.db(), fast()).expect("open");
        store.record(record(jan1 - 1, 1, Some("a"), "m")); // 2023-12-31
        store.record(record(jan1, 2, Some("a"), "m"));
        store.record(record(jan1 + 5, 3, Some("a"), "m"));
        store.record(record(jan1 + 10, 4, None, "m"));
        store.record(record(jan1 + DAY, 5, Some("b"), "m"));
        store.record(record(jan1 + DAY + 1, 6, Some("a"), "m"));
        store.record(record(jan1 + 2 * DAY, 7, Some("a"), "m")); // == to_ms: excluded
        assert!(store.shutdown(Duration::from_secs(10)));

        let group_by = parse_group_by("consumer,day").expect("parse");
        let all = store
            .query(&UsageQuery {
                group_by: group_by.clone(),
                from_ms: None,
                to_ms: None,
            })
            .expect("query");
        assert_eq!(all.iter().map(|r| r.requests).sum::<u64>(), 7);

        let rows = store
            .query(&UsageQuery {
                group_by,
                from_ms: Some(jan1),
                to_ms: Some(jan1 + 2 * DAY),
            })
            .expect("query");
        let got: Vec<(Option<&str>, Option<&str>, u64)> = rows
            .iter()
            .map(|r| {
                (
                    r.group["consumer"].as_deref(),
                    r.group["day"].as_deref(),
                    r.requests,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (None, Some("2024-01-01"), 1),
                (Some("a"), Some("2024-01-01"), 2),
                (Some("a"), Some("2024-01-02"), 1),
                (Some("b"), Some("2024-01-02"), 1),
            ]
        );
    }

    #[test]
    fn backend_grouping_and_reads_while_open() {
        let dir = TempDir::new("backend");
        let store = UsageStore::open(&dir.db(), fast()).expect("open");
        store.record(record(1, 1, None, "m"));
        store.record(UsageRecord {
            backend: None,
            ..record(2, 2, None, "m")
        });
        // The writer commits within the flush interval; read while it runs.
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.written() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let rows = store
            .query(&UsageQuery {
                group_by: vec![GroupBy::Backend],
                ..UsageQuery::default()
            })
            .expect("query");
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.group["backend"].clone(), r.requests))
            .collect();
        assert_eq!(got, vec![(None, 1), (Some("gpu-1".to_string()), 1)]);
        assert!(store.shutdown(Duration::from_secs(10)));
    }

    #[test]
    fn empty_store_has_no_rows() {
        let dir = TempDir::new("empty");
        let store = UsageStore::open(&dir.db(), fast()).expect("open");
        for group_by in [vec![], vec![GroupBy::Consumer, GroupBy::Day]] {
            let rows = store
                .query(&UsageQuery {
                    group_by,
                    ..UsageQuery::default()
                })
                .expect("query");
            assert!(rows.is_empty(), "{rows:?}");
        }
        assert!(store.shutdown(Duration::from_secs(10)));
        // Still readable after the writer closed the database.
        assert!(store
            .query(&UsageQuery::default())
            .expect("query")
            .is_empty());
    }

    #[test]
    fn ten_thousand_records_from_four_threads_all_land() {
        let dir = TempDir::new("many");
        let store = UsageStore::open(&dir.db(), WriterOptions::default()).expect("open");
        let started = Instant::now();
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..2_500u64 {
                        let id = t * 2_500 + i;
                        store.record(record(id as i64, id, Some("c"), "m"));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("join");
        }
        let queued = started.elapsed();
        assert!(store.shutdown(Duration::from_secs(30)));
        eprintln!(
            "10000 records: queued in {queued:?}, all written after {:?}",
            started.elapsed()
        );
        assert_eq!(store.dropped(), 0);
        assert_eq!(store.written(), 10_000);
        assert_eq!(count_rows(&dir.db()), 10_000);
        // After shutdown, records are refused (and counted), not lost silently.
        store.record(record(0, 0, None, "m"));
        assert_eq!(store.dropped(), 1);
    }

    #[test]
    fn record_never_blocks_when_the_writer_is_stalled() {
        let dir = TempDir::new("stalled");
        let store = UsageStore::open(
            &dir.db(),
            WriterOptions {
                queue: 4,
                batch: 2,
                flush_interval: Duration::from_millis(1),
                replica: None,
            },
        )
        .expect("open");
        // Another connection holds the write lock: the writer's first insert
        // waits on it (up to BUSY_TIMEOUT) and stops draining the queue.
        let mut blocker = Connection::open(dir.db()).expect("open blocker");
        let lock = blocker
            .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
            .expect("lock");

        let mut slowest = Duration::ZERO;
        for i in 0..1_000u64 {
            let started = Instant::now();
            store.record(record(i as i64, i, None, "m"));
            slowest = slowest.max(started.elapsed());
        }
        assert!(slowest < Duration::from_millis(50), "slowest {slowest:?}");
        let dropped = store.dropped();
        // At most one batch in the writer's hands plus a full queue got in.
        assert!(dropped >= 1_000 - 2 - 4, "dropped {dropped}");

        lock.rollback().expect("unlock");
        assert!(store.shutdown(Duration::from_secs(10)));
        assert_eq!(count_rows(&dir.db()) as u64, 1_000 - dropped);
    }

    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn record_cost() {
        const N: u64 = 100_000;
        let dir = TempDir::new("cost");
        let records = |n: u64| -> Vec<UsageRecord> {
            (0..n)
                .map(|i| record(i as i64, i, Some("consumer"), "model"))
                .collect()
        };
        // Queue large enough for all: the accepted path.
        let store = UsageStore::open(
            &dir.db(),
            WriterOptions {
                queue: N as usize,
                ..WriterOptions::default()
            },
        )
        .expect("open");
        let batch = records(N);
        let started = Instant::now();
        for r in batch {
            store.record(r);
        }
        let took = started.elapsed();
        eprintln!(
            "record() accepted: {:.0} ns/call over {N} calls, dropped {}",
            took.as_nanos() as f64 / N as f64,
            store.dropped()
        );
        let started = Instant::now();
        assert!(store.shutdown(Duration::from_secs(60)));
        eprintln!("writing the remaining queue took {:?}", started.elapsed());
        assert_eq!(count_rows(&dir.db()), N as i64);

        // Queue full: the dropped path (freeing the record included).
        let path = dir.0.join("full.sqlite");
        let full = UsageStore::open(
            &path,
            WriterOptions {
                queue: 1,
                ..WriterOptions::default()
            },
        )
        .expect("open");
        let mut blocker = Connection::open(&path).expect("open");
        let lock = blocker
            .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
            .expect("lock");
        let batch = records(N);
        let started = Instant::now();
        for r in batch {
            full.record(r);
        }
        eprintln!(
            "record() dropped: {:.0} ns/call, dropped {}",
            started.elapsed().as_nanos() as f64 / N as f64,
            full.dropped()
        );
        lock.rollback().expect("unlock");
        assert!(full.shutdown(Duration::from_secs(30)));
    }

    #[test]
    fn a_replica_keeps_its_name_and_an_old_database_becomes_its_own() {
        let dir = TempDir::new("upgrade");
        // A database as the first release wrote it: no replica column.
        {
            let conn = Connection::open(dir.db()).expect("open");
            conn.execute_batch(
                "CREATE TABLE usage (at_ms INTEGER NOT NULL, request_id INTEGER NOT NULL,
                 consumer TEXT, endpoint TEXT NOT NULL, model_requested TEXT NOT NULL,
                 model_answered TEXT, backend TEXT, status INTEGER NOT NULL,
                 stream INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
                 completion_tokens INTEGER NOT NULL, estimated INTEGER NOT NULL,
                 ttft_ms REAL, latency_ms REAL NOT NULL, tokens_per_second REAL,
                 filtered INTEGER NOT NULL, fell_back INTEGER NOT NULL);
                 INSERT INTO usage VALUES (1000, 1, 'a', 'chat.completions', 'm', 'm', 'b',
                 200, 0, 10, 5, 0, NULL, 100.0, NULL, 0, 0);",
            )
            .expect("old schema");
        }
        let store = UsageStore::open(&dir.db(), fast()).expect("open");
        let name = store.replica().to_string();
        assert!(name.len() > 9, "{name}");
        store.record(record(2_000, 1, Some("a"), "m"));
        assert!(store.shutdown(Duration::from_secs(10)));
        let by_replica = store
            .query(&UsageQuery {
                group_by: vec![GroupBy::Replica],
                ..UsageQuery::default()
            })
            .expect("query");
        assert_eq!(by_replica.len(), 1, "{by_replica:?}");
        assert_eq!(
            by_replica[0].group["replica"].as_deref(),
            Some(name.as_str())
        );
        assert_eq!(by_replica[0].requests, 2);
        // Reopened: the same name; configured: that name from then on.
        let again = UsageStore::open(&dir.db(), fast()).expect("reopen");
        assert_eq!(again.replica(), name);
        assert!(again.shutdown(Duration::from_secs(10)));
        let named = WriterOptions {
            replica: Some("gw-1".into()),
            ..fast()
        };
        let renamed = UsageStore::open(&dir.db(), named).expect("reopen");
        assert_eq!(renamed.replica(), "gw-1");
        assert!(renamed.shutdown(Duration::from_secs(10)));
        assert_eq!(
            UsageStore::open(&dir.db(), fast())
                .expect("reopen")
                .replica(),
            "gw-1"
        );
    }

    #[test]
    fn store_is_shareable() {
        fn assert_shareable<T: Clone + Send + Sync + 'static>() {}
        assert_shareable::<UsageStore>();
    }

    #[test]
    fn parses_group_by() {
        assert_eq!(
            parse_group_by("consumer, day,model,backend,day,replica"),
            Ok(vec![
                GroupBy::Consumer,
                GroupBy::Day,
                GroupBy::Model,
                GroupBy::Backend,
                GroupBy::Replica
            ])
        );
        assert_eq!(parse_group_by(""), Ok(vec![]));
        let error = parse_group_by("consumer,region").expect_err("bad word");
        assert!(error.contains("`region`"), "{error}");
    }
}
