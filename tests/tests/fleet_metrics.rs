//! Fleet observability, read from real `dcs-aggregator` and `dcs-edge`
//! processes (each with its own metrics recorder):
//! - every counter docs/OBSERVABILITY.md lists is on `/metrics` from the start;
//! - the agent's local API counts the answers it gives before routing (413);
//! - a silent agent's gauges come back after an aggregator restart, appear on
//!   a replica it never delivered to, and disappear with `metrics.per_agent =
//!   false` while the fleet-wide counts stay.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use dcs_tests::agent::{self, AgentProcess, ndjson, push, start_agent};
use dcs_tests::balancer::{Replica, metric_value};
use dcs_tests::http::Fetch as _;
use dcs_tests::pg::TestDb;
use dcs_tests::pki::Pki;

const TENANT: &str = "fleet";

/// The counters of one section (`### Edge agent`, `### Aggregator`) of
/// docs/OBSERVABILITY.md's metric tables, with their label column.
fn documented_counters(section: &str) -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/OBSERVABILITY.md"),
    )
    .expect("read docs/OBSERVABILITY.md");
    let start = doc
        .find(&format!("### {section}\n"))
        .unwrap_or_else(|| panic!("section {section}"));
    let rest = &doc[start + section.len() + 5..];
    let rest = &rest[..rest.find("\n### ").unwrap_or(rest.len())];
    rest.lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            match cells.as_slice() {
                ["", name, "counter", labels, ..] => {
                    Some((name.trim_matches('`').to_owned(), (*labels).to_owned()))
                }
                _ => None,
            }
        })
        .collect()
}

/// Names present in a text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The silent agent's last-seen gauge, whatever the label order.
fn last_seen(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.starts_with("dcs_aggregator_agent_last_seen_timestamp_seconds{")
                && l.contains("agent=\"silent-1\"")
                && l.contains(&format!("tenant=\"{TENANT}\""))
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

async fn scrape(http: &reqwest::Client, url: &str) -> String {
    http.get(url).fetch_text().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_counter_is_exported_at_zero_from_the_start() {
    dcs_shared::tls::install_crypto_provider();
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new();
    let db = TestDb::new().await;
    let http = reqwest::Client::new();
    let mut replica = Replica::new(dir.path(), &pki, &db.url, 1, &[]);
    replica.service.start().await;
    assert!(agent::wait_until(Duration::from_secs(20), || replica.ready(&http)).await);
    let aggregator = scrape(
        &http,
        &format!("http://127.0.0.1:{}/metrics", replica.admin),
    )
    .await;
    let url = format!("https://localhost:{}", replica.service.port);
    let mut config = agent::test_config(
        &pki.agent(TENANT, "fresh"),
        &url,
        &dir.path().join("buffer.db"),
    );
    // The smallest request cap the agent accepts: its payload cap.
    config.ingest.max_request_bytes = config.ingest.max_payload_bytes;
    let edge = AgentProcess::spawn(&config, &dir.path().join("agent.log")).await;
    let agent_text = scrape(&http, &format!("{}/metrics", edge.url)).await;

    let mut missing = Vec::new();
    for (section, text) in [("Edge agent", &agent_text), ("Aggregator", &aggregator)] {
        let names = exported(text);
        let counters = documented_counters(section);
        assert!(counters.len() > 5, "no counters read from {section}");
        for (name, labels) in counters {
            // Labelled with data that exists only with traffic or
            // configuration: producer streams, configured sources and
            // syslog listeners (none here; each listener's counters are
            // exported at 0 when it starts).
            if labels.contains("`stream`")
                || labels.contains("`source`")
                || labels.contains("`listener`")
            {
                continue;
            }
            if !names.contains(&name) {
                missing.push(format!("{section}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "documented counters not exported at start-up: {missing:?}"
    );
    for series in [
        "dcs_aggregator_batches_total{outcome=\"accepted\"}",
        "dcs_aggregator_records_ingested_total",
        "dcs_aggregator_tls_handshake_failures_total{reason=\"expired\"}",
    ] {
        assert_eq!(metric_value(&aggregator, series), Some(0.0), "{series}");
    }

    // A body over ingest.max_request_bytes is refused before routing; it is
    // still an answer of the local API, so it is counted.
    // The agent may answer and close before the client has written the
    // whole body (a broken pipe here); the answer is counted either way.
    // A client of its own: the connection the agent closes must not go back
    // to the pool the scrape below takes a connection from.
    let refused = reqwest::Client::new()
        .post(format!("{}/v1/records", edge.url))
        .header("content-type", "application/x-ndjson")
        .body(ndjson("s", "big", 0..40_000))
        .send()
        .await;
    if let Ok(r) = refused {
        assert_eq!(r.status(), 413);
    }
    let agent_text = scrape(&http, &format!("{}/metrics", edge.url)).await;
    assert_eq!(
        metric_value(
            &agent_text,
            "dcs_agent_requests_total{route=\"/v1/records\",status=\"413\"}"
        ),
        Some(1.0),
        "{agent_text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_stays_visible_across_a_restart_and_on_every_replica() {
    dcs_shared::tls::install_crypto_provider();
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new();
    let db = TestDb::new().await;
    let http = reqwest::Client::new();
    let refresh = [("METRICS__AGENTS_REFRESH_INTERVAL", "\"1s\"".to_owned())];
    let mut first = Replica::new(dir.path(), &pki, &db.url, 1, &refresh);
    first.service.start().await;
    assert!(agent::wait_until(Duration::from_secs(20), || first.ready(&http)).await);

    // One agent delivers through replica 1, then goes silent for good.
    let url = format!("https://localhost:{}", first.service.port);
    let config = agent::test_config(
        &pki.agent(TENANT, "silent-1"),
        &url,
        &dir.path().join("buffer.db"),
    );
    let edge = start_agent(config).await;
    let pushed = push(
        &http,
        &edge.url,
        "application/x-ndjson",
        ndjson("s", "r", 0..10),
    )
    .await;
    assert!(pushed.status().is_success());
    assert!(
        agent::wait_until(Duration::from_secs(20), || async {
            db.count("records").await == 10
        })
        .await,
        "records not delivered"
    );
    edge.stop().await;
    let before =
        last_seen(&first.metrics(&http).await.expect("metrics")).expect("gauge set by the batch");

    // A restart loses the process's gauges; the table brings them back.
    first.service.kill();
    first.service.start().await;
    assert!(agent::wait_until(Duration::from_secs(20), || first.ready(&http)).await);
    let mut second = Replica::new(dir.path(), &pki, &db.url, 2, &refresh);
    second.service.start().await;
    assert!(agent::wait_until(Duration::from_secs(20), || second.ready(&http)).await);
    let mut unlabelled = Replica::new(
        dir.path(),
        &pki,
        &db.url,
        3,
        &[
            refresh[0].clone(),
            ("METRICS__PER_AGENT", "false".to_owned()),
        ],
    );
    unlabelled.service.start().await;
    assert!(agent::wait_until(Duration::from_secs(20), || unlabelled.ready(&http)).await);
    for (name, replica) in [("restarted", &first), ("other", &second)] {
        agent::wait_until(Duration::from_secs(10), || async {
            last_seen(&replica.metrics(&http).await.unwrap_or_default()).is_some()
        })
        .await;
        let text = replica.metrics(&http).await.unwrap_or_default();
        let seen = last_seen(&text)
            .unwrap_or_else(|| panic!("{name} replica does not show the silent agent:\n{text}"));
        // The table's last_seen is the commit time of the batch, a moment
        // after the gauge was set in the handler.
        assert!(
            (seen - before).abs() < 5.0,
            "{name} replica: last seen {seen}, the batch set {before}"
        );
    }
    let text = unlabelled.metrics(&http).await.expect("metrics");
    agent::wait_until(Duration::from_secs(10), || async {
        metric_value(
            &unlabelled.metrics(&http).await.unwrap_or_default(),
            "dcs_aggregator_agents{link=\"up\"}",
        ) == Some(1.0)
    })
    .await;
    let text = unlabelled.metrics(&http).await.unwrap_or(text);
    assert_eq!(
        metric_value(&text, "dcs_aggregator_agents{link=\"up\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(
        !text.contains("dcs_aggregator_agent_"),
        "metrics.per_agent = false still exports per-agent series:\n{text}"
    );
}
