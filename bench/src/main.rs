//! `dcs-bench`: one-machine performance benchmark of the whole DCS pipeline.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p dcs-bench -- [--records N] [--record-bytes B] [--out FILE.json] [--skip STEP,...]
//! ```
//!
//! Steps (names for `--skip`), in the order they run:
//! - `copy`: PostgreSQL COPY into `records` over one connection, the physical
//!   limit, then into a bare table over the fastest connection count;
//!   `copy-parallel` adds 2 and 4 connections.
//! - `ingest`: the agent acking NDJSON to disk at both durabilities;
//!   `power-loss` skips only that one.
//! - `syslog`: octet-counted RFC 5424 messages over TCP into a syslog
//!   listener, compared with the NDJSON ingest.
//! - `otlp`: the agent acking OTLP/HTTP protobuf log batches on `/v1/logs`,
//!   compared with the NDJSON ingest.
//! - `e2e`: agent + aggregator + PostgreSQL.
//! - `drain`: backlog drain.
//! - `freshness`: producer 2xx to a queryable row, at half the e2e rate
//!   (or `--ack-rate`); `freshness-sweep` (left out by `--quick`) repeats it
//!   under other batch settings.
//! - `latency`: batch ack latency at half the e2e rate (or `--ack-rate`).
//! - `wire`: compressed bytes per record.
//!
//! Every service is a real release process from target/release;
//! PostgreSQL is by default the shared server (`DCS_TEST_PG_URL`, see
//! `--pg-cluster`), one fresh database per step. See docs/PERFORMANCE.md for
//! what the figures mean.

mod freshness;
mod otlp;
mod records;
mod summary;
mod sweep;
mod sys;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use serde::Serialize;
use sqlx::{Connection as _, PgPool};

use dcs_shared::wire::{self, Backlog, OutRecord};
use dcs_tests::pg::TestDb;
use dcs_tests::pki::{AgentCert, Pki};
use dcs_tests::process::{Service, binary, free_port};

use records::Generator;
use sys::{Machine, MachineCpu, ProcSnapshot};

const STEPS: &[&str] = &[
    "copy",
    "copy-parallel",
    "ingest",
    "power-loss",
    "syslog",
    "e2e",
    "drain",
    "freshness",
    "freshness-sweep",
    "latency",
    "wire",
    "otlp",
];
/// Records per batch in the wire-size step (the agent's default batch size).
const WIRE_BATCH: usize = dcs_edge::config::DEFAULT_BATCH_MAX_RECORDS;
/// Records per setting in `--sweep` without `--records`.
const SWEEP_RECORDS: u64 = 200_000;
/// Records the wire step encodes (at most): a CPU-bound computation, not timed.
const WIRE_RECORDS: u64 = 200_000;
/// Records per pre-encoded batch in the latency step.
const LATENCY_BATCH: usize = 1_000;
/// Requests sent (unmeasured) before the latency measurement starts.
const LATENCY_WARMUP: usize = 3;
/// COPY data is sent in chunks of about this size.
const COPY_CHUNK: usize = 1 << 20;
/// Data sets up to this many raw bytes are generated once, before any timing;
/// larger ones are generated while they are sent.
/// 2 GiB: a 20-second ingest step at 350,000 records/s is 7M records (1.4 GB);
/// generating them while sending would put the generator's CPU into the figure.
const CACHE_LIMIT: u64 = 2 << 30;
/// Poll interval for "all rows committed".
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Parser)]
#[command(
    name = "dcs-bench",
    about = "DCS one-machine performance benchmark",
    args_override_self = true
)]
struct Args {
    /// Records per step, the same for every step; without it each step's
    /// count is sized by a calibration so that it runs about --duration.
    #[arg(long)]
    records: Option<u64>,
    /// Seconds each throughput step should run (COPY, ingest, end to end,
    /// drain, freshness, latency); one hiccup moves a 2-second figure by 30%.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Runs of all steps; the headline is their median and min-max.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// A smoke run: 2-second steps, one run, no freshness sweep.
    #[arg(long)]
    quick: bool,
    /// Approximate size of one record's JSON line.
    #[arg(long, default_value_t = 200)]
    record_bytes: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Steps to leave out: copy, copy-parallel, ingest, power-loss, syslog,
    /// otlp, e2e, drain, freshness, freshness-sweep, latency, wire.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Concurrent producer connections to the agent.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Records per producer request (NDJSON).
    #[arg(long, default_value_t = 1_000)]
    request_records: u64,
    /// Agent knob batch.max_in_flight (DCS_EDGE_BATCH__MAX_IN_FLIGHT).
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Agent knob batch.compression_level, 0-9 (also used by the wire step).
    #[arg(long)]
    compression_level: Option<u32>,
    /// Agent knob batch.max_records.
    #[arg(long)]
    max_records: Option<usize>,
    /// Agent knob batch.linger in milliseconds.
    #[arg(long)]
    linger_ms: Option<u64>,
    /// Aggregator knob database.max_connections.
    #[arg(long)]
    agg_max_connections: Option<u32>,
    /// PostgreSQL synchronous_commit for the step's database (on, off, local...).
    #[arg(long)]
    pg_synchronous_commit: Option<String>,
    /// Aggregator log level (debug logs every batch with its server-side time).
    #[arg(long)]
    agg_log_level: Option<String>,
    /// Which PostgreSQL: `shared` (the server at DCS_TEST_PG_URL, default),
    /// `private` (a fresh cluster of our own, stock settings) or `tuned` (a
    /// fresh cluster with the settings of docs/PERFORMANCE.md).
    #[arg(long, default_value = "shared", value_parser = ["shared", "private", "tuned"])]
    pg_cluster: String,
    /// Extra `name=value` settings for a private or tuned cluster, applied
    /// last (repeatable), e.g. `--pg-set wal_init_zero=off`.
    #[arg(long = "pg-set", value_name = "NAME=VALUE")]
    pg_set: Vec<String>,
    /// Paced rate (records/s) for the latency step instead of half the e2e rate.
    #[arg(long)]
    ack_rate: Option<f64>,
    /// How long the latency step sends, in seconds (rate × seconds / 1000
    /// batches, generated by the step itself whatever --records says).
    /// (Default: --duration.)
    #[arg(long)]
    latency_secs: Option<f64>,
    /// A name for this run, kept in the JSON (e.g. "max_in_flight=4").
    #[arg(long)]
    label: Option<String>,
    /// Instead of the steps: measure e2e (and ack latency) under each tuning
    /// knob setting, `--sweep-repeats` times each, interleaved, and print medians.
    #[arg(long)]
    sweep: bool,
    /// Repeats per setting in `--sweep`.
    #[arg(long, default_value_t = 3)]
    sweep_repeats: usize,
    /// Profile the e2e step: `perf record -a -g` (whole machine, so PostgreSQL
    /// is included) into DIR/e2e.perf.data; needs `perf` (Debian: linux-perf).
    #[arg(long)]
    perf_dir: Option<PathBuf>,
}

impl Args {
    fn wants(&self, step: &str) -> bool {
        !self.skip.iter().any(|s| s == step)
    }

    fn compression_level(&self) -> u32 {
        self.compression_level
            .unwrap_or(dcs_edge::config::DEFAULT_COMPRESSION_LEVEL)
    }
}

// ---------------------------------------------------------------- results

#[derive(Debug, Clone, Default, Serialize)]
struct Usage {
    wall_s: f64,
    agent_cpu_s: Option<f64>,
    aggregator_cpu_s: Option<f64>,
    /// Every `postgres` process on the machine (reaped backends included):
    /// on a shared server also other people's work.
    postgres_cpu_s: f64,
    /// The backends serving the step's own database only (see
    /// [`sys::postgres_backend_ticks`]): the figure per-record PostgreSQL CPU
    /// is computed from, so COPY and end to end are measured alike.
    postgres_db_cpu_s: Option<f64>,
    bench_cpu_s: f64,
    machine_busy_pct: f64,
    /// Kernel threads (writeback, journal): mostly caused by our own writes.
    kernel_cpu_s: f64,
    /// Machine CPU seconds used by none of the agent, aggregator, PostgreSQL,
    /// the bench or kernel threads: other people's work on a shared machine.
    other_cpu_s: f64,
    other_processes: Vec<String>,
}

impl Usage {
    fn noisy(&self, cores: usize) -> bool {
        self.wall_s > 0.0 && self.other_cpu_s / (self.wall_s * cores as f64) > 0.10
    }
}

struct Meter {
    t0: Instant,
    agent: Option<(u32, f64)>,
    aggregator: Option<(u32, f64)>,
    /// The step's database and its backends' CPU ticks at the start.
    db: Option<(String, std::collections::HashMap<u32, u64>)>,
    pg0: f64,
    bench0: f64,
    machine0: MachineCpu,
    procs0: ProcSnapshot,
}

impl Meter {
    fn start(agent: Option<u32>, aggregator: Option<u32>) -> Meter {
        let at = |pid: Option<u32>| pid.map(|p| (p, sys::cpu_secs(p).unwrap_or(0.0)));
        Meter {
            agent: at(agent),
            aggregator: at(aggregator),
            db: None,
            pg0: sys::postgres_cpu_secs(),
            bench0: sys::own_cpu_secs(),
            machine0: MachineCpu::now(),
            procs0: ProcSnapshot::take(),
            t0: Instant::now(),
        }
    }

    /// Also charges the backends of database `db` (those that connect later
    /// from 0). Call right after [`Meter::start`].
    fn with_db(mut self, db: &str) -> Meter {
        self.db = Some((db.to_owned(), sys::postgres_backend_ticks(db)));
        self
    }

    /// Also counts a process that started after [`Meter::start`] (from 0).
    fn add_aggregator(&mut self, pid: u32) {
        self.aggregator = Some((pid, 0.0));
    }

    fn stop(&self) -> Usage {
        let wall_s = self.t0.elapsed().as_secs_f64();
        let machine = MachineCpu::now();
        let delta =
            |p: Option<(u32, f64)>| p.map(|(pid, c0)| sys::cpu_secs(pid).unwrap_or(c0) - c0);
        let agent = delta(self.agent);
        let aggregator = delta(self.aggregator);
        let pg = sys::postgres_cpu_secs() - self.pg0;
        let pg_db = self.db.as_ref().map(|(name, before)| {
            let ticks: u64 = sys::postgres_backend_ticks(name)
                .into_iter()
                .map(|(pid, t)| t.saturating_sub(before.get(&pid).copied().unwrap_or(0)))
                .sum();
            ticks as f64 / sys::clk_tck()
        });
        let bench = sys::own_cpu_secs() - self.bench0;
        let busy_pct = machine.busy_pct_since(&self.machine0);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let busy_s = busy_pct / 100.0 * wall_s * cores;
        let later = ProcSnapshot::take();
        let kernel = self.procs0.kernel_secs_since(&later);
        let ours = agent.unwrap_or(0.0) + aggregator.unwrap_or(0.0) + pg + bench + kernel;
        let mut pids = vec![std::process::id()];
        pids.extend(self.agent.map(|p| p.0));
        pids.extend(self.aggregator.map(|p| p.0));
        Usage {
            wall_s,
            agent_cpu_s: agent,
            aggregator_cpu_s: aggregator,
            postgres_cpu_s: pg,
            postgres_db_cpu_s: pg_db,
            bench_cpu_s: bench,
            machine_busy_pct: busy_pct,
            kernel_cpu_s: kernel,
            other_cpu_s: (busy_s - ours).max(0.0),
            other_processes: self.procs0.others_since(&later, &pids, 0.5),
        }
    }
}

/// CPU microseconds per record of each tier over one step: the
/// machine-independent figure (wall-clock rates depend on the machine and on
/// who else uses it; CPU per record much less).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct CpuPerRecord {
    agent_us: Option<f64>,
    aggregator_us: Option<f64>,
    /// Backends of the step's own database (`Usage::postgres_db_cpu_s`).
    postgres_us: Option<f64>,
}

impl CpuPerRecord {
    fn of(u: &Usage, n: u64) -> CpuPerRecord {
        let per = |s: Option<f64>| s.map(|s| s * 1e6 / n.max(1) as f64);
        CpuPerRecord {
            agent_us: per(u.agent_cpu_s),
            aggregator_us: per(u.aggregator_cpu_s),
            postgres_us: per(u.postgres_db_cpu_s),
        }
    }
}

/// Resident memory, open file descriptors and threads of a process at one
/// moment (or the maximum of several moments, see [`ProcSample::max`]).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct ProcSample {
    rss_mb: Option<f64>,
    fds: Option<u64>,
    threads: Option<u64>,
}

impl ProcSample {
    fn take(pid: u32) -> ProcSample {
        ProcSample {
            rss_mb: kib_to_mb(sys::rss_kib(pid)),
            fds: sys::open_fds(pid),
            threads: sys::threads(pid),
        }
    }

    fn max(self, other: ProcSample) -> ProcSample {
        fn m<T: PartialOrd>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(if b > a { b } else { a }),
                (a, b) => a.or(b),
            }
        }
        ProcSample {
            rss_mb: m(self.rss_mb, other.rss_mb),
            fds: m(self.fds, other.fds),
            threads: m(self.threads, other.threads),
        }
    }
}

/// Samples a process every 200 ms until dropped; [`Sampler::finish`] gives
/// the maximum of each field.
struct Sampler(
    tokio::task::JoinHandle<ProcSample>,
    Arc<std::sync::atomic::AtomicBool>,
);

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        Sampler(
            tokio::spawn(async move {
                let mut max = ProcSample::take(pid);
                while !flag.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    max = max.max(ProcSample::take(pid));
                }
                max
            }),
            stop,
        )
    }

    async fn finish(self) -> ProcSample {
        self.1.store(true, Ordering::Relaxed);
        self.0.await.unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize)]
struct CopyResult {
    /// `records` (the production table) or `bare` (same columns, no keys).
    table: String,
    connections: usize,
    records: u64,
    secs: f64,
    records_per_s: f64,
    mib_per_s: f64,
    cpu: CpuPerRecord,
    usage: Usage,
}

#[derive(Debug, Clone, Serialize)]
struct IngestResult {
    durability: String,
    records: u64,
    secs: f64,
    records_per_s: f64,
    request_p50_ms: f64,
    request_p99_ms: f64,
    agent_peak_rss_mb: Option<f64>,
    cpu: CpuPerRecord,
    usage: Usage,
}

/// Syslog over TCP into the agent's `[[syslog]]` listener, measured like
/// the NDJSON ingest step: until the agent has committed every message.
#[derive(Debug, Clone, Serialize)]
struct SyslogResult {
    durability: String,
    messages: u64,
    connections: usize,
    secs: f64,
    messages_per_s: f64,
    agent_peak_rss_mb: Option<f64>,
    usage: Usage,
}

#[derive(Debug, Clone, Serialize)]
struct E2eResult {
    records: u64,
    /// First send until the last row was seen committed.
    secs: f64,
    /// First send until the agent acknowledged the last request.
    ingest_secs: f64,
    records_per_s: f64,
    ratio_to_copy: Option<f64>,
    agent_peak_rss_mb: Option<f64>,
    aggregator_peak_rss_mb: Option<f64>,
    /// The agent started and healthy, before any traffic (2 s after start).
    agent_idle: ProcSample,
    /// The maximum of 200 ms samples while records flowed.
    agent_busy: ProcSample,
    cpu: CpuPerRecord,
    usage: Usage,
}

#[derive(Debug, Clone, Serialize)]
struct DrainResult {
    records: u64,
    /// Aggregator listening until the last row was seen committed.
    secs: f64,
    records_per_s: f64,
    /// VmHWM reset when the aggregator starts, read after the drain.
    agent_peak_rss_mb: Option<f64>,
    /// VmHWM over the agent's whole life (buffering included).
    agent_peak_rss_mb_lifetime: Option<f64>,
    fill_secs: f64,
    /// Process start until the aggregator accepted connections (not in `secs`).
    aggregator_start_secs: f64,
    /// The maximum of 200 ms samples while draining.
    agent_busy: ProcSample,
    cpu: CpuPerRecord,
    usage: Usage,
}

#[derive(Debug, Clone, Serialize)]
struct LatencyResult {
    target_records_per_s: f64,
    batch_records: usize,
    batches: usize,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    mean_ms: f64,
    errors: usize,
    /// Batches slower than the 50 ms target: with the p99 the second-slowest
    /// of a few hundred, their count says more than the p99 alone.
    slow_batches: usize,
    /// Each measured batch's latency in send order, for spotting periodic stalls.
    series_ms: Vec<f64>,
    /// What the PostgreSQL server did during the step, to tell its own I/O
    /// stalls (checkpoints, new WAL segments) from ours.
    server: Option<ServerActivity>,
    usage: Usage,
}

/// Server-wide PostgreSQL counters over one step (differences).
#[derive(Debug, Clone, Default, Serialize)]
struct ServerActivity {
    checkpoints_timed: i64,
    checkpoints_requested: i64,
    buffers_checkpoint: i64,
    /// Dirty pages the server's own backends had to write out to make room
    /// (shared_buffers too small for the load): each is a write in the
    /// middle of someone's COPY.
    buffers_backend: i64,
    buffers_backend_fsync: i64,
    wal_bytes: i64,
    wal_full_page_images: i64,
    wal_buffers_full: i64,
    /// Milliseconds spent writing and syncing WAL (zero unless the server
    /// has `track_wal_io_timing`, as the bench's private clusters do).
    wal_write_ms: f64,
    wal_sync_ms: f64,
    /// Files in `pg_wal` before and after: growth means segments were
    /// created (and zero-filled) during the step rather than recycled.
    wal_files_before: i64,
    wal_files_after: i64,
}

impl ServerActivity {
    async fn snapshot(admin_url: &str) -> anyhow::Result<ServerActivity> {
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

    fn since(&self, before: &ServerActivity) -> ServerActivity {
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
struct LevelResult {
    level: u32,
    records: u64,
    wire_bytes_per_record: f64,
    ratio_to_raw: f64,
    /// `wire::encode_batch` throughput, raw JSON MiB per second of one core.
    encode_mib_per_s: f64,
    /// The same JSON rendered into memory first and gzipped in one write:
    /// what encode_batch could reach (see docs/PERFORMANCE.md).
    one_shot_mib_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
struct WireResult {
    records: u64,
    batch_records: usize,
    level: u32,
    raw_bytes_per_record: f64,
    wire_bytes_per_record: f64,
    ratio_to_raw: f64,
    /// Other levels over (up to) the first 200,000 records, for the knob.
    levels: Vec<LevelResult>,
}

#[derive(Debug, Clone, Serialize)]
struct RunConfig {
    duration_s: f64,
    runs: usize,
    sizes: Option<Sizes>,
    record_bytes: usize,
    raw_bytes_per_record: f64,
    clients: usize,
    request_records: u64,
    agent_max_in_flight: usize,
    agent_compression_level: u32,
    agent_max_records: usize,
    agent_linger_ms: u64,
    aggregator_max_connections: Option<u32>,
    pg_synchronous_commit: Option<String>,
    skip: Vec<String>,
}

/// One run of every step.
#[derive(Debug, Clone, Serialize)]
struct Results {
    started_unix: u64,
    load_avg_1m_start: f64,
    load_avg_1m_end: f64,
    /// COPY into `records` over 1, 2 and 4 connections, then into a bare table.
    copy: Vec<CopyResult>,
    ingest: Vec<IngestResult>,
    syslog: Option<SyslogResult>,
    /// OTLP/HTTP protobuf log batches acked to disk (durability process-crash).
    otlp: Option<IngestResult>,
    e2e: Option<E2eResult>,
    drain: Option<DrainResult>,
    /// Default batching first, then the linger/batch sweep.
    freshness: Vec<freshness::FreshnessResult>,
    latency: Option<LatencyResult>,
    wire: Option<WireResult>,
    dcs_edge_binary_bytes: u64,
    dcs_aggregator_binary_bytes: u64,
    /// After `strip` (the release profile keeps line tables), when strip exists.
    dcs_edge_stripped_bytes: Option<u64>,
    dcs_aggregator_stripped_bytes: Option<u64>,
    noisy_steps: Vec<String>,
}

impl Results {
    /// The physical limit: the fastest COPY into the production table.
    fn best_copy(&self) -> Option<&CopyResult> {
        self.copy
            .iter()
            .filter(|c| c.table == "records")
            .max_by(|a, b| a.records_per_s.total_cmp(&b.records_per_s))
    }
}

// ---------------------------------------------------------------- data

/// The request bodies of the data set: generated once up front when small
/// enough, else on demand.
#[derive(Clone)]
struct Bodies {
    generator: Generator,
    records: u64,
    per_request: u64,
    cache: Option<Arc<Vec<Bytes>>>,
    /// OTLP protobuf for `/v1/logs` instead of NDJSON for `/v1/records`.
    otlp: bool,
}

impl Bodies {
    fn new(generator: Generator, records: u64, per_request: u64) -> (Bodies, f64) {
        let mut b = Bodies {
            generator,
            records,
            per_request,
            cache: None,
            otlp: false,
        };
        // Raw size from a sample, to decide whether to cache.
        let sample = records.min(1000);
        let raw: u64 = (0..sample)
            .map(|i| generator.record(i).line.len() as u64)
            .sum();
        let raw_per_record = raw as f64 / sample.max(1) as f64;
        if (raw_per_record * records as f64) as u64 <= CACHE_LIMIT {
            b.cache = Some(Arc::new((0..b.count()).map(|k| b.generate(k)).collect()));
        }
        (b, raw_per_record)
    }

    fn count(&self) -> u64 {
        self.records.div_ceil(self.per_request)
    }

    /// The first `n` records (a whole number of requests, see [`Sizes`]),
    /// sharing the cache.
    fn prefix(&self, n: u64) -> Bodies {
        debug_assert!(n <= self.records && n.is_multiple_of(self.per_request));
        Bodies {
            records: n.min(self.records),
            ..self.clone()
        }
    }

    fn generate(&self, k: u64) -> Bytes {
        let start = k * self.per_request;
        let end = (start + self.per_request).min(self.records);
        if self.otlp {
            Bytes::from(otlp::request(&self.generator, start, end))
        } else {
            Bytes::from(self.generator.ndjson(start, end).0)
        }
    }

    /// The same records as OTLP protobuf log batches, cached like these.
    fn as_otlp(&self) -> Bodies {
        let mut b = Bodies {
            otlp: true,
            cache: None,
            ..self.clone()
        };
        if self.cache.is_some() {
            b.cache = Some(Arc::new((0..b.count()).map(|k| b.generate(k)).collect()));
        }
        b
    }

    fn path_and_type(&self) -> (&'static str, &'static str) {
        if self.otlp {
            ("/v1/logs", "application/x-protobuf")
        } else {
            ("/v1/records", "application/x-ndjson")
        }
    }

    fn get(&self, k: u64) -> Bytes {
        match &self.cache {
            Some(c) => c[k as usize].clone(),
            None => self.generate(k),
        }
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("HTTP client")
}

struct PushStats {
    secs: f64,
    latencies_ms: Vec<f64>,
}

/// Sends every body to the agent from `clients` concurrent connections;
/// fails on any non-2xx answer.
async fn push_all(agent_url: &str, bodies: &Bodies, clients: usize) -> anyhow::Result<PushStats> {
    let next = Arc::new(AtomicU64::new(0));
    let (path, content_type) = bodies.path_and_type();
    let url = format!("{agent_url}{path}");
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients.max(1) {
        let (next, url, bodies) = (next.clone(), url.clone(), bodies.clone());
        tasks.spawn(async move {
            let client = http_client();
            let mut latencies = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= bodies.count() {
                    return anyhow::Ok(latencies);
                }
                let body = bodies.get(k);
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .header("content-type", content_type)
                    .body(body)
                    .send()
                    .await
                    .with_context(|| format!("POST request {k} to the agent"))?;
                let status = response.status();
                if !status.is_success() {
                    let text = response.text().await.unwrap_or_default();
                    bail!("agent answered {status} to request {k}: {text}");
                }
                if bodies.otlp {
                    otlp::check_fully_accepted(&response.bytes().await?, k)?;
                }
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
        });
    }
    let mut latencies_ms = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies_ms.extend(done.context("producer task")??);
    }
    Ok(PushStats {
        secs: t0.elapsed().as_secs_f64(),
        latencies_ms,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn kib_to_mb(kib: Option<u64>) -> Option<f64> {
    kib.map(|k| k as f64 * 1024.0 / 1e6)
}

// ---------------------------------------------------------------- services

/// Everything the services of one run share: certificates and a scratch dir.
struct World {
    args: Args,
    /// Admin URL of the PostgreSQL server the steps create databases on.
    pg_admin: String,
    pki: Pki,
    dir: tempfile::TempDir,
    bodies: Bodies,
    generator: Generator,
    /// COPY text of the first N records in ~1 MiB chunks of whole rows,
    /// rendered once and reused by every COPY step of every run.
    copy_chunks: std::sync::Mutex<Option<(u64, Arc<Vec<Bytes>>)>>,
}

impl World {
    fn new(
        args: &Args,
        pg_admin: &str,
        bodies: &Bodies,
        generator: Generator,
    ) -> anyhow::Result<World> {
        Ok(World {
            args: args.clone(),
            pg_admin: pg_admin.to_owned(),
            pki: Pki::new(),
            dir: tempfile::Builder::new().prefix("dcs-bench-").tempdir()?,
            bodies: bodies.clone(),
            generator,
            copy_chunks: std::sync::Mutex::new(None),
        })
    }

    fn agent_service(&self, name: &str, aggregator_port: u16, durability: &str) -> Service {
        self.agent_service_with(name, aggregator_port, durability, &[])
    }

    /// An agent with extra `DCS_EDGE_*` settings (suffixes), applied last.
    fn agent_service_with(
        &self,
        name: &str,
        aggregator_port: u16,
        durability: &str,
        extra: &[(&str, String)],
    ) -> Service {
        let a = &self.args;
        let cert: AgentCert = self.pki.agent("bench", name);
        let port = free_port();
        // Room for the whole data set whatever N is (1 GiB at least, the default).
        let capacity = (self.bodies.records * (a.record_bytes as u64 + 200) * 2).max(1 << 30);
        let mut env: Vec<(&str, String)> = vec![
            ("LISTEN__ADDRESS", format!("127.0.0.1:{port}")),
            (
                "BUFFER__PATH",
                self.dir
                    .path()
                    .join(format!("{name}.db"))
                    .display()
                    .to_string(),
            ),
            ("BUFFER__CAPACITY", capacity.to_string()),
            ("BUFFER__DURABILITY", durability.to_owned()),
            (
                "AGGREGATOR__URL",
                format!("https://localhost:{aggregator_port}"),
            ),
            ("AGGREGATOR__CA", cert.ca.display().to_string()),
            ("AGGREGATOR__CERT", cert.cert.display().to_string()),
            ("AGGREGATOR__KEY", cert.key.display().to_string()),
            // A healed link is noticed within 100 ms (default: up to 30 s),
            // so the drain step measures draining, not the backoff: with
            // 500 ms the wait was up to 15% of a 200,000-record drain.
            ("RETRY__INITIAL", "50ms".into()),
            ("RETRY__MAX", "100ms".into()),
            ("LOG__FORMAT", "json".into()),
        ];
        if let Some(v) = a.max_in_flight {
            env.push(("BATCH__MAX_IN_FLIGHT", v.to_string()));
        }
        if let Some(v) = a.compression_level {
            env.push(("BATCH__COMPRESSION_LEVEL", v.to_string()));
        }
        if let Some(v) = a.max_records {
            env.push(("BATCH__MAX_RECORDS", v.to_string()));
        }
        if let Some(v) = a.linger_ms {
            env.push(("BATCH__LINGER", format!("{v}ms")));
        }
        env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        let env = env
            .into_iter()
            .map(|(k, v)| (format!("{}{k}", dcs_edge::config::ENV_PREFIX), v))
            .collect();
        Service::new(
            "dcs-edge",
            &["run"],
            env,
            port,
            &self.dir.path().join(format!("{name}.log")),
        )
    }

    fn aggregator_service(&self, name: &str, port: u16, db_url: &str) -> Service {
        let mut env: Vec<(&str, String)> = vec![
            ("LISTEN__ADDRESS", format!("127.0.0.1:{port}")),
            ("TLS__CA", self.pki.ca.display().to_string()),
            ("TLS__CERT", self.pki.server_cert.display().to_string()),
            ("TLS__KEY", self.pki.server_key.display().to_string()),
            ("DATABASE__URL", db_url.to_owned()),
            ("DATABASE__MIGRATE_ON_START", "false".into()),
            ("LOG__FORMAT", "json".into()),
        ];
        if let Some(v) = self.args.agg_max_connections {
            env.push(("DATABASE__MAX_CONNECTIONS", v.to_string()));
        }
        if let Some(v) = &self.args.agg_log_level {
            env.push(("LOG__LEVEL", v.clone()));
        }
        let env = env
            .into_iter()
            .map(|(k, v)| (format!("DCS_AGG_{k}"), v))
            .collect();
        Service::new(
            "dcs-aggregator",
            &["serve"],
            env,
            port,
            &self.dir.path().join(format!("{name}.log")),
        )
    }

    /// A fresh, migrated database, with the `--pg-synchronous-commit` knob.
    async fn database(&self) -> anyhow::Result<TestDb> {
        let db = TestDb::on_server(&self.pg_admin)
            .await
            .context("create a fresh database")?;
        if let Some(mode) = &self.args.pg_synchronous_commit {
            ensure!(
                mode.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad --pg-synchronous-commit {mode:?}"
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE \"{}\" SET synchronous_commit = {mode}",
                db.name()
            )))
            .execute(&db.pool)
            .await?;
            // New connections (the aggregator's) get it; the bench's own pooled
            // connections keep the old value, which only matters for COPY, and
            // that step sets it on its connection itself.
        }
        Ok(db)
    }
}

impl World {
    /// Deletes an agent's buffer files (a 10M-record run would otherwise keep
    /// several GB of them until the end).
    fn remove_buffer(&self, name: &str) {
        for suffix in ["db", "db-wal", "db-shm"] {
            let _ = std::fs::remove_file(self.dir.path().join(format!("{name}.{suffix}")));
        }
    }
}

async fn start_agent(service: &mut Service) -> anyhow::Result<String> {
    service.start().await;
    let url = format!("http://127.0.0.1:{}", service.port);
    let client = http_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if client
            .get(format!("{url}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(url);
        }
        if Instant::now() > deadline {
            bail!(
                "dcs-edge not healthy after 30 s; log:\n{}",
                service.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until all `n` records of the (single) agent are committed in
/// `records`; returns when the query that first saw them all was issued,
/// which bounds the commit time from above (within one poll interval).
async fn wait_for_rows(pool: &PgPool, n: u64, timeout: Duration) -> anyhow::Result<Instant> {
    // The highest committed seq, through the primary key (agent_id, epoch, seq).
    const MAX_SEQ: &str = "SELECT coalesce(max(r.seq), 0) FROM agents a, LATERAL \
        (SELECT seq FROM records WHERE agent_id = a.id AND epoch = a.last_epoch \
         ORDER BY seq DESC LIMIT 1) r";
    let deadline = Instant::now() + timeout;
    loop {
        let asked = Instant::now();
        let max: i64 = sqlx::query_scalar(MAX_SEQ).fetch_one(pool).await?;
        if max as u64 >= n {
            let count: i64 = sqlx::query_scalar("SELECT count(*) FROM records")
                .fetch_one(pool)
                .await?;
            if count as u64 >= n {
                ensure!(count as u64 == n, "{count} rows in records, expected {n}");
                return Ok(asked);
            }
        }
        if Instant::now() > deadline {
            bail!("only up to seq {max} of {n} arrived within {timeout:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn delivery_timeout(n: u64) -> Duration {
    // Generous: 60 s plus 2 ms per record (a floor of 500 records/s).
    Duration::from_secs(60) + Duration::from_micros(n * 2_000)
}

// ---------------------------------------------------------------- steps

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
async fn step_copy(
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

/// 3. Edge ingest with the aggregator unreachable: only acking to disk.
async fn step_ingest(w: &World, bodies: &Bodies, durability: &str) -> anyhow::Result<IngestResult> {
    step_ingest_of(w, durability, bodies, "ingest").await
}

/// Like [`step_ingest`], with `bodies` (NDJSON or OTLP) under `name`.
async fn step_ingest_of(
    w: &World,
    durability: &str,
    bodies: &Bodies,
    name: &str,
) -> anyhow::Result<IngestResult> {
    // Nothing listens on this port: the forwarder fails fast and backs off.
    let dead_port = free_port();
    let mut agent = w.agent_service(&format!("{name}-{durability}"), dead_port, durability);
    let url = start_agent(&mut agent).await?;
    let pid = agent.pid().context("agent pid")?;
    let meter = Meter::start(Some(pid), None);
    let pushed = push_all(&url, bodies, w.args.clients).await?;
    let usage = meter.stop();
    let peak = kib_to_mb(sys::peak_rss_kib(pid));
    agent.kill();
    w.remove_buffer(&format!("{name}-{durability}"));
    let lat = sorted(pushed.latencies_ms);
    Ok(IngestResult {
        durability: durability.to_owned(),
        records: bodies.records,
        secs: pushed.secs,
        records_per_s: bodies.records as f64 / pushed.secs,
        request_p50_ms: percentile(&lat, 50.0),
        request_p99_ms: percentile(&lat, 99.0),
        agent_peak_rss_mb: peak,
        cpu: CpuPerRecord::of(&usage, bodies.records),
        usage,
    })
}

/// 2b. Syslog ingest: `--clients` TCP connections stream octet-counted
/// RFC 5424 messages (the data set's payloads as message text) into a
/// syslog listener; timed until the agent has committed all of them
/// (`dcs_agent_syslog_messages_accepted_total`), the aggregator unreachable
/// as in the NDJSON ingest step.
async fn step_syslog(w: &World, durability: &str, n: u64) -> anyhow::Result<SyslogResult> {
    let dead_port = free_port();
    let syslog_port = free_port();
    let name = format!("syslog-{durability}");
    let listener = format!(
        "[{{ name = \"bench\", protocol = \"tcp\", listen = \"127.0.0.1:{syslog_port}\", stream = \"bench.${{appname}}\" }}]"
    );
    let mut agent = w.agent_service_with(&name, dead_port, durability, &[("SYSLOG", listener)]);
    let url = start_agent(&mut agent).await?;
    let pid = agent.pid().context("agent pid")?;
    let connections = w.args.clients.max(1);
    // Each connection's whole stream, built before the clock starts.
    let streams: Vec<Vec<u8>> = (0..connections as u64)
        .map(|c| {
            let mut bytes = Vec::new();
            let mut k = c;
            while k < n {
                // The record's payload as the message text: the same
                // bytes per message as the NDJSON step carries per record.
                let record = w.generator.record(k);
                let text = format!(
                    "<14>1 2026-12-06T00:00:00.000000Z bench-host app{} {k} - - {}",
                    k % 4,
                    record.payload
                );
                bytes.extend_from_slice(format!("{} ", text.len()).as_bytes());
                bytes.extend_from_slice(text.as_bytes());
                k += connections as u64;
            }
            bytes
        })
        .collect();
    let meter = Meter::start(Some(pid), None);
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for bytes in streams {
        let address = format!("127.0.0.1:{syslog_port}");
        senders.spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let mut stream = tokio::net::TcpStream::connect(&address).await?;
            stream.write_all(&bytes).await?;
            stream.shutdown().await?;
            anyhow::Ok(())
        });
    }
    while let Some(sent) = senders.join_next().await {
        sent??;
    }
    let deadline = Instant::now() + delivery_timeout(n);
    loop {
        let accepted = dcs_tests::agent::metric_sample(
            &url,
            "dcs_agent_syslog_messages_accepted_total",
            &[("listener", "bench")],
        )
        .await
        .unwrap_or(0.0) as u64;
        if accepted >= n {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "syslog step: only {accepted} of {n} messages committed; log:\n{}",
            agent.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let usage = meter.stop();
    let peak = kib_to_mb(sys::peak_rss_kib(pid));
    agent.kill();
    w.remove_buffer(&name);
    Ok(SyslogResult {
        durability: durability.to_owned(),
        messages: n,
        connections,
        secs,
        messages_per_s: n as f64 / secs,
        agent_peak_rss_mb: peak,
        usage,
    })
}

/// 4. End to end: producers → agent → aggregator → PostgreSQL.
async fn step_e2e(w: &World, bodies: &Bodies, copy_rate: Option<f64>) -> anyhow::Result<E2eResult> {
    let db = w.database().await?;
    let agg_port = free_port();
    let mut aggregator = w.aggregator_service("e2e-aggregator", agg_port, &db.url);
    aggregator.start().await;
    let mut agent = w.agent_service("e2e-agent", agg_port, "process-crash");
    let url = start_agent(&mut agent).await?;
    let (agent_pid, agg_pid) = (
        agent.pid().context("agent pid")?,
        aggregator.pid().context("aggregator pid")?,
    );
    let n = bodies.records;
    progress(&format!(
        "e2e: agent pid {agent_pid}, aggregator pid {agg_pid}"
    ));
    // Idle: started, connected to nothing yet, no traffic; settled for 2 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agent_idle = ProcSample::take(agent_pid);
    let perf = match &w.args.perf_dir {
        Some(dir) => Some(start_perf(dir, "e2e")?),
        None => None,
    };
    let meter = Meter::start(Some(agent_pid), Some(agg_pid)).with_db(db.name());
    let sampler = Sampler::start(agent_pid);
    let t0 = Instant::now();
    let pool = db.pool.clone();
    let waiter = tokio::spawn(async move { wait_for_rows(&pool, n, delivery_timeout(n)).await });
    let pushed = push_all(&url, bodies, w.args.clients).await;
    let committed = waiter.await.context("waiter")?;
    let usage = meter.stop();
    let agent_busy = sampler.finish().await;
    if let Some(perf) = perf {
        stop_perf(perf);
    }
    let (pushed, committed) = match (pushed, committed) {
        (Ok(p), Ok(c)) => (p, c),
        (Err(e), _) | (_, Err(e)) => {
            bail!(
                "{e:#}\nagent log:\n{}\naggregator log:\n{}",
                agent.log_tail(),
                aggregator.log_tail()
            )
        }
    };
    let secs = committed.duration_since(t0).as_secs_f64();
    let result = E2eResult {
        records: n,
        secs,
        ingest_secs: pushed.secs,
        records_per_s: n as f64 / secs,
        ratio_to_copy: copy_rate.map(|c| n as f64 / secs / c),
        agent_peak_rss_mb: kib_to_mb(sys::peak_rss_kib(agent_pid)),
        aggregator_peak_rss_mb: kib_to_mb(sys::peak_rss_kib(agg_pid)),
        agent_idle,
        agent_busy,
        cpu: CpuPerRecord::of(&usage, n),
        usage,
    };
    agent.kill();
    aggregator.kill();
    w.remove_buffer("e2e-agent");
    drop(db);
    Ok(result)
}

/// Starts `perf record` on the whole machine, writing DIR/NAME.perf.data.
fn start_perf(dir: &Path, name: &str) -> anyhow::Result<std::process::Child> {
    std::fs::create_dir_all(dir)?;
    let out = dir.join(format!("{name}.perf.data"));
    let child = std::process::Command::new("perf")
        .args(["record", "-e", "cpu-clock", "-F", "499", "-a", "-g", "-o"])
        .arg(&out)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("start perf (apt-get install linux-perf)")?;
    // perf needs a moment before it samples.
    std::thread::sleep(Duration::from_millis(500));
    progress(&format!("perf recording to {}", out.display()));
    Ok(child)
}

/// SIGINT makes perf write its file and exit.
fn stop_perf(mut perf: std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    let _ = perf.wait();
}

/// Step 5, backlog drain: all records buffered while the aggregator is down, then
/// the time to deliver them once it is up.
async fn step_drain(w: &World, bodies: &Bodies) -> anyhow::Result<DrainResult> {
    let db = w.database().await?;
    let agg_port = free_port();
    let mut agent = w.agent_service("drain-agent", agg_port, "process-crash");
    let url = start_agent(&mut agent).await?;
    let agent_pid = agent.pid().context("agent pid")?;
    let pushed = push_all(&url, bodies, w.args.clients).await?;
    let lifetime_before = sys::peak_rss_kib(agent_pid);
    let reset = sys::reset_peak_rss(agent_pid);
    let n = bodies.records;
    let mut aggregator = w.aggregator_service("drain-aggregator", agg_port, &db.url);
    let mut meter = Meter::start(Some(agent_pid), None).with_db(db.name());
    let sampler = Sampler::start(agent_pid);
    let spawned = Instant::now();
    aggregator.start().await;
    // From here the aggregator accepts connections; the agent notices at its
    // next retry (retry.max is 100 ms here).
    let t0 = Instant::now();
    meter.add_aggregator(aggregator.pid().context("aggregator pid")?);
    let committed = match wait_for_rows(&db.pool, n, delivery_timeout(n)).await {
        Ok(c) => c,
        Err(e) => bail!(
            "{e:#}\nagent log:\n{}\naggregator log:\n{}",
            agent.log_tail(),
            aggregator.log_tail()
        ),
    };
    let usage = meter.stop();
    let agent_busy = sampler.finish().await;
    let secs = committed.duration_since(t0).as_secs_f64();
    let drain_peak = sys::peak_rss_kib(agent_pid);
    let result = DrainResult {
        records: n,
        secs,
        records_per_s: n as f64 / secs,
        agent_peak_rss_mb: if reset { kib_to_mb(drain_peak) } else { None },
        agent_peak_rss_mb_lifetime: kib_to_mb(lifetime_before.max(drain_peak)),
        fill_secs: pushed.secs,
        aggregator_start_secs: t0.duration_since(spawned).as_secs_f64(),
        agent_busy,
        cpu: CpuPerRecord::of(&usage, n),
        usage,
    };
    agent.kill();
    aggregator.kill();
    w.remove_buffer("drain-agent");
    drop(db);
    Ok(result)
}

/// 6. Batch ack latency at a paced rate, straight to the aggregator over mTLS.
async fn step_latency(w: &World, rate: f64) -> anyhow::Result<LatencyResult> {
    let db = w.database().await?;
    let port = free_port();
    let mut aggregator = w.aggregator_service("latency-aggregator", port, &db.url);
    aggregator.start().await;
    let client = dcs_tests::aggregator::agent_client(&w.pki.agent("bench", "latency-1"));
    let url = format!("https://localhost:{port}{}", wire::BATCHES_PATH);

    let batches_per_s = rate / LATENCY_BATCH as f64;
    // Not capped by --records: the batches are generated here, and a p99 of
    // the default run's 200 batches was just its second-slowest, which one
    // start-up hiccup decided. A whole --latency-secs gives about 900.
    let measured =
        ((batches_per_s * w.args.latency_secs.unwrap_or(w.args.duration)).ceil() as usize).max(30);
    let total = measured + LATENCY_WARMUP;
    let (generator, level) = (w.generator, w.args.compression_level());
    let epoch = uuid::Uuid::new_v4();
    let bodies: Vec<Bytes> = tokio::task::spawn_blocking(move || {
        (0..total)
            .map(|k| {
                let recs: Vec<_> = (k * LATENCY_BATCH..(k + 1) * LATENCY_BATCH)
                    .map(|i| (i as i64 + 1, generator.record(i as u64)))
                    .collect();
                Bytes::from(encode(epoch, &recs, level))
            })
            .collect()
    })
    .await?;
    let post = |body: Bytes| {
        client
            .post(&url)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(body)
            .send()
    };
    for body in &bodies[..LATENCY_WARMUP] {
        let r = post(body.clone()).await?;
        ensure!(r.status().is_success(), "warm-up batch: {}", r.status());
    }
    let interval = Duration::from_secs_f64(1.0 / batches_per_s);
    // Counters are best effort: a server that hides them still gets measured.
    let server_before = ServerActivity::snapshot(&w.pg_admin).await.ok();
    let meter = Meter::start(None, aggregator.pid()).with_db(db.name());
    let t0 = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (k, body) in bodies[LATENCY_WARMUP..].iter().enumerate() {
        let scheduled = t0 + interval * k as u32;
        tokio::time::sleep_until(scheduled).await;
        let request = post(body.clone());
        // Open loop: latency counts from the scheduled send time, so a slow
        // answer cannot hide the queueing it causes behind it.
        tasks.spawn(async move {
            let ok = match request.await {
                Ok(r) => r.status().is_success(),
                Err(_) => false,
            };
            (k, ok, scheduled.elapsed().as_secs_f64() * 1000.0)
        });
    }
    let mut latencies = Vec::with_capacity(measured);
    let mut series = vec![f64::NAN; measured];
    let mut errors = 0;
    while let Some(done) = tasks.join_next().await {
        let (k, ok, ms) = done?;
        if ok {
            latencies.push(ms);
            series[k] = ms;
        } else {
            errors += 1;
        }
    }
    if let Some(dir) = &w.args.perf_dir {
        // With --perf-dir, keep the aggregator log (server-side times at debug).
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::copy(
            w.dir.path().join("latency-aggregator.log"),
            dir.join("latency-aggregator.log"),
        );
    }
    let usage = meter.stop();
    let server = match server_before {
        Some(before) => ServerActivity::snapshot(&w.pg_admin)
            .await
            .ok()
            .map(|after| after.since(&before)),
        None => None,
    };
    aggregator.kill();
    drop(db);
    let mean = latencies.iter().sum::<f64>() / latencies.len().max(1) as f64;
    let slow_batches = latencies.iter().filter(|&&ms| ms > 50.0).count();
    let lat = sorted(latencies);
    Ok(LatencyResult {
        target_records_per_s: rate,
        batch_records: LATENCY_BATCH,
        batches: measured,
        p50_ms: percentile(&lat, 50.0),
        p90_ms: percentile(&lat, 90.0),
        p99_ms: percentile(&lat, 99.0),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        mean_ms: mean,
        errors,
        slow_batches,
        series_ms: series,
        server,
        usage,
    })
}

fn encode(epoch: uuid::Uuid, recs: &[(i64, records::Rec)], level: u32) -> Vec<u8> {
    let backlog = Backlog::default();
    wire::encode_batch(
        epoch,
        Some(&backlog),
        recs.iter().map(|(seq, r)| OutRecord {
            seq: *seq,
            id: &r.id,
            stream: r.stream,
            ts_us: r.ts_us,
            payload: &r.payload,
            received: None,
        }),
        level,
    )
}

/// The wire format's JSON (as `wire::encode_batch` writes it) rendered into a
/// Vec first, then gzipped with one `write_all`: the reference for how fast
/// encoding is when the compressor is not fed a few bytes at a time.
fn encode_one_shot(epoch: uuid::Uuid, recs: &[(i64, records::Rec)], level: u32) -> Vec<u8> {
    use std::io::Write as _;
    let mut json = Vec::with_capacity(recs.len() * 256);
    let _ = write!(
        json,
        r#"{{"v":{},"epoch":"{epoch}","backlog":"#,
        wire::FORMAT_VERSION
    );
    let _ = serde_json::to_writer(&mut json, &Backlog::default());
    json.extend_from_slice(br#","records":["#);
    for (i, (seq, r)) in recs.iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        let _ = write!(json, r#"{{"seq":{seq},"id":"#);
        let _ = serde_json::to_writer(&mut json, &r.id);
        json.extend_from_slice(br#","stream":"#);
        let _ = serde_json::to_writer(&mut json, r.stream);
        let _ = write!(json, r#","ts":{},"payload":"#, r.ts_us);
        json.extend_from_slice(r.payload.as_bytes());
        json.push(b'}');
    }
    json.extend_from_slice(b"]}");
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(json.len() / 4),
        flate2::Compression::new(level),
    );
    let _ = gz.write_all(&json);
    gz.finish().unwrap_or_default()
}

/// 7. Compressed bytes on the wire per record vs the raw JSON the producer sent.
fn step_wire(generator: Generator, n: u64, level: u32) -> WireResult {
    let epoch = uuid::Uuid::new_v4();
    let measure = |n: u64, level: u32| -> (u64, u64, f64, f64) {
        let (mut raw, mut wire) = (0u64, 0u64);
        let (mut encode_secs, mut one_shot_secs) = (0.0, 0.0);
        let mut start = 0u64;
        while start < n {
            let end = (start + WIRE_BATCH as u64).min(n);
            let recs: Vec<_> = (start..end)
                .map(|i| (i as i64 + 1, generator.record(i)))
                .collect();
            raw += recs.iter().map(|(_, r)| r.line.len() as u64).sum::<u64>();
            let t = Instant::now();
            let body = encode(epoch, &recs, level);
            encode_secs += t.elapsed().as_secs_f64();
            let t = Instant::now();
            std::hint::black_box(encode_one_shot(epoch, &recs, level));
            one_shot_secs += t.elapsed().as_secs_f64();
            wire += body.len() as u64;
            start = end;
        }
        (raw, wire, encode_secs, one_shot_secs)
    };
    let (raw, wire_bytes, _, _) = measure(n, level);
    let sample = n.min(200_000);
    let levels = [0u32, 1, 2, 3, 6, 9]
        .into_iter()
        .map(|l| {
            let (raw, wire_bytes, secs, one_shot_secs) = measure(sample, l);
            LevelResult {
                level: l,
                records: sample,
                wire_bytes_per_record: wire_bytes as f64 / sample as f64,
                ratio_to_raw: wire_bytes as f64 / raw as f64,
                // Input rate: the raw JSON the encoder consumed per second.
                encode_mib_per_s: raw as f64 / secs / (1 << 20) as f64,
                one_shot_mib_per_s: raw as f64 / one_shot_secs / (1 << 20) as f64,
            }
        })
        .collect();
    WireResult {
        records: n,
        batch_records: WIRE_BATCH,
        level,
        raw_bytes_per_record: raw as f64 / n as f64,
        wire_bytes_per_record: wire_bytes as f64 / n as f64,
        ratio_to_raw: wire_bytes as f64 / raw as f64,
        levels,
    }
}

// ---------------------------------------------------------------- report

fn fmt_rate(r: f64) -> String {
    format!("{:.0} rec/s", r)
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}{unit}"))
}

fn print_usage_line(u: &Usage) {
    println!(
        "      cpu: agent {} aggregator {} postgres {:.1}s bench {:.1}s kernel {:.1}s | machine busy {:.0}% | other {:.1}s{}",
        opt(u.agent_cpu_s, "s"),
        opt(u.aggregator_cpu_s, "s"),
        u.postgres_cpu_s,
        u.bench_cpu_s,
        u.kernel_cpu_s,
        u.machine_busy_pct,
        u.other_cpu_s,
        if u.other_processes.is_empty() {
            String::new()
        } else {
            format!(" ({})", u.other_processes.join(", "))
        }
    );
}

fn print_report(r: &Results, run: usize) {
    println!();
    println!(
        "== Run {run} (load average 1m {:.2} at start, {:.2} at end) ==",
        r.load_avg_1m_start, r.load_avg_1m_end
    );
    println!(
        "{:<46} {:>16} {:>10} {:>10}",
        "measurement", "value", "secs", "vs"
    );
    let line = |name: &str, value: String, secs: f64, vs: String| {
        println!("{name:<46} {value:>16} {secs:>10.2} {vs:>10}");
    };
    let cpu_line = |c: &CpuPerRecord| {
        println!(
            "      cpu per record: agent {} us, aggregator {} us, postgres (own db) {} us",
            opt(c.agent_us, ""),
            opt(c.aggregator_us, ""),
            opt(c.postgres_us, "")
        );
    };
    for c in &r.copy {
        line(
            &format!("COPY into {} x{} connections", c.table, c.connections),
            fmt_rate(c.records_per_s),
            c.secs,
            format!("{:.0} MiB/s", c.mib_per_s),
        );
        cpu_line(&c.cpu);
        print_usage_line(&c.usage);
    }
    for i in &r.ingest {
        line(
            &format!("edge ingest, durability {}", i.durability),
            fmt_rate(i.records_per_s),
            i.secs,
            format!("p99 {:.0}ms", i.request_p99_ms),
        );
        cpu_line(&i.cpu);
        print_usage_line(&i.usage);
    }
    if let Some(sl) = &r.syslog {
        line(
            &format!("syslog TCP ingest, durability {}", sl.durability),
            fmt_rate(sl.messages_per_s),
            sl.secs,
            format!("{} conns", sl.connections),
        );
        print_usage_line(&sl.usage);
    }
    if let Some(o) = &r.otlp {
        line(
            "edge ingest, OTLP/HTTP protobuf (process-crash)",
            fmt_rate(o.records_per_s),
            o.secs,
            format!("p99 {:.0}ms", o.request_p99_ms),
        );
        print_usage_line(&o.usage);
    }
    if let Some(e) = &r.e2e {
        line(
            "end to end (first send -> last row committed)",
            fmt_rate(e.records_per_s),
            e.secs,
            e.ratio_to_copy
                .map_or("-".into(), |x| format!("{x:.2}xCOPY")),
        );
        println!(
            "      agent peak RSS {} MB, aggregator peak RSS {} MB, agent acked all after {:.2}s",
            opt(e.agent_peak_rss_mb, ""),
            opt(e.aggregator_peak_rss_mb, ""),
            e.ingest_secs
        );
        println!(
            "      agent idle: RSS {} MB, {} fds, {} threads; busy (max): RSS {} MB, {} fds, {} threads",
            opt(e.agent_idle.rss_mb, ""),
            e.agent_idle.fds.unwrap_or(0),
            e.agent_idle.threads.unwrap_or(0),
            opt(e.agent_busy.rss_mb, ""),
            e.agent_busy.fds.unwrap_or(0),
            e.agent_busy.threads.unwrap_or(0)
        );
        cpu_line(&e.cpu);
        print_usage_line(&e.usage);
    }
    if let Some(d) = &r.drain {
        line(
            "backlog drain (aggregator up -> last row)",
            fmt_rate(d.records_per_s),
            d.secs,
            format!("{} MB", opt(d.agent_peak_rss_mb, "")),
        );
        println!(
            "      agent peak RSS while draining {} MB (lifetime {} MB); buffering took {:.2}s",
            opt(d.agent_peak_rss_mb, ""),
            opt(d.agent_peak_rss_mb_lifetime, ""),
            d.fill_secs
        );
        cpu_line(&d.cpu);
        print_usage_line(&d.usage);
    }
    for f in &r.freshness {
        println!(
            "{:<46} {:>16} {:>10} {:>10}",
            format!(
                "freshness at {:.0} rec/s, {}",
                f.target_records_per_s, f.setting
            ),
            format!("p50 {:.0} ms", f.p50_ms),
            format!("p99 {:.0}", f.p99_ms),
            format!("max {:.0}", f.max_ms)
        );
        println!(
            "      {} records in requests of {}, p90 {:.0} ms, offered {:.0} rec/s, errors {}",
            f.records, f.request_records, f.p90_ms, f.offered_records_per_s, f.errors
        );
        cpu_line(&f.cpu);
        print_usage_line(&f.usage);
    }
    if let Some(l) = &r.latency {
        println!(
            "{:<46} {:>16} {:>10} {:>10}",
            format!("batch ack latency at {:.0} rec/s", l.target_records_per_s),
            format!("p50 {:.1} ms", l.p50_ms),
            format!("p99 {:.1}", l.p99_ms),
            format!("max {:.0}", l.max_ms)
        );
        println!(
            "      {} batches of {}, p90 {:.1} ms, mean {:.1} ms, {} over 50 ms, errors {}",
            l.batches, l.batch_records, l.p90_ms, l.mean_ms, l.slow_batches, l.errors
        );
        if let Some(s) = &l.server {
            println!(
                "      server: {} timed + {} requested checkpoints, {} pages written by backends, {:.0} MB WAL ({} full-page images, write {:.0} ms, sync {:.0} ms), WAL files {} -> {}",
                s.checkpoints_timed,
                s.checkpoints_requested,
                s.buffers_backend,
                s.wal_bytes as f64 / 1e6,
                s.wal_full_page_images,
                s.wal_write_ms,
                s.wal_sync_ms,
                s.wal_files_before,
                s.wal_files_after
            );
        }
        print_usage_line(&l.usage);
    }
    if let Some(w) = &r.wire {
        println!(
            "{:<46} {:>16} {:>10} {:>10}",
            format!(
                "wire bytes/record (gzip {}, batches of {})",
                w.level, w.batch_records
            ),
            format!("{:.1} B", w.wire_bytes_per_record),
            format!("{:.1} raw", w.raw_bytes_per_record),
            format!("{:.3}x", w.ratio_to_raw)
        );
        for l in &w.levels {
            println!(
                "      level {}: {:.1} B/record ({:.3} x raw), encode_batch {:.0} MiB/s of JSON (render-then-gzip {:.0} MiB/s)",
                l.level,
                l.wire_bytes_per_record,
                l.ratio_to_raw,
                l.encode_mib_per_s,
                l.one_shot_mib_per_s
            );
        }
    }
    let mb = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1e6));
    println!(
        "binary sizes: dcs-edge {} MB ({} stripped), dcs-aggregator {} MB ({} stripped)",
        mb(Some(r.dcs_edge_binary_bytes)),
        mb(r.dcs_edge_stripped_bytes),
        mb(Some(r.dcs_aggregator_binary_bytes)),
        mb(r.dcs_aggregator_stripped_bytes)
    );
    if !r.noisy_steps.is_empty() {
        println!();
        println!(
            "NOTE: other processes used more than 10% of the machine during: {} (figures are noisy)",
            r.noisy_steps.join(", ")
        );
    }
}

// ---------------------------------------------------------------- main

/// Ctrl-C: exit 130 without a backtrace, after the run was dropped.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

fn main() -> anyhow::Result<()> {
    // `dcs-bench report FILE [--doc DOC.md]`: the headline table of a run.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("report") {
        return report(&argv[2..]);
    }
    let mut args = Args::parse();
    if args.quick {
        args.duration = 2.0;
        args.runs = 1;
        args.skip.push("freshness-sweep".into());
    }
    for s in &args.skip {
        ensure!(
            STEPS.contains(&s.as_str()),
            "unknown step {s:?} in --skip; steps: {}",
            STEPS.join(", ")
        );
    }
    ensure!(args.records != Some(0), "--records must be positive");
    ensure!(args.runs > 0, "--runs must be positive");
    ensure!(args.duration > 0.0, "--duration must be positive");
    ensure!(
        args.request_records > 0,
        "--request-records must be positive"
    );
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            // Ctrl-C or SIGTERM drops the run: its services are killed and its
            // databases dropped by their Drop impls instead of being left behind.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                result = run(args) => result,
                _ = tokio::signal::ctrl_c() => Err(Interrupted.into()),
                _ = term.recv() => Err(Interrupted.into()),
            }
        })
        .inspect_err(|e| {
            if e.is::<Interrupted>() {
                eprintln!("dcs-bench: interrupted; services stopped, databases dropped");
                std::process::exit(130);
            }
        })
}

/// Prints the markdown headline of a `bench.json`, or with `--doc FILE`
/// writes it into FILE between its `bench:headline` markers.
fn report(rest: &[String]) -> anyhow::Result<()> {
    let (file, doc) = match rest {
        [file] => (file, None),
        [file, flag, doc] if flag == "--doc" => (file, Some(doc)),
        _ => bail!("usage: dcs-bench report BENCH.json [--doc PERFORMANCE.md]"),
    };
    let text = std::fs::read_to_string(file).with_context(|| format!("read {file}"))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parse {file}"))?;
    let table = summary::markdown(&json)?;
    match doc {
        None => print!("{table}"),
        Some(doc) => {
            let old = std::fs::read_to_string(doc).with_context(|| format!("read {doc}"))?;
            std::fs::write(doc, summary::splice(&old, &table)?)
                .with_context(|| format!("write {doc}"))?;
            println!("updated the headline in {doc}");
        }
    }
    Ok(())
}

fn progress(msg: &str) {
    eprintln!(
        "[dcs-bench {:>7.1}s] {msg}",
        START.get_or_init(Instant::now).elapsed().as_secs_f64()
    );
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

async fn run(args: Args) -> anyhow::Result<()> {
    progress("starting");
    dcs_shared::tls::install_crypto_provider();
    let edge_bin = binary("dcs-edge");
    let agg_bin = binary("dcs-aggregator");

    // Kept until the end: dropping it stops and deletes a private cluster.
    let (cluster, pg_admin) = match args.pg_cluster.as_str() {
        "shared" => (None, dcs_tests::pg::admin_url()),
        mode => {
            let c = start_cluster(mode == "tuned", &args.pg_set).await?;
            let url = c.url();
            (Some(c), url)
        }
    };
    let pg_version = {
        let url = pg_admin.clone();
        let mut conn = sqlx::PgConnection::connect(&url)
            .await
            .with_context(|| format!("connect to PostgreSQL at {url} (set DCS_TEST_PG_URL)"))?;
        let v: String = sqlx::query_scalar("SELECT version()")
            .fetch_one(&mut conn)
            .await?;
        let _ = conn.close().await;
        v
    };
    let machine = Machine::probe(pg_version);
    println!("== Machine ==");
    println!(
        "cores {} ({}), memory {} MiB, kernel {}, load avg (1m) at start {:.2}",
        machine.cores,
        machine.cpu_model,
        machine.memory_mib,
        machine.kernel,
        machine.load_avg_1m_at_start
    );
    println!("{} ({} server)", machine.postgres, args.pg_cluster);
    if args.pg_cluster != "shared" {
        let mut conn = sqlx::PgConnection::connect(&pg_admin).await?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY($1) ORDER BY name",
        )
        .bind(
            TUNED_SETTINGS
                .iter()
                .map(|(n, _)| n.to_string())
                .chain(["wal_init_zero".to_owned(), "synchronous_commit".to_owned()])
                .chain(args.pg_set.iter().filter_map(|kv| Some(kv.split_once('=')?.0.to_owned())))
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut conn)
        .await?;
        let _ = conn.close().await;
        println!(
            "settings: {}",
            rows.iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }

    let generator = Generator::new(args.record_bytes);
    let raw_per_record = {
        let sample = 1000;
        (0..sample)
            .map(|i| generator.record(i).line.len() as f64)
            .sum::<f64>()
            / sample as f64
    };
    let config = RunConfig {
        duration_s: args.duration,
        runs: args.runs,
        sizes: None,
        record_bytes: args.record_bytes,
        raw_bytes_per_record: raw_per_record,
        clients: args.clients,
        request_records: args.request_records,
        agent_max_in_flight: args
            .max_in_flight
            .unwrap_or(dcs_edge::config::DEFAULT_MAX_IN_FLIGHT),
        agent_compression_level: args.compression_level(),
        agent_max_records: args
            .max_records
            .unwrap_or(dcs_edge::config::DEFAULT_BATCH_MAX_RECORDS),
        agent_linger_ms: args
            .linger_ms
            .unwrap_or(dcs_edge::config::DEFAULT_LINGER.as_millis() as u64),
        aggregator_max_connections: args.agg_max_connections,
        pg_synchronous_commit: args.pg_synchronous_commit.clone(),
        skip: args.skip.clone(),
    };
    println!(
        "== Config == {} run(s) of {}-second steps, records of ~{:.0} B raw JSON, {} clients x {} records/request, agent max_in_flight {} compression {} max_records {} linger {}ms, aggregator max_connections {}, synchronous_commit {}",
        config.runs,
        config.duration_s,
        config.raw_bytes_per_record,
        config.clients,
        config.request_records,
        config.agent_max_in_flight,
        config.agent_compression_level,
        config.agent_max_records,
        config.agent_linger_ms,
        config
            .aggregator_max_connections
            .map_or("default".into(), |c| c.to_string()),
        config.pg_synchronous_commit.as_deref().unwrap_or("default")
    );

    if args.sweep {
        let n = args.records.unwrap_or(SWEEP_RECORDS);
        let (bodies, _) = Bodies::new(generator, n, args.request_records);
        let sweep = sweep::run(&args, &pg_admin, &bodies, generator).await?;
        if let Some(out) = &args.out {
            let doc = serde_json::json!({ "machine": machine, "config": config, "sweep": sweep });
            write_json(out, &doc)?;
            println!("\nwrote {}", out.display());
        }
        return Ok(());
    }
    let sizes = match args.records {
        Some(n) => {
            let n = n.div_ceil(args.request_records) * args.request_records;
            Sizes {
                copy: n,
                ingest: n,
                e2e: n,
                calibrated: false,
            }
        }
        None => calibrate(&args, &pg_admin, generator).await?,
    };
    progress(&format!(
        "records per step: COPY {}, ingest {}, end to end and drain {}{}",
        sizes.copy,
        sizes.ingest,
        sizes.e2e,
        if sizes.calibrated {
            " (calibrated)"
        } else {
            " (--records)"
        }
    ));
    let t = Instant::now();
    let (bodies, _) = Bodies::new(generator, sizes.ingest.max(sizes.e2e), args.request_records);
    progress(&format!(
        "generated {} requests{} in {:.1}s",
        bodies.count(),
        if bodies.cache.is_some() {
            " (cached)"
        } else {
            " (streamed)"
        },
        t.elapsed().as_secs_f64()
    ));
    let world = World::new(&args, &pg_admin, &bodies, generator)?;
    let edge_stripped = stripped_size(&edge_bin, world.dir.path());
    let agg_stripped = stripped_size(&agg_bin, world.dir.path());
    let mut runs = Vec::new();
    for k in 0..args.runs {
        progress(&format!("run {} of {}", k + 1, args.runs));
        let mut r = run_once(&world, &sizes).await?;
        r.dcs_edge_binary_bytes = std::fs::metadata(&edge_bin).map_or(0, |m| m.len());
        r.dcs_aggregator_binary_bytes = std::fs::metadata(&agg_bin).map_or(0, |m| m.len());
        r.dcs_edge_stripped_bytes = edge_stripped;
        r.dcs_aggregator_stripped_bytes = agg_stripped;
        print_report(&r, k + 1);
        runs.push(r);
        if let Some(out) = &args.out {
            // After every run, so a later run's failure keeps the earlier ones.
            write_json(out, &bench_doc(&args, &machine, &config, sizes, &runs))?;
        }
    }
    let doc = bench_doc(&args, &machine, &config, sizes, &runs);
    print_summary(&doc);
    if let Some(out) = &args.out {
        write_json(out, &doc)?;
        println!(
            "\nwrote {} (docs table: dcs-bench report {})",
            out.display(),
            out.display()
        );
    }
    if let (Some(c), Some(dir)) = (&cluster, &args.perf_dir) {
        // The private server's log holds its checkpoints and slow statements.
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::copy(c.log_path(), dir.join("postgres.log"));
    }
    drop(cluster);
    Ok(())
}

/// The runs so far with their headline and targets.
fn bench_doc(
    args: &Args,
    machine: &Machine,
    config: &RunConfig,
    sizes: Sizes,
    runs: &[Results],
) -> BenchDoc {
    let headline = summary::headline(runs);
    let targets = summary::targets(&headline);
    BenchDoc {
        label: args.label.clone(),
        commit: commit(),
        date_utc: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        machine: machine.clone(),
        config: RunConfig {
            duration_s: args.duration,
            sizes: Some(sizes),
            ..config.clone()
        },
        headline,
        targets,
        runs: runs.to_vec(),
    }
}

/// Records per step, sized so that each step runs about `--duration`.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sizes {
    copy: u64,
    ingest: u64,
    /// End to end and the backlog drain (which runs at about the same rate).
    e2e: u64,
    /// From a calibration (false: `--records`).
    calibrated: bool,
}

/// Records per calibration step: long enough for a rate within ~20%.
const CALIBRATION_RECORDS: u64 = 50_000;

/// A quick pass of COPY, ingest and end to end on a small data set, whose
/// rates size the real steps to `--duration`.
async fn calibrate(args: &Args, pg_admin: &str, generator: Generator) -> anyhow::Result<Sizes> {
    let cal = CALIBRATION_RECORDS.div_ceil(args.request_records) * args.request_records;
    let (bodies, _) = Bodies::new(generator, cal, args.request_records);
    let w = World::new(args, pg_admin, &bodies, generator)?;
    let size = |rate: f64| {
        let n = ((rate * args.duration) as u64).max(cal);
        n.div_ceil(args.request_records) * args.request_records
    };
    progress(&format!("calibrating with {cal} records"));
    let copy = step_copy(&w, cal, 2, false)
        .await
        .context("calibrate COPY")?;
    let ingest = step_ingest(&w, &bodies, "process-crash")
        .await
        .context("calibrate ingest")?;
    let e2e = step_e2e(&w, &bodies, None).await.context("calibrate e2e")?;
    progress(&format!(
        "calibration: COPY {:.0}, ingest {:.0}, e2e {:.0} rec/s",
        copy.records_per_s, ingest.records_per_s, e2e.records_per_s
    ));
    Ok(Sizes {
        copy: size(copy.records_per_s),
        ingest: size(ingest.records_per_s),
        e2e: size(e2e.records_per_s),
        calibrated: true,
    })
}

/// The commit of the working tree the bench runs from (`-dirty` when it has
/// changes), or what `DCS_BENCH_COMMIT` says.
fn commit() -> String {
    if let Ok(c) = std::env::var("DCS_BENCH_COMMIT") {
        return c;
    }
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=7"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".into(), |s| s.trim().to_owned())
}

/// Every step once; the caller repeats it `--runs` times.
async fn run_once(world: &World, sizes: &Sizes) -> anyhow::Result<Results> {
    let args = &world.args;
    let mut results = Results {
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        load_avg_1m_start: sys::load_avg_1m(),
        load_avg_1m_end: 0.0,
        copy: Vec::new(),
        ingest: Vec::new(),
        syslog: None,
        otlp: None,
        e2e: None,
        drain: None,
        freshness: Vec::new(),
        latency: None,
        wire: None,
        dcs_edge_binary_bytes: 0,
        dcs_aggregator_binary_bytes: 0,
        dcs_edge_stripped_bytes: None,
        dcs_aggregator_stripped_bytes: None,
        noisy_steps: Vec::new(),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut noisy = BTreeSet::new();

    if args.wants("copy") {
        let counts: &[usize] = if args.wants("copy-parallel") {
            &[1, 2, 4]
        } else {
            &[1]
        };
        for &conns in counts {
            progress(&format!("COPY into records over {conns} connection(s)"));
            let c = step_copy(world, sizes.copy, conns, false)
                .await
                .context("step copy")?;
            progress(&format!("COPY x{conns}: {:.0} rec/s", c.records_per_s));
            if c.usage.noisy(cores) {
                noisy.insert(format!("copy x{conns}"));
            }
            results.copy.push(c);
        }
        let best = results.best_copy().map_or(1, |c| c.connections);
        progress(&format!("COPY into a bare table over {best} connection(s)"));
        let c = step_copy(world, sizes.copy, best, true)
            .await
            .context("step copy (bare)")?;
        progress(&format!("COPY bare x{best}: {:.0} rec/s", c.records_per_s));
        results.copy.push(c);
    }
    if args.wants("ingest") {
        for durability in ["process-crash", "power-loss"] {
            if durability == "power-loss" && !args.wants("power-loss") {
                continue;
            }
            progress(&format!("edge ingest at {durability}"));
            let i = step_ingest(world, &world.bodies.prefix(sizes.ingest), durability)
                .await
                .with_context(|| format!("step ingest ({durability})"))?;
            progress(&format!(
                "ingest {durability}: {:.0} rec/s",
                i.records_per_s
            ));
            if i.usage.noisy(cores) {
                noisy.insert(format!("ingest {durability}"));
            }
            results.ingest.push(i);
        }
    }
    if args.wants("syslog") {
        // Compared with the NDJSON ingest at the same durability: the
        // default power-loss one when it ran, else process-crash.
        let durability =
            if args.wants("ingest") && args.wants("power-loss") || !args.wants("ingest") {
                "power-loss"
            } else {
                "process-crash"
            };
        progress(&format!("syslog TCP ingest at {durability}"));
        let sl = step_syslog(world, durability, sizes.ingest)
            .await
            .context("step syslog")?;
        progress(&format!("syslog: {:.0} msg/s", sl.messages_per_s));
        if sl.usage.noisy(cores) {
            noisy.insert("syslog".to_owned());
        }
        results.syslog = Some(sl);
    }
    if args.wants("otlp") {
        progress("edge ingest of OTLP/HTTP protobuf log batches");
        let bodies = world.bodies.prefix(sizes.ingest).as_otlp();
        let o = step_ingest_of(world, "process-crash", &bodies, "otlp")
            .await
            .context("step otlp")?;
        progress(&format!("otlp: {:.0} rec/s", o.records_per_s));
        if o.usage.noisy(cores) {
            noisy.insert("otlp".to_owned());
        }
        results.otlp = Some(o);
    }
    if args.wants("e2e") {
        progress("end to end");
        let copy_rate = results.best_copy().map(|c| c.records_per_s);
        let e = step_e2e(world, &world.bodies.prefix(sizes.e2e), copy_rate)
            .await
            .context("step e2e")?;
        progress(&format!("e2e: {:.0} rec/s", e.records_per_s));
        if e.usage.noisy(cores) {
            noisy.insert("e2e".to_owned());
        }
        results.e2e = Some(e);
    }
    if args.wants("drain") {
        progress("backlog drain");
        let d = step_drain(world, &world.bodies.prefix(sizes.e2e))
            .await
            .context("step drain")?;
        progress(&format!("drain: {:.0} rec/s", d.records_per_s));
        if d.usage.noisy(cores) {
            noisy.insert("drain".to_owned());
        }
        results.drain = Some(d);
    }
    let half_load = match (args.ack_rate, &results.e2e) {
        (Some(r), _) => r,
        (None, Some(e)) => e.records_per_s / 2.0,
        (None, None) => {
            progress("no e2e rate measured and no --ack-rate; half load taken as 5000 rec/s");
            5_000.0
        }
    };
    if args.wants("freshness") {
        for (k, setting) in freshness::SETTINGS.iter().enumerate() {
            if k > 0 && !args.wants("freshness-sweep") {
                break;
            }
            // The sweep's points run half as long: they show a trend, the
            // defaults carry the target.
            let secs = if k == 0 {
                args.duration
            } else {
                args.duration / 2.0
            };
            progress(&format!(
                "freshness at {half_load:.0} rec/s, {}",
                setting.name
            ));
            let f = freshness::step(world, setting, half_load, secs)
                .await
                .with_context(|| format!("step freshness ({})", setting.name))?;
            if f.usage.noisy(cores) {
                noisy.insert(format!("freshness {}", setting.name));
            }
            results.freshness.push(f);
        }
    }
    if args.wants("latency") {
        progress(&format!("batch ack latency at {half_load:.0} rec/s"));
        let l = step_latency(world, half_load)
            .await
            .context("step latency")?;
        progress(&format!(
            "latency: p50 {:.1} ms p99 {:.1} ms",
            l.p50_ms, l.p99_ms
        ));
        if l.usage.noisy(cores) {
            noisy.insert("latency".to_owned());
        }
        results.latency = Some(l);
    }
    if args.wants("wire") {
        progress("wire bytes");
        let (g, level) = (world.generator, args.compression_level());
        let n = sizes.e2e.min(WIRE_RECORDS);
        results.wire = Some(tokio::task::spawn_blocking(move || step_wire(g, n, level)).await?);
    }
    results.noisy_steps = noisy.into_iter().collect();
    results.load_avg_1m_end = sys::load_avg_1m();
    Ok(results)
}

/// What `--out` holds: the runs, their headline and the targets.
#[derive(Debug, Clone, Serialize)]
struct BenchDoc {
    label: Option<String>,
    commit: String,
    /// When the last run ended.
    date_utc: String,
    machine: Machine,
    config: RunConfig,
    headline: Vec<summary::Headline>,
    targets: Vec<summary::TargetLine>,
    runs: Vec<Results>,
}

fn print_summary(doc: &BenchDoc) {
    println!();
    println!(
        "== Headline: median and min-max of {} run(s), commit {} ==",
        doc.runs.len(),
        doc.commit
    );
    for h in &doc.headline {
        println!(
            "{:<66} {:>12} {:>26} {}",
            h.name,
            summary::num(h.median, &h.unit),
            format!(
                "{} - {}",
                summary::num(h.min, &h.unit),
                summary::num(h.max, &h.unit)
            ),
            h.unit
        );
    }
    println!();
    println!("== Targets (on the medians) ==");
    for t in &doc.targets {
        let v = |x: Option<f64>| x.map_or("-".into(), |x| summary::num(x, &t.unit));
        println!(
            "{:<52} {:>10} ({} - {}) {:>12}  {}",
            t.name,
            v(t.median),
            v(t.min),
            v(t.max),
            t.target,
            summary::verdict(t.pass)
        );
    }
    let loads: Vec<String> = doc
        .runs
        .iter()
        .map(|r| format!("{:.2}-{:.2}", r.load_avg_1m_start, r.load_avg_1m_end))
        .collect();
    println!(
        "load average (1m) at start-end of each run: {}",
        loads.join(", ")
    );
}

/// PostgreSQL settings for a write-heavy collector on this machine size
/// (24 GiB, 2 cores); see docs/PERFORMANCE.md, "PostgreSQL settings".
const TUNED_SETTINGS: &[(&str, &str)] = &[
    ("shared_buffers", "2GB"),
    ("max_wal_size", "8GB"),
    ("min_wal_size", "1GB"),
    ("checkpoint_timeout", "15min"),
    ("wal_buffers", "64MB"),
    ("wal_compression", "lz4"),
];

/// On every private cluster: its log says when checkpoints ran and which
/// statements were slow, so a latency stall can be matched to its cause
/// (`--perf-dir` keeps the log).
const OBSERVED_SETTINGS: &[(&str, &str)] = &[
    ("log_checkpoints", "on"),
    ("log_min_duration_statement", "40ms"),
    ("track_wal_io_timing", "on"),
    ("log_line_prefix", "%m [%p] "),
];

/// A fresh cluster of our own (initdb, port of its own), optionally tuned.
async fn start_cluster(tuned: bool, extra: &[String]) -> anyhow::Result<dcs_tests::pg::PgCluster> {
    let extra = extra
        .iter()
        .map(|kv| {
            let (name, value) = kv
                .split_once('=')
                .with_context(|| format!("--pg-set {kv:?}: expected NAME=VALUE"))?;
            ensure!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !value.contains('\''),
                "--pg-set {kv:?}: not a setting name and plain value"
            );
            Ok((name, value))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    progress(&format!(
        "starting a private PostgreSQL cluster ({})",
        if tuned { "tuned" } else { "stock settings" }
    ));
    let cluster = dcs_tests::pg::PgCluster::try_start().await?;
    {
        let mut conn = sqlx::PgConnection::connect(&cluster.url()).await?;
        let tuning = if tuned { TUNED_SETTINGS } else { &[] };
        for (name, value) in OBSERVED_SETTINGS.iter().chain(tuning).copied().chain(extra) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER SYSTEM SET {name} = '{value}'"
            )))
            .execute(&mut conn)
            .await?;
        }
        let _ = conn.close().await;
        cluster.stop("fast").await;
        cluster.start_again().await;
    }
    Ok(cluster)
}

/// Size of `bin` after `strip`, written to a scratch file in `dir`.
fn stripped_size(bin: &Path, dir: &Path) -> Option<u64> {
    let out = dir.join("stripped");
    let ok = std::process::Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .status()
        .ok()?
        .success();
    let size = ok
        .then(|| std::fs::metadata(&out).ok().map(|m| m.len()))
        .flatten();
    let _ = std::fs::remove_file(&out);
    size
}

fn write_json(out: &Path, results: &impl Serialize) -> anyhow::Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(results)? + "\n")
        .with_context(|| format!("write {}", out.display()))
}
