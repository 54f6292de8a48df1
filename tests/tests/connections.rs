//! The aggregator's connection lifecycle, as agents and hostile clients see
//! it: connections end gracefully past `limits.max_connection_age` and when
//! idle, stopping fails `/ready` before it refuses work, and each listener
//! caps connections (in total and per address) and slow bodies, counting
//! every refusal by reason.
//!
//! Metrics are process-wide and these tests run in parallel, so they check
//! that a counter grew, never its exact value.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dcs_shared::wire::{self, OutRecord};
use dcs_tests::aggregator::{RunningPlatform, agent_client, post_batch, start_platform_with};
use dcs_tests::http::Fetch as _;
use dcs_tests::pg::TestDb;
use dcs_tests::pki::{AgentCert, Pki};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use uuid::Uuid;

struct World {
    db: TestDb,
    _pki: Pki,
    cert: AgentCert,
    platform: RunningPlatform,
    http: reqwest::Client,
}

impl World {
    async fn start(adjust: impl FnOnce(&mut dcs_aggregator::Config)) -> World {
        let db = TestDb::new().await;
        let pki = Pki::new();
        let platform = start_platform_with(&pki, &db.url, adjust).await;
        let cert = pki.agent("acme", "edge-01");
        World {
            db,
            _pki: pki,
            cert,
            platform,
            http: reqwest::Client::new(),
        }
    }

    /// The value of one series on the admin listener's `/metrics`, 0 if absent.
    async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.platform.admin_url))
            .fetch_text()
            .await
    }

    /// A TLS connection with the agent's certificate, handshake done; `None`
    /// if the server closed it before or during the handshake.
    async fn connect(&self) -> Option<TlsStream<TcpStream>> {
        let mut config =
            dcs_shared::tls::client_config(&self.cert.ca, &self.cert.cert, &self.cert.key)
                .expect("agent TLS config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(self.platform.aggregator.addr)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
        let mut stream = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .ok()?;
        // TLS 1.3 finishes the client's side before the server has checked
        // its certificate: a refused connection shows up as EOF on read.
        match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut [0u8; 1])).await {
            Ok(Ok(0) | Err(_)) => None,
            _ => Some(stream),
        }
    }
}

fn batch(first_seq: i64) -> Vec<u8> {
    let ids: Vec<String> = (0..2).map(|i| format!("conn-{}", first_seq + i)).collect();
    let records = ids.iter().enumerate().map(|(i, id)| OutRecord {
        seq: first_seq + i as i64,
        id,
        stream: "plant.sensors",
        ts_us: 1_700_000_000_000_000,
        payload: r#"{"n":1}"#,
        received: None,
    });
    wire::encode_batch(Uuid::now_v7(), None, records, 1)
}

async fn post(client: &reqwest::Client, platform: &RunningPlatform, seq: i64) -> StatusCode {
    post_batch(
        client,
        &platform.aggregator.endpoint(wire::BATCHES_PATH),
        batch(seq),
    )
    .await
    .status()
}

#[tokio::test]
async fn close_and_refusal_reasons_are_exported_at_zero_from_the_start() {
    let world = World::start(|_| {}).await;
    let text = world.metrics().await;
    for reason in ["max_age", "drain", "idle", "client", "error"] {
        let series = format!("dcs_aggregator_connections_closed_total{{reason=\"{reason}\"}}");
        assert!(text.contains(&series), "{series} missing");
    }
    for listener in ["agents", "platform"] {
        for reason in [
            "max_connections",
            "per_address",
            "handshake_timeout",
            "header_timeout",
            "body_timeout",
            "body_rate",
        ] {
            let series = format!(
                "dcs_aggregator_connections_refused_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
            );
            assert!(text.contains(&series), "{series} missing");
        }
    }
}

#[tokio::test]
async fn a_connection_past_its_max_age_is_closed_gracefully_and_batches_go_on() {
    let world = World::start(|c| {
        c.limits.max_connection_age = Duration::from_secs(1);
        c.limits.max_connection_age_grace = Duration::from_secs(1);
    })
    .await;
    let series = r#"dcs_aggregator_connections_closed_total{reason="max_age"}"#;
    let before = world.metric(series).await;
    let client = agent_client(&world.cert);
    let mut seq = 1;
    // Batches every 200 ms for 3 s: the connection reaches its age (1 s
    // ±10 %) at least twice, and no batch fails because of it.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(post(&client, &world.platform, seq).await, StatusCode::OK);
        seq += 2;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let closed = world.metric(series).await - before;
    assert!(closed >= 2.0, "{closed} connections closed for max age");
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let world = World::start(|c| {
        c.limits.max_connection_age = Duration::ZERO;
        c.connections.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let series = r#"dcs_aggregator_connections_closed_total{reason="idle"}"#;
    let before = world.metric(series).await;
    let client = agent_client(&world.cert);
    assert_eq!(post(&client, &world.platform, 1).await, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(world.metric(series).await > before, "no idle close counted");
    // The client reconnects for the next batch.
    assert_eq!(post(&client, &world.platform, 3).await, StatusCode::OK);
}

#[tokio::test]
async fn stopping_fails_readiness_at_once_and_still_takes_batches_during_the_drain_delay() {
    let world = World::start(|c| {
        c.shutdown.drain_delay = Duration::from_secs(2);
        c.shutdown.grace = Duration::from_secs(5);
    })
    .await;
    let client = agent_client(&world.cert);
    assert_eq!(post(&client, &world.platform, 1).await, StatusCode::OK);
    let ready = format!("{}/ready", world.platform.admin_url);
    assert_eq!(
        world.http.get(&ready).send().await.expect("ready").status(),
        StatusCode::OK
    );

    let World {
        db: _db,
        _pki: pki,
        cert: _,
        platform,
        http,
    } = world;
    let RunningPlatform {
        aggregator,
        admin_url: _,
        url: _,
        client: _,
    } = platform;
    let agg_url = aggregator.endpoint(wire::BATCHES_PATH);
    let started = Instant::now();
    let stopping = tokio::spawn(aggregator.stop());

    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = http.get(&ready).send().await.expect("ready while draining");
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = answer.json().await.expect("JSON");
    assert_eq!(body, serde_json::json!({ "status": "draining" }));

    // Still accepted, on the existing connection and on a new one.
    let batch_status = |client: reqwest::Client, seq: i64| {
        let url = agg_url.clone();
        async move { post_batch(&client, &url, batch(seq)).await.status() }
    };
    assert_eq!(batch_status(client.clone(), 3).await, StatusCode::OK);
    assert_eq!(
        batch_status(agent_client(&pki.agent("acme", "edge-02")), 1).await,
        StatusCode::OK
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    stopping.await.expect("aggregator stopped");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "stopped after {took:?}"
    );
}

#[tokio::test]
async fn connections_past_the_listener_cap_are_refused_and_counted() {
    let world = World::start(|c| {
        c.connections.max_connections = 2;
        c.connections.max_connections_per_address = 0;
    })
    .await;
    let series =
        r#"dcs_aggregator_connections_refused_total{listener="agents",reason="max_connections"}"#;
    let before = world.metric(series).await;
    let first = world.connect().await.expect("first connection");
    let second = world.connect().await.expect("second connection");
    assert!(world.connect().await.is_none(), "a third connection got in");
    assert!(world.metric(series).await > before);
    drop((first, second));
    // Slots are given back when connections end.
    let mut again = None;
    for _ in 0..20 {
        again = world.connect().await;
        if again.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "no slot came back");
}

#[tokio::test]
async fn connections_past_the_per_address_cap_are_refused_and_counted() {
    let world = World::start(|c| {
        c.connections.max_connections = 100;
        c.connections.max_connections_per_address = 1;
    })
    .await;
    let series =
        r#"dcs_aggregator_connections_refused_total{listener="agents",reason="per_address"}"#;
    let before = world.metric(series).await;
    let _first = world.connect().await.expect("first connection");
    assert!(
        world.connect().await.is_none(),
        "a second connection got in"
    );
    assert!(world.metric(series).await > before);
}

#[tokio::test]
async fn a_body_slower_than_the_minimum_rate_gets_408_before_the_request_timeout() {
    let world = World::start(|c| {
        c.connections.min_body_rate = dcs_shared::config::ByteSize(10 << 10);
    })
    .await;
    let series =
        r#"dcs_aggregator_connections_refused_total{listener="agents",reason="body_rate"}"#;
    let before = world.metric(series).await;
    let mut stream = world.connect().await.expect("connection");
    let length = 1 << 20;
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-encoding: gzip\r\ncontent-length: {length}\r\n\r\n",
        wire::BATCHES_PATH
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let started = Instant::now();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let trickle = tokio::spawn(async move {
        // 100 bytes every 100 ms: 1 KB/s, a tenth of the minimum.
        loop {
            if writer.write_all(&[0u8; 100]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    while !reply.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(20), reader.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => reply.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    trickle.abort();
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let took = started.elapsed();
    // Five seconds of grace, then the first byte that is late.
    assert!(took < Duration::from_secs(10), "408 after {took:?}");
    assert!(world.metric(series).await > before);
}

#[tokio::test]
async fn an_agent_counts_no_retry_when_the_aggregator_closes_its_connections_gracefully() {
    let world = World::start(|c| {
        c.limits.max_connection_age = Duration::from_secs(1);
        c.limits.max_connection_age_grace = Duration::from_secs(2);
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = dcs_tests::agent::test_config(
        &world.cert,
        &world.platform.aggregator.url,
        &dir.path().join("buffer.db"),
    );
    config.batch.linger = Duration::from_millis(20);
    let agent = dcs_tests::agent::start_agent(config).await;
    let http = reqwest::Client::new();
    // Pushes every 50 ms for 4 s: batches meet connections at every stage
    // of their graceful close.
    let until = Instant::now() + Duration::from_secs(4);
    let mut n = 0;
    while Instant::now() < until {
        let body = dcs_tests::agent::ndjson("plant.sensors", "graceful", n..n + 5);
        let answer = dcs_tests::agent::push(&http, &agent.url, "application/x-ndjson", body).await;
        assert!(answer.status().is_success());
        n += 5;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained = dcs_tests::agent::wait_until(Duration::from_secs(20), || async {
        dcs_tests::agent::status(&agent.url).await["buffer"]["records"] == 0
    })
    .await;
    assert!(drained, "the agent's buffer did not drain");
    let status = dcs_tests::agent::status(&agent.url).await;
    assert_eq!(status["delivery"]["retries"], 0, "{status}");
    assert_ne!(status["delivery"]["link"], "down", "{status}");
    let stored = world.db.count("records").await;
    assert_eq!(stored, n as i64);
    agent.stop().await;
}
