//! Usage totals: what they can be grouped by, and the SQL that sums them.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use rusqlite::{Connection, OpenFlags};

use super::schema::{from_sql_count, BUSY_TIMEOUT};

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

/// Totals for `query` from the database at `path`, read on a connection of
/// its own (no rows when there are no records).
pub(super) fn run(path: &Path, query: &UsageQuery) -> anyhow::Result<Vec<UsageRow>> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening the usage database {}", path.display()))?;
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
