//! Storing new records inside the writer's transaction: producer-id
//! deduplication, the capacity and free-disk checks, drop-oldest room-making,
//! sealing, and what a pull source adds beside its records (rejects and
//! checkpoints).
//!
//! Invariants: a request is stored whole or not at all (each runs under a
//! savepoint of the group); a retried id is never stored twice and never
//! refused for room it already has; a source's checkpoint moves only with
//! the records and rejects read up to it.

use std::path::Path;

use rusqlite::{OptionalExtension, params};
use uuid::Uuid;

use dcs_shared::record::Record;

use super::eviction::evict_oldest;
use super::writer::Delta;
use super::{
    Appended, BufferError, BufferOptions, Claims, Overflow, Shared, SourceBatch, classify, now_us,
};
use crate::seal;

/// Bytes a record costs beyond its fields (row header, index entry); counted so
/// the capacity limit tracks disk use more closely than payload bytes alone.
const RECORD_OVERHEAD_BYTES: u64 = 48;

/// Free bytes available to us on the filesystem holding `path`; `None` when
/// unknown (then only SQLite's own full-disk error stops appends).
fn free_disk(path: &Path) -> Option<u64> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

fn record_size(r: &Record, id_len: usize) -> u64 {
    (r.payload.len() + r.stream.len() + id_len) as u64 + RECORD_OVERHEAD_BYTES
}

/// Appends one request's records inside the group transaction, under a
/// savepoint: a request is written whole or not at all, whatever else the
/// group holds.
#[allow(clippy::too_many_arguments)]
pub(super) fn append(
    tx: &rusqlite::Transaction<'_>,
    epoch: &Uuid,
    opts: &BufferOptions,
    shared: &Shared,
    claims: Option<&mut Claims>,
    next_seq: &mut i64,
    delta: &mut Delta,
    records: Vec<Record>,
) -> Result<Appended, BufferError> {
    tx.execute_batch("SAVEPOINT append").map_err(classify)?;
    let start_seq = *next_seq;
    let mut local = Delta::default();
    match append_inner(
        tx, epoch, opts, shared, claims, next_seq, &mut local, delta, records,
    ) {
        Ok(out) => {
            tx.execute_batch("RELEASE append").map_err(classify)?;
            delta.merge(&local);
            Ok(out)
        }
        Err(e) => {
            *next_seq = start_seq;
            let _ = tx.execute_batch("ROLLBACK TO append; RELEASE append");
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn append_inner(
    tx: &rusqlite::Transaction<'_>,
    epoch: &Uuid,
    opts: &BufferOptions,
    shared: &Shared,
    claims: Option<&mut Claims>,
    next_seq: &mut i64,
    local: &mut Delta,
    group: &Delta,
    records: Vec<Record>,
) -> Result<Appended, BufferError> {
    // First find which records are new: a retried request whose records are
    // already buffered must not be refused for lack of room they already have.
    let mut find_id = tx.prepare_cached("SELECT seq FROM ids WHERE id = ?1")?;
    let mut known: Vec<Option<i64>> = Vec::with_capacity(records.len());
    let mut first_in_request: std::collections::HashMap<String, usize> = Default::default();
    let mut same_as: Vec<Option<usize>> = Vec::with_capacity(records.len());
    let mut ids = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        match &r.id {
            Some(id) => {
                known.push(
                    find_id
                        .query_row([id], |row| row.get::<_, i64>(0))
                        .optional()?,
                );
                same_as.push(first_in_request.get(id).copied());
                first_in_request.entry(id.clone()).or_insert(i);
                ids.push(id.clone());
            }
            None => {
                // Agent-assigned ids are UUIDv7: unique and time-ordered.
                known.push(None);
                same_as.push(None);
                ids.push(Uuid::now_v7().to_string());
            }
        }
    }
    let is_new = |i: usize| known[i].is_none() && same_as[i].is_none();
    let needed: u64 = records
        .iter()
        .enumerate()
        .filter(|(i, _)| is_new(*i))
        .map(|(i, r)| record_size(r, ids[i].len()))
        .sum();
    if needed > 0
        && let Some(free) = free_disk(&opts.path)
        && free < opts.min_free_disk + needed
    {
        // Pages freed by delivered records are reused before the file grows,
        // so they count as free: a drained buffer accepts records again.
        let reusable: i64 = tx.query_row(
            "SELECT freelist_count * page_size FROM pragma_freelist_count(), pragma_page_size()",
            [],
            |r| r.get(0),
        )?;
        if free + (reusable.max(0) as u64) < opts.min_free_disk + needed {
            return Err(BufferError::DiskFull);
        }
    }
    let used = {
        let s = shared.stats.lock().expect("stats lock");
        (s.bytes as i64 + group.bytes).max(0) as u64
    };
    if needed > 0 && used + needed > opts.capacity_bytes {
        let full = BufferError::Full {
            used,
            capacity: opts.capacity_bytes,
            needed,
        };
        match opts.overflow {
            Overflow::Reject => return Err(full),
            Overflow::DropOldest => {
                if needed > opts.capacity_bytes {
                    return Err(full);
                }
                let claimed = claims.map_or(i64::MAX, |c| c.claimed);
                let freed = evict_oldest(tx, claimed, used + needed - opts.capacity_bytes, local)?;
                if used - freed + needed > opts.capacity_bytes {
                    return Err(full);
                }
            }
        }
    }

    let mut insert_id = tx.prepare_cached("INSERT INTO ids (seq, id) VALUES (?1, ?2)")?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO records (seq, id, stream, ts_us, received_us, size, payload, key_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let received_us = now_us();
    let mut seqs = Vec::with_capacity(records.len());
    let mut new = Vec::with_capacity(records.len());
    for (i, r) in records.into_iter().enumerate() {
        if let Some(seq) = known[i] {
            seqs.push(seq);
            new.push(false);
            continue;
        }
        if let Some(first) = same_as[i] {
            seqs.push(seqs[first]);
            new.push(false);
            continue;
        }
        let seq = *next_seq;
        *next_seq += 1;
        let size = record_size(&r, ids[i].len());
        // Assigned ids are indexed too, so GET /v1/records/{id} finds them.
        insert_id.execute(params![seq, ids[i]]).map_err(classify)?;
        let (payload, key_id): (rusqlite::types::Value, Option<i64>) = match opts
            .keyring
            .seal(r.payload.as_bytes(), &seal::aad(epoch, seq))
        {
            Some((key_id, sealed)) => (sealed.into(), Some(key_id)),
            None => (r.payload.into(), None),
        };
        insert
            .execute(params![
                seq,
                ids[i],
                r.stream,
                r.ts_us.unwrap_or(received_us),
                received_us,
                size as i64,
                payload,
                key_id
            ])
            .map_err(classify)?;
        local.records += 1;
        local.bytes += size as i64;
        local.appended = true;
        seqs.push(seq);
        new.push(true);
    }
    Ok(Appended { ids, seqs, new })
}

/// The records of a [`SourceBatch`] go through [`append`] (capacity, overflow
/// and sealing exactly as for pushed records); its rejected items and
/// checkpoints are written under an outer savepoint, so a full buffer keeps
/// the checkpoint where it was and the source reads the same items again.
#[allow(clippy::too_many_arguments)]
pub(super) fn append_from_source(
    tx: &rusqlite::Transaction<'_>,
    epoch: &Uuid,
    opts: &BufferOptions,
    shared: &Shared,
    claims: Option<&mut Claims>,
    next_seq: &mut i64,
    delta: &mut Delta,
    batch: SourceBatch,
) -> Result<Appended, BufferError> {
    tx.execute_batch("SAVEPOINT source").map_err(classify)?;
    let start_seq = *next_seq;
    let before = delta.clone();
    let outcome = (|| -> Result<Appended, BufferError> {
        let appended = if batch.records.is_empty() {
            Appended {
                ids: Vec::new(),
                seqs: Vec::new(),
                new: Vec::new(),
            }
        } else {
            append(
                tx,
                epoch,
                opts,
                shared,
                claims,
                next_seq,
                delta,
                batch.records,
            )?
        };
        let now = now_us();
        let mut dead = tx.prepare_cached(
            "INSERT INTO dead_letters
                 (seq, id, stream, ts_us, received_us, size, payload, reason, failed_us, key_id)
             VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6, ?7, ?4, ?8)",
        )?;
        for r in batch.rejected {
            let seq = *next_seq;
            *next_seq += 1;
            let id = format!("source:{}:{}", batch.source, r.position);
            let text = serde_json::Value::String(r.raw).to_string();
            let size = (text.len() + batch.stream.len() + id.len()) as u64 + RECORD_OVERHEAD_BYTES;
            let (payload, key_id): (rusqlite::types::Value, Option<i64>) =
                match opts.keyring.seal(text.as_bytes(), &seal::aad(epoch, seq)) {
                    Some((key_id, sealed)) => (sealed.into(), Some(key_id)),
                    None => (text.into(), None),
                };
            dead.execute(params![
                seq,
                id,
                batch.stream,
                now,
                size as i64,
                payload,
                r.reason,
                key_id
            ])
            .map_err(classify)?;
            delta.dead += 1;
        }
        let mut put = tx.prepare_cached(
            "INSERT OR REPLACE INTO checkpoints (source, key, value, updated_us)
             VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut forget =
            tx.prepare_cached("DELETE FROM checkpoints WHERE source = ?1 AND key = ?2")?;
        for (key, value) in batch.checkpoints {
            match value {
                Some(value) => put.execute(params![batch.source, key, value, now]),
                None => forget.execute(params![batch.source, key]),
            }
            .map_err(classify)?;
        }
        Ok(appended)
    })();
    match outcome {
        Ok(out) => {
            tx.execute_batch("RELEASE source").map_err(classify)?;
            Ok(out)
        }
        Err(e) => {
            *next_seq = start_seq;
            *delta = before;
            let _ = tx.execute_batch("ROLLBACK TO source; RELEASE source");
            Err(e)
        }
    }
}
