//! The usage table, its upgrades, and writing and reading one record.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection};

use super::record::UsageRecord;

pub(super) const SCHEMA: &str = "
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
pub(super) const REPLICA_COLUMN: &str = "ALTER TABLE usage ADD COLUMN replica TEXT";
/// A record is one replica's request: the same record arriving twice (a
/// retried shipment) is stored once.
pub(super) const ORIGIN_INDEX: &str =
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

/// SQLite integers are i64: counts above i64::MAX are saturated (they will
/// not happen), while request ids are stored bit-for-bit and read back
/// exactly.
pub(super) fn to_sql_count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(super) fn from_sql_count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
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
pub(super) fn prepare_replica(
    conn: &Connection,
    configured: Option<&str>,
) -> rusqlite::Result<String> {
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
