//! The services a run starts: real `dcs-edge` and `dcs-aggregator`
//! processes with their certificates, a scratch directory and a fresh
//! database per step, and the waits for them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use sqlx::PgPool;

use dcs_tests::pg::TestDb;
use dcs_tests::pki::{AgentCert, Pki};
use dcs_tests::process::{Service, free_port};

use crate::Args;
use crate::bodies::{Bodies, http_client};
use crate::records::Generator;

/// Poll interval for "all rows committed".
pub(crate) const POLL: Duration = Duration::from_millis(100);

/// Everything the services of one run share: certificates and a scratch dir.
pub(crate) struct World {
    pub(crate) args: Args,
    /// Admin URL of the PostgreSQL server the steps create databases on.
    pub(crate) pg_admin: String,
    pub(crate) pki: Pki,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) bodies: Bodies,
    pub(crate) generator: Generator,
    /// COPY text of the first N records in ~1 MiB chunks of whole rows,
    /// rendered once and reused by every COPY step of every run.
    pub(crate) copy_chunks: std::sync::Mutex<Option<(u64, Arc<Vec<Bytes>>)>>,
}

impl World {
    pub(crate) fn new(
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

    pub(crate) fn agent_service(
        &self,
        name: &str,
        aggregator_port: u16,
        durability: &str,
    ) -> Service {
        self.agent_service_with(name, aggregator_port, durability, &[])
    }

    /// An agent with extra `DCS_EDGE_*` settings (suffixes), applied last.
    pub(crate) fn agent_service_with(
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

    pub(crate) fn aggregator_service(&self, name: &str, port: u16, db_url: &str) -> Service {
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
    pub(crate) async fn database(&self) -> anyhow::Result<TestDb> {
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
    pub(crate) fn remove_buffer(&self, name: &str) {
        for suffix in ["db", "db-wal", "db-shm"] {
            let _ = std::fs::remove_file(self.dir.path().join(format!("{name}.{suffix}")));
        }
    }
}

pub(crate) async fn start_agent(service: &mut Service) -> anyhow::Result<String> {
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
pub(crate) async fn wait_for_rows(
    pool: &PgPool,
    n: u64,
    timeout: Duration,
) -> anyhow::Result<Instant> {
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

pub(crate) fn delivery_timeout(n: u64) -> Duration {
    // Generous: 60 s plus 2 ms per record (a floor of 500 records/s).
    Duration::from_secs(60) + Duration::from_micros(n * 2_000)
}
