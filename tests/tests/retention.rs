//! `records` partitioned by day on `received_at`: redelivery stays exactly
//! once, and retention drops exactly the partitions past it.

use std::time::{SystemTime, UNIX_EPOCH};

use dcs_shared::wire::{self, BatchAck, OutRecord};
use dcs_tests::aggregator::{RunningAggregator, agent_client, post_batch, start_aggregator};
use dcs_tests::pg::TestDb;
use dcs_tests::pki::{AgentCert, Pki};
use reqwest::StatusCode;
use uuid::Uuid;

const DAY_US: i64 = 86_400_000_000;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as i64
}

/// Posts one batch: (seq, received) pairs, payload `{"n":seq}` unless
/// `payload` overrides it.
async fn send(
    agg: &RunningAggregator,
    cert: &AgentCert,
    epoch: Uuid,
    records: &[(i64, Option<i64>)],
    payload: Option<&str>,
) -> (StatusCode, Option<BatchAck>) {
    let payloads: Vec<String> = records
        .iter()
        .map(|(seq, _)| payload.map_or_else(|| format!(r#"{{"n":{seq}}}"#), str::to_owned))
        .collect();
    let body = wire::encode_batch(
        epoch,
        None,
        records
            .iter()
            .zip(&payloads)
            .map(|((seq, received), p)| OutRecord {
                seq: *seq,
                id: "id",
                stream: "s",
                ts_us: 1_700_000_000_000_000 + seq,
                payload: p,
                received: *received,
            }),
        1,
    );
    let response = post_batch(&agent_client(cert), &agg.endpoint(wire::BATCHES_PATH), body).await;
    let status = response.status();
    let ack: Option<BatchAck> = response.json().await.ok();
    // Counts only: the high-water mark is tested in aggregator_api.
    (status, ack.map(|a| BatchAck::new(a.accepted, a.duplicates)))
}

fn ack(accepted: u64, duplicates: u64) -> Option<BatchAck> {
    Some(BatchAck::new(accepted, duplicates))
}

/// Partition of each stored record, by seq.
async fn partitions(db: &TestDb) -> Vec<(i64, String)> {
    sqlx::query_as("SELECT seq, tableoid::regclass::text FROM records ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .expect("read records")
}

/// The daily partition holding microsecond `us` (UTC): `records_pYYYYMMDD`.
fn day_name(us: i64) -> String {
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = us.div_euclid(DAY_US) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("records_p{year:04}{month:02}{day:02}")
}

#[tokio::test]
async fn records_land_in_their_receive_day_and_redelivery_stays_exactly_once() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let agg = start_aggregator(&pki, &db.url).await;
    let cert = pki.agent("acme", "edge-1");
    let epoch = Uuid::new_v4();
    let now = now_us();
    // seq 1: received now; 2: an agent too old to send `received`; 3: a clock
    // in 2100, beyond every partition.
    let batch = [(1, Some(now)), (2, None), (3, Some(4_102_444_800_000_000))];

    assert_eq!(
        send(&agg, &cert, epoch, &batch, None).await,
        (StatusCode::OK, ack(3, 0))
    );
    // The same batch again, e.g. after a lost answer: nothing new.
    assert_eq!(
        send(&agg, &cert, epoch, &batch, None).await,
        (StatusCode::OK, ack(0, 3))
    );
    assert_eq!(db.count("records").await, 3);

    let stored = partitions(&db).await;
    assert_eq!(stored[0], (1, day_name(now)));
    // Without `received`, the record's own ts stands in (2023-11-14 has no
    // partition: the default one).
    assert_eq!(stored[1], (2, "records_default".to_owned()));
    assert_eq!(stored[2], (3, "records_default".to_owned()));
    let received: i64 = sqlx::query_scalar(
        "SELECT (extract(epoch FROM received_at) * 1000000)::int8 FROM records WHERE seq = 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        received, now,
        "received_at is the agent's, to the microsecond"
    );

    // The content check still holds on the partitioned table.
    let (status, _) = send(&agg, &cert, epoch, &batch[..1], Some(r#"{"other":1}"#)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    agg.stop().await;
}

#[tokio::test]
async fn retention_drops_exactly_the_partitions_older_than_the_retention() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let agg = start_aggregator(&pki, &db.url).await;
    let cert = pki.agent("acme", "edge-1");
    let now = now_us();
    sqlx::query(
        "SELECT dcs_ensure_record_partitions((now() AT TIME ZONE 'UTC')::date - 12, \
                                             (now() AT TIME ZONE 'UTC')::date)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // One record received 10, 5, 3, 2 and 0 days ago (midday, so no record
    // sits on a day boundary).
    let midday = now.div_euclid(DAY_US) * DAY_US + DAY_US / 2;
    let ages = [10, 5, 3, 2, 0];
    let batch: Vec<(i64, Option<i64>)> = ages
        .iter()
        .enumerate()
        .map(|(i, days)| (i as i64 + 1, Some(midday - days * DAY_US)))
        .collect();
    assert_eq!(
        send(&agg, &cert, Uuid::new_v4(), &batch, None).await.0,
        StatusCode::OK
    );

    // Keep 3 days: the partitions of 4 or more days ago go.
    let expected: Vec<String> = (4..=12).rev().map(|d| day_name(now - d * DAY_US)).collect();
    let dry = dcs_aggregator::retention::run(&db.pool, 3, 2, true, "test")
        .await
        .unwrap();
    assert_eq!(dry.dropped, expected);
    assert_eq!(db.count("records").await, 5, "a dry run drops nothing");

    let report = dcs_aggregator::retention::run(&db.pool, 3, 2, false, "test")
        .await
        .unwrap();
    assert_eq!(report.dropped, expected);
    let left: Vec<i64> = sqlx::query_scalar("SELECT seq FROM records ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, [3, 4, 5], "3, 2 and 0 days old are kept");
    // Partitions ahead exist, the default partition stays.
    for name in [day_name(now + 2 * DAY_US), "records_default".to_owned()] {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&name)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(exists, "{name}");
    }
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit WHERE action = 'retention.drop'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(audited, 1);
    let again = dcs_aggregator::retention::run(&db.pool, 3, 2, false, "test")
        .await
        .unwrap();
    assert!(again.dropped.is_empty() && again.created.is_empty());
    agg.stop().await;
}
