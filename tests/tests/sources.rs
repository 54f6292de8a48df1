//! Pull sources and the jobs API: the agent reads files itself, and every
//! line reaches the buffer exactly once, whatever happens to the files or to
//! the agent. The aggregator is unreachable on purpose, so everything
//! collected stays in the buffer where the test can read it back.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dcs_tests::agent::{self, RunningAgent, start_agent, wait_until};
use dcs_tests::http::Fetch as _;
use dcs_tests::pki::Pki;
use dcs_tests::process::Service;
use serde_json::{Value, json};

/// Appends `lines` to `path` (creating it) and flushes, as a logger would.
fn append(path: &Path, lines: impl IntoIterator<Item = String>) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    for line in lines {
        f.write_all(line.as_bytes()).unwrap();
    }
    f.flush().unwrap();
}

fn events(range: std::ops::Range<u32>) -> impl Iterator<Item = String> {
    range.map(|n| format!("{{\"n\":{n},\"msg\":\"event {n}\"}}\n"))
}

/// Calls `probe` until `done` holds for its answer or `timeout` passes;
/// returns the last answer.
async fn eventually<T, F, Fut>(timeout: Duration, mut probe: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let answer = probe().await;
        if done(&answer) || std::time::Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status(http: &reqwest::Client, url: &str) -> Value {
    http.get(format!("{url}/v1/status")).fetch_json().await
}

async fn buffered(http: &reqwest::Client, url: &str) -> u64 {
    status(http, url).await["buffer"]["records"]
        .as_u64()
        .unwrap_or(0)
}

/// Every record and dead letter of a stopped agent's buffer, from
/// `dcs-edge buffer export`.
fn export(buffer: &Path) -> Vec<Value> {
    let out = std::process::Command::new(agent::binary("dcs-edge"))
        .args(["buffer", "export", "--path", buffer.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A `dcs-edge run --config FILE` process with one ndjson file source.
struct FileAgent {
    _pki: Pki,
    dir: tempfile::TempDir,
    service: Service,
    url: String,
}

impl FileAgent {
    fn logs(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    fn buffer(&self) -> PathBuf {
        self.dir.path().join("buffer.db")
    }

    async fn start(&mut self) {
        self.service.start().await;
    }
}

async fn file_agent() -> FileAgent {
    let pki = Pki::new();
    let cert = pki.agent("acme", "edge-1");
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let port = agent::free_port();
    let config = format!(
        r#"
[listen]
address = "127.0.0.1:{port}"
[buffer]
path = "{buffer}"
[aggregator]
url = "https://localhost:{unreachable}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[retry]
initial = "50ms"
max = "5s"
shutdown_grace = "1s"
[log]
format = "json"

[[sources]]
name = "app"
kind = "file"
stream = "app.logs"
schedule = "100ms"
jitter = "20ms"
[sources.file]
paths = ["{logs}/*.log"]
format = "ndjson"
"#,
        buffer = dir.path().join("buffer.db").display(),
        unreachable = agent::free_port(),
        ca = cert.ca.display(),
        cert = cert.cert.display(),
        key = cert.key.display(),
        logs = logs.display(),
    );
    let file = dir.path().join("edge.toml");
    std::fs::write(&file, config).unwrap();
    let service = Service::new(
        "dcs-edge",
        &["run", "--config", file.to_str().unwrap()],
        Vec::new(),
        port,
        &dir.path().join("agent.log"),
    );
    FileAgent {
        _pki: pki,
        dir,
        service,
        url: format!("http://127.0.0.1:{port}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_is_buffered_once_through_appends_rotation_truncation_and_a_kill() {
    dcs_shared::tls::install_crypto_provider();
    let mut a = file_agent().await;
    let http = reqwest::Client::new();
    let log = a.logs().join("app.log");
    async fn until(http: &reqwest::Client, url: &str, n: u64, what: &str) {
        let last = eventually(Duration::from_secs(20), || buffered(http, url), |b| *b >= n).await;
        assert!(last >= n, "{what}: {last} of {n} lines buffered");
    }

    // Lines written before the agent starts, the last one half written.
    append(&log, events(0..100));
    append(&log, ["{\"n\":100,".to_owned()]);
    a.start().await;
    until(&http, &a.url, 100, "initial lines").await;

    // The half line is completed and more are appended while it runs.
    append(&log, ["\"msg\":\"event 100\"}\n".to_owned()]);
    append(&log, events(101..200));
    until(&http, &a.url, 200, "appended lines").await;

    // Rotation: rename + create. The logger still holds the old file and
    // writes its last lines there; the renamed file no longer matches *.log.
    let mut old = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::fs::rename(&log, a.logs().join("app.log.1")).unwrap();
    for line in events(200..250) {
        old.write_all(line.as_bytes()).unwrap();
    }
    drop(old);
    append(&log, events(250..300));
    until(&http, &a.url, 300, "lines across the rotation").await;

    // A burst, and SIGKILL while the agent is reading it: what was committed
    // stays with its checkpoint, the rest is read after the restart.
    append(&log, events(300..20_300));
    tokio::time::sleep(Duration::from_millis(150)).await;
    a.service.kill();
    append(&log, events(20_300..20_400));
    a.start().await;
    until(&http, &a.url, 20_400, "lines after the restart").await;

    // Truncation (copytruncate): the file starts again, shorter than before.
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&log)
        .unwrap();
    append(&log, events(20_400..20_450));
    append(&log, ["this is not json\n".to_owned()]);
    until(&http, &a.url, 20_450, "lines after the truncation").await;
    let ok = wait_until(Duration::from_secs(10), || async {
        status(&http, &a.url).await["dead_letters"]["records"] == 1
    })
    .await;
    assert!(ok, "the bad line becomes a dead letter");

    assert!(a.service.terminate(), "clean stop");
    let rows = export(&a.buffer());
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    for row in rows.iter().filter(|r| r["state"] == "buffered") {
        assert_eq!(row["stream"], "app.logs");
        *seen
            .entry(row["payload"]["n"].as_u64().unwrap())
            .or_default() += 1;
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(repeated.is_empty(), "lines buffered twice: {repeated:?}");
    let missing: Vec<u64> = (0..20_450).filter(|n| !seen.contains_key(n)).collect();
    assert!(missing.is_empty(), "lines lost: {missing:?}");
    assert_eq!(seen.len(), 20_450);
    let dead: Vec<&Value> = rows
        .iter()
        .filter(|r| r["state"] == "dead_letter")
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["payload"], "this is not json");
    assert!(
        dead[0]["reason"].as_str().unwrap().contains("JSON"),
        "{}",
        dead[0]
    );
    assert!(dead[0]["id"].as_str().unwrap().starts_with("source:app:"));
}

struct JobsAgent {
    _pki: Pki,
    dir: tempfile::TempDir,
    agent: RunningAgent,
    http: reqwest::Client,
}

/// An in-process agent with a `manual` source over `big.log` (fed by the
/// test), a CSV source, and a scheduled source.
async fn jobs_agent() -> JobsAgent {
    use dcs_edge::sources::file::{FileConfig, Format};
    use dcs_edge::sources::{SourceConfig, SourceKind};
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    for sub in ["big", "csv", "ticks"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    let unreachable = format!("https://localhost:{}", agent::free_port());
    let mut config = agent::test_config(
        &pki.agent("acme", "edge-1"),
        &unreachable,
        &dir.path().join("buffer.db"),
    );
    let source = |name: &str, schedule: &str, sub: &str, pattern: &str, format| SourceConfig {
        name: name.into(),
        kind: SourceKind::File(FileConfig {
            paths: vec![dir.path().join(sub).join(pattern).display().to_string()],
            format,
            follow_symlinks: false,
        }),
        stream: name.into(),
        schedule: schedule.into(),
        timezone: None,
        jitter: Duration::ZERO,
        transform: None,
    };
    config.sources = vec![
        source("big", "manual", "big", "*.log", Format::Ndjson),
        source("orders", "manual", "csv", "*.csv", Format::Csv),
        source("ticks", "200ms", "ticks", "*.txt", Format::Lines),
    ];
    let agent = start_agent(config).await;
    JobsAgent {
        _pki: pki,
        dir,
        agent,
        http: reqwest::Client::new(),
    }
}

impl JobsAgent {
    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.agent.endpoint(path))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn trigger(&self, body: &str) -> (u16, Value) {
        let r = self
            .http
            .post(self.agent.endpoint("/api/v1/jobs/trigger"))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Waits until the job has finished; returns its status.
    async fn finished(&self, job: &str) -> Value {
        let path = format!("/api/v1/jobs/status/{job}");
        let last = eventually(
            Duration::from_secs(30),
            || async { self.get(&path).await.1 },
            |s| s["state"] == "succeeded" || s["state"] == "failed",
        )
        .await;
        assert!(
            last["state"] == "succeeded" || last["state"] == "failed",
            "job {job} did not finish: {last}"
        );
        last
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triggered_job_reports_status_result_and_checkpoints() {
    let a = jobs_agent().await;
    let big = a.dir.path().join("big/big.log");
    append(&big, events(0..50_000));

    let (code, body) = a.trigger(r#"{"source":"big"}"#).await;
    assert_eq!(code, 202, "{body}");
    let job = body["job_id"].as_str().unwrap().to_owned();
    let (code, body) = a.trigger(r#"{"source":"big"}"#).await;
    assert_eq!(code, 409, "a running source is not started twice: {body}");
    assert_eq!(body["error"], "already_running");

    let status = a.finished(&job).await;
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(status["source"], "big");
    assert_eq!(status["trigger"], "api");
    assert!(status["started_at"].is_string() && status["finished_at"].is_string());
    let (code, result) = a.get(&format!("/api/v1/jobs/result/{job}")).await;
    assert_eq!(code, 200);
    assert_eq!(result["records_collected"], 50_000);
    assert_eq!(result["records_rejected"], 0);
    assert_eq!(result["errors"], json!([]));
    assert_eq!(result["checkpoint_before"], json!({}));
    let after = result["checkpoint_after"].as_object().unwrap();
    assert_eq!(after.len(), 1, "one file, one checkpoint: {after:?}");
    let file_cp = after.values().next().unwrap();
    assert_eq!(file_cp["offset"], std::fs::metadata(&big).unwrap().len());
    // The checkpoint keeps the file's first bytes; the API never shows them.
    assert!(
        file_cp.get("prefix").is_none(),
        "file content in a job result: {file_cp}"
    );

    // The next run starts where the last one ended and reads only what is new.
    append(&big, events(50_000..50_010));
    let (_, body) = a.trigger(r#"{"source":"big"}"#).await;
    let second = body["job_id"].as_str().unwrap().to_owned();
    a.finished(&second).await;
    let (_, result) = a.get(&format!("/api/v1/jobs/result/{second}")).await;
    assert_eq!(result["records_collected"], 10);
    assert_eq!(result["checkpoint_before"], json!(after));

    let (_, list) = a.get("/api/v1/jobs?source=big").await;
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [second.as_str(), job.as_str()], "newest first");
    let (_, limited) = a
        .get("/api/v1/jobs?source=big&state=succeeded&limit=1")
        .await;
    assert_eq!(limited.as_array().unwrap().len(), 1);
    let (_, none) = a.get("/api/v1/jobs?source=big&state=failed").await;
    assert_eq!(none, json!([]));
    let st: Value = a.agent.status().await;
    assert!(st["buffer"]["records"].as_u64().unwrap() >= 50_010);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_api_answers_unknown_sources_jobs_and_bad_requests_with_json_errors() {
    let a = jobs_agent().await;
    let (code, body) = a.trigger(r#"{"source":"nope"}"#).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (404, Some("unknown_source"))
    );
    let (code, body) = a.trigger("source=big").await;
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("malformed_request"))
    );
    // A browser form can post these across origins without a preflight; a
    // trigger is JSON or nothing.
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ] {
        let r = a
            .http
            .post(a.agent.endpoint("/api/v1/jobs/trigger"))
            .header("content-type", content_type)
            .body(r#"{"source":"big"}"#)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (status, body["error"].as_str()),
            (415, Some("unsupported_media_type")),
            "{content_type}"
        );
    }
    let (code, body) = a.get("/api/v1/jobs/status/no-such-job").await;
    assert_eq!((code, body["error"].as_str()), (404, Some("unknown_job")));
    let (code, body) = a.get("/api/v1/jobs/result/no-such-job").await;
    assert_eq!((code, body["error"].as_str()), (404, Some("unknown_job")));
    let (code, body) = a.get("/api/v1/jobs?state=sleeping").await;
    assert_eq!((code, body["error"].as_str()), (400, Some("bad_query")));
    let (code, body) = a.get("/api/v1/jobs?limit=many").await;
    assert_eq!((code, body["error"].as_str()), (400, Some("bad_query")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_runs_are_jobs_and_csv_rows_that_do_not_fit_are_dead_letters() {
    let a = jobs_agent().await;
    append(&a.dir.path().join("ticks/t.txt"), ["tick\n".to_owned()]);
    let list = eventually(
        Duration::from_secs(10),
        || async { a.get("/api/v1/jobs?source=ticks&state=succeeded").await.1 },
        |l| l.as_array().is_some_and(|l| l.len() >= 2),
    )
    .await;
    assert!(
        list.as_array().is_some_and(|l| l.len() >= 2),
        "scheduled runs are listed as jobs: {list}"
    );
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|j| j["trigger"] == "schedule")
    );

    append(
        &a.dir.path().join("csv/orders.csv"),
        [
            "id,total,note\n".to_owned(),
            "1,9.50,\"paid, in full\"\n".to_owned(),
            "2,3.00\n".to_owned(),
            "3,1.25,\"say \"\"hi\"\"\"\n".to_owned(),
        ],
    );
    let (_, body) = a.trigger(r#"{"source":"orders"}"#).await;
    let job = body["job_id"].as_str().unwrap().to_owned();
    a.finished(&job).await;
    let (_, result) = a.get(&format!("/api/v1/jobs/result/{job}")).await;
    assert_eq!(result["records_collected"], 2, "{result}");
    assert_eq!(result["records_rejected"], 1);
    let st: Value = a.agent.status().await;
    assert_eq!(st["dead_letters"]["records"], 1);
    assert!(
        st["dead_letters"]["last_reason"]
            .as_str()
            .unwrap()
            .contains("2 fields, the header names 3")
    );
    let metrics = a.agent.metrics().await;
    for series in [
        "dcs_agent_source_runs_total{source=\"orders\",state=\"succeeded\"}",
        "dcs_agent_source_records_total{source=\"orders\",result=\"rejected\"}",
        "dcs_agent_source_last_success_timestamp_seconds{source=\"ticks\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing");
    }
}

/// A table of a real database that a test fills while the agent polls it.
enum Table {
    Postgres(dcs_tests::pg::TestDb),
    MariaDb(sqlx::MySqlPool, String),
}

impl Table {
    async fn postgres() -> Table {
        let db = dcs_tests::pg::TestDb::new().await;
        sqlx::query(
            "CREATE TABLE events (id BIGINT PRIMARY KEY, updated_at TIMESTAMPTZ NOT NULL, body TEXT NOT NULL)",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        Table::Postgres(db)
    }

    /// The MariaDB server of the test machine, database `test`, a table of
    /// our own.
    async fn mariadb() -> Table {
        let pool = sqlx::MySqlPool::connect("mysql://root@127.0.0.1:3306/test")
            .await
            .expect("MariaDB on 127.0.0.1:3306 (root, no password, database test)");
        let name = format!("dcs_events_{:08x}", fastrand::u32(..));
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {name} (id BIGINT PRIMARY KEY, updated_at DATETIME(6) NOT NULL, body TEXT NOT NULL)"
        )))
        .execute(&pool)
        .await
        .unwrap();
        Table::MariaDb(pool, name)
    }

    fn url(&self) -> String {
        match self {
            Table::Postgres(db) => db.url.clone(),
            Table::MariaDb(..) => "mysql://root@127.0.0.1:3306/test".into(),
        }
    }

    fn name(&self) -> &str {
        match self {
            Table::Postgres(_) => "events",
            Table::MariaDb(_, name) => name,
        }
    }

    /// Rows `ids`, all with the same timestamp `second` (+ 0.5 µs-exact
    /// fraction, so precision loss would show).
    async fn insert(&self, ids: std::ops::Range<i64>, second: i64) {
        for id in ids {
            match self {
                Table::Postgres(db) => {
                    sqlx::query(
                        "INSERT INTO events VALUES ($1, to_timestamp($2) + interval '123456 microseconds', $3)",
                    )
                    .bind(id)
                    .bind(second as f64)
                    .bind(format!("row {id}"))
                    .execute(&db.pool)
                    .await
                    .unwrap();
                }
                Table::MariaDb(pool, name) => {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "INSERT INTO {name} VALUES (?, TIMESTAMP('2026-01-01') + INTERVAL ? SECOND + INTERVAL 123456 MICROSECOND, ?)"
                    )))
                    .bind(id)
                    .bind(second)
                    .bind(format!("row {id}"))
                    .execute(pool)
                    .await
                    .unwrap();
                }
            }
        }
    }

    async fn drop_table(self) {
        if let Table::MariaDb(pool, name) = self {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {name}")))
                .execute(&pool)
                .await;
        }
    }
}

/// Rows with equal timestamps across page boundaries, and rows inserted
/// while the agent polls: each row is buffered exactly once.
async fn every_row_once(table: Table) {
    use dcs_edge::sources::database::DatabaseConfig;
    use dcs_edge::sources::{SourceConfig, SourceKind};
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("db.url");
    std::fs::write(&url_file, table.url()).unwrap();
    // Five rows per timestamp and pages of four: pages end inside a group.
    table.insert(0..25, 0).await;
    for g in 0..5 {
        table.insert(25 + g * 5..30 + g * 5, 10 + g).await;
    }
    let unreachable = format!("https://localhost:{}", agent::free_port());
    let buffer = dir.path().join("buffer.db");
    let mut config = agent::test_config(&pki.agent("acme", "edge-1"), &unreachable, &buffer);
    config.sources = vec![SourceConfig {
        name: "db".into(),
        kind: SourceKind::Database(DatabaseConfig {
            url_file: Some(url_file),
            url_env: None,
            query: format!("SELECT id, updated_at, body FROM {}", table.name()),
            cursor: vec!["updated_at".into(), "id".into()],
            page_size: 4,
        }),
        stream: "db.events".into(),
        schedule: "100ms".into(),
        timezone: None,
        jitter: Duration::ZERO,
        transform: None,
    }];
    let a = start_agent(config).await;
    let http = reqwest::Client::new();

    // More rows while the agent polls, five per timestamp.
    for round in 0..10 {
        table
            .insert(50 + round * 5..55 + round * 5, 100 + round)
            .await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let got = eventually(
        Duration::from_secs(20),
        || buffered(&http, &a.url),
        |n| *n >= 100,
    )
    .await;
    if got < 100 {
        let failed: Value = http
            .get(a.endpoint("/api/v1/jobs?source=db&state=failed&limit=1"))
            .fetch_json()
            .await;
        let detail = match failed[0]["job_id"].as_str() {
            Some(id) => {
                http.get(a.endpoint(&format!("/api/v1/jobs/result/{id}")))
                    .fetch_text()
                    .await
            }
            None => "no failed job".into(),
        };
        panic!("{got} of 100 rows buffered; {detail}");
    }
    // A few more polls find nothing new.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(buffered(&http, &a.url).await, 100);
    a.stop().await;
    table.drop_table().await;

    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    for row in export(&buffer) {
        assert_eq!(row["state"], "buffered", "{row}");
        assert_eq!(row["stream"], "db.events");
        *seen
            .entry(row["payload"]["id"].as_u64().unwrap())
            .or_default() += 1;
        assert!(row["payload"]["body"].as_str().unwrap().starts_with("row "));
    }
    assert_eq!(seen.len(), 100);
    assert!(seen.values().all(|c| *c == 1), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_table_is_read_once_including_equal_timestamps_and_rows_added_while_polled() {
    every_row_once(Table::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mariadb_table_is_read_once_including_equal_timestamps_and_rows_added_while_polled() {
    every_row_once(Table::mariadb().await).await;
}

/// A small JSON API on 127.0.0.1:0 that the agent polls: items with ids,
/// served in pages linked by `Link` headers (`/items?page=N`) and as a
/// cursor feed (`/feed?after=ID`), with an ETag on the first page.
#[derive(Default)]
struct Api {
    items: Vec<Value>,
    /// The next this many requests answer 503.
    fail_next: u32,
    not_modified: u32,
    requests: u32,
    auth: Vec<Option<String>>,
}

type SharedApi = std::sync::Arc<std::sync::Mutex<Api>>;

const PAGE: usize = 3;

fn api_answer(
    api: &SharedApi,
    path: &str,
    query: &str,
    headers: &hyper::HeaderMap,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let mut api = api.lock().unwrap();
    api.requests += 1;
    api.auth.push(
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    );
    let response = hyper::Response::builder().header("content-type", "application/json");
    if api.fail_next > 0 {
        api.fail_next -= 1;
        return response
            .status(503)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
    }
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let (status, link, etag, body) = if path == "/items" {
        let page = param("page").unwrap_or(1);
        let etag = format!("\"v{}\"", api.items.len());
        if page == 1
            && headers
                .get("if-none-match")
                .is_some_and(|v| v.to_str().unwrap_or("") == etag)
        {
            api.not_modified += 1;
            (304, None, Some(etag), String::new())
        } else {
            let chunk: Vec<&Value> = api
                .items
                .iter()
                .skip((page - 1) * PAGE)
                .take(PAGE)
                .collect();
            let link = (page * PAGE < api.items.len())
                .then(|| format!("</items?page={}>; rel=\"next\"", page + 1));
            let body = json!({ "data": chunk }).to_string();
            (200, link, (page == 1).then_some(etag), body)
        }
    } else {
        let after = param("after").unwrap_or(0);
        let chunk: Vec<&Value> = api
            .items
            .iter()
            .filter(|i| i["id"].as_u64().unwrap() as usize > after)
            .take(PAGE)
            .collect();
        let next = chunk.last().map(|i| i["id"].clone()).unwrap_or(Value::Null);
        (
            200,
            None,
            None,
            json!({ "data": chunk, "next": next }).to_string(),
        )
    };
    let mut response = response.status(status);
    if let Some(link) = link {
        response = response.header("link", link);
    }
    if let Some(etag) = etag {
        response = response.header("etag", etag);
    }
    response
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap()
}

async fn start_api(api: SharedApi) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let api = api.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let answer = api_answer(
                            &api,
                            req.uri().path(),
                            req.uri().query().unwrap_or(""),
                            req.headers(),
                        );
                        async move { Ok::<_, std::convert::Infallible>(answer) }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
            });
        }
    });
    format!("http://{addr}")
}

fn item(id: u64) -> Value {
    json!({ "id": id, "name": format!("item {id}") })
}

async fn http_agent(
    api_url: &str,
    schedule: &str,
    adjust: impl FnOnce(&mut dcs_edge::sources::http::HttpConfig),
) -> (JobsAgent, PathBuf) {
    use dcs_edge::sources::http::{HttpConfig, HttpFormat, Pagination};
    use dcs_edge::sources::{SourceConfig, SourceKind};
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let unreachable = format!("https://localhost:{}", agent::free_port());
    let buffer = dir.path().join("buffer.db");
    let mut config = agent::test_config(&pki.agent("acme", "edge-1"), &unreachable, &buffer);
    let mut http = HttpConfig {
        url: format!("{api_url}/items?page=1"),
        headers: [("accept".to_owned(), "application/json".to_owned())].into(),
        bearer_token_file: Some(token),
        bearer_token_env: None,
        format: HttpFormat::Json,
        records_pointer: "/data".into(),
        id_pointer: None,
        pagination: Pagination::Link,
        cursor_pointer: None,
        cursor_param: None,
        timeout: Duration::from_secs(5),
        retries: 3,
        max_pages: 100,
        max_response_bytes: dcs_edge::sources::http::DEFAULT_MAX_RESPONSE_BYTES,
    };
    adjust(&mut http);
    config.sources = vec![SourceConfig {
        name: "api".into(),
        kind: SourceKind::Http(http),
        stream: "api.items".into(),
        schedule: schedule.into(),
        timezone: None,
        jitter: Duration::ZERO,
        transform: None,
    }];
    let agent = start_agent(config).await;
    (
        JobsAgent {
            _pki: pki,
            dir,
            agent,
            http: reqwest::Client::new(),
        },
        buffer,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_pages_are_read_once_and_an_unchanged_resource_costs_a_304() {
    let api = SharedApi::default();
    api.lock().unwrap().items = (1..=7).map(item).collect();
    // The first request fails: retried within the run.
    api.lock().unwrap().fail_next = 1;
    let url = start_api(api.clone()).await;
    let (a, _) = http_agent(&url, "manual", |h| h.id_pointer = Some("/id".into())).await;

    let run = |expected: u64| {
        let a = &a;
        async move {
            let (code, body) = a.trigger(r#"{"source":"api"}"#).await;
            assert_eq!(code, 202, "{body}");
            let job = body["job_id"].as_str().unwrap().to_owned();
            let status = a.finished(&job).await;
            let (_, result) = a.get(&format!("/api/v1/jobs/result/{job}")).await;
            assert_eq!(status["state"], "succeeded", "{result}");
            assert_eq!(result["records_collected"], expected, "{result}");
            result
        }
    };
    let first = run(7).await;
    let cp = &first["checkpoint_after"]["http"];
    assert_eq!(cp["etag"], "\"v7\"");
    assert!(
        cp["next"].is_null(),
        "a finished run has nothing to resume: {cp}"
    );
    run(0).await;
    assert_eq!(
        api.lock().unwrap().not_modified,
        1,
        "the second run got a 304"
    );
    // The resource changes: the whole list is served again, and only the
    // new items are buffered (their ids are known to the buffer).
    api.lock().unwrap().items.extend([item(8), item(9)]);
    run(2).await;
    let st = a.get("/v1/status").await.1;
    assert_eq!(st["buffer"]["records"], 9);
    let api = api.lock().unwrap();
    assert!(
        api.auth
            .iter()
            .all(|h| h.as_deref() == Some("Bearer t0ken")),
        "{:?}",
        api.auth
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_feed_polled_while_it_grows_yields_every_item_once() {
    use dcs_edge::sources::http::Pagination;
    let api = SharedApi::default();
    api.lock().unwrap().items = (1..=5).map(item).collect();
    let url = start_api(api.clone()).await;
    let (a, buffer) = http_agent(&url, "100ms", |h| {
        h.url = format!("{url}/feed");
        h.pagination = Pagination::Cursor;
        h.cursor_pointer = Some("/next".into());
        h.cursor_param = Some("after".into());
    })
    .await;
    for id in 6..=40 {
        api.lock().unwrap().items.push(item(id));
        if id % 7 == 0 {
            api.lock().unwrap().fail_next = 1;
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let got = eventually(
        Duration::from_secs(20),
        || async {
            a.get("/v1/status").await.1["buffer"]["records"]
                .as_u64()
                .unwrap_or(0)
        },
        |n| *n >= 40,
    )
    .await;
    assert_eq!(got, 40);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let JobsAgent { agent, .. } = a;
    agent.stop().await;
    let mut ids: Vec<u64> = export(&buffer)
        .iter()
        .map(|r| r["payload"]["id"].as_u64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, (1..=40).collect::<Vec<_>>(), "every item once");
}
