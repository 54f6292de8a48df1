//! The aggregator's HTTP API against a real PostgreSQL database, over real
//! mutual TLS on 127.0.0.1.

use std::io::Write as _;

use dcs_shared::wire::{self, Backlog, BatchAck, ErrorBody, OutRecord};
use dcs_tests::aggregator::{
    RunningAggregator, agent_client, client_without_certificate, gzip_json, post_batch,
    start_aggregator, start_aggregator_with,
};
use dcs_tests::pg::TestDb;
use dcs_tests::pki::Pki;
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

/// A record the test owns, lent to the encoder as an [`OutRecord`].
#[derive(Debug, Clone)]
struct Rec {
    seq: i64,
    id: String,
    stream: String,
    ts_us: i64,
    payload: String,
    /// When the agent accepted it; the aggregator falls back to `ts_us`.
    received: Option<i64>,
}

impl Rec {
    fn new(seq: i64, payload: &str) -> Rec {
        Rec {
            seq,
            id: format!("id-{seq}"),
            stream: "plant.sensors".into(),
            ts_us: 1_700_000_000_000_000 + seq * 1_000_123,
            payload: payload.into(),
            received: None,
        }
    }

    fn out(&self) -> OutRecord<'_> {
        OutRecord {
            seq: self.seq,
            id: &self.id,
            stream: &self.stream,
            ts_us: self.ts_us,
            payload: &self.payload,
            received: self.received,
        }
    }
}

fn simple(seqs: impl IntoIterator<Item = i64>) -> Vec<Rec> {
    seqs.into_iter()
        .map(|seq| Rec::new(seq, &format!(r#"{{"n":{seq}}}"#)))
        .collect()
}

fn batch(epoch: Uuid, records: &[Rec]) -> Vec<u8> {
    wire::encode_batch(epoch, None, records.iter().map(Rec::out), 1)
}

async fn post(
    client: &reqwest::Client,
    agg: &RunningAggregator,
    body: Vec<u8>,
) -> reqwest::Response {
    post_batch(client, &agg.endpoint(wire::BATCHES_PATH), body).await
}

async fn expect_ack(response: reqwest::Response) -> BatchAck {
    let status = response.status();
    let body = response.bytes().await.expect("body");
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).expect("BatchAck JSON")
}

/// The counts of an answer; the high-water mark has tests of its own.
async fn expect_counts(response: reqwest::Response) -> BatchAck {
    let ack = expect_ack(response).await;
    BatchAck::new(ack.accepted, ack.duplicates)
}

async fn expect_error(response: reqwest::Response, status: StatusCode, code: &str) -> ErrorBody {
    let actual = response.status();
    let body = response.bytes().await.expect("body");
    assert_eq!(actual, status, "{}", String::from_utf8_lossy(&body));
    let error: ErrorBody = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("ErrorBody JSON ({e}): {}", String::from_utf8_lossy(&body)));
    assert_eq!(error.error, code, "{error:?}");
    error
}

fn ack(accepted: u64, duplicates: u64) -> BatchAck {
    BatchAck::new(accepted, duplicates)
}

/// (seq, record_id, stream, ts_us, payload) of every stored record of an agent.
async fn stored(db: &TestDb, tenant: &str, agent: &str) -> Vec<(i64, String, String, i64, Value)> {
    let rows: Vec<(i64, String, String, i64, String)> = sqlx::query_as(
        "SELECT r.seq, r.record_id, r.stream, \
                (extract(epoch FROM r.ts) * 1000000)::int8, r.payload::text \
         FROM records r JOIN agents a ON a.id = r.agent_id \
         WHERE a.tenant_id = $1 AND a.name = $2 AND r.tenant_id = $1 \
         ORDER BY r.epoch, r.seq",
    )
    .bind(tenant)
    .bind(agent)
    .fetch_all(&db.pool)
    .await
    .expect("query records");
    rows.into_iter()
        .map(|(seq, id, stream, ts, payload)| {
            (
                seq,
                id,
                stream,
                ts,
                serde_json::from_str(&payload).expect("jsonb is JSON"),
            )
        })
        .collect()
}

fn expected(records: &[Rec]) -> Vec<(i64, String, String, i64, Value)> {
    records
        .iter()
        .map(|r| {
            (
                r.seq,
                r.id.clone(),
                r.stream.clone(),
                r.ts_us,
                serde_json::from_str(&r.payload).expect("test payload is JSON"),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_batch_is_written_as_rows_equal_to_its_records_under_the_certificates_agent() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));

    // Payloads with everything the COPY text format must escape or keep.
    let records = vec![
        Rec::new(1, r#"{"temp":21.5,"unit":"C"}"#),
        Rec::new(
            2,
            r#"{"path":"C:\\data\\new","tab":"a\tb","nl":"x\ny","q":"\"quoted\""}"#,
        ),
        Rec::new(
            3,
            "{\n\t\"spaced\" : [1, 2500.25, -0.001, true, null],\r\n \"nested\": {\"ü\": \"日本\"}\n}",
        ),
        Rec {
            id: "producer\\id with spaces".into(),
            stream: "a-b_c.d".into(),
            ts_us: -1_234_567,
            ..Rec::new(4, r#"{"emoji":"\ud83d\ude00","big":12345678901234567890}"#)
        },
    ];
    let epoch = Uuid::now_v7();
    let backlog = Backlog {
        records: 10,
        bytes: 2048,
        oldest_age_secs: 7,
        dropped_total: 1,
    };
    let body = wire::encode_batch(epoch, Some(&backlog), records.iter().map(Rec::out), 6);

    let response = post(&client, &agg, body).await;
    assert_eq!(expect_counts(response).await, ack(4, 0));

    assert_eq!(stored(&db, "acme", "edge-01").await, expected(&records));
    let tenants: Vec<String> = sqlx::query_scalar("SELECT id FROM tenants")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(tenants, ["acme"]);
    let agent: (String, String, String, i64, i64, i64, i64, bool) = sqlx::query_as(
        "SELECT tenant_id, name, last_epoch::text, backlog_records, backlog_bytes, \
                backlog_oldest_age_secs, dropped_total, last_batch_at IS NOT NULL \
         FROM agents",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        agent,
        (
            "acme".into(),
            "edge-01".into(),
            epoch.to_string(),
            10,
            2048,
            7,
            1,
            true
        )
    );
    let epochs: Vec<(String, String)> =
        sqlx::query_as("SELECT DISTINCT epoch::text, tenant_id FROM records")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(epochs, [(epoch.to_string(), "acme".to_string())]);
    agg.stop().await;
}

#[tokio::test]
async fn a_known_agents_batch_never_waits_for_a_lock_on_its_agent_row() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));
    let epoch = Uuid::now_v7();
    let backlog = |records| Backlog {
        records,
        bytes: 100,
        oldest_age_secs: 1,
        dropped_total: 0,
    };
    let first = simple(1..=2);
    let body = wire::encode_batch(epoch, Some(&backlog(5)), first.iter().map(Rec::out), 1);
    assert_eq!(
        expect_counts(post(&client, &agg, body).await).await,
        ack(2, 0)
    );

    // Another transaction (a concurrent batch, or an operator) holds the row.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM agents WHERE name = 'edge-01' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let second = simple(3..=4);
    let body = wire::encode_batch(epoch, Some(&backlog(3)), second.iter().map(Rec::out), 1);
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        post(&client, &agg, body),
    )
    .await
    .expect("the batch is acknowledged while the agent's row is locked");
    assert_eq!(expect_counts(response).await, ack(2, 0));
    holder.rollback().await.unwrap();
    assert_eq!(stored(&db, "acme", "edge-01").await.len(), 4);

    // With the row free again, the next batch's presence figures land.
    let third = simple(5..=5);
    let body = wire::encode_batch(epoch, Some(&backlog(1)), third.iter().map(Rec::out), 1);
    assert_eq!(
        expect_counts(post(&client, &agg, body).await).await,
        ack(1, 0)
    );
    let backlog_records: i64 = sqlx::query_scalar("SELECT backlog_records FROM agents")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(backlog_records, 1);
    agg.stop().await;
}

#[tokio::test]
async fn the_same_batch_posted_twice_is_stored_once_and_reported_as_duplicates() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));
    let epoch = Uuid::now_v7();
    let records = simple(1..=5);

    assert_eq!(
        expect_counts(post(&client, &agg, batch(epoch, &records)).await).await,
        ack(5, 0)
    );
    assert_eq!(
        expect_counts(post(&client, &agg, batch(epoch, &records)).await).await,
        ack(0, 5)
    );
    assert_eq!(db.count("records").await, 5);

    // Records 4..=8 overlap 4 and 5 only.
    let overlapping = simple(4..=8);
    assert_eq!(
        expect_counts(post(&client, &agg, batch(epoch, &overlapping)).await).await,
        ack(3, 2)
    );
    assert_eq!(db.count("records").await, 8);
    let seqs: Vec<i64> = stored(&db, "acme", "edge-01")
        .await
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());

    // A new epoch (a new buffer file) starts its own sequence.
    assert_eq!(
        expect_counts(post(&client, &agg, batch(Uuid::now_v7(), &records)).await).await,
        ack(5, 0)
    );
    assert_eq!(db.count("records").await, 13);
    assert_eq!(db.count("agents").await, 1);
    agg.stop().await;
}

#[tokio::test]
async fn a_stored_key_redelivered_with_other_content_is_refused_with_409_and_nothing_is_written() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));
    let epoch = Uuid::now_v7();
    assert_eq!(
        expect_counts(post(&client, &agg, batch(epoch, &simple(1..=3))).await).await,
        ack(3, 0)
    );
    // Seq 2 comes back with another payload (a reused epoch, a redelivery
    // bug), alongside a new seq 4: the whole batch is refused.
    let mut altered = simple(2..=4);
    altered[0].payload = r#"{"n":"changed"}"#.into();
    let error = expect_error(
        post(&client, &agg, batch(epoch, &altered)).await,
        StatusCode::CONFLICT,
        "content_conflict",
    )
    .await;
    assert!(error.message.contains("1 records"), "{error:?}");
    assert_eq!(db.count("records").await, 3, "seq 4 was not written either");
    let stored_payload: String =
        sqlx::query_scalar("SELECT payload::text FROM records WHERE seq = 2")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored_payload, r#"{"n": 2}"#);
    // The 409 names each conflicting seq, so the agent can move exactly
    // those records to a new epoch.
    assert_eq!(
        error
            .details
            .iter()
            .map(|d| (d.index, d.field.as_str()))
            .collect::<Vec<_>>(),
        [(2, "seq")]
    );
    // One seq twice in a single batch is not a batch an agent sends.
    let mut twice = simple([10, 10]);
    twice[1].payload = r#"{"n":"other"}"#.into();
    let error = expect_error(
        post(&client, &agg, batch(epoch, &twice)).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_records",
    )
    .await;
    assert_eq!(error.details[0].field, "seq", "{error:?}");
    // An identical redelivery is still a plain duplicate.
    assert_eq!(
        expect_counts(post(&client, &agg, batch(epoch, &simple(1..=3))).await).await,
        ack(0, 3)
    );
    agg.stop().await;
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_in_the_handshake() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = client_without_certificate(&pki.ca);

    let result = client
        .post(agg.endpoint(wire::BATCHES_PATH))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(batch(Uuid::now_v7(), &simple(1..=1)))
        .send()
        .await;
    assert!(
        result.is_err(),
        "served without a client certificate: {result:?}"
    );
    let health = client.get(agg.endpoint("/health")).send().await;
    assert!(
        health.is_err(),
        "health served without a client certificate"
    );
    assert_eq!(db.count("records").await, 0);
    agg.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_in_the_handshake() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.other_ca_agent("acme", "edge-01"));

    let result = client
        .post(agg.endpoint(wire::BATCHES_PATH))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(batch(Uuid::now_v7(), &simple(1..=1)))
        .send()
        .await;
    assert!(
        result.is_err(),
        "served a certificate from another CA: {result:?}"
    );
    assert_eq!(db.count("records").await, 0);
    assert_eq!(db.count("agents").await, 0);
    agg.stop().await;
}

#[tokio::test]
async fn an_expired_certificate_is_refused_in_the_handshake() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.expired_agent("acme", "edge-01"));

    let result = client
        .post(agg.endpoint(wire::BATCHES_PATH))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(batch(Uuid::now_v7(), &simple(1..=1)))
        .send()
        .await;
    assert!(result.is_err(), "served an expired certificate: {result:?}");
    assert_eq!(db.count("records").await, 0);
    agg.stop().await;
}

#[tokio::test]
async fn two_agents_of_one_tenant_sending_the_same_epoch_and_seq_are_both_stored() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let first = agent_client(&pki.agent("acme", "edge-01"));
    let second = agent_client(&pki.agent("acme", "edge-02"));
    let epoch = Uuid::now_v7();
    let records = simple(1..=3);

    assert_eq!(
        expect_counts(post(&first, &agg, batch(epoch, &records)).await).await,
        ack(3, 0)
    );
    assert_eq!(
        expect_counts(post(&second, &agg, batch(epoch, &records)).await).await,
        ack(3, 0)
    );

    assert_eq!(stored(&db, "acme", "edge-01").await, expected(&records));
    assert_eq!(stored(&db, "acme", "edge-02").await, expected(&records));
    assert_eq!(db.count("records").await, 6);
    assert_eq!(db.count("agents").await, 2);
    assert_eq!(db.count("tenants").await, 1);
    agg.stop().await;
}

#[tokio::test]
async fn health_and_ready_answer_an_authenticated_agent() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));

    let health = client.get(agg.endpoint("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let body: Value = serde_json::from_slice(&health.bytes().await.unwrap()).unwrap();
    assert_eq!(body, serde_json::json!({"status": "ok"}));

    let ready = client.get(agg.endpoint("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    let missing = client.get(agg.endpoint("/nope")).send().await.unwrap();
    expect_error(missing, StatusCode::NOT_FOUND, "not_found").await;
    let wrong_method = client
        .get(agg.endpoint(wire::BATCHES_PATH))
        .send()
        .await
        .unwrap();
    expect_error(
        wrong_method,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    agg.stop().await;
}

#[tokio::test]
async fn a_gzip_bomb_is_refused_with_413_and_the_server_still_answers() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));

    // 200 MB of zeros: about 200 KB compressed, far past the 128 MiB cap.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..200 {
        gz.write_all(&zeros).unwrap();
    }
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 1 << 20, "bomb is {} bytes", bomb.len());

    let response = post(&client, &agg, bomb).await;
    expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large").await;

    let response = post(&client, &agg, batch(Uuid::now_v7(), &simple(1..=2))).await;
    assert_eq!(expect_counts(response).await, ack(2, 0));
    agg.stop().await;
}

#[tokio::test]
async fn a_compressed_body_over_the_limit_is_refused_with_413() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator_with(&pki, &db.url, |config| {
        config.limits.max_compressed_bytes = dcs_shared::config::ByteSize(64 << 10);
    })
    .await;
    let client = agent_client(&pki.agent("acme", "edge-01"));

    // Incompressible payloads, so the gzip body really exceeds 64 KiB.
    let records: Vec<Rec> = (1..=100)
        .map(|seq| {
            let noise: String = (0..1500).map(|_| fastrand::alphanumeric()).collect();
            Rec::new(seq, &format!(r#"{{"noise":"{noise}"}}"#))
        })
        .collect();
    let body = batch(Uuid::now_v7(), &records);
    assert!(body.len() > 64 << 10, "body is only {} bytes", body.len());

    let response = post(&client, &agg, body).await;
    expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large").await;
    assert_eq!(db.count("records").await, 0);

    let response = post(&client, &agg, batch(Uuid::now_v7(), &simple(1..=2))).await;
    assert_eq!(expect_counts(response).await, ack(2, 0));
    agg.stop().await;
}

#[tokio::test]
async fn more_records_than_the_batch_limit_is_refused_with_413() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator_with(&pki, &db.url, |config| {
        config.limits.max_records_per_batch = 10;
    })
    .await;
    let client = agent_client(&pki.agent("acme", "edge-01"));

    let response = post(&client, &agg, batch(Uuid::now_v7(), &simple(1..=11))).await;
    expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large").await;
    let response = post(&client, &agg, batch(Uuid::now_v7(), &simple(1..=10))).await;
    assert_eq!(expect_counts(response).await, ack(10, 0));
    agg.stop().await;
}

#[tokio::test]
async fn a_body_that_is_not_gzip_is_refused_with_400() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));

    let response = post(&client, &agg, br#"{"v":1,"records":[]}"#.to_vec()).await;
    expect_error(response, StatusCode::BAD_REQUEST, "malformed_batch").await;

    // Gzip, but not a batch.
    let response = post(&client, &agg, gzip_json(br#"{"v":1,"records":"#)).await;
    expect_error(response, StatusCode::BAD_REQUEST, "malformed_batch").await;
    agg.stop().await;
}

#[tokio::test]
async fn a_batch_without_content_encoding_gzip_is_refused_with_415() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));

    let response = client
        .post(agg.endpoint(wire::BATCHES_PATH))
        .header("content-type", "application/json")
        .body(batch(Uuid::now_v7(), &simple(1..=1)))
        .send()
        .await
        .unwrap();
    expect_error(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_encoding",
    )
    .await;

    let response = client
        .post(agg.endpoint(wire::BATCHES_PATH))
        .header("content-type", "text/plain")
        .header("content-encoding", "gzip")
        .body(batch(Uuid::now_v7(), &simple(1..=1)))
        .send()
        .await
        .unwrap();
    expect_error(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    assert_eq!(db.count("records").await, 0);
    agg.stop().await;
}

#[tokio::test]
async fn an_invalid_record_is_refused_with_422_naming_its_seq_and_field_and_nothing_is_written() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));

    let mut records = simple(1..=3);
    records[1].stream = "Bad Stream".into();
    let response = post(&client, &agg, batch(Uuid::now_v7(), &records)).await;
    let error = expect_error(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_records",
    )
    .await;
    assert_eq!(error.details.len(), 1, "{error:?}");
    assert_eq!(error.details[0].index, 2);
    assert_eq!(error.details[0].field, "stream");

    assert_eq!(db.count("records").await, 0);
    assert_eq!(db.count("agents").await, 0);
    assert_eq!(db.count("tenants").await, 0);
    agg.stop().await;
}

#[tokio::test]
async fn a_seq_below_one_and_a_non_object_payload_are_named() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));

    let records = vec![Rec::new(0, "{}"), Rec::new(5, "[1,2]")];
    let response = post(&client, &agg, batch(Uuid::now_v7(), &records)).await;
    let error = expect_error(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_records",
    )
    .await;
    let named: Vec<(i64, &str)> = error
        .details
        .iter()
        .map(|d| (d.index, d.field.as_str()))
        .collect();
    assert_eq!(named, [(0, "seq"), (5, "payload")]);
    assert_eq!(db.count("records").await, 0);
    agg.stop().await;
}

#[tokio::test]
async fn an_unknown_format_version_is_refused_with_400() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));

    let body = gzip_json(
        br#"{"v":2,"epoch":"018f0000-0000-7000-8000-000000000000","records":[],"future":true}"#,
    );
    let response = post(&client, &agg, body).await;
    let error = expect_error(response, StatusCode::BAD_REQUEST, "unsupported_version").await;
    assert!(error.message.contains('2'), "{error:?}");
    agg.stop().await;
}

#[tokio::test]
async fn an_empty_batch_is_acknowledged_without_writing() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));

    let response = post(&client, &agg, batch(Uuid::now_v7(), &[])).await;
    assert_eq!(expect_counts(response).await, ack(0, 0));
    assert_eq!(db.count("records").await, 0);
    agg.stop().await;
}

#[tokio::test]
async fn data_postgres_refuses_is_a_permanent_422_and_nothing_is_written() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));

    // Valid for the validator, but about 146 000 years before the Unix epoch
    // is outside timestamptz's range (4713 BC onwards).
    let mut records = simple(1..=3);
    records[2].ts_us = i64::MIN / 2;
    let response = post(&client, &agg, batch(Uuid::now_v7(), &records)).await;
    let error = expect_error(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "rejected_by_database",
    )
    .await;
    assert!(error.message.contains("out of range"), "{error:?}");
    assert_eq!(db.count("records").await, 0);
    assert_eq!(db.count("agents").await, 0);

    // The connection that saw the error is fine for the next batch.
    for _ in 0..5 {
        let response = post(&client, &agg, batch(Uuid::now_v7(), &simple(1..=2))).await;
        assert_eq!(expect_counts(response).await, ack(2, 0));
    }
    agg.stop().await;
}

#[tokio::test]
async fn an_unreachable_database_answers_503_with_retry_after_never_2xx() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    // Port 1 on loopback: connection refused, like a PostgreSQL that is down.
    let agg = start_aggregator_with(&pki, "postgres://postgres@127.0.0.1:1/none", |config| {
        config.database.acquire_timeout = std::time::Duration::from_millis(500);
        config.limits.retry_after = std::time::Duration::from_secs(7);
    })
    .await;
    let client = agent_client(&pki.agent("acme", "edge-01"));

    let response = post(&client, &agg, batch(Uuid::now_v7(), &simple(1..=2))).await;
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("7")
    );
    expect_error(
        response,
        StatusCode::SERVICE_UNAVAILABLE,
        "database_unavailable",
    )
    .await;

    let ready = client.get(agg.endpoint("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.headers().contains_key("retry-after"));
    assert_eq!(db.count("records").await, 0);
    agg.stop().await;
}

#[tokio::test]
async fn concurrent_batches_from_many_agents_are_all_stored() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let mut tasks = Vec::new();
    for a in 0..6 {
        let client = agent_client(&pki.agent("acme", &format!("edge-{a}")));
        let url = agg.endpoint(wire::BATCHES_PATH);
        tasks.push(tokio::spawn(async move {
            let epoch = Uuid::now_v7();
            let mut accepted = 0;
            for chunk in 0..5 {
                let records = simple(chunk * 200 + 1..=chunk * 200 + 200);
                // Every batch twice: the second send must be all duplicates.
                for _ in 0..2 {
                    let response = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("content-encoding", "gzip")
                        .body(batch(epoch, &records))
                        .send()
                        .await
                        .unwrap();
                    accepted += expect_ack(response).await.accepted;
                }
            }
            accepted
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 1000);
    }
    assert_eq!(db.count("records").await, 6000);
    agg.stop().await;
}

#[tokio::test]
async fn after_shutdown_the_aggregator_accepts_no_connections() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));
    let response = post(&client, &agg, batch(Uuid::now_v7(), &simple(1..=1))).await;
    assert_eq!(expect_counts(response).await, ack(1, 0));

    let url = agg.endpoint("/health");
    // Returns only once serve() has returned: the open HTTP/2 connection above
    // was closed gracefully, not left to the grace period.
    tokio::time::timeout(std::time::Duration::from_secs(10), agg.stop())
        .await
        .expect("shutdown within 10 s");
    let fresh = agent_client(&pki.agent("acme", "edge-01"));
    assert!(
        fresh.get(&url).send().await.is_err(),
        "served after shutdown"
    );
}

/// (partition, received_at in µs) of every stored record with this seq.
async fn copies_of(db: &TestDb, seq: i64) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT tableoid::regclass::text, (extract(epoch FROM received_at) * 1000000)::int8 \
         FROM records WHERE seq = $1 ORDER BY received_at",
    )
    .bind(seq)
    .fetch_all(&db.pool)
    .await
    .expect("query copies")
}

#[tokio::test]
async fn a_reused_key_with_another_received_time_is_a_409_not_a_second_row_in_another_partition() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));
    let epoch = Uuid::now_v7();
    const DAY_US: i64 = 86_400_000_000;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let mut first = simple(1..=3);
    for r in &mut first {
        r.received = Some(now_us - DAY_US);
    }
    assert_eq!(
        expect_counts(post(&client, &agg, batch(epoch, &first)).await).await,
        ack(3, 0)
    );
    // The same seqs again, same content, accepted a day later: a reverted
    // buffer re-using its keys. The partition key differs, so only the
    // key guard can see it.
    let mut reused = simple(2..=4);
    for r in &mut reused {
        r.received = Some(now_us);
    }
    let error = expect_error(
        post(&client, &agg, batch(epoch, &reused)).await,
        StatusCode::CONFLICT,
        "content_conflict",
    )
    .await;
    assert_eq!(
        error.details.iter().map(|d| d.index).collect::<Vec<_>>(),
        [2, 3]
    );
    assert_eq!(
        db.count("records").await,
        3,
        "nothing of the batch was written"
    );
    assert_eq!(copies_of(&db, 2).await.len(), 1);
    // A redelivery as it was first sent is still a plain duplicate.
    assert_eq!(
        expect_counts(post(&client, &agg, batch(epoch, &first)).await).await,
        ack(0, 3)
    );
    agg.stop().await;
}

#[tokio::test]
async fn every_answer_carries_the_epochs_high_water_mark_and_an_empty_batch_asks_for_it() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));
    let epoch = Uuid::now_v7();

    let empty = expect_ack(post(&client, &agg, batch(epoch, &[])).await).await;
    assert_eq!(empty.high_seq, None, "nothing stored yet");
    let ack = expect_ack(post(&client, &agg, batch(epoch, &simple(1..=5))).await).await;
    assert_eq!(ack.high_seq, Some(5));
    // A redelivery of an older batch still reports the highest seq stored.
    let ack = expect_ack(post(&client, &agg, batch(epoch, &simple(1..=2))).await).await;
    assert_eq!((ack.duplicates, ack.high_seq), (2, Some(5)));
    let empty = expect_ack(post(&client, &agg, batch(epoch, &[])).await).await;
    assert_eq!(empty.high_seq, Some(5));
    // Other epochs and other agents have marks of their own.
    let other = expect_ack(post(&client, &agg, batch(Uuid::now_v7(), &[])).await).await;
    assert_eq!(other.high_seq, None);
    let stranger = agent_client(&pki.agent("acme", "edge-02"));
    let empty = expect_ack(post(&stranger, &agg, batch(epoch, &[])).await).await;
    assert_eq!(empty.high_seq, None);
    agg.stop().await;
}

#[tokio::test]
async fn concurrent_batches_that_reuse_keys_store_each_key_once() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));
    let epoch = Uuid::now_v7();
    // Eight versions of seqs 1..=50, each with its own content and received
    // time, race each other; exactly one version of each key may win.
    let versions: Vec<Vec<u8>> = (0..8)
        .map(|v| {
            let records: Vec<Rec> = (1..=50)
                .map(|seq| Rec {
                    received: Some(1_700_000_000_000_000 + v * 1_000_000),
                    ..Rec::new(seq, &format!(r#"{{"version":{v}}}"#))
                })
                .collect();
            batch(epoch, &records)
        })
        .collect();
    let url = agg.endpoint(wire::BATCHES_PATH);
    let tasks: Vec<_> = versions
        .into_iter()
        .map(|body| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { post_batch(&client, &url, body).await.status() })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("request task"));
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        1,
        "{statuses:?}"
    );
    // Past the per-agent in-flight limit, admission answers 429 first.
    assert!(statuses.iter().all(|s| matches!(
        *s,
        StatusCode::OK | StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS
    )));
    assert_eq!(db.count("records").await, 50);
    let versions: i64 = sqlx::query_scalar("SELECT count(DISTINCT payload) FROM records")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(versions, 1, "all 50 keys hold the winner's records");
    agg.stop().await;
}

#[tokio::test]
async fn compacted_claims_still_guard_every_key_and_gaps_stay_open() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator(&pki, &db.url).await;
    let client = agent_client(&pki.agent("acme", "edge-01"));
    let epoch = Uuid::now_v7();
    for range in [1..=10, 11..=20, 21..=30, 41..=50] {
        expect_ack(post(&client, &agg, batch(epoch, &simple(range))).await).await;
    }
    let claims = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT first_seq, last_seq FROM record_ranges ORDER BY first_seq",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    assert_eq!(claims().await.len(), 4);
    let removed: i64 = sqlx::query_scalar("SELECT dcs_compact_record_ranges('0 seconds')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(removed, 2);
    assert_eq!(claims().await, [(1, 30), (41, 50)]);
    // A reused key inside a merged claim is still a conflict...
    let mut altered = simple(15..=15);
    altered[0].payload = r#"{"n":"changed"}"#.into();
    expect_error(
        post(&client, &agg, batch(epoch, &altered)).await,
        StatusCode::CONFLICT,
        "content_conflict",
    )
    .await;
    // ...and the gap between claims takes records that were never stored.
    assert_eq!(
        expect_counts(post(&client, &agg, batch(epoch, &simple(31..=40))).await).await,
        ack(10, 0)
    );
    assert_eq!(db.count("records").await, 50);
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_waits_past_the_request_timeout_for_a_database_slot_is_503_overloaded_and_writes_nothing()
 {
    use sqlx::Connection as _;
    let db = TestDb::new().await;
    let pki = Pki::new();
    let agg = start_aggregator_with(&pki, &db.url, |config| {
        // One database slot, and a second to wait for it before refusing.
        config.database.max_connections = 1;
        config.limits.request_timeout = std::time::Duration::from_secs(1);
        config.limits.retry_after = std::time::Duration::from_secs(2);
    })
    .await;
    // Its start-up partition run also needs the slot and `records`' lock.
    db.until_startup_partitions(dcs_aggregator::config::DEFAULT_PARTITIONS_AHEAD)
        .await;
    let url = agg.endpoint(wire::BATCHES_PATH);

    // The first batch takes the only slot and waits on a lock it cannot get.
    let mut admin = sqlx::PgConnection::connect(&db.url).await.expect("admin");
    sqlx::query("BEGIN")
        .execute(&mut admin)
        .await
        .expect("begin");
    sqlx::query("LOCK TABLE records IN ACCESS EXCLUSIVE MODE")
        .execute(&mut admin)
        .await
        .expect("lock records");
    let holder = {
        let client = agent_client(&pki.agent("acme", "edge-01"));
        let (url, body) = (url.clone(), batch(Uuid::now_v7(), &simple(1..=3)));
        tokio::spawn(async move { post_batch(&client, &url, body).await.status() })
    };
    // Until its backend waits on the lock, the slot may still be free: on a
    // loaded machine a fixed pause let the second batch take it first.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let blocked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
               AND application_name = 'dcs-aggregator'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("pg_stat_activity");
        if blocked > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first batch never waited on the lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let waiting = agent_client(&pki.agent("globex", "edge-02"));
    let refused = post_batch(&waiting, &url, batch(Uuid::now_v7(), &simple(1..=3))).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some("2".to_owned())
    );
    let error: ErrorBody = refused.json().await.expect("error body");
    assert_eq!(error.error, "overloaded", "{error:?}");

    sqlx::query("ROLLBACK")
        .execute(&mut admin)
        .await
        .expect("unlock");
    assert_eq!(holder.await.expect("holder"), StatusCode::OK);
    let stored: Vec<(String,)> = sqlx::query_as("SELECT DISTINCT tenant_id FROM records")
        .fetch_all(&db.pool)
        .await
        .expect("tenants");
    assert_eq!(
        stored,
        vec![("acme".to_owned(),)],
        "the refused batch wrote nothing"
    );
    agg.stop().await;
}
