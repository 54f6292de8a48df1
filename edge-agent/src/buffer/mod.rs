//! The durable buffer: one SQLite file between the ingest API and the forwarder.
//!
//! # Design constraints
//! - A producer gets a 2xx only after its records are committed at the configured
//!   durability (`process-crash`: WAL + `synchronous=NORMAL`, survives kill -9;
//!   `power-loss`: `synchronous=FULL`, survives a power cut).
//! - A record leaves `records` only when the aggregator acknowledged it (ack),
//!   when the aggregator refused it permanently (moved to `dead_letters`), or when
//!   the `drop-oldest` overflow policy evicted it (counted in `dropped_total`).
//!   Nothing else deletes a record.
//! - Sequence numbers only grow, across restarts too; with the random `epoch`
//!   written when the file is created they form the delivery key
//!   `(agent, epoch, seq)` that makes redelivery idempotent at the aggregator.
//!   The file moves to a new epoch when the aggregator shows that it went
//!   back in time; records keep the epoch they were appended under
//!   ([`crate::epochs`]).
//! - Every counter shown to operators is derived from the database at open and
//!   changed only after a commit, so it is exact across restarts and never negative.
//! - A row that cannot be read back (damaged on disk, or a sealed payload that
//!   fails authentication) is moved to `dead_letters` with the reason; it never
//!   stalls the forwarder. Damage to the file's structure is handled before
//!   the buffer opens, by [`crate::recovery`].
//! - With encryption on, payloads are sealed ([`crate::seal`]) before they
//!   reach SQLite and opened only when read for forwarding; a buffer holding
//!   payloads sealed with a key that is not configured refuses to open.
//!
//! # On-disk schema
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
//!   [`Buffer::append_from_source`], in the transaction that stores the
//!   records read up to that point, so a restart neither loses nor repeats.
//! - `jobs(...)`: the history of source runs ([`crate::jobs`]), pruned by age.
//! - `epochs(first_seq PK, epoch, reason, created_us)`: from which seq on each
//!   epoch keys records ([`crate::epochs`]); `meta.epoch` is the last one.
//! - `meta.rekeyed_total`: records moved to a new epoch because their key was
//!   taken at the aggregator.
//! - `delivered(...)`, `meta.replay_done`, `meta.replay_pending`: acknowledged
//!   records kept for `buffer.retain_delivered`, and their replay
//!   ([`crate::replay`]).
//!
//! # Write path
//! One writer thread owns the only write connection. Ingest requests, acks and
//! dead-letter moves are sent to it over a channel; it drains whatever is queued,
//! applies it all in one transaction and commits once (group commit), then
//! answers each request. Many concurrent producers thus share one fsync.
//!
//! # Read path and the in-flight claim
//! The forwarder reads from its own connection (WAL readers never block the
//! writer) in sequence order and *claims* what it read under the claims lock.
//! Under `drop-oldest` the writer holds that lock from eviction until its commit
//! and evicts only above the claimed sequence, so a record is never both counted
//! as dropped and delivered.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

use dcs_shared::record::Record;

use crate::epochs::{self, Epochs};
use crate::seal::{self, Keyring};

/// 2: `key_id` on `records` and `dead_letters`, `meta.clean_close`.
/// 3: `checkpoints` and `jobs` (pull sources and their runs).
/// 4: more than one row in `epochs` (the file moved to a new epoch); set by
/// [`crate::epochs::rotate`]. A file that never moved stays at 3, so an older
/// agent can still open it after a rollback of the package.
const SCHEMA_VERSION: i64 = 4;
/// What a file needs when it has only ever had one epoch.
const BASE_SCHEMA_VERSION: i64 = 3;
/// Stop draining the queue into one transaction past this many records so one
/// commit never holds the write lock for long and replies keep flowing.
const GROUP_MAX_RECORDS: usize = 50_000;
/// Queue depth between request handlers and the writer; senders wait when it is
/// full, which is the backpressure that keeps memory bounded under overload.
const QUEUE_DEPTH: usize = 256;
/// Bytes a record costs beyond its fields (row header, index entry); counted so
/// the capacity limit tracks disk use more closely than payload bytes alone.
const RECORD_OVERHEAD_BYTES: u64 = 48;
/// How often (in sequence numbers) the writer prunes the producer-id window.
const PRUNE_EVERY: i64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Committed data survives a crash of the agent process (kill -9, OOM).
    ProcessCrash,
    /// Committed data survives a power loss or kernel crash: an fsync per commit.
    PowerLoss,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// A full buffer refuses new records (507); nothing is ever evicted.
    Reject,
    /// A full buffer evicts its oldest records (not yet in flight) to make room,
    /// counting each one in `dropped_total`.
    DropOldest,
}

#[derive(Debug, Clone)]
pub struct BufferOptions {
    pub path: PathBuf,
    pub capacity_bytes: u64,
    pub overflow: Overflow,
    pub durability: Durability,
    /// How many recent sequence numbers' producer ids are remembered after delivery.
    pub dedup_window: i64,
    /// New records are refused while the buffer's filesystem has less free
    /// space than this, so that acks and dead-letter moves (which need WAL
    /// space to delete) can always proceed and a full disk drains itself.
    pub min_free_disk: u64,
    /// Where [`crate::recovery`] moves a damaged buffer file.
    pub quarantine_dir: PathBuf,
    /// Seals new payloads when enabled; opens sealed ones.
    pub keyring: Keyring,
    /// How long acknowledged records are kept for a replay
    /// ([`crate::replay`]); zero deletes them at once.
    pub retain_delivered: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("buffer is full ({used} of {capacity} bytes used, request needs {needed})")]
    Full {
        used: u64,
        capacity: u64,
        needed: u64,
    },
    #[error("the disk holding the buffer is full (or below buffer.min_free_disk)")]
    DiskFull,
    #[error("buffer database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("buffer database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "buffer {path} was written by a newer agent (schema {found}, this build reads {SCHEMA_VERSION})"
    )]
    NewerSchema { path: PathBuf, found: i64 },
    #[error("buffer writer has stopped")]
    Closed,
    #[error("buffer {}: {source}", path.display())]
    Keys {
        path: PathBuf,
        source: crate::seal::SealError,
    },
    #[error("buffer {}: cannot move the damaged file aside: {source}", path.display())]
    Quarantine {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn classify(e: rusqlite::Error) -> BufferError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => BufferError::DiskFull,
        _ => BufferError::Sqlite(e),
    }
}

/// Counters derived from the database; see the module doc.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub records: u64,
    pub bytes: u64,
    pub dropped_total: u64,
    pub dead_letter_total: u64,
    pub delivered_total: u64,
    /// Records moved to a new epoch because their key was taken.
    pub rekeyed_total: u64,
    /// Acknowledged records kept for a replay (`buffer.retain_delivered`),
    /// not counted in `records`/`bytes`.
    pub retained: u64,
    pub retained_bytes: u64,
}

/// What an append did, per record in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub ids: Vec<String>,
    pub seqs: Vec<i64>,
    /// Per record: false when its id was already known (idempotent retry).
    pub new: Vec<bool>,
}

/// A buffered row that could not be read back: its seq and why.
type Unreadable = (i64, String);

/// A record read for forwarding.
#[derive(Debug, Clone)]
pub struct Buffered {
    pub seq: i64,
    pub id: String,
    pub stream: String,
    pub ts_us: i64,
    pub received_us: i64,
    pub size: u64,
    pub payload: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    Buffered,
    Delivered,
    DeadLetter,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterSummary {
    pub records: u64,
    pub last_reason: Option<String>,
    pub last_failed_at: Option<String>,
}

enum Command {
    Append {
        records: Vec<Record>,
        reply: oneshot::Sender<Result<Appended, BufferError>>,
    },
    Ack {
        first: i64,
        last: i64,
        reply: oneshot::Sender<Result<u64, BufferError>>,
    },
    DeadLetter {
        first: i64,
        last: i64,
        reason: String,
        reply: oneshot::Sender<Result<u64, BufferError>>,
    },
    /// Records a source pulled, the ones it rejected and how far it read:
    /// all three commit together or not at all.
    AppendFromSource {
        batch: SourceBatch,
        reply: oneshot::Sender<Result<Appended, BufferError>>,
    },
    /// A write that belongs to another module's table (`jobs`), run by the
    /// one writer so the single-writer design holds.
    Exec {
        work: ExecFn,
        reply: oneshot::Sender<Result<(), BufferError>>,
    },
    /// Moves to a new epoch if `from` is still the current one; answers the
    /// epoch current afterwards.
    Rotate {
        from: Uuid,
        reason: String,
        reply: oneshot::Sender<Result<Uuid, BufferError>>,
    },
    /// Moves records to fresh seqs of the current epoch.
    Rekey {
        seqs: Vec<i64>,
        reply: oneshot::Sender<Result<u64, BufferError>>,
    },
}

type ExecFn = Box<dyn FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<()> + Send>;

/// What one step of a pull source produced; see [`Buffer::append_from_source`].
#[derive(Debug, Clone, Default)]
pub struct SourceBatch {
    /// The source's name: the `checkpoints.source` column.
    pub source: String,
    pub stream: String,
    pub records: Vec<Record>,
    /// Items that failed validation; they go to `dead_letters`.
    pub rejected: Vec<Rejected>,
    /// `(key, Some(value))` stores a checkpoint, `(key, None)` forgets one.
    pub checkpoints: Vec<(String, Option<String>)>,
}

/// A pulled item that failed validation.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// Where it was read, e.g. `8:1234@5120` (file identity and offset).
    pub position: String,
    /// The text as the source gave it.
    pub raw: String,
    pub reason: String,
}

impl Command {
    fn weight(&self) -> usize {
        match self {
            Command::Append { records, .. } => records.len(),
            Command::AppendFromSource { batch, .. } => batch.records.len() + batch.rejected.len(),
            _ => 1,
        }
    }
}

/// The highest sequence the forwarder has taken; records at or below it may be
/// in flight and are never evicted (see "in-flight claim").
#[derive(Debug, Default)]
struct Claims {
    claimed: i64,
}

struct Shared {
    stats: Mutex<Stats>,
    claims: Mutex<Claims>,
    /// Woken after every commit that added records.
    appended: Notify,
    /// As committed; the writer keeps its own copy for the open transaction.
    epochs: Mutex<Epochs>,
    /// The next seq the writer hands out, as committed.
    next_seq: std::sync::atomic::AtomicI64,
}

/// Handle to the buffer; cheap to clone.
#[derive(Clone)]
pub struct Buffer {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    /// Read connection for the forwarder and the API; WAL readers run beside
    /// the writer.
    reader: Arc<Mutex<Connection>>,
    capacity_bytes: u64,
    path: PathBuf,
    keyring: Keyring,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Buffer {
    /// Opens (or creates) the buffer file and starts its writer thread.
    pub fn open(opts: BufferOptions) -> Result<Buffer, BufferError> {
        let open_err = |source| BufferError::Open {
            path: opts.path.clone(),
            source,
        };
        if let Some(dir) = opts.path.parent()
            && !dir.as_os_str().is_empty()
        {
            crate::durable::create_dir_all(dir).map_err(|e| BufferError::Open {
                path: opts.path.clone(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        }
        crate::file_mode::owner_only(&opts.path).map_err(|e| BufferError::Open {
            path: opts.path.clone(),
            source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
        })?;
        let mut conn = Connection::open(&opts.path).map_err(open_err)?;
        configure(&conn, opts.durability).map_err(open_err)?;
        let (epochs, stats, next_seq) = init_schema(&mut conn, &opts.path, &opts.keyring)?;
        // The "open" mark must reach the main file, not just the WAL: it is
        // how the next start tells a lost WAL from a clean stop.
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(open_err)?;
        // A new file's directory entry (and its WAL's) survives a power cut
        // only once the directory is fsynced.
        crate::durable::sync_parent(&opts.path).map_err(|e| BufferError::Open {
            path: opts.path.clone(),
            source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
        })?;
        let reader = Connection::open_with_flags(
            &opts.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        reader
            .busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        reader
            .pragma_update(None, "cache_size", -PAGE_CACHE_KIB)
            .map_err(open_err)?;

        let shared = Arc::new(Shared {
            stats: Mutex::new(stats),
            claims: Mutex::new(Claims::default()),
            appended: Notify::new(),
            epochs: Mutex::new(epochs.clone()),
            next_seq: std::sync::atomic::AtomicI64::new(next_seq),
        });
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer = Writer {
            conn,
            shared: shared.clone(),
            opts: opts.clone(),
            next_seq,
            epochs,
            last_retain_prune: std::time::Instant::now(),
        };
        let handle = std::thread::Builder::new()
            .name("dcs-buffer-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| BufferError::Open {
                path: opts.path.clone(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(Buffer {
            tx,
            shared,
            reader: Arc::new(Mutex::new(reader)),
            capacity_bytes: opts.capacity_bytes,
            path: opts.path,
            keyring: opts.keyring,
            writer: Arc::new(Mutex::new(Some(handle))),
        })
    }

    /// The epoch new records are appended under.
    pub fn epoch(&self) -> Uuid {
        self.epochs().current()
    }

    /// Which epoch keys which seqs, as committed.
    pub fn epochs(&self) -> Epochs {
        self.shared.epochs.lock().expect("epochs lock").clone()
    }

    /// The next seq this buffer will hand out: no record of the current
    /// epoch has reached it yet.
    pub fn next_seq(&self) -> i64 {
        self.shared
            .next_seq
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Moves to a new epoch unless `from` is no longer the current one (a
    /// concurrent batch rotated first); returns the epoch now current.
    pub async fn rotate_epoch(&self, from: Uuid, reason: &str) -> Result<Uuid, BufferError> {
        let reason = reason.to_owned();
        self.call(|reply| Command::Rotate {
            from,
            reason,
            reply,
        })
        .await
    }

    /// Moves the buffered records `seqs` to fresh seqs of the current epoch;
    /// returns how many moved.
    pub async fn rekey(&self, seqs: Vec<i64>) -> Result<u64, BufferError> {
        self.call(|reply| Command::Rekey { seqs, reply }).await
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    pub fn stats(&self) -> Stats {
        *self.shared.stats.lock().expect("stats lock")
    }

    /// Waits until some append commits (or returns at once if one committed
    /// since the last call).
    pub async fn appended(&self) {
        self.shared.appended.notified().await;
    }

    /// Appends records atomically: all are committed, or none.
    pub async fn append(&self, records: Vec<Record>) -> Result<Appended, BufferError> {
        self.call(|reply| Command::Append { records, reply }).await
    }

    /// Removes records the aggregator acknowledged; returns how many were removed.
    pub async fn ack(&self, first: i64, last: i64) -> Result<u64, BufferError> {
        self.call(|reply| Command::Ack { first, last, reply }).await
    }

    /// Partial acceptance of a pushed request: appends `records` and writes
    /// each of `rejected` to `dead_letters` in one transaction, with the id
    /// `source:<origin>:<position>` and `origin` as stream. A full buffer
    /// refuses both, like [`Buffer::append`].
    pub async fn append_partial(
        &self,
        origin: &str,
        records: Vec<Record>,
        rejected: Vec<Rejected>,
    ) -> Result<Appended, BufferError> {
        let batch = SourceBatch {
            source: origin.to_owned(),
            stream: origin.to_owned(),
            records,
            rejected,
            checkpoints: Vec::new(),
        };
        self.call(|reply| Command::AppendFromSource { batch, reply })
            .await
    }

    /// Moves records the aggregator refused for good into `dead_letters`.
    pub async fn dead_letter(
        &self,
        first: i64,
        last: i64,
        reason: String,
    ) -> Result<u64, BufferError> {
        self.call(|reply| Command::DeadLetter {
            first,
            last,
            reason,
            reply,
        })
        .await
    }

    /// Appends what a source pulled, dead-letters what it rejected and stores
    /// its checkpoints, all in one transaction: after a crash either all of
    /// it is on disk or none of it, so the source resumes exactly where the
    /// stored records end. Blocking: call from `spawn_blocking`.
    pub fn append_from_source(&self, batch: SourceBatch) -> Result<Appended, BufferError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Command::AppendFromSource { batch, reply })
            .map_err(|_| BufferError::Closed)?;
        rx.blocking_recv().map_err(|_| BufferError::Closed)?
    }

    /// Runs `work` in the writer's next transaction (tables other modules own).
    pub async fn exec(
        &self,
        work: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<()> + Send + 'static,
    ) -> Result<(), BufferError> {
        let work: ExecFn = Box::new(work);
        self.call(|reply| Command::Exec { work, reply }).await
    }

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

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, BufferError>>) -> Command,
    ) -> Result<T, BufferError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| BufferError::Closed)?;
        rx.await.map_err(|_| BufferError::Closed)?
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

    /// Stores the replay state.
    pub async fn set_replay_state(&self, state: crate::replay::State) -> Result<(), BufferError> {
        self.exec(move |tx| state.store(tx)).await
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

    /// Stops the writer after it has finished queued work, checkpoints the WAL
    /// and closes the file. Other clones become unusable.
    pub async fn close(self) {
        let writer = self.writer.clone();
        drop(self);
        let handle = writer.lock().expect("writer lock").take();
        if let Some(handle) = handle {
            // The thread exits once every sender is gone; clones held elsewhere
            // (the forwarder) must be dropped first by the caller.
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
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
const PAGE_CACHE_KIB: i64 = 1024;

fn configure(conn: &Connection, durability: Durability) -> rusqlite::Result<()> {
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

fn init_schema(
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
             updated_us INTEGER NOT NULL, PRIMARY KEY (source, key)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS jobs (
             id TEXT PRIMARY KEY, source TEXT NOT NULL, trigger TEXT NOT NULL,
             state TEXT NOT NULL, created_us INTEGER NOT NULL, started_us INTEGER,
             finished_us INTEGER, collected INTEGER NOT NULL DEFAULT 0,
             rejected INTEGER NOT NULL DEFAULT 0, errors TEXT NOT NULL DEFAULT '[]',
             checkpoint_before TEXT, checkpoint_after TEXT);
         CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_us);",
    )?;
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

struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    opts: BufferOptions,
    next_seq: i64,
    /// Includes a rotation of the open transaction; restored if it fails.
    epochs: Epochs,
    /// When retained records were last aged out.
    last_retain_prune: std::time::Instant,
}

/// What a group changed, applied to the in-memory counters only after commit.
#[derive(Default, Clone)]
struct Delta {
    records: i64,
    bytes: i64,
    dropped: u64,
    dead: u64,
    delivered: u64,
    rekeyed: u64,
    retained: i64,
    retained_bytes: i64,
    appended: bool,
}

impl Delta {
    fn merge(&mut self, other: &Delta) {
        self.records += other.records;
        self.bytes += other.bytes;
        self.dropped += other.dropped;
        self.dead += other.dead;
        self.delivered += other.delivered;
        self.retained += other.retained;
        self.retained_bytes += other.retained_bytes;
        self.rekeyed += other.rekeyed;
        self.appended |= other.appended;
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            let mut weight = group[0].weight();
            while weight < GROUP_MAX_RECORDS {
                match rx.try_recv() {
                    Ok(cmd) => {
                        weight += cmd.weight();
                        group.push(cmd);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(group);
        }
        // Every sender is gone: a clean shutdown. Mark it, then fold the WAL
        // back into the main file so the next start opens quickly.
        if let Err(error) = self.conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('clean_close', '1')",
            [],
        ) {
            tracing::warn!(message = "mark buffer closed", %error);
        }
        if let Err(error) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(message = "checkpoint buffer on close", %error);
        }
    }

    fn commit_group(&mut self, group: Vec<Command>) {
        let start_seq = self.next_seq;
        let start_epochs = self.epochs.clone();
        let mut delta = Delta::default();
        let shared = self.shared.clone();
        let mut claims = (self.opts.overflow == Overflow::DropOldest)
            .then(|| shared.claims.lock().expect("claims lock"));
        let mut replies: Vec<Reply> = Vec::new();
        let result = (|| -> Result<(), BufferError> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            for cmd in group {
                match cmd {
                    Command::Append { records, reply } => {
                        let outcome = append(
                            &tx,
                            &self.epochs.current(),
                            &self.opts,
                            &self.shared,
                            claims.as_deref_mut(),
                            &mut self.next_seq,
                            &mut delta,
                            records,
                        );
                        replies.push(reply_with(reply, outcome));
                    }
                    Command::Ack { first, last, reply } => {
                        let retain = !self.opts.retain_delivered.is_zero();
                        let outcome = ack(&tx, first, last, retain, &mut delta);
                        replies.push(reply_with(reply, outcome));
                    }
                    Command::DeadLetter {
                        first,
                        last,
                        reason,
                        reply,
                    } => {
                        let outcome = dead_letter(&tx, first, last, &reason, &mut delta);
                        replies.push(reply_with(reply, outcome));
                    }
                    Command::AppendFromSource { batch, reply } => {
                        let outcome = append_from_source(
                            &tx,
                            &self.epochs.current(),
                            &self.opts,
                            &self.shared,
                            claims.as_deref_mut(),
                            &mut self.next_seq,
                            &mut delta,
                            batch,
                        );
                        replies.push(reply_with(reply, outcome));
                    }
                    Command::Exec { work, reply } => {
                        let outcome = exec(&tx, work);
                        replies.push(reply_with(reply, outcome));
                    }
                    Command::Rotate {
                        from,
                        reason,
                        reply,
                    } => {
                        let outcome = if self.epochs.current() == from {
                            epochs::rotate(&tx, &mut self.epochs, self.next_seq, &reason)
                                .map_err(BufferError::from)
                        } else {
                            Ok(self.epochs.current())
                        };
                        replies.push(reply_with(reply, outcome));
                    }
                    Command::Rekey { seqs, reply } => {
                        let outcome = epochs::rekey(
                            &tx,
                            &self.epochs,
                            &self.opts.keyring,
                            &seqs,
                            &mut self.next_seq,
                        )
                        .inspect(|&moved| {
                            delta.rekeyed += moved;
                            delta.appended |= moved > 0;
                        });
                        replies.push(reply_with(reply, outcome));
                    }
                }
            }
            prune_retained(
                &tx,
                &self.shared,
                &self.opts,
                &mut self.last_retain_prune,
                &mut delta,
            )?;
            store_counters(&tx, &delta, self.next_seq)?;
            if self.next_seq / PRUNE_EVERY != start_seq / PRUNE_EVERY {
                prune_ids(&tx, self.next_seq - self.opts.dedup_window)?;
            }
            let started = std::time::Instant::now();
            let committed = tx.commit().map_err(classify);
            metrics::histogram!("dcs_agent_sqlite_commit_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            committed
        })();
        drop(claims);
        match &result {
            Ok(()) => {
                let mut s = self.shared.stats.lock().expect("stats lock");
                s.records = (s.records as i64 + delta.records).max(0) as u64;
                s.bytes = (s.bytes as i64 + delta.bytes).max(0) as u64;
                s.dropped_total += delta.dropped;
                s.dead_letter_total += delta.dead;
                s.delivered_total += delta.delivered;
                s.rekeyed_total += delta.rekeyed;
                s.retained = (s.retained as i64 + delta.retained).max(0) as u64;
                s.retained_bytes = (s.retained_bytes as i64 + delta.retained_bytes).max(0) as u64;
                drop(s);
                if self.epochs != start_epochs {
                    *self.shared.epochs.lock().expect("epochs lock") = self.epochs.clone();
                }
                self.shared
                    .next_seq
                    .store(self.next_seq, std::sync::atomic::Ordering::Release);
            }
            Err(error) => {
                // Nothing of the group is on disk: hand the sequence numbers
                // (and a rotation) out again.
                self.next_seq = start_seq;
                self.epochs = start_epochs;
                tracing::error!(message = "buffer commit failed", %error);
            }
        }
        for reply in replies {
            reply(result.as_ref().map(|_| ()));
        }
        if result.is_ok() && delta.appended {
            self.shared.appended.notify_one();
        }
    }
}

fn store_counters(
    tx: &rusqlite::Transaction<'_>,
    delta: &Delta,
    next_seq: i64,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + CAST(?3 AS INTEGER) AS TEXT)",
    )?;
    for (key, add) in [
        ("dropped_total", delta.dropped),
        ("dead_letter_total", delta.dead),
        ("delivered_total", delta.delivered),
        ("rekeyed_total", delta.rekeyed),
    ] {
        if add > 0 {
            stmt.execute(params![key, add.to_string(), add as i64])?;
        }
    }
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?1)",
        [next_seq.to_string()],
    )?;
    Ok(())
}

type Reply = Box<dyn FnOnce(Result<(), &BufferError>)>;

fn reply_with<T: Send + 'static>(
    reply: oneshot::Sender<Result<T, BufferError>>,
    outcome: Result<T, BufferError>,
) -> Reply {
    Box::new(move |commit: Result<(), &BufferError>| {
        let _ = reply.send(match (commit, outcome) {
            (Ok(()), outcome) => outcome,
            (Err(e), Ok(_)) => Err(clone_err(e)),
            (Err(_), Err(e)) => Err(e),
        });
    })
}

fn clone_err(e: &BufferError) -> BufferError {
    match e {
        BufferError::DiskFull => BufferError::DiskFull,
        BufferError::Full {
            used,
            capacity,
            needed,
        } => BufferError::Full {
            used: *used,
            capacity: *capacity,
            needed: *needed,
        },
        other => BufferError::Sqlite(rusqlite::Error::ToSqlConversionFailure(
            other.to_string().into(),
        )),
    }
}

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

fn now_us() -> i64 {
    dcs_shared::record::unix_micros(time::OffsetDateTime::now_utc())
}

/// Appends one request's records inside the group transaction, under a
/// savepoint: a request is written whole or not at all, whatever else the
/// group holds.
#[allow(clippy::too_many_arguments)]
fn append(
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

/// Runs another module's write under a savepoint, so its failure leaves the
/// rest of the group intact.
fn exec(tx: &rusqlite::Transaction<'_>, work: ExecFn) -> Result<(), BufferError> {
    tx.execute_batch("SAVEPOINT exec").map_err(classify)?;
    match work(tx) {
        Ok(()) => tx.execute_batch("RELEASE exec").map_err(classify),
        Err(e) => {
            let _ = tx.execute_batch("ROLLBACK TO exec; RELEASE exec");
            Err(classify(e))
        }
    }
}

/// The records of a [`SourceBatch`] go through [`append`] (capacity, overflow
/// and sealing exactly as for pushed records); its rejected items and
/// checkpoints are written under an outer savepoint, so a full buffer keeps
/// the checkpoint where it was and the source reads the same items again.
#[allow(clippy::too_many_arguments)]
fn append_from_source(
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

/// Evicts the oldest records above `claimed` until `want` bytes are free;
/// returns the bytes freed. The caller holds the claims lock until commit.
fn evict_oldest(
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
fn prune_retained(
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

fn ack(
    tx: &rusqlite::Transaction<'_>,
    first: i64,
    last: i64,
    retain: bool,
    delta: &mut Delta,
) -> Result<u64, BufferError> {
    if retain {
        let (n, bytes) = crate::replay::retain(tx, first, last, now_us())?;
        delta.retained += n as i64;
        delta.retained_bytes += bytes as i64;
    }
    let mut stmt =
        tx.prepare_cached("DELETE FROM records WHERE seq BETWEEN ?1 AND ?2 RETURNING size")?;
    let sizes: Vec<i64> = stmt
        .query_map([first, last], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let n = sizes.len() as u64;
    delta.records -= n as i64;
    delta.bytes -= sizes.iter().sum::<i64>();
    delta.delivered += n;
    Ok(n)
}

fn dead_letter(
    tx: &rusqlite::Transaction<'_>,
    first: i64,
    last: i64,
    reason: &str,
    delta: &mut Delta,
) -> Result<u64, BufferError> {
    tx.execute(
        "INSERT OR REPLACE INTO dead_letters
             (seq, id, stream, ts_us, received_us, size, payload, reason, failed_us, key_id)
         SELECT seq, id, stream, ts_us, received_us, size, payload, ?3, ?4, key_id
         FROM records WHERE seq BETWEEN ?1 AND ?2",
        params![first, last, reason, now_us()],
    )?;
    let mut stmt =
        tx.prepare_cached("DELETE FROM records WHERE seq BETWEEN ?1 AND ?2 RETURNING size")?;
    let sizes: Vec<i64> = stmt
        .query_map([first, last], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let n = sizes.len() as u64;
    delta.records -= n as i64;
    delta.bytes -= sizes.iter().sum::<i64>();
    delta.dead += n;
    Ok(n)
}

/// Forgets producer ids older than the dedup window, but never one whose record
/// is still buffered or dead-lettered.
fn prune_ids(tx: &rusqlite::Transaction<'_>, below: i64) -> rusqlite::Result<()> {
    let oldest_kept: i64 = tx.query_row(
        "SELECT min(?1, coalesce((SELECT min(seq) FROM records), ?1),
                        coalesce((SELECT min(seq) FROM dead_letters), ?1))",
        [below],
        |r| r.get(0),
    )?;
    tx.execute("DELETE FROM ids WHERE seq < ?1", [oldest_kept])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        tokio::task::spawn_blocking(move || {
            writer.append_from_source(source_batch(many(3), "100"))
        })
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
}
