//! The COPY steps: rows straight into PostgreSQL over one or more
//! connections, into `records` and into a bare table, the physical limit the
//! pipeline is compared with.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, ensure};
use bytes::Bytes;
use sqlx::Connection as _;

use crate::meter::{CpuPerRecord, Meter};
use crate::results::CopyResult;
use crate::world::World;

/// COPY data is sent in chunks of about this size.
const COPY_CHUNK: usize = 1 << 20;

/// The table the bare-COPY reference writes: the same columns as `records`,
/// no primary key, no index, no partitions.
const BARE_TABLE: &str = "bare_records";

impl World {
    /// COPY text of records `0..n` in ~1 MiB chunks of whole rows; rendered
    /// once (a later, larger `n` renders again).
    async fn copy_chunks(&self, n: u64) -> anyhow::Result<Arc<Vec<Bytes>>> {
        if let Some((rows, c)) = self.copy_chunks.lock().expect("lock").as_ref()
            && *rows >= n
        {
            return Ok(c.clone());
        }
        let generator = self.generator;
        let chunks = tokio::task::spawn_blocking(move || {
            let epoch = uuid::Uuid::new_v4();
            let mut chunks = Vec::new();
            let mut buf = Vec::with_capacity(COPY_CHUNK + 4096);
            for i in 0..n {
                let r = generator.record(i);
                use std::io::Write as _;
                let _ = write!(buf, "1\t{epoch}\t{}\tbench\t", i + 1);
                copy_text(&mut buf, &r.id);
                buf.push(b'\t');
                copy_text(&mut buf, r.stream);
                buf.push(b'\t');
                buf.extend_from_slice(dcs_shared::record::format_ts(r.ts_us).as_bytes());
                buf.push(b'\t');
                copy_text(&mut buf, &r.payload);
                buf.push(b'\n');
                if buf.len() >= COPY_CHUNK {
                    let full = std::mem::replace(&mut buf, Vec::with_capacity(COPY_CHUNK + 4096));
                    chunks.push(Bytes::from(full));
                }
            }
            if !buf.is_empty() {
                chunks.push(Bytes::from(buf));
            }
            chunks
        })
        .await?;
        let chunks = Arc::new(chunks);
        *self.copy_chunks.lock().expect("lock") = Some((n, chunks.clone()));
        Ok(chunks)
    }
}

/// Rows in a chunk of COPY text (escaped newlines are `\n`, two bytes).
fn bytecount_rows(chunk: &[u8]) -> u64 {
    chunk.iter().filter(|&&b| b == b'\n').count() as u64
}

/// Step 2: COPY of `n` rows into `records` (same table and indexes as production)
/// or, with `bare`, into a table with its columns only, over `connections`
/// concurrent connections (each its own transaction, as the aggregator's
/// concurrent batches are), commits included.
pub(crate) async fn step_copy(
    w: &World,
    n: u64,
    connections: usize,
    bare: bool,
) -> anyhow::Result<CopyResult> {
    let db = w.database().await?;
    let all = w.copy_chunks(n).await?;
    // The first chunks holding n rows, dealt out to the connections in turn.
    let mut rows = 0;
    let mut parts: Vec<Vec<Bytes>> = vec![Vec::new(); connections.max(1)];
    for (k, chunk) in all.iter().enumerate() {
        if rows >= n {
            break;
        }
        rows += bytecount_rows(chunk);
        let slots = parts.len();
        parts[k % slots].push(chunk.clone());
    }
    let table = if bare { BARE_TABLE } else { "records" };
    if bare {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {BARE_TABLE} (LIKE records INCLUDING DEFAULTS)"
        )))
        .execute(&db.pool)
        .await?;
    }
    let mut conns = Vec::new();
    for _ in 0..parts.len() {
        let mut conn = sqlx::PgConnection::connect(&db.url).await?;
        if let Some(mode) = &w.args.pg_synchronous_commit {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "SET synchronous_commit = {mode}"
            )))
            .execute(&mut conn)
            .await?;
        }
        conns.push(conn);
    }
    let bytes: u64 = parts.iter().flatten().map(|c| c.len() as u64).sum();
    let meter = Meter::start(None, None).with_db(db.name());
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (mut conn, part) in conns.into_iter().zip(parts) {
        let statement = format!(
            "COPY {table} (agent_id, epoch, seq, tenant_id, record_id, stream, ts, payload) \
             FROM STDIN"
        );
        tasks.spawn(async move {
            let mut copy = conn.copy_in_raw(&statement).await?;
            for chunk in part {
                if let Err(e) = copy.send(chunk).await {
                    let _ = copy.abort("dcs-bench: send failed").await;
                    return Err(anyhow::Error::from(e));
                }
            }
            let written = copy.finish().await?;
            anyhow::Ok((written, conn))
        });
    }
    let mut written = 0;
    let mut open = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (rows, conn) = done.context("COPY task")??;
        written += rows;
        open.push(conn);
    }
    let secs = t0.elapsed().as_secs_f64();
    // Connections stay open until the backends' CPU is read: an exited
    // backend's time is no longer charged to the database.
    let usage = meter.stop();
    for conn in open {
        let _ = conn.close().await;
    }
    ensure!(
        written == rows,
        "COPY wrote {written} rows, expected {rows}"
    );
    drop(db);
    Ok(CopyResult {
        table: table.to_owned(),
        connections,
        records: rows,
        secs,
        records_per_s: rows as f64 / secs,
        mib_per_s: bytes as f64 / secs / (1 << 20) as f64,
        cpu: CpuPerRecord::of(&usage, rows),
        usage,
    })
}

/// One COPY text field: backslash, tab, newline and carriage return escaped.
fn copy_text(buf: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            _ => buf.push(b),
        }
    }
}
