//! `dcs-edge buffer check|stats|salvage|export`: the buffer's offline fsck.
//!
//! Each command reads the file without changing it (`check` and `stats` open
//! it read-only, `salvage` reads a copy), so they are safe on a file an
//! operator wants to keep as evidence, and `check`, `stats` and `export` are
//! safe beside a running agent (SQLite readers do not block its writer).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::buffer::{self, BufferError};
use crate::recovery::{self, Report};
use crate::seal::Keyring;

/// Offline there is no start-up to hold up: check every page.
const OFFLINE_CHECK_BUDGET: Duration = Duration::from_secs(24 * 3600);

/// `None` when the file is healthy, else why not.
pub fn check(path: &Path) -> Option<String> {
    if !path.exists() {
        return Some("no such file".into());
    }
    recovery::diagnose_read_only(path, OFFLINE_CHECK_BUDGET)
}

#[derive(Debug, Serialize)]
pub struct Stats {
    pub path: String,
    pub integrity: String,
    pub epoch: Option<String>,
    pub schema_version: Option<String>,
    pub next_seq: Option<String>,
    pub closed_cleanly: Option<bool>,
    pub buffered: Counts,
    pub dead_letters: Counts,
    pub delivered_total: Option<String>,
    pub dropped_total: Option<String>,
    pub dead_letter_total: Option<String>,
    /// Records by stream: (buffered, dead letters).
    pub streams: BTreeMap<String, StreamCounts>,
    /// Keys (ids) that sealed payloads in this file.
    pub key_ids: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Counts {
    pub records: u64,
    pub bytes: u64,
    pub oldest_received: Option<String>,
    pub newest_received: Option<String>,
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
}

#[derive(Debug, Default, Serialize)]
pub struct StreamCounts {
    pub buffered: u64,
    pub dead_letters: u64,
}

pub fn stats(path: &Path) -> Result<Stats, BufferError> {
    let integrity = check(path).unwrap_or_else(|| "ok".into());
    let conn = open_read_only(path)?;
    let meta = |key: &str| -> Option<String> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .ok()
            .flatten()
    };
    let counts = |table: &str| -> Counts {
        conn.query_row(
            &format!(
                "SELECT count(*), coalesce(sum(size), 0), min(received_us), max(received_us),
                        min(seq), max(seq) FROM {table}"
            ),
            [],
            |r| {
                Ok(Counts {
                    records: r.get::<_, i64>(0)?.max(0) as u64,
                    bytes: r.get::<_, i64>(1)?.max(0) as u64,
                    oldest_received: r
                        .get::<_, Option<i64>>(2)?
                        .map(dcs_shared::record::format_ts),
                    newest_received: r
                        .get::<_, Option<i64>>(3)?
                        .map(dcs_shared::record::format_ts),
                    first_seq: r.get(4)?,
                    last_seq: r.get(5)?,
                })
            },
        )
        .unwrap_or_default()
    };
    let mut streams: BTreeMap<String, StreamCounts> = BTreeMap::new();
    for (table, dead) in [("records", false), ("dead_letters", true)] {
        if let Ok(mut stmt) = conn.prepare(&format!(
            "SELECT stream, count(*) FROM {table} GROUP BY stream"
        )) {
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)));
            for (stream, n) in rows.into_iter().flatten().flatten() {
                let entry = streams.entry(stream).or_default();
                if dead {
                    entry.dead_letters = n.max(0) as u64;
                } else {
                    entry.buffered = n.max(0) as u64;
                }
            }
        }
    }
    let key_ids = conn
        .prepare(
            "SELECT key_id FROM records WHERE key_id IS NOT NULL
             UNION SELECT key_id FROM dead_letters WHERE key_id IS NOT NULL",
        )
        .and_then(|mut stmt| {
            stmt.query_map([], |r| r.get::<_, i64>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or_default()
        .into_iter()
        .map(crate::seal::format_key_id)
        .collect();
    Ok(Stats {
        path: path.display().to_string(),
        integrity,
        epoch: meta("epoch"),
        schema_version: meta("schema_version"),
        next_seq: meta("next_seq"),
        closed_cleanly: meta("clean_close").map(|v| v == "1"),
        buffered: counts("records"),
        dead_letters: counts("dead_letters"),
        delivered_total: meta("delivered_total"),
        dropped_total: meta("dropped_total"),
        dead_letter_total: meta("dead_letter_total"),
        streams,
        key_ids,
    })
}

/// Copies every readable record of `damaged` into a recovered buffer in
/// `into` (a directory; the agent delivers files in `recovered/` beside its
/// buffer at its next start).
pub fn salvage(damaged: &Path, into: &Path, keyring: &Keyring) -> Result<Report, BufferError> {
    recovery::salvage_copy(damaged, into, keyring)
}

/// Writes every record (buffered, then dead letters) as one NDJSON line:
/// `{"state","seq","id","stream","ts","received","payload"[,"reason"]}`.
/// Rows that cannot be read are reported on `errors` and skipped. Returns
/// (records written, rows skipped).
pub fn export(
    path: &Path,
    keyring: &Keyring,
    out: &mut dyn Write,
    errors: &mut dyn Write,
) -> Result<(u64, u64), BufferError> {
    let conn = open_read_only(path)?;
    let epoch: uuid::Uuid = conn
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
            r.get::<_, String>(0)
        })?
        .parse()
        .map_err(|_| {
            BufferError::Sqlite(rusqlite::Error::InvalidColumnType(
                0,
                "epoch".into(),
                rusqlite::types::Type::Text,
            ))
        })?;
    let io =
        |e: std::io::Error| BufferError::Sqlite(rusqlite::Error::ToSqlConversionFailure(e.into()));
    let (mut written, mut skipped) = (0u64, 0u64);
    for (table, state, extra) in [
        ("records", "buffered", "NULL"),
        ("dead_letters", "dead_letter", "reason"),
    ] {
        let mut stmt = conn.prepare(&format!(
            "SELECT seq, id, stream, ts_us, received_us, size, payload, key_id, {extra}
             FROM {table} ORDER BY seq"
        ))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            match buffer::decode_row(row, keyring, &epoch) {
                Ok(r) => {
                    let reason: Option<String> = row.get(8).ok().flatten();
                    let payload = RawValue::from_string(r.payload.clone());
                    let line = serde_json::json!({
                        "state": state,
                        "seq": r.seq,
                        "id": r.id,
                        "stream": r.stream,
                        "ts": dcs_shared::record::format_ts(r.ts_us),
                        "received": dcs_shared::record::format_ts(r.received_us),
                        "payload": payload.ok(),
                        "reason": reason,
                    });
                    serde_json::to_writer(&mut *out, &line).map_err(|e| io(e.into()))?;
                    out.write_all(b"\n").map_err(io)?;
                    written += 1;
                }
                Err(reason) => {
                    let seq: i64 = row.get(0).unwrap_or_default();
                    writeln!(errors, "{table} seq {seq}: {reason}").map_err(io)?;
                    skipped += 1;
                }
            }
        }
    }
    Ok((written, skipped))
}

fn open_read_only(path: &Path) -> Result<Connection, BufferError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| BufferError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}
