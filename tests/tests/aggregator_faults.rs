//! The aggregator when its PostgreSQL goes away and comes back, on a cluster
//! the test owns (see `dcs_tests::pg::PgCluster`).

use std::time::Duration;

use dcs_shared::wire::{self, BatchAck, ErrorBody, OutRecord};
use dcs_tests::aggregator::{RunningAggregator, agent_client, start_aggregator_with};
use dcs_tests::pg::{PgCluster, TestDb};
use dcs_tests::pki::Pki;
use reqwest::StatusCode;
use uuid::Uuid;

fn batch(epoch: Uuid, seqs: std::ops::RangeInclusive<i64>) -> Vec<u8> {
    let payloads: Vec<(i64, String)> = seqs.map(|s| (s, format!(r#"{{"n":{s}}}"#))).collect();
    wire::encode_batch(
        epoch,
        None,
        payloads.iter().map(|(seq, payload)| OutRecord {
            seq: *seq,
            id: "id",
            stream: "s",
            ts_us: 1_700_000_000_000_000,
            payload,
            received: None,
        }),
        1,
    )
}

async fn post(
    client: &reqwest::Client,
    agg: &RunningAggregator,
    body: Vec<u8>,
) -> (StatusCode, Option<String>, Vec<u8>) {
    let response = client
        .post(agg.endpoint(wire::BATCHES_PATH))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(body)
        .send()
        .await
        .expect("request reaches the aggregator");
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status,
        retry_after,
        response.bytes().await.unwrap().to_vec(),
    )
}

async fn outage_and_recovery(mode: &str) {
    let cluster = PgCluster::start().await;
    let db = TestDb::on_server(&cluster.url()).await.expect("test db");
    let pki = Pki::new();
    let agg = start_aggregator_with(&pki, &db.url, |config| {
        config.database.acquire_timeout = Duration::from_secs(1);
        config.limits.retry_after = Duration::from_secs(2);
    })
    .await;
    let client = agent_client(&pki.agent("acme", "edge-01"));
    let epoch = Uuid::now_v7();

    let (status, _, body) = post(&client, &agg, batch(epoch, 1..=10)).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));

    cluster.stop(mode).await;
    for _ in 0..3 {
        let (status, retry_after, body) = post(&client, &agg, batch(epoch, 11..=20)).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(retry_after.as_deref(), Some("2"));
        let error: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(error.error, "database_unavailable");
    }
    let ready = client.get(agg.endpoint("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    cluster.start_again().await;
    // Stale pooled connections may cost an attempt or two; every answer until
    // success must be a 503, never a 2xx that did not commit or a 500.
    let mut ack = None;
    for _ in 0..40 {
        let (status, _, body) = post(&client, &agg, batch(epoch, 11..=20)).await;
        match status {
            StatusCode::OK => {
                let a = serde_json::from_slice::<BatchAck>(&body).unwrap();
                ack = Some(BatchAck::new(a.accepted, a.duplicates));
                break;
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&body)),
        }
    }
    assert_eq!(
        ack,
        Some(BatchAck::new(10, 0)),
        "the aggregator did not recover"
    );
    assert_eq!(db.count("records").await, 20);
    let ready = client.get(agg.endpoint("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    agg.stop().await;
}

#[tokio::test]
async fn a_postgres_crash_turns_batches_into_503_until_it_is_back_then_they_are_stored_once() {
    outage_and_recovery("immediate").await;
}

#[tokio::test]
async fn a_postgres_clean_shutdown_turns_batches_into_503_until_it_is_back() {
    outage_and_recovery("fast").await;
}
