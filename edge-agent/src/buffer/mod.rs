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
//! Tables and their columns are listed in `schema`, which creates and
//! migrates them.
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
//!
//! # Layout
//! The module root holds the public types and the [`Buffer`] handle, whose
//! writes are commands to the writer thread. `schema` creates and migrates the
//! tables, `writer` runs the group commit, `append` stores new records
//! within the capacity, `eviction` is everything that removes rows without
//! an ack (drop-oldest, retention, the producer-id window), and `reads`
//! serves the forwarder and the API from the read connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

use dcs_shared::record::Record;

use crate::epochs::Epochs;
use crate::seal::Keyring;

mod append;
mod eviction;
mod reads;
mod schema;
#[cfg(test)]
mod tests;
mod writer;

pub(crate) use reads::decode_row;
pub(crate) use schema::{create_with_epoch, finish_created, has_key_id};

use schema::{PAGE_CACHE_KIB, SCHEMA_VERSION, configure, init_schema};
use writer::{Command, ExecFn};

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

/// The wall clock in the unit of every `*_us` column.
fn now_us() -> i64 {
    dcs_shared::record::unix_micros(time::OffsetDateTime::now_utc())
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
        let (tx, handle) = writer::start(conn, shared.clone(), opts.clone(), next_seq, epochs)
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

    /// Stores the replay state.
    pub async fn set_replay_state(&self, state: crate::replay::State) -> Result<(), BufferError> {
        self.exec(move |tx| state.store(tx)).await
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
