//! Edge agents for tests: in-process on 127.0.0.1 port 0, or a real `dcs-edge`
//! process that a test may SIGKILL and restart on the same buffer file.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use dcs_edge::Config;
use dcs_edge::config::AggregatorConfig;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::http::Fetch as _;
use crate::pki::AgentCert;
use crate::process::Service;

/// An agent configuration for tests: the given certificate and aggregator,
/// a buffer at `buffer`, short linger and retry cap so tests run fast.
pub fn test_config(cert: &AgentCert, aggregator_url: &str, buffer: &Path) -> Config {
    let mut config = Config::with_aggregator(AggregatorConfig {
        url: aggregator_url.to_owned(),
        ca: cert.ca.clone(),
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        proxy: None,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(30),
    });
    config.listen.address = "127.0.0.1:0".into();
    config.buffer.path = buffer.to_owned();
    config.batch.linger = Duration::from_millis(10);
    config.retry.initial = Duration::from_millis(50);
    config.retry.max = Duration::from_millis(500);
    config.retry.shutdown_grace = Duration::from_secs(2);
    config
}

pub struct RunningAgent {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), dcs_edge::Error>>>,
}

impl RunningAgent {
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// The agent's `/v1/status`; panics if it does not answer.
    pub async fn status(&self) -> Value {
        let status = status(&self.url).await;
        assert!(!status.is_null(), "{} did not answer /v1/status", self.url);
        status
    }

    /// The agent's `/metrics` text; panics if it does not answer.
    pub async fn metrics(&self) -> String {
        local_client()
            .get(self.endpoint("/metrics"))
            .fetch_text()
            .await
    }

    /// Stops the agent the way SIGTERM does and waits until the buffer is closed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("agent task panicked")
                .expect("agent failed");
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts an in-process agent with `config` (its listen address is used as is).
pub async fn start_agent(config: Config) -> RunningAgent {
    dcs_shared::tls::install_crypto_provider();
    let config = config.compile().expect("valid agent config");
    let listener = tokio::net::TcpListener::bind(&config.config().listen.address)
        .await
        .expect("bind agent listener");
    let addr = listener.local_addr().expect("local addr");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let result = dcs_edge::run(config, listener, async move {
            let _ = rx.await;
        })
        .await;
        // Seen at once, not only when a test calls stop().
        if let Err(error) = &result {
            eprintln!("in-process agent stopped with an error: {error}");
        }
        result
    });
    RunningAgent {
        addr,
        url: format!("http://{addr}"),
        shutdown: Some(tx),
        task: Some(task),
    }
}

pub use crate::process::{binary, free_port};

/// A `dcs-edge run` process configured entirely through `DCS_EDGE_*` variables.
pub struct AgentProcess {
    pub service: Service,
    pub url: String,
}

/// The `DCS_EDGE_*` environment that reproduces `config` for a `dcs-edge run`
/// listening on `listen` (the config's own listen address is not used).
pub fn agent_env(config: &Config, listen: SocketAddr) -> Vec<(String, String)> {
    let a = &config.aggregator;
    let ms = |d: Duration| format!("\"{}ms\"", d.as_millis());
    let kebab = |v: &dyn std::fmt::Debug| {
        let s = format!("{v:?}");
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if c.is_uppercase() && i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        }
        out
    };
    let mut env = vec![
        ("LISTEN__ADDRESS", listen.to_string()),
        ("BUFFER__PATH", config.buffer.path.display().to_string()),
        ("BUFFER__CAPACITY", config.buffer.capacity.0.to_string()),
        ("BUFFER__OVERFLOW", kebab(&config.buffer.overflow)),
        ("BUFFER__DURABILITY", kebab(&config.buffer.durability)),
        (
            "BUFFER__MIN_FREE_DISK",
            config.buffer.min_free_disk.0.to_string(),
        ),
        ("AGGREGATOR__URL", a.url.clone()),
        ("AGGREGATOR__CA", a.ca.display().to_string()),
        ("AGGREGATOR__CERT", a.cert.display().to_string()),
        ("AGGREGATOR__KEY", a.key.display().to_string()),
        ("AGGREGATOR__REQUEST_TIMEOUT", ms(a.request_timeout)),
        ("AGGREGATOR__CONNECT_TIMEOUT", ms(a.connect_timeout)),
        (
            "INGEST__MAX_REQUEST_BYTES",
            config.ingest.max_request_bytes.0.to_string(),
        ),
        ("BATCH__MAX_RECORDS", config.batch.max_records.to_string()),
        (
            "BATCH__MAX_IN_FLIGHT",
            config.batch.max_in_flight.to_string(),
        ),
        ("BATCH__LINGER", ms(config.batch.linger)),
        ("RETRY__INITIAL", ms(config.retry.initial)),
        ("RETRY__MAX", ms(config.retry.max)),
        ("RETRY__SHUTDOWN_GRACE", ms(config.retry.shutdown_grace)),
        ("LOG__FORMAT", "json".into()),
        ("LOG__LEVEL", config.log.level.clone()),
    ];
    if let Some(proxy) = &a.proxy {
        env.push(("AGGREGATOR__PROXY", proxy.clone()));
    }
    env.into_iter()
        .map(|(k, v)| (format!("{}{k}", dcs_edge::config::ENV_PREFIX), v))
        .collect()
}

impl AgentProcess {
    /// Starts `dcs-edge` with `config` on a free port; waits until `/health` answers.
    pub async fn spawn(config: &Config, log: &Path) -> AgentProcess {
        let port = free_port();
        let service = Service::new(
            "dcs-edge",
            &["run"],
            agent_env(config, SocketAddr::from(([127, 0, 0, 1], port))),
            port,
            log,
        );
        let mut p = AgentProcess {
            service,
            url: format!("http://127.0.0.1:{port}"),
        };
        p.start().await;
        p
    }

    /// Like [`AgentProcess::spawn`], plus `extra` variables (without the
    /// `DCS_EDGE_` prefix), e.g. `("SYSLOG", "[{protocol = \"tcp\", ...}]")`
    /// for settings `config` cannot carry through the environment.
    pub async fn spawn_with(config: &Config, extra: &[(&str, String)], log: &Path) -> AgentProcess {
        let port = free_port();
        let mut env = agent_env(config, SocketAddr::from(([127, 0, 0, 1], port)));
        env.extend(
            extra
                .iter()
                .map(|(k, v)| (format!("{}{k}", dcs_edge::config::ENV_PREFIX), v.clone())),
        );
        let service = Service::new("dcs-edge", &["run"], env, port, log);
        let mut p = AgentProcess {
            service,
            url: format!("http://127.0.0.1:{port}"),
        };
        p.start().await;
        p
    }

    /// (Re)starts the process on the same port and buffer file.
    pub async fn start(&mut self) {
        self.service.start().await;
        let health = format!("{}/health", self.url);
        let client = reqwest::Client::new();
        let ok = wait_until(Duration::from_secs(20), || async {
            client
                .get(&health)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(
            ok,
            "dcs-edge not healthy; log:\n{}",
            self.service.log_tail()
        );
    }

    pub fn kill(&mut self) {
        self.service.kill();
    }

    pub fn terminate(&mut self) -> bool {
        self.service.terminate()
    }
}

/// The `/v1/status` of the agent at `agent_url`, or `Null` while it does not
/// answer (a process being restarted).
pub async fn status(agent_url: &str) -> Value {
    match local_client()
        .get(format!("{agent_url}/v1/status"))
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// Asserts that a quarantine `report` (an entry of `/v1/status`'s
/// `quarantine`) is for a buffer whose write-ahead log was missing, and that
/// every one of the `held` records the file proves it held was salvaged.
pub fn assert_lost_wal_salvaged_all(report: &Value, held: u64) {
    assert!(
        report["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("write-ahead log is missing"),
        "{report}"
    );
    assert_eq!(report["held"], held, "{report}");
    assert_eq!(report["salvaged"], held, "{report}");
}

/// A client for an agent's local API: straight to 127.0.0.1 whatever proxy
/// the environment names, and bounded so a hung agent fails the test.
fn local_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Polls `check` until it returns true or `timeout` passes; returns the last answer.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// POSTs `body` to an agent's `/v1/records` with `content_type`.
pub async fn push(
    client: &reqwest::Client,
    agent_url: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    client
        .post(format!("{agent_url}/v1/records"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("push to agent")
}

/// NDJSON of `n` records on `stream` with ids `{prefix}-{i}` and a payload
/// carrying the index.
pub fn ndjson(stream: &str, prefix: &str, range: std::ops::Range<usize>) -> String {
    range
        .map(|i| {
            format!(
                "{{\"stream\":\"{stream}\",\"id\":\"{prefix}-{i}\",\"payload\":{{\"i\":{i},\"msg\":\"record {i}\"}}}}\n"
            )
        })
        .collect()
}

/// A sample's value from the Prometheus text at `{url}/metrics`: the first
/// line of metric `name` whose labels include every `label="value"` pair of
/// `labels`; `None` if there is none or the endpoint does not answer.
pub async fn metric_sample(url: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}
