//! A database source never skips a row: a NULL in a cursor column fails the
//! job and names the column, on whichever page the row falls, on
//! PostgreSQL, MariaDB and SQLite alike. (A comparison with NULL is never
//! true, so a row past the first page would otherwise never be read while
//! the job "succeeded".) Real databases, a real buffer file.

use std::path::Path;
use std::time::Duration;

use dcs_edge::buffer::{Buffer, BufferOptions, Durability, Overflow};
use dcs_edge::sources::database::DatabaseConfig;
use dcs_edge::sources::{RunContext, Schedule, Source, SourceKind, collect};

const MARIADB: &str = "mysql://root@127.0.0.1:3306/test";

fn source(url_file: &Path, table: &str, page_size: u32) -> Source {
    Source {
        name: "db".into(),
        stream: "db.events".into(),
        schedule: Schedule::Manual,
        jitter: Duration::ZERO,
        transform: None,
        kind: SourceKind::Database(DatabaseConfig {
            url_file: Some(url_file.to_owned()),
            url_env: None,
            query: format!("SELECT id, updated_at, body FROM {table}"),
            cursor: vec!["updated_at".into(), "id".into()],
            page_size,
        }),
    }
}

fn buffer(dir: &Path) -> Buffer {
    Buffer::open(BufferOptions {
        path: dir.join("buffer.db"),
        capacity_bytes: 1 << 30,
        overflow: Overflow::Reject,
        durability: Durability::ProcessCrash,
        dedup_window: 1000,
        min_free_disk: 0,
        quarantine_dir: dir.join("quarantine"),
        keyring: dcs_edge::seal::Keyring::disabled(),
        retain_delivered: std::time::Duration::ZERO,
    })
    .unwrap()
}

/// Where the NULL goes among `rows` rows read in pages of `page`: first,
/// last, and just before and after each page boundary.
fn null_positions(rows: i64, page: i64) -> Vec<i64> {
    let mut at = vec![0, rows - 1];
    for boundary in (page..rows).step_by(page as usize) {
        at.extend([boundary - 1, boundary]);
    }
    at.sort();
    at.dedup();
    at
}

/// Runs the source over a table (made by `fill(rows, null_at)`: ids
/// `0..rows`, the row `null_at` with NULL in `updated_at`) and checks that
/// the job fails naming the column, with no later run succeeding past it:
/// with the NULL there from the start, and appearing after a run has
/// moved the cursor past the first page (where SQLite and MariaDB, which
/// sort NULLs first, would otherwise never see it again).
async fn fails_on_every_page<F, Fut>(url: &str, table: &str, fill: F)
where
    F: Fn(i64, Option<i64>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    const ROWS: i64 = 4;
    const PAGE: u32 = 2;
    let cases = null_positions(ROWS, i64::from(PAGE))
        .into_iter()
        .map(|at| (false, at))
        .chain(
            null_positions(ROWS + 2, i64::from(PAGE))
                .into_iter()
                .map(|at| (true, at)),
        );
    for (after_a_run, null_at) in cases {
        if after_a_run {
            fill(ROWS, None).await;
        } else {
            fill(ROWS, Some(null_at)).await;
        }
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("db.url");
        std::fs::write(&url_file, url).unwrap();
        let buffer = buffer(dir.path());
        let ctx = RunContext {
            buffer: buffer.clone(),
            limits: Default::default(),
            stop: Default::default(),
            transform: None,
            schemas: Default::default(),
        };
        let source = source(&url_file, table, PAGE);
        if after_a_run {
            let (report, result) = collect(source.clone(), ctx.clone()).await;
            result.unwrap();
            assert_eq!(report.collected, ROWS as u64);
            fill(ROWS + 2, Some(null_at)).await;
        }
        for run in 0..2 {
            let (_, result) = collect(source.clone(), ctx.clone()).await;
            let error = result
                .expect_err(&format!(
                    "NULL at row {null_at} (after a run: {after_a_run}, pages of {PAGE}), run {run}: the job must fail"
                ))
                .to_string();
            assert!(
                error.contains("\"updated_at\""),
                "the error names the column: {error}"
            );
        }
        // The writer stops once every handle is gone.
        drop(ctx);
        buffer.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_cursor_fails_the_job_on_any_page_on_postgres() {
    let db = dcs_tests::pg::TestDb::new().await;
    sqlx::query("CREATE TABLE events (id BIGINT PRIMARY KEY, updated_at TIMESTAMPTZ, body TEXT)")
        .execute(&db.pool)
        .await
        .unwrap();
    let pool = db.pool.clone();
    fails_on_every_page(&db.url, "events", |rows, null_at| {
        let pool = pool.clone();
        async move {
            sqlx::query("DELETE FROM events")
                .execute(&pool)
                .await
                .unwrap();
            for id in 0..rows {
                sqlx::query(
                    "INSERT INTO events VALUES ($1, CASE WHEN $2 THEN NULL ELSE to_timestamp($1) END, 'row')",
                )
                .bind(id)
                .bind(Some(id) == null_at)
                .execute(&pool)
                .await
                .unwrap();
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_cursor_fails_the_job_on_any_page_on_mariadb() {
    let pool = sqlx::MySqlPool::connect(MARIADB)
        .await
        .expect("MariaDB on 127.0.0.1:3306 (root, no password, database test)");
    let table = format!("dcs_nulls_{:08x}", fastrand::u32(..));
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, updated_at DATETIME(6) NULL, body TEXT)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let (p, t) = (pool.clone(), table.clone());
    fails_on_every_page(MARIADB, &table, |rows, null_at| {
        let (pool, table) = (p.clone(), t.clone());
        async move {
            sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table}")))
                .execute(&pool)
                .await
                .unwrap();
            for id in 0..rows {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {table} VALUES (?, IF(?, NULL, TIMESTAMP('2026-01-01') + INTERVAL ? SECOND), 'row')"
                )))
                .bind(id)
                .bind(Some(id) == null_at)
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
            }
        }
    })
    .await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(&pool)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_cursor_fails_the_job_on_any_page_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let conn = rusqlite_connection(&db);
    let url = format!("sqlite://{}", db.display());
    fails_on_every_page(&url, "events", |rows, null_at| {
        let db = db.clone();
        async move {
            let conn = rusqlite_connection(&db);
            conn.execute_batch("DELETE FROM events").unwrap();
            for id in 0..rows {
                conn.execute(
                    "INSERT INTO events VALUES (?1, CASE WHEN ?2 THEN NULL ELSE '2026-01-0' || (?1 + 1) END, 'row')",
                    (id, Some(id) == null_at),
                )
                .unwrap();
            }
        }
    })
    .await;
    drop(conn);
}

/// The SQLite file, with the table created on first use.
fn rusqlite_connection(path: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, updated_at TEXT, body TEXT)",
    )
    .unwrap();
    conn
}
