//! The aggregator when its PostgreSQL goes away and comes back, on a cluster
//! the test owns (see `dcs_tests::pg::PgCluster`).

use std::time::Duration;

use dcs_shared::wire;
use dcs_tests::aggregator::{
    BatchAnswer, RunningAggregator, agent_client, numbered_batch, start_aggregator_with,
};
use dcs_tests::pg::{PgCluster, TestDb};
use dcs_tests::pki::Pki;
use reqwest::StatusCode;
use uuid::Uuid;

async fn post(client: &reqwest::Client, agg: &RunningAggregator, body: Vec<u8>) -> BatchAnswer {
    BatchAnswer::post(client, &agg.endpoint(wire::BATCHES_PATH), body).await
}

fn batch(epoch: Uuid, seqs: std::ops::RangeInclusive<i64>) -> Vec<u8> {
    numbered_batch(epoch, seqs, false)
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

    assert_eq!(
        post(&client, &agg, batch(epoch, 1..=10)).await.counts(),
        (10, 0)
    );

    cluster.stop(mode).await;
    for _ in 0..3 {
        post(&client, &agg, batch(epoch, 11..=20))
            .await
            .assert_retry_later(2);
    }
    let ready = client.get(agg.endpoint("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    cluster.start_again().await;
    // Stale pooled connections may cost an attempt or two; every answer until
    // success must be a 503, never a 2xx that did not commit or a 500.
    let mut ack = None;
    for _ in 0..40 {
        let answer = post(&client, &agg, batch(epoch, 11..=20)).await;
        match answer.status {
            StatusCode::OK => {
                ack = Some(answer.counts());
                break;
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => panic!("unexpected {other}: {}", answer.text()),
        }
    }
    assert_eq!(ack, Some((10, 0)), "the aggregator did not recover");
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
