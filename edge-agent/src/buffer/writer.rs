//! The writer thread: the only connection that writes to the buffer file.
//!
//! Requests arrive as [`Command`]s over a bounded channel; the thread drains
//! what is queued (up to [`GROUP_MAX_RECORDS`]), applies it all in one
//! transaction and commits once, then answers each request. Invariants: no
//! request is answered before the commit that holds it; a failed commit
//! answers every request of the group with the error and hands its sequence
//! numbers (and an epoch rotation) out again; the in-memory counters change
//! only after a commit, by the group's [`Delta`].

use std::sync::Arc;
use std::thread::JoinHandle;

use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use dcs_shared::record::Record;

use super::append::{append, append_from_source};
use super::eviction::{prune_ids, prune_retained};
use super::{
    Appended, BufferError, BufferOptions, Overflow, Shared, SourceBatch, classify, now_us,
};
use crate::epochs::{self, Epochs};

/// Stop draining the queue into one transaction past this many records so one
/// commit never holds the write lock for long and replies keep flowing.
const GROUP_MAX_RECORDS: usize = 50_000;
/// Queue depth between request handlers and the writer; senders wait when it is
/// full, which is the backpressure that keeps memory bounded under overload.
const QUEUE_DEPTH: usize = 256;
/// How often (in sequence numbers) the writer prunes the producer-id window.
const PRUNE_EVERY: i64 = 10_000;

pub(super) enum Command {
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

pub(super) type ExecFn = Box<dyn FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<()> + Send>;

impl Command {
    fn weight(&self) -> usize {
        match self {
            Command::Append { records, .. } => records.len(),
            Command::AppendFromSource { batch, .. } => batch.records.len() + batch.rejected.len(),
            _ => 1,
        }
    }
}

/// Starts the writer thread on `conn`; it runs until every sender of the
/// returned channel is gone, then marks the file cleanly closed.
pub(super) fn start(
    conn: Connection,
    shared: Arc<Shared>,
    opts: BufferOptions,
    next_seq: i64,
    epochs: Epochs,
) -> std::io::Result<(mpsc::Sender<Command>, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let writer = Writer {
        conn,
        shared,
        opts,
        next_seq,
        epochs,
        last_retain_prune: std::time::Instant::now(),
    };
    let handle = std::thread::Builder::new()
        .name("dcs-buffer-writer".into())
        .spawn(move || writer.run(rx))?;
    Ok((tx, handle))
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
pub(super) struct Delta {
    pub(super) records: i64,
    pub(super) bytes: i64,
    pub(super) dropped: u64,
    pub(super) dead: u64,
    pub(super) delivered: u64,
    pub(super) rekeyed: u64,
    pub(super) retained: i64,
    pub(super) retained_bytes: i64,
    pub(super) appended: bool,
}

impl Delta {
    pub(super) fn merge(&mut self, other: &Delta) {
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
