//! What the agent's forwarder does with each kind of refusal, driven by a
//! gate in front of a real aggregator: permanent refusals go to dead letters
//! with the reason, 413 splits the batch, 401/403 keep the data and retry.

use std::time::Duration;

use dcs_tests::agent::{self, RunningAgent, push, start_agent, wait_until};
use dcs_tests::aggregator::{RunningAggregator, start_aggregator};
use dcs_tests::gate::{Gate, Overload};
use dcs_tests::http::Fetch as _;
use dcs_tests::pg::TestDb;
use dcs_tests::pki::Pki;
use serde_json::Value;

struct Rig {
    // Holds the certificate files the agent loads at start.
    _pki: Pki,
    db: TestDb,
    _aggregator: RunningAggregator,
    gate: Gate,
    agent: RunningAgent,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

async fn rig(adjust: impl FnOnce(&mut dcs_edge::Config)) -> Rig {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let aggregator = start_aggregator(&pki, &db.url).await;
    let cert = pki.agent("acme", "fwd-1");
    let gate = Gate::start(&pki, &cert, &aggregator.url).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = agent::test_config(&cert, &gate.url(), &dir.path().join("b.db"));
    adjust(&mut config);
    let agent = start_agent(config).await;
    Rig {
        _pki: pki,
        db,
        _aggregator: aggregator,
        gate,
        agent,
        http: reqwest::Client::new(),
        dir,
    }
}

impl Rig {
    async fn status(&self) -> Value {
        self.agent.status().await
    }

    /// Pushes NDJSON to the agent; the agent must take it (200).
    async fn push_ndjson(&self, body: String) {
        let pushed = push(&self.http, &self.agent.url, "application/x-ndjson", body).await;
        assert_eq!(pushed.status(), 200);
    }

    async fn rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM records")
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_refusal_moves_the_batch_to_dead_letters_with_the_reason() {
    let r = rig(|_| {}).await;
    r.gate.overload(Some(Overload {
        status: 422,
        retry_after_secs: 0,
        pass_every: 0,
    }));
    r.push_ndjson(agent::ndjson("s", "d", 0..20)).await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            r.status().await["dead_letters"]["records"] == 20
        })
        .await,
        "{}",
        r.status().await
    );
    let st = r.status().await;
    assert_eq!(st["buffer"]["records"], 0, "dead letters leave the buffer");
    let reason = st["dead_letters"]["last_reason"].as_str().unwrap();
    assert!(reason.contains("422"), "{reason}");
    let got: Value = r
        .http
        .get(r.agent.endpoint("/v1/records/d-3"))
        .fetch_json()
        .await;
    assert_eq!(got["state"], "dead_letter");
    // Later records are not held up by the dead batch.
    r.gate.overload(None);
    r.push_ndjson(agent::ndjson("s", "ok", 0..10)).await;
    assert!(wait_until(Duration::from_secs(20), || async { r.rows().await == 10 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_413_splits_the_batch_until_it_fits_and_everything_arrives() {
    let r = rig(|c| c.batch.linger = Duration::from_millis(300)).await;
    // About 40 records fit under the gate's limit; the agent batches 1000.
    r.gate.max_body(Some(2_000));
    r.push_ndjson(agent::ndjson("s", "big", 0..1000)).await;
    assert!(
        wait_until(Duration::from_secs(60), || async { r.rows().await == 1000 }).await,
        "rows: {} status: {}",
        r.rows().await,
        r.status().await
    );
    let st = r.status().await;
    assert_eq!(st["dead_letters"]["records"], 0);
    let refused = r.gate.seen().iter().filter(|s| s.status == 413).count();
    assert!(refused > 0, "the gate never refused a batch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_keeps_the_data_and_delivery_resumes_when_the_agent_is_let_back_in() {
    let r = rig(|c| c.retry.max = Duration::from_millis(300)).await;
    r.gate.overload(Some(Overload {
        status: 403,
        retry_after_secs: 0,
        pass_every: 0,
    }));
    r.push_ndjson(agent::ndjson("s", "k", 0..50)).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            r.gate.seen().iter().filter(|s| s.status == 403).count() >= 3
        })
        .await
    );
    let st = r.status().await;
    assert_eq!(st["buffer"]["records"], 50, "refused batches stay buffered");
    assert_eq!(st["dead_letters"]["records"], 0, "a 403 is not permanent");
    assert_eq!(st["delivery"]["link"], "down");
    r.gate.overload(None);
    assert!(wait_until(Duration::from_secs(20), || async { r.rows().await == 50 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_taken_at_the_aggregator_re_keys_only_that_record_and_nothing_becomes_a_dead_letter()
{
    let r = rig(|c| c.batch.linger = Duration::from_millis(200)).await;
    r.push_ndjson(agent::ndjson("s", "a", 0..1)).await;
    assert!(wait_until(Duration::from_secs(20), || async { r.rows().await == 1 }).await);
    // Hold the next records in the buffer while the aggregator is "busy".
    r.gate.overload(Some(Overload {
        status: 503,
        retry_after_secs: 0,
        pass_every: 0,
    }));
    r.push_ndjson(agent::ndjson("s", "b", 0..20)).await;
    // Another version of seq 6 (the fifth record, b-4) is already stored under
    // its full key, receive time included: any batch holding it gets a 409.
    let mut export = Vec::new();
    dcs_edge::fsck::export(
        &r.dir.path().join("b.db"),
        &dcs_edge::seal::Keyring::disabled(),
        &mut export,
        &mut Vec::new(),
    )
    .unwrap();
    let received = String::from_utf8(export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["seq"] == 6)
        .expect("seq 6 is buffered")["received"]
        .as_str()
        .unwrap()
        .to_owned();
    sqlx::query(
        "INSERT INTO records (agent_id, epoch, seq, tenant_id, record_id, stream, ts, received_at, payload, content_hash)
         SELECT agent_id, epoch, 6, tenant_id, 'other', 's', now(), $1::timestamptz, '{}', 42 FROM records LIMIT 1",
    )
    .bind(&received)
    .execute(&r.db.pool)
    .await
    .unwrap();
    r.gate.overload(None);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            r.status().await["buffer"]["records"] == 0
        })
        .await,
        "{}",
        r.status().await
    );
    let st = r.status().await;
    assert_eq!(st["dead_letters"]["records"], 0, "{st}");
    assert_eq!(st["buffer"]["rekeyed_total"], 1, "{st}");
    // seq 6 is the fifth record of the second push (seq 2 is b-0).
    let got: Value = r
        .http
        .get(r.agent.endpoint("/v1/records/b-4"))
        .fetch_json()
        .await;
    assert_eq!(got["state"], "delivered");
    assert_eq!(
        r.rows().await,
        1 + 1 + 20,
        "all 20 arrived beside the other record"
    );
    // b-4 travelled under a new epoch, with its content unchanged.
    let (moved, epochs): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE record_id = 'b-4' AND payload->>'i' = '4'), \
                count(DISTINCT epoch) FROM records",
    )
    .fetch_one(&r.db.pool)
    .await
    .unwrap();
    assert_eq!((moved, epochs), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_that_blames_one_record_dead_letters_only_that_record() {
    let r = rig(|c| c.batch.linger = Duration::from_millis(200)).await;
    r.gate.blame(Some("b-4"));
    r.push_ndjson(agent::ndjson("b", "b", 0..20)).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            r.status().await["buffer"]["records"] == 0
        })
        .await,
        "{}",
        r.status().await
    );
    let st = r.status().await;
    assert_eq!(st["dead_letters"]["records"], 1, "{st}");
    assert!(
        st["dead_letters"]["last_reason"]
            .as_str()
            .unwrap()
            .contains("invalid_records"),
        "{st}"
    );
    let got: Value = r
        .http
        .get(r.agent.endpoint("/v1/records/b-4"))
        .fetch_json()
        .await;
    assert_eq!(got["state"], "dead_letter");
    assert_eq!(r.rows().await, 19, "the 19 others arrived");
}
