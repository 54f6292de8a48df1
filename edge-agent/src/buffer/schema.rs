//! The buffer file's tables, their migrations and the connection settings.
//!
//! # Tables
//! - `meta(key, value)`: `epoch`, `schema_version`, `next_seq`, `dropped_total`,
//!   `dead_letter_total`, `delivered_total`.
//! - `records(seq PK, id, stream, ts_us, received_us, size, payload, key_id)`:
//!   buffered. `payload` is JSON text, or with `key_id` set a sealed blob.
//! - `meta.clean_close`: `0` while an agent has the file open, `1` after a
//!   clean close (WAL checkpointed); [`crate::recovery`] reads it to tell a
//!   lost write-ahead log from a clean stop.
//! - `ids(seq PK, id UNIQUE)`: producer ids, kept after delivery for a window of
//!   `dedup_window` sequence numbers so a retried PUT is not buffered twice.
//! - `dead_letters(...)`: records the aggregator refused, with the reason,
//!   and records a source pulled that failed validation (see
//!   [`crate::sources`]): those never were in `records`, so they get a fresh
//!   `seq` from the same sequence, the id `source:<name>:<position>` and, as
//!   payload, the source's text as a JSON string.
//! - `checkpoints(source, key, value, updated_us)`: how far each pull source
//!   has read (a file's offset, a query's cursor). Written only by
//!   [`super::Buffer::append_from_source`], in the transaction that stores the
//!   records read up to that point, so a restart neither loses nor repeats.
//!   Its SQL stays here: the buffer is what queries it (`append`, `reads`);
//!   sources see checkpoints only through those methods.
//! - `jobs(...)`: the history of source runs, pruned by age; its SQL is
//!   `crate::jobs::SCHEMA`, beside the queries.
//! - `epochs(first_seq PK, epoch, reason, created_us)`: from which seq on each
//!   epoch keys records ([`crate::epochs`]); `meta.epoch` is the last one.
//! - `meta.rekeyed_total`: records moved to a new epoch because their key was
//!   taken at the aggregator.
//! - `delivered(...)`, `meta.replay_done`, `meta.replay_pending`: acknowledged
//!   records kept for `buffer.retain_delivered`, and their replay
//!   ([`crate::replay`]).
//!
//! Invariants: migrations only add tables and nullable columns, so an open
//! rewrites no record; a file sealed with a key that is not configured is
//! refused before anything is written, one written by a newer schema before
//! anything is committed; `next_seq` starts above every seq any table still
//! remembers.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use uuid::Uuid;

use super::{BufferError, Durability, Stats};
use crate::epochs::{self, Epochs};
use crate::seal::Keyring;

/// 2: `key_id` on `records` and `dead_letters`, `meta.clean_close`.
/// 3: `checkpoints` and `jobs` (pull sources and their runs).
/// 4: more than one row in `epochs` (the file moved to a new epoch); set by
/// [`crate::epochs::rotate`]. A file that never moved stays at 3, so an older
/// agent can still open it after a rollback of the package.
pub(super) const SCHEMA_VERSION: i64 = 4;
/// What a file needs when it has only ever had one epoch.
const BASE_SCHEMA_VERSION: i64 = 3;

/// Whether `table` has the `key_id` column (schema 2 and later).
pub(crate) fn has_key_id(conn: &Connection, table: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM pragma_table_info(?1) WHERE name = 'key_id'",
        [table],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// Key ids of every sealed payload in the file (empty for a new file).
fn sealed_key_ids(conn: &Connection) -> rusqlite::Result<Vec<i64>> {
    if !has_key_id(conn, "records")? || !has_key_id(conn, "dead_letters")? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(
        "SELECT key_id FROM records WHERE key_id IS NOT NULL
         UNION SELECT key_id FROM dead_letters WHERE key_id IS NOT NULL",
    )?;
    stmt.query_map([], |r| r.get(0))?.collect()
}

/// Creates (or reopens) a buffer file whose epoch is `epoch`, for salvaged
/// records that must keep their delivery keys. The caller fills it and calls
/// [`finish_created`] in the same transaction.
pub(crate) fn create_with_epoch(
    path: &Path,
    epoch: Uuid,
    keyring: &Keyring,
) -> Result<Connection, BufferError> {
    let open_err = |source| BufferError::Open {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open(path).map_err(open_err)?;
    configure(&conn, Durability::PowerLoss).map_err(open_err)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    )?;
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?1)",
        [epoch.to_string()],
    )?;
    init_schema(&mut conn, path, keyring)?;
    Ok(conn)
}

/// Sets `next_seq` above every stored sequence and marks the file cleanly
/// closed; see [`create_with_epoch`].
pub(crate) fn finish_created(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq',
             CAST(max(coalesce((SELECT max(seq) FROM records), 0),
                      coalesce((SELECT max(seq) FROM dead_letters), 0)) + 1 AS TEXT))",
        [],
    )?;
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('clean_close', '1')",
        [],
    )?;
    Ok(())
}

/// SQLite page cache per connection, in KiB (SQLite's default is 2,000).
/// The writer appends to the end of two B-trees and the reader scans
/// forward, so the hot pages are few; the operating system's page cache
/// holds the rest, and the agent's resident memory stays small on a client's
/// machine.
pub(super) const PAGE_CACHE_KIB: i64 = 1024;

pub(super) fn configure(conn: &Connection, durability: Durability) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::ProcessCrash => "NORMAL",
            Durability::PowerLoss => "FULL",
        },
    )?;
    // Truncate the WAL after checkpoints so a drained buffer gives disk back.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    // A negative cache_size is KiB; see PAGE_CACHE_KIB.
    conn.pragma_update(None, "cache_size", -PAGE_CACHE_KIB)?;
    Ok(())
}

pub(super) fn init_schema(
    conn: &mut Connection,
    path: &Path,
    keyring: &Keyring,
) -> Result<(Epochs, Stats, i64), BufferError> {
    // Before anything is written: a buffer sealed with a key we do not have
    // must stay exactly as it is until the operator supplies the key.
    keyring
        .check_known(&sealed_key_ids(conn)?)
        .map_err(|source| BufferError::Keys {
            path: path.to_owned(),
            source,
        })?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS records (
             seq INTEGER PRIMARY KEY, id TEXT NOT NULL, stream TEXT NOT NULL,
             ts_us INTEGER NOT NULL, received_us INTEGER NOT NULL, size INTEGER NOT NULL,
             payload TEXT NOT NULL, key_id INTEGER);
         CREATE TABLE IF NOT EXISTS ids (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE);
         CREATE TABLE IF NOT EXISTS dead_letters (
             seq INTEGER PRIMARY KEY, id TEXT NOT NULL, stream TEXT NOT NULL,
             ts_us INTEGER NOT NULL, received_us INTEGER NOT NULL, size INTEGER NOT NULL,
             payload TEXT NOT NULL, reason TEXT NOT NULL, failed_us INTEGER NOT NULL,
             key_id INTEGER);
         CREATE TABLE IF NOT EXISTS checkpoints (
             source TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
             updated_us INTEGER NOT NULL, PRIMARY KEY (source, key)) WITHOUT ROWID;",
    )?;
    // The tables other modules own and query, in the order files have
    // always been created in; `epochs` follows once `meta` is read.
    tx.execute_batch(crate::jobs::SCHEMA)?;
    tx.execute_batch(crate::replay::SCHEMA)?;
    // Schema 1 files lack key_id; adding a nullable column rewrites nothing.
    for table in ["records", "dead_letters"] {
        if !has_key_id(&tx, table)? {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN key_id INTEGER"))?;
        }
    }
    let get = |key: &str| -> rusqlite::Result<Option<String>> {
        tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
    };
    let version: Option<i64> = get("schema_version")?.and_then(|v| v.parse().ok());
    if let Some(found) = version
        && found > SCHEMA_VERSION
    {
        return Err(BufferError::NewerSchema {
            path: path.to_owned(),
            found,
        });
    }
    let epoch = match get("epoch")?.and_then(|e| e.parse::<Uuid>().ok()) {
        Some(e) => e,
        None => {
            let e = Uuid::new_v4();
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?1)",
                [e.to_string()],
            )?;
            e
        }
    };
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
        [version.unwrap_or(0).max(BASE_SCHEMA_VERSION).to_string()],
    )?;
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('clean_close', '0')",
        [],
    )?;
    let counter = |key: &str| -> rusqlite::Result<u64> {
        Ok(get(key)?.and_then(|v| v.parse().ok()).unwrap_or(0))
    };
    let (records, bytes): (i64, i64) = tx.query_row(
        "SELECT count(*), coalesce(sum(size), 0) FROM records",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (retained, retained_bytes) = crate::replay::totals(&tx)?;
    let stats = Stats {
        retained,
        retained_bytes,
        records: records as u64,
        bytes: bytes as u64,
        dropped_total: counter("dropped_total")?,
        dead_letter_total: counter("dead_letter_total")?,
        delivered_total: counter("delivered_total")?,
        rekeyed_total: counter("rekeyed_total")?,
    };
    // The next sequence is above anything ever handed out, whichever table
    // still remembers it, so a seq is never reused within an epoch.
    let max_seen: i64 = tx.query_row(
        "SELECT max(coalesce((SELECT max(seq) FROM records), 0),
                    coalesce((SELECT max(seq) FROM ids), 0),
                    coalesce((SELECT max(seq) FROM dead_letters), 0),
                    coalesce((SELECT max(seq) FROM delivered), 0))",
        [],
        |r| r.get(0),
    )?;
    let stored_next = counter("next_seq")? as i64;
    let next_seq = stored_next.max(max_seen + 1).max(1);
    let epochs = epochs::init(&tx, epoch)?;
    tx.commit()?;
    Ok((epochs, stats, next_seq))
}
