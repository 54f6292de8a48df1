//! The agent's local ingest API: what producers are told, and that a refused
//! request changes nothing. The aggregator is unreachable here on purpose, so
//! everything accepted stays buffered and can be counted.

use std::time::Duration;

use dcs_tests::agent::{self, RunningAgent, push, start_agent};
use dcs_tests::pki::Pki;
use serde_json::{Value, json};

struct Agent {
    _pki: Pki,
    _dir: tempfile::TempDir,
    agent: RunningAgent,
    http: reqwest::Client,
}

async fn agent_with(adjust: impl FnOnce(&mut dcs_edge::Config)) -> Agent {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let unreachable = format!("https://localhost:{}", agent::free_port());
    let mut config = agent::test_config(
        &pki.agent("acme", "edge-1"),
        &unreachable,
        &dir.path().join("buffer.db"),
    );
    config.retry.max = Duration::from_secs(5);
    adjust(&mut config);
    let agent = start_agent(config).await;
    Agent {
        _pki: pki,
        _dir: dir,
        agent,
        http: reqwest::Client::new(),
    }
}

impl Agent {
    async fn buffered(&self) -> u64 {
        let st: Value = self.agent.status().await;
        st["buffer"]["records"].as_u64().unwrap()
    }

    async fn post(&self, content_type: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r = push(&self.http, &self.agent.url, content_type, body).await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

fn problems(body: &Value) -> Vec<(i64, String)> {
    body["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["index"].as_i64().unwrap(),
                d["field"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn one_bad_record_refuses_the_whole_request_naming_each_problem() {
    let a = agent_with(|_| {}).await;
    let big = "x".repeat(70 * 1024);
    let body = json!([
        {"stream": "ok", "payload": {"a": 1}},
        {"stream": "Not Valid", "payload": {"a": 1}},
        {"stream": "ok", "payload": [1, 2]},
        {"stream": "ok", "payload": {"big": big}},
        {"stream": "ok", "payload": {}, "ts": "last tuesday"},
        {"stream": "ok", "payload": {}, "id": ""},
        {"payload": {}},
        42
    ]);
    let (status, body) = a.post("application/json", body.to_string()).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_records");
    assert_eq!(
        problems(&body),
        [
            (1, "stream".into()),
            (2, "payload".into()),
            (3, "payload".into()),
            (4, "ts".into()),
            (5, "id".into()),
            (6, "stream".into()),
            (7, "record".into()),
        ]
    );
    let reasons: Vec<&str> = body["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    assert!(reasons[2].contains("bytes"), "{reasons:?}");
    assert_eq!(
        a.buffered().await,
        0,
        "nothing of a refused request is buffered"
    );
}

#[tokio::test]
async fn a_malformed_ndjson_line_is_named_and_nothing_is_buffered() {
    let a = agent_with(|_| {}).await;
    let nd = "{\"stream\":\"s\",\"payload\":{}}\n{\"stream\":\"s\",\"payload\":{\n\n{\"stream\":\"s\",\"payload\":{}}\n";
    let (status, body) = a.post("application/x-ndjson", nd).await;
    assert_eq!(status, 400);
    assert_eq!(problems(&body), [(1, "record".into())]);
    assert!(
        body["details"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("line 2")
    );
    let (status, body) = a.post("application/json", "{\"stream\": ").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "malformed_json");
    let (status, body) = a.post("application/json", "[]").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "no_records");
    assert_eq!(a.buffered().await, 0);
}

#[tokio::test]
async fn an_unsupported_content_type_is_415_and_an_oversize_body_413() {
    let a =
        agent_with(|c| c.ingest.max_request_bytes = dcs_shared::config::ByteSize(100 * 1024)).await;
    let (status, body) = a.post("text/plain", "{}").await;
    assert_eq!(status, 415);
    assert_eq!(body["error"], "unsupported_media_type");
    let huge = agent::ndjson("s", "h", 0..5000);
    let (status, body) = a.post("application/x-ndjson", huge).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"], "request_too_large");
    assert_eq!(a.buffered().await, 0);
}

#[tokio::test]
async fn a_full_buffer_answers_507_and_writes_nothing_of_the_request() {
    let a = agent_with(|c| c.buffer.capacity = dcs_shared::config::ByteSize(1 << 20)).await;
    let mut accepted = 0;
    let mut status = 200;
    while status == 200 {
        let (s, _) = a
            .post(
                "application/x-ndjson",
                agent::ndjson("s", &format!("f{accepted}"), 0..1000),
            )
            .await;
        status = s;
        if s == 200 {
            accepted += 1000;
        }
    }
    assert_eq!(status, 507);
    assert!(accepted > 0);
    assert_eq!(
        a.buffered().await,
        accepted,
        "the refused request left nothing behind"
    );
    let r = a
        .http
        .post(a.agent.endpoint("/v1/records"))
        .header("content-type", "application/json")
        .body(json!({"stream":"s","payload":{"x":"y".repeat(600_000)}}).to_string())
        .send()
        .await
        .unwrap();
    // A payload over the per-record limit is a 400, not a 507.
    assert_eq!(r.status(), 400);
    let r = a
        .http
        .post(a.agent.endpoint("/v1/records"))
        .header("content-type", "application/x-ndjson")
        .body(agent::ndjson("s", "again", 0..1000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 507);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "buffer_full");
    let ready = a.http.get(a.agent.endpoint("/ready")).send().await.unwrap();
    assert!(ready.status() == 200 || ready.status() == 503);
}

#[tokio::test]
async fn put_is_idempotent_and_get_tells_where_a_record_is() {
    let a = agent_with(|_| {}).await;
    let url = a.agent.endpoint("/v1/records/order-42");
    let rec = json!({"stream": "orders", "payload": {"total": 10}}).to_string();
    let first = a
        .http
        .put(&url)
        .header("content-type", "application/json")
        .body(rec.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let second = a
        .http
        .put(&url)
        .header("content-type", "application/json")
        .body(rec)
        .send()
        .await
        .unwrap();
    assert_eq!(
        second.status(),
        200,
        "the same id again is not buffered twice"
    );
    assert_eq!(a.buffered().await, 1);
    let got: Value = a.http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(got["state"], "buffered");
    assert_eq!(got["seq"], 1);
    let missing = a
        .http
        .get(a.agent.endpoint("/v1/records/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let mismatch = a
        .http
        .put(&url)
        .header("content-type", "application/json")
        .body(json!({"stream": "orders", "id": "other", "payload": {}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(mismatch.status(), 400);
    // POST with a known id is also a duplicate, reported as such.
    let (status, body) = a
        .post(
            "application/json",
            json!({"stream": "orders", "id": "order-42", "payload": {}}).to_string(),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (body["accepted"].clone(), body["duplicates"].clone()),
        (json!(0), json!(1))
    );
}

#[tokio::test]
async fn put_of_more_than_one_record_is_400_one_record_expected_and_buffers_nothing() {
    let a = agent_with(|_| {}).await;
    let url = a.agent.endpoint("/v1/records/batch-1");
    let two = json!([
        {"stream": "orders", "payload": {"n": 1}},
        {"stream": "orders", "payload": {"n": 2}}
    ]);
    let answer = a
        .http
        .put(&url)
        .header("content-type", "application/json")
        .body(two.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    let error: Value = answer.json().await.unwrap();
    assert_eq!(error["error"], "one_record_expected", "{error}");
    assert_eq!(a.buffered().await, 0);
    let absent = a.http.get(&url).send().await.unwrap();
    assert_eq!(absent.status(), 404);
}

#[tokio::test]
async fn health_ready_and_status_answer() {
    let a = agent_with(|_| {}).await;
    let h = a
        .http
        .get(a.agent.endpoint("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    let r = a.http.get(a.agent.endpoint("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let st: Value = a.agent.status().await;
    assert!(st["epoch"].as_str().unwrap().len() == 36);
    assert_eq!(st["buffer"]["records"], 0);
    assert_eq!(st["dead_letters"]["records"], 0);
}

/// Reads until the agent closes the connection; returns what it sent.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut got))
        .await
        .expect("the agent closes the connection in time")
        .expect("read");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    use tokio::io::AsyncWriteExt as _;
    let a = agent_with(|c| c.listen.header_timeout = Duration::from_millis(500)).await;

    // Silent from the start.
    let mut silent = tokio::net::TcpStream::connect(a.agent.addr).await.unwrap();
    read_until_closed(&mut silent, Duration::from_secs(10)).await;

    // Half a request line, then nothing.
    let mut stalled = tokio::net::TcpStream::connect(a.agent.addr).await.unwrap();
    stalled
        .write_all(b"POST /v1/records HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    read_until_closed(&mut stalled, Duration::from_secs(10)).await;

    // Everyone else is still served.
    let (status, _) = a
        .post(
            "application/x-ndjson",
            "{\"stream\":\"s\",\"payload\":{}}\n",
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_408_and_nothing_is_buffered() {
    use tokio::io::AsyncWriteExt as _;
    let a = agent_with(|c| c.listen.body_timeout = Duration::from_millis(500)).await;

    let mut slow = tokio::net::TcpStream::connect(a.agent.addr).await.unwrap();
    let line = "{\"stream\":\"s\",\"payload\":{}}\n";
    let head = format!(
        "POST /v1/records HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n\
         Content-Length: {}\r\n\r\n",
        line.len() * 2
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(line.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut slow, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert!(answer.contains("listen.body_timeout"), "{answer}");
    assert_eq!(a.buffered().await, 0);
}

#[test]
fn zero_listen_timeouts_are_refused_naming_the_key() {
    let pki = Pki::new();
    let mut config = agent::test_config(
        &pki.agent("acme", "edge-1"),
        "https://localhost:1",
        std::path::Path::new("buffer.db"),
    );
    config.listen.header_timeout = Duration::ZERO;
    config.listen.body_timeout = Duration::ZERO;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("listen.header_timeout"), "{error}");
    assert!(error.contains("listen.body_timeout"), "{error}");
}

// ---------------------------------------------------------------------------
// Compressed bodies

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

impl Agent {
    async fn post_encoded(
        &self,
        path_and_query: &str,
        content_type: &str,
        encoding: &str,
        body: Vec<u8>,
    ) -> reqwest::Response {
        self.http
            .post(self.agent.endpoint(path_and_query))
            .header("content-type", content_type)
            .header("content-encoding", encoding)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn dead_letters(&self) -> u64 {
        let st: Value = self.agent.status().await;
        st["dead_letters"]["records"].as_u64().unwrap()
    }
}

#[tokio::test]
async fn gzip_and_zstd_bodies_are_accepted_on_post_and_put() {
    let a = agent_with(|_| {}).await;
    let nd = agent::ndjson("s", "c", 0..500);
    for (encoding, body) in [
        ("gzip", gzip(nd.as_bytes())),
        ("zstd", zstd::encode_all(nd.as_bytes(), 3).unwrap()),
        ("identity", nd.clone().into_bytes()),
    ] {
        let r = a
            .post_encoded("/v1/records", "application/x-ndjson", encoding, body)
            .await;
        assert_eq!(r.status(), 200, "{encoding}");
        let body: Value = r.json().await.unwrap();
        // The same ids each time: the first request buffers, the others are duplicates.
        assert_eq!(
            body["accepted"].as_u64().unwrap() + body["duplicates"].as_u64().unwrap(),
            500,
            "{encoding}: {body}"
        );
    }
    assert_eq!(a.buffered().await, 500);
    let one = json!({"stream": "s", "payload": {"put": true}}).to_string();
    let r = a
        .http
        .put(a.agent.endpoint("/v1/records/zstd-put"))
        .header("content-type", "application/json")
        .header("content-encoding", "zstd")
        .body(zstd::encode_all(one.as_bytes(), 1).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(a.buffered().await, 501);
}

#[tokio::test]
async fn a_body_over_the_limit_once_decompressed_is_413_a_corrupt_one_400_an_unknown_encoding_415()
{
    let a =
        agent_with(|c| c.ingest.max_request_bytes = dcs_shared::config::ByteSize(100 * 1024)).await;
    // 5000 records are about 400 KiB of NDJSON, a few KiB compressed: under
    // the limit on the wire, over it once decompressed.
    let big = agent::ndjson("s", "big", 0..5000);
    let gz = gzip(big.as_bytes());
    let zs = zstd::encode_all(big.as_bytes(), 3).unwrap();
    assert!(gz.len() < 100 * 1024 && zs.len() < 100 * 1024);
    let small = agent::ndjson("s", "small", 0..10);
    let cut_gz = gzip(small.as_bytes());
    let cut_zs = zstd::encode_all(small.as_bytes(), 3).unwrap();
    for (what, encoding, body, status, code) in [
        ("gzip over the limit", "gzip", gz, 413, "request_too_large"),
        ("zstd over the limit", "zstd", zs, 413, "request_too_large"),
        (
            "truncated gzip",
            "gzip",
            cut_gz[..cut_gz.len() - 6].to_vec(),
            400,
            "malformed_body",
        ),
        (
            "truncated zstd",
            "zstd",
            cut_zs[..cut_zs.len() - 3].to_vec(),
            400,
            "malformed_body",
        ),
        (
            "plain text called gzip",
            "gzip",
            small.clone().into_bytes(),
            400,
            "malformed_body",
        ),
        (
            "brotli",
            "br",
            small.clone().into_bytes(),
            415,
            "unsupported_encoding",
        ),
    ] {
        let r = a
            .post_encoded("/v1/records", "application/x-ndjson", encoding, body)
            .await;
        assert_eq!(r.status().as_u16(), status, "{what}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], code, "{what}: {body}");
        assert!(body["message"].as_str().unwrap().len() > 10, "{what}");
    }
    assert_eq!(
        a.buffered().await,
        0,
        "nothing of a refused body is buffered"
    );
}

// ---------------------------------------------------------------------------
// Partial acceptance

#[tokio::test]
async fn partial_acceptance_commits_the_valid_records_and_dead_letters_each_invalid_one() {
    let a = agent_with(|_| {}).await;
    let nd = [
        r#"{"stream":"cron","payload":{"n":0}}"#,
        r#"{"stream":"CRON","payload":{"n":1}}"#,
        r#"{"stream":"cron","payload":{"n":2}}"#,
        r#"{"stream":"cron","payload":{"n":3"#,
        r#"{"stream":"cron","id":"p-4","payload":{"n":4}}"#,
    ]
    .join("\n");
    let r = a
        .post_encoded(
            "/v1/records?partial=true",
            "application/x-ndjson",
            "gzip",
            gzip(nd.as_bytes()),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["accepted"], 3, "{body}");
    assert_eq!(body["rejected"], 2, "{body}");
    assert_eq!(body["duplicates"], 0, "{body}");
    assert_eq!(
        problems(&body),
        [(1, "stream".into()), (3, "record".into())]
    );
    let ids = body["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 5);
    assert!(ids[1].is_null() && ids[3].is_null(), "{body}");
    assert_eq!(ids[4], "p-4");
    assert_eq!(a.buffered().await, 3);
    assert_eq!(a.dead_letters().await, 2);
    let rejected = agent::metric_sample(
        &a.agent.url,
        "dcs_agent_records_received_total",
        &[("stream", "invalid"), ("result", "rejected")],
    )
    .await;
    // The metrics recorder is shared by every in-process agent of this
    // test binary, so other tests' refusals are in the same series.
    assert!(rejected.unwrap_or(0.0) >= 2.0, "{rejected:?}");

    // The same body without partial acceptance changes nothing.
    let r = a
        .post_encoded(
            "/v1/records?partial=false",
            "application/x-ndjson",
            "identity",
            nd.clone().into_bytes(),
        )
        .await;
    assert_eq!(r.status(), 400, "partial=false keeps all-or-nothing");
    assert_eq!(a.buffered().await, 3);
    assert_eq!(a.dead_letters().await, 2);
    let r = a
        .post_encoded(
            "/v1/records?partial=maybe",
            "application/x-ndjson",
            "identity",
            nd.into_bytes(),
        )
        .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["details"][0]["field"], "partial", "{body}");
}

#[tokio::test]
async fn ingest_partial_in_the_config_makes_partial_acceptance_the_default() {
    let a = agent_with(|c| c.ingest.partial = true).await;
    let body = json!([
        {"stream": "ok", "payload": {}},
        {"stream": "ok", "payload": [1]},
    ]);
    let (status, body) = a.post("application/json", body.to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(
        (body["accepted"].clone(), body["rejected"].clone()),
        (json!(1), json!(1))
    );
    let (status, _) = a
        .post_query(
            "?partial=false",
            "application/json",
            r#"[{"stream":"ok","payload":[1]}]"#,
        )
        .await;
    assert_eq!(status, 400, "?partial=false overrides the default");
    assert_eq!(a.buffered().await, 1);
    assert_eq!(a.dead_letters().await, 1);
}

impl Agent {
    async fn post_query(&self, query: &str, content_type: &str, body: &str) -> (u16, Value) {
        let r = self
            .http
            .post(self.agent.endpoint(&format!("/v1/records{query}")))
            .header("content-type", content_type)
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

// ---------------------------------------------------------------------------
// OTLP/HTTP logs

mod otlp {
    use super::*;
    use opentelemetry_proto::tonic::collector::logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use prost::Message as _;

    fn string(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
            ..Default::default()
        }
    }

    /// `n` log records; those whose index is in `bad` carry an invalid stream.
    pub fn request(n: usize, bad: &[usize]) -> ExportLogsServiceRequest {
        let logs = (0..n)
            .map(|i| LogRecord {
                time_unix_nano: 1_765_000_000_000_000_000 + i as u64,
                severity_number: 9,
                severity_text: "INFO".into(),
                body: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(format!("line {i}"))),
                }),
                attributes: if bad.contains(&i) {
                    vec![string("dcs.stream", "Not A Stream")]
                } else {
                    vec![string("i", &i.to_string())]
                },
                trace_id: vec![7; 16],
                span_id: vec![9; 8],
                ..Default::default()
            })
            .collect();
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![string("service.name", "shop")],
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    log_records: logs,
                    ..Default::default()
                }],
                schema_url: String::new(),
            }],
        }
    }

    #[tokio::test]
    async fn otlp_protobuf_gzip_and_json_log_records_are_buffered_one_record_each() {
        let a = agent_with(|_| {}).await;
        let proto = request(100, &[]).encode_to_vec();
        let r = a
            .post_encoded("/v1/logs", "application/x-protobuf", "gzip", gzip(&proto))
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/x-protobuf");
        let answer = ExportLogsServiceResponse::decode(r.bytes().await.unwrap()).unwrap();
        assert_eq!(answer.partial_success, None, "fully accepted");
        assert_eq!(a.buffered().await, 100);

        let json_body = r#"{"resourceLogs":[{"resource":{"attributes":[{"key":"dcs.stream","value":{"stringValue":"shop.audit"}}]},
            "scopeLogs":[{"scope":{"name":"audit"},"logRecords":[
              {"timeUnixNano":"1765000000000000001","severityNumber":13,"body":{"stringValue":"a"},"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174"},
              {"observedTimeUnixNano":1765000000000000002,"body":{"intValue":"5"}}]}]}]}"#;
        let r = a
            .post_encoded("/v1/logs", "application/json", "identity", json_body.into())
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/json");
        let answer: Value = r.json().await.unwrap();
        assert!(
            answer.get("partialSuccess").is_none_or(Value::is_null),
            "{answer}"
        );
        assert_eq!(a.buffered().await, 102);
    }

    #[tokio::test]
    async fn otlp_log_records_that_cannot_be_records_get_a_partial_success_and_become_dead_letters()
    {
        let a = agent_with(|_| {}).await;
        let proto = request(50, &[3, 17]).encode_to_vec();
        let r = a
            .post_encoded("/v1/logs", "application/x-protobuf", "identity", proto)
            .await;
        assert_eq!(r.status(), 200);
        let answer = ExportLogsServiceResponse::decode(r.bytes().await.unwrap()).unwrap();
        let partial = answer.partial_success.expect("partial success");
        assert_eq!(partial.rejected_log_records, 2);
        assert!(partial.error_message.contains("dcs.stream"), "{partial:?}");
        assert_eq!(a.buffered().await, 48);
        assert_eq!(a.dead_letters().await, 2);
    }

    #[tokio::test]
    async fn otlp_errors_answer_in_the_request_encoding() {
        let a = agent_with(|_| {}).await;
        let r = a
            .post_encoded(
                "/v1/logs",
                "application/x-protobuf",
                "identity",
                vec![0xff; 9],
            )
            .await;
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["content-type"], "application/x-protobuf");
        let r = a
            .post_encoded(
                "/v1/logs",
                "application/json",
                "identity",
                b"{\"resourceLogs\":3}".to_vec(),
            )
            .await;
        assert_eq!(r.status(), 400);
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            (body["error"].as_str(), body["code"].as_i64()),
            (Some("malformed_otlp"), Some(3))
        );
        let r = a
            .post_encoded("/v1/logs", "text/plain", "identity", b"hello".to_vec())
            .await;
        assert_eq!(r.status(), 415);
        assert_eq!(a.buffered().await, 0);
    }

    #[tokio::test]
    async fn a_full_buffer_answers_otlp_with_503_and_retry_after() {
        let a = agent_with(|c| c.buffer.capacity = dcs_shared::config::ByteSize(1 << 20)).await;
        let proto = request(2000, &[]).encode_to_vec();
        let mut status = 200;
        let mut rounds = 0;
        while status == 200 {
            let r = a
                .post_encoded(
                    "/v1/logs",
                    "application/x-protobuf",
                    "identity",
                    proto.clone(),
                )
                .await;
            status = r.status().as_u16();
            if status != 200 {
                assert!(r.headers().contains_key("retry-after"));
            }
            rounds += 1;
            assert!(rounds < 100, "the buffer never filled");
        }
        assert_eq!(status, 503, "OTLP exporters retry 503, not 507");
        assert_eq!(a.buffered().await, 2000 * (rounds - 1));
    }
}
