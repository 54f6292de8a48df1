//! Per-stream JSON Schemas, record transforms and cron schedules, end to end:
//! real agents on 127.0.0.1 port 0, a real aggregator, PostgreSQL on this
//! machine, files written by the test and a PostgreSQL table as a source.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use dcs_edge::schema::StreamConfig;
use dcs_edge::sources::database::DatabaseConfig;
use dcs_edge::sources::file::{FileConfig, Format};
use dcs_edge::sources::{SourceConfig, SourceKind};
use dcs_edge::transform::TransformConfig;
use dcs_tests::agent::{self, RunningAgent, push, start_agent, wait_until};
use dcs_tests::http::Fetch as _;
use dcs_tests::pki::Pki;
use dcs_tests::site::Site;
use serde_json::{Value, json};

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Payloads of the `readings` stream: a sensor name and a numeric value.
const READINGS_SCHEMA: &str = r#"{
    "type": "object",
    "required": ["sensor", "value"],
    "properties": {
        "sensor": {"type": "string", "minLength": 1},
        "value": {"type": "number"},
        "site": {"type": "string"}
    }
}"#;

struct Setup {
    site: Site,
    http: reqwest::Client,
}

async fn setup() -> Setup {
    Setup {
        site: Site::new().await,
        http: reqwest::Client::new(),
    }
}

impl Setup {
    /// An agent delivering to the aggregator, `readings` under its schema.
    fn config(&self) -> dcs_edge::Config {
        let mut config = self.site.agent_config();
        config.streams.insert(
            "readings".into(),
            StreamConfig {
                schema: Some(READINGS_SCHEMA.into()),
                schema_file: None,
            },
        );
        config
    }

    /// (record_id, payload) of every delivered row of `stream`.
    async fn rows(&self, stream: &str) -> Vec<(String, Value)> {
        sqlx::query_as::<_, (String, String)>(
            "SELECT record_id, payload::text FROM records WHERE stream = $1 ORDER BY epoch, seq",
        )
        .bind(stream)
        .fetch_all(&self.site.db.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, p)| (id, serde_json::from_str(&p).unwrap()))
        .collect()
    }

    async fn wait_for_rows(&self, stream: &str, n: usize) -> Vec<(String, Value)> {
        wait_until(DELIVERY_TIMEOUT, || async {
            self.rows(stream).await.len() >= n
        })
        .await;
        self.rows(stream).await
    }

    async fn get(&self, agent: &RunningAgent, path: &str) -> Value {
        self.http.get(agent.endpoint(path)).fetch_json().await
    }

    /// Triggers `source` and waits for the job's result.
    async fn run_job(&self, agent: &RunningAgent, source: &str) -> Value {
        let r = self
            .http
            .post(agent.endpoint("/api/v1/jobs/trigger"))
            .json(&json!({ "source": source }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let job = r.json::<Value>().await.unwrap()["job_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let result = loop {
            let r = self
                .http
                .get(agent.endpoint(&format!("/api/v1/jobs/result/{job}")))
                .send()
                .await
                .unwrap();
            // 409 while the job is queued or running.
            if r.status() == 200 || std::time::Instant::now() > deadline {
                break r.json::<Value>().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(result["state"], "succeeded", "{result}");
        result
    }

    async fn metrics(&self, agent: &RunningAgent) -> String {
        agent.metrics().await
    }
}

fn file_source(name: &str, stream: &str, dir: &Path) -> SourceConfig {
    SourceConfig {
        name: name.into(),
        kind: SourceKind::File(FileConfig {
            paths: vec![dir.join("*.ndjson").display().to_string()],
            format: Format::Ndjson,
            follow_symlinks: false,
        }),
        stream: stream.into(),
        schedule: "manual".into(),
        timezone: None,
        jitter: Duration::ZERO,
        transform: None,
    }
}

/// A `[sources.transform]` table, written as JSON.
fn transform(rules: Value) -> TransformConfig {
    serde_json::from_value(rules).unwrap()
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_payload_failing_its_stream_schema_is_refused_with_index_field_and_reason() {
    let s = setup().await;
    let agent = start_agent(s.config()).await;

    let bad = json!([
        {"stream": "readings", "id": "bad-0", "payload": {"sensor": "t1", "value": 20.5}},
        {"stream": "readings", "id": "bad-1", "payload": {"sensor": "t2", "value": "hot"}},
        {"stream": "free.text", "id": "bad-2", "payload": {"value": "anything goes here"}},
        {"stream": "readings", "id": "bad-3", "payload": {"value": 3}}
    ]);
    let r = push(&s.http, &agent.url, "application/json", bad.to_string()).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "invalid_records", "{body}");
    let details = body["details"].as_array().unwrap();
    assert_eq!(details.len(), 2, "{body}");
    assert_eq!(details[0]["index"], 1);
    assert_eq!(details[0]["field"], "payload/value");
    let reason = details[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("\"hot\"") && reason.contains("number"),
        "{reason}"
    );
    assert!(reason.contains("/properties/value/type"), "{reason}");
    assert_eq!(details[1]["index"], 3);
    assert_eq!(details[1]["field"], "payload");
    assert!(details[1]["reason"].as_str().unwrap().contains("sensor"));

    // Nothing of the refused request was buffered, the good records included.
    let status = s.get(&agent, "/v1/status").await;
    assert_eq!(status["buffer"]["records"], 0, "{status}");
    assert_eq!(status["buffer"]["delivered_total"], 0, "{status}");

    // PUT refuses the same way.
    let r = s
        .http
        .put(agent.endpoint("/v1/records/put-1"))
        .header("content-type", "application/json")
        .body(json!({"stream": "readings", "payload": {"sensor": ""}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    let fields: Vec<&str> = body["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.contains(&"payload/sensor") && fields.contains(&"payload"),
        "{body}"
    );

    // A following valid request is accepted and delivered, alone.
    let good = json!([
        {"stream": "readings", "id": "good-0", "payload": {"sensor": "t1", "value": 20.5}},
        {"stream": "readings", "id": "good-1", "payload": {"sensor": "t2", "value": -3, "site": "b"}}
    ]);
    let r = push(&s.http, &agent.url, "application/json", good.to_string()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["accepted"], 2);
    let rows = s.wait_for_rows("readings", 2).await;
    let ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["good-0", "good-1"]);
    assert_eq!(s.site.db.count("records").await, 2);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulled_lines_are_mapped_then_checked_and_the_failures_become_counted_dead_letters() {
    let s = setup().await;
    let logs = s.site.dir.path().join("plant");
    std::fs::create_dir(&logs).unwrap();
    let mut config = s.config();
    let mut source = file_source("plant-file", "readings", &logs);
    // The plant writes `temp` and `probe` and a token; the stream wants
    // `value`, `sensor` and `site`, and no token.
    source.transform = Some(transform(json!({
        "rename": {"temp": "value", "/probe/name": "sensor"},
        "drop": ["token", "probe"],
        "set": {"site": "berlin"}
    })));
    config.sources = vec![source];
    let agent = start_agent(config).await;

    append(
        &logs.join("a.ndjson"),
        concat!(
            r#"{"n":1,"temp":20.5,"probe":{"name":"t1","slot":4},"token":"s3cret"}"#,
            "\n",
            r#"{"n":2,"temp":"warm","probe":{"name":"t2"},"token":"s3cret"}"#,
            "\n",
            r#"{"n":3,"temp":21.0,"probe":{"name":"t3"}}"#,
            "\n",
            r#"{"n":4,"temp":22.5,"token":"s3cret"}"#,
            "\n",
            r#"{"n":5,"temp":-1,"probe":{"name":"t5"},"token":"s3cret"}"#,
            "\n",
        ),
    );
    let result = s.run_job(&agent, "plant-file").await;
    assert_eq!(result["records_collected"], 3, "{result}");
    assert_eq!(result["records_rejected"], 2, "{result}");

    // The valid lines arrive once, mapped: renamed, dropped, set.
    let rows = s.wait_for_rows("readings", 3).await;
    let payloads: Vec<&Value> = rows.iter().map(|(_, p)| p).collect();
    assert_eq!(
        payloads,
        [
            &json!({"n": 1, "value": 20.5, "sensor": "t1", "site": "berlin"}),
            &json!({"n": 3, "value": 21.0, "sensor": "t3", "site": "berlin"}),
            &json!({"n": 5, "value": -1, "sensor": "t5", "site": "berlin"}),
        ]
    );

    // The others are dead letters with the schema's reason, and counted.
    let status = s.get(&agent, "/v1/status").await;
    assert_eq!(status["dead_letters"]["records"], 2, "{status}");
    let metrics = s.metrics(&agent).await;
    assert!(
        metrics
            .contains(r#"dcs_agent_source_records_total{source="plant-file",result="rejected"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"dcs_agent_source_records_total{source="plant-file",result="collected"} 3"#
        ),
        "{metrics}"
    );

    // Another run reads nothing again: each line once.
    append(
        &logs.join("a.ndjson"),
        "{\"n\":6,\"temp\":7,\"probe\":{\"name\":\"t6\"}}\n",
    );
    let result = s.run_job(&agent, "plant-file").await;
    assert_eq!(result["records_collected"], 1, "{result}");
    assert_eq!(result["records_rejected"], 0, "{result}");
    let rows = s.wait_for_rows("readings", 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.rows("readings").await.len(), 4, "{rows:?}");
    agent.stop().await;

    let out = std::process::Command::new(agent::binary("dcs-edge"))
        .args(["buffer", "export", "--path"])
        .arg(s.site.dir.path().join("buffer.db"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let dead: BTreeMap<i64, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["state"] == "dead_letter")
        .map(|r| {
            let line: Value = serde_json::from_str(r["payload"].as_str().unwrap()).unwrap();
            (
                line["n"].as_i64().unwrap(),
                r["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(dead.keys().copied().collect::<Vec<_>>(), [2, 4], "{dead:?}");
    assert!(dead[&2].starts_with("payload/value: "), "{dead:?}");
    assert!(dead[&4].starts_with("payload: ") && dead[&4].contains("sensor"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_source_delivers_its_rows_with_the_mapped_fields() {
    let s = setup().await;
    sqlx::raw_sql(
        "CREATE TABLE plant_rows (id bigint PRIMARY KEY, temp_c numeric NOT NULL,
                                  meta jsonb NOT NULL, password text);
         INSERT INTO plant_rows VALUES
           (1, 19.5, '{\"probe\": \"p1\", \"line\": 4}', 'x'),
           (2, 20.25, '{\"probe\": \"p2\", \"line\": 5}', 'y');",
    )
    .execute(&s.site.db.pool)
    .await
    .unwrap();
    let url_file = s.site.dir.path().join("db.url");
    std::fs::write(&url_file, &s.site.db.url).unwrap();
    let mut config = s.config();
    config.sources = vec![SourceConfig {
        name: "plant-db".into(),
        kind: SourceKind::Database(DatabaseConfig {
            url_file: Some(url_file),
            url_env: None,
            query: "SELECT id, temp_c, meta, password FROM plant_rows".into(),
            cursor: vec!["id".into()],
            page_size: 100,
        }),
        stream: "readings".into(),
        schedule: "manual".into(),
        timezone: None,
        jitter: Duration::ZERO,
        transform: Some(transform(json!({
            "rename": {"temp_c": "value", "/meta/probe": "sensor"},
            "select": ["id", "value", "sensor"],
            "set": {"site": "hamburg", "/origin/table": "plant_rows"}
        }))),
    }];
    let agent = start_agent(config).await;
    let result = s.run_job(&agent, "plant-db").await;
    assert_eq!(result["records_collected"], 2, "{result}");
    let rows = s.wait_for_rows("readings", 2).await;
    let payloads: Vec<&Value> = rows.iter().map(|(_, p)| p).collect();
    assert_eq!(
        payloads,
        [
            &json!({"id": 1, "value": 19.5, "sensor": "p1", "site": "hamburg", "origin": {"table": "plant_rows"}}),
            &json!({"id": 2, "value": 20.25, "sensor": "p2", "site": "hamburg", "origin": {"table": "plant_rows"}}),
        ]
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_schedule_with_a_seconds_field_runs_the_source_at_each_fire() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("ticks");
    std::fs::create_dir(&logs).unwrap();
    let unreachable = format!("https://localhost:{}", agent::free_port());
    let mut config = agent::test_config(
        &pki.agent("acme", "edge-1"),
        &unreachable,
        &dir.path().join("buffer.db"),
    );
    let mut source = file_source("ticks", "ticks", &logs);
    source.schedule = "* * * * * *".into();
    config.sources = vec![source];
    append(&logs.join("t.ndjson"), "{\"tick\":1}\n");
    let agent = start_agent(config).await;
    let http = reqwest::Client::new();

    let list = |http: reqwest::Client, url: String| async move {
        http.get(format!("{url}/api/v1/jobs?source=ticks"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    wait_until(Duration::from_secs(10), || async {
        list(http.clone(), agent.url.clone())
            .await
            .as_array()
            .is_some_and(|jobs| jobs.len() >= 3)
    })
    .await;
    let jobs = list(http.clone(), agent.url.clone()).await;
    let jobs = jobs.as_array().unwrap();
    assert!(jobs.len() >= 3, "{jobs:?}");
    assert!(jobs.iter().all(|j| j["trigger"] == "schedule"), "{jobs:?}");
    // One run per fire: each job in a second of its own, and none made up
    // at start-up (a cron source waits for its first fire).
    let mut seconds: Vec<&str> = jobs
        .iter()
        .map(|j| &j["created_at"].as_str().unwrap()[..19])
        .collect();
    seconds.dedup();
    assert_eq!(seconds.len(), jobs.len(), "{jobs:?}");
    let status: Value = agent.status().await;
    assert_eq!(status["buffer"]["records"], 1, "the line is read once");
    agent.stop().await;
}

#[tokio::test]
async fn check_config_names_a_bad_cron_a_conflicting_transform_and_a_bad_schema() {
    let pki = Pki::new();
    let cert = pki.agent("acme", "edge-1");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edge.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[aggregator]
url = "https://localhost:8443"
ca = "{ca}"
cert = "{cert}"
key = "{key}"

[[sources]]
name = "good"
kind = "file"
stream = "a"
schedule = "*/5 * * * *"
[sources.file]
paths = ["/var/log/a/*.log"]
format = "lines"

[[sources]]
name = "bad"
kind = "file"
stream = "b"
schedule = "0 25 * * *"
[sources.file]
paths = ["/var/log/b/*.log"]
format = "lines"
[sources.transform]
rename = {{ "a" = "x", "b" = "x" }}

[streams."b"]
schema = '{{"type": "thing"}}'
"#,
            ca = cert.ca.display(),
            cert = cert.cert.display(),
            key = cert.key.display(),
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(agent::binary("dcs-edge"))
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "sources[1].schedule.cron",
        r#"sources[1].transform.rename."a""#,
        r#"streams."b".schema"#,
    ] {
        assert!(stderr.contains(key), "{key} missing from {stderr}");
    }
    assert!(!stderr.contains("sources[0]"), "{stderr}");
}
