//! PostgreSQL for tests: a fresh, migrated database per test on the shared
//! server ([`TestDb`]), or a whole cluster a test owns and may stop, crash and
//! restart ([`PgCluster`]).
//!
//! Both clean up in `Drop`, which must work from inside a `#[tokio::test]`:
//! async clean-up therefore runs on a fresh thread with its own runtime, since
//! blocking on the test's own runtime from `Drop` would panic or deadlock.

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context as _, bail};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgConnection, PgPool};
use tempfile::TempDir;

/// Admin URL of the shared server; `DCS_TEST_PG_URL` overrides it.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Where Debian puts the PostgreSQL 15 server binaries; `DCS_TEST_PG_BIN`
/// overrides it.
pub const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub fn admin_url() -> String {
    std::env::var("DCS_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// A uniquely named database with the aggregator's schema, dropped on `Drop`.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
    name: String,
    admin_url: String,
}

impl TestDb {
    /// Creates and migrates `dcs_test_<random>` on the server at [`admin_url`].
    /// Panics with the cause when PostgreSQL is unreachable: tests need it.
    pub async fn new() -> TestDb {
        Self::try_new().await.expect("create a test database")
    }

    pub async fn try_new() -> anyhow::Result<TestDb> {
        Self::on_server(&admin_url()).await
    }

    /// Creates and migrates a fresh database on the server at `admin_url`
    /// (e.g. a [`PgCluster`]).
    pub async fn on_server(admin_url: &str) -> anyhow::Result<TestDb> {
        let name = format!("dcs_test_{:016x}", fastrand::u64(..));
        let mut admin = PgConnection::connect(admin_url)
            .await
            .with_context(|| format!("connect to {admin_url} (set DCS_TEST_PG_URL)"))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .with_context(|| format!("create database {name}"))?;
        let _ = admin.close().await;
        let db = TestDb {
            url: with_database(admin_url, &name),
            pool: PgPoolOptions::new()
                .max_connections(8)
                .connect_lazy(&with_database(admin_url, &name))?,
            name,
            admin_url: admin_url.to_owned(),
        };
        // From here on `db` drops the database if migration fails.
        dcs_aggregator::migrate(&db.pool)
            .await
            .context("migrate test database")?;
        Ok(db)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of rows in `table` (a trusted identifier from the test).
    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("count {table}: {e}"))
    }

    /// Returns once an aggregator on this database has committed its
    /// start-up partition run, whose last partition is `ahead` days from
    /// today (`retention.partitions_ahead`). That run takes `records`' lock
    /// and a database connection, and commits like a batch: on a loaded
    /// machine it can still be going when a test blocks `records` or makes
    /// commits wait, and the test then meets it instead of its batch. (The
    /// compaction that follows it writes nothing on a new database.)
    pub async fn until_startup_partitions(&self, ahead: u32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let created: bool = sqlx::query_scalar(
                "SELECT to_regclass('records_p' || to_char((now() AT TIME ZONE 'UTC')::date + $1, \
                 'YYYYMMDD')) IS NOT NULL",
            )
            .bind(ahead as i32)
            .fetch_one(&self.pool)
            .await
            .expect("look for the partition");
            if created {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the aggregator did not create its partitions within 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Joined, so the database is gone before the next test starts.
        let result = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                // The pool's connections belong to the test's runtime, which is
                // blocked in this drop; FORCE terminates them server-side instead.
                let mut admin = PgConnection::connect(&admin_url).await?;
                // `local`: a test that failed while its cluster demanded a
                // synchronous standby that never answers must not hang here.
                sqlx::raw_sql("SET synchronous_commit = local")
                    .execute(&mut admin)
                    .await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await?;
                anyhow::Ok(())
            })
        })
        .join();
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!(
                "warning: could not drop test database {}: {error:#}",
                self.name
            ),
            Err(_) => eprintln!("warning: dropping test database {} panicked", self.name),
        }
    }
}

/// `url` with its database name replaced by `database` (query string kept).
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

/// A PostgreSQL 15 cluster owned by one test, on 127.0.0.1 and a free port,
/// for fault tests that stop or crash the database. Stopped (immediate) and
/// deleted on `Drop`.
pub struct PgCluster {
    dir: TempDir,
    port: u16,
    bin: PathBuf,
    as_postgres: bool,
}

impl PgCluster {
    /// `initdb` into a temp dir and start the server. As root, the dir is given
    /// to the `postgres` user and every command runs as that user (PostgreSQL
    /// refuses to run as root).
    pub async fn start() -> PgCluster {
        Self::try_start()
            .await
            .expect("start a test PostgreSQL cluster")
    }

    /// [`PgCluster::start`] with the aggregator's schema migrated into its
    /// `postgres` database, for tests that run the aggregator on it.
    pub async fn start_migrated() -> PgCluster {
        let cluster = Self::start().await;
        let pool = PgPool::connect(&cluster.url())
            .await
            .expect("connect cluster");
        dcs_aggregator::migrate(&pool).await.expect("migrate");
        pool.close().await;
        cluster
    }

    pub async fn try_start() -> anyhow::Result<PgCluster> {
        let bin = std::env::var_os("DCS_TEST_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_PG_BIN.into());
        if !bin.join("initdb").exists() {
            bail!(
                "{} not found: install PostgreSQL 15 or set DCS_TEST_PG_BIN",
                bin.join("initdb").display()
            );
        }
        let dir = tempfile::Builder::new().prefix("dcs-pg-").tempdir()?;
        let as_postgres = running_as_root();
        if as_postgres {
            run(std::process::Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path()))
            .await
            .context("chown the cluster dir to postgres")?;
        }
        let mut cluster = PgCluster {
            dir,
            port: 0,
            bin,
            as_postgres,
        };
        let data = cluster.data_dir();
        let mut initdb = cluster.command("initdb");
        // --no-sync: the cluster is thrown away; fsync at initdb only costs time.
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        run(&mut initdb).await.context("initdb")?;

        // A free port can be taken between our probe and the server's bind;
        // try a few.
        let mut last_error = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start().await {
                Ok(()) => return Ok(cluster),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server log, for a test's failure message.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Stops the server: `"fast"` (clean shutdown, clients disconnected) or
    /// `"immediate"` (a crash: no checkpoint, recovery on the next start).
    pub async fn stop(&self, mode: &str) {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-m", mode, "-w", "stop"]);
        run(&mut cmd)
            .await
            .unwrap_or_else(|e| panic!("pg_ctl stop -m {mode}: {e:#}"));
    }

    /// Starts the server again on the same port after [`PgCluster::stop`].
    pub async fn start_again(&self) {
        self.pg_ctl_start()
            .await
            .unwrap_or_else(|e| panic!("pg_ctl start: {e:#}"));
    }

    async fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-o")
            .arg(format!(
                // track_commit_timestamp: tests read the order in which
                // batches committed (pg_xact_commit_timestamp(xmin)), not
                // a timestamp the agent chose.
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c track_commit_timestamp=on",
                self.port,
                self.dir.path().display()
            ))
            // -l: the server's output goes to a file, so it never holds our
            // pipes open (which would hang this call).
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "60", "start"]);
        run(&mut cmd).await.with_context(|| {
            format!(
                "pg_ctl start on port {} (log: {})",
                self.port,
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            )
        })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> std::process::Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut cmd = std::process::Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            std::process::Command::new(path)
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Fails harmlessly when the test already stopped the server.
        let _ = cmd.status();
    }
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Runs a command to completion off the async threads; an error carries its output.
async fn run(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    cmd.stdin(Stdio::null());
    let mut cmd =
        tokio::process::Command::from(std::mem::replace(cmd, std::process::Command::new("true")));
    let output = cmd.output().await?;
    if !output.status.success() {
        bail!(
            "{:?} exited with {}: {}{}",
            cmd.as_std(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_replaced_and_the_query_kept() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/postgres?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
    }
}
