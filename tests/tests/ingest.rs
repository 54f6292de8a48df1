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
        let st: Value = self
            .http
            .get(self.agent.endpoint("/v1/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
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
    let st: Value = a
        .http
        .get(a.agent.endpoint("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
