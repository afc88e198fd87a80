//! Usage records shared between replicas through one Redis stream.
//!
//! Each replica keeps writing its records to its own SQLite database (the
//! request path never waits for the network), and one background thread per
//! replica, every `usage.sync_interval`:
//! - **ships** the records this replica wrote since the last shipment to the
//!   stream (`XADD`, trimmed to `usage.redis_max_records`), remembering in
//!   the database how far it got, so a Redis outage only delays them;
//! - **copies** the other replicas' records from the stream into its own
//!   database (`XREAD` from a cursor kept in the same database).
//!
//! So every replica's `/admin/usage` totals the whole fleet, history
//! survives a Redis restart in every database, and a record shipped twice
//! (a pipeline cut halfway) is stored once: records are keyed by
//! (replica, request id, time). A replica that is away longer than the
//! stream's retention misses the records trimmed meanwhile, and says so.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use redis::streams::StreamReadReply;
use rusqlite::{Connection, OpenFlags};

use crate::metrics::metrics;
use crate::usage::{
    insert_record, meta_get, meta_set, record_from_row, UsageRecord, BUSY_TIMEOUT, INSERT,
    RECORD_COLUMNS,
};

/// Where and how often records are shared.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub redis_url: String,
    /// The stream's key; replicas of one fleet share it.
    pub key: String,
    pub interval: Duration,
    /// The stream is trimmed to about this many records.
    pub max_records: u64,
    /// Connect, read and write timeout of every Redis call.
    pub timeout: Duration,
}

/// Records per `XADD` pipeline and per `XREAD`.
const BATCH: usize = 500;

/// The running sharing thread.
pub struct Syncer {
    stop: Sender<Duration>,
    handle: JoinHandle<()>,
    finished: Receiver<()>,
}

impl Syncer {
    /// Opens its own connection to the database at `db` and starts the
    /// thread. Fails only on a bad URL or database, never because Redis is
    /// down (that is retried every interval).
    pub fn start(db: &Path, replica: &str, options: SyncOptions) -> anyhow::Result<Syncer> {
        let client = redis::Client::open(options.redis_url.as_str())
            .map_err(|e| anyhow::anyhow!("usage.redis_url: {e}"))?;
        let conn = Connection::open_with_flags(
            db,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening the usage database {}", db.display()))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let (stop, stopped) = mpsc::channel();
        let (finished_tx, finished) = mpsc::channel::<()>();
        let mut sync = SyncLoop {
            conn,
            client,
            redis: None,
            replica: replica.to_string(),
            options,
            failing: false,
        };
        let handle = std::thread::Builder::new()
            .name("sluice-usage-sync".into())
            .spawn(move || {
                let _finished = finished_tx;
                sync.run(&stopped);
            })
            .context("starting the usage sync thread")?;
        Ok(Syncer {
            stop,
            handle,
            finished,
        })
    }

    /// Ships what is left (for up to `timeout`) and ends the thread.
    pub fn stop(self, timeout: Duration) {
        let _ = self.stop.send(timeout);
        match self
            .finished
            .recv_timeout(timeout + Duration::from_millis(100))
        {
            Err(RecvTimeoutError::Timeout) => {
                tracing::warn!("usage sync did not finish in time; the last records stay local")
            }
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                let _ = self.handle.join();
            }
        }
    }
}

struct SyncLoop {
    conn: Connection,
    client: redis::Client,
    /// Dropped after any error; reconnected on the next round.
    redis: Option<redis::Connection>,
    replica: String,
    options: SyncOptions,
    /// The last round failed (logged once until it works again).
    failing: bool,
}

impl SyncLoop {
    fn run(&mut self, stop: &Receiver<Duration>) {
        loop {
            match stop.recv_timeout(self.options.interval) {
                Err(RecvTimeoutError::Timeout) => {
                    let outcome = self.round();
                    self.note(outcome);
                }
                Ok(timeout) => {
                    let deadline = Instant::now() + timeout;
                    let outcome = self.ship(Some(deadline)).map(|_| ());
                    self.note(outcome);
                    return;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn round(&mut self) -> anyhow::Result<()> {
        self.ship(None)?;
        self.copy()
    }

    fn note(&mut self, outcome: anyhow::Result<()>) {
        match outcome {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("usage sync with Redis works again");
            }
            Ok(()) => {}
            Err(error) => {
                metrics().usage_sync_error();
                self.redis = None;
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "usage sync with Redis failed; records stay local and are shipped once it works"
                    );
                }
            }
        }
    }

    fn redis(&mut self) -> anyhow::Result<&mut redis::Connection> {
        if self.redis.is_none() {
            let timeout = self.options.timeout;
            let connection = self
                .client
                .get_connection_with_timeout(timeout)
                .context("connecting to usage.redis_url")?;
            connection.set_read_timeout(Some(timeout))?;
            connection.set_write_timeout(Some(timeout))?;
            self.redis = Some(connection);
            self.warn_if_trimmed()?;
        }
        self.redis
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no Redis connection"))
    }

    /// Ships this replica's records written since the last shipment, in
    /// order, until none are left (or `deadline` passes). Returns how many.
    fn ship(&mut self, deadline: Option<Instant>) -> anyhow::Result<u64> {
        let mut shipped = 0;
        loop {
            let after: i64 = meta_get(&self.conn, "shipped_rowid")?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let rows = {
                let mut select = self.conn.prepare_cached(&format!(
                    "SELECT rowid, {RECORD_COLUMNS} FROM usage \
                     WHERE rowid > ?1 AND replica = ?2 ORDER BY rowid LIMIT {BATCH}"
                ))?;
                let rows = select.query_map(rusqlite::params![after, self.replica], |row| {
                    Ok((row.get::<_, i64>(0)?, record_from_row(row, 1)?))
                })?;
                rows.collect::<rusqlite::Result<Vec<(i64, UsageRecord)>>>()?
            };
            let Some(&(last, _)) = rows.last() else {
                return Ok(shipped);
            };
            let mut pipe = redis::pipe();
            for (_, record) in &rows {
                pipe.cmd("XADD")
                    .arg(&self.options.key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(self.options.max_records)
                    .arg("*")
                    .arg("o")
                    .arg(&self.replica)
                    .arg("r")
                    .arg(serde_json::to_string(record)?)
                    .ignore();
            }
            let n = rows.len();
            pipe.query::<()>(self.redis()?)
                .context("shipping usage records")?;
            meta_set(&self.conn, "shipped_rowid", &last.to_string())?;
            metrics().usage_records_shipped(n as u64);
            shipped += n as u64;
            if n < BATCH || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(shipped);
            }
        }
    }

    /// Copies the other replicas' records added to the stream since the
    /// cursor into this database, the cursor moving in the same transaction.
    fn copy(&mut self) -> anyhow::Result<()> {
        loop {
            let cursor = meta_get(&self.conn, "copied_id")?.unwrap_or_else(|| "0-0".into());
            let key = self.options.key.clone();
            let reply: Option<StreamReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(BATCH)
                .arg("STREAMS")
                .arg(&key)
                .arg(&cursor)
                .query(self.redis()?)
                .context("reading the usage stream")?;
            let entries: Vec<_> = reply
                .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
                .unwrap_or_default();
            let Some(last) = entries.last().map(|e| e.id.clone()) else {
                return Ok(());
            };
            let (mut copied, mut unreadable) = (0u64, 0u64);
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut insert = tx.prepare_cached(INSERT)?;
                for entry in &entries {
                    let origin: Option<String> = entry.get("o");
                    let record = entry
                        .get::<String>("r")
                        .and_then(|text| serde_json::from_str::<UsageRecord>(&text).ok());
                    match (origin, record) {
                        (Some(origin), _) if origin == self.replica => {}
                        (Some(origin), Some(record)) => {
                            if insert_record(&mut insert, &record, &origin)? {
                                copied += 1;
                            }
                        }
                        _ => unreadable += 1,
                    }
                }
            }
            meta_set(&tx, "copied_id", &last)?;
            tx.commit()?;
            metrics().usage_records_copied(copied);
            if unreadable > 0 {
                tracing::warn!(
                    unreadable,
                    key,
                    "usage stream entries without a readable record were skipped"
                );
            }
            if entries.len() < BATCH {
                return Ok(());
            }
        }
    }

    /// After (re)connecting: if Redis trimmed entries newer than our cursor
    /// (`XINFO STREAM`'s `max-deleted-entry-id`, Redis 7), we missed them.
    fn warn_if_trimmed(&mut self) -> anyhow::Result<()> {
        let Some(cursor) = meta_get(&self.conn, "copied_id")? else {
            return Ok(());
        };
        let Some(redis) = self.redis.as_mut() else {
            return Ok(());
        };
        let info: redis::Value = match redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&self.options.key)
            .query(redis)
        {
            Ok(info) => info,
            // No stream yet: nothing was trimmed.
            Err(e) if e.kind() == redis::ErrorKind::ResponseError => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let deleted = match info {
            redis::Value::Array(items) => items
                .chunks(2)
                .find(|pair| {
                    redis::from_redis_value::<String>(&pair[0]).ok().as_deref()
                        == Some("max-deleted-entry-id")
                })
                .and_then(|pair| pair.get(1))
                .and_then(|v| redis::from_redis_value::<String>(v).ok()),
            redis::Value::Map(pairs) => pairs
                .iter()
                .find(|(k, _)| {
                    redis::from_redis_value::<String>(k).ok().as_deref()
                        == Some("max-deleted-entry-id")
                })
                .and_then(|(_, v)| redis::from_redis_value::<String>(v).ok()),
            _ => None,
        };
        if let Some(deleted) = deleted {
            if stream_id(&deleted) > stream_id(&cursor) {
                tracing::warn!(
                    cursor,
                    deleted,
                    "usage records of other replicas were trimmed from the stream before this \
                     replica copied them (raise usage.redis_max_records)"
                );
            }
        }
        Ok(())
    }
}

/// A stream id `MS-SEQ` as numbers, for ordering.
fn stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}
