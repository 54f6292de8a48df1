//! The platform API (`/api/v1`) against a real PostgreSQL database, over real
//! TLS on 127.0.0.1: tokens, roles, tenant isolation, pagination, the audit
//! trail, and the database role the aggregator runs as.

use std::collections::HashSet;

use dcs_aggregator::platform::tokens::{NewToken, create_token};
use dcs_shared::wire::{self, ErrorBody, OutRecord};
use dcs_tests::aggregator::{
    RunningAggregator, RunningPlatform, agent_client, post_batch, start_platform_with, with_user,
};
use dcs_tests::pg::TestDb;
use dcs_tests::pki::Pki;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

/// The role the migrations create for the aggregator.
const APP_ROLE: &str = "dcs_app";

async fn start(pki: &Pki, db: &TestDb) -> RunningPlatform {
    start_platform_with(pki, &db.url, |_| {}).await
}

/// A token made directly in the database, as `dcs-aggregator token create`
/// does for the first admin.
async fn token(db: &TestDb, role: &str, tenant: Option<&str>) -> String {
    token_expiring(db, role, tenant, None).await
}

async fn token_expiring(
    db: &TestDb,
    role: &str,
    tenant: Option<&str>,
    expires_in: Option<&str>,
) -> String {
    if let Some(tenant) = tenant {
        sqlx::query("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(tenant)
            .execute(&db.pool)
            .await
            .expect("tenant");
    }
    let new = NewToken {
        name: format!("{role}-{}", tenant.unwrap_or("all")),
        role: role.into(),
        tenant: tenant.map(str::to_owned),
        expires_in: expires_in.map(str::to_owned),
    };
    create_token(&db.pool, &new, "test".into(), None)
        .await
        .expect("create token")
        .token
}

/// Sends `count` records from `tenant/agent` through the agents' listener,
/// seq `first..first+count`, one batch.
async fn send(
    pki: &Pki,
    agg: &RunningAggregator,
    tenant: &str,
    agent: &str,
    epoch: Uuid,
    first: i64,
    count: i64,
) {
    let ids: Vec<String> = (first..first + count).map(|s| format!("id-{s}")).collect();
    let payloads: Vec<String> = (first..first + count)
        .map(|s| format!(r#"{{"n":{s}}}"#))
        .collect();
    let records = (0..count as usize).map(|i| OutRecord {
        seq: first + i as i64,
        id: &ids[i],
        stream: "plant.sensors",
        // Every tenth record shares a timestamp with its neighbour, so the
        // order must fall back on (agent, epoch, seq).
        ts_us: 1_700_000_000_000_000 + (first + i as i64) / 2 * 1000,
        payload: &payloads[i],
        received: None,
    });
    let body = wire::encode_batch(epoch, None, records, 1);
    let response = post_batch(
        &agent_client(&pki.agent(tenant, agent)),
        &agg.endpoint(wire::BATCHES_PATH),
        body,
    )
    .await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "batch from {tenant}/{agent}"
    );
}

async fn get(p: &RunningPlatform, token: &str, path: &str) -> (StatusCode, Value) {
    let response = p
        .client
        .get(p.endpoint(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("request reaches the platform API");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post(p: &RunningPlatform, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let response = p
        .client
        .post(p.endpoint(path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("request reaches the platform API");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn error_code(body: &Value) -> String {
    serde_json::from_value::<ErrorBody>(body.clone())
        .unwrap_or_else(|e| panic!("ErrorBody ({e}): {body}"))
        .error
}

async fn audit_actions(db: &TestDb) -> Vec<(String, String)> {
    sqlx::query_as("SELECT action, outcome FROM audit ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .expect("read audit")
}

#[tokio::test]
async fn the_aggregator_serves_agents_and_the_platform_as_the_application_role() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    // What a DBA does once per cluster (see the migration): the role logs in.
    sqlx::query(sqlx::AssertSqlSafe(format!("ALTER ROLE {APP_ROLE} LOGIN")))
        .execute(&db.pool)
        .await
        .expect("let the application role log in");
    let app_url = with_user(&db.url, APP_ROLE);
    let p = start_platform_with(&pki, &app_url, |_| {}).await;
    let admin = token(&db, "admin", None).await;

    // Everything the aggregator does works with the application's grants.
    send(&pki, &p.aggregator, "acme", "edge-1", Uuid::new_v4(), 1, 10).await;
    let (status, body) = post(&p, &admin, "/api/v1/tenants", json!({"id": "globex"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = get(&p, &admin, "/api/v1/records?tenant=acme").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["records"].as_array().unwrap().len(), 10);

    p.aggregator.stop().await;
}

#[tokio::test]
async fn missing_unknown_expired_and_revoked_tokens_are_refused_and_audited() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db).await;
    let admin = token(&db, "admin", None).await;
    let expired = token_expiring(&db, "reader", None, Some("1s")).await;

    let anonymous = p
        .client
        .get(p.endpoint("/api/v1/agents"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    let (status, body) = get(&p, "dcs_not-a-real-token", "/api/v1/agents").await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (status, _) = get(&p, &expired, "/api/v1/agents").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "an expired token");

    // Revoked through the API: the next call with it is refused.
    let (status, created) = post(
        &p,
        &admin,
        "/api/v1/tokens",
        json!({"name": "ci", "role": "reader"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let reader = created["token"].as_str().unwrap().to_owned();
    assert_eq!(get(&p, &reader, "/api/v1/agents").await.0, StatusCode::OK);
    let id = created["id"].as_i64().unwrap();
    let (status, revoked) = post(
        &p,
        &admin,
        &format!("/api/v1/tokens/{id}/revoke"),
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert!(revoked["revoked_at"].is_string());
    assert_eq!(
        get(&p, &reader, "/api/v1/agents").await.0,
        StatusCode::UNAUTHORIZED
    );

    // Only hashes are stored.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM api_tokens WHERE token_hash = $1")
        .bind(reader.as_bytes())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);

    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT details->>'reason' FROM audit WHERE action = 'auth.failed' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        reasons,
        [
            "no bearer token",
            "unknown token",
            "token expired",
            "token revoked"
        ]
    );
    let actions = audit_actions(&db).await;
    assert!(actions.contains(&("token.create".into(), "ok".into())));
    assert!(actions.contains(&("token.revoke".into(), "ok".into())));
    p.aggregator.stop().await;
}

#[tokio::test]
async fn a_reader_cannot_change_anything_and_the_refusal_is_audited() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db).await;
    let reader = token(&db, "reader", None).await;
    let scoped_admin = token(&db, "admin", Some("acme")).await;

    for (path, body) in [
        ("/api/v1/tenants", json!({"id": "x"})),
        ("/api/v1/tokens", json!({"name": "x", "role": "admin"})),
        ("/api/v1/tenants/acme/disable", json!({})),
    ] {
        let (status, body) = post(&p, &reader, path, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert_eq!(error_code(&body), "forbidden");
    }
    assert_eq!(
        get(&p, &reader, "/api/v1/audit").await.0,
        StatusCode::FORBIDDEN
    );
    // A tenant's admin manages its own tenant, not the platform, and cannot
    // mint a token wider than itself.
    let (status, _) = post(&p, &scoped_admin, "/api/v1/tenants", json!({"id": "y"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = post(
        &p,
        &scoped_admin,
        "/api/v1/tokens",
        json!({"name": "x", "role": "reader", "tenant": "globex"}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, created) = post(
        &p,
        &scoped_admin,
        "/api/v1/tokens",
        json!({"name": "dash", "role": "reader", "expires_in": "30d"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["tenant"], "acme", "the scope is inherited");
    assert!(created["expires_at"].is_string());

    assert_eq!(db.count("tenants WHERE id IN ('x', 'y')").await, 0);
    let denied: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit WHERE action = 'access.denied' AND outcome = 'denied'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(denied, 6);
    p.aggregator.stop().await;
}

#[tokio::test]
async fn cross_tenant_reads_are_refused_and_leak_neither_rows_nor_counts() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db).await;
    send(&pki, &p.aggregator, "acme", "edge-1", Uuid::new_v4(), 1, 5).await;
    send(
        &pki,
        &p.aggregator,
        "globex",
        "edge-1",
        Uuid::new_v4(),
        1,
        7,
    )
    .await;
    let acme = token(&db, "reader", Some("acme")).await;

    let (status, body) = get(&p, &acme, "/api/v1/records").await;
    assert_eq!(status, StatusCode::OK);
    let records = body["records"].as_array().unwrap();
    assert_eq!(records.len(), 5);
    assert!(records.iter().all(|r| r["tenant"] == "acme"));

    for path in [
        "/api/v1/records?tenant=globex",
        "/api/v1/agents?tenant=globex",
    ] {
        let (status, body) = get(&p, &acme, path).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        let text = body.to_string();
        assert!(
            !text.contains('7') && !text.contains("records\""),
            "{path}: {text}"
        );
    }
    let (_, agents) = get(&p, &acme, "/api/v1/agents").await;
    let agents = agents.as_array().unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["tenant"], "acme");
    assert_eq!(agents[0]["link"], "up");
    let globex_id: i64 = sqlx::query_scalar("SELECT id FROM agents WHERE tenant_id = 'globex'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // Another tenant's agent looks exactly like a missing one.
    let (status, _) = get(&p, &acme, &format!("/api/v1/agents/{globex_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = get(&p, &acme, "/api/v1/agents/999999").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let own = agents[0]["id"].as_i64().unwrap();
    let (status, one) = get(&p, &acme, &format!("/api/v1/agents/{own}")).await;
    assert_eq!(
        (status, one["agent"].as_str()),
        (StatusCode::OK, Some("edge-1"))
    );
    p.aggregator.stop().await;
}

#[tokio::test]
async fn pagination_returns_every_row_exactly_once_while_inserts_happen() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db).await;
    let epoch = Uuid::new_v4();
    send(&pki, &p.aggregator, "acme", "edge-1", epoch, 1, 300).await;
    send(
        &pki,
        &p.aggregator,
        "acme",
        "edge-2",
        Uuid::new_v4(),
        1,
        200,
    )
    .await;
    let reader = token(&db, "reader", Some("acme")).await;

    let mut seen: Vec<(String, i64)> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut next_seq = 301;
    let mut last_ts = String::new();
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/records?limit=37&cursor={c}"),
            None => "/api/v1/records?limit=37".to_owned(),
        };
        let (status, page) = get(&p, &reader, &path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for r in page["records"].as_array().unwrap() {
            let ts = r["ts"].as_str().unwrap().to_owned();
            assert!(ts >= last_ts, "rows come in time order");
            last_ts = ts;
            seen.push((
                r["agent"].as_str().unwrap().into(),
                r["seq"].as_i64().unwrap(),
            ));
        }
        // Concurrent writers: later records (ahead of the cursor) and a new
        // agent, between every page.
        if next_seq < 400 {
            send(&pki, &p.aggregator, "acme", "edge-1", epoch, next_seq, 10).await;
            next_seq += 10;
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no row is returned twice");
    for seq in 1..=300 {
        assert!(
            unique.contains(&("edge-1".to_owned(), seq)),
            "edge-1 seq {seq}"
        );
    }
    for seq in 1..=200 {
        assert!(
            unique.contains(&("edge-2".to_owned(), seq)),
            "edge-2 seq {seq}"
        );
    }
    // Records inserted ahead of the cursor were picked up on the way.
    assert_eq!(seen.len() as i64, db.count("records").await);

    let (status, body) = get(&p, &reader, "/api/v1/records?cursor=garbage").await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    p.aggregator.stop().await;
}

#[tokio::test]
async fn ndjson_export_streams_the_filtered_rows_one_per_line() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db).await;
    send(
        &pki,
        &p.aggregator,
        "acme",
        "edge-1",
        Uuid::new_v4(),
        1,
        2500,
    )
    .await;
    send(&pki, &p.aggregator, "acme", "edge-2", Uuid::new_v4(), 1, 10).await;
    let reader = token(&db, "reader", Some("acme")).await;

    let export = |query: &'static str| {
        p.client
            .get(p.endpoint(&format!("/api/v1/records{query}")))
            .bearer_auth(&reader)
            .header("accept", "application/x-ndjson")
            .send()
    };
    let response = export("?agent=edge-1").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let text = response.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 2500, "more than two export pages");
    let seqs: HashSet<i64> = lines.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs.len(), 2500);
    assert_eq!(lines[0]["payload"], json!({"n": 1}));

    // from/to bound ts; limit caps the stream.
    let text = export("?from=2023-11-14T22:13:20.010Z&to=2023-11-14T22:13:20.020Z&limit=15")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text.lines().count(), 15);
    p.aggregator.stop().await;
}

#[tokio::test]
async fn platform_admins_manage_tenants_and_the_audit_trail_pages_and_filters() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db).await;
    let admin = token(&db, "admin", None).await;

    let (status, body) = post(
        &p,
        &admin,
        "/api/v1/tenants",
        json!({"id": "acme", "display_name": "ACME Corp"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = post(&p, &admin, "/api/v1/tenants", json!({"id": "acme"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = post(&p, &admin, "/api/v1/tenants", json!({"id": "Bad Id"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (_, created) = post(
        &p,
        &admin,
        "/api/v1/tokens",
        json!({"name": "acme-dash", "role": "reader", "tenant": "acme"}),
    )
    .await;
    let acme_reader = created["token"].as_str().unwrap().to_owned();
    assert_eq!(
        get(&p, &acme_reader, "/api/v1/records").await.0,
        StatusCode::OK
    );

    // Disabling the tenant shuts out its tokens at once.
    let (status, tenant) = post(&p, &admin, "/api/v1/tenants/acme/disable", json!({})).await;
    assert_eq!(
        (status, tenant["disabled"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    assert_eq!(
        get(&p, &acme_reader, "/api/v1/records").await.0,
        StatusCode::UNAUTHORIZED
    );
    post(&p, &admin, "/api/v1/tenants/acme/enable", json!({})).await;
    assert_eq!(
        get(&p, &acme_reader, "/api/v1/records").await.0,
        StatusCode::OK
    );

    let (_, tenants) = get(&p, &admin, "/api/v1/tenants").await;
    assert_eq!(tenants[0]["display_name"], "ACME Corp");
    let (_, tokens) = get(&p, &admin, "/api/v1/tokens").await;
    assert_eq!(tokens.as_array().unwrap().len(), 2);
    assert!(
        tokens.to_string().find("dcs_").is_none(),
        "tokens are never listed"
    );

    // The trail, newest first, in pages of two, filtered by action.
    let (status, page) = get(&p, &admin, "/api/v1/audit?limit=2").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let actions: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["tenant.enable", "auth.failed"]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, older) = get(
        &p,
        &admin,
        &format!("/api/v1/audit?limit=2&cursor={cursor}"),
    )
    .await;
    assert_eq!(older["entries"][0]["action"], "tenant.disable");
    let (_, creates) = get(&p, &admin, "/api/v1/audit?action=tenant.create").await;
    let creates = creates["entries"].as_array().unwrap();
    assert_eq!(creates.len(), 1);
    assert_eq!(creates[0]["tenant"], "acme");
    assert!(creates[0]["actor"].as_str().unwrap().starts_with("token:"));
    assert!(
        creates[0]["remote"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    p.aggregator.stop().await;
}

#[tokio::test]
async fn the_api_describes_itself_without_a_token() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db).await;
    let response = p
        .client
        .get(p.endpoint("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["paths"]["/api/v1/records"]["get"].is_object());

    let response = p.client.get(p.endpoint("/api/docs")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = response.text().await.unwrap();
    assert!(page.contains("/api/v1/agents/{id}/revoke"));
    assert!(!page.contains("<script"));
    p.aggregator.stop().await;
}

#[tokio::test]
async fn a_flood_of_bad_tokens_is_audited_as_a_bounded_number_of_rows() {
    let db = TestDb::new().await;
    let pki = Pki::new();
    let p = start(&pki, &db).await;
    let admin = token(&db, "admin", None).await;

    let lockout = dcs_aggregator::platform::audit::RefusalThrottle::LOCKOUT_PER_ADDRESS;
    for i in 0..lockout - 1 {
        let (status, _) = get(&p, &format!("dcs_wrong-{i}"), "/api/v1/agents").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // Every refusal was answered; only the first of the window became rows.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit WHERE action = 'auth.failed'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 20);
    // A valid token from the same address still works below the lockout.
    assert_eq!(get(&p, &admin, "/api/v1/agents").await.0, StatusCode::OK);
    // At the lockout, the address is refused before any token lookup, valid
    // tokens included, until the window ends.
    let (status, _) = get(&p, "dcs_wrong-last", "/api/v1/agents").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = get(&p, &admin, "/api/v1/agents").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"], "too_many_refusals", "{body}");
}

/// The nice value of a thread of this process, from /proc (field 19 of
/// `stat`, counted after the parenthesised name, which may hold spaces).
fn thread_nice(stat_path: &std::path::Path) -> Option<i32> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split(' ').nth(16)?.parse().ok()
}

#[tokio::test]
async fn the_platform_api_runs_on_threads_of_its_own_below_the_agents_priority() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db).await;
    let admin = token(&db, "admin", None).await;
    let (status, _) = get(&p, &admin, "/api/v1/agents").await;
    assert_eq!(status, StatusCode::OK);

    let own = thread_nice(std::path::Path::new("/proc/thread-self/stat")).expect("own nice");
    let expected = (own + dcs_aggregator::PLATFORM_NICE).min(19);
    let mut platform_threads = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("threads") {
        let dir = task.expect("thread").path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.trim_end() == "dcs-platform" {
            platform_threads.push(thread_nice(&dir.join("stat")).expect("nice"));
        }
    }
    // The accept loop's thread and at least one worker (which served the call).
    assert!(
        platform_threads.len() >= 2,
        "platform threads: {platform_threads:?}"
    );
    assert!(
        platform_threads.iter().all(|&nice| nice == expected),
        "platform threads at nice {platform_threads:?}, expected {expected} (this thread {own})"
    );
    p.aggregator.stop().await;
}
