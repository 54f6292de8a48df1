//! What leaves the buffer without an ack, all inside the writer's
//! transaction: drop-oldest eviction, retained records aged out or yielding
//! to undelivered ones, and producer ids past the dedup window.
//!
//! Invariants: eviction takes only records above the forwarder's claim and
//! counts each in `dropped_total`; retained records never cost an
//! undelivered one its room; an id is forgotten only once its record left
//! both `records` and `dead_letters`.

use std::time::Duration;

use rusqlite::params;

use super::writer::Delta;
use super::{BufferError, BufferOptions, Shared, now_us};

/// Evicts the oldest records above `claimed` until `want` bytes are free;
/// returns the bytes freed. The caller holds the claims lock until commit.
pub(super) fn evict_oldest(
    tx: &rusqlite::Transaction<'_>,
    claimed: i64,
    want: u64,
    delta: &mut Delta,
) -> Result<u64, BufferError> {
    let mut stmt =
        tx.prepare_cached("SELECT seq, size FROM records WHERE seq > ?1 ORDER BY seq LIMIT 1000")?;
    let mut freed = 0u64;
    let mut cut = claimed;
    'outer: while freed < want {
        let rows: Vec<(i64, i64)> = stmt
            .query_map([cut], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        if rows.is_empty() {
            break;
        }
        for (seq, size) in rows {
            cut = seq;
            freed += size as u64;
            if freed >= want {
                break 'outer;
            }
        }
    }
    if cut == claimed {
        return Ok(0);
    }
    // Dropped records are forgotten entirely: a producer may send them again.
    tx.execute(
        "DELETE FROM ids WHERE seq IN (SELECT seq FROM records WHERE seq > ?1 AND seq <= ?2)",
        params![claimed, cut],
    )?;
    let deleted = tx.execute(
        "DELETE FROM records WHERE seq > ?1 AND seq <= ?2",
        params![claimed, cut],
    )? as u64;
    delta.records -= deleted as i64;
    delta.bytes -= freed as i64;
    delta.dropped += deleted;
    tracing::warn!(
        message = "buffer full: evicted oldest records",
        dropped = deleted,
        up_to_seq = cut
    );
    Ok(freed)
}

/// Ages retained records out (at most once a second) and trims them
/// whenever queue and retained records together exceed the capacity:
/// retained records always yield to undelivered ones. Turning retention
/// off drops what is retained at the next commit.
pub(super) fn prune_retained(
    tx: &rusqlite::Transaction<'_>,
    shared: &Shared,
    opts: &BufferOptions,
    last_prune: &mut std::time::Instant,
    delta: &mut Delta,
) -> Result<(), BufferError> {
    let (queued, retained) = {
        let s = shared.stats.lock().expect("stats lock");
        (
            (s.bytes as i64 + delta.bytes).max(0) as u64,
            (s.retained_bytes as i64 + delta.retained_bytes).max(0) as u64,
        )
    };
    if retained == 0 {
        return Ok(());
    }
    let keep = opts.capacity_bytes.saturating_sub(queued);
    let due = opts.retain_delivered.is_zero() || last_prune.elapsed() >= Duration::from_secs(1);
    if !due && retained <= keep {
        return Ok(());
    }
    *last_prune = std::time::Instant::now();
    let older_than = now_us().saturating_sub(opts.retain_delivered.as_micros() as i64);
    let (n, bytes) = crate::replay::prune(tx, older_than, retained, keep)?;
    delta.retained -= n as i64;
    delta.retained_bytes -= bytes as i64;
    Ok(())
}

/// Forgets producer ids older than the dedup window, but never one whose record
/// is still buffered or dead-lettered.
pub(super) fn prune_ids(tx: &rusqlite::Transaction<'_>, below: i64) -> rusqlite::Result<()> {
    let oldest_kept: i64 = tx.query_row(
        "SELECT min(?1, coalesce((SELECT min(seq) FROM records), ?1),
                        coalesce((SELECT min(seq) FROM dead_letters), ?1))",
        [below],
        |r| r.get(0),
    )?;
    tx.execute("DELETE FROM ids WHERE seq < ?1", [oldest_kept])?;
    Ok(())
}
