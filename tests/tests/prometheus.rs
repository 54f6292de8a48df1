//! A real Prometheus server scrapes a real edge agent and a real aggregator:
//! records go producer → agent → mutual TLS → aggregator → PostgreSQL, and the
//! counts must then read right through Prometheus's query API. The server also
//! loads compose/prometheus/alerts.yml, so every alert rule is evaluated
//! against the metrics the binaries really export.
//!
//! Needs Debian's `prometheus` package (`/usr/bin/prometheus`, or set
//! `DCS_TEST_PROMETHEUS`; scripts/check-observability.sh installs it);
//! without it the test prints SKIP and passes, and fails under `CI=true`.
//!
//! The agent and the aggregator run as processes of their own, so each
//! endpoint carries only its own tier's counters, counted from zero; every
//! query below still selects one scrape job.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dcs_tests::agent::{self, AgentProcess, push};
use dcs_tests::pg::TestDb;
use dcs_tests::pki::Pki;
use dcs_tests::process::{Service, free_port};
use serde_json::Value;

/// Records pushed through the pipeline.
const N: usize = 250;
/// How long Prometheus may take to show a settled pipeline (1 s scrapes).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_PROMETHEUS: &str = "/usr/bin/prometheus";
const TENANT: &str = "acme";
const AGENT: &str = "edge-1";

/// The repository's Prometheus files, loaded as they are.
fn compose_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("compose")
        .join(name)
}

fn prometheus_binary() -> Result<PathBuf, String> {
    let path = std::env::var_os("DCS_TEST_PROMETHEUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_PROMETHEUS.into());
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found (apt-get install prometheus, or set DCS_TEST_PROMETHEUS)",
            path.display()
        ))
    }
}

/// A Prometheus server on 127.0.0.1 and a free port, with its TSDB in a temp
/// dir. SIGKILLed and reaped on drop.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Writes `config` and starts the server; waits until `/-/ready` answers.
    /// A port taken between probe and bind is retried on another one.
    async fn start(binary: &Path, config: &str, http: &reqwest::Client) -> Prometheus {
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("dcs-prometheus-")
                .tempdir()
                .expect("temp dir");
            let config_path = dir.path().join("prometheus.yml");
            std::fs::write(&config_path, config).expect("write prometheus.yml");
            let data = dir.path().join("data");
            let log = dir.path().join("prometheus.log");
            let log_file = std::fs::File::create(&log).expect("log file");
            let port = free_port();
            let child = Command::new(binary)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!("--storage.tsdb.path={}", data.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .current_dir(dir.path())
                .env_remove("HTTP_PROXY")
                .env_remove("http_proxy")
                .env_remove("HTTPS_PROXY")
                .env_remove("https_proxy")
                .env_remove("ALL_PROXY")
                .env_remove("all_proxy")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("log"))
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
            let mut server = Prometheus {
                child,
                url: format!("http://127.0.0.1:{port}"),
                log,
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let ready = http
                    .get(format!("{}/-/ready", server.url))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ready {
                    return server;
                }
                if let Ok(Some(status)) = server.child.try_wait() {
                    last_log = server.log_tail();
                    assert!(
                        last_log.contains("address already in use"),
                        "prometheus exited with {status} at start; log:\n{last_log}"
                    );
                    break; // port race: try another port
                }
                assert!(
                    Instant::now() < deadline,
                    "prometheus not ready within 30 s; log:\n{}",
                    server.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("prometheus could not bind a free port in 3 attempts; log:\n{last_log}");
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// GET `path` on the HTTP API; the `data` of a `"status": "success"` answer.
    async fn api(&self, http: &reqwest::Client, path: &str) -> Result<Value, String> {
        let response = http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("GET {path}: body: {e}"))?;
        if body["status"] != "success" {
            return Err(format!("GET {path}: {body}"));
        }
        Ok(body["data"].clone())
    }

    /// The instant vector of `promql`, as `(labels, value)` pairs.
    async fn query(
        &self,
        http: &reqwest::Client,
        promql: &str,
    ) -> Result<Vec<(Value, f64)>, String> {
        let data = self
            .api(
                http,
                &format!("/api/v1/query?query={}", percent_encode(promql)),
            )
            .await?;
        let result = data["result"]
            .as_array()
            .ok_or_else(|| format!("{promql}: not a vector: {data}"))?;
        result
            .iter()
            .map(|sample| {
                let value = sample["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .ok_or_else(|| format!("{promql}: bad sample {sample}"))?;
                Ok((sample["metric"].clone(), value))
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `dcs_*` metric names that a file mentions.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("dcs_") {
        let boundary = rest[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        // `dcs_aggregator_agent_*` in prose is a family, not a name.
        if boundary && tail[..end].len() > "dcs_".len() && !tail[..end].ends_with('_') {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end.max(1)..];
    }
    names.sort();
    names.dedup();
    names
}

/// One condition the settled pipeline must show through Prometheus.
struct Expect {
    promql: String,
    what: &'static str,
    ok: fn(&[(Value, f64)]) -> bool,
}

fn single(v: &[(Value, f64)], want: f64) -> bool {
    v.len() == 1 && v[0].1 == want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_both_tiers_and_sees_every_record() {
    // Its HTTP clients need the process's TLS provider; run alone (one
    // test per process, as nextest does) nothing else installs it.
    dcs_shared::tls::install_crypto_provider();
    let binary = match prometheus_binary() {
        Ok(path) => path,
        Err(reason) => {
            dcs_tests::skip(
                "prometheus_scrapes_both_tiers_and_sees_every_record",
                &reason,
            );
            return;
        }
    };

    // --- The pipeline: aggregator (with its admin listener) and one agent,
    // each a process of its own: counters are process-wide, and this test
    // shares its process with every other end-to-end test.
    let pki = Pki::new();
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agg_port = free_port();
    let mut aggregator = Service::aggregator(
        [
            ("LISTEN__ADDRESS", format!("127.0.0.1:{agg_port}")),
            ("ADMIN__ADDRESS", admin.to_string()),
            ("TLS__CA", pki.ca.display().to_string()),
            ("TLS__CERT", pki.server_cert.display().to_string()),
            ("TLS__KEY", pki.server_key.display().to_string()),
            ("DATABASE__URL", db.url.clone()),
            ("DATABASE__MIGRATE_ON_START", "false".into()),
            ("LOG__FORMAT", "json".into()),
        ],
        agg_port,
        &dir.path().join("aggregator.log"),
    );
    aggregator.start().await;
    let mut agent = AgentProcess::spawn(
        &agent::test_config(
            &pki.agent(TENANT, AGENT),
            &format!("https://localhost:{agg_port}"),
            &dir.path().join("buffer.db"),
        ),
        &dir.path().join("agent.log"),
    )
    .await;
    let agent_addr = agent.url.trim_start_matches("http://").to_owned();

    dcs_shared::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");

    // Both endpoints answer before Prometheus is pointed at them, so a
    // missing endpoint fails here with a clear message.
    let agent_metrics = format!("{}/metrics", agent.url);
    let admin_metrics = format!("http://{admin}/metrics");
    for url in [&agent_metrics, &admin_metrics] {
        let ok = agent::wait_until(Duration::from_secs(30), || async {
            http.get(url.as_str())
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(ok, "{url} did not answer 200 within 30 s");
    }

    // --- Prometheus: 1 s scrapes of both tiers, the repository's alert rules.
    let alerts = compose_file("prometheus/alerts.yml");
    assert!(alerts.is_file(), "{} missing", alerts.display());
    let config = format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {alerts}
scrape_configs:
  - job_name: dcs-agent
    static_configs:
      - targets: ["{agent_addr}"]
        labels:
          tenant: {TENANT}
          agent: {AGENT}
  - job_name: dcs-aggregator
    static_configs:
      - targets: ["{admin}"]
"#,
        alerts = serde_json::to_string(&alerts.display().to_string()).unwrap(),
        agent_addr = agent_addr,
    );
    let prometheus = Prometheus::start(&binary, &config, &http).await;

    // --- Records through the pipeline, in several requests.
    let chunk = N / 5;
    for start in (0..N).step_by(chunk) {
        let end = (start + chunk).min(N);
        let r = push(
            &http,
            &agent.url,
            "application/x-ndjson",
            agent::ndjson("prom.test", "p", start..end),
        )
        .await;
        assert_eq!(r.status(), 200, "push {start}..{end}");
    }
    agent::wait_until(SETTLE_TIMEOUT, || async {
        db.count("records").await >= N as i64
    })
    .await;
    assert_eq!(db.count("records").await, N as i64, "rows in PostgreSQL");

    // --- What Prometheus must show once the pipeline has settled.
    let expectations = vec![
        Expect {
            promql: r#"sum(dcs_agent_records_received_total{job="dcs-agent"})"#.into(),
            what: "records received by the agent, all results",
            ok: |v| single(v, N as f64),
        },
        Expect {
            promql: r#"sum(dcs_agent_records_received_total{job="dcs-agent", result="accepted"})"#
                .into(),
            what: "records accepted by the agent",
            ok: |v| single(v, N as f64),
        },
        Expect {
            promql: r#"max(dcs_agent_records_delivered_total{job="dcs-agent"})"#.into(),
            what: "records the agent delivered",
            ok: |v| single(v, N as f64),
        },
        Expect {
            promql: r#"max(dcs_aggregator_records_ingested_total{job="dcs-aggregator"})"#.into(),
            what: "records the aggregator wrote",
            ok: |v| single(v, N as f64),
        },
        Expect {
            promql: r#"max(dcs_agent_buffer_records{job="dcs-agent"})"#.into(),
            what: "records left in the agent's buffer",
            ok: |v| single(v, 0.0),
        },
        Expect {
            promql: r#"max(dcs_agent_link_up{job="dcs-agent"})"#.into(),
            what: "the agent's link",
            ok: |v| single(v, 1.0),
        },
        Expect {
            promql: format!(
                r#"dcs_aggregator_agent_backlog_records{{job="dcs-aggregator", tenant="{TENANT}", agent=~"({TENANT}/)?{AGENT}"}}"#
            ),
            what: "the aggregator's backlog gauge for this agent",
            ok: |v| !v.is_empty(),
        },
        Expect {
            // Seconds, not milliseconds: a recent Unix time.
            promql: r#"time() - max(dcs_aggregator_agent_last_seen_timestamp_seconds{job="dcs-aggregator"})"#.into(),
            what: "seconds since the aggregator last saw the agent",
            ok: |v| v.len() == 1 && (-5.0..300.0).contains(&v[0].1),
        },
        Expect {
            promql: r#"time() - max(dcs_agent_last_delivery_timestamp_seconds{job="dcs-agent"})"#
                .into(),
            what: "seconds since the agent's last delivery",
            ok: |v| v.len() == 1 && (-5.0..300.0).contains(&v[0].1),
        },
        Expect {
            promql: r#"max(dcs_aggregator_db_write_duration_seconds_count{job="dcs-aggregator"})"#
                .into(),
            what: "PostgreSQL writes timed",
            ok: |v| v.len() == 1 && v[0].1 >= 1.0,
        },
        Expect {
            // A healthy pipeline raises none of the alerts that watch the
            // agents (DcsAggregatorDbWriteLatencyHigh is left out: it depends
            // on this machine's load, not on correctness).
            promql: r#"ALERTS{alertname=~"DcsAgent.*|DcsAggregator5xxRate|DcsAggregatorDown"}"#
                .into(),
            what: "alerts pending or firing",
            ok: |v| v.is_empty(),
        },
    ];

    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut report;
    loop {
        report = Vec::new();
        let mut all_ok = true;
        for e in &expectations {
            match prometheus.query(&http, &e.promql).await {
                Ok(v) => {
                    let ok = (e.ok)(&v);
                    all_ok &= ok;
                    let shown: Vec<String> = v.iter().map(|(m, x)| format!("{m} => {x}")).collect();
                    report.push(format!(
                        "{} {}: {} = [{}]",
                        if ok { "ok  " } else { "FAIL" },
                        e.what,
                        e.promql,
                        shown.join(", ")
                    ));
                }
                Err(error) => {
                    all_ok = false;
                    report.push(format!("FAIL {}: {}: {error}", e.what, e.promql));
                }
            }
        }
        if all_ok {
            break;
        }
        if Instant::now() >= deadline {
            let targets = prometheus
                .api(&http, "/api/v1/targets")
                .await
                .unwrap_or_else(Value::String);
            panic!(
                "Prometheus did not show the settled pipeline within {SETTLE_TIMEOUT:?}:\n{}\n\ntargets: {targets}\n\nprometheus log:\n{}",
                report.join("\n"),
                prometheus.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("{}", report.join("\n"));

    // --- Every alert rule evaluates without error against the real metrics
    // (a bad vector match, for one, only shows at evaluation time).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let groups = prometheus
            .api(&http, "/api/v1/rules?type=alert")
            .await
            .expect("rules API");
        let rules: Vec<&Value> = groups["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().expect("rules").iter())
            .collect();
        let names: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
        for wanted in [
            "DcsAgentLinkDown",
            "DcsAgentBacklogOld",
            "DcsAgentBufferNearlyFull",
            "DcsAgentDeadLetters",
            "DcsAgentDroppingRecords",
            "DcsAggregator5xxRate",
            "DcsAggregatorDbWriteLatencyHigh",
            "DcsAgentSilent",
            "DcsAgentBacklogReportedOld",
        ] {
            assert!(
                names.contains(&wanted),
                "alert {wanted} not loaded: {names:?}"
            );
        }
        let broken: Vec<String> = rules
            .iter()
            .filter(|r| r["health"] == "err")
            .map(|r| format!("{}: {}", r["name"], r["lastError"]))
            .collect();
        assert!(
            broken.is_empty(),
            "alert rules fail to evaluate: {broken:#?}"
        );
        if rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alert rules not evaluated within 30 s: {rules:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // --- The metrics the alerts and the dashboard use are the ones the
    // binaries export. A few count only failures and appear once one happens.
    let exported = prometheus
        .api(&http, "/api/v1/label/__name__/values")
        .await
        .expect("metric names");
    let exported: Vec<&str> = exported
        .as_array()
        .expect("names")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let only_after_failures = [
        "dcs_aggregator_tls_handshake_failures_total",
        "dcs_agent_delivery_retries_total",
        "dcs_agent_records_dropped_total",
        "dcs_aggregator_records_duplicate_total",
    ];
    let mut used = Vec::new();
    for file in ["prometheus/alerts.yml", "grafana/dashboards/dcs-fleet.json"] {
        let path = compose_file(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        used.extend(metric_names(&text));
    }
    used.sort();
    used.dedup();
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| {
            // A histogram's base name (in a description) is exported as
            // `_bucket`, `_sum` and `_count`.
            !exported.contains(&name.as_str())
                && !exported.contains(&format!("{name}_count").as_str())
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("used by alerts/dashboard, not exported in this run: {missing:?}");
    }
    let unexpected: Vec<&&String> = missing
        .iter()
        .filter(|name| !only_after_failures.contains(&name.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "compose/ uses metrics the binaries do not export: {unexpected:?}\nexported: {exported:?}"
    );

    drop(prometheus);
    assert!(agent.terminate(), "dcs-edge did not exit cleanly");
    assert!(
        aggregator.terminate(),
        "dcs-aggregator did not exit cleanly"
    );
}
