//! The OpenTelemetry recipe of docs/INTEGRATIONS.md, run with the real
//! program: the OpenTelemetry Python SDK's OTLP/HTTP log exporter
//! (`tests/recipes/otlp_python.py`) sends 10,000 log records to a real
//! agent, which forwards them to a real aggregator and PostgreSQL; every one
//! must be there exactly once.
//!
//! Ignored in the workspace run: it needs the SDK, which
//! `scripts/otlp-python.sh` installs into a cached virtualenv and then runs
//! this test with `DCS_OTLP_PYTHON` pointing at that virtualenv's python.

use std::time::Duration;

use dcs_tests::agent::{self, start_agent, wait_until};
use dcs_tests::aggregator::start_aggregator;
use dcs_tests::chaos::log_scenario;
use dcs_tests::pg::TestDb;
use dcs_tests::pki::Pki;

const DEFAULT_COUNT: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the OpenTelemetry Python SDK: run scripts/otlp-python.sh"]
async fn the_opentelemetry_python_sdk_exporter_delivers_every_log_record_exactly_once() {
    let python = std::env::var("DCS_OTLP_PYTHON")
        .expect("DCS_OTLP_PYTHON names a python with the OpenTelemetry SDK (scripts/otlp-python.sh sets it)");
    let count: usize = std::env::var("DCS_OTLP_RECIPE_COUNT")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_COUNT);
    let pki = Pki::new();
    let db = TestDb::new().await;
    let aggregator = start_aggregator(&pki, &db.url).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(agent::test_config(
        &pki.agent("acme", "edge-1"),
        &aggregator.url,
        &dir.path().join("buffer.db"),
    ))
    .await;
    let run = uuid::Uuid::new_v4().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/otlp_python.py");
    let started = std::time::Instant::now();
    let output = tokio::process::Command::new(&python)
        .arg(script)
        .arg(agent.endpoint("/v1/logs"))
        .arg(count.to_string())
        .arg(&run)
        // The exporter must reach the agent on loopback, never a proxy.
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .output()
        .await
        .expect("run the OpenTelemetry Python SDK recipe");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the exporter failed: {stdout}\n{stderr}"
    );
    let sent_in = started.elapsed();

    let count_rows = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM records
             WHERE stream = 'otlp.logs' AND payload->'attributes'->>'recipe.run' = $1",
        )
        .bind(&run)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    wait_until(Duration::from_secs(120), || async {
        count_rows().await >= count as i64
    })
    .await;
    // Settled: a late duplicate would show up here.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let in_pg = count_rows().await;
    let (distinct, in_range): (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT payload->'attributes'->>'recipe.i'),
                count(*) FILTER (WHERE (payload->'attributes'->>'recipe.i')::int8 BETWEEN 0 AND $2)
         FROM records
         WHERE stream = 'otlp.logs' AND payload->'attributes'->>'recipe.run' = $1",
    )
    .bind(&run)
    .bind(count as i64 - 1)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let missing = count as i64 - distinct;
    let duplicated = in_pg - distinct;
    let line = format!(
        "scenario=otlp-python sent={count} in_pg={in_pg} missing={missing} duplicated={duplicated} exporter_s={:.1}",
        sent_in.as_secs_f64()
    );
    println!("{line} ({})", stdout.trim());
    log_scenario(&line);
    assert_eq!((missing, duplicated), (0, 0), "{line}");
    assert_eq!(in_range, count as i64, "{line}");

    // The mapping, as the docs state it, on one delivered row.
    let (severity, body, service, scope): (i64, String, String, String) = sqlx::query_as(
        "SELECT (payload->>'severity_number')::int8, payload->>'body',
                payload->'resource'->'attributes'->>'service.name', payload->'scope'->>'name'
         FROM records WHERE payload->'attributes'->>'recipe.run' = $1
           AND payload->'attributes'->>'recipe.i' = '7'",
    )
    .bind(&run)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (severity, body.as_str(), service.as_str(), scope.as_str()),
        (9, "recipe record 7", "dcs-recipe", "dcs.recipe")
    );
    agent.stop().await;
    aggregator.stop().await;
}
