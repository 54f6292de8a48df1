//! The whole pipeline, end to end: producer → edge agent (SQLite) → mutual TLS
//! → aggregator → PostgreSQL. Real servers on 127.0.0.1, real databases.

use std::collections::HashSet;
use std::time::Duration;

use dcs_tests::agent::{self, AgentProcess, push, start_agent, wait_until};
use dcs_tests::aggregator::start_aggregator_with;
use dcs_tests::http::Fetch as _;
use dcs_tests::pg::{PgCluster, TestDb};
use dcs_tests::pki::Pki;
use dcs_tests::site::Site;
use serde_json::{Value, json};
use sqlx::PgPool;

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

async fn count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM records")
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

async fn wait_for_rows(pool: &PgPool, n: i64) -> i64 {
    wait_until(DELIVERY_TIMEOUT, || async { count(pool).await >= n }).await;
    count(pool).await
}

/// (record_id, payload) of every row, ordered by seq.
async fn rows(pool: &PgPool) -> Vec<(String, Value)> {
    sqlx::query_as::<_, (String, String)>(
        "SELECT record_id, payload::text FROM records ORDER BY epoch, seq",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, p)| (id, serde_json::from_str(&p).unwrap()))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_pushed_as_one_an_array_and_ndjson_arrive_exactly_once_in_order() {
    let s = Site::new().await;
    let agent = s.agent().await;
    let http = reqwest::Client::new();

    let single = json!({"stream": "app.logs", "id": "r-0", "payload": {"n": 0, "text": "tab\tand \"quotes\" and \\ and ü"}});
    let r = push(&http, &agent.url, "application/json", single.to_string()).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["ids"], json!(["r-0"]));

    let array: Vec<Value> = (1..4)
        .map(|i| json!({"stream": "app.logs", "id": format!("r-{i}"), "ts": "2026-11-23T10:00:00Z", "payload": {"n": i, "nested": {"a": [1, 2.5, null, true]}}}))
        .collect();
    let r = push(
        &http,
        &agent.url,
        "application/json",
        Value::Array(array.clone()).to_string(),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["accepted"], 3);

    let nd = agent::ndjson("metrics", "r", 4..10);
    let r = push(&http, &agent.url, "application/x-ndjson", nd).await;
    assert_eq!(r.status(), 200);

    assert_eq!(wait_for_rows(&s.db.pool, 10).await, 10);
    let got = rows(&s.db.pool).await;
    let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    let expected: Vec<String> = (0..10).map(|i| format!("r-{i}")).collect();
    assert_eq!(ids, expected, "ordered by seq, each once");
    assert_eq!(got[0].1, single["payload"], "payload equal as JSON");
    assert_eq!(got[2].1, array[1]["payload"]);
    assert_eq!(got[9].1, json!({"i": 9, "msg": "record 9"}));

    let ts: String = sqlx::query_scalar(
        "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS') FROM records WHERE record_id = 'r-1'",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(ts, "2026-11-23T10:00:00");
    let (tenant, agent_name): (String, String) = sqlx::query_as(
        "SELECT a.tenant_id, a.name FROM agents a JOIN records r ON r.agent_id = a.id LIMIT 1",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!((tenant.as_str(), agent_name.as_str()), ("acme", "edge-1"));

    // Delivered records leave the buffer and the status says so.
    assert!(
        wait_until(DELIVERY_TIMEOUT, || async {
            let st: Value = agent.status().await;
            st["buffer"]["records"] == 0
        })
        .await
    );
    let st: Value = agent.status().await;
    assert_eq!(st["buffer"]["delivered_total"], 10);
    assert_eq!(st["delivery"]["link"], "up");

    let metrics = agent.metrics().await;
    for series in [
        "dcs_agent_buffer_records 0",
        "dcs_agent_records_delivered_total 10",
        "dcs_agent_link_up 1",
        r#"dcs_agent_records_received_total{stream="app.logs",result="accepted"} 4"#,
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_buffered_while_the_aggregator_is_down_arrive_once_it_starts() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let port = agent::free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = agent::test_config(
        &pki.agent("acme", "edge-1"),
        &format!("https://localhost:{port}"),
        &dir.path().join("buffer.db"),
    );
    let agent = start_agent(config).await;
    let http = reqwest::Client::new();
    for chunk in 0..5 {
        let r = push(
            &http,
            &agent.url,
            "application/x-ndjson",
            agent::ndjson("s", "down", chunk * 200..(chunk + 1) * 200),
        )
        .await;
        assert_eq!(
            r.status(),
            200,
            "the agent acknowledges while the aggregator is down"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st: Value = agent.status().await;
    assert_eq!(st["buffer"]["records"], 1000);
    assert_eq!(st["delivery"]["link"], "down");
    assert!(st["delivery"]["last_error"].is_string());

    let aggregator = start_aggregator_with(&pki, &db.url, |c| {
        c.listen.address = format!("127.0.0.1:{port}").parse().unwrap();
    })
    .await;
    assert_eq!(wait_for_rows(&db.pool, 1000).await, 1000);
    let ids: HashSet<String> = rows(&db.pool).await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 1000, "none twice");
    agent.stop().await;
    aggregator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_with_sigkill_and_restarted_loses_and_doubles_nothing() {
    let s = Site::new().await;
    let mut config = s.agent_config();
    config.batch.max_records = 200;
    let log = s.dir.path().join("agent.log");
    let mut agent = AgentProcess::spawn(&config, &log).await;
    let http = reqwest::Client::new();
    let mut acked = 0usize;
    let mut next = 0usize;
    for round in 0..6 {
        for _ in 0..5 {
            let r = http
                .post(format!("{}/v1/records", agent.url))
                .header("content-type", "application/x-ndjson")
                .body(agent::ndjson("s", "k", next..next + 300))
                .send()
                .await;
            if r.is_ok_and(|r| r.status() == 200) {
                acked = next + 300;
            }
            next += 300;
        }
        // Kill at varying points: right after acks, and while batches are in flight.
        tokio::time::sleep(Duration::from_millis(20 * round)).await;
        agent.kill();
        agent.start().await;
    }
    assert_eq!(acked, next, "every push before a kill was acknowledged");
    let n = wait_for_rows(&s.db.pool, acked as i64).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = rows(&s.db.pool).await;
    let ids: HashSet<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(n as usize, acked, "exactly the acknowledged records");
    assert_eq!(ids.len(), got.len(), "no duplicates");
    for i in 0..acked {
        assert!(ids.contains(format!("k-{i}").as_str()), "k-{i} missing");
    }
    assert!(agent.terminate(), "clean exit on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_is_503_with_retry_after_and_everything_arrives_after_it() {
    let cluster = PgCluster::start_migrated().await;
    let pki = Pki::new();
    let aggregator = start_aggregator_with(&pki, &cluster.url(), |c| {
        c.database.acquire_timeout = Duration::from_secs(1);
        c.limits.retry_after = Duration::from_secs(1);
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cert = pki.agent("acme", "edge-1");
    let agent = start_agent(agent::test_config(
        &cert,
        &aggregator.url,
        &dir.path().join("b.db"),
    ))
    .await;
    let http = reqwest::Client::new();
    assert_eq!(
        push(
            &http,
            &agent.url,
            "application/x-ndjson",
            agent::ndjson("s", "before", 0..100)
        )
        .await
        .status(),
        200
    );
    let pool = PgPool::connect(&cluster.url()).await.unwrap();
    assert_eq!(wait_for_rows(&pool, 100).await, 100);
    pool.close().await;

    for mode in ["fast", "immediate"] {
        cluster.stop(mode).await;
        // The aggregator answers 503 + Retry-After, never a 2xx.
        let batch = dcs_shared::wire::encode_batch(
            uuid::Uuid::new_v4(),
            None,
            [dcs_shared::wire::OutRecord {
                seq: 1,
                id: "x",
                stream: "s",
                ts_us: 0,
                payload: "{}",
                received: None,
            }],
            1,
        );
        let r = dcs_tests::aggregator::agent_client(&cert)
            .post(aggregator.endpoint("/v1/batches"))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(batch)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{mode}");
        assert!(r.headers().contains_key("retry-after"), "{mode}");
        let r = push(
            &http,
            &agent.url,
            "application/x-ndjson",
            agent::ndjson("s", mode, 0..300),
        )
        .await;
        assert_eq!(
            r.status(),
            200,
            "the agent keeps acknowledging during the outage"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.start_again().await;
    }
    let pool = PgPool::connect(&cluster.url()).await.unwrap();
    assert_eq!(wait_for_rows(&pool, 700).await, 700);
    let got = rows(&pool).await;
    let ids: HashSet<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), 700, "no duplicates");
    pool.close().await;
    agent.stop().await;
    aggregator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_shows_each_agent_and_the_backlog_it_reported() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let admin_port = agent::free_port();
    let aggregator = start_aggregator_with(&pki, &db.url, |c| {
        c.admin.address = format!("127.0.0.1:{admin_port}").parse().unwrap();
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(agent::test_config(
        &pki.agent("acme", "edge-7"),
        &aggregator.url,
        &dir.path().join("b.db"),
    ))
    .await;
    let http = reqwest::Client::new();
    let r = push(
        &http,
        &agent.url,
        "application/x-ndjson",
        agent::ndjson("s", "a", 0..50),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(wait_for_rows(&db.pool, 50).await, 50);

    let admin = format!("http://127.0.0.1:{admin_port}");
    let agents: Value = http.get(format!("{admin}/agents")).fetch_json().await;
    let me = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == "edge-7")
        .expect("agent listed");
    assert_eq!(me["tenant"], "acme");
    assert_eq!(me["link"], "up");
    // The backlog reported with the last batch excludes that batch itself.
    assert_eq!(me["backlog_records"], 0);
    assert!(me["last_epoch"].as_str().unwrap().len() == 36);

    let metrics = http.get(format!("{admin}/metrics")).fetch_text().await;
    assert!(
        metrics.contains("dcs_aggregator_records_ingested_total"),
        "{metrics}"
    );
    assert_eq!(
        http.get(format!("{admin}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{admin}/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    agent.stop().await;
    aggregator.stop().await;
}
