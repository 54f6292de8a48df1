//! Revoking agents and certificates: a revoked agent's batches are refused
//! with 403, counted, and write nothing; unrevoking lets it deliver again.

use std::time::{Duration, Instant};

use dcs_aggregator::platform::agents::set_agent_revoked;
use dcs_aggregator::platform::tokens::{NewToken, create_token};
use dcs_shared::wire::{self, ErrorBody, OutRecord};
use dcs_tests::aggregator::{RunningPlatform, agent_client, post_batch, start_platform_with};
use dcs_tests::pg::TestDb;
use dcs_tests::pki::{AgentCert, Pki};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

async fn admin_token(db: &TestDb) -> String {
    let new = NewToken {
        name: "ops".into(),
        role: "admin".into(),
        tenant: None,
        expires_in: None,
    };
    create_token(&db.pool, &new, "test".into(), None)
        .await
        .expect("create token")
        .token
}

/// Posts records `first..first+count` as `cert`; returns the status and body.
async fn send(
    p: &RunningPlatform,
    cert: &AgentCert,
    epoch: Uuid,
    first: i64,
    count: i64,
) -> (StatusCode, Value) {
    let records: Vec<(i64, String)> = (first..first + count)
        .map(|s| (s, format!(r#"{{"n":{s}}}"#)))
        .collect();
    let body = wire::encode_batch(
        epoch,
        None,
        records.iter().map(|(seq, payload)| OutRecord {
            seq: *seq,
            id: "id",
            stream: "s",
            ts_us: 1_700_000_000_000_000 + seq,
            payload,
            received: None,
        }),
        1,
    );
    let response = post_batch(
        &agent_client(cert),
        &p.aggregator.endpoint(wire::BATCHES_PATH),
        body,
    )
    .await;
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn assert_revoked(status: StatusCode, body: &Value) {
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let error: ErrorBody = serde_json::from_value(body.clone()).expect("ErrorBody");
    assert_eq!(error.error, "revoked");
}

async fn call(
    p: &RunningPlatform,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = p
        .client
        .request(method, p.endpoint(path))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("platform API answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn agent_view(p: &RunningPlatform, token: &str) -> Value {
    let (status, agents) = call(p, token, reqwest::Method::GET, "/api/v1/agents", None).await;
    assert_eq!(status, StatusCode::OK);
    agents[0].clone()
}

#[tokio::test]
async fn a_revoked_agent_is_refused_and_counted_writes_nothing_and_recovers_after_unrevoke() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start_platform_with(&pki, &db.url, |_| {}).await;
    let admin = admin_token(&db).await;
    let cert = pki.agent("acme", "edge-1");
    let epoch = Uuid::new_v4();

    assert_eq!(send(&p, &cert, epoch, 1, 5).await.0, StatusCode::OK);
    let agent = agent_view(&p, &admin).await;
    assert_eq!(agent["cert_fingerprint"].as_str().unwrap().len(), 64);
    assert!(agent["cert_serial"].is_string());
    assert!(agent["cert_not_after"].is_string());
    assert_eq!(agent["revoked"], false);
    let id = agent["id"].as_i64().unwrap();

    let (status, revoked) = call(
        &p,
        &admin,
        reqwest::Method::POST,
        &format!("/api/v1/agents/{id}/revoke"),
        None,
    )
    .await;
    assert_eq!(
        (status, &revoked["revoked"]),
        (StatusCode::OK, &json!(true))
    );

    // The very next batch is refused, and nothing of it is written.
    let (status, body) = send(&p, &cert, epoch, 6, 5).await;
    assert_revoked(status, &body);
    assert_eq!(db.count("records").await, 5);
    let metrics = reqwest::get(format!("{}/metrics", p.admin_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("dcs_aggregator_batches_refused_revoked_total{reason=\"agent revoked\"}")),
        "{metrics}"
    );

    let (status, _) = call(
        &p,
        &admin,
        reqwest::Method::POST,
        &format!("/api/v1/agents/{id}/unrevoke"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(send(&p, &cert, epoch, 6, 5).await.0, StatusCode::OK);
    assert_eq!(db.count("records").await, 10);

    let actions: Vec<String> =
        sqlx::query_scalar("SELECT action FROM audit WHERE action LIKE 'agent.%' ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(actions, ["agent.revoke", "agent.unrevoke"]);
    p.aggregator.stop().await;
}

#[tokio::test]
async fn a_reader_cannot_revoke() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start_platform_with(&pki, &db.url, |_| {}).await;
    let admin = admin_token(&db).await;
    let reader = create_token(
        &db.pool,
        &NewToken {
            name: "dash".into(),
            role: "reader".into(),
            tenant: None,
            expires_in: None,
        },
        "test".into(),
        None,
    )
    .await
    .unwrap()
    .token;
    let cert = pki.agent("acme", "edge-1");
    assert_eq!(
        send(&p, &cert, Uuid::new_v4(), 1, 1).await.0,
        StatusCode::OK
    );
    let id = agent_view(&p, &admin).await["id"].as_i64().unwrap();

    let (status, _) = call(
        &p,
        &reader,
        reqwest::Method::POST,
        &format!("/api/v1/agents/{id}/revoke"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(
        &p,
        &reader,
        reqwest::Method::POST,
        "/api/v1/revoked-serials",
        Some(json!({"serial": "01"})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(agent_view(&p, &admin).await["revoked"], false);
    assert_eq!(
        send(&p, &cert, Uuid::new_v4(), 1, 1).await.0,
        StatusCode::OK
    );
    p.aggregator.stop().await;
}

#[tokio::test]
async fn a_revoked_serial_refuses_that_certificate_and_not_the_agents_next_one() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start_platform_with(&pki, &db.url, |_| {}).await;
    let admin = admin_token(&db).await;
    let stolen = pki.agent("acme", "edge-1");
    let epoch = Uuid::new_v4();
    assert_eq!(send(&p, &stolen, epoch, 1, 1).await.0, StatusCode::OK);
    let serial = agent_view(&p, &admin).await["cert_serial"]
        .as_str()
        .unwrap()
        .to_owned();

    // Typed the way openssl prints it: upper case with colons.
    let typed = serial
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let (status, body) = call(
        &p,
        &admin,
        reqwest::Method::POST,
        "/api/v1/revoked-serials",
        Some(json!({"serial": typed, "reason": "laptop stolen"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = send(&p, &stolen, epoch, 2, 1).await;
    assert_revoked(status, &body);

    // The same agent with a fresh certificate delivers.
    let reissued = pki.agent("acme", "edge-1");
    assert_eq!(send(&p, &reissued, epoch, 2, 1).await.0, StatusCode::OK);
    assert_ne!(agent_view(&p, &admin).await["cert_serial"], json!(serial));

    let (status, _) = call(
        &p,
        &admin,
        reqwest::Method::DELETE,
        &format!("/api/v1/revoked-serials/{serial}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(send(&p, &stolen, epoch, 3, 1).await.0, StatusCode::OK);
    assert_eq!(db.count("records").await, 3);
    p.aggregator.stop().await;
}

#[tokio::test]
async fn a_revocation_made_elsewhere_takes_effect_within_the_refresh_interval() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start_platform_with(&pki, &db.url, |c| {
        c.revocation.refresh_interval = Duration::from_millis(300);
    })
    .await;
    let cert = pki.agent("acme", "edge-1");
    let epoch = Uuid::new_v4();
    assert_eq!(send(&p, &cert, epoch, 1, 1).await.0, StatusCode::OK);

    // As the CLI on another machine would: straight into the database.
    set_agent_revoked(&db.pool, "acme", "edge-1", true, "cli:ops".into(), None)
        .await
        .unwrap();
    let started = Instant::now();
    let mut seq = 2;
    loop {
        let (status, body) = send(&p, &cert, epoch, seq, 1).await;
        if status == StatusCode::FORBIDDEN {
            assert_revoked(status, &body);
            break;
        }
        assert_eq!(status, StatusCode::OK);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "still accepted after {:?}",
            started.elapsed()
        );
        seq += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A disabled tenant is refused the same way.
    set_agent_revoked(&db.pool, "acme", "edge-1", false, "cli:ops".into(), None)
        .await
        .unwrap();
    let other = pki.agent("globex", "edge-9");
    assert_eq!(send(&p, &other, epoch, 1, 1).await.0, StatusCode::OK);
    sqlx::query("UPDATE tenants SET disabled = true WHERE id = 'globex'")
        .execute(&db.pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (status, body) = send(&p, &other, epoch, 2, 1).await;
    assert_revoked(status, &body);
    assert_eq!(send(&p, &cert, epoch, 100, 1).await.0, StatusCode::OK);
    p.aggregator.stop().await;
}

#[tokio::test]
async fn a_tenant_disabled_through_the_api_is_refused_before_the_answer_here_and_within_the_refresh_interval_on_every_replica()
 {
    const REFRESH: Duration = Duration::from_millis(500);
    let pki = Pki::new();
    let db = TestDb::new().await;
    // Two replicas on one database; the background refresh is made long on
    // this one so that only "before the answer" can explain a refusal.
    let here = start_platform_with(&pki, &db.url, |c| {
        c.revocation.refresh_interval = Duration::from_secs(60);
    })
    .await;
    let there = start_platform_with(&pki, &db.url, |c| {
        c.revocation.refresh_interval = REFRESH;
    })
    .await;
    let token = admin_token(&db).await;
    let cert = pki.agent("globex", "edge-1");
    let epoch = Uuid::new_v4();
    assert_eq!(send(&here, &cert, epoch, 1, 1).await.0, StatusCode::OK);
    assert_eq!(send(&there, &cert, epoch, 2, 1).await.0, StatusCode::OK);

    let (status, body) = call(
        &here,
        &token,
        reqwest::Method::POST,
        "/api/v1/tenants/globex/disable",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answered = Instant::now();
    // This replica: the very next batch, with no wait.
    let (status, body) = send(&here, &cert, epoch, 3, 1).await;
    assert_revoked(status, &body);
    // The other replica: within its refresh interval.
    let mut seq = 4;
    loop {
        let (status, body) = send(&there, &cert, epoch, seq, 1).await;
        if status == StatusCode::FORBIDDEN {
            assert_revoked(status, &body);
            break;
        }
        assert!(
            answered.elapsed() < REFRESH + Duration::from_millis(1500),
            "the other replica still accepts after {:?}",
            answered.elapsed()
        );
        seq += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Enabling applies the same way, before the answer here.
    let (status, _) = call(
        &here,
        &token,
        reqwest::Method::POST,
        "/api/v1/tenants/globex/enable",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(send(&here, &cert, epoch, 100, 1).await.0, StatusCode::OK);
    here.aggregator.stop().await;
    there.aggregator.stop().await;
}
