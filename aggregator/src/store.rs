//! The PostgreSQL write path.
//!
//! Design constraints:
//! - One batch is one transaction: the tenant and agent upserts and every
//!   record commit together or not at all, and the agent hears 200 only after
//!   the commit.
//! - Records go in with `COPY` (one round trip for the whole batch) straight
//!   into `records`, right after the batch has claimed its seq range in
//!   `record_ranges` (below). COPY cannot skip the duplicates that redelivery
//!   produces: a batch whose claim overlaps an existing one fails with an
//!   exclusion violation (a unique violation from the COPY is treated the
//!   same way), and is then written again, in a new transaction, through a
//!   per-connection temporary staging table: under a per-(agent, epoch)
//!   advisory lock, `INSERT ... SELECT ... WHERE NOT EXISTS` stores the
//!   staged records whose key is not stored yet and claims the runs of them
//!   that no claim covers. If a concurrent batch claims first, the staged
//!   write is repeated (at most `STAGED_ATTEMPTS` staged attempts).
//!   Redelivery is rare, and the direct COPY saves PostgreSQL about a third
//!   of its work per record (docs/PERFORMANCE.md), so the common case pays
//!   nothing for it.
//! - A `PgCopyIn` is always finished or aborted, never dropped: a dropped COPY
//!   leaves the connection in a state where later queries return errors or
//!   wrong results. Callers run [`write_batch`] in its own task so a client
//!   disconnect cannot cancel it half-way, and a connection whose protocol
//!   state is in doubt after an error is closed rather than returned to the pool.
//! - Errors are classified here, where SQLSTATEs are understood: transient
//!   (retry later), rejected data (never retry), or a bug.
//! - One key, one record. `records` is partitioned on `received_at`, so its
//!   primary key cannot stop a reused `(agent, epoch, seq)` arriving with a
//!   new `received_at`. The guard is the `record_ranges` ledger instead
//!   (migration `20261205000001`): each batch claims its seq range first, and
//!   claims never overlap. A batch whose claim succeeds cannot meet a stored
//!   record and is COPYed straight in; one whose claim overlaps goes through
//!   staging, where each record is compared with the stored one by key alone:
//!   same content hash and `received_at` is a duplicate, anything else a
//!   conflict that refuses the whole batch (409) and names each conflicting
//!   seq, so the agent can move exactly those records to a new epoch.
//! - Every answer carries the epoch's high-water mark (the highest stored
//!   seq), which is how an agent notices that its buffer went back in time.
//! - A batch whose COMMIT did not answer is never acknowledged: the
//!   connection may have died after PostgreSQL committed (a failover, a
//!   terminated backend, a reset), so the outcome is unknown and the agent
//!   gets 503 and resends. The resend meets its own claimed range, goes
//!   through staging and is answered as duplicates, never as a conflict,
//!   because every delivery carries the same content and `received_at`.
//! - A connection that may point at the wrong server is never reused: after
//!   a read-only refusal (a demoted primary or a standby behind a stale
//!   route), an administrator or crash shutdown, a connection exception or
//!   any I/O error it is closed, and [`is_writable`] refuses new connections
//!   to a server in recovery or read-only, so the pool only ever holds
//!   connections to a writable primary.

use std::borrow::Cow;
use std::io::Write as _;

use dcs_shared::identity::AgentIdentity;
use dcs_shared::wire::{Backlog, BatchAck};
use sqlx::{Connection as _, PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

/// `client_min_messages` is raised for this transaction only, so the NOTICE
/// "relation already exists, skipping" is not logged for every batch.
const CREATE_STAGING: &str = "SET LOCAL client_min_messages = warning; \
    CREATE TEMP TABLE IF NOT EXISTS dcs_staging \
    (seq int8, record_id text, stream text, ts timestamptz, payload jsonb, content_hash int8, \
     received_at timestamptz) \
    ON COMMIT DELETE ROWS";

/// The columns of a [`CopyRows`] row, in order. The direct path adds the
/// batch-wide columns at the end of each row.
const COPY_STAGING: &str =
    "COPY dcs_staging (seq, record_id, stream, ts, payload, content_hash, received_at) FROM STDIN";
const COPY_RECORDS: &str = "COPY records \
    (seq, record_id, stream, ts, payload, content_hash, received_at, agent_id, epoch, tenant_id) \
    FROM STDIN";

/// SQLSTATE `unique_violation`: the batch holds a key that is already stored.
const UNIQUE_VIOLATION: &str = "23505";
/// SQLSTATE `exclusion_violation`: the batch's seq range overlaps a claimed
/// one in `record_ranges`.
const EXCLUSION_VIOLATION: &str = "23P01";
/// How often the staged path is tried when a concurrent batch of the same
/// epoch claims an overlapping range first; each retry sees that batch's
/// rows, so a second attempt normally succeeds.
const STAGED_ATTEMPTS: usize = 4;

/// Claims the batch's seq range and returns the epoch's high-water mark. The
/// subquery reads the snapshot from before the insert, hence GREATEST.
const CLAIM_RANGE: &str = "\
    WITH claim AS ( \
        INSERT INTO record_ranges (agent_id, epoch, first_seq, last_seq) \
        VALUES ($1, $2, $3, $4) RETURNING last_seq) \
    SELECT GREATEST((SELECT last_seq FROM claim), \
        (SELECT max(last_seq) FROM record_ranges WHERE agent_id = $1 AND epoch = $2))";

/// Serialises the staged writes of one (agent, epoch): a seq that falls in a
/// gap of an existing claim (a record the agent had dead-lettered) is stored
/// without a claim of its own, so the lock is what keeps two of them apart.
const LOCK_EPOCH: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended($1::text || '/' || $2::text, 0))";

/// The highest stored seq of an (agent, epoch), if any.
const HIGH_SEQ: &str = "\
    SELECT max(k.last_seq) FROM record_ranges k JOIN agents a ON a.id = k.agent_id \
    WHERE a.tenant_id = $1 AND a.name = $2 AND k.epoch = $3";

const UPSERT_TENANT: &str = "INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING";

/// Backlog fields the batch does not carry keep their previous values.
/// An agent's id, read without locking its row.
const AGENT_ID: &str = "SELECT id FROM agents WHERE tenant_id = $1 AND name = $2";

const UPSERT_AGENT: &str = "\
    INSERT INTO agents AS a (tenant_id, name, last_batch_at, last_epoch, \
        backlog_records, backlog_bytes, backlog_oldest_age_secs, dropped_total) \
    VALUES ($1, $2, now(), $3, $4, $5, $6, $7) \
    ON CONFLICT (tenant_id, name) DO UPDATE SET \
        last_seen = now(), \
        last_batch_at = now(), \
        last_epoch = EXCLUDED.last_epoch, \
        backlog_records = COALESCE(EXCLUDED.backlog_records, a.backlog_records), \
        backlog_bytes = COALESCE(EXCLUDED.backlog_bytes, a.backlog_bytes), \
        backlog_oldest_age_secs = \
            COALESCE(EXCLUDED.backlog_oldest_age_secs, a.backlog_oldest_age_secs), \
        dropped_total = COALESCE(EXCLUDED.dropped_total, a.dropped_total) \
    RETURNING id";

/// A known agent's row, updated only if no other transaction holds it. The
/// row is presence data (last seen, backlog), not part of what a batch
/// commits to: while one batch's transaction holds its lock until commit,
/// waiting for it queued every concurrent batch of the agent behind that
/// commit's WAL flush, and one slow fsync became a run of slow acks. A batch
/// that finds the row locked skips the update; the holder writes figures
/// from the same moment.
const TOUCH_AGENT: &str = "\
    UPDATE agents AS a SET \
        last_seen = now(), \
        last_batch_at = now(), \
        last_epoch = $2, \
        backlog_records = COALESCE($3, a.backlog_records), \
        backlog_bytes = COALESCE($4, a.backlog_bytes), \
        backlog_oldest_age_secs = COALESCE($5, a.backlog_oldest_age_secs), \
        dropped_total = COALESCE($6, a.dropped_total) \
    FROM (SELECT id FROM agents WHERE id = $1 FOR UPDATE SKIP LOCKED) AS free \
    WHERE a.id = free.id";

/// Stores the staged records whose key is not stored yet, claims the runs of
/// them that no claim covers, and returns (records stored, high-water mark).
/// Keys are matched without `received_at`: that is what makes a key hold one
/// record whatever the partitioning.
const INSERT_NEW_RECORDS: &str = "\
    WITH ins AS ( \
        INSERT INTO records \
            (agent_id, epoch, seq, tenant_id, record_id, stream, ts, received_at, payload, \
             content_hash) \
        SELECT $1, $2, seq, $3, record_id, stream, ts, received_at, payload, content_hash \
        FROM dcs_staging s \
        WHERE NOT EXISTS (SELECT 1 FROM records r \
            WHERE r.agent_id = $1 AND r.epoch = $2 AND r.seq = s.seq) \
        RETURNING seq), \
    uncovered AS ( \
        SELECT seq, seq - row_number() OVER (ORDER BY seq) AS run FROM ins \
        WHERE NOT EXISTS (SELECT 1 FROM record_ranges k \
            WHERE k.agent_id = $1 AND k.epoch = $2 \
            AND int8range(k.first_seq, k.last_seq, '[]') @> ins.seq)), \
    claimed AS ( \
        INSERT INTO record_ranges (agent_id, epoch, first_seq, last_seq) \
        SELECT $1, $2, min(seq), max(seq) FROM uncovered GROUP BY run \
        RETURNING last_seq) \
    SELECT (SELECT count(*) FROM ins), \
        GREATEST((SELECT max(last_seq) FROM claimed), \
            (SELECT max(last_seq) FROM record_ranges WHERE agent_id = $1 AND epoch = $2))";

/// Staged records whose key is already stored with other content or another
/// `received_at`. Content hashes of rows from before hashes existed (NULL)
/// are not compared.
const CONFLICTING_SEQS: &str = "\
    SELECT s.seq FROM dcs_staging s \
    JOIN records r ON r.agent_id = $1 AND r.epoch = $2 AND r.seq = s.seq \
    WHERE (r.content_hash IS NOT NULL AND r.content_hash <> s.content_hash) \
        OR r.received_at <> s.received_at \
    ORDER BY s.seq";

/// SQLSTATE `read_only_sql_transaction`: a standby, or a primary being demoted.
const READ_ONLY: &str = "25006";

/// Whether a new connection reached a server that can take writes: not a
/// standby in recovery and not set read-only (a Patroni primary being
/// demoted, or `default_transaction_read_only`). The same test libpq's
/// `target_session_attrs=read-write` makes.
const WRITABLE: &str = "SELECT NOT pg_is_in_recovery() \
    AND current_setting('transaction_read_only') = 'off'";

/// Refuses a connection to a server that cannot take writes; the pool's
/// `after_connect` hook, so the pool closes it and keeps trying until its
/// acquire timeout, and batches get 503 meanwhile.
pub(crate) async fn is_writable(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let writable: bool = sqlx::query_scalar(WRITABLE).fetch_one(&mut *conn).await?;
    if writable {
        Ok(())
    } else {
        Err(sqlx::Error::Protocol(
            "the server is read-only (a standby or a primary being demoted)".into(),
        ))
    }
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    /// The write failed before COMMIT was sent: nothing was stored.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// COMMIT was sent and no success came back: the batch may or may not
    /// be stored, so it must not be acknowledged.
    #[error("commit outcome unknown: {0}")]
    CommitOutcomeUnknown(sqlx::Error),
}

impl WriteError {
    /// Whether the connection must be closed rather than returned to the pool.
    fn connection_in_doubt(&self) -> bool {
        match self {
            WriteError::CommitOutcomeUnknown(_) => true,
            WriteError::Database(sqlx::Error::Database(db)) => {
                code_means_wrong_server(db.code().as_deref().unwrap_or(""))
            }
            // A row or a value the client could not decode leaves the
            // connection in step with the server.
            WriteError::Database(
                sqlx::Error::RowNotFound
                | sqlx::Error::ColumnNotFound(_)
                | sqlx::Error::ColumnIndexOutOfBounds { .. }
                | sqlx::Error::ColumnDecode { .. }
                | sqlx::Error::Decode(_)
                | sqlx::Error::TypeNotFound { .. },
            ) => false,
            // An I/O or protocol error (or one we do not know) may have
            // struck mid-COPY or mid-message; the next batch must not
            // inherit this connection.
            WriteError::Database(_) => true,
        }
    }
}

/// SQLSTATEs after which a connection is useless or points at a server that
/// is no longer the writable primary.
fn code_means_wrong_server(code: &str) -> bool {
    code == READ_ONLY || code.starts_with("08") || code.starts_with("57P")
}

/// What a write did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// Committed.
    Stored(BatchAck),
    /// Rolled back: these seqs reuse a stored key with other content.
    Conflict { seqs: Vec<i64> },
}

/// A validated batch, its records already encoded as COPY text rows, so the
/// CPU work happens off the async threads and before a connection is taken.
#[derive(Debug)]
pub(crate) struct PreparedBatch {
    pub epoch: Uuid,
    pub backlog: Option<Backlog>,
    pub records: u64,
    /// The lowest and highest seq; `prepare` refuses batches whose seqs do
    /// not strictly increase, so every record lies in between.
    pub seqs: (i64, i64),
    pub copy_rows: CopyRows,
}

/// Rows in PostgreSQL's COPY text format for the columns of [`COPY_STAGING`],
/// kept without their line ends so the direct path can append the batch-wide
/// columns to each row without rendering the records again.
#[derive(Debug, Default)]
pub(crate) struct CopyRows {
    text: Vec<u8>,
    /// Where each row ends in `text`.
    ends: Vec<usize>,
}

impl CopyRows {
    pub fn with_capacity(bytes: usize) -> Self {
        CopyRows {
            text: Vec::with_capacity(bytes),
            ends: Vec::new(),
        }
    }

    /// `received_us` is part of the stored key (records are partitioned by
    /// it), so it must be the same on every delivery of the record.
    pub fn push(
        &mut self,
        seq: i64,
        record_id: &str,
        stream: &str,
        ts_us: i64,
        received_us: i64,
        payload: &str,
    ) {
        let hash = content_hash(record_id, stream, ts_us, payload);
        let buf = &mut self.text;
        // Writing to a Vec cannot fail.
        let _ = write!(buf, "{seq}\t");
        push_text(buf, record_id);
        buf.push(b'\t');
        push_text(buf, stream);
        buf.push(b'\t');
        push_timestamp(buf, ts_us);
        buf.push(b'\t');
        push_text(buf, payload);
        let _ = write!(buf, "\t{hash}\t");
        push_timestamp(buf, received_us);
        self.ends.push(buf.len());
    }

    /// The COPY data: every row followed by `suffix` and a line end.
    fn render(&self, suffix: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + self.ends.len() * (suffix.len() + 1));
        let mut start = 0;
        for &end in &self.ends {
            out.extend_from_slice(&self.text[start..end]);
            out.extend_from_slice(suffix);
            out.push(b'\n');
            start = end;
        }
        out
    }
}

/// Appends microseconds since the Unix epoch as a `timestamptz` literal in
/// UTC. Done here rather than by PostgreSQL (`'epoch' + n * interval`) so the
/// rows can be copied into `records` as they are. Years before 1 are written
/// the way PostgreSQL reads them (`... BC`); values outside `timestamptz`'s
/// range are left for PostgreSQL to refuse as a data exception.
fn push_timestamp(buf: &mut Vec<u8>, ts_us: i64) {
    const US_PER_DAY: i64 = 86_400_000_000;
    let days = ts_us.div_euclid(US_PER_DAY);
    let of_day = ts_us.rem_euclid(US_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let secs = of_day / 1_000_000;
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let micros = of_day % 1_000_000;
    let (year, era) = if year <= 0 {
        (1 - year, " BC")
    } else {
        (year, "")
    };
    let _ = write!(
        buf,
        "{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}.{micros:06}+00{era}"
    );
}

/// The proleptic Gregorian date (astronomical year, month, day) of a day
/// count from 1970-01-01; Howard Hinnant's `civil_from_days`, exact for every
/// `i64` microsecond timestamp.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A stable 64-bit hash (XXH3) of what a record says. Fields are separated by
/// NUL, which none of them can contain, so different records cannot collide
/// by shifting bytes between fields. Stored in PostgreSQL: never change it.
pub(crate) fn content_hash(record_id: &str, stream: &str, ts_us: i64, payload: &str) -> i64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(record_id.as_bytes());
    h.update(&[0]);
    h.update(stream.as_bytes());
    h.update(&[0]);
    h.update(&ts_us.to_le_bytes());
    h.update(payload.as_bytes());
    h.digest() as i64
}

/// Appends `s` as one COPY text field. Backslash is the escape character and
/// tab/newline/carriage return are delimiters, so exactly those four bytes are
/// escaped; NUL cannot occur (the validators refuse it) and multi-byte UTF-8
/// never contains these bytes, so scanning bytes is correct.
fn push_text(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        buf.extend_from_slice(escaped);
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
}

/// What a failed write means for the agent.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The database cannot take the batch now; the same batch may succeed later.
    Unavailable,
    /// PostgreSQL refused the data itself (SQLSTATE class 22); retrying the
    /// same batch would fail the same way forever.
    Rejected(String),
    /// Anything else: a bug or a schema mismatch.
    Internal,
}

/// What a failed write means for the agent.
pub(crate) fn classify_write(error: &WriteError) -> Failure {
    match error {
        // Whatever PostgreSQL said, the agent must keep the batch and resend.
        WriteError::CommitOutcomeUnknown(_) => Failure::Unavailable,
        WriteError::Database(error) => classify(error),
    }
}

pub(crate) fn classify(error: &sqlx::Error) -> Failure {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => Failure::Unavailable,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or(Cow::Borrowed(""));
            classify_sqlstate(&code, db.message())
        }
        _ => Failure::Internal,
    }
}

fn classify_sqlstate(code: &str, message: &str) -> Failure {
    match code {
        // Data exception: the batch's content, e.g. a timestamp out of range.
        c if c.starts_with("22") => Failure::Rejected(message.to_owned()),
        // Connection exception; insufficient resources (too many connections,
        // disk full); system I/O error.
        c if c.starts_with("08") || c.starts_with("53") || c.starts_with("58") => {
            Failure::Unavailable
        }
        // Serialization failure and deadlock: the retry will go through.
        "40001" | "40P01"
        // Statement timeout or cancel; administrator, crash or startup shutdown.
        | "57014" | "57P01" | "57P02" | "57P03"
        // Read-only transaction: we are talking to a standby after a failover.
        | "25006" => Failure::Unavailable,
        _ => Failure::Internal,
    }
}

/// Writes one batch in one transaction and reports how many records were new.
pub(crate) async fn write_batch(
    pool: &PgPool,
    agent: &AgentIdentity,
    batch: &PreparedBatch,
) -> Result<Written, WriteError> {
    let mut conn = pool.acquire().await?;
    let result = write_in_transaction(&mut conn, agent, batch).await;
    if let Err(error) = &result
        && error.connection_in_doubt()
    {
        conn.close_on_drop();
    }
    result
}

/// How the records of a batch reach `records`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Claim the batch's seq range in `record_ranges`, then `COPY` into
    /// `records`: fails when the claim overlaps an existing one.
    Direct,
    /// `COPY` into staging, then an insert (`WHERE NOT EXISTS`) that skips
    /// stored keys and claims the seq runs no claim covers yet.
    Staged,
}

async fn write_in_transaction(
    conn: &mut PgConnection,
    agent: &AgentIdentity,
    batch: &PreparedBatch,
) -> Result<Written, WriteError> {
    let mut result = attempt(conn, agent, batch, Path::Direct).await;
    for _ in 0..STAGED_ATTEMPTS {
        match &result {
            Err(WriteError::Database(sqlx::Error::Database(db)))
                if matches!(
                    db.code().as_deref(),
                    Some(UNIQUE_VIOLATION | EXCLUSION_VIOLATION)
                ) =>
            {
                tracing::debug!(
                    message = "batch overlaps claimed seqs, writing it through staging",
                    agent = %agent,
                    epoch = %batch.epoch
                );
                result = attempt(conn, agent, batch, Path::Staged).await;
            }
            _ => break,
        }
    }
    result
}

/// What one transaction found, before it commits or rolls back.
enum Steps {
    Stored { accepted: u64, high_seq: i64 },
    Conflict(Vec<i64>),
}

async fn attempt(
    conn: &mut PgConnection,
    agent: &AgentIdentity,
    batch: &PreparedBatch,
    path: Path,
) -> Result<Written, WriteError> {
    let mut tx = conn.begin().await?;
    match write_steps(&mut tx, agent, batch, path).await {
        Ok(Steps::Conflict(seqs)) => {
            tx.rollback().await?;
            Ok(Written::Conflict { seqs })
        }
        Ok(Steps::Stored { accepted, high_seq }) => {
            if let Err(error) = tx.commit().await {
                tracing::warn!(
                    message = "commit outcome unknown, batch not acknowledged",
                    %error,
                    agent = %agent,
                    epoch = %batch.epoch
                );
                return Err(WriteError::CommitOutcomeUnknown(error));
            }
            Ok(Written::Stored(BatchAck {
                accepted,
                duplicates: batch.records.saturating_sub(accepted),
                high_seq: Some(high_seq),
                replay: None,
            }))
        }
        Err(error) => {
            // After a database error the connection is in a clean (aborted)
            // transaction; roll back now rather than on the next checkout.
            if matches!(error, sqlx::Error::Database(_))
                && let Err(rollback) = tx.rollback().await
            {
                tracing::warn!(message = "rollback failed", error = %rollback, agent = %agent);
            }
            Err(error.into())
        }
    }
}

async fn write_steps(
    tx: &mut Transaction<'_, Postgres>,
    agent: &AgentIdentity,
    batch: &PreparedBatch,
    path: Path,
) -> Result<Steps, sqlx::Error> {
    sqlx::query(UPSERT_TENANT)
        .bind(&agent.tenant)
        .execute(&mut **tx)
        .await?;
    // The agent's row lock is held until commit: taken first, it made an
    // agent's concurrent batches wait for each other's whole COPY (the
    // ack-latency step queued up behind it). A known agent's row is
    // therefore touched last and never waited for (TOUCH_AGENT); only an
    // agent's very first batch creates it first.
    let known: Option<i64> = sqlx::query_scalar(AGENT_ID)
        .bind(&agent.tenant)
        .bind(&agent.agent)
        .fetch_optional(&mut **tx)
        .await?;
    let agent_id = match known {
        Some(id) => id,
        None => upsert_agent(tx, agent, batch).await?,
    };
    let steps = write_records(tx, agent, batch, path, agent_id).await?;
    if known.is_some() && matches!(steps, Steps::Stored { .. }) {
        touch_agent(tx, agent_id, batch).await?;
    }
    Ok(steps)
}

async fn upsert_agent(
    tx: &mut Transaction<'_, Postgres>,
    agent: &AgentIdentity,
    batch: &PreparedBatch,
) -> Result<i64, sqlx::Error> {
    let backlog = batch.backlog.as_ref();
    sqlx::query_scalar(UPSERT_AGENT)
        .bind(&agent.tenant)
        .bind(&agent.agent)
        .bind(batch.epoch)
        .bind(backlog.map(|b| clamp(b.records)))
        .bind(backlog.map(|b| clamp(b.bytes)))
        .bind(backlog.map(|b| clamp(b.oldest_age_secs)))
        .bind(backlog.map(|b| clamp(b.dropped_total)))
        .fetch_one(&mut **tx)
        .await
}

async fn touch_agent(
    tx: &mut Transaction<'_, Postgres>,
    agent_id: i64,
    batch: &PreparedBatch,
) -> Result<(), sqlx::Error> {
    let backlog = batch.backlog.as_ref();
    sqlx::query(TOUCH_AGENT)
        .bind(agent_id)
        .bind(batch.epoch)
        .bind(backlog.map(|b| clamp(b.records)))
        .bind(backlog.map(|b| clamp(b.bytes)))
        .bind(backlog.map(|b| clamp(b.oldest_age_secs)))
        .bind(backlog.map(|b| clamp(b.dropped_total)))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn write_records(
    tx: &mut Transaction<'_, Postgres>,
    agent: &AgentIdentity,
    batch: &PreparedBatch,
    path: Path,
    agent_id: i64,
) -> Result<Steps, sqlx::Error> {
    if path == Path::Direct {
        // The claim comes before the COPY: an overlap fails it at the cost
        // of one row, not of the whole batch's rows.
        let high_seq: i64 = sqlx::query_scalar(CLAIM_RANGE)
            .bind(agent_id)
            .bind(batch.epoch)
            .bind(batch.seqs.0)
            .bind(batch.seqs.1)
            .fetch_one(&mut **tx)
            .await?;
        let mut suffix = Vec::with_capacity(64);
        let _ = write!(suffix, "\t{agent_id}\t{}\t", batch.epoch);
        push_text(&mut suffix, &agent.tenant);
        let accepted = copy_in(tx, COPY_RECORDS, &batch.copy_rows.render(&suffix)).await?;
        return Ok(Steps::Stored { accepted, high_seq });
    }
    sqlx::query(LOCK_EPOCH)
        .bind(agent_id)
        .bind(batch.epoch)
        .execute(&mut **tx)
        .await?;
    sqlx::raw_sql(CREATE_STAGING).execute(&mut **tx).await?;
    copy_in(tx, COPY_STAGING, &batch.copy_rows.render(b"")).await?;
    let conflicts: Vec<i64> = sqlx::query_scalar(CONFLICTING_SEQS)
        .bind(agent_id)
        .bind(batch.epoch)
        .fetch_all(&mut **tx)
        .await?;
    if !conflicts.is_empty() {
        return Ok(Steps::Conflict(conflicts));
    }
    let (accepted, high_seq): (i64, i64) = sqlx::query_as(INSERT_NEW_RECORDS)
        .bind(agent_id)
        .bind(batch.epoch)
        .bind(&agent.tenant)
        .fetch_one(&mut **tx)
        .await?;
    Ok(Steps::Stored {
        accepted: accepted.max(0) as u64,
        high_seq,
    })
}

/// The highest seq stored for the agent's `epoch`, if any: what an agent
/// asks before it sends, to learn whether its buffer is behind.
pub(crate) async fn high_seq(
    pool: &PgPool,
    agent: &AgentIdentity,
    epoch: Uuid,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(HIGH_SEQ)
        .bind(&agent.tenant)
        .bind(&agent.agent)
        .bind(epoch)
        .fetch_one(pool)
        .await
}

async fn copy_in(
    tx: &mut Transaction<'_, Postgres>,
    statement: &str,
    data: &[u8],
) -> Result<u64, sqlx::Error> {
    let mut copy = tx.copy_in_raw(statement).await?;
    match copy.send(data).await {
        // Bad data is reported only here, by finish(), which also consumes the
        // server's final message and leaves the connection ready either way.
        Ok(_) => copy.finish().await,
        Err(error) => {
            if let Err(abort) = copy.abort("dcs-aggregator: sending COPY data failed").await {
                tracing::debug!(message = "COPY abort failed", error = %abort);
            }
            Err(error)
        }
    }
}

/// Backlog counters are u64 on the wire and int8 in the database; a value past
/// i64::MAX is absurd and is stored as the maximum rather than refused.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_escape_exactly_the_four_special_bytes() {
        let mut rows = CopyRows::default();
        rows.push(
            7,
            "id\twith\ttabs",
            "s.t",
            -5,
            -5,
            "{\"a\":\"x\\\"y\\\\z\",\n\r\"b\":\"ü\"}",
        );
        let hash = content_hash(
            "id\twith\ttabs",
            "s.t",
            -5,
            "{\"a\":\"x\\\"y\\\\z\",\n\r\"b\":\"ü\"}",
        );
        assert_eq!(
            std::str::from_utf8(&rows.render(b"")).unwrap(),
            format!(
                "7\tid\\twith\\ttabs\ts.t\t1969-12-31 23:59:59.999995+00\t{{\"a\":\"x\\\\\"y\\\\\\\\z\",\\n\\r\"b\":\"ü\"}}\t{hash}\t1969-12-31 23:59:59.999995+00\n"
            )
        );
    }

    #[test]
    fn the_direct_path_appends_the_batch_columns_to_every_row() {
        let mut rows = CopyRows::default();
        rows.push(1, "a", "s", 0, 0, "{}");
        rows.push(2, "b", "s", 1, 1, "{}");
        let text = String::from_utf8(rows.render(b"\tX")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("1\ta\ts\t1970-01-01 00:00:00.000000+00\t{}\t"));
        assert!(lines[1].starts_with("2\tb\ts\t1970-01-01 00:00:00.000001+00\t{}\t"));
        assert!(lines.iter().all(|l| l.ends_with("\tX")), "{text}");
    }

    #[test]
    fn timestamps_are_written_as_utc_literals_in_every_era() {
        let text = |us: i64| {
            let mut buf = Vec::new();
            push_timestamp(&mut buf, us);
            String::from_utf8(buf).unwrap()
        };
        assert_eq!(text(0), "1970-01-01 00:00:00.000000+00");
        assert_eq!(text(-1), "1969-12-31 23:59:59.999999+00");
        assert_eq!(text(951_782_400_000_000), "2000-02-29 00:00:00.000000+00");
        assert_eq!(
            text(253_402_300_799_999_999),
            "9999-12-31 23:59:59.999999+00"
        );
        // Year 0 is 1 BC, as PostgreSQL reads it.
        assert_eq!(
            text(-62_167_219_200_000_000),
            "0001-01-01 00:00:00.000000+00 BC"
        );
        assert_eq!(
            text(-62_135_596_800_000_000),
            "0001-01-01 00:00:00.000000+00"
        );
        // Every i64 renders (PostgreSQL refuses what timestamptz cannot hold).
        assert!(text(i64::MIN).ends_with(" BC"));
        assert!(text(i64::MAX).starts_with("294247-01-10"));
    }

    #[test]
    fn timestamps_agree_with_rfc3339_formatting() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            // Years 1 to 9999, the range RFC 3339 can express.
            let us = rng.i64(-62_135_596_800_000_000..253_402_300_800_000_000);
            let mut buf = Vec::new();
            push_timestamp(&mut buf, us);
            let ours = String::from_utf8(buf).unwrap();
            let rfc = dcs_shared::record::format_ts(us);
            // "YYYY-MM-DDTHH:MM:SS[.frac]Z" vs "YYYY-MM-DD HH:MM:SS.ffffff+00"
            let expected = format!("{} {}", &rfc[..10], &rfc[11..19]);
            assert_eq!(&ours[..19], expected, "{us}");
            assert_eq!(
                ours[20..26].parse::<i64>().unwrap(),
                us.rem_euclid(1_000_000)
            );
        }
    }

    #[test]
    fn a_field_that_is_only_special_bytes_is_fully_escaped() {
        let mut buf = Vec::new();
        push_text(&mut buf, "\\\n");
        assert_eq!(buf, b"\\\\\\n");
        buf.clear();
        push_text(&mut buf, "");
        assert!(buf.is_empty());
    }

    #[test]
    fn data_exceptions_are_permanent_and_outages_are_transient() {
        assert_eq!(
            classify_sqlstate("22008", "timestamp out of range"),
            Failure::Rejected("timestamp out of range".into())
        );
        assert_eq!(
            classify_sqlstate("22P02", "bad json"),
            Failure::Rejected("bad json".into())
        );
        for code in [
            "08006", "53300", "57P01", "57P03", "40001", "40P01", "25006",
        ] {
            assert_eq!(classify_sqlstate(code, ""), Failure::Unavailable, "{code}");
        }
        assert_eq!(
            classify_sqlstate("42P01", "no such table"),
            Failure::Internal
        );
        assert_eq!(classify(&sqlx::Error::PoolTimedOut), Failure::Unavailable);
        assert_eq!(classify(&sqlx::Error::RowNotFound), Failure::Internal);
    }

    #[test]
    fn connections_to_a_read_only_or_dying_server_are_never_reused() {
        for code in ["25006", "57P01", "57P02", "57P03", "08006", "08003"] {
            assert!(code_means_wrong_server(code), "{code}");
        }
        for code in ["23505", "23P01", "22008", "40001", "42P01"] {
            assert!(!code_means_wrong_server(code), "{code}");
        }
        let io = || sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(WriteError::Database(io()).connection_in_doubt());
        assert!(WriteError::CommitOutcomeUnknown(io()).connection_in_doubt());
        assert!(!WriteError::Database(sqlx::Error::RowNotFound).connection_in_doubt());
    }

    #[test]
    fn a_commit_without_an_answer_is_never_acknowledged_and_never_dead_lettered() {
        // Even an error that would mean a bug elsewhere: the batch may be
        // stored, so the only safe answer is "resend" (503).
        for error in [
            sqlx::Error::RowNotFound,
            sqlx::Error::Protocol("unexpected message".into()),
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        ] {
            assert_eq!(
                classify_write(&WriteError::CommitOutcomeUnknown(error)),
                Failure::Unavailable
            );
        }
    }

    #[test]
    fn huge_backlog_counters_are_clamped() {
        assert_eq!(clamp(5), 5);
        assert_eq!(clamp(u64::MAX), i64::MAX);
    }

    #[test]
    fn the_content_hash_is_stable_and_covers_every_field() {
        let h = content_hash("id-1", "s", 5, r#"{"a":1}"#);
        // Stored in PostgreSQL: a new value here breaks every stored row.
        assert_eq!(h, PINNED_HASH);
        assert_ne!(h, content_hash("id-2", "s", 5, r#"{"a":1}"#));
        assert_ne!(h, content_hash("id-1", "t", 5, r#"{"a":1}"#));
        assert_ne!(h, content_hash("id-1", "s", 6, r#"{"a":1}"#));
        assert_ne!(h, content_hash("id-1", "s", 5, r#"{"a":2}"#));
        // Bytes cannot slide between fields.
        assert_ne!(
            content_hash("ab", "c", 0, "{}"),
            content_hash("a", "bc", 0, "{}")
        );
    }

    const PINNED_HASH: i64 = 7_326_308_207_649_593_802;
}
