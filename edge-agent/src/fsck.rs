//! `dcs-edge buffer check|stats|salvage|export`: the buffer's offline fsck.
//!
//! No command changes a file it reads or creates one beside it (no `-wal`,
//! `-shm` or journal): see [`recovery::Snapshot`] for how each case is
//! opened; `salvage` writes only into its output directory. So they are safe
//! on a file an operator wants to keep as evidence, and `check`, `stats` and
//! `export` are safe beside a running agent (SQLite readers do not block its
//! writer). On a damaged file `stats` and `export` read every row SQLite can
//! still read, as salvage does ([`recovery::scan`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use rusqlite::OptionalExtension;
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
    /// Buffered records the file's own counters say it holds (see
    /// `recovery::expected_buffered`); `None` when they cannot be read.
    pub held: Option<u64>,
    /// Of those, how many cannot be read: `held - buffered.records`.
    pub unreadable: Option<u64>,
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
    let damage = check(path);
    let integrity = damage.clone().unwrap_or_else(|| "ok".into());
    let snapshot = recovery::Snapshot::open(path, damage.is_some())?;
    let conn = &snapshot.conn;
    let meta = |key: &str| -> Option<String> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .ok()
            .flatten()
    };
    // Row by row, as salvage reads: on a damaged file an aggregate query
    // fails (or stops) at the first bad page, while most rows are readable.
    let mut streams: BTreeMap<String, StreamCounts> = BTreeMap::new();
    let mut key_ids = std::collections::BTreeSet::new();
    let mut count = |table: &str, dead: bool| -> Result<Counts, BufferError> {
        let mut c = Counts::default();
        let (mut oldest, mut newest) = (None::<i64>, None::<i64>);
        recovery::scan(
            conn,
            &format!("SELECT seq, size, received_us, stream, key_id FROM {table}"),
            &mut |row| {
                let seq: i64 = row.get(0)?;
                c.records += 1;
                c.bytes += row.get::<_, i64>(1)?.max(0) as u64;
                let received: i64 = row.get(2)?;
                oldest = Some(oldest.map_or(received, |o| o.min(received)));
                newest = Some(newest.map_or(received, |n| n.max(received)));
                c.first_seq = Some(c.first_seq.map_or(seq, |f| f.min(seq)));
                c.last_seq = Some(c.last_seq.map_or(seq, |l| l.max(seq)));
                let entry = streams.entry(row.get(3)?).or_default();
                if dead {
                    entry.dead_letters += 1;
                } else {
                    entry.buffered += 1;
                }
                if let Some(key_id) = row.get::<_, Option<i64>>(4)? {
                    key_ids.insert(key_id);
                }
                Ok(())
            },
        )?;
        c.oldest_received = oldest.map(dcs_shared::record::format_ts);
        c.newest_received = newest.map(dcs_shared::record::format_ts);
        Ok(c)
    };
    let buffered = count("records", false)?;
    let dead_letters = count("dead_letters", true)?;
    let held = recovery::expected_buffered(conn);
    Ok(Stats {
        path: path.display().to_string(),
        integrity,
        epoch: meta("epoch"),
        schema_version: meta("schema_version"),
        next_seq: meta("next_seq"),
        closed_cleanly: meta("clean_close").map(|v| v == "1"),
        held,
        unreadable: held.map(|h| h.saturating_sub(buffered.records)),
        buffered,
        dead_letters,
        delivered_total: meta("delivered_total"),
        dropped_total: meta("dropped_total"),
        dead_letter_total: meta("dead_letter_total"),
        streams,
        key_ids: key_ids
            .into_iter()
            .map(crate::seal::format_key_id)
            .collect(),
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
/// Rows that cannot be decoded are reported on `errors` and skipped; rows
/// lost with a damaged page are counted in [`Exported::unreadable`].
pub fn export(
    path: &Path,
    keyring: &Keyring,
    out: &mut dyn Write,
    errors: &mut dyn Write,
) -> Result<Exported, BufferError> {
    let damaged = check(path).is_some();
    let snapshot = recovery::Snapshot::open(path, damaged)?;
    let conn = &snapshot.conn;
    // Only sealed payloads need the epoch (it is in their authenticated
    // data); without it they are reported as unreadable, the rest exported.
    let epoch: uuid::Uuid = conn
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
            r.get::<_, String>(0)
        })
        .ok()
        .and_then(|e| e.parse().ok())
        .unwrap_or_default();
    let (mut written, mut skipped, mut buffered) = (0u64, 0u64, 0u64);
    // The first write error (a closed pipe, a full disk) ends the export.
    let mut failed: Option<std::io::Error> = None;
    for (table, state, extra) in [
        ("records", "buffered", "NULL"),
        ("dead_letters", "dead_letter", "reason"),
    ] {
        let select = format!(
            "SELECT seq, id, stream, ts_us, received_us, size, payload, key_id, {extra} FROM {table}"
        );
        recovery::scan(conn, &select, &mut |row| {
            if failed.is_some() {
                return Ok(());
            }
            let written_row = match buffer::decode_row(row, keyring, &epoch) {
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
                    written += 1;
                    buffered += u64::from(state == "buffered");
                    serde_json::to_writer(&mut *out, &line)
                        .map_err(std::io::Error::from)
                        .and_then(|()| out.write_all(b"\n"))
                }
                Err(reason) => {
                    let seq: i64 = row.get(0).unwrap_or_default();
                    skipped += 1;
                    writeln!(errors, "{table} seq {seq}: {reason}")
                }
            };
            if let Err(e) = written_row {
                failed = Some(e);
            }
            Ok(())
        })?;
    }
    if let Some(e) = failed {
        return Err(BufferError::Sqlite(
            rusqlite::Error::ToSqlConversionFailure(e.into()),
        ));
    }
    Ok(Exported {
        written,
        skipped,
        unreadable: recovery::expected_buffered(conn).map(|held| held.saturating_sub(buffered)),
    })
}

/// What [`export`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    /// Records written (buffered and dead letters).
    pub written: u64,
    /// Rows found but not decodable (reported on the error stream).
    pub skipped: u64,
    /// Buffered records the file's counters say it holds that were not
    /// written (damaged pages and undecodable rows); `None` when the
    /// counters cannot be read.
    pub unreadable: Option<u64>,
}
