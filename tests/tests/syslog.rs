//! The agent's syslog listeners end to end: real sockets (TCP, UDP, TLS) →
//! agent → SQLite → mutual TLS → aggregator → PostgreSQL, and what a SIGKILL
//! mid-stream loses (docs/GUARANTEES.md, "Syslog over TCP").

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dcs_tests::agent::{AgentProcess, free_port, metric_sample, start_agent, wait_until};
use dcs_tests::chaos::log_scenario;
use dcs_tests::site::Site;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::io::AsyncWriteExt;

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(90);

fn listener(value: Value) -> dcs_edge::syslog::SyslogConfig {
    serde_json::from_value(value).expect("syslog listener config")
}

fn local(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// How many rows hold each `message` text.
async fn messages(pool: &PgPool) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT payload->>'message', count(*) FROM records GROUP BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// Connects once the agent (started in the background) has bound `address`.
async fn connect(address: &str) -> tokio::net::TcpStream {
    for _ in 0..100 {
        if let Ok(stream) = tokio::net::TcpStream::connect(address).await {
            return stream;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {address}");
}

async fn rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM records")
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

#[tokio::test]
async fn messages_over_tcp_udp_and_tls_each_become_one_record_with_their_syslog_fields() {
    let site = Site::new().await;
    let (pki, db) = (&site.pki, &site.db);
    let mut config = site.agent_config();
    // The senders present the agent's own certificate on the TLS listener.
    let client = config.aggregator.tls_files().client_config().unwrap();
    let (tcp, udp, tls) = (free_port(), free_port(), free_port());
    config.syslog = vec![
        listener(
            json!({"name": "tcp", "protocol": "tcp", "listen": local(tcp), "stream": "syslog.${appname}"}),
        ),
        listener(json!({"name": "udp", "protocol": "udp", "listen": local(udp)})),
        listener(json!({
            "name": "tls", "protocol": "tls", "listen": local(tls),
            "tls": {"cert": pki.server_cert, "key": pki.server_key, "client_ca": pki.ca},
        })),
    ];
    let agent = start_agent(config).await;

    // TCP: octet-counted and LF-framed frames mixed on one connection.
    let mut stream = connect(&local(tcp)).await;
    let mut bytes = Vec::new();
    for i in 0..50 {
        let m = format!(
            "<165>1 2026-12-06T03:04:05.000001Z web1 nginx 42 ACC [x@1 k=\"v\"] tcp-octet-{i}"
        );
        bytes.extend(format!("{} {m}", m.len()).as_bytes());
        bytes.extend(format!("<13>Dec  6 03:04:05 web2 cron[7]: tcp-lf-{i}\n").as_bytes());
    }
    stream.write_all(&bytes).await.unwrap();
    stream.shutdown().await.unwrap();

    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..50 {
        let m = format!("<14>1 - host app - - - udp-{i}");
        socket.send_to(m.as_bytes(), local(udp)).await.unwrap();
        // Loopback drops nothing at this pace; the drop counter is tested below.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp_stream = connect(&local(tls)).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls_stream = connector.connect(name, tcp_stream).await.unwrap();
    for i in 0..50 {
        let m = format!("<14>1 - host app - - - tls-{i}");
        tls_stream
            .write_all(format!("{} {m}", m.len()).as_bytes())
            .await
            .unwrap();
    }
    tls_stream.shutdown().await.unwrap();

    assert!(
        wait_until(DELIVERY_TIMEOUT, || async { rows(&db.pool).await >= 200 }).await,
        "only {} of 200 records arrived",
        rows(&db.pool).await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = messages(&db.pool).await;
    assert_eq!(got.len(), 200, "{got:?}");
    assert!(got.values().all(|n| *n == 1), "a message arrived twice");
    for prefix in ["tcp-octet", "tcp-lf", "udp", "tls"] {
        for i in 0..50 {
            assert!(
                got.contains_key(&format!("{prefix}-{i}")),
                "{prefix}-{i} missing"
            );
        }
    }
    let (stream, ts, payload): (String, String, Value) = sqlx::query_as(
        "SELECT stream, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), payload \
         FROM records WHERE payload->>'message' = 'tcp-octet-7'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stream, "syslog.nginx");
    assert_eq!(ts, "2026-12-06T03:04:05.000001");
    assert_eq!(payload["host"], "web1");
    assert_eq!(payload["procid"], 42);
    assert_eq!(payload["msgid"], "ACC");
    assert_eq!(payload["facility"], "local4");
    assert_eq!(payload["severity"], "notice");
    assert_eq!(payload["structured_data"], json!({"x@1": {"k": "v"}}));
    assert!(
        payload["sender"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    for (listener, n) in [("tcp", 100.0), ("udp", 50.0), ("tls", 50.0)] {
        let accepted = metric_sample(
            &agent.url,
            "dcs_agent_syslog_messages_accepted_total",
            &[("listener", listener)],
        )
        .await;
        assert_eq!(accepted, Some(n), "{listener}");
    }
    assert_eq!(
        metric_sample(
            &agent.url,
            "dcs_agent_syslog_udp_drops_total",
            &[("listener", "udp")]
        )
        .await,
        Some(0.0)
    );
    agent.stop().await;
}

/// One RFC 5424 message of fixed length carrying its sequence number.
fn numbered(seq: usize) -> String {
    let m = format!(
        "<14>1 2026-12-06T00:00:00Z sender bench - - - seq-{seq:09} {}",
        "x".repeat(40)
    );
    format!("{} {m}", m.len())
}

#[tokio::test]
async fn a_sigkill_mid_stream_loses_at_most_the_documented_tcp_window_and_doubles_nothing() {
    const RECEIVE_BUFFER: usize = 64 << 10;
    let site = Site::new().await;
    let (db, dir) = (&site.db, &site.dir);
    let config = site.agent_config();
    let port = free_port();
    let syslog = format!(
        "[{{ protocol = \"tcp\", listen = \"127.0.0.1:{port}\", receive_buffer = {RECEIVE_BUFFER} }}]"
    );
    let log = dir.path().join("agent.log");
    let mut agent = AgentProcess::spawn_with(&config, &[("SYSLOG", syslog)], &log).await;

    // The sender: whole messages per write, counted once write() took them.
    let address: SocketAddr = local(port).parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(64 << 10).unwrap();
    let send_buffer = socket.send_buffer_size().unwrap() as usize;
    let mut stream = socket.connect(address).await.unwrap();
    let frame_len = numbered(0).len();
    let sender = tokio::spawn(async move {
        let mut sent = 0usize;
        loop {
            let chunk: String = (sent..sent + 50).map(numbered).collect();
            if stream.write_all(chunk.as_bytes()).await.is_err() {
                return sent;
            }
            sent += 50;
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.kill();
    let sent = tokio::time::timeout(Duration::from_secs(10), sender)
        .await
        .expect("the sender sees the connection fail")
        .unwrap();
    agent.start().await;

    assert!(
        wait_until(DELIVERY_TIMEOUT, || async {
            let before = rows(&db.pool).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            before > 0
                && rows(&db.pool).await == before
                && metric_sample(&agent.url, "dcs_agent_buffer_records", &[]).await == Some(0.0)
        })
        .await,
        "delivery did not settle"
    );
    let got = messages(&db.pool).await;
    let duplicated = got.values().filter(|n| **n > 1).count();
    let in_pg = (0..sent)
        .filter(|seq| {
            let text = numbered(*seq);
            let message = text.split_once(" - - - ").unwrap().1;
            got.contains_key(message)
        })
        .count();
    let lost = sent - in_pg;
    // docs/GUARANTEES.md: the sender's send buffer, the agent's receive
    // buffer (Linux doubles SO_RCVBUF), one read being committed and one
    // partial frame.
    let bound_bytes = send_buffer
        + 2 * RECEIVE_BUFFER
        + dcs_edge::syslog::READ_CHUNK
        + dcs_edge::syslog::DEFAULT_MAX_MESSAGE_BYTES as usize;
    let bound = bound_bytes.div_ceil(frame_len);
    let line = format!(
        "scenario=syslog-sigkill sent={sent} in_pg={in_pg} lost={lost} bound={bound} duplicated={duplicated}"
    );
    println!("{line}");
    log_scenario(&line);
    assert!(
        sent > 10_000,
        "the stream was too short to mean anything: {line}"
    );
    assert!(lost <= bound, "{line}");
    assert_eq!(duplicated, 0, "{line}");
}
