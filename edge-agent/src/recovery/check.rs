//! Whether a buffer file can be used as it is: SQLite's `quick_check`
//! within a time budget, then the buffer's own invariants (epoch present,
//! counters non-negative, every seq below `next_seq`, a WAL present after an
//! unclean stop).
//!
//! Invariants: the start-up check writes nothing to the file or its WAL, so
//! a damaged file reaches the quarantine as it was found; a check that runs
//! out of time is logged, never taken for damage.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use uuid::Uuid;

use super::{Snapshot, wal_of};

/// Why the file cannot be used as it is; `None` when it is healthy or absent.
/// Writes nothing to the file or its WAL (see [`open_found`]); the agent
/// calls it at start-up, before anything opens the buffer read-write, so a
/// damaged file can be quarantined as it was found.
pub fn diagnose(path: &Path, budget: Duration) -> Option<String> {
    if !path.exists() {
        return None;
    }
    match open_found(path) {
        Ok(conn) => diagnose_conn(path, &conn, budget),
        Err(error) => Some(format!("cannot open: {error}")),
    }
}

/// [`diagnose`] for `dcs-edge buffer check`: changes no file at all, the
/// shared-memory index included (see [`Snapshot`]).
pub fn diagnose_read_only(path: &Path, budget: Duration) -> Option<String> {
    if !path.exists() {
        return None;
    }
    match Snapshot::open(path, false) {
        Ok(snapshot) => diagnose_conn(path, &snapshot.conn, budget),
        Err(error) => Some(format!("cannot open: {error}")),
    }
}

/// Opens the buffer at start-up for reading without writing to it or its WAL.
///
/// - No WAL: `immutable=1`. SQLite then creates no `-wal`, `-shm` or journal
///   file; a read-only open would create an empty WAL, which makes a lost WAL
///   look like a clean stop to the next check.
/// - A WAL: read-only. SQLite reads the WAL (it holds the commits since the
///   last checkpoint, which `immutable` would ignore) and never writes the
///   file or the WAL, but it does rebuild its shared-memory index in `-shm`;
///   [`prepare`] keeps the `-shm` as found before this runs.
fn open_found(path: &Path) -> rusqlite::Result<Connection> {
    let conn = if wal_of(path).exists() {
        Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?
    } else {
        open_immutable(path)?
    };
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// `file:PATH?immutable=1`: read-only, no locks, no side files.
pub(super) fn open_immutable(path: &Path) -> rusqlite::Result<Connection> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut uri = String::from("file:");
    for b in absolute.to_string_lossy().bytes() {
        match b {
            b'?' | b'#' | b'%' => uri.push_str(&format!("%{b:02X}")),
            _ => uri.push(b as char),
        }
    }
    uri.push_str("?immutable=1");
    Connection::open_with_flags(
        &uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

pub(super) fn diagnose_conn(path: &Path, conn: &Connection, budget: Duration) -> Option<String> {
    let wal_present = wal_of(path).exists();
    // Interrupted from a timer thread once the budget is spent.
    let interrupt = conn.get_interrupt_handle();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let timer = std::thread::spawn(move || {
        if finished.recv_timeout(budget).is_err() {
            interrupt.interrupt();
        }
    });
    let checked: rusqlite::Result<Vec<String>> = conn
        .prepare("PRAGMA quick_check(5)")
        .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect());
    let _ = done.send(());
    let _ = timer.join();
    match checked {
        Ok(rows) if rows == ["ok"] => {}
        Ok(rows) => return Some(format!("integrity check failed: {}", rows.join("; "))),
        Err(error)
            if error.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted) =>
        {
            tracing::warn!(
                message = "buffer integrity check did not finish in time; going on without it",
                path = %path.display(),
                budget_secs = budget.as_secs()
            );
        }
        Err(error) => return Some(format!("integrity check failed: {error}")),
    }
    invariants(conn, wal_present).err()
}

/// Our own invariants (see the module doc of [`crate::recovery`]).
fn invariants(conn: &Connection, wal_present: bool) -> Result<(), String> {
    let fail = |e: rusqlite::Error| format!("cannot read the buffer's own tables: {e}");
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'
             AND name IN ('meta', 'records', 'ids', 'dead_letters')",
            [],
            |r| r.get(0),
        )
        .map_err(fail)?;
    if tables == 0 {
        return Ok(()); // created but never initialised: nothing to lose
    }
    if tables < 4 {
        return Err(format!(
            "{} of the buffer's 4 tables are missing",
            4 - tables
        ));
    }
    let meta = |key: &str| -> Result<Option<String>, String> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(fail)
    };
    if meta("epoch")?
        .and_then(|e| e.parse::<Uuid>().ok())
        .is_none()
    {
        return Err("the buffer's epoch is missing or unreadable".into());
    }
    for key in [
        "next_seq",
        "dropped_total",
        "dead_letter_total",
        "delivered_total",
    ] {
        if let Some(value) = meta(key)?
            && !value.parse::<i64>().is_ok_and(|n| n >= 0)
        {
            return Err(format!("counter {key} holds {value:?}"));
        }
    }
    if let Some(next) = meta("next_seq")?.and_then(|v| v.parse::<i64>().ok()) {
        let max_seq: i64 = conn
            .query_row(
                "SELECT max(coalesce((SELECT max(seq) FROM records), 0),
                            coalesce((SELECT max(seq) FROM ids), 0),
                            coalesce((SELECT max(seq) FROM dead_letters), 0))",
                [],
                |r| r.get(0),
            )
            .map_err(fail)?;
        if max_seq >= next {
            return Err(format!(
                "sequence {max_seq} is stored but next_seq is {next}"
            ));
        }
    }
    if meta("clean_close")?.as_deref() == Some("0") && !wal_present {
        return Err("the write-ahead log is missing after an unclean stop: \
                    commits since the last checkpoint are lost"
            .into());
    }
    Ok(())
}

/// How many records `records` must hold, from the buffer's own counters,
/// which the writer commits with every change: each sequence number below
/// `next_seq` was handed to a record acknowledged to its producer, and left
/// `records` only counted as delivered, dropped or dead-lettered (source
/// records refused at validation get a sequence number and go straight to
/// `dead_letters`, counted too). `seq_gaps` counts numbers never stored
/// (a recovered buffer's holes), and `rekeyed_total` the numbers a record
/// left when it was moved to a new epoch under a fresh one
/// ([`crate::epochs::rekey`]). `None` when the counters cannot be read.
pub fn expected_buffered(conn: &Connection) -> Option<u64> {
    let meta = |key: &str| -> Option<Option<i64>> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            r.get::<_, String>(0)
        })
        .optional()
        .ok()
        .map(|v| v.and_then(|v| v.parse().ok()))
    };
    let handed_out = meta("next_seq")??.checked_sub(1)?;
    let mut gone = 0i64;
    for key in [
        "delivered_total",
        "dropped_total",
        "dead_letter_total",
        "seq_gaps",
        "rekeyed_total",
    ] {
        gone = gone.checked_add(meta(key)?.unwrap_or(0))?;
    }
    Some(handed_out.saturating_sub(gone).max(0) as u64)
}
