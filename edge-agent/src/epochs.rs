//! Epochs: the delivery-key space each buffered record travels in.
//!
//! A record's delivery key is `(agent, epoch, seq)`. A buffer file starts in
//! one random epoch and normally never leaves it. It moves to a new epoch when
//! the aggregator shows that the buffer went back in time: a VM snapshot
//! revert, a restore from backup, a power cut under `process-crash`
//! durability, or a lost write-ahead log all bring back an older `next_seq`
//! under the same epoch, and the seqs after it were already delivered with
//! other records. Continuing would reuse them.
//!
//! # Invariants
//! - The `epochs(first_seq, epoch)` table maps seq ranges to epochs: a seq
//!   belongs to the row with the greatest `first_seq` at or below it. A new
//!   epoch starts at the writer's `next_seq`, so records already buffered keep
//!   the key they were appended (and, with encryption, sealed) under, and
//!   only records appended afterwards use the new one.
//! - `meta.epoch` always names the current (last) epoch, for tools that read
//!   only `meta`.
//! - Records re-sent under their old key after a rollback are recognised by
//!   the aggregator as duplicates when it holds them already. A record whose
//!   key turns out to be taken by another record (409 `content_conflict`) is
//!   re-keyed: moved, in one transaction, to a fresh seq of the current
//!   epoch, with its producer id, content and `received` time unchanged. It
//!   is never dead-lettered: the producer was told it was safe.

use rusqlite::{OptionalExtension, Transaction, params};
use uuid::Uuid;

use crate::buffer::BufferError;
use crate::seal::{self, Keyring};

/// The buffer schema version of a file with more than one epoch.
const EPOCHS_SCHEMA_VERSION: i64 = 4;

/// `(first_seq, epoch)` in ascending `first_seq`; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epochs(Vec<(i64, Uuid)>);

impl Epochs {
    pub fn single(epoch: Uuid) -> Epochs {
        Epochs(vec![(0, epoch)])
    }

    /// The epoch new records are appended under.
    pub fn current(&self) -> Uuid {
        self.0.last().expect("never empty").1
    }

    /// The epoch of the record with this seq.
    pub fn of(&self, seq: i64) -> Uuid {
        let i = self.0.partition_point(|&(first, _)| first <= seq);
        self.0[i.saturating_sub(1)].1
    }

    /// The first seq of the epoch after `seq`'s, where a batch must end.
    pub fn boundary_after(&self, seq: i64) -> Option<i64> {
        let i = self.0.partition_point(|&(first, _)| first <= seq);
        self.0.get(i).map(|&(first, _)| first)
    }

    fn push(&mut self, first_seq: i64, epoch: Uuid) {
        self.0.push((first_seq, epoch));
    }
}

/// Creates the `epochs` table of a file that predates it, its one row being
/// the file's `meta.epoch`, and reads the map.
pub(crate) fn init(tx: &Transaction<'_>, meta_epoch: Uuid) -> rusqlite::Result<Epochs> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS epochs (
             first_seq INTEGER PRIMARY KEY, epoch TEXT NOT NULL,
             reason TEXT NOT NULL, created_us INTEGER NOT NULL)",
    )?;
    tx.execute(
        "INSERT INTO epochs (first_seq, epoch, reason, created_us)
         SELECT 0, ?1, 'created', ?2 WHERE NOT EXISTS (SELECT 1 FROM epochs)",
        params![meta_epoch.to_string(), now_us()],
    )?;
    Ok(read(tx, meta_epoch))
}

/// The map of a file: whatever of `epochs` can be read (a tool or a
/// damaged copy may find less), else `meta_epoch` for every seq.
pub(crate) fn read(conn: &rusqlite::Connection, meta_epoch: Uuid) -> Epochs {
    let rows = conn
        .prepare("SELECT first_seq, epoch FROM epochs ORDER BY first_seq")
        .and_then(|mut stmt| {
            stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .unwrap_or_default();
    let map: Vec<(i64, Uuid)> = rows
        .into_iter()
        .filter_map(|(first, e)| e.parse::<Uuid>().ok().map(|e| (first, e)))
        .collect();
    if map.is_empty() {
        Epochs::single(meta_epoch)
    } else {
        Epochs(map)
    }
}

/// Makes `epochs` the map of a file being filled (salvaged records keep the
/// epoch they were buffered under).
pub(crate) fn write(tx: &Transaction<'_>, epochs: &Epochs) -> rusqlite::Result<()> {
    tx.execute("DELETE FROM epochs", [])?;
    for &(first, epoch) in &epochs.0 {
        tx.execute(
            "INSERT INTO epochs (first_seq, epoch, reason, created_us) VALUES (?1, ?2, 'salvaged', ?3)",
            params![first, epoch.to_string(), now_us()],
        )?;
    }
    if epochs.0.len() > 1 {
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
            [EPOCHS_SCHEMA_VERSION.to_string()],
        )?;
    }
    Ok(())
}

/// Starts a new epoch at `next_seq` and returns it; `epochs` is the writer's
/// copy, restored by the caller if the transaction does not commit.
pub(crate) fn rotate(
    tx: &Transaction<'_>,
    epochs: &mut Epochs,
    next_seq: i64,
    reason: &str,
) -> rusqlite::Result<Uuid> {
    let epoch = Uuid::new_v4();
    tx.execute(
        "INSERT OR REPLACE INTO epochs (first_seq, epoch, reason, created_us) VALUES (?1, ?2, ?3, ?4)",
        params![next_seq, epoch.to_string(), reason, now_us()],
    )?;
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?1)",
        [epoch.to_string()],
    )?;
    // Agents that predate `epochs` would send every record under meta.epoch:
    // a file with two epochs is one they must refuse to open.
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
        [EPOCHS_SCHEMA_VERSION.to_string()],
    )?;
    // A rotation at the same next_seq as the last one (nothing appended in
    // between) replaces it: that epoch never keyed a record.
    if epochs.0.last().is_some_and(|&(first, _)| first == next_seq) {
        epochs.0.pop();
    }
    epochs.push(next_seq, epoch);
    Ok(epoch)
}

/// Moves each buffered record of `seqs` to a fresh seq of the current epoch
/// (re-sealing it when sealed, since the key is its associated data) and
/// returns how many moved. Seqs no longer buffered are skipped. Each move
/// leaves its old seq unused, which the caller counts in `rekeyed_total`, so
/// the counters still prove what `records` holds
/// ([`crate::recovery::expected_buffered`]).
pub(crate) fn rekey(
    tx: &Transaction<'_>,
    epochs: &Epochs,
    keyring: &Keyring,
    seqs: &[i64],
    next_seq: &mut i64,
) -> Result<u64, BufferError> {
    let current = epochs.current();
    let mut moved = 0;
    for &old in seqs {
        let row = tx
            .query_row(
                "SELECT id, stream, ts_us, received_us, size, CAST(payload AS BLOB), key_id
                 FROM records WHERE seq = ?1",
                [old],
                |r| {
                    Ok(Row {
                        id: r.get(0)?,
                        stream: r.get(1)?,
                        ts_us: r.get(2)?,
                        received_us: r.get(3)?,
                        size: r.get(4)?,
                        payload: r.get(5)?,
                        key_id: r.get(6)?,
                    })
                },
            )
            .optional()?;
        let Some(Row {
            id,
            stream,
            ts_us,
            received_us,
            size,
            payload,
            key_id,
        }) = row
        else {
            continue;
        };
        let new = *next_seq;
        let (payload, key_id) = match key_id {
            None => (rusqlite::types::Value::Text(text(payload)?), None),
            Some(key_id) => {
                let plain = keyring
                    .open(key_id, &payload, &seal::aad(&epochs.of(old), old))
                    .map_err(|e| BufferError::Sqlite(conversion(e.to_string())))?;
                let (key_id, sealed) =
                    keyring
                        .seal(&plain, &seal::aad(&current, new))
                        .ok_or_else(|| {
                            BufferError::Sqlite(conversion(
                                "a sealed record cannot be re-keyed: encryption is off".into(),
                            ))
                        })?;
                (rusqlite::types::Value::Blob(sealed), Some(key_id))
            }
        };
        tx.execute(
            "INSERT INTO records (seq, id, stream, ts_us, received_us, size, payload, key_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![new, id, stream, ts_us, received_us, size, payload, key_id],
        )?;
        tx.execute("UPDATE ids SET seq = ?1 WHERE seq = ?2", params![new, old])?;
        tx.execute("DELETE FROM records WHERE seq = ?1", [old])?;
        *next_seq += 1;
        moved += 1;
    }
    Ok(moved)
}

/// A `records` row as stored, payload still sealed when it is.
struct Row {
    id: String,
    stream: String,
    ts_us: i64,
    received_us: i64,
    size: i64,
    payload: Vec<u8>,
    key_id: Option<i64>,
}

fn text(bytes: Vec<u8>) -> Result<String, BufferError> {
    String::from_utf8(bytes)
        .map_err(|_| BufferError::Sqlite(conversion("payload is not UTF-8".into())))
}

fn conversion(message: String) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(message.into())
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use dcs_shared::record::Record;

    use super::*;
    use crate::buffer::{Buffer, BufferOptions, Durability, Overflow, RecordState};

    fn opts(dir: &Path, keyring: Keyring) -> BufferOptions {
        BufferOptions {
            path: dir.join("buffer.db"),
            capacity_bytes: 1 << 30,
            overflow: Overflow::Reject,
            durability: Durability::ProcessCrash,
            dedup_window: 1_000_000,
            min_free_disk: 0,
            quarantine_dir: dir.join("quarantine"),
            keyring,
            retain_delivered: std::time::Duration::ZERO,
        }
    }

    fn records(ids: &[&str]) -> Vec<Record> {
        ids.iter()
            .map(|id| Record {
                id: Some((*id).to_owned()),
                stream: "s".into(),
                ts_us: Some(7),
                payload: format!(r#"{{"id":"{id}"}}"#),
            })
            .collect()
    }

    /// Every buffered record, batch after batch as the forwarder reads them.
    fn read_all(buffer: &Buffer) -> Vec<(i64, Uuid, String, String)> {
        let epochs = buffer.epochs();
        let mut out: Vec<(i64, Uuid, String, String)> = Vec::new();
        loop {
            let after = out.last().map_or(0, |r| r.0);
            let batch = buffer.read_and_claim(after, 1000, u64::MAX).unwrap();
            if batch.is_empty() {
                return out;
            }
            out.extend(
                batch
                    .into_iter()
                    .map(|r| (r.seq, epochs.of(r.seq), r.id, r.payload)),
            );
        }
    }

    #[tokio::test]
    async fn records_keep_the_epoch_they_were_appended_under_across_a_rotation_and_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer::open(opts(dir.path(), Keyring::disabled())).unwrap();
        let old = buffer.epoch();
        buffer.append(records(&["a", "b"])).await.unwrap();
        let new = buffer.rotate_epoch(old, "test").await.unwrap();
        assert_ne!(new, old);
        // A second rotation from the old epoch (a concurrent batch) is a no-op.
        assert_eq!(buffer.rotate_epoch(old, "test").await.unwrap(), new);
        buffer.append(records(&["c"])).await.unwrap();
        let seen = |rows: Vec<(i64, Uuid, String, String)>| -> Vec<(i64, Uuid)> {
            rows.into_iter().map(|(seq, e, _, _)| (seq, e)).collect()
        };
        assert_eq!(seen(read_all(&buffer)), vec![(1, old), (2, old), (3, new)]);
        buffer.close().await;

        let buffer = Buffer::open(opts(dir.path(), Keyring::disabled())).unwrap();
        assert_eq!(buffer.epoch(), new);
        assert_eq!(seen(read_all(&buffer)), vec![(1, old), (2, old), (3, new)]);
    }

    #[tokio::test]
    async fn a_batch_never_spans_two_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer::open(opts(dir.path(), Keyring::disabled())).unwrap();
        buffer.append(records(&["a", "b"])).await.unwrap();
        buffer.rotate_epoch(buffer.epoch(), "test").await.unwrap();
        buffer.append(records(&["c", "d"])).await.unwrap();
        let first = buffer.read_and_claim(0, 1000, u64::MAX).unwrap();
        assert_eq!(first.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        let second = buffer.read_and_claim(2, 1000, u64::MAX).unwrap();
        assert_eq!(second.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4]);
    }

    #[tokio::test]
    async fn a_rekeyed_record_moves_to_a_fresh_seq_of_the_current_epoch_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let key = [7u8; 32];
        let buffer = Buffer::open(opts(dir.path(), Keyring::from_keys(Some(key), &[]))).unwrap();
        let old = buffer.epoch();
        buffer.append(records(&["a", "b", "c"])).await.unwrap();
        let new = buffer.rotate_epoch(old, "test").await.unwrap();
        assert_eq!(
            buffer.rekey(vec![2, 99]).await.unwrap(),
            1,
            "seq 99 is not buffered"
        );
        let rows = read_all(&buffer);
        assert_eq!(
            rows.iter()
                .map(|(seq, e, id, _)| (*seq, *e, id.as_str()))
                .collect::<Vec<_>>(),
            vec![(1, old, "a"), (3, old, "c"), (4, new, "b")]
        );
        // Sealed again under its new key, so it still opens.
        assert_eq!(rows[2].3, r#"{"id":"b"}"#);
        // The producer id follows the record, and is still known once.
        assert_eq!(
            buffer.lookup("b").unwrap(),
            Some((4, RecordState::Buffered))
        );
        let again = buffer.append(records(&["b"])).await.unwrap();
        assert_eq!(again.new, [false]);
        assert_eq!(buffer.stats().rekeyed_total, 1);
        assert_eq!(buffer.stats().records, 3);
        buffer.close().await;
        // The counters still prove how many records the file holds.
        let conn = rusqlite::Connection::open(dir.path().join("buffer.db")).unwrap();
        assert_eq!(crate::recovery::expected_buffered(&conn), Some(3));
        drop(conn);
        let buffer = Buffer::open(opts(dir.path(), Keyring::from_keys(Some(key), &[]))).unwrap();
        assert_eq!(buffer.stats().rekeyed_total, 1);
        assert_eq!(buffer.next_seq(), 5);
    }

    #[test]
    fn a_seq_belongs_to_the_last_epoch_that_starts_at_or_below_it() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let epochs = Epochs(vec![(0, a), (100, b), (250, c)]);
        assert_eq!(epochs.of(1), a);
        assert_eq!(epochs.of(99), a);
        assert_eq!(epochs.of(100), b);
        assert_eq!(epochs.of(249), b);
        assert_eq!(epochs.of(250), c);
        assert_eq!(epochs.of(i64::MAX), c);
        assert_eq!(epochs.current(), c);
        assert_eq!(epochs.boundary_after(5), Some(100));
        assert_eq!(epochs.boundary_after(100), Some(250));
        assert_eq!(epochs.boundary_after(300), None);
    }
}
