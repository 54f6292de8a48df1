//! Unit tests of the buffer through its public handle: sequence order,
//! producer-id deduplication, acks, retention, overflow, dead letters,
//! restarts, pull-source checkpoints and the upgrade of an older file.

use std::path::Path;
use std::time::Duration;

use dcs_shared::record::Record;

use super::*;
use crate::seal::Keyring;

fn opts(dir: &Path, capacity: u64, overflow: Overflow) -> BufferOptions {
    BufferOptions {
        path: dir.join("buffer.db"),
        capacity_bytes: capacity,
        overflow,
        durability: Durability::ProcessCrash,
        dedup_window: 1_000_000,
        min_free_disk: 0,
        quarantine_dir: dir.join("quarantine"),
        keyring: Keyring::disabled(),
        retain_delivered: std::time::Duration::ZERO,
    }
}

fn rec(id: Option<&str>, payload: &str) -> Record {
    Record {
        id: id.map(str::to_owned),
        stream: "s".into(),
        ts_us: Some(1),
        payload: payload.into(),
    }
}

fn many(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| rec(None, &format!("{{\"i\":{i}}}")))
        .collect()
}

#[tokio::test]
async fn appended_records_get_increasing_seqs_and_are_read_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buffer::open(opts(dir.path(), 1 << 30, Overflow::Reject)).unwrap();
    let a = b.append(many(3)).await.unwrap();
    assert_eq!(a.seqs, [1, 2, 3]);
    let read = b.read_and_claim(0, 10, u64::MAX).unwrap();
    assert_eq!(read.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(read[2].payload, r#"{"i":2}"#);
    assert_eq!(b.read_and_claim(1, 1, u64::MAX).unwrap()[0].seq, 2);
    assert_eq!(b.stats().records, 3);
}

#[tokio::test]
async fn a_producer_id_is_buffered_once_even_after_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buffer::open(opts(dir.path(), 1 << 30, Overflow::Reject)).unwrap();
    let first = b.append(vec![rec(Some("k1"), "{}")]).await.unwrap();
    assert_eq!(first.new, [true]);
    let again = b
        .append(vec![rec(Some("k1"), "{}"), rec(Some("k2"), "{}")])
        .await
        .unwrap();
    assert_eq!(again.new, [false, true]);
    assert_eq!(again.seqs[0], first.seqs[0]);
    assert_eq!(b.lookup("k1").unwrap(), Some((1, RecordState::Buffered)));
    b.ack(1, 1).await.unwrap();
    assert_eq!(b.lookup("k1").unwrap(), Some((1, RecordState::Delivered)));
    let after = b.append(vec![rec(Some("k1"), "{}")]).await.unwrap();
    assert_eq!(after.new, [false]);
    assert_eq!(b.stats().records, 1);
}

#[tokio::test]
async fn ack_removes_exactly_the_range_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buffer::open(opts(dir.path(), 1 << 30, Overflow::Reject)).unwrap();
    b.append(many(10)).await.unwrap();
    assert_eq!(b.ack(3, 5).await.unwrap(), 3);
    let left: Vec<i64> = b
        .read_and_claim(0, 100, u64::MAX)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(left, [1, 2, 6, 7, 8, 9, 10]);
    let s = b.stats();
    assert_eq!((s.records, s.delivered_total), (7, 3));
}

fn retaining(dir: &Path, capacity: u64, retain: Duration) -> BufferOptions {
    BufferOptions {
        retain_delivered: retain,
        ..opts(dir, capacity, Overflow::Reject)
    }
}

#[tokio::test]
async fn acknowledged_records_are_retained_readable_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buffer::open(retaining(dir.path(), 1 << 30, Duration::from_secs(3600))).unwrap();
    b.append(many(10)).await.unwrap();
    let before = now_us();
    b.ack(1, 6).await.unwrap();
    let s = b.stats();
    assert_eq!((s.records, s.retained, s.delivered_total), (4, 6, 6));
    let replayed: Vec<i64> = b
        .read_retained(2, before, 100, u64::MAX)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(replayed, [3, 4, 5, 6], "after seq 2, in seq order");
    assert!(
        b.read_retained(0, now_us() + 1, 100, u64::MAX)
            .unwrap()
            .is_empty(),
        "nothing delivered after a later time"
    );
    // Not forwarded again: the queue holds only what was never acked.
    let queued: Vec<i64> = b
        .read_and_claim(0, 100, u64::MAX)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(queued, [7, 8, 9, 10]);
    b.close().await;
    let b = Buffer::open(retaining(dir.path(), 1 << 30, Duration::from_secs(3600))).unwrap();
    assert_eq!(b.stats().retained, 6);
    assert_eq!(b.next_seq(), 11, "retained seqs are never reused");
}

#[tokio::test]
async fn retained_records_age_out() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buffer::open(retaining(dir.path(), 1 << 30, Duration::from_millis(1))).unwrap();
    b.append(many(5)).await.unwrap();
    b.ack(1, 5).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The next commit ages them out.
    b.append(many(1)).await.unwrap();
    assert_eq!(b.stats().retained, 0);
    assert!(b.read_retained(0, 0, 100, u64::MAX).unwrap().is_empty());
}

#[tokio::test]
async fn retained_records_yield_to_undelivered_ones_within_the_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buffer::open(retaining(dir.path(), 2000, Duration::from_secs(3600))).unwrap();
    b.append(many(20)).await.unwrap();
    let full = b.stats().bytes;
    b.ack(1, 20).await.unwrap();
    assert_eq!(b.stats().retained_bytes, full);
    // New records take the space back: never refused, never evicted
    // because of retained ones.
    b.append(many(20)).await.unwrap();
    let s = b.stats();
    assert_eq!(s.records, 20);
    assert!(
        s.bytes + s.retained_bytes <= 2000,
        "queue {} + retained {} within 2000",
        s.bytes,
        s.retained_bytes
    );
    assert!(s.retained < 20, "the oldest retained records went first");
    let oldest = b.read_retained(0, 0, 1, u64::MAX).unwrap();
    assert!(oldest.is_empty() || oldest[0].seq > 1);
}

#[tokio::test]
async fn turning_retention_off_drops_what_was_retained() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buffer::open(retaining(dir.path(), 1 << 30, Duration::from_secs(3600))).unwrap();
    b.append(many(5)).await.unwrap();
    b.ack(1, 5).await.unwrap();
    b.close().await;
    let b = Buffer::open(opts(dir.path(), 1 << 30, Overflow::Reject)).unwrap();
    b.append(many(1)).await.unwrap();
    assert_eq!(b.stats().retained, 0);
}

#[tokio::test]
async fn a_full_buffer_refuses_the_whole_request_under_reject() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buffer::open(opts(dir.path(), 1000, Overflow::Reject)).unwrap();
    b.append(many(10)).await.unwrap();
    let used = b.stats().bytes;
    let err = b.append(many(20)).await.unwrap_err();
    assert!(matches!(err, BufferError::Full { .. }), "{err}");
    assert_eq!(
        b.stats().bytes,
        used,
        "nothing of the refused request is kept"
    );
    assert_eq!(b.stats().records, 10);
}

#[tokio::test]
async fn drop_oldest_evicts_only_unclaimed_records_and_counts_each() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buffer::open(opts(dir.path(), 1000, Overflow::DropOldest)).unwrap();
    b.append(many(10)).await.unwrap();
    // The forwarder holds seqs 1..=3 in flight: they must not be evicted.
    let claimed = b.read_and_claim(0, 3, u64::MAX).unwrap();
    assert_eq!(claimed.len(), 3);
    let before = b.stats();
    b.append(many(5)).await.unwrap();
    let after = b.stats();
    let seqs: Vec<i64> = b
        .read_and_claim(0, 100, u64::MAX)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(&seqs[..3], [1, 2, 3], "claimed records survive eviction");
    let dropped = after.dropped_total - before.dropped_total;
    assert!(dropped > 0);
    assert_eq!(after.records, before.records + 5 - dropped);
    assert_eq!(seqs.len() as u64, after.records);
    assert!(after.bytes <= 1000);
}

#[tokio::test]
async fn dead_letters_keep_the_reason_and_leave_the_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buffer::open(opts(dir.path(), 1 << 30, Overflow::Reject)).unwrap();
    b.append(vec![rec(Some("bad"), "{}"), rec(None, "{}")])
        .await
        .unwrap();
    assert_eq!(b.dead_letter(1, 1, "422: nope".into()).await.unwrap(), 1);
    let summary = b.dead_letter_summary().unwrap();
    assert_eq!(summary.records, 1);
    assert_eq!(summary.last_reason.as_deref(), Some("422: nope"));
    assert_eq!(b.lookup("bad").unwrap(), Some((1, RecordState::DeadLetter)));
    assert_eq!(b.stats().records, 1);
    assert_eq!(b.stats().dead_letter_total, 1);
}

#[tokio::test]
async fn counters_epoch_and_sequence_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (epoch, stats) = {
        let b = Buffer::open(opts(dir.path(), 1 << 30, Overflow::Reject)).unwrap();
        b.append(many(5)).await.unwrap();
        b.ack(1, 5).await.unwrap();
        b.append(many(2)).await.unwrap();
        b.dead_letter(6, 6, "x".into()).await.unwrap();
        let s = (b.epoch(), b.stats());
        b.close().await;
        s
    };
    let b = Buffer::open(opts(dir.path(), 1 << 30, Overflow::Reject)).unwrap();
    assert_eq!(b.epoch(), epoch);
    assert_eq!(b.stats(), stats);
    // Everything below was handed out before; a new record never reuses a seq.
    b.ack(7, 7).await.unwrap();
    assert_eq!(b.append(many(1)).await.unwrap().seqs, [8]);
}

#[tokio::test]
async fn a_new_file_gets_a_new_epoch() {
    let a = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    let x = Buffer::open(opts(a.path(), 1 << 30, Overflow::Reject)).unwrap();
    let y = Buffer::open(opts(c.path(), 1 << 30, Overflow::Reject)).unwrap();
    assert_ne!(x.epoch(), y.epoch());
}

#[tokio::test]
async fn a_retry_of_buffered_records_is_not_refused_for_room_it_already_has() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buffer::open(opts(dir.path(), 1000, Overflow::Reject)).unwrap();
    let recs: Vec<Record> = (0..10).map(|i| rec(Some(&format!("k{i}")), "{}")).collect();
    b.append(recs.clone()).await.unwrap();
    assert!(matches!(
        b.append(many(10)).await,
        Err(BufferError::Full { .. })
    ));
    let again = b.append(recs).await.unwrap();
    assert!(again.new.iter().all(|n| !n));
}

fn source_batch(records: Vec<Record>, offset: &str) -> SourceBatch {
    SourceBatch {
        source: "logs".into(),
        stream: "s".into(),
        records,
        rejected: vec![Rejected {
            position: format!("1:2@{offset}"),
            raw: "not json".into(),
            reason: "payload: not valid JSON".into(),
        }],
        checkpoints: vec![("1:2".into(), Some(offset.into()))],
    }
}

#[tokio::test]
async fn a_source_checkpoint_commits_with_its_records_and_rejects() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buffer::open(opts(dir.path(), 1 << 30, Overflow::Reject)).unwrap();
    let writer = b.clone();
    tokio::task::spawn_blocking(move || writer.append_from_source(source_batch(many(3), "100")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.stats().records, 3);
    assert_eq!(b.stats().dead_letter_total, 1);
    let dead = b.dead_letter_summary().unwrap();
    assert_eq!(dead.last_reason.as_deref(), Some("payload: not valid JSON"));
    assert_eq!(b.checkpoints("logs").unwrap()["1:2"], "100");
    // A rejected item takes a seq of its own: the next record does not reuse it.
    assert_eq!(b.append(many(1)).await.unwrap().seqs, [5]);
}

#[tokio::test]
async fn a_full_buffer_keeps_the_source_checkpoint_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buffer::open(opts(dir.path(), 1000, Overflow::Reject)).unwrap();
    let writer = b.clone();
    let (first, second) = tokio::task::spawn_blocking(move || {
        (
            writer.append_from_source(source_batch(many(2), "10")),
            writer.append_from_source(source_batch(many(50), "20")),
        )
    })
    .await
    .unwrap();
    first.unwrap();
    assert!(matches!(second, Err(BufferError::Full { .. })));
    assert_eq!(b.checkpoints("logs").unwrap()["1:2"], "10");
    assert_eq!(b.stats().records, 2);
    assert_eq!(
        b.stats().dead_letter_total,
        1,
        "the refused batch's reject is not kept"
    );
}

#[tokio::test]
async fn an_id_repeated_within_one_request_is_buffered_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buffer::open(opts(dir.path(), 1 << 30, Overflow::Reject)).unwrap();
    let a = b
        .append(vec![
            rec(Some("x"), "{}"),
            rec(Some("x"), "{}"),
            rec(None, "{}"),
        ])
        .await
        .unwrap();
    assert_eq!(a.new, [true, false, true]);
    assert_eq!(a.seqs, [1, 1, 2]);
    assert_eq!(b.stats().records, 2);
}

/// A file as a schema-2 agent left it: no pull-source, job, retention or
/// epoch tables yet.
fn schema_2_file(path: &Path, epoch: uuid::Uuid) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
         CREATE TABLE records (
             seq INTEGER PRIMARY KEY, id TEXT NOT NULL, stream TEXT NOT NULL,
             ts_us INTEGER NOT NULL, received_us INTEGER NOT NULL, size INTEGER NOT NULL,
             payload TEXT NOT NULL, key_id INTEGER);
         CREATE TABLE ids (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE);
         CREATE TABLE dead_letters (
             seq INTEGER PRIMARY KEY, id TEXT NOT NULL, stream TEXT NOT NULL,
             ts_us INTEGER NOT NULL, received_us INTEGER NOT NULL, size INTEGER NOT NULL,
             payload TEXT NOT NULL, reason TEXT NOT NULL, failed_us INTEGER NOT NULL,
             key_id INTEGER);
         INSERT INTO meta VALUES ('schema_version', '2'), ('next_seq', '2'), ('clean_close', '1');
         INSERT INTO records VALUES (1, 'a', 's', 1, 1, 2, '{}', NULL);",
    )
    .unwrap();
    conn.execute("INSERT INTO meta VALUES ('epoch', ?1)", [epoch.to_string()])
        .unwrap();
}

#[tokio::test]
async fn an_older_file_gains_the_later_tables_in_their_order_and_keeps_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let epoch = uuid::Uuid::new_v4();
    schema_2_file(&dir.path().join("buffer.db"), epoch);
    let b = Buffer::open(opts(dir.path(), 1 << 30, Overflow::Reject)).unwrap();
    assert_eq!(b.epoch(), epoch);
    assert_eq!(b.stats().records, 1);
    assert_eq!(b.append(many(1)).await.unwrap().seqs, [2]);
    b.close().await;

    let conn = rusqlite::Connection::open(dir.path().join("buffer.db")).unwrap();
    let objects: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY rowid")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        objects,
        [
            "meta",
            "records",
            "ids",
            "dead_letters",
            "checkpoints",
            "jobs",
            "jobs_by_created",
            "delivered",
            "epochs"
        ]
    );
    // The definition schema 3 wrote, so files old and new hold the same one.
    let jobs: String = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'jobs'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        jobs,
        "CREATE TABLE jobs (
             id TEXT PRIMARY KEY, source TEXT NOT NULL, trigger TEXT NOT NULL,
             state TEXT NOT NULL, created_us INTEGER NOT NULL, started_us INTEGER,
             finished_us INTEGER, collected INTEGER NOT NULL DEFAULT 0,
             rejected INTEGER NOT NULL DEFAULT 0, errors TEXT NOT NULL DEFAULT '[]',
             checkpoint_before TEXT, checkpoint_after TEXT)"
    );
    let version: String = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, "3");
}
