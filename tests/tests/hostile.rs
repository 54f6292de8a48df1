//! Hostile input against real servers on 127.0.0.1.
//!
//! The aggregator gets garbage, truncated and mistyped batches, foreign
//! encodings, gzip bombs, oversized headers, slow clients and sockets that
//! never speak TLS, all from a client holding a valid agent certificate. The
//! agent gets garbage, truncated NDJSON, invalid UTF-8, a 100 MB body,
//! deeply nested JSON, gzip and zstd bombs and broken compressed streams on
//! its local API, and the same plus OTLP decoder bombs on `/v1/logs`.
//!
//! Every refusal must be a 4xx with the shared JSON error body (or, for what
//! never becomes an HTTP request, a closed connection), must write nothing,
//! and must leave the server answering the next valid request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dcs_shared::record::MAX_NESTING_DEPTH;
use dcs_shared::wire::{self, BatchAck, ErrorBody, OutRecord};
use dcs_tests::agent::{self, AgentProcess, RunningAgent, push, start_agent};
use dcs_tests::aggregator::{
    RunningAggregator, agent_client, gzip_bomb, gzip_json, start_aggregator_with,
};
use dcs_tests::pg::TestDb;
use dcs_tests::pki::{AgentCert, Pki};
use dcs_tests::process::Service;
use reqwest::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use uuid::Uuid;

/// Seeds of the random bodies; a failure names its seed and size.
const SEEDS: [u64; 4] = [1, 2, 3, 0x00dc_5bad];
/// Slack on every timing assertion: CI machines are slow and busy.
const SLACK: Duration = Duration::from_millis(1500);

// ---------------------------------------------------------------------------
// Aggregator harness

/// An in-process aggregator on a fresh database, and an agent's mTLS client.
struct Aggregator {
    db: TestDb,
    _pki: Pki,
    cert: AgentCert,
    agg: RunningAggregator,
    client: reqwest::Client,
    /// Records written so far by the valid batches of [`Aggregator::assert_unharmed`].
    written: i64,
}

impl Aggregator {
    async fn start(adjust: impl FnOnce(&mut dcs_aggregator::Config)) -> Aggregator {
        let db = TestDb::new().await;
        let pki = Pki::new();
        let agg = start_aggregator_with(&pki, &db.url, adjust).await;
        let cert = pki.agent("acme", "edge-01");
        let client = agent_client(&cert);
        Aggregator {
            db,
            _pki: pki,
            cert,
            agg,
            client,
            written: 0,
        }
    }

    async fn post(&self, body: Vec<u8>, encoding: Option<&str>) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.agg.endpoint(wire::BATCHES_PATH))
            .header("content-type", "application/json")
            .body(body);
        if let Some(encoding) = encoding {
            request = request.header("content-encoding", encoding);
        }
        request
            .send()
            .await
            .expect("request reaches the aggregator")
    }

    /// Posts `body` as a gzip batch and expects a refusal with one of
    /// `allowed` statuses; then checks that nothing was written and that the
    /// server still takes a valid batch.
    async fn check_refused(
        &mut self,
        what: &str,
        body: Vec<u8>,
        allowed: &[StatusCode],
    ) -> ErrorBody {
        let response = self.post(body, Some("gzip")).await;
        let error = expect_error_body(what, response, allowed).await;
        self.assert_unharmed(what).await;
        error
    }

    /// Nothing was written since the last check, and a valid batch is still
    /// stored.
    async fn assert_unharmed(&mut self, what: &str) {
        assert_eq!(
            self.db.count("records").await,
            self.written,
            "{what}: the refused request wrote records"
        );
        let response = self.post(valid_batch(), Some("gzip")).await;
        let status = response.status();
        let body = response.bytes().await.expect("ack body");
        assert_eq!(
            status,
            StatusCode::OK,
            "{what}: a valid batch afterwards failed: {}",
            String::from_utf8_lossy(&body)
        );
        let ack: BatchAck = serde_json::from_slice(&body).expect("BatchAck");
        assert_eq!((ack.accepted, ack.duplicates), (2, 0), "{what}");
        self.written += 2;
    }

    /// A raw TLS connection with the agent's certificate, speaking HTTP/1.1.
    async fn connect_tls(&self) -> TlsStream<TcpStream> {
        let mut config =
            dcs_shared::tls::client_config(&self.cert.ca, &self.cert.cert, &self.cert.key)
                .expect("agent TLS config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(self.agg.addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("TLS handshake with a valid agent certificate")
    }
}

/// A valid two-record batch under a fresh epoch.
fn valid_batch() -> Vec<u8> {
    let records = [
        OutRecord {
            seq: 1,
            id: "ok-1",
            stream: "plant.sensors",
            ts_us: 1_700_000_000_000_000,
            payload: r#"{"n":1}"#,
            received: None,
        },
        OutRecord {
            seq: 2,
            id: "ok-2",
            stream: "plant.sensors",
            ts_us: 1_700_000_000_000_001,
            payload: r#"{"n":2}"#,
            received: None,
        },
    ];
    wire::encode_batch(Uuid::now_v7(), None, records, 1)
}

/// The decompressed JSON of a batch with one record carrying `payload`.
fn batch_json(payload: &str) -> Vec<u8> {
    let body = wire::encode_batch(
        Uuid::now_v7(),
        None,
        [OutRecord {
            seq: 1,
            id: "hostile",
            stream: "plant.sensors",
            ts_us: 1_700_000_000_000_000,
            payload,
            received: None,
        }],
        1,
    );
    wire::gunzip_limited(&body, usize::MAX).expect("gunzip own batch")
}

/// Asserts a refusal with one of `allowed` statuses and an `ErrorBody`.
async fn expect_error_body(
    what: &str,
    response: reqwest::Response,
    allowed: &[StatusCode],
) -> ErrorBody {
    let status = response.status();
    let body = response.bytes().await.expect("error body");
    let text = String::from_utf8_lossy(&body);
    assert!(
        allowed.contains(&status),
        "{what}: expected one of {allowed:?}, got {status}: {text}"
    );
    let error: ErrorBody = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{what}: not an ErrorBody ({e}): {text}"));
    assert!(!error.message.is_empty(), "{what}: empty message");
    error
}

fn random_bytes(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.u8(..)).collect()
}

// ---------------------------------------------------------------------------
// Raw connections

/// What came back on a raw HTTP/1.1 connection.
#[derive(Debug)]
struct RawReply {
    /// The status of the response, if one arrived.
    status: Option<u16>,
    /// The bytes after the response head.
    body: Vec<u8>,
    /// When the first byte of the response arrived, from the start of reading.
    replied_after: Option<Duration>,
    /// When the server closed (or reset) the connection, if it did in time.
    closed_after: Option<Duration>,
}

impl RawReply {
    fn error_body(&self) -> ErrorBody {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not an ErrorBody ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Reads whatever the server sends until it closes the connection or `wait`
/// passes.
async fn read_reply(mut reader: impl AsyncRead + Unpin, wait: Duration) -> RawReply {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + wait;
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut replied_after = None;
    let mut closed_after = None;
    loop {
        match tokio::time::timeout_at(deadline, reader.read(&mut chunk)).await {
            Err(_) => break,
            Ok(Ok(0) | Err(_)) => {
                closed_after = Some(start.elapsed());
                break;
            }
            Ok(Ok(n)) => {
                replied_after.get_or_insert_with(|| start.elapsed());
                received.extend_from_slice(&chunk[..n]);
            }
        }
    }
    let status = received
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|rest| std::str::from_utf8(rest.get(..3)?).ok())
        .and_then(|code| code.parse().ok());
    let body = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| received[i + 4..].to_vec())
        .unwrap_or_default();
    RawReply {
        status,
        body,
        replied_after,
        closed_after,
    }
}

/// Sends `head` and then `body` in `piece`-sized writes `pace` apart, while
/// reading the reply for at most `wait`. Write errors end the sending (the
/// server may close the connection before it has read everything).
async fn exchange<S>(
    stream: S,
    head: Vec<u8>,
    body: Vec<u8>,
    piece: usize,
    pace: Duration,
    wait: Duration,
) -> RawReply
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, mut writer) = tokio::io::split(stream);
    let sending = tokio::spawn(async move {
        writer.write_all(&head).await?;
        writer.flush().await?;
        for part in body.chunks(piece.max(1)) {
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
            writer.write_all(part).await?;
            writer.flush().await?;
        }
        // Keep the write side open: a half-close could end the exchange
        // before the server answers.
        std::future::pending::<()>().await;
        std::io::Result::Ok(writer)
    });
    let reply = read_reply(reader, wait).await;
    sending.abort();
    reply
}

/// An HTTP/1.1 request head for a batch of `length` bytes, with `extra`
/// header lines.
fn batch_head(length: usize, extra: &str) -> Vec<u8> {
    format!(
        "POST {} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-encoding: gzip\r\ncontent-length: {length}\r\n{extra}connection: close\r\n\r\n",
        wire::BATCHES_PATH
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------
// Aggregator: bodies

#[tokio::test]
async fn random_bytes_as_a_batch_body_are_refused_with_400_and_an_error_body() {
    let mut a = Aggregator::start(|_| {}).await;
    for seed in SEEDS {
        let mut rng = fastrand::Rng::with_seed(seed);
        for len in [0, 1, 18, rng.usize(19..4096), 65_536] {
            let mut body = random_bytes(&mut rng, len);
            // About half start like gzip, so the decoder gets past the magic
            // bytes into the header flags and the deflate stream.
            if len >= 10 && rng.bool() {
                body[..4].copy_from_slice(&[0x1f, 0x8b, 0x08, rng.u8(..)]);
            }
            let what = format!("seed {seed}, {len} random bytes");
            let error = a
                .check_refused(&what, body, &[StatusCode::BAD_REQUEST])
                .await;
            assert_eq!(error.error, "malformed_batch", "{what}: {error:?}");
        }
    }
}

#[tokio::test]
async fn a_gzip_batch_cut_short_anywhere_is_refused_with_400() {
    let mut a = Aggregator::start(|_| {}).await;
    let whole = valid_batch();
    let len = whole.len();
    // In the 10-byte header, in the deflate stream, and in the 8-byte trailer
    // (CRC32 and size).
    for cut in [
        1,
        2,
        9,
        10,
        11,
        20,
        len / 3,
        len / 2,
        len - 9,
        len - 8,
        len - 5,
        len - 1,
    ] {
        let what = format!("gzip cut at {cut} of {len} bytes");
        let error = a
            .check_refused(&what, whole[..cut].to_vec(), &[StatusCode::BAD_REQUEST])
            .await;
        assert_eq!(error.error, "malformed_batch", "{what}: {error:?}");
    }
}

#[tokio::test]
async fn valid_gzip_of_garbage_or_truncated_or_mistyped_json_is_refused_with_400_or_422() {
    let mut a = Aggregator::start(|_| {}).await;
    let bad = StatusCode::BAD_REQUEST;
    let invalid = StatusCode::UNPROCESSABLE_ENTITY;

    for seed in SEEDS {
        let mut rng = fastrand::Rng::with_seed(seed);
        let len = rng.usize(1..65_536);
        let what = format!("gzip of {len} random bytes, seed {seed}");
        let error = a
            .check_refused(&what, gzip_json(&random_bytes(&mut rng, len)), &[bad])
            .await;
        assert_eq!(error.error, "malformed_batch", "{what}");
    }

    let json = batch_json(r#"{"k":[1,2,{"x":"y"}]}"#);
    for cut in [0, 1, 7, json.len() / 2, json.len() - 3, json.len() - 1] {
        let what = format!("gzip of the batch JSON cut at {cut} of {}", json.len());
        let error = a
            .check_refused(&what, gzip_json(&json[..cut]), &[bad])
            .await;
        assert_eq!(error.error, "malformed_batch", "{what}");
    }

    let epoch = Uuid::now_v7();
    let record = |fields: &str| {
        format!(r#"{{"v":1,"epoch":"{epoch}","records":[{{{fields}}}]}}"#).into_bytes()
    };
    let ok = r#""seq":1,"id":"a","stream":"s","ts":0,"payload":{}"#;
    let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
        ("null", b"null".to_vec(), bad, "malformed_batch"),
        ("an array", b"[]".to_vec(), bad, "malformed_batch"),
        ("a string", br#""batch""#.to_vec(), bad, "malformed_batch"),
        (
            "v as a string",
            format!(r#"{{"v":"1","epoch":"{epoch}","records":[]}}"#).into_bytes(),
            bad,
            "malformed_batch",
        ),
        (
            "v past u32",
            format!(r#"{{"v":4294967297,"epoch":"{epoch}","records":[]}}"#).into_bytes(),
            bad,
            "malformed_batch",
        ),
        (
            "a future version",
            format!(r#"{{"v":2,"epoch":"{epoch}","records":[]}}"#).into_bytes(),
            bad,
            "unsupported_version",
        ),
        (
            "epoch not a UUID",
            br#"{"v":1,"epoch":"yesterday","records":[]}"#.to_vec(),
            bad,
            "malformed_batch",
        ),
        (
            "records an object",
            format!(r#"{{"v":1,"epoch":"{epoch}","records":{{}}}}"#).into_bytes(),
            bad,
            "malformed_batch",
        ),
        (
            "backlog with a negative count",
            format!(
                r#"{{"v":1,"epoch":"{epoch}","backlog":{{"records":-1,"bytes":0,"oldest_age_secs":0,"dropped_total":0}},"records":[]}}"#
            )
            .into_bytes(),
            bad,
            "malformed_batch",
        ),
        (
            "an unknown top-level field",
            format!(r#"{{"v":1,"epoch":"{epoch}","records":[],"admin":true}}"#).into_bytes(),
            bad,
            "malformed_batch",
        ),
        (
            "seq a string",
            record(r#""seq":"1","id":"a","stream":"s","ts":0,"payload":{}"#),
            bad,
            "malformed_batch",
        ),
        (
            "seq past i64",
            record(r#""seq":9223372036854775808,"id":"a","stream":"s","ts":0,"payload":{}"#),
            bad,
            "malformed_batch",
        ),
        (
            "ts a float",
            record(r#""seq":1,"id":"a","stream":"s","ts":1.5,"payload":{}"#),
            bad,
            "malformed_batch",
        ),
        (
            "id a number",
            record(r#""seq":1,"id":7,"stream":"s","ts":0,"payload":{}"#),
            bad,
            "malformed_batch",
        ),
        (
            "stream missing",
            record(r#""seq":1,"id":"a","ts":0,"payload":{}"#),
            bad,
            "malformed_batch",
        ),
        (
            "an unknown record field (tenant)",
            record(&format!(r#"{ok},"tenant":"other""#)),
            bad,
            "malformed_batch",
        ),
        (
            "invalid UTF-8 in a payload string",
            record(r#""seq":1,"id":"a","stream":"s","ts":0,"payload":{"x":"X"}"#)
                .into_iter()
                .map(|b| if b == b'X' { 0xff } else { b })
                .collect(),
            bad,
            "malformed_batch",
        ),
        (
            "100 000 nested arrays as the batch",
            "[".repeat(100_000).into_bytes(),
            bad,
            "malformed_batch",
        ),
        (
            "payload a string",
            record(r#""seq":1,"id":"a","stream":"s","ts":0,"payload":"{}""#),
            invalid,
            "invalid_records",
        ),
        (
            "seq zero and an empty stream",
            record(r#""seq":0,"id":"a","stream":"","ts":0,"payload":{}"#),
            invalid,
            "invalid_records",
        ),
        (
            "an id with a control character",
            record(r#""seq":1,"id":"a\u0007b","stream":"s","ts":0,"payload":{}"#),
            invalid,
            "invalid_records",
        ),
        (
            "a NUL in the payload",
            record(r#""seq":1,"id":"a","stream":"s","ts":0,"payload":{"x":"\u0000"}"#),
            invalid,
            "invalid_records",
        ),
    ];
    for (what, json, status, code) in cases {
        let error = a.check_refused(what, gzip_json(&json), &[status]).await;
        assert_eq!(error.error, code, "{what}: {error:?}");
        if status == invalid {
            assert!(!error.details.is_empty(), "{what}: no details");
        }
    }
}

#[tokio::test]
async fn payloads_postgresql_cannot_store_are_refused_with_422_and_those_at_its_limits_are_stored()
{
    let mut a = Aggregator::start(|_| {}).await;
    let nested = |depth: usize| {
        // The payload object is the first level.
        format!(
            r#"{{"a":{}1{}}}"#,
            "[".repeat(depth - 1),
            "]".repeat(depth - 1)
        )
    };
    let fraction = |digits: usize| format!(r#"{{"a":0.{}1}}"#, "0".repeat(digits - 1));

    // At the validator's limits, which PostgreSQL takes: stored.
    let at_limits = [
        nested(MAX_NESTING_DEPTH),
        fraction(16_383),
        r#"{"a":1e1000,"b":-1e-1000}"#.to_owned(),
    ];
    for payload in &at_limits {
        let response = a.post(gzip_json(&batch_json(payload)), Some("gzip")).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "{}…: {text}", &payload[..40]);
        a.written += 1;
    }
    assert_eq!(a.db.count("records").await, a.written);

    // Past them. PostgreSQL would refuse these inside the transaction: deep
    // nesting with "stack depth limit exceeded" (54001, which would be a 500
    // and an agent retrying the batch forever), long fractions with "value
    // overflows numeric format" (a 422 only after a database round trip).
    for (what, payload) in [
        ("nesting one level too deep", nested(MAX_NESTING_DEPTH + 1)),
        ("nesting 20 000 levels deep", nested(20_000)),
        ("16 384 fraction digits", fraction(16_384)),
        ("an exponent past 1000", r#"{"a":1e1001}"#.to_owned()),
    ] {
        let error = a
            .check_refused(
                what,
                gzip_json(&batch_json(&payload)),
                &[StatusCode::UNPROCESSABLE_ENTITY],
            )
            .await;
        assert_eq!(error.error, "invalid_records", "{what}: {error:?}");
        assert_eq!(error.details.len(), 1, "{what}: {error:?}");
        assert_eq!(error.details[0].field, "payload", "{what}: {error:?}");
    }
}

#[tokio::test]
async fn a_batch_whose_content_encoding_is_br_deflate_identity_or_absent_is_refused_with_415() {
    let mut a = Aggregator::start(|_| {}).await;
    for encoding in [
        Some("br"),
        Some("deflate"),
        Some("identity"),
        Some("gzip, br"),
        None,
    ] {
        let what = format!("Content-Encoding {encoding:?}");
        // A valid gzip batch: only the header is wrong, and it alone must refuse.
        let response = a.post(valid_batch(), encoding).await;
        let error = expect_error_body(&what, response, &[StatusCode::UNSUPPORTED_MEDIA_TYPE]).await;
        assert_eq!(error.error, "unsupported_encoding", "{what}");
        a.assert_unharmed(&what).await;
    }
}

// ---------------------------------------------------------------------------
// Aggregator: memory, headers, slow and silent clients

#[test]
fn the_gzip_bomb_is_a_valid_gzip_of_its_size() {
    use std::io::Read as _;
    let bomb = gzip_bomb(8 << 20);
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&bomb[..])
        .read_to_end(&mut out)
        .expect("the bomb is valid gzip, CRC and size included");
    assert_eq!(out.len(), 8 << 20);
    assert!(out.iter().all(|&b| b == 0));
}

// Multi-threaded: Service::terminate blocks the test's thread, and the
// client's connection must still answer the aggregator's graceful HTTP/2
// shutdown (GOAWAY and PING), or shutdown waits out its 30 s grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_gzip_bombs_of_1_gib_keep_the_aggregator_process_under_300_mib() {
    const LIMIT_KIB: u64 = 300 * 1024;
    let db = TestDb::new().await;
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let port = agent::free_port();
    let env = [
        ("LISTEN__ADDRESS", format!("127.0.0.1:{port}")),
        ("ADMIN__ADDRESS", "127.0.0.1:0".into()),
        ("TLS__CA", pki.ca.display().to_string()),
        ("TLS__CERT", pki.server_cert.display().to_string()),
        ("TLS__KEY", pki.server_key.display().to_string()),
        ("DATABASE__URL", db.url.clone()),
        ("DATABASE__MIGRATE_ON_START", "false".into()),
        ("DATABASE__MAX_CONNECTIONS", "4".into()),
        ("LOG__FORMAT", "json".into()),
    ];
    let mut aggregator = Service::aggregator(env, port, &dir.path().join("aggregator.log"));
    aggregator.start().await;
    let client = agent_client(&pki.agent("acme", "edge-01"));
    let url = format!("https://localhost:{port}{}", wire::BATCHES_PATH);
    let post = |body: Vec<u8>| {
        client
            .post(&url)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(body)
            .send()
    };

    let bomb = gzip_bomb(1 << 30);
    assert!(bomb.len() < 2 << 20, "the bomb is {} bytes", bomb.len());
    let before = aggregator.peak_rss_kib().expect("peak RSS");
    for i in 0..20 {
        let response = post(bomb.clone()).await.expect("bomb request");
        let error = expect_error_body(
            &format!("bomb {i}"),
            response,
            &[StatusCode::PAYLOAD_TOO_LARGE],
        )
        .await;
        assert_eq!(error.error, "batch_too_large");
    }
    let peak = aggregator.peak_rss_kib().expect("peak RSS");
    eprintln!("aggregator peak RSS: {before} KiB before the bombs, {peak} KiB after");
    assert!(
        peak < LIMIT_KIB,
        "peak RSS {peak} KiB after 20 bombs, limit {LIMIT_KIB} KiB; log:\n{}",
        aggregator.log_tail()
    );

    assert_eq!(db.count("records").await, 0);
    let response = post(valid_batch()).await.expect("valid batch");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(db.count("records").await, 2);
    assert!(aggregator.terminate(), "clean shutdown after the bombs");
}

#[tokio::test]
async fn a_request_with_huge_headers_is_refused_and_the_server_still_answers() {
    let mut a = Aggregator::start(|_| {}).await;
    // Valid batches: if the headers got through, the batch would be stored.
    let body = valid_batch();
    let one_mib_header = format!("x-junk: {}\r\n", "a".repeat(1 << 20));
    let many_headers: String = (0..10_000).map(|i| format!("x-h{i}: {i}\r\n")).collect();
    for (what, extra) in [
        ("a 1 MiB header over HTTP/1.1", one_mib_header),
        ("10 000 headers over HTTP/1.1", many_headers),
    ] {
        let stream = a.connect_tls().await;
        let reply = exchange(
            stream,
            batch_head(body.len(), &extra),
            body.clone(),
            usize::MAX,
            Duration::ZERO,
            Duration::from_secs(10),
        )
        .await;
        match reply.status {
            Some(status) => assert!((400..500).contains(&status), "{what}: {reply:?}"),
            None => assert!(reply.closed_after.is_some(), "{what}: left open: {reply:?}"),
        }
        assert!(reply.closed_after.is_some(), "{what}: left open: {reply:?}");
        a.assert_unharmed(what).await;
    }

    // The same through the agent's own client (HTTP/2 when negotiated): a
    // 4xx, or a refused stream; never a stored batch.
    let what = "a 1 MiB header through reqwest";
    let result = a
        .client
        .post(a.agg.endpoint(wire::BATCHES_PATH))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header("x-junk", "a".repeat(1 << 20))
        .body(valid_batch())
        .send()
        .await;
    if let Ok(response) = result {
        assert!(response.status().is_client_error(), "{what}: {response:?}");
    }
    a.assert_unharmed(what).await;
}

#[tokio::test]
async fn a_body_trickled_one_byte_per_second_gets_408_within_the_request_timeout() {
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
    let mut a = Aggregator::start(|c| c.limits.request_timeout = REQUEST_TIMEOUT).await;
    let body = valid_batch();
    // Two slow clients at once, fewer than the aggregator's batch slots.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let stream = a.connect_tls().await;
        slow.push(tokio::spawn(exchange(
            stream,
            batch_head(body.len(), ""),
            body.clone(),
            1,
            Duration::from_secs(1),
            REQUEST_TIMEOUT + Duration::from_secs(8),
        )));
    }

    // Others are served while the slow clients trickle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    a.assert_unharmed("while two clients trickle their bodies")
        .await;
    assert!(
        started.elapsed() < REQUEST_TIMEOUT,
        "a valid batch waited {:?} behind the slow clients",
        started.elapsed()
    );

    for client in slow {
        let reply = client.await.expect("slow client");
        assert_eq!(reply.status, Some(408), "{reply:?}");
        assert_eq!(reply.error_body().error, "request_timeout");
        let replied = reply.replied_after.expect("replied");
        assert!(
            replied <= REQUEST_TIMEOUT + SLACK,
            "408 after {replied:?}, the request timeout is {REQUEST_TIMEOUT:?}"
        );
        assert!(
            reply.closed_after.is_some_and(|c| c <= replied + SLACK),
            "the connection stayed open after the 408: {reply:?}"
        );
    }
    a.assert_unharmed("after the slow clients").await;
}

#[tokio::test]
async fn headers_trickled_one_byte_per_second_are_cut_off_after_the_handshake_timeout() {
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
    let mut a = Aggregator::start(|c| c.limits.handshake_timeout = HANDSHAKE_TIMEOUT).await;
    let stream = a.connect_tls().await;
    let body = valid_batch();
    let head = batch_head(body.len(), "");
    // "PO" at once: from the second byte the server knows this is not the
    // HTTP/2 preface, and the HTTP/1 header deadline runs (see the ignored
    // test below for a client that stops before that). The rest of the head
    // then comes one byte per second.
    let (start, rest) = head.split_at(2);
    let reply = exchange(
        stream,
        start.to_vec(),
        rest.to_vec(),
        1,
        Duration::from_secs(1),
        HANDSHAKE_TIMEOUT + Duration::from_secs(8),
    )
    .await;
    let closed = reply.closed_after.expect("the connection was closed");
    assert!(
        closed <= HANDSHAKE_TIMEOUT + SLACK,
        "closed only after {closed:?}, the handshake timeout is {HANDSHAKE_TIMEOUT:?}"
    );
    if let Some(status) = reply.status {
        assert_eq!(status, 408, "{reply:?}");
    }
    a.assert_unharmed("after the slow headers").await;
}

/// hyper-util's `auto::Builder` reads until it can tell HTTP/1 from the
/// HTTP/2 preface ("PRI * HTTP/2.0…") with no deadline of its own; the
/// aggregator closes any connection that has not made its first request
/// within the handshake timeout after TLS.
#[tokio::test]
async fn a_client_that_stops_inside_the_http2_preface_is_closed_after_the_handshake_timeout() {
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
    let a = Aggregator::start(|c| c.limits.handshake_timeout = HANDSHAKE_TIMEOUT).await;
    let stream = a.connect_tls().await;
    let reply = exchange(
        stream,
        b"P".to_vec(),
        Vec::new(),
        1,
        Duration::ZERO,
        HANDSHAKE_TIMEOUT + Duration::from_secs(5),
    )
    .await;
    let closed = reply.closed_after.expect("the connection was never closed");
    assert!(
        closed <= HANDSHAKE_TIMEOUT + SLACK,
        "closed after {closed:?}"
    );
}

#[tokio::test]
async fn a_connection_that_never_completes_tls_is_closed_after_the_handshake_timeout() {
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
    let mut a = Aggregator::start(|c| c.limits.handshake_timeout = HANDSHAKE_TIMEOUT).await;
    let addr: SocketAddr = a.agg.addr;

    // Silent sockets, and sockets that stop inside a TLS record header: many
    // at once, so they would exhaust anything per-connection that had no
    // deadline.
    let mut idle = Vec::new();
    for i in 0..64 {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        if i % 2 == 1 {
            tcp.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
        }
        idle.push(tokio::spawn(read_reply(tcp, Duration::from_secs(10))));
    }
    // Meanwhile a real agent is served.
    a.assert_unharmed("while 64 sockets sit in the handshake")
        .await;

    for socket in idle {
        let reply = socket.await.expect("idle socket");
        assert_eq!(reply.replied_after, None, "the server sent data: {reply:?}");
        let closed = reply.closed_after.expect("the socket was closed");
        assert!(
            closed >= HANDSHAKE_TIMEOUT - Duration::from_millis(300)
                && closed <= HANDSHAKE_TIMEOUT + SLACK,
            "closed after {closed:?}, the handshake timeout is {HANDSHAKE_TIMEOUT:?}"
        );
    }
    a.assert_unharmed("after the handshake timeouts").await;
}

// ---------------------------------------------------------------------------
// Agent

/// An in-process agent whose aggregator is unreachable, so everything it
/// accepts stays buffered and can be counted.
struct Agent {
    _pki: Pki,
    _dir: tempfile::TempDir,
    agent: RunningAgent,
    http: reqwest::Client,
}

fn unreachable_agent_config(pki: &Pki, dir: &std::path::Path) -> dcs_edge::Config {
    let unreachable = format!("https://localhost:{}", agent::free_port());
    agent::test_config(
        &pki.agent("acme", "edge-1"),
        &unreachable,
        &dir.join("buffer.db"),
    )
}

impl Agent {
    async fn start() -> Agent {
        let pki = Pki::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let agent = start_agent(unreachable_agent_config(&pki, dir.path())).await;
        Agent {
            _pki: pki,
            _dir: dir,
            agent,
            http: reqwest::Client::new(),
        }
    }

    /// Pushes `body` and expects a 400 with an error body; then checks that
    /// nothing was buffered and the agent still answers.
    async fn check_refused(&self, what: &str, content_type: &str, body: Vec<u8>) -> ErrorBody {
        let response = push(&self.http, &self.agent.url, content_type, body).await;
        let error = expect_error_body(what, response, &[StatusCode::BAD_REQUEST]).await;
        if error.error == "invalid_records" {
            assert!(!error.details.is_empty(), "{what}: no details: {error:?}");
        }
        assert_agent_unharmed(&self.http, &self.agent.url, what).await;
        error
    }

    /// A valid record is still accepted (and is then the only one buffered).
    async fn accepts_a_valid_record(&self) {
        let response = push(
            &self.http,
            &self.agent.url,
            "application/json",
            r#"{"stream":"s","payload":{"ok":true}}"#,
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(buffered(&self.agent.url).await, 1);
    }
}

async fn buffered(url: &str) -> u64 {
    agent::status(url).await["buffer"]["records"]
        .as_u64()
        .expect("buffer.records")
}

async fn assert_agent_unharmed(http: &reqwest::Client, url: &str, what: &str) {
    assert_agent_alive(http, url, what).await;
    assert_eq!(buffered(url).await, 0, "{what}: records were buffered");
}

const JSON: &str = "application/json";
const NDJSON: &str = "application/x-ndjson";

#[tokio::test]
async fn random_bytes_pushed_as_records_are_refused_with_400_and_nothing_is_buffered() {
    let a = Agent::start().await;
    for seed in SEEDS {
        let mut rng = fastrand::Rng::with_seed(seed);
        for len in [0, 1, 2, rng.usize(3..4096), 65_536] {
            for content_type in [JSON, NDJSON] {
                let what = format!("seed {seed}, {len} random bytes as {content_type}");
                a.check_refused(&what, content_type, random_bytes(&mut rng, len))
                    .await;
            }
            // Printable garbage is UTF-8, so it reaches the JSON parser and,
            // as NDJSON, the per-line report.
            let text: String = (0..len.max(1))
                .map(|_| match rng.u8(0..20) {
                    0 => '\n',
                    1 => '{',
                    2 => '"',
                    _ => rng.alphanumeric(),
                })
                .collect();
            let what = format!("seed {seed}, {len} printable bytes as NDJSON");
            a.check_refused(&what, NDJSON, text.into_bytes()).await;
        }
    }
    a.accepts_a_valid_record().await;
}

#[tokio::test]
async fn truncated_ndjson_is_refused_whole_naming_the_cut_line() {
    let a = Agent::start().await;
    let body = agent::ndjson("plant.sensors", "t", 0..5);
    let line_starts: Vec<usize> = std::iter::once(0)
        .chain(body.match_indices('\n').map(|(i, _)| i + 1))
        .take(5)
        .collect();
    for (line, start) in line_starts.iter().enumerate() {
        for cut in [start + 1, start + 20, start + 45] {
            let what = format!("NDJSON cut at byte {cut}, in line {}", line + 1);
            let error = a
                .check_refused(&what, NDJSON, body.as_bytes()[..cut].to_vec())
                .await;
            assert_eq!(error.error, "invalid_records", "{what}: {error:?}");
            // The complete lines before the cut are not buffered either.
            assert_eq!(error.details.len(), 1, "{what}: {error:?}");
            assert_eq!(
                (error.details[0].index, error.details[0].field.as_str()),
                (line as i64, "record"),
                "{what}: {error:?}"
            );
            assert!(
                error.details[0]
                    .reason
                    .starts_with(&format!("line {}:", line + 1)),
                "{what}: {error:?}"
            );
        }
    }
    a.accepts_a_valid_record().await;
}

#[tokio::test]
async fn invalid_utf8_is_refused_with_400() {
    let a = Agent::start().await;
    let valid = "{\"stream\":\"s\",\"payload\":{\"text\":\"café\"}}".as_bytes();
    let at = valid.windows(3).position(|w| w == b"caf").expect("caf");
    for (what, bytes) in [
        ("a lone continuation byte", &b"\x80"[..]),
        ("an overlong encoding", &b"\xc0\xaf"[..]),
        ("a UTF-16 surrogate in UTF-8", &b"\xed\xa0\x80"[..]),
        ("a truncated sequence", &b"\xe2\x82"[..]),
    ] {
        let body: Vec<u8> = [&valid[..at], bytes, &valid[at..]].concat();
        for content_type in [JSON, NDJSON] {
            let what = format!("{what} as {content_type}");
            let error = a.check_refused(&what, content_type, body.clone()).await;
            assert_eq!(error.error, "malformed_json", "{what}: {error:?}");
            assert!(error.message.contains("UTF-8"), "{what}: {error:?}");
        }
    }
    a.accepts_a_valid_record().await;
}

#[tokio::test]
async fn deeply_nested_json_is_refused_with_400_and_the_agent_keeps_answering() {
    let a = Agent::start().await;
    let deep = 100_000;
    let open = "[".repeat(deep);
    let balanced = format!("{open}{}", "]".repeat(deep));
    let objects = "{\"a\":".repeat(deep);
    // 20 000 levels fit the 64 KiB payload limit; PostgreSQL would refuse them.
    let deep_payload = format!(
        r#"{{"stream":"s","payload":{{"a":{}1{}}}}}"#,
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    let long_fraction = format!(
        r#"{{"stream":"s","payload":{{"a":0.{}1}}}}"#,
        "0".repeat(16_383)
    );
    for (what, content_type, body) in [
        ("100 000 unclosed arrays", JSON, open.clone()),
        ("100 000 balanced arrays", JSON, balanced.clone()),
        ("100 000 unclosed objects", JSON, objects),
        ("100 000 unclosed arrays as NDJSON", NDJSON, open),
        ("100 000 balanced arrays as NDJSON", NDJSON, balanced),
        (
            "a record inside 100 000 arrays",
            JSON,
            format!(
                r#"{}{{"stream":"s","payload":{{}}}}{}"#,
                "[".repeat(deep),
                "]".repeat(deep)
            ),
        ),
        ("a payload 20 000 levels deep", JSON, deep_payload),
        (
            "a payload number with 16 384 fraction digits",
            JSON,
            long_fraction,
        ),
    ] {
        let error = a.check_refused(what, content_type, body.into_bytes()).await;
        assert!(
            ["malformed_json", "invalid_records"].contains(&error.error.as_str()),
            "{what}: {error:?}"
        );
    }
    a.accepts_a_valid_record().await;
}

#[tokio::test]
async fn a_100_mb_body_is_refused_with_413_and_the_agent_stays_small() {
    const BODY: usize = 100_000_000;
    const LIMIT_KIB: u64 = 64 * 1024;
    // AgentProcess polls /health with reqwest, which needs a crypto provider.
    dcs_shared::tls::install_crypto_provider();
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = unreachable_agent_config(&pki, dir.path());
    let mut agent = AgentProcess::spawn(&config, &dir.path().join("agent.log")).await;
    let addr: SocketAddr = ([127, 0, 0, 1], agent.service.port).into();
    let http = reqwest::Client::new();

    // Valid NDJSON all the way: only the size can refuse it.
    let line = r#"{"stream":"bulk","payload":{"pad":"0123456789abcdef0123456789abcdef"}}"#;
    let chunk: String =
        std::iter::repeat_n(format!("{line}\n"), (1 << 20) / (line.len() + 1)).collect();
    let chunks = BODY / chunk.len() + 1;
    let length = chunks * chunk.len();
    let head = |framing: &str| {
        format!(
            "POST /v1/records HTTP/1.1\r\nhost: localhost\r\ncontent-type: {NDJSON}\r\n\
             {framing}\r\nconnection: close\r\n\r\n"
        )
        .into_bytes()
    };

    // Declared in Content-Length, and streamed chunked with no length at all.
    let declared = {
        let mut body = Vec::with_capacity(length);
        for _ in 0..chunks {
            body.extend_from_slice(chunk.as_bytes());
        }
        body
    };
    let chunked = {
        let mut body = Vec::with_capacity(length + chunks * 16);
        for _ in 0..chunks {
            body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            body.extend_from_slice(chunk.as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        body
    };
    for (what, head, body) in [
        (
            "Content-Length: 100 MB",
            head(&format!("content-length: {length}")),
            declared,
        ),
        (
            "100 MB chunked",
            head("transfer-encoding: chunked"),
            chunked,
        ),
    ] {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let reply = exchange(
            tcp,
            head,
            body,
            1 << 20,
            Duration::ZERO,
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(reply.status, Some(413), "{what}: {reply:?}");
        assert_eq!(reply.error_body().error, "request_too_large", "{what}");
        assert_agent_unharmed(&http, &agent.url, what).await;
    }

    let peak = agent.service.peak_rss_kib().expect("peak RSS");
    eprintln!("agent peak RSS after two 100 MB bodies: {peak} KiB");
    assert!(
        peak < LIMIT_KIB,
        "agent peak RSS {peak} KiB, limit {LIMIT_KIB} KiB; log:\n{}",
        agent.service.log_tail()
    );
    assert!(agent.terminate(), "clean shutdown");
}

// ---------------------------------------------------------------------------
// The agent's syslog TCP listener

/// Reads until the peer closes (Ok) or `within` passes (Err).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Result<(), ()> {
    let mut sink = [0u8; 256];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut sink)).await {
            Err(_) => return Err(()),
            Ok(Ok(0) | Err(_)) => return Ok(()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn hostile_syslog_senders_lose_their_own_connection_and_nobody_elses_messages() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = unreachable_agent_config(&pki, dir.path());
    let port = agent::free_port();
    let max_connections = 8;
    config.syslog = vec![
        serde_json::from_value(serde_json::json!({
            "name": "hostile", "protocol": "tcp", "listen": format!("127.0.0.1:{port}"),
            "max_message_bytes": "8KiB", "frame_timeout": "1s", "max_connections": max_connections,
        }))
        .expect("syslog listener"),
    ];
    let agent = start_agent(config).await;
    let http = reqwest::Client::new();
    // The syslog socket is bound before the API serves.
    let health = agent.endpoint("/health");
    assert!(
        agent::wait_until(Duration::from_secs(20), || async {
            http.get(&health)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await,
        "the agent did not start"
    );
    let address = format!("127.0.0.1:{port}");
    // A well-behaved sender on its own connection throughout.
    let mut victim = TcpStream::connect(&address).await.expect("victim connects");
    let mut victim_sent = 0i64;

    let mut rng = fastrand::Rng::with_seed(0x5e5106);
    let garbage: Vec<u8> = (0..65_536).map(|_| rng.u8(..)).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a line longer than max_message_bytes", vec![b'a'; 100_000]),
        (
            "an octet count above max_message_bytes",
            b"99999999 <14>1 - h a - - - x".to_vec(),
        ),
        (
            "an octet count that is not a number",
            b"12x4 <14>1 - h a - - - x".to_vec(),
        ),
        (
            "an octet count with more digits than any length",
            b"123456789012345678 x".to_vec(),
        ),
        ("64 KiB of random bytes", garbage),
    ];
    for (what, bytes) in cases {
        let mut hostile = TcpStream::connect(&address).await.expect("connect");
        // The agent may close while we write: that is the point.
        let _ = hostile.write_all(&bytes).await;
        let _ = hostile.flush().await;
        assert!(
            closed_within(&mut hostile, Duration::from_secs(3) + SLACK)
                .await
                .is_ok()
                || what.contains("random"),
            "{what}: the connection was not closed"
        );
        victim
            .write_all(format!("<14>1 - victim app - - - after {what}\n").as_bytes())
            .await
            .expect("the victim's connection survives");
        victim_sent += 1;
        assert_agent_alive(&http, &agent.url, what).await;
    }

    // Slowloris: a frame dribbled out a byte at a time is cut at frame_timeout.
    let mut slow = TcpStream::connect(&address).await.expect("connect");
    let started = Instant::now();
    let dribble = async {
        for byte in b"<14>1 - h a - - - never finished".iter().cycle() {
            if slow.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1) + 2 * SLACK, dribble).await;
    assert!(
        closed_within(&mut slow, SLACK).await.is_ok(),
        "slowloris: the dribbling connection is still open after {:?}",
        started.elapsed()
    );

    // More connections than max_connections: the extra ones are closed at once.
    let mut held = Vec::new();
    for _ in 0..max_connections + 4 {
        held.push(TcpStream::connect(&address).await.expect("connect"));
    }
    let mut closed = 0;
    for stream in &mut held {
        if closed_within(stream, Duration::from_millis(300))
            .await
            .is_ok()
        {
            closed += 1;
        }
    }
    // The victim holds one slot.
    assert!(
        closed >= 5,
        "only {closed} connections over max_connections were closed"
    );
    drop(held);

    victim
        .write_all(b"<14>1 - victim app - - - last\n")
        .await
        .expect("the victim's connection survives");
    victim_sent += 1;
    let ok = agent::wait_until(Duration::from_secs(10), || async {
        metric(
            &agent.url,
            "dcs_agent_syslog_messages_accepted_total",
            "hostile",
        )
        .await
            >= victim_sent as f64
    })
    .await;
    assert!(ok, "the victim's messages were not all accepted");
    for (name, labels, at_least) in [
        ("dcs_agent_syslog_connections_closed_total", "framing", 4.0),
        (
            "dcs_agent_syslog_connections_closed_total",
            "frame_timeout",
            1.0,
        ),
        (
            "dcs_agent_syslog_connections_closed_total",
            "max_connections",
            4.0,
        ),
    ] {
        let value = agent::metric_sample(
            &agent.url,
            name,
            &[("listener", "hostile"), ("reason", labels)],
        )
        .await
        .unwrap_or(0.0);
        assert!(value >= at_least, "{name}{{reason={labels}}} = {value}");
    }
}

async fn metric(url: &str, name: &str, listener: &str) -> f64 {
    agent::metric_sample(url, name, &[("listener", listener)])
        .await
        .unwrap_or(0.0)
}

async fn assert_agent_alive(http: &reqwest::Client, url: &str, what: &str) {
    let health = http
        .get(format!("{url}/health"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: /health failed: {e}"));
    assert_eq!(health.status(), StatusCode::OK, "{what}: /health");
}

/// A zstd frame whose header asks for a 2 GiB window (window log 31) and
/// then holds one raw byte: a decoder that honoured it would allocate 2 GiB.
fn zstd_window_bomb() -> Vec<u8> {
    let mut frame = 0xFD2F_B528u32.to_le_bytes().to_vec();
    // Frame header descriptor: no content size, no checksum, no dictionary;
    // window descriptor: exponent 21 → window log 10 + 21.
    frame.extend_from_slice(&[0x00, 21 << 3]);
    // One last raw block of one byte.
    frame.extend_from_slice(&[0x09, 0x00, 0x00, b'x']);
    frame
}

/// `n` empty OTLP log records in one ScopeLogs of one ResourceLogs: two
/// bytes each on the wire, about 200 once decoded.
fn otlp_empty_records(n: usize) -> Vec<u8> {
    fn field(number: u8, inner: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3) | 2];
        let mut len = inner.len();
        while len >= 0x80 {
            out.push((len as u8) | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
        out.extend_from_slice(inner);
        out
    }
    let records: Vec<u8> = std::iter::repeat_n([0x12u8, 0x00], n).flatten().collect();
    field(1, &field(2, &records))
}

/// One case of the compressed-body and OTLP table: (what, path, content
/// type, content encoding, body, status, error code).
type BodyCase = (
    String,
    &'static str,
    &'static str,
    &'static str,
    Vec<u8>,
    StatusCode,
    &'static str,
);

/// The compressed-body and OTLP cases of the agent's hostile-input table.
fn compressed_and_otlp_cases() -> Vec<BodyCase> {
    use std::io::Read as _;
    const PB: &str = "application/x-protobuf";
    let valid = agent::ndjson("s", "v", 0..50);
    let gz_valid = gzip_json(valid.as_bytes());
    let zs_valid = zstd::encode_all(valid.as_bytes(), 3).expect("zstd");
    // 1 GiB of zeros streamed through the encoder: no content size in the
    // frame, so only the inflate cap stops it.
    let zstd_stream_bomb =
        zstd::encode_all(std::io::repeat(0).take(1 << 30), 1).expect("zstd bomb");
    // 32 MiB of zeros in one frame that states its size.
    let zstd_sized_bomb = zstd::bulk::compress(&vec![0u8; 32 << 20], 1).expect("zstd bomb");
    // A gzip bomb whose trailer lies (100 bytes): only the cap stops it.
    let mut lying_gzip = gzip_bomb(64 << 20);
    let n = lying_gzip.len();
    lying_gzip[n - 4..].copy_from_slice(&100u32.to_le_bytes());
    let mut cases = vec![
        (
            "a 1 GiB gzip bomb (trailer states 1 GiB)".to_owned(),
            "/v1/records",
            NDJSON,
            "gzip",
            gzip_bomb(1 << 30),
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
        ),
        (
            "a 64 MiB gzip bomb whose trailer says 100 bytes".to_owned(),
            "/v1/records",
            NDJSON,
            "gzip",
            lying_gzip,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
        ),
        (
            "a 1 GiB zstd bomb without a content size".to_owned(),
            "/v1/records",
            NDJSON,
            "zstd",
            zstd_stream_bomb.clone(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
        ),
        (
            "a 32 MiB zstd frame stating its size".to_owned(),
            "/v1/records",
            NDJSON,
            "zstd",
            zstd_sized_bomb,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
        ),
        (
            "a zstd frame asking for a 2 GiB window".to_owned(),
            "/v1/records",
            NDJSON,
            "zstd",
            zstd_window_bomb(),
            StatusCode::BAD_REQUEST,
            "malformed_body",
        ),
        (
            "a gzip bomb sent to /v1/logs".to_owned(),
            "/v1/logs",
            PB,
            "gzip",
            gzip_bomb(1 << 30),
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
        ),
        (
            "a zstd bomb sent to /v1/logs".to_owned(),
            "/v1/logs",
            JSON,
            "zstd",
            zstd_stream_bomb,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
        ),
        (
            "8 million empty OTLP log records (16 MB of protobuf)".to_owned(),
            "/v1/logs",
            PB,
            "identity",
            otlp_empty_records(8_000_000 - 8),
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
        ),
        (
            "a million empty OTLP log records in JSON".to_owned(),
            "/v1/logs",
            JSON,
            "gzip",
            gzip_json(
                format!(
                    "{{\"resourceLogs\":[{{\"scopeLogs\":[{{\"logRecords\":[{}{{}}]}}]}}]}}",
                    "{},".repeat(1_000_000)
                )
                .as_bytes(),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
        ),
        (
            "a deflate body".to_owned(),
            "/v1/records",
            NDJSON,
            "deflate",
            valid.clone().into_bytes(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
        ),
        (
            "stacked encodings".to_owned(),
            "/v1/records",
            NDJSON,
            "gzip, zstd",
            gz_valid.clone(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
        ),
        (
            "OTLP JSON nested 200 arrays deep".to_owned(),
            "/v1/logs",
            JSON,
            "identity",
            format!(
                "{{\"resourceLogs\":[{{\"scopeLogs\":[{{\"logRecords\":[{{\"body\":{}{}}}]}}]}}]}}",
                "{\"arrayValue\":{\"values\":[".repeat(200),
                "]}}".repeat(200)
            )
            .into_bytes(),
            StatusCode::BAD_REQUEST,
            "malformed_otlp",
        ),
    ];
    // Every cut of a valid compressed body, and random bytes, are 400.
    for cut in [1, 2, 10, gz_valid.len() / 2, gz_valid.len() - 1] {
        cases.push((
            format!("gzip cut at {cut} of {}", gz_valid.len()),
            "/v1/records",
            NDJSON,
            "gzip",
            gz_valid[..cut].to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_body",
        ));
    }
    for cut in [1, 4, 6, zs_valid.len() / 2, zs_valid.len() - 1] {
        cases.push((
            format!("zstd cut at {cut} of {}", zs_valid.len()),
            "/v1/records",
            NDJSON,
            "zstd",
            zs_valid[..cut].to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_body",
        ));
    }
    for seed in SEEDS {
        let mut rng = fastrand::Rng::with_seed(seed);
        for (encoding, path, content_type, code) in [
            ("gzip", "/v1/records", NDJSON, "malformed_body"),
            ("zstd", "/v1/records", NDJSON, "malformed_body"),
            ("identity", "/v1/logs", PB, "malformed_otlp"),
            ("identity", "/v1/logs", JSON, "malformed_otlp"),
        ] {
            let len = rng.usize(1..4096);
            // An empty protobuf message is a valid, empty request.
            let mut body = random_bytes(&mut rng, len);
            if content_type == PB {
                body[0] = 0xff;
            }
            cases.push((
                format!("seed {seed}, {len} random bytes as {encoding} {content_type} to {path}"),
                path,
                content_type,
                encoding,
                body,
                StatusCode::BAD_REQUEST,
                code,
            ));
        }
    }
    cases
}

#[tokio::test]
async fn compressed_bombs_broken_streams_and_otlp_decoder_bombs_are_refused_and_nothing_is_buffered()
 {
    let a = Agent::start().await;
    for (what, path, content_type, encoding, body, status, code) in compressed_and_otlp_cases() {
        let started = Instant::now();
        let response = a
            .http
            .post(format!("{}{path}", a.agent.url))
            .header("content-type", content_type)
            .header("content-encoding", encoding)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let answered_in = started.elapsed();
        if content_type == "application/x-protobuf" {
            // OTLP answers protobuf requests with a google.rpc.Status.
            assert_eq!(response.status(), status, "{what}");
        } else {
            let error = expect_error_body(&what, response, &[status]).await;
            assert_eq!(error.error, code, "{what}: {error:?}");
        }
        assert!(
            answered_in < Duration::from_secs(10),
            "{what}: took {answered_in:?}"
        );
        assert_agent_unharmed(&a.http, &a.agent.url, &what).await;
    }
    a.accepts_a_valid_record().await;
}
