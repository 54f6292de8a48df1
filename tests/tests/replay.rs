//! Replay after a restore: agents that retain delivered records
//! (`buffer.retain_delivered`) send them again when an operator runs
//! `dcs-aggregator replay --since T` after PostgreSQL was restored to T.
//! Real aggregator, agent, PostgreSQL and operator command; the restore is
//! simulated by deleting what a restore to T would lose: the batches stored
//! since T (their records and their claims in the key ledger). The real
//! point-in-time restore is `scripts/dr-drill.sh`.
//! Needs `cargo build --workspace --bins` first (the operator command).

use std::time::Duration;

use dcs_tests::agent::status as agent_status;
use dcs_tests::agent::{self, start_agent, wait_until};
use dcs_tests::aggregator::start_aggregator_with;
use dcs_tests::pg::TestDb;
use dcs_tests::pki::Pki;
use dcs_tests::process::binary;
use sqlx::PgPool;

const STREAM: &str = "replay";

async fn push_range(agent_url: &str, from: usize, to: usize) {
    let http = reqwest::Client::new();
    for chunk_start in (from..to).step_by(100) {
        let body: String = (chunk_start..(chunk_start + 100).min(to))
            .map(|i| {
                format!("{{\"stream\":\"{STREAM}\",\"id\":\"r-{i}\",\"payload\":{{\"n\":{i}}}}}\n")
            })
            .collect();
        let r = agent::push(&http, agent_url, "application/x-ndjson", body).await;
        assert!(r.status().is_success(), "push: {}", r.status());
    }
}

/// (distinct ids, rows) of the stream.
async fn stored(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT count(DISTINCT record_id), count(*) FROM records WHERE stream = $1")
        .bind(STREAM)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_stored(pool: &PgPool, n: i64) -> (i64, i64) {
    wait_until(Duration::from_secs(60), || async {
        stored(pool).await.0 >= n
    })
    .await;
    stored(pool).await
}

/// What a restore to `since` loses: every batch committed at or after it.
async fn lose_batches_since(pool: &PgPool, since: &str) -> u64 {
    sqlx::query(
        "WITH gone AS (
             DELETE FROM record_ranges WHERE stored_at >= $1::timestamptz
             RETURNING agent_id, epoch, first_seq, last_seq)
         DELETE FROM records r USING gone g
         WHERE r.agent_id = g.agent_id AND r.epoch = g.epoch
           AND r.seq BETWEEN g.first_seq AND g.last_seq",
    )
    .bind(since)
    .execute(pool)
    .await
    .unwrap()
    .rows_affected()
}

async fn now_rfc3339(pool: &PgPool) -> String {
    sqlx::query_scalar(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn replay_command(pki: &Pki, db: &TestDb, since: &str) -> serde_json::Value {
    let config = pki.path().join("aggregator-cli.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[database]\nurl = {:?}\n",
            pki.ca, pki.server_cert, pki.server_key, db.url
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(binary("dcs-aggregator"))
        .args([
            "replay",
            "--since",
            since,
            "--reason",
            "restored to a point in time",
        ])
        .arg("--config")
        .arg(&config)
        .env_remove("DCS_AGG_CONFIG")
        .output()
        .await
        .expect("run dcs-aggregator replay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

async fn replayed(agent_url: &str, outcome: &str) -> u64 {
    agent::metric_sample(
        agent_url,
        "dcs_agent_replayed_records_total",
        &[("outcome", outcome)],
    )
    .await
    .unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restore_the_replay_command_brings_back_every_record_lost_exactly_once() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let aggregator = start_aggregator_with(&pki, &db.url, |c| {
        c.revocation.refresh_interval = Duration::from_millis(200);
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = agent::test_config(
        &pki.agent("acme", "edge-1"),
        &aggregator.url,
        &dir.path().join("buffer.db"),
    );
    config.buffer.retain_delivered = Duration::from_secs(3600);
    config.batch.max_records = 50;
    config.batch.heartbeat = Duration::from_millis(500);
    let agent = start_agent(config).await;

    // Before the restore point, and after it.
    push_range(&agent.url, 0, 1000).await;
    assert_eq!(wait_stored(&db.pool, 1000).await, (1000, 1000));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let restore_point = now_rfc3339(&db.pool).await;
    push_range(&agent.url, 1000, 2000).await;
    assert_eq!(wait_stored(&db.pool, 2000).await, (2000, 2000));
    let status = agent_status(&agent.url).await;
    assert_eq!(status["buffer"]["records"], 0, "queue drained: {status}");
    assert_eq!(
        status["buffer"]["retained"], 2000,
        "every delivered record retained: {status}"
    );

    let lost = lose_batches_since(&db.pool, &restore_point).await;
    assert_eq!(lost, 1000, "the restore lost the second thousand");

    let request = replay_command(&pki, &db, &restore_point).await;
    assert!(request["id"].as_i64().is_some(), "{request}");
    let (ids, rows) = wait_stored(&db.pool, 2000).await;
    assert_eq!((ids, rows), (2000, 2000), "every record once");
    // Also records from before the restore point within the clock margin
    // were sent again, and answered as duplicates.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            replayed(&agent.url, "restored").await == 1000
        })
        .await,
        "restored={}",
        replayed(&agent.url, "restored").await
    );
    assert_eq!(replayed(&agent.url, "duplicate").await, 1000);
    assert_eq!(replayed(&agent.url, "refused").await, 0);

    // A restart does not replay the same request again (the counters are
    // the process's, so they carry over to the restarted agent).
    let restored_before = replayed(&agent.url, "restored").await;
    let duplicates_before = replayed(&agent.url, "duplicate").await;
    agent.stop().await;
    let mut config = agent::test_config(
        &pki.agent("acme", "edge-1"),
        &aggregator.url,
        &dir.path().join("buffer.db"),
    );
    config.buffer.retain_delivered = Duration::from_secs(3600);
    config.batch.heartbeat = Duration::from_millis(500);
    let agent = start_agent(config).await;
    push_range(&agent.url, 2000, 2100).await;
    assert_eq!(wait_stored(&db.pool, 2100).await, (2100, 2100));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        (
            replayed(&agent.url, "restored").await,
            replayed(&agent.url, "duplicate").await
        ),
        (restored_before, duplicates_before),
        "no second replay"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_retention_nothing_is_kept_after_delivery() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let aggregator = start_aggregator_with(&pki, &db.url, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let config = agent::test_config(
        &pki.agent("acme", "edge-1"),
        &aggregator.url,
        &dir.path().join("buffer.db"),
    );
    let agent = start_agent(config).await;
    push_range(&agent.url, 0, 300).await;
    assert_eq!(wait_stored(&db.pool, 300).await, (300, 300));
    let status = agent_status(&agent.url).await;
    assert_eq!(status["buffer"]["retained"], 0, "{status}");
    agent.stop().await;
}
