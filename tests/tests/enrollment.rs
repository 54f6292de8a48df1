//! Agent enrollment and certificate renewal against a real aggregator, real
//! PostgreSQL and real TLS on 127.0.0.1: one-time tokens, tenant scope, the
//! audit trail, an enrolled agent delivering, renewal with short-lived
//! certificates while records flow, a revoked agent refused, and the
//! aggregator's own certificate reloaded when its file changes.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dcs_aggregator::Config;
use dcs_aggregator::platform::agents::set_agent_revoked;
use dcs_aggregator::platform::tokens::{NewToken, create_token};
use dcs_certs::enroll::{IssuedCertificate, RENEW_PATH, certificate_info, new_key_and_csr};
use dcs_edge::enroll::{CertRequestError, IdentityPaths, enroll};
use dcs_shared::wire::ErrorBody;
use dcs_tests::agent::{RunningAgent, start_agent, test_config as agent_config, wait_until};
use dcs_tests::aggregator::{RunningPlatform, agent_client, start_platform_with, with_user};
use dcs_tests::http::Fetch as _;
use dcs_tests::pg::TestDb;
use dcs_tests::pki::{AgentCert, Pki};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Enrollment on, signing with the test CA, issuing certificates that live
/// `validity`; deny-list refreshes fast enough for a test.
async fn start(pki: &Pki, db: &TestDb, validity: Duration) -> RunningPlatform {
    start_platform_with(pki, &db.url, |c| enable_enrollment(c, pki, validity)).await
}

fn enable_enrollment(config: &mut Config, pki: &Pki, validity: Duration) {
    config.enrollment.enabled = true;
    config.enrollment.ca_cert = pki.ca.clone();
    config.enrollment.ca_key = pki.path().join(dcs_certs::CA_KEY_FILE);
    config.enrollment.validity = validity;
    config.revocation.refresh_interval = Duration::from_millis(200);
}

const DAY: Duration = Duration::from_secs(24 * 3600);

async fn tenant(db: &TestDb, id: &str) {
    sqlx::query("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(id)
        .execute(&db.pool)
        .await
        .expect("tenant");
}

/// An admin API token, scoped to `tenant` or platform-wide.
async fn admin(db: &TestDb, scope: Option<&str>) -> String {
    if let Some(t) = scope {
        tenant(db, t).await;
    }
    let new = NewToken {
        name: format!("admin-{}", scope.unwrap_or("all")),
        role: "admin".into(),
        tenant: scope.map(str::to_owned),
        expires_in: None,
    };
    create_token(&db.pool, &new, "test".into(), None)
        .await
        .expect("create token")
        .token
}

async fn post(
    p: &RunningPlatform,
    bearer: Option<&str>,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let mut request = p.client.post(p.endpoint(path)).json(&body);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .expect("request reaches the platform API");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A one-time enrollment token for `tenant/agent` made through the API.
async fn enrollment_token(
    p: &RunningPlatform,
    admin: &str,
    tenant: &str,
    agent: &str,
    expires_in: &str,
) -> String {
    let (status, body) = post(
        p,
        Some(admin),
        "/api/v1/enrollment-tokens",
        json!({"tenant": tenant, "agent": agent, "expires_in": expires_in}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["tenant"], tenant);
    assert_eq!(body["agent"], agent);
    let token = body["token"].as_str().expect("token shown once").to_owned();
    assert!(token.starts_with("dcse_"), "{token}");
    token
}

fn paths(dir: &Path, name: &str) -> IdentityPaths {
    IdentityPaths {
        cert: dir.join(format!("{name}/agent.pem")),
        key: dir.join(format!("{name}/private/agent-key.pem")),
        ca: dir.join(format!("{name}/ca.pem")),
    }
}

/// The enrolled files as the test harness's agent certificate.
fn agent_cert(files: &IdentityPaths) -> AgentCert {
    AgentCert {
        cert: files.cert.clone(),
        key: files.key.clone(),
        ca: files.ca.clone(),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn refusal(result: Result<IssuedCertificate, CertRequestError>) -> (u16, String) {
    match result {
        Err(CertRequestError::Refused { status, code, .. }) => (status, code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// `(action, outcome, reason)` of the audit rows for `action`, oldest first.
async fn audit(db: &TestDb, action: &str) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as(
        "SELECT action, outcome, details->>'reason' FROM audit WHERE action = $1 ORDER BY id",
    )
    .bind(action)
    .fetch_all(&db.pool)
    .await
    .expect("read audit")
}

/// `TENANT/AGENT` of the certificate file at `cert`.
fn identity_of(cert: &Path) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let der = CertificateDer::from_pem_file(cert).expect("PEM certificate");
    let id = dcs_shared::identity::AgentIdentity::from_certificate_der(&der).expect("identity");
    format!("{}/{}", id.tenant, id.agent)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

#[tokio::test]
async fn an_enrollment_token_works_once_and_never_twice() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db, DAY).await;
    let acme_admin = admin(&db, Some("acme")).await;
    let out = tempfile::tempdir().unwrap();

    let token = enrollment_token(&p, &acme_admin, "acme", "edge-1", "1h").await;
    let first = paths(out.path(), "first");
    let issued = enroll(&p.url, &token, &pki.ca, &first)
        .await
        .expect("enroll");
    assert_eq!(
        (issued.tenant.as_str(), issued.agent.as_str()),
        ("acme", "edge-1")
    );
    assert_eq!(identity_of(&first.cert), "acme/edge-1");
    assert_eq!(mode(&first.key), 0o600, "the private key is private");
    assert_eq!(mode(&first.cert), 0o644);
    assert_eq!(mode(&first.ca), 0o644);
    assert_eq!(
        std::fs::read_to_string(&first.ca).unwrap(),
        std::fs::read_to_string(&pki.ca).unwrap()
    );
    let key = std::fs::read_to_string(&first.key).unwrap();
    assert!(
        !serde_json::to_string(&issued).unwrap().contains(&key),
        "the key is never in an answer"
    );

    // The same token again: refused, and nothing is written.
    let second = paths(out.path(), "second");
    let (status, code) = refusal(enroll(&p.url, &token, &pki.ca, &second).await);
    assert_eq!((status, code.as_str()), (410, "token_used"));
    assert!(!second.cert.exists() && !second.key.exists());

    // Two uses of a fresh token at the same time: exactly one certificate.
    let token = enrollment_token(&p, &acme_admin, "acme", "edge-2", "1h").await;
    let attempt = |csr: String| {
        let (p, token) = (&p, token.clone());
        async move {
            post(
                p,
                None,
                "/api/v1/enroll",
                json!({"token": token, "csr": csr}),
            )
            .await
        }
    };
    let (a, b) = tokio::join!(
        attempt(new_key_and_csr().unwrap().1),
        attempt(new_key_and_csr().unwrap().1)
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::CREATED, StatusCode::GONE],
        "{a:?} {b:?}"
    );

    let tokens: Vec<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT to_char(used_at, 'YYYY'), cert_serial FROM enrollment_tokens ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(tokens.len(), 2);
    assert!(
        tokens
            .iter()
            .all(|(used, serial)| used.is_some() && serial.is_some())
    );
    assert_eq!(tokens[0].1.as_deref(), Some(issued.serial.as_str()));

    let enrolls = audit(&db, "agent.enroll").await;
    let ok = enrolls.iter().filter(|(_, o, _)| o == "ok").count();
    let used: Vec<_> = enrolls
        .iter()
        .filter(|(_, o, r)| o == "denied" && r.as_deref() == Some("token_used"))
        .collect();
    assert_eq!((ok, used.len()), (2, 2), "{enrolls:?}");
    assert_eq!(audit(&db, "enrollment_token.create").await.len(), 2);
    p.aggregator.stop().await;
}

#[tokio::test]
async fn enrollment_and_renewal_work_with_the_application_roles_grants() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    // What a DBA does once per cluster (see the platform migration).
    sqlx::query("ALTER ROLE dcs_app LOGIN")
        .execute(&db.pool)
        .await
        .expect("let the application role log in");
    let app_url = with_user(&db.url, "dcs_app");
    let p = start_platform_with(&pki, &app_url, |c| enable_enrollment(c, &pki, DAY)).await;
    let acme_admin = admin(&db, Some("acme")).await;
    let token = enrollment_token(&p, &acme_admin, "acme", "edge-1", "1h").await;
    let out = tempfile::tempdir().unwrap();
    let files = paths(out.path(), "agent");
    enroll(&p.url, &token, &pki.ca, &files)
        .await
        .expect("enroll as dcs_app");
    let (status, code) =
        refusal(enroll(&p.url, &token, &pki.ca, &paths(out.path(), "again")).await);
    assert_eq!((status, code.as_str()), (410, "token_used"));
    // A certificate inside its renewal window (half its lifetime passed).
    let (status, body) = renew_with(&p, &pki.renewable_agent("acme", "edge-1")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(
        &p,
        Some(&acme_admin),
        "/api/v1/enrollment-tokens/1/disable",
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    p.aggregator.stop().await;
}

// Multi-threaded: the in-process aggregator serves while the test thread
// waits for the dcs-edge process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcs_edge_enroll_writes_to_the_configured_paths_and_never_prints_the_key() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db, DAY).await;
    let acme_admin = admin(&db, Some("acme")).await;
    let token = enrollment_token(&p, &acme_admin, "acme", "edge-1", "1h").await;
    let out = tempfile::tempdir().unwrap();
    let files = paths(out.path(), "etc");
    // The agent's configuration names the files; they do not exist yet, so
    // the configuration would not validate: enroll must not need it to.
    let config = out.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[aggregator]\nurl = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            p.aggregator.url,
            files.cert.display(),
            files.key.display(),
            files.ca.display()
        ),
    )
    .unwrap();
    let run = |token: &str| {
        std::process::Command::new(dcs_tests::process::binary("dcs-edge"))
            .args(["enroll", "--url", &p.url, "--ca"])
            .arg(&pki.ca)
            .arg("--config")
            .arg(&config)
            .env("DCS_ENROLL_TOKEN", token)
            .output()
            .expect("run dcs-edge enroll")
    };
    let output = tokio::task::block_in_place(|| run(&token));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("dcs://acme/edge-1"), "{stdout}");
    let key = std::fs::read_to_string(&files.key).unwrap();
    assert!(key.contains("PRIVATE KEY"));
    assert!(!stdout.contains("PRIVATE KEY") && !stderr.contains("PRIVATE KEY"));
    assert_eq!(mode(&files.key), 0o600);
    assert_eq!(identity_of(&files.cert), "acme/edge-1");

    // The same token a second time: a failure that says why, files untouched.
    let output = tokio::task::block_in_place(|| run(&token));
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("token_used"));
    assert_eq!(std::fs::read_to_string(&files.key).unwrap(), key);
    p.aggregator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcs_edge_enroll_works_in_its_default_mode_and_keeps_the_token_when_it_cannot_write() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db, DAY).await;
    let acme_admin = admin(&db, Some("acme")).await;
    let token = enrollment_token(&p, &acme_admin, "acme", "edge-1", "1h").await;
    let run = |dir: &Path, extra: &[&str]| {
        std::process::Command::new(dcs_tests::process::binary("dcs-edge"))
            .args(["enroll", "--url", &p.url, "--ca"])
            .arg(&pki.ca)
            .args(extra)
            .current_dir(dir)
            .env("DCS_ENROLL_TOKEN", &token)
            .output()
            .expect("run dcs-edge enroll")
    };

    // An output that cannot be written (its directory is a file): refused
    // before the token is sent, so the token still works afterwards.
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("blocked"), "a file").unwrap();
    let output = tokio::task::block_in_place(|| run(out.path(), &["--key-out", "blocked/key.pem"]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("the token was not used"), "{stderr}");

    // No --config and no --*-out: agent.pem, agent-key.pem and ca.pem in the
    // current directory, as documented.
    let output = tokio::task::block_in_place(|| run(out.path(), &[]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert_eq!(identity_of(&out.path().join("agent.pem")), "acme/edge-1");
    assert_eq!(mode(&out.path().join("agent-key.pem")), 0o600);
    assert!(out.path().join("ca.pem").is_file());
    p.aggregator.stop().await;
}

#[tokio::test]
async fn expired_unknown_and_disabled_tokens_are_refused_and_audited() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db, DAY).await;
    let acme_admin = admin(&db, Some("acme")).await;
    let out = tempfile::tempdir().unwrap();

    let token = enrollment_token(&p, &acme_admin, "acme", "edge-1", "1s").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, code) = refusal(enroll(&p.url, &token, &pki.ca, &paths(out.path(), "a")).await);
    assert_eq!((status, code.as_str()), (410, "token_expired"));

    let (status, code) =
        refusal(enroll(&p.url, "dcse_not-a-token", &pki.ca, &paths(out.path(), "b")).await);
    assert_eq!((status, code.as_str()), (401, "unknown_token"));
    // An API token is not an enrollment token.
    let (status, code) =
        refusal(enroll(&p.url, &acme_admin, &pki.ca, &paths(out.path(), "c")).await);
    assert_eq!((status, code.as_str()), (401, "unknown_token"));

    // A body that is not an enrollment request gets a JSON error too.
    let (status, body) = post(&p, None, "/api/v1/enroll", json!({"token": "x"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_request")),
        "{body}"
    );
    let (status, body) = post(
        &p,
        None,
        "/api/v1/enroll",
        json!({"token": "dcse_x", "csr": "not a CSR"}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "an unknown token is refused before the CSR is read: {body}"
    );

    let token = enrollment_token(&p, &acme_admin, "acme", "edge-3", "1h").await;
    let (status, body) = post(
        &p,
        Some(&acme_admin),
        "/api/v1/enrollment-tokens/2/disable",
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, code) = refusal(enroll(&p.url, &token, &pki.ca, &paths(out.path(), "d")).await);
    assert_eq!((status, code.as_str()), (403, "token_disabled"));

    let reasons: Vec<_> = audit(&db, "agent.enroll")
        .await
        .into_iter()
        .map(|(_, outcome, reason)| (outcome, reason.unwrap_or_default()))
        .collect();
    let expected: Vec<(String, String)> = [
        "token_expired",
        "unknown_token",
        "unknown_token",
        "unknown_token",
        "token_disabled",
    ]
    .iter()
    .map(|r| ("denied".to_owned(), (*r).to_owned()))
    .collect();
    assert_eq!(reasons, expected);
    assert!(!out.path().join("a").exists(), "a refusal writes nothing");
    p.aggregator.stop().await;

    // An aggregator without [enrollment] says so.
    let p = start_platform_with(&pki, &db.url, |_| {}).await;
    let (status, code) = refusal(enroll(&p.url, &token, &pki.ca, &paths(out.path(), "e")).await);
    assert_eq!((status, code.as_str()), (404, "enrollment_disabled"));
    p.aggregator.stop().await;
}

#[tokio::test]
async fn enrollment_tokens_never_cross_tenants() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db, DAY).await;
    let acme_admin = admin(&db, Some("acme")).await;
    let platform_admin = admin(&db, None).await;
    tenant(&db, "globex").await;

    // A tenant's admin cannot mint a token for another tenant.
    let (status, body) = post(
        &p,
        Some(&acme_admin),
        "/api/v1/enrollment-tokens",
        json!({"tenant": "globex", "agent": "edge-1"}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // Leaving the tenant out means its own tenant.
    let (status, body) = post(
        &p,
        Some(&acme_admin),
        "/api/v1/enrollment-tokens",
        json!({"agent": "edge-9"}),
    )
    .await;
    assert_eq!(
        (status, body["tenant"].as_str()),
        (StatusCode::CREATED, Some("acme"))
    );
    // A platform admin must say which tenant.
    let (status, _) = post(
        &p,
        Some(&platform_admin),
        "/api/v1/enrollment-tokens",
        json!({"agent": "edge-1"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A token for acme enrolls into acme, whatever the CSR says; the other
    // tenant's admin does not even see it.
    let token = enrollment_token(&p, &platform_admin, "acme", "edge-1", "1h").await;
    let out = tempfile::tempdir().unwrap();
    let mine = paths(out.path(), "acme");
    enroll(&p.url, &token, &pki.ca, &mine)
        .await
        .expect("enroll");
    assert_eq!(identity_of(&mine.cert), "acme/edge-1");
    let globex_admin = admin(&db, Some("globex")).await;
    let listed: Value = p
        .client
        .get(p.endpoint("/api/v1/enrollment-tokens"))
        .bearer_auth(&globex_admin)
        .fetch_json()
        .await;
    assert_eq!(listed, json!([]));
    let (status, _) = post(
        &p,
        Some(&globex_admin),
        "/api/v1/enrollment-tokens/1/disable",
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        !audit(&db, "access.denied").await.is_empty(),
        "the 403 is audited"
    );
    p.aggregator.stop().await;
}

/// Pushes one record (id `r-N`) every `every` to an agent until stopped.
struct Pusher {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Pusher {
    fn start(agent_url: String, every: Duration) -> Pusher {
        let (stop, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (stopped, counter) = (stop.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stopped.load(Ordering::Relaxed) {
                let n = counter.load(Ordering::Relaxed);
                let body =
                    format!(r#"{{"stream":"plant.sensors","id":"r-{n}","payload":{{"n":{n}}}}}"#);
                let response = client
                    .post(format!("{agent_url}/v1/records"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("push to agent");
                assert!(response.status().is_success(), "{}", response.status());
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(every).await;
            }
        });
        Pusher { stop, sent, task }
    }

    /// Records accepted so far.
    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops pushing; returns how many records were accepted.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.sent.load(Ordering::Relaxed)
    }
}

/// An agent started on the enrolled files, its buffer in `dir`.
async fn start_enrolled_agent(
    files: &IdentityPaths,
    aggregator_url: &str,
    dir: &Path,
) -> RunningAgent {
    start_agent(agent_config(
        &agent_cert(files),
        aggregator_url,
        &dir.join("buffer.db"),
    ))
    .await
}

async fn stored_ids(db: &TestDb, tenant: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT record_id FROM records WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_all(&db.pool)
        .await
        .expect("read records")
}

async fn wait_for_all(db: &TestDb, tenant: &str, count: u64) -> Vec<String> {
    let delivered = wait_until(Duration::from_secs(30), || async {
        stored_ids(db, tenant).await.len() as u64 >= count
    })
    .await;
    let ids = stored_ids(db, tenant).await;
    assert!(delivered, "{} of {count} records delivered", ids.len());
    ids
}

fn assert_exactly_once(ids: &[String], count: u64) {
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), unique.len(), "no record stored twice");
    let expected: HashSet<String> = (0..count).map(|n| format!("r-{n}")).collect();
    assert_eq!(unique, expected.iter().collect(), "every record stored");
}

#[tokio::test]
async fn an_enrolled_agent_delivers_with_its_new_certificate() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db, DAY).await;
    let acme_admin = admin(&db, Some("acme")).await;
    let token = enrollment_token(&p, &acme_admin, "acme", "edge-1", "1h").await;
    let out = tempfile::tempdir().unwrap();
    let files = paths(out.path(), "agent");
    let issued = enroll(&p.url, &token, &pki.ca, &files)
        .await
        .expect("enroll");

    let agent = start_enrolled_agent(&files, &p.aggregator.url, out.path()).await;
    let pusher = Pusher::start(agent.url.clone(), Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let count = pusher.stop().await;
    assert!(count > 10);
    assert_exactly_once(&wait_for_all(&db, "acme", count).await, count);
    let serial: Option<String> = sqlx::query_scalar(
        "SELECT cert_serial FROM agents WHERE tenant_id = 'acme' AND name = 'edge-1'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(serial.as_deref(), Some(issued.serial.as_str()));
    agent.stop().await;
    p.aggregator.stop().await;
}

#[tokio::test]
async fn renewal_happens_before_expiry_with_no_gap_in_delivery() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    // 30 s certificates: the agent renews when 10 s are left.
    let p = start(&pki, &db, Duration::from_secs(30)).await;
    let acme_admin = admin(&db, Some("acme")).await;
    let token = enrollment_token(&p, &acme_admin, "acme", "edge-1", "1h").await;
    let out = tempfile::tempdir().unwrap();
    let files = paths(out.path(), "agent");
    let first = enroll(&p.url, &token, &pki.ca, &files)
        .await
        .expect("enroll");
    let first_info = certificate_info(&std::fs::read_to_string(&files.cert).unwrap()).unwrap();

    let agent = start_enrolled_agent(&files, &p.aggregator.url, out.path()).await;
    let pusher = Pusher::start(agent.url.clone(), Duration::from_millis(50));

    // The certificate on disk changes before the first one expires.
    let renewed = wait_until(Duration::from_secs(40), || async {
        let pem = std::fs::read_to_string(&files.cert).unwrap_or_default();
        certificate_info(&pem).is_ok_and(|i| i.serial != first.serial)
    })
    .await;
    assert!(renewed, "no renewal within 40 s");
    let now = unix_now();
    assert!(
        now < first_info.not_after,
        "renewed before the old certificate expired"
    );
    let second = certificate_info(&std::fs::read_to_string(&files.cert).unwrap()).unwrap();
    assert_ne!(second.serial, first.serial);
    assert!(second.not_after > first_info.not_after);
    assert_eq!(identity_of(&files.cert), "acme/edge-1", "renewed as itself");
    assert_eq!(mode(&files.key), 0o600);

    // Keep sending until the first certificate has expired: only the new one
    // can deliver these, on the same agent process.
    let past_expiry = Duration::from_secs((first_info.not_after - now + 2).max(0) as u64);
    tokio::time::sleep(past_expiry).await;
    let before_stop = pusher.sent();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let count = pusher.stop().await;
    assert!(count > before_stop, "records kept flowing");
    assert_exactly_once(&wait_for_all(&db, "acme", count).await, count);

    // The aggregator saw the renewed certificate on a batch, and the renewal
    // is on the audit trail.
    let serial: Option<String> = sqlx::query_scalar(
        "SELECT cert_serial FROM agents WHERE tenant_id = 'acme' AND name = 'edge-1'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_ne!(serial.as_deref(), Some(first.serial.as_str()));
    let renewals = audit(&db, "agent.renew").await;
    assert!(
        !renewals.is_empty() && renewals.iter().all(|(_, o, _)| o == "ok"),
        "{renewals:?}"
    );
    // Link state never went down: the swap did not break delivery.
    let status: Value = agent.status().await;
    assert_eq!(status["delivery"]["link"], "up", "{status}");
    agent.stop().await;
    p.aggregator.stop().await;
}

async fn renew_with(p: &RunningPlatform, cert: &AgentCert) -> (StatusCode, Value) {
    let (_, csr) = new_key_and_csr().unwrap();
    let response = agent_client(cert)
        .post(p.aggregator.endpoint(RENEW_PATH))
        .json(&json!({ "csr": csr }))
        .send()
        .await
        .expect("renewal reaches the aggregator");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_agent_renews_only_as_itself_and_never_once_revoked() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db, DAY).await;
    tenant(&db, "acme").await;
    let cert = pki.renewable_agent("acme", "edge-1");

    let (status, body) = renew_with(&p, &cert).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let issued: IssuedCertificate = serde_json::from_value(body).unwrap();
    assert_eq!(
        (issued.tenant.as_str(), issued.agent.as_str()),
        ("acme", "edge-1")
    );

    set_agent_revoked(&db.pool, "acme", "edge-1", true, "test".into(), None)
        .await
        .expect("revoke");
    let refused = wait_until(Duration::from_secs(5), || async {
        renew_with(&p, &cert).await.0 == StatusCode::FORBIDDEN
    })
    .await;
    assert!(refused, "a revoked agent still renews");
    let (status, body) = renew_with(&p, &cert).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let error: ErrorBody = serde_json::from_value(body).unwrap();
    assert_eq!(error.error, "revoked");
    // Renewals made before the deny list caught up went through (within
    // revocation.refresh_interval); the refused ones are on the trail.
    let renewals = audit(&db, "agent.renew").await;
    assert_eq!(renewals.first().map(|r| r.1.as_str()), Some("ok"));
    let last_two: Vec<_> = renewals.iter().rev().take(2).collect();
    assert!(
        last_two
            .iter()
            .all(|(_, o, r)| o == "denied" && r.as_deref() == Some("revoked")),
        "{renewals:?}"
    );
    // Every renewal row names the caller's address.
    let remotes: Vec<Option<String>> =
        sqlx::query_scalar("SELECT remote FROM audit WHERE action = 'agent.renew'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(
        remotes
            .iter()
            .all(|r| r.as_deref().is_some_and(|r| r.starts_with("127.0.0.1:"))),
        "{remotes:?}"
    );
    p.aggregator.stop().await;
}

/// Writes `issued` (a certificate just renewed) as an agent's files.
fn renewed_cert(dir: &Path, name: &str, issued: &IssuedCertificate, key: &str) -> AgentCert {
    let files = paths(dir, name);
    std::fs::create_dir_all(files.key.parent().unwrap()).unwrap();
    std::fs::write(&files.cert, &issued.certificate).unwrap();
    std::fs::write(&files.key, key).unwrap();
    std::fs::write(&files.ca, &issued.ca).unwrap();
    agent_cert(&files)
}

#[tokio::test]
async fn renewal_is_refused_outside_its_window_and_too_often_and_revoking_a_serial_revokes_its_renewals()
 {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start(&pki, &db, DAY).await;
    tenant(&db, "acme").await;

    // A fresh certificate: its window opens in half its lifetime.
    let fresh = pki.agent("acme", "edge-1");
    let (status, body) = renew_with(&p, &fresh).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"], "renewal_not_due", "{body}");

    // Inside the window: once, then not again so soon.
    let old = pki.renewable_agent("acme", "edge-2");
    let (key, csr) = new_key_and_csr().unwrap();
    let response = agent_client(&old)
        .post(p.aggregator.endpoint(RENEW_PATH))
        .json(&json!({ "csr": csr }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let child: IssuedCertificate = response.json().await.unwrap();
    let (status, body) = renew_with(&p, &old).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"], "renewal_rate_limited", "{body}");

    // The lineage is on record; revoking the parent's serial revokes the
    // child it renewed into, though the child's serial was never named.
    let parent: Option<String> =
        sqlx::query_scalar("SELECT parent_serial FROM issued_certificates WHERE serial = $1")
            .bind(&child.serial)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let out = tempfile::tempdir().unwrap();
    let child_cert = renewed_cert(out.path(), "child", &child, &key);
    let parent = parent.expect("a renewal records its parent serial");
    let client = agent_client(&child_cert);
    let url = p.aggregator.endpoint(dcs_shared::wire::BATCHES_PATH);
    let batch = |client: reqwest::Client| {
        let url = url.clone();
        async move {
            let body = dcs_shared::wire::encode_batch(
                uuid::Uuid::now_v7(),
                None,
                Vec::<dcs_shared::wire::OutRecord>::new(),
                1,
            );
            dcs_tests::aggregator::post_batch(&client, &url, body)
                .await
                .status()
        }
    };
    assert_eq!(batch(client.clone()).await, StatusCode::OK);
    dcs_aggregator::platform::agents::revoke_serial_as(
        &db.pool,
        &dcs_aggregator::platform::agents::NewRevokedSerial {
            serial: parent.clone(),
            reason: Some("stolen".into()),
        },
        "test".into(),
        None,
    )
    .await
    .unwrap();
    let refused = wait_until(Duration::from_secs(10), || {
        let client = client.clone();
        async move { batch(client).await == StatusCode::FORBIDDEN }
    })
    .await;
    assert!(
        refused,
        "the renewed certificate outlived its parent's revocation"
    );
    p.aggregator.stop().await;
}

/// One HTTP/1.1 keep-alive connection over TLS, for requests sent one by one.
struct RawConnection {
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    served: Vec<u8>,
}

impl RawConnection {
    async fn open(addr: std::net::SocketAddr, agent: &AgentCert) -> RawConnection {
        let mut config =
            dcs_shared::tls::client_config(&agent.ca, &agent.cert, &agent.key).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .expect("handshake");
        let served = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        RawConnection { tls, served }
    }

    /// `GET /health` on this connection; the status line.
    async fn health(&mut self) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        self.tls
            .write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .expect("the connection is still open");
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(5), self.tls.read(&mut chunk))
                .await
                .expect("an answer")
                .expect("read");
            assert!(n > 0, "connection closed by the aggregator");
            answer.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&answer);
            if let Some(head_end) = text.find("\r\n\r\n") {
                let length: usize = text[..head_end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if answer.len() >= head_end + 4 + length {
                    return text.lines().next().unwrap_or_default().to_owned();
                }
            }
        }
    }
}

#[tokio::test]
async fn a_replaced_server_certificate_file_is_served_without_sighup_and_open_connections_stay() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let p = start_platform_with(&pki, &db.url, |c| {
        c.tls.watch_interval = Duration::from_millis(200)
    })
    .await;
    let agent = pki.agent("acme", "edge-1");
    let mut open = RawConnection::open(p.aggregator.addr, &agent).await;
    assert_eq!(open.health().await, "HTTP/1.1 200 OK");
    let original = open.served.clone();

    // A deployment tool renames a new pair into place; no signal is sent.
    let pem = pki
        .authority()
        .issue_server(
            &["localhost".to_owned()],
            &[std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)],
            dcs_certs::Validity::days_from_now(1),
        )
        .unwrap();
    dcs_certs::write_pair(pki.path(), "server", &pem).unwrap();
    let started = Instant::now();
    loop {
        let fresh = RawConnection::open(p.aggregator.addr, &agent).await;
        if fresh.served != original {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection opened before the change was not dropped.
    assert_eq!(open.health().await, "HTTP/1.1 200 OK");
    // The platform listener serves the same files and follows too.
    let (status, _) = post(
        &p,
        None,
        "/api/v1/enroll",
        json!({"token": "x", "csr": "y"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "reachable, enrollment off");
    p.aggregator.stop().await;
}
