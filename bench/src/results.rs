//! What one run records, step by step, and the document `--out` writes.

use serde::Serialize;
use sqlx::Connection as _;

use crate::meter::{CpuPerRecord, ProcSample, Usage};
use crate::summary;
use crate::sys::Machine;
use crate::{Sizes, freshness};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct CopyResult {
    /// `records` (the production table) or `bare` (same columns, no keys).
    pub(crate) table: String,
    pub(crate) connections: usize,
    pub(crate) records: u64,
    pub(crate) secs: f64,
    pub(crate) records_per_s: f64,
    pub(crate) mib_per_s: f64,
    pub(crate) cpu: CpuPerRecord,
    pub(crate) usage: Usage,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct IngestResult {
    pub(crate) durability: String,
    pub(crate) records: u64,
    pub(crate) secs: f64,
    pub(crate) records_per_s: f64,
    pub(crate) request_p50_ms: f64,
    pub(crate) request_p99_ms: f64,
    pub(crate) agent_peak_rss_mb: Option<f64>,
    pub(crate) cpu: CpuPerRecord,
    pub(crate) usage: Usage,
}

/// Syslog over TCP into the agent's `[[syslog]]` listener, measured like
/// the NDJSON ingest step: until the agent has committed every message.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SyslogResult {
    pub(crate) durability: String,
    pub(crate) messages: u64,
    pub(crate) connections: usize,
    pub(crate) secs: f64,
    pub(crate) messages_per_s: f64,
    pub(crate) agent_peak_rss_mb: Option<f64>,
    pub(crate) usage: Usage,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct E2eResult {
    pub(crate) records: u64,
    /// First send until the last row was seen committed.
    pub(crate) secs: f64,
    /// First send until the agent acknowledged the last request.
    pub(crate) ingest_secs: f64,
    pub(crate) records_per_s: f64,
    pub(crate) ratio_to_copy: Option<f64>,
    pub(crate) agent_peak_rss_mb: Option<f64>,
    pub(crate) aggregator_peak_rss_mb: Option<f64>,
    /// The agent started and healthy, before any traffic (2 s after start).
    pub(crate) agent_idle: ProcSample,
    /// The maximum of 200 ms samples while records flowed.
    pub(crate) agent_busy: ProcSample,
    pub(crate) cpu: CpuPerRecord,
    pub(crate) usage: Usage,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct DrainResult {
    pub(crate) records: u64,
    /// Aggregator listening until the last row was seen committed.
    pub(crate) secs: f64,
    pub(crate) records_per_s: f64,
    /// VmHWM reset when the aggregator starts, read after the drain.
    pub(crate) agent_peak_rss_mb: Option<f64>,
    /// VmHWM over the agent's whole life (buffering included).
    pub(crate) agent_peak_rss_mb_lifetime: Option<f64>,
    pub(crate) fill_secs: f64,
    /// Process start until the aggregator accepted connections (not in `secs`).
    pub(crate) aggregator_start_secs: f64,
    /// The maximum of 200 ms samples while draining.
    pub(crate) agent_busy: ProcSample,
    pub(crate) cpu: CpuPerRecord,
    pub(crate) usage: Usage,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct LatencyResult {
    pub(crate) target_records_per_s: f64,
    pub(crate) batch_records: usize,
    pub(crate) batches: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) mean_ms: f64,
    pub(crate) errors: usize,
    /// Batches slower than the 50 ms target: with the p99 the second-slowest
    /// of a few hundred, their count says more than the p99 alone.
    pub(crate) slow_batches: usize,
    /// Each measured batch's latency in send order, for spotting periodic stalls.
    pub(crate) series_ms: Vec<f64>,
    /// What the PostgreSQL server did during the step, to tell its own I/O
    /// stalls (checkpoints, new WAL segments) from ours.
    pub(crate) server: Option<ServerActivity>,
    pub(crate) usage: Usage,
}

/// Server-wide PostgreSQL counters over one step (differences).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ServerActivity {
    pub(crate) checkpoints_timed: i64,
    pub(crate) checkpoints_requested: i64,
    pub(crate) buffers_checkpoint: i64,
    /// Dirty pages the server's own backends had to write out to make room
    /// (shared_buffers too small for the load): each is a write in the
    /// middle of someone's COPY.
    pub(crate) buffers_backend: i64,
    pub(crate) buffers_backend_fsync: i64,
    pub(crate) wal_bytes: i64,
    pub(crate) wal_full_page_images: i64,
    pub(crate) wal_buffers_full: i64,
    /// Milliseconds spent writing and syncing WAL (zero unless the server
    /// has `track_wal_io_timing`, as the bench's private clusters do).
    pub(crate) wal_write_ms: f64,
    pub(crate) wal_sync_ms: f64,
    /// Files in `pg_wal` before and after: growth means segments were
    /// created (and zero-filled) during the step rather than recycled.
    pub(crate) wal_files_before: i64,
    pub(crate) wal_files_after: i64,
}

impl ServerActivity {
    pub(crate) async fn snapshot(admin_url: &str) -> anyhow::Result<ServerActivity> {
        let mut conn = sqlx::PgConnection::connect(admin_url).await?;
        let (
            checkpoints_timed,
            checkpoints_requested,
            buffers_checkpoint,
            buffers_backend,
            buffers_backend_fsync,
        ): (i64, i64, i64, i64, i64) = sqlx::query_as(
            "SELECT checkpoints_timed, checkpoints_req, buffers_checkpoint, buffers_backend, \
                    buffers_backend_fsync \
             FROM pg_stat_bgwriter",
        )
        .fetch_one(&mut conn)
        .await?;
        let (wal_bytes, wal_full_page_images, wal_buffers_full, wal_write_ms, wal_sync_ms): (
            i64,
            i64,
            i64,
            f64,
            f64,
        ) = sqlx::query_as(
            "SELECT wal_bytes::int8, wal_fpi, wal_buffers_full, wal_write_time, wal_sync_time \
             FROM pg_stat_wal",
        )
        .fetch_one(&mut conn)
        .await?;
        let wal_files: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_ls_waldir()")
            .fetch_one(&mut conn)
            .await?;
        let _ = conn.close().await;
        Ok(ServerActivity {
            checkpoints_timed,
            checkpoints_requested,
            buffers_checkpoint,
            buffers_backend,
            buffers_backend_fsync,
            wal_bytes,
            wal_full_page_images,
            wal_buffers_full,
            wal_write_ms,
            wal_sync_ms,
            wal_files_before: wal_files,
            wal_files_after: wal_files,
        })
    }

    pub(crate) fn since(&self, before: &ServerActivity) -> ServerActivity {
        ServerActivity {
            checkpoints_timed: self.checkpoints_timed - before.checkpoints_timed,
            checkpoints_requested: self.checkpoints_requested - before.checkpoints_requested,
            buffers_checkpoint: self.buffers_checkpoint - before.buffers_checkpoint,
            buffers_backend: self.buffers_backend - before.buffers_backend,
            buffers_backend_fsync: self.buffers_backend_fsync - before.buffers_backend_fsync,
            wal_bytes: self.wal_bytes - before.wal_bytes,
            wal_full_page_images: self.wal_full_page_images - before.wal_full_page_images,
            wal_buffers_full: self.wal_buffers_full - before.wal_buffers_full,
            wal_write_ms: self.wal_write_ms - before.wal_write_ms,
            wal_sync_ms: self.wal_sync_ms - before.wal_sync_ms,
            wal_files_before: before.wal_files_before,
            wal_files_after: self.wal_files_after,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct LevelResult {
    pub(crate) level: u32,
    pub(crate) records: u64,
    pub(crate) wire_bytes_per_record: f64,
    pub(crate) ratio_to_raw: f64,
    /// `wire::encode_batch` throughput, raw JSON MiB per second of one core.
    pub(crate) encode_mib_per_s: f64,
    /// The same JSON rendered into memory first and gzipped in one write:
    /// what encode_batch could reach (see docs/PERFORMANCE.md).
    pub(crate) one_shot_mib_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct WireResult {
    pub(crate) records: u64,
    pub(crate) batch_records: usize,
    pub(crate) level: u32,
    pub(crate) raw_bytes_per_record: f64,
    pub(crate) wire_bytes_per_record: f64,
    pub(crate) ratio_to_raw: f64,
    /// Other levels over (up to) the first 200,000 records, for the knob.
    pub(crate) levels: Vec<LevelResult>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunConfig {
    pub(crate) duration_s: f64,
    pub(crate) runs: usize,
    pub(crate) sizes: Option<Sizes>,
    pub(crate) record_bytes: usize,
    pub(crate) raw_bytes_per_record: f64,
    pub(crate) clients: usize,
    pub(crate) request_records: u64,
    pub(crate) agent_max_in_flight: usize,
    pub(crate) agent_compression_level: u32,
    pub(crate) agent_max_records: usize,
    pub(crate) agent_linger_ms: u64,
    pub(crate) aggregator_max_connections: Option<u32>,
    pub(crate) pg_synchronous_commit: Option<String>,
    pub(crate) skip: Vec<String>,
}

/// One run of every step.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Results {
    pub(crate) started_unix: u64,
    pub(crate) load_avg_1m_start: f64,
    pub(crate) load_avg_1m_end: f64,
    /// COPY into `records` over 1, 2 and 4 connections, then into a bare table.
    pub(crate) copy: Vec<CopyResult>,
    pub(crate) ingest: Vec<IngestResult>,
    pub(crate) syslog: Option<SyslogResult>,
    /// OTLP/HTTP protobuf log batches acked to disk (durability process-crash).
    pub(crate) otlp: Option<IngestResult>,
    pub(crate) e2e: Option<E2eResult>,
    pub(crate) drain: Option<DrainResult>,
    /// Default batching first, then the linger/batch sweep.
    pub(crate) freshness: Vec<freshness::FreshnessResult>,
    pub(crate) latency: Option<LatencyResult>,
    pub(crate) wire: Option<WireResult>,
    pub(crate) dcs_edge_binary_bytes: u64,
    pub(crate) dcs_aggregator_binary_bytes: u64,
    /// After `strip` (the release profile keeps line tables), when strip exists.
    pub(crate) dcs_edge_stripped_bytes: Option<u64>,
    pub(crate) dcs_aggregator_stripped_bytes: Option<u64>,
    pub(crate) noisy_steps: Vec<String>,
}

impl Results {
    /// The physical limit: the fastest COPY into the production table.
    pub(crate) fn best_copy(&self) -> Option<&CopyResult> {
        self.copy
            .iter()
            .filter(|c| c.table == "records")
            .max_by(|a, b| a.records_per_s.total_cmp(&b.records_per_s))
    }
}

/// What `--out` holds: the runs, their headline and the targets.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BenchDoc {
    pub(crate) label: Option<String>,
    pub(crate) commit: String,
    /// When the last run ended.
    pub(crate) date_utc: String,
    pub(crate) machine: Machine,
    pub(crate) config: RunConfig,
    pub(crate) headline: Vec<summary::Headline>,
    pub(crate) targets: Vec<summary::TargetLine>,
    pub(crate) runs: Vec<Results>,
}
