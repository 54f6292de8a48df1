//! `dcs-fleet`: the fleet benchmark. N agents, each with its own certificate,
//! buffer, epoch and connection (the agent's real forwarder, see
//! `dcs_tests::fleet`), deliver through HAProxy to two aggregator replicas
//! (release processes from target/release) and one PostgreSQL database.
//!
//! ```text
//! bash scripts/bench.sh --fleet [--agents 1,10,100,1000] [--runs 3] ...
//! ```
//!
//! Every step offers the same total load (`--offered` records/s, above what
//! the machine can ingest, so each step measures capacity), spread over N
//! agents: a tenth of them (rounded down) are heavy and offer
//! `--heavy-factor` times a light agent's rate. A step runs `--warmup`, then
//! measures for `--duration`: records/s into PostgreSQL, each light agent's
//! delivered share of what it offered (min / median / max), batch ack
//! p50/p99, RSS and CPU of each replica, open connections, PostgreSQL
//! connections and lock waits, CPU µs per record per tier, and the series
//! count of one replica's `/metrics`. It prints a table and one PASS/FAIL
//! line per target of the fleet issue. `--handshakes` adds the cost of
//! connection max age at the largest N (`limits.max_connection_age` short
//! against off).

#[path = "sys.rs"]
#[allow(dead_code)]
mod sys;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use serde::Serialize;

use dcs_tests::balancer::Cluster;
use dcs_tests::fleet::{AgentSample, Fleet, FleetConfig};
use dcs_tests::pg::TestDb;
use dcs_tests::pki::Pki;

/// RSS target per replica, MB (decimal).
const RSS_TARGET_MB: f64 = 256.0;
const TOTAL_TARGET: f64 = 0.8;
const FAIRNESS_TARGET: f64 = 0.5;
/// Batch outcomes that are neither success nor documented backpressure.
const FAILED_OUTCOMES: [&str; 6] = [
    "rejected",
    "too_large",
    "error",
    "unauthorized",
    "revoked",
    "conflict",
];

#[derive(Debug, Clone, Parser)]
#[command(
    name = "dcs-fleet",
    about = "DCS fleet benchmark",
    args_override_self = true
)]
struct Args {
    /// Fleet sizes to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    agents: Vec<usize>,
    /// Runs of every size (figures: median and min-max).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Total records/s offered by the whole fleet.
    #[arg(long, default_value_t = 60_000.0)]
    offered: f64,
    /// A heavy agent offers this many times a light agent's rate.
    #[arg(long, default_value_t = 10.0)]
    heavy_factor: f64,
    /// Of the fleet, this many are real `dcs-edge` processes.
    #[arg(long, default_value_t = 0)]
    real_agents: usize,
    #[arg(long, default_value_t = 200)]
    record_bytes: usize,
    /// Aggregator replicas behind HAProxy.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    warmup: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    duration: Duration,
    /// Where agent certificates are cached between runs.
    #[arg(long, default_value = "target/fleet-certs")]
    certs: PathBuf,
    /// Also measure the handshake cost of connection max age at the largest N.
    #[arg(long)]
    handshakes: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Default)]
struct StepResult {
    agents: usize,
    run: usize,
    max_connection_age: String,
    records_per_sec: f64,
    share_min: f64,
    share_median: f64,
    share_max: f64,
    /// min / median share among light agents.
    fairness: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    /// Peak RSS of each replica during the step, MB.
    rss_mb: Vec<f64>,
    /// CPU of each replica, in cores (CPU seconds per second).
    cpu_cores: Vec<f64>,
    connections_open: f64,
    pg_connections: i64,
    pg_lock_waits_max: i64,
    agents_us_per_record: f64,
    aggregators_us_per_record: f64,
    haproxy_us_per_record: f64,
    postgres_us_per_record: f64,
    /// Connections closed past max age per second (each one a new TLS handshake).
    handshakes_per_sec: f64,
    refused_batches: f64,
    failed_batches: f64,
    series: usize,
    acked: u64,
    missing: u64,
    duplicated: u64,
    busy_elsewhere: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(!args.agents.is_empty(), "--agents is empty");
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

fn progress(msg: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    eprintln!(
        "[dcs-fleet {:>7.1}s] {msg}",
        START.get_or_init(Instant::now).elapsed().as_secs_f64()
    );
}

async fn run(args: Args) -> anyhow::Result<()> {
    dcs_shared::tls::install_crypto_provider();
    let metrics = dcs_shared::metrics::install();
    std::fs::create_dir_all(&args.certs).context("create the certificate cache")?;
    let pki = Pki::cached(&args.certs);
    let mut results = Vec::new();
    for run in 1..=args.runs {
        for &n in &args.agents {
            progress(&format!("run {run}/{}: {n} agents", args.runs));
            let r = step(&args, &pki, &metrics, n, run, None).await?;
            print_step(&r);
            results.push(r);
        }
    }
    if args.handshakes {
        let n = *args.agents.iter().max().expect("non-empty");
        for age in ["10s", "0s"] {
            progress(&format!(
                "handshakes: {n} agents, max_connection_age = {age}"
            ));
            let r = step(&args, &pki, &metrics, n, 1, Some(age)).await?;
            print_step(&r);
            results.push(r);
        }
    }
    report(&args, &results);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&results)?)?;
        progress(&format!("results written to {}", out.display()));
    }
    Ok(())
}

/// One fleet size on a fresh database and fresh replicas.
async fn step(
    args: &Args,
    pki: &Pki,
    metrics: &dcs_shared::metrics::PrometheusHandle,
    n: usize,
    run: usize,
    max_age: Option<&str>,
) -> anyhow::Result<StepResult> {
    let dir = tempfile::Builder::new().prefix("dcs-fleet-").tempdir()?;
    let db = TestDb::new().await;
    let mut extra = vec![
        // Behind the balancer every connection comes from its address.
        ("CONNECTIONS__MAX_CONNECTIONS_PER_ADDRESS", "0".to_owned()),
        ("LOG__LEVEL", "warn".to_owned()),
    ];
    if let Some(age) = max_age {
        extra.push(("LIMITS__MAX_CONNECTION_AGE", format!("\"{age}\"")));
    }
    let cluster = Cluster::start(dir.path(), pki, &db.url, args.replicas, &extra).await;
    let heavy = n / 10;
    let weight = (n - heavy) as f64 + heavy as f64 * args.heavy_factor;
    let config = FleetConfig {
        tenant: "fleet".into(),
        agents: n,
        real_agents: args.real_agents.min(n),
        rate: args.offered / weight,
        heavy,
        heavy_factor: args.heavy_factor,
        record_bytes: args.record_bytes,
        aggregator_url: cluster.url(),
        dir: dir.path().join("agents"),
    };
    let started = Instant::now();
    let mut fleet = Fleet::start(&config, pki).await?;
    progress(&format!(
        "{n} agents started in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    tokio::time::sleep(args.warmup).await;

    let http = reqwest::Client::new();
    let pids: Vec<u32> = cluster
        .replicas
        .iter()
        .filter_map(|r| r.service.pid())
        .collect();
    for pid in &pids {
        sys::reset_peak_rss(*pid);
    }
    let before = Snapshot::take(&cluster, &fleet, &http, metrics, &pids).await;
    let procs_before = sys::ProcSnapshot::take();
    let mut lock_waits_max = 0i64;
    let mut pg_connections = 0i64;
    let until = Instant::now() + args.duration;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (conns, waits) = pg_activity(&db).await;
        pg_connections = pg_connections.max(conns);
        lock_waits_max = lock_waits_max.max(waits);
    }
    let after = Snapshot::take(&cluster, &fleet, &http, metrics, &pids).await;
    let procs_after = sys::ProcSnapshot::take();
    let secs = after.at.duration_since(before.at).as_secs_f64();
    let ingested = after.ingested - before.ingested;
    let per_record = |cpu: f64| {
        if ingested > 0.0 {
            cpu / ingested * 1e6
        } else {
            f64::NAN
        }
    };
    let shares = light_shares(&before.agents, &after.agents);
    let series = match cluster.replicas[0].metrics(&http).await {
        Some(text) => text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count(),
        None => 0,
    };
    let mut ours = pids.clone();
    ours.push(std::process::id());
    ours.push(cluster.balancer.pid());
    let busy_elsewhere = procs_before.others_since(&procs_after, &ours, 0.5 * secs);
    let (p50, p99) = quantiles(&before.ack_buckets, &after.ack_buckets);
    let mut result = StepResult {
        agents: n,
        run,
        max_connection_age: max_age.unwrap_or("default").to_owned(),
        records_per_sec: ingested / secs,
        share_min: shares.first().copied().unwrap_or(f64::NAN),
        share_median: median(&shares),
        share_max: shares.last().copied().unwrap_or(f64::NAN),
        fairness: shares.first().copied().unwrap_or(f64::NAN) / median(&shares),
        ack_p50_ms: p50 * 1e3,
        ack_p99_ms: p99 * 1e3,
        rss_mb: pids
            .iter()
            .map(|p| sys::peak_rss_kib(*p).unwrap_or(0) as f64 * 1.024 / 1e3)
            .collect(),
        cpu_cores: before
            .replica_cpu
            .iter()
            .zip(&after.replica_cpu)
            .map(|(a, b)| (b - a) / secs)
            .collect(),
        connections_open: after.connections_open,
        pg_connections,
        pg_lock_waits_max: lock_waits_max,
        agents_us_per_record: per_record(after.own_cpu - before.own_cpu),
        aggregators_us_per_record: per_record(
            after.replica_cpu.iter().sum::<f64>() - before.replica_cpu.iter().sum::<f64>(),
        ),
        haproxy_us_per_record: per_record(after.haproxy_cpu - before.haproxy_cpu),
        postgres_us_per_record: per_record(after.postgres_cpu - before.postgres_cpu),
        handshakes_per_sec: (after.max_age_closes - before.max_age_closes) / secs,
        refused_batches: after.refused - before.refused,
        failed_batches: after.failed,
        series,
        busy_elsewhere,
        ..StepResult::default()
    };
    fleet.stop_producing().await;
    let drained = fleet.drain(Duration::from_secs(180)).await;
    let v = fleet.verify(&db.pool).await?;
    result.acked = v.acked;
    result.missing = v.missing;
    result.duplicated = v.duplicated;
    if !drained {
        progress("warning: buffers did not drain within 180 s; missing counts what was left");
    }
    eprintln!(
        "scenario=fleet-{n} acked={} in_pg={} missing={} duplicated={} refused={}",
        v.acked, v.in_pg, v.missing, v.duplicated, result.refused_batches
    );
    fleet.stop().await;
    drop(cluster);
    Ok(result)
}

/// Counters read at the start and the end of the measured window.
struct Snapshot {
    at: Instant,
    ingested: f64,
    refused: f64,
    failed: f64,
    max_age_closes: f64,
    connections_open: f64,
    replica_cpu: Vec<f64>,
    own_cpu: f64,
    haproxy_cpu: f64,
    postgres_cpu: f64,
    agents: Vec<AgentSample>,
    /// `dcs_agent_batch_send_duration_seconds` buckets: (le, cumulative count).
    ack_buckets: Vec<(f64, f64)>,
}

impl Snapshot {
    async fn take(
        cluster: &Cluster,
        fleet: &Fleet,
        http: &reqwest::Client,
        metrics: &dcs_shared::metrics::PrometheusHandle,
        pids: &[u32],
    ) -> Snapshot {
        let mut refused = 0.0;
        for outcome in ["throttled", "unavailable"] {
            refused += cluster
                .sum(
                    http,
                    &format!("dcs_aggregator_batches_total{{outcome=\"{outcome}\"}}"),
                )
                .await;
        }
        let mut failed = 0.0;
        for outcome in FAILED_OUTCOMES {
            failed += cluster
                .sum(
                    http,
                    &format!("dcs_aggregator_batches_total{{outcome=\"{outcome}\"}}"),
                )
                .await;
        }
        let agents = fleet.sample().await;
        let text = dcs_shared::metrics::render(metrics);
        Snapshot {
            at: Instant::now(),
            ingested: cluster
                .sum(http, "dcs_aggregator_records_ingested_total")
                .await,
            refused,
            failed,
            max_age_closes: cluster
                .sum(
                    http,
                    "dcs_aggregator_connections_closed_total{reason=\"max_age\"}",
                )
                .await,
            connections_open: cluster.sum(http, "dcs_aggregator_connections_open").await,
            replica_cpu: pids
                .iter()
                .map(|p| sys::cpu_secs(*p).unwrap_or(0.0))
                .collect(),
            own_cpu: sys::own_cpu_secs(),
            haproxy_cpu: sys::cpu_secs(cluster.balancer.pid()).unwrap_or(0.0),
            postgres_cpu: sys::postgres_cpu_secs(),
            agents,
            ack_buckets: buckets(&text, "dcs_agent_batch_send_duration_seconds_bucket"),
        }
    }
}

/// Delivered share of what each light agent offered in the window, sorted.
fn light_shares(before: &[AgentSample], after: &[AgentSample]) -> Vec<f64> {
    let mut shares: Vec<f64> = before
        .iter()
        .zip(after)
        .filter(|(a, _)| !a.heavy)
        .filter_map(|(a, b)| {
            let offered = b.offered.saturating_sub(a.offered);
            (offered > 0).then(|| b.delivered.saturating_sub(a.delivered) as f64 / offered as f64)
        })
        .collect();
    shares.sort_by(f64::total_cmp);
    shares
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// PostgreSQL connections of the aggregators and lock waits right now.
async fn pg_activity(db: &TestDb) -> (i64, i64) {
    let conns: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dcs-aggregator' AND datname = $1",
    )
    .bind(db.name())
    .fetch_one(&db.pool)
    .await
    .unwrap_or(0);
    let waits: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE NOT granted")
        .fetch_one(&db.pool)
        .await
        .unwrap_or(0);
    (conns, waits)
}

/// (le, cumulative count) of a histogram's buckets, summed over label sets.
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let mut by_le: std::collections::BTreeMap<u64, (f64, f64)> = Default::default();
    for line in text.lines().filter(|l| l.starts_with(name)) {
        let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::INFINITY)
        };
        let count: f64 = line
            .split_whitespace()
            .last()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += count;
    }
    let mut v: Vec<(f64, f64)> = by_le.into_values().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// p50 and p99 of the observations between two bucket snapshots, by linear
/// interpolation inside the bucket.
fn quantiles(before: &[(f64, f64)], after: &[(f64, f64)]) -> (f64, f64) {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            let was = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, c - was)
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, c)| *c);
    let q = |p: f64| {
        if total <= 0.0 {
            return f64::NAN;
        }
        let rank = p * total;
        let mut lower = (0.0, 0.0);
        for &(le, c) in &delta {
            if c >= rank {
                if le.is_infinite() {
                    return lower.0;
                }
                let span = c - lower.1;
                let frac = if span > 0.0 {
                    (rank - lower.1) / span
                } else {
                    1.0
                };
                return lower.0 + (le - lower.0) * frac;
            }
            lower = (le, c);
        }
        lower.0
    };
    (q(0.50), q(0.99))
}

fn print_step(r: &StepResult) {
    eprintln!(
        "fleet N={} run={} age={}: {:.0} rec/s, share {:.2}/{:.2}/{:.2} (fairness {:.2}), ack p50 {:.0} ms p99 {:.0} ms, RSS {:?} MB, CPU {:?} cores, conns {}, pg conns {}, lock waits {}, µs/rec agents {:.1} aggregators {:.1} haproxy {:.1} postgres {:.1}, handshakes/s {:.1}, refused {}, failed {}, series {}, busy elsewhere {:?}",
        r.agents,
        r.run,
        r.max_connection_age,
        r.records_per_sec,
        r.share_min,
        r.share_median,
        r.share_max,
        r.fairness,
        r.ack_p50_ms,
        r.ack_p99_ms,
        r.rss_mb.iter().map(|v| v.round()).collect::<Vec<_>>(),
        r.cpu_cores
            .iter()
            .map(|v| (v * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        r.connections_open,
        r.pg_connections,
        r.pg_lock_waits_max,
        r.agents_us_per_record,
        r.aggregators_us_per_record,
        r.haproxy_us_per_record,
        r.postgres_us_per_record,
        r.handshakes_per_sec,
        r.refused_batches,
        r.failed_batches,
        r.series,
        r.busy_elsewhere,
    );
}

/// Median and min-max of `f` over the default-age runs of fleet size `n`.
fn summary(results: &[StepResult], n: usize, f: impl Fn(&StepResult) -> f64) -> (f64, f64, f64) {
    let mut v: Vec<f64> = results
        .iter()
        .filter(|r| r.agents == n && r.max_connection_age == "default")
        .map(f)
        .filter(|x| !x.is_nan())
        .collect();
    v.sort_by(f64::total_cmp);
    (
        median(&v),
        v.first().copied().unwrap_or(f64::NAN),
        v.last().copied().unwrap_or(f64::NAN),
    )
}

fn report(args: &Args, results: &[StepResult]) {
    let cell = |(m, lo, hi): (f64, f64, f64), digits: usize| {
        if args.runs > 1 {
            format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
        } else {
            format!("{m:.digits$}")
        }
    };
    println!();
    println!(
        "| N | records/s | share min / median / max | fairness | ack p50 / p99 ms | RSS MB (max replica) | CPU cores (sum) | conns | PG conns | lock waits | µs/rec agents / aggregators / haproxy / postgres | series |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &args.agents {
        let s = |f: &dyn Fn(&StepResult) -> f64| summary(results, n, f);
        println!(
            "| {n} | {} | {} / {} / {} | {} | {} / {} | {} | {} | {} | {} | {} | {} / {} / {} / {} | {} |",
            cell(s(&|r| r.records_per_sec), 0),
            cell(s(&|r| r.share_min), 2),
            cell(s(&|r| r.share_median), 2),
            cell(s(&|r| r.share_max), 2),
            cell(s(&|r| r.fairness), 2),
            cell(s(&|r| r.ack_p50_ms), 0),
            cell(s(&|r| r.ack_p99_ms), 0),
            cell(s(&|r| r.rss_mb.iter().copied().fold(0.0, f64::max)), 0),
            cell(s(&|r| r.cpu_cores.iter().sum()), 2),
            cell(s(&|r| r.connections_open), 0),
            cell(s(&|r| r.pg_connections as f64), 0),
            cell(s(&|r| r.pg_lock_waits_max as f64), 0),
            cell(s(&|r| r.agents_us_per_record), 1),
            cell(s(&|r| r.aggregators_us_per_record), 1),
            cell(s(&|r| r.haproxy_us_per_record), 1),
            cell(s(&|r| r.postgres_us_per_record), 1),
            cell(s(&|r| r.series as f64), 0),
        );
    }
    for r in results.iter().filter(|r| r.max_connection_age != "default") {
        println!(
            "handshakes: N={} max_connection_age={}: {:.1} handshakes/s, aggregator CPU {:.2} cores, {:.1} µs/record",
            r.agents,
            r.max_connection_age,
            r.handshakes_per_sec,
            r.cpu_cores.iter().sum::<f64>(),
            r.aggregators_us_per_record
        );
    }
    println!();
    let smallest = *args.agents.iter().min().expect("non-empty");
    let largest = *args.agents.iter().max().expect("non-empty");
    let rate = |n| summary(results, n, |r| r.records_per_sec).0;
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
    let (base, top) = (rate(smallest), rate(largest));
    println!(
        "{} total rate: N={largest} {top:.0} rec/s >= {TOTAL_TARGET} x N={smallest} {base:.0} rec/s",
        verdict(top >= TOTAL_TARGET * base)
    );
    let fairness = args
        .agents
        .iter()
        .filter(|&&n| n > 1)
        .map(|&n| summary(results, n, |r| r.fairness).0)
        .fold(f64::INFINITY, f64::min);
    println!(
        "{} fairness: lowest min/median share among equal agents {fairness:.2} >= {FAIRNESS_TARGET}",
        verdict(fairness >= FAIRNESS_TARGET || !fairness.is_finite())
    );
    let rss = results
        .iter()
        .flat_map(|r| r.rss_mb.iter().copied())
        .fold(0.0, f64::max);
    println!(
        "{} RSS: largest replica peak {rss:.0} MB <= {RSS_TARGET_MB} MB",
        verdict(rss <= RSS_TARGET_MB)
    );
    let failed: f64 = results.iter().map(|r| r.failed_batches).sum();
    let lost: u64 = results.iter().map(|r| r.missing + r.duplicated).sum();
    println!(
        "{} failures: {failed} batches failed other than 429/503; {lost} records missing or duplicated",
        verdict(failed == 0.0 && lost == 0)
    );
}
