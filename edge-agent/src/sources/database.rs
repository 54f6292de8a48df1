//! The `database` source: runs a query repeatedly and buffers each new row,
//! found with an incremental cursor.
//!
//! # Cursor
//! `cursor` names columns of the query's result, e.g. `["updated_at", "id"]`.
//! Rows are read in that order, a page at a time, and the next page starts
//! after the last row read, the columns compared as a tuple:
//! `(updated_at, id) > (last_updated_at, last_id)`. Rows sharing a timestamp
//! are thus neither skipped nor read twice. The cursor values are stored as
//! the database's own text form and compared after a cast back to the
//! column's type (PostgreSQL) or by the server's implicit conversion
//! (MySQL/MariaDB), so no precision is lost; SQLite values keep their
//! storage class.
//!
//! The cursor of a page is stored in the transaction that stores the page's
//! records ([`crate::buffer::Buffer::append_from_source`]).
//!
//! A row committed later with a cursor below one already read (a long
//! transaction that took its timestamp early) is not seen: use a cursor the
//! database assigns at commit time, or accept that window.
//!
//! # Secrets
//! The connection URL is read from a file or an environment variable at
//! each run and never logged; error messages have it masked.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sqlx::{Column, Connection, Executor, Row, SqlSafeStr, Statement};

use dcs_shared::config::Issues;

use super::{RunContext, RunReport, Source, SourceError};
use crate::buffer::{Rejected, SourceBatch};

/// Rows per page and transaction: one round trip and one commit carry many
/// rows, and a page of typical rows stays well under a few MiB.
pub const DEFAULT_PAGE_SIZE: u32 = 1000;
const CURSOR_KEY: &str = "cursor";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// A file whose first line is the connection URL (`postgres://…`,
    /// `mysql://…`, `sqlite:///path/file.db`).
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// Or the name of an environment variable holding it.
    #[serde(default)]
    pub url_env: Option<String>,
    /// A SELECT without ORDER BY or LIMIT (the agent adds both).
    pub query: String,
    /// Columns of the result that only grow, compared as a tuple.
    pub cursor: Vec<String>,
    #[serde(default = "default_page_size")]
    pub page_size: u32,
}

fn default_page_size() -> u32 {
    DEFAULT_PAGE_SIZE
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driver {
    Postgres,
    MySql,
    Sqlite,
}

fn driver(url: &str) -> Option<Driver> {
    let scheme = url.split(':').next()?.to_ascii_lowercase();
    match scheme.as_str() {
        "postgres" | "postgresql" => Some(Driver::Postgres),
        "mysql" | "mariadb" => Some(Driver::MySql),
        "sqlite" => Some(Driver::Sqlite),
        _ => None,
    }
}

impl DatabaseConfig {
    pub fn validate(&self, key: &str, issues: &mut Issues) {
        let k = |f: &str| format!("{key}.{f}");
        issues.check(
            self.url_file.is_some() != self.url_env.is_some(),
            &k("url_file"),
            "set url_file or url_env (exactly one): the URL itself never goes in the config",
        );
        if self.url_file.is_some() || self.url_env.is_some() {
            match self.url() {
                Ok(url) => issues.check(
                    driver(&url).is_some(),
                    &k(if self.url_env.is_some() {
                        "url_env"
                    } else {
                        "url_file"
                    }),
                    "the URL must start with postgres://, mysql:// or sqlite:",
                ),
                Err(reason) => issues.check(
                    false,
                    &k(if self.url_env.is_some() {
                        "url_env"
                    } else {
                        "url_file"
                    }),
                    reason,
                ),
            }
        }
        let q = self.query.trim();
        issues.check(
            !q.is_empty() && !q.ends_with(';'),
            &k("query"),
            "must be one SELECT without a trailing ';'",
        );
        issues.check(
            !self.cursor.is_empty(),
            &k("cursor"),
            "name at least one column",
        );
        for (i, c) in self.cursor.iter().enumerate() {
            let ok = c
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && c.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            issues.check(
                ok,
                &format!("{key}.cursor[{i}]"),
                format!("{c:?} is not a plain column name"),
            );
        }
        issues.check(
            (1..=100_000).contains(&self.page_size),
            &k("page_size"),
            "must be between 1 and 100000",
        );
    }

    /// The connection URL. Errors never contain it.
    fn url(&self) -> Result<String, String> {
        if let Some(var) = &self.url_env {
            return std::env::var(var)
                .map(|v| v.trim().to_owned())
                .map_err(|_| format!("environment variable {var} is not set"));
        }
        let path = self.url_file.as_ref().ok_or("no url_file or url_env")?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Ok(text.lines().next().unwrap_or("").trim().to_owned())
    }
}

/// The stored cursor: the last row's cursor values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DbCursor {
    /// PostgreSQL and MySQL: text forms; SQLite: typed JSON values.
    pub values: Vec<serde_json::Value>,
    /// PostgreSQL: each column's type (`pg_typeof`), to cast the text back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
}

/// Hides the URL (and its password) in an error text.
fn mask(text: String, url: &str) -> String {
    let mut text = text.replace(url, "<database url>");
    if let Ok(parsed) = reqwest::Url::parse(url)
        && let Some(password) = parsed.password()
        && !password.is_empty()
    {
        text = text.replace(password, "***");
    }
    text
}

fn db_error(url: &str) -> impl Fn(sqlx::Error) -> SourceError + '_ {
    move |e| SourceError::Database(mask(e.to_string(), url))
}

pub async fn collect(
    source: &Source,
    cfg: &DatabaseConfig,
    ctx: &RunContext,
    report: &mut RunReport,
) -> Result<(), SourceError> {
    let url = cfg.url().map_err(SourceError::Database)?;
    let stored = {
        let buffer = ctx.buffer.clone();
        let name = source.name.clone();
        tokio::task::spawn_blocking(move || buffer.checkpoints(&name))
            .await
            .map_err(|_| SourceError::Stopped)??
    };
    let mut cursor: Option<DbCursor> = match stored.get(CURSOR_KEY) {
        Some(v) => Some(
            serde_json::from_str(v)
                .map_err(|e| SourceError::Database(format!("stored cursor is unreadable: {e}")))?,
        ),
        None => None,
    };
    match driver(&url) {
        Some(Driver::Postgres) => {
            pages::<_, sqlx::PgConnection>(
                source,
                cfg,
                ctx,
                report,
                &mut cursor,
                Dialect::Postgres,
                &url,
            )
            .await
        }
        Some(Driver::MySql) => {
            pages::<_, sqlx::MySqlConnection>(
                source,
                cfg,
                ctx,
                report,
                &mut cursor,
                Dialect::MySql,
                &url,
            )
            .await
        }
        Some(Driver::Sqlite) => {
            let (source, cfg, ctx) = (source.clone(), cfg.clone(), ctx.clone());
            let mut local = RunReport::default();
            let (local, result) = tokio::task::spawn_blocking(move || {
                let result = sqlite_pages(&source, &cfg, &ctx, &mut local, cursor, &url);
                (local, result)
            })
            .await
            .map_err(|_| SourceError::Stopped)?;
            report.collected += local.collected;
            report.rejected += local.rejected;
            report.errors.extend(local.errors);
            result
        }
        None => Err(SourceError::Database(
            "the URL must start with postgres://, mysql:// or sqlite:".into(),
        )),
    }
}

#[derive(Clone, Copy)]
enum Dialect {
    Postgres,
    MySql,
}

impl Dialect {
    fn ident(self, name: &str) -> String {
        match self {
            Dialect::Postgres => format!("\"{}\"", name.replace('"', "\"\"")),
            Dialect::MySql => format!("`{}`", name.replace('`', "``")),
        }
    }
}

/// Builds the paged query: the row as JSON, then the cursor columns as text
/// (and their types on PostgreSQL).
fn page_sql(
    dialect: Dialect,
    cfg: &DatabaseConfig,
    columns: &[String],
    cursor: Option<&DbCursor>,
) -> String {
    let q = cfg.query.trim();
    let cols: Vec<String> = cfg
        .cursor
        .iter()
        .map(|c| format!("src.{}", dialect.ident(c)))
        .collect();
    let (doc, texts, types) = match dialect {
        Dialect::Postgres => (
            "row_to_json(src)::text".to_owned(),
            cols.iter()
                .map(|c| format!("{c}::text"))
                .collect::<Vec<_>>(),
            cols.iter()
                .map(|c| format!("pg_typeof({c})::text"))
                .collect::<Vec<_>>(),
        ),
        Dialect::MySql => (
            format!(
                "CAST(JSON_OBJECT({}) AS CHAR)",
                columns
                    .iter()
                    .map(|c| format!("'{}', src.{}", c.replace('\'', "''"), dialect.ident(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            cols.iter()
                .map(|c| format!("CAST({c} AS CHAR)"))
                .collect::<Vec<_>>(),
            Vec::new(),
        ),
    };
    let mut select = vec![doc];
    select.extend(texts);
    select.extend(types);
    let filter = match cursor {
        Some(cur) => {
            let params: Vec<String> = (0..cols.len())
                .map(|i| match dialect {
                    Dialect::Postgres => format!("CAST(${} AS {})", i + 1, cur.types[i]),
                    Dialect::MySql => "?".to_owned(),
                })
                .collect();
            format!(
                "WHERE ({}) > ({}) OR {}",
                cols.join(", "),
                params.join(", "),
                any_null(&cols)
            )
        }
        None => String::new(),
    };
    format!(
        "SELECT {} FROM ({q}) AS src {filter} ORDER BY {} LIMIT {}",
        select.join(", "),
        cols.join(", "),
        cfg.page_size
    )
}

/// Rows with a NULL cursor value are in every page's query: a comparison
/// with NULL is never true, so without this they would never be read, nor
/// the job fail. They sort first (SQLite, MariaDB) or last (PostgreSQL), so
/// at the latest the run's last page holds them, and the job fails naming
/// the column instead of skipping the row.
fn any_null(cols: &[String]) -> String {
    cols.iter()
        .map(|c| format!("{c} IS NULL"))
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// A type name from `pg_typeof` that is safe to put in a CAST.
fn plain_type(t: &str) -> bool {
    !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || " _\"().,[]".contains(c))
}

async fn pages<DB, C>(
    source: &Source,
    cfg: &DatabaseConfig,
    ctx: &RunContext,
    report: &mut RunReport,
    cursor: &mut Option<DbCursor>,
    dialect: Dialect,
    url: &str,
) -> Result<(), SourceError>
where
    DB: sqlx::Database,
    C: Connection<Database = DB>,
    for<'c> &'c mut C: Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
    String: for<'r> sqlx::Decode<'r, DB> + sqlx::Encode<'static, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    // One connection per run, closed at its end whatever the outcome.
    let mut connection = C::connect(url).await.map_err(db_error(url))?;
    let conn = &mut connection;
    let result: Result<(), SourceError> = async move {
        let columns: Vec<String> = {
            let described = format!("SELECT * FROM ({}) AS src", cfg.query.trim());
            let stmt = (&mut *conn)
                // The query is the operator's own, from the config file.
                .prepare(sqlx::AssertSqlSafe(described).into_sql_str())
                .await
                .map_err(db_error(url))?;
            stmt.columns().iter().map(|c| c.name().to_owned()).collect()
        };
        for c in &cfg.cursor {
            if !columns.contains(c) {
                return Err(SourceError::Database(format!(
                    "cursor column {c:?} is not in the query's result ({})",
                    columns.join(", ")
                )));
            }
        }
        let n = cfg.cursor.len();
        loop {
            if let Some(cur) = cursor.as_ref()
                && matches!(dialect, Dialect::Postgres)
                && !cur.types.iter().all(|t| plain_type(t))
            {
                return Err(SourceError::Database(
                    "stored cursor types are unreadable".into(),
                ));
            }
            let sql = page_sql(dialect, cfg, &columns, cursor.as_ref());
            // The operator's query, column names quoted, types checked by
            // `plain_type`; every value goes in as a bind parameter.
            let mut query = sqlx::query::<DB>(sqlx::AssertSqlSafe(sql));
            if let Some(cur) = cursor.as_ref() {
                for v in &cur.values {
                    let text = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    query = query.bind(text);
                }
            }
            let rows = query.fetch_all(&mut *conn).await.map_err(db_error(url))?;
            let mut batch = SourceBatch {
                source: source.name.clone(),
                stream: source.stream.clone(),
                ..Default::default()
            };
            let mut last = None;
            for row in &rows {
                let doc: String = row.try_get_unchecked(0).map_err(db_error(url))?;
                let mut values = Vec::with_capacity(n);
                for i in 0..n {
                    let v: Option<String> = row.try_get_unchecked(1 + i).map_err(db_error(url))?;
                    let v = v.ok_or_else(|| {
                        SourceError::Database(format!(
                            "cursor column {:?} is NULL in a row; cursor columns must be NOT NULL",
                            cfg.cursor[i]
                        ))
                    })?;
                    values.push(serde_json::Value::String(v));
                }
                let types = if matches!(dialect, Dialect::Postgres) {
                    (0..n)
                        .map(|i| row.try_get_unchecked::<String, _>(1 + n + i))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(db_error(url))?
                } else {
                    Vec::new()
                };
                let position = values
                    .iter()
                    .map(|v| v.as_str().unwrap_or_default().to_owned())
                    .collect::<Vec<_>>()
                    .join(",");
                match ctx.prepare(&source.stream, &doc) {
                    Ok(record) => batch.records.push(record),
                    Err(reason) => batch.rejected.push(Rejected {
                        position,
                        raw: doc,
                        reason,
                    }),
                }
                last = Some(DbCursor { values, types });
            }
            let Some(next) = last else {
                return Ok(());
            };
            batch.checkpoints = vec![(
                CURSOR_KEY.to_owned(),
                Some(serde_json::to_string(&next).expect("cursor is JSON")),
            )];
            ctx.commit(batch, report).await?;
            *cursor = Some(next);
            if rows.len() < cfg.page_size as usize || ctx.stopping() {
                return Ok(());
            }
        }
    }
    .await;
    let _ = connection.close().await;
    result
}

/// SQLite through rusqlite (already linked for the buffer), read-only.
fn sqlite_pages(
    source: &Source,
    cfg: &DatabaseConfig,
    ctx: &RunContext,
    report: &mut RunReport,
    mut cursor: Option<DbCursor>,
    url: &str,
) -> Result<(), SourceError> {
    use rusqlite::types::Value;
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = path.split('?').next().unwrap_or(path);
    let err = |e: rusqlite::Error| SourceError::Database(mask(e.to_string(), url));
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(err)?;
    let q = cfg.query.trim();
    let columns: Vec<String> = conn
        .prepare(&format!("SELECT * FROM ({q}) AS src"))
        .map_err(err)?
        .column_names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    for c in &cfg.cursor {
        if !columns.contains(c) {
            return Err(SourceError::Database(format!(
                "cursor column {c:?} is not in the query's result ({})",
                columns.join(", ")
            )));
        }
    }
    let ident = |c: &str| format!("\"{}\"", c.replace('"', "\"\""));
    let cols: Vec<String> = cfg
        .cursor
        .iter()
        .map(|c| format!("src.{}", ident(c)))
        .collect();
    let doc = format!(
        "json_object({})",
        columns
            .iter()
            .map(|c| format!("'{}', src.{}", c.replace('\'', "''"), ident(c)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let n = cfg.cursor.len();
    loop {
        let filter = if cursor.is_some() {
            let params: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
            format!(
                "WHERE ({}) > ({}) OR {}",
                cols.join(", "),
                params.join(", "),
                any_null(&cols)
            )
        } else {
            String::new()
        };
        let sql = format!(
            "SELECT {doc}, {} FROM ({q}) AS src {filter} ORDER BY {} LIMIT {}",
            cols.join(", "),
            cols.join(", "),
            cfg.page_size
        );
        let params: Vec<Value> = cursor
            .as_ref()
            .map(|c| {
                c.values
                    .iter()
                    .map(|v| match v {
                        serde_json::Value::Number(n) if n.is_i64() => {
                            Value::Integer(n.as_i64().unwrap_or_default())
                        }
                        serde_json::Value::Number(n) => Value::Real(n.as_f64().unwrap_or_default()),
                        serde_json::Value::String(s) => Value::Text(s.clone()),
                        other => Value::Text(other.to_string()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut stmt = conn.prepare(&sql).map_err(err)?;
        let rows: Vec<(String, Vec<Value>)> = stmt
            .query_map(rusqlite::params_from_iter(params), |r| {
                let doc: String = r.get(0)?;
                let values = (0..n)
                    .map(|i| r.get::<_, Value>(1 + i))
                    .collect::<Result<_, _>>()?;
                Ok((doc, values))
            })
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let mut batch = SourceBatch {
            source: source.name.clone(),
            stream: source.stream.clone(),
            ..Default::default()
        };
        let mut last = None;
        for (doc, values) in &rows {
            let values: Vec<serde_json::Value> = values
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Integer(n) => Ok(serde_json::json!(n)),
                    Value::Real(f) => Ok(serde_json::json!(f)),
                    Value::Text(s) => Ok(serde_json::json!(s)),
                    _ => Err(SourceError::Database(format!(
                        "cursor column {:?} must be a number or text, not NULL or a blob",
                        cfg.cursor[i]
                    ))),
                })
                .collect::<Result<_, _>>()?;
            match ctx.prepare(&source.stream, doc) {
                Ok(record) => batch.records.push(record),
                Err(reason) => batch.rejected.push(Rejected {
                    position: serde_json::Value::Array(values.clone()).to_string(),
                    raw: doc.clone(),
                    reason,
                }),
            }
            last = Some(DbCursor {
                values,
                types: Vec::new(),
            });
        }
        let Some(next) = last else {
            return Ok(());
        };
        batch.checkpoints = vec![(
            CURSOR_KEY.to_owned(),
            Some(serde_json::to_string(&next).expect("cursor is JSON")),
        )];
        let rejected = batch.rejected.len() as u64;
        let appended = ctx.buffer.append_from_source(batch)?;
        report.collected += appended.new.iter().filter(|n| **n).count() as u64;
        report.rejected += rejected;
        cursor = Some(next);
        if rows.len() < cfg.page_size as usize || ctx.stopping() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::buffer::{Buffer, BufferOptions, Durability, Overflow};
    use crate::sources::{Schedule, SourceKind};

    fn sqlite_source(url_file: PathBuf) -> Source {
        Source {
            name: "lite".into(),
            stream: "lite".into(),
            schedule: Schedule::Manual,
            jitter: std::time::Duration::ZERO,
            transform: None,
            kind: SourceKind::Database(DatabaseConfig {
                url_file: Some(url_file),
                url_env: None,
                query: "SELECT id, updated_at, body FROM events".into(),
                cursor: vec!["updated_at".into(), "id".into()],
                page_size: 2,
            }),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sqlite_table_is_read_once_across_runs_and_equal_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, updated_at TEXT NOT NULL, body TEXT);
             INSERT INTO events VALUES (1, '2026-01-01T00:00:00Z', 'a'), (2, '2026-01-01T00:00:00Z', 'b'),
                                       (3, '2026-01-01T00:00:00Z', 'c'), (4, '2026-01-02T00:00:00Z', 'd');",
        )
        .unwrap();
        let url_file = dir.path().join("url");
        std::fs::write(&url_file, format!("sqlite://{}\n", db.display())).unwrap();
        let buffer = Buffer::open(BufferOptions {
            path: dir.path().join("buffer.db"),
            capacity_bytes: 1 << 30,
            overflow: Overflow::Reject,
            durability: Durability::ProcessCrash,
            dedup_window: 1000,
            min_free_disk: 0,
            quarantine_dir: dir.path().join("q"),
            keyring: crate::seal::Keyring::disabled(),
            retain_delivered: std::time::Duration::ZERO,
        })
        .unwrap();
        let ctx = RunContext {
            buffer: buffer.clone(),
            limits: Default::default(),
            stop: Default::default(),
            transform: None,
            schemas: Default::default(),
        };
        let source = sqlite_source(url_file);
        let (report, result) = crate::sources::collect(source.clone(), ctx.clone()).await;
        result.unwrap();
        assert_eq!(report.collected, 4);
        // Same timestamp as rows already read, higher id: still found.
        conn.execute_batch(
            "INSERT INTO events VALUES (5, '2026-01-02T00:00:00Z', 'e'), (6, '2026-01-03T00:00:00Z', 'f');",
        )
        .unwrap();
        let (report, result) = crate::sources::collect(source.clone(), ctx.clone()).await;
        result.unwrap();
        assert_eq!(report.collected, 2);
        let (report, _) = crate::sources::collect(source, ctx).await;
        assert_eq!(report.collected, 0, "nothing is read twice");
        let ids: Vec<i64> = buffer
            .read_and_claim(0, 100, u64::MAX)
            .unwrap()
            .iter()
            .map(|r| {
                serde_json::from_str::<serde_json::Value>(&r.payload).unwrap()["id"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ids, [1, 2, 3, 4, 5, 6]);
        let cursor = buffer.checkpoints("lite").unwrap()["cursor"].clone();
        assert_eq!(cursor, r#"{"values":["2026-01-03T00:00:00Z",6]}"#);
    }

    #[test]
    fn a_password_never_appears_in_an_error() {
        let url = "postgres://app:s3cret@db.example:5432/orders";
        let masked = mask(
            format!("error connecting to {url}: password s3cret refused"),
            url,
        );
        assert!(!masked.contains("s3cret"), "{masked}");
    }

    #[test]
    fn the_cursor_is_compared_as_a_tuple_and_cast_back_on_postgres() {
        let cfg = DatabaseConfig {
            url_file: None,
            url_env: Some("X".into()),
            query: "SELECT * FROM orders".into(),
            cursor: vec!["updated_at".into(), "id".into()],
            page_size: 10,
        };
        let cur = DbCursor {
            values: vec!["2026-01-01 00:00:00+00".into(), "7".into()],
            types: vec!["timestamp with time zone".into(), "bigint".into()],
        };
        let sql = page_sql(Dialect::Postgres, &cfg, &[], Some(&cur));
        assert!(
            sql.contains(r#"WHERE (src."updated_at", src."id") > (CAST($1 AS timestamp with time zone), CAST($2 AS bigint))"#),
            "{sql}"
        );
        assert!(
            sql.ends_with(r#"ORDER BY src."updated_at", src."id" LIMIT 10"#),
            "{sql}"
        );
    }
}
