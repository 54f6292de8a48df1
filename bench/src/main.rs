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
//!
//! Layout: `steps` runs every step once, in order; each group of steps has
//! its module (`copy`; `ingest` with syslog and OTLP; `e2e` with drain and
//! latency; `freshness`; `wire_bytes`), run on the services of `world` with
//! the request bodies of `bodies` and measured by `meter`. `results` is what
//! a run records, `report` prints it, `cluster` starts a private PostgreSQL
//! and `sweep` compares knob settings.

mod bodies;
mod cluster;
mod copy;
mod e2e;
mod freshness;
mod ingest;
mod meter;
mod otlp;
mod records;
mod report;
mod results;
mod steps;
mod summary;
mod sweep;
mod sys;
mod wire_bytes;
mod world;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, ensure};
use clap::Parser;
use serde::Serialize;
use sqlx::Connection as _;

use dcs_tests::process::binary;

use bodies::Bodies;
use cluster::{TUNED_SETTINGS, start_cluster};
use copy::step_copy;
use e2e::step_e2e;
use ingest::step_ingest;
use records::Generator;
use report::{print_report, print_summary};
use results::{BenchDoc, Results, RunConfig};
use steps::run_once;
use sys::Machine;
use world::World;

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

/// Records per setting in `--sweep` without `--records`.
const SWEEP_RECORDS: u64 = 200_000;

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
        return report::command(&argv[2..]);
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
