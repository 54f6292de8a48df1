//! The disaster-recovery drill: PostgreSQL backed up with pgBackRest while
//! records flow, destroyed, restored to a point in time, and brought back to
//! every acknowledged record by the agents' replay.
//!
//! 1. A scratch PostgreSQL 15 cluster (its own data directory, port and
//!    socket, run as the `postgres` user) archives its WAL with `pgbackrest
//!    archive-push` into a local repository; a full backup is taken.
//! 2. The real `dcs-aggregator` writes into it; agents with
//!    `buffer.retain_delivered` take records from producers. Half of the
//!    records are stored, the restore target T is read from the database's
//!    clock, the other half is stored, and `pgbackrest check` makes sure the
//!    WAL up to now is archived.
//! 3. The cluster is stopped with `-m immediate` and its data directory
//!    deleted. The clock for the RTO starts.
//! 4. `pgbackrest restore --type=time --target=T --target-action=promote`,
//!    start, and a marker record pushed at the start of the restore is
//!    awaited in PostgreSQL: the RTO ends when the aggregator accepts batches
//!    again.
//! 5. `dcs-aggregator replay --since T`; the agents resend what they
//!    delivered since T; every acknowledged id must be in PostgreSQL once.
//!
//! `scripts/dr-drill.sh` installs pgBackRest and runs the `dcs-drill` binary;
//! the test command runs the short variant.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sqlx::PgPool;

use crate::agent::{self, RunningAgent};
use crate::chaos::{Ledger, Report, STREAM};
use crate::pki::Pki;
use crate::process::{Service, binary, free_port};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const STANZA: &str = "dcs";
const AGENTS: usize = 4;
const CHUNK: usize = 500;

#[derive(Debug, Clone)]
pub struct Options {
    /// Records acknowledged in all; the restore target falls half way.
    pub records: usize,
}

/// Runs the drill and returns its report (`scenario=pitr-restore`).
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    dcs_shared::tls::install_crypto_provider();
    let scratch = tempfile::Builder::new()
        .prefix("dcs-drill-")
        .tempdir()
        .context("scratch directory")?;
    let cluster = Cluster::create(scratch.path())?;
    let result = drill(opts, &cluster, scratch.path()).await;
    cluster.stop();
    if result.is_err() {
        let kept = scratch.keep();
        eprintln!("dcs-drill: files kept in {}", kept.display());
    }
    result
}

async fn drill(opts: &Options, cluster: &Cluster, dir: &Path) -> anyhow::Result<Report> {
    cluster.start()?;
    cluster.psql("postgres", "CREATE DATABASE dcs")?;
    cluster.pgbackrest(&["stanza-create"])?;
    cluster.pgbackrest(&["--type=full", "backup"])?;
    // pgBackRest picks the backup for a time target by its stop time, in
    // whole seconds: the target must lie clearly after it.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let pki = Pki::new();
    let agg_port = free_port();
    let url = cluster.url("dcs");
    let mut aggregator = aggregator(&pki, &url, agg_port, dir);
    aggregator.start().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .context("connect to the drill's cluster")?;

    let agent_url = format!("https://localhost:{agg_port}");
    let mut agents = Vec::with_capacity(AGENTS);
    for i in 0..AGENTS {
        let mut config = agent::test_config(
            &pki.agent("drill", &format!("edge-{i}")),
            &agent_url,
            &dir.join(format!("buffer-{i}.db")),
        );
        config.buffer.retain_delivered = Duration::from_secs(3600);
        config.batch.heartbeat = Duration::from_secs(1);
        config.retry.max = Duration::from_secs(1);
        agents.push(agent::start_agent(config).await);
    }
    let ledger = Arc::new(Ledger::default());

    // Before the restore target, and after it.
    let half = opts.records / 2;
    push_all(&agents, 0, half, &ledger).await?;
    wait_present(&pool, ledger.acked(), Duration::from_secs(600)).await;
    let target: String = sqlx::query_scalar(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .fetch_one(&pool)
    .await?;
    push_all(&agents, half, opts.records, &ledger).await?;
    wait_present(&pool, ledger.acked(), Duration::from_secs(600)).await;
    let before_disaster = present(&pool).await;
    // Forces a WAL switch and waits until it is archived.
    cluster.pgbackrest(&["check"])?;
    pool.close().await;

    // The disaster.
    cluster.stop_immediately()?;
    std::fs::remove_dir_all(cluster.data()).context("delete the data directory")?;
    let restore_started = Instant::now();
    let marker = tokio::spawn(push_marker(agents[0].url.clone()));
    cluster.pgbackrest(&[
        "--type=time",
        &format!("--target={}", target.replace('T', " ").replace('Z', "+00")),
        "--target-action=promote",
        "restore",
    ])?;
    cluster.start()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .context("connect to the restored cluster")?;
    let marker_id = marker.await.context("marker producer")??;
    let accepted = crate::agent::wait_until(Duration::from_secs(900), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM records WHERE record_id = $1")
            .bind(&marker_id)
            .fetch_one(&pool)
            .await
            .is_ok_and(|n| n > 0)
    })
    .await;
    let rto = restore_started.elapsed();
    if !accepted {
        bail!(
            "the aggregator did not store a batch within 900 s of the restore; aggregator log:\n{}",
            aggregator.log_tail()
        );
    }
    let after_restore = present(&pool).await;

    // The replay.
    replay_command(&pki, &url, &target)?;
    let all = ledger.acked() + 1; // and the marker
    wait_present(&pool, all, Duration::from_secs(600)).await;
    let mut report = crate::chaos::compare(&pool, "pitr-restore", &ledger).await;
    report.note("rto_s", format!("{:.1}", rto.as_secs_f64()));
    report.note("in_pg_before_disaster", before_disaster);
    report.note(
        "lost_by_restore",
        before_disaster.saturating_sub(after_restore),
    );
    report.note("replayed", replayed_restored(&agents[0].url).await);
    for a in agents {
        a.stop().await;
    }
    aggregator.terminate();
    pool.close().await;
    Ok(report)
}

/// Pushes records `from..to` spread over the agents, all at once.
async fn push_all(
    agents: &[RunningAgent],
    from: usize,
    to: usize,
    ledger: &Arc<Ledger>,
) -> anyhow::Result<()> {
    let per = (to - from).div_ceil(agents.len());
    let mut tasks = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        let (lo, hi) = (from + i * per, (from + (i + 1) * per).min(to));
        let (url, ledger) = (a.url.clone(), ledger.clone());
        tasks.push(tokio::spawn(async move {
            push_range(&url, lo, hi, &ledger).await
        }));
    }
    for t in tasks {
        t.await.context("producer")??;
    }
    Ok(())
}

async fn push_range(url: &str, lo: usize, hi: usize, ledger: &Ledger) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut at = lo;
    while at < hi {
        let end = (at + CHUNK).min(hi);
        let ids: Vec<String> = (at..end).map(|i| format!("d-{i}")).collect();
        let body: String = ids
            .iter()
            .map(|id| {
                format!(
                    "{{\"stream\":\"{STREAM}\",\"id\":\"{id}\",\"payload\":{{\"id\":\"{id}\",\"note\":\"disaster-recovery drill record\"}}}}\n"
                )
            })
            .collect();
        let r = agent::push(&http, url, "application/x-ndjson", body).await;
        if !r.status().is_success() {
            bail!("push refused: {}", r.status());
        }
        ledger.add_acked(&ids);
        at = end;
    }
    Ok(())
}

/// One record pushed while the database is being restored; returns its id.
async fn push_marker(url: String) -> anyhow::Result<String> {
    let id = "drill-marker".to_owned();
    let http = reqwest::Client::new();
    let body =
        format!("{{\"stream\":\"drill.marker\",\"id\":\"{id}\",\"payload\":{{\"marker\":true}}}}");
    let r = agent::push(&http, &url, "application/json", body).await;
    if !r.status().is_success() {
        bail!("marker refused: {}", r.status());
    }
    Ok(id)
}

async fn present(pool: &PgPool) -> usize {
    sqlx::query_scalar::<_, i64>("SELECT count(DISTINCT record_id) FROM records WHERE stream = $1")
        .bind(STREAM)
        .fetch_one(pool)
        .await
        .unwrap_or(0) as usize
}

async fn wait_present(pool: &PgPool, n: usize, timeout: Duration) {
    crate::agent::wait_until(timeout, || async {
        let marker: i64 =
            sqlx::query_scalar("SELECT count(*) FROM records WHERE stream = 'drill.marker'")
                .fetch_one(pool)
                .await
                .unwrap_or(0);
        present(pool).await + marker as usize >= n
    })
    .await;
}

async fn replayed_restored(agent_url: &str) -> u64 {
    agent::metric_sample(
        agent_url,
        "dcs_agent_replayed_records_total",
        &[("outcome", "restored")],
    )
    .await
    .unwrap_or(0.0) as u64
}

fn aggregator(pki: &Pki, db_url: &str, port: u16, dir: &Path) -> Service {
    let env = aggregator_env(pki, db_url)
        .into_iter()
        .chain([
            (
                "DCS_AGG_LISTEN__ADDRESS".to_owned(),
                format!("127.0.0.1:{port}"),
            ),
            (
                "DCS_AGG_ADMIN__ADDRESS".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            (
                "DCS_AGG_LIMITS__RETRY_AFTER".to_owned(),
                "\"1s\"".to_owned(),
            ),
            (
                "DCS_AGG_REVOCATION__REFRESH_INTERVAL".to_owned(),
                "\"1s\"".to_owned(),
            ),
            ("DCS_AGG_LOG__FORMAT".to_owned(), "json".to_owned()),
        ])
        .collect();
    Service::new(
        "dcs-aggregator",
        &["serve"],
        env,
        port,
        &dir.join("aggregator.log"),
    )
}

fn aggregator_env(pki: &Pki, db_url: &str) -> Vec<(String, String)> {
    [
        ("TLS__CA", pki.ca.display().to_string()),
        ("TLS__CERT", pki.server_cert.display().to_string()),
        ("TLS__KEY", pki.server_key.display().to_string()),
        ("DATABASE__URL", db_url.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("DCS_AGG_{k}"), v))
    .collect()
}

/// `dcs-aggregator replay --since T`, as an operator runs it.
fn replay_command(pki: &Pki, db_url: &str, since: &str) -> anyhow::Result<()> {
    let out = Command::new(binary("dcs-aggregator"))
        .args([
            "replay",
            "--since",
            since,
            "--reason",
            "disaster-recovery drill",
        ])
        .envs(aggregator_env(pki, db_url))
        .env_remove("DCS_AGG_CONFIG")
        .output()
        .context("run dcs-aggregator replay")?;
    if !out.status.success() {
        bail!(
            "dcs-aggregator replay failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A scratch PostgreSQL 15 cluster run as the `postgres` user, archiving
/// its WAL into a local pgBackRest repository.
struct Cluster {
    root: PathBuf,
    port: u16,
}

impl Cluster {
    fn create(root: &Path) -> anyhow::Result<Cluster> {
        let port = free_port();
        let cluster = Cluster {
            root: root.to_owned(),
            port,
        };
        for sub in ["sock", "repo", "log", "spool"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        let conf = cluster.root.join("pgbackrest.conf");
        std::fs::write(
            &conf,
            format!(
                "[global]\nrepo1-path={repo}\nrepo1-retention-full=2\nlog-path={log}\nlock-path={log}\nspool-path={spool}\nlog-level-console=warn\nstart-fast=y\narchive-timeout=120\n\n[{STANZA}]\npg1-path={data}\npg1-port={port}\npg1-socket-path={sock}\n",
                repo = root.join("repo").display(),
                log = root.join("log").display(),
                spool = root.join("spool").display(),
                data = cluster.data().display(),
                sock = root.join("sock").display(),
            ),
        )?;
        // The cluster runs as postgres: it owns the whole scratch tree.
        crate::process::run_checked(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(root),
        )?;
        crate::process::run_checked(Command::new("chmod").arg("0755").arg(root))?;
        cluster.as_postgres(
            &format!("{PG_BIN}/initdb"),
            &[
                "-D",
                &cluster.data().display().to_string(),
                "--auth=trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        )?;
        let settings = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{sock}'\nwal_level = replica\narchive_mode = on\narchive_command = 'pgbackrest --config={conf} --stanza={STANZA} archive-push %p'\nmax_wal_senders = 3\nlog_min_messages = warning\n",
            sock = root.join("sock").display(),
            conf = conf.display(),
        );
        let pg_conf = cluster.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&pg_conf)?;
        text.push_str(&settings);
        std::fs::write(&pg_conf, text)?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn start(&self) -> anyhow::Result<()> {
        self.as_postgres(
            &format!("{PG_BIN}/pg_ctl"),
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &self.root.join("log/postgres.log").display().to_string(),
                "-w",
                "-t",
                "600",
                "start",
            ],
        )
    }

    fn stop_immediately(&self) -> anyhow::Result<()> {
        self.as_postgres(
            &format!("{PG_BIN}/pg_ctl"),
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "stop",
            ],
        )
    }

    /// Best effort, at the end.
    fn stop(&self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self.stop_immediately();
        }
    }

    fn psql(&self, db: &str, sql: &str) -> anyhow::Result<()> {
        self.as_postgres(
            &format!("{PG_BIN}/psql"),
            &[
                "-h",
                &self.root.join("sock").display().to_string(),
                "-p",
                &self.port.to_string(),
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        )
    }

    fn pgbackrest(&self, args: &[&str]) -> anyhow::Result<()> {
        let conf = format!("--config={}", self.root.join("pgbackrest.conf").display());
        let stanza = format!("--stanza={STANZA}");
        let mut all = vec![conf.as_str(), stanza.as_str()];
        all.extend_from_slice(args);
        self.as_postgres("pgbackrest", &all)
    }

    fn as_postgres(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        crate::process::run_checked(
            Command::new("runuser")
                .args(["-u", "postgres", "--", program])
                .args(args)
                .current_dir(&self.root),
        )
    }
}
