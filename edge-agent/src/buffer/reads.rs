//! The read side: what the forwarder, the replay task and the local API read
//! from the buffer's own read-only connection, beside the writer (WAL
//! readers never block it).
//!
//! Invariants: [`Buffer::read_and_claim`] claims under the claims lock, so a
//! row it returns is never evicted; a batch read never spans two epochs; a
//! row that cannot be read back is moved to `dead_letters` (queue) or
//! skipped (retained), never returned and never allowed to stall the reads.

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::writer::Command;
use super::{Buffer, BufferError, Buffered, DeadLetterSummary, RecordState};
use crate::seal::{self, Keyring};

/// A buffered row that could not be read back: its seq and why.
type Unreadable = (i64, String);

impl Buffer {
    /// Runs a query on the read connection. Blocking: call from `spawn_blocking`.
    pub fn read_with<T>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, BufferError> {
        let conn = self.reader.lock().expect("reader lock");
        Ok(query(&conn)?)
    }

    /// Every checkpoint of `source`, by key. Blocking.
    pub fn checkpoints(
        &self,
        source: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, BufferError> {
        self.read_with(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT key, value FROM checkpoints WHERE source = ?1")?;
            stmt.query_map([source], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
    }

    /// Reads up to `max_records` / `max_bytes` of records after `after` in
    /// sequence order (at least one record when any exists) and claims them for
    /// forwarding. Blocking: call from `spawn_blocking`.
    pub fn read_and_claim(
        &self,
        after: i64,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Vec<Buffered>, BufferError> {
        // Held across the read: an eviction either committed before it (so
        // the read cannot see evicted rows) or waits until the claim is made.
        let mut claims = self.shared.claims.lock().expect("claims lock");
        let (batch, unreadable) = self.read_after(after, max_records, max_bytes)?;
        if let Some(last) = batch.last() {
            claims.claimed = claims.claimed.max(last.seq);
        }
        drop(claims);
        for (seq, reason) in unreadable {
            // Moved out of the way so the rows after it keep flowing; kept in
            // dead_letters (and counted) for an operator to look at.
            tracing::error!(message = "buffered record cannot be read back; moved to dead letters", seq, %reason);
            metrics::counter!("dcs_agent_buffer_unreadable_records_total").increment(1);
            let (reply, rx) = oneshot::channel();
            self.tx
                .blocking_send(Command::DeadLetter {
                    first: seq,
                    last: seq,
                    reason: format!("unreadable in the agent's buffer: {reason}"),
                    reply,
                })
                .map_err(|_| BufferError::Closed)?;
            rx.blocking_recv().map_err(|_| BufferError::Closed)??;
        }
        Ok(batch)
    }

    /// Forgets the forwarder's claims, e.g. after it restarted its cursor.
    pub fn reset_claims(&self) {
        self.shared.claims.lock().expect("claims lock").claimed = 0;
    }

    fn read_after(
        &self,
        after: i64,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<(Vec<Buffered>, Vec<Unreadable>), BufferError> {
        self.read_rows(
            "SELECT seq, id, stream, ts_us, received_us, size, payload, key_id FROM records
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            params![after, max_records as i64],
            max_bytes,
        )
    }

    /// Retained records (see [`crate::replay`]) delivered at or after
    /// `since_us`, after seq `after`, in seq order and within one epoch, as
    /// [`Buffer::read_and_claim`] reads the queue; claims nothing. A row
    /// that cannot be read back is skipped (it was delivered once already).
    /// Blocking.
    pub fn read_retained(
        &self,
        after: i64,
        since_us: i64,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Vec<Buffered>, BufferError> {
        let (batch, unreadable) = self.read_rows(
            "SELECT seq, id, stream, ts_us, received_us, size, payload, key_id FROM delivered
             WHERE seq > ?1 AND delivered_us >= ?3 ORDER BY seq LIMIT ?2",
            params![after, max_records as i64, since_us],
            max_bytes,
        )?;
        for (seq, reason) in unreadable {
            tracing::warn!(message = "a retained record cannot be read back; not replayed", seq, %reason);
        }
        Ok(batch)
    }

    /// The replay state in `meta` ([`crate::replay::State`]). Blocking.
    pub fn replay_state(&self) -> Result<crate::replay::State, BufferError> {
        self.read_with(crate::replay::State::load)
    }

    /// Rows of `sql` (the columns of `records`, in seq order) up to
    /// `max_bytes`, stopping where the first row's epoch ends.
    fn read_rows(
        &self,
        sql: &'static str,
        params: impl rusqlite::Params,
        max_bytes: u64,
    ) -> Result<(Vec<Buffered>, Vec<Unreadable>), BufferError> {
        let conn = self.reader.lock().expect("reader lock");
        let mut stmt = conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params)?;
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        let mut bytes = 0u64;
        let epochs = self.epochs();
        // A batch travels under one epoch: it ends where the next begins.
        let mut boundary = None;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let size = row.get::<_, i64>(5)?.max(0) as u64;
            if !out.is_empty() && bytes + size > max_bytes {
                break;
            }
            let end = *boundary.get_or_insert_with(|| epochs.boundary_after(seq));
            if end.is_some_and(|end| seq >= end) {
                break;
            }
            match decode_row(row, &self.keyring, &epochs.of(seq)) {
                Ok(record) => {
                    bytes += size;
                    out.push(record);
                }
                Err(reason) => unreadable.push((seq, reason)),
            }
        }
        Ok((out, unreadable))
    }

    /// Microseconds since the Unix epoch when the oldest buffered record arrived.
    pub fn oldest_received_us(&self) -> Result<Option<i64>, BufferError> {
        let conn = self.reader.lock().expect("reader lock");
        Ok(conn
            .query_row(
                "SELECT received_us FROM records ORDER BY seq LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Where the record with this producer id is: buffered, delivered or dead.
    pub fn lookup(&self, id: &str) -> Result<Option<(i64, RecordState)>, BufferError> {
        let conn = self.reader.lock().expect("reader lock");
        let Some(seq) = conn
            .query_row("SELECT seq FROM ids WHERE id = ?1", [id], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
        else {
            return Ok(None);
        };
        let in_table = |table: &str| -> Result<bool, rusqlite::Error> {
            conn.query_row(
                &format!("SELECT EXISTS(SELECT 1 FROM {table} WHERE seq = ?1)"),
                [seq],
                |r| r.get(0),
            )
        };
        let state = if in_table("records")? {
            RecordState::Buffered
        } else if in_table("dead_letters")? {
            RecordState::DeadLetter
        } else {
            RecordState::Delivered
        };
        Ok(Some((seq, state)))
    }

    pub fn dead_letter_summary(&self) -> Result<DeadLetterSummary, BufferError> {
        let conn = self.reader.lock().expect("reader lock");
        let records: i64 = conn.query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))?;
        let last: Option<(String, i64)> = conn
            .query_row(
                "SELECT reason, failed_us FROM dead_letters ORDER BY failed_us DESC, seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(DeadLetterSummary {
            records: records as u64,
            last_reason: last.as_ref().map(|(r, _)| r.clone()),
            last_failed_at: last.map(|(_, us)| dcs_shared::record::format_ts(us)),
        })
    }
}

/// Reads a `records` row selected as `seq, id, stream, ts_us, received_us,
/// size, payload, key_id`, opening a sealed payload. Any column that does not
/// read back as what was written (bad UTF-8, wrong type, failed
/// authentication) makes the row unreadable, with the reason.
pub(crate) fn decode_row(
    row: &rusqlite::Row<'_>,
    keyring: &Keyring,
    epoch: &Uuid,
) -> Result<Buffered, String> {
    let seq: i64 = row.get(0).map_err(|e| e.to_string())?;
    let text = |i: usize, name: &str| -> Result<String, String> {
        row.get::<_, String>(i)
            .map_err(|e| format!("column {name}: {e}"))
    };
    let int = |i: usize, name: &str| -> Result<i64, String> {
        row.get::<_, i64>(i)
            .map_err(|e| format!("column {name}: {e}"))
    };
    let key_id: Option<i64> = row.get(7).map_err(|e| format!("column key_id: {e}"))?;
    let payload = match key_id {
        None => text(6, "payload")?,
        Some(key_id) => {
            let sealed: Vec<u8> = row.get(6).map_err(|e| format!("column payload: {e}"))?;
            let plain = keyring
                .open(key_id, &sealed, &seal::aad(epoch, seq))
                .map_err(|e| e.to_string())?;
            String::from_utf8(plain).map_err(|_| "sealed payload is not UTF-8".to_owned())?
        }
    };
    Ok(Buffered {
        seq,
        id: text(1, "id")?,
        stream: text(2, "stream")?,
        ts_us: int(3, "ts_us")?,
        received_us: int(4, "received_us")?,
        size: int(5, "size")?.max(0) as u64,
        payload,
    })
}
