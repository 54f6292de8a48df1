//! Edge agents for tests: in-process on 127.0.0.1 port 0, or a real `dcs-edge`
//! process that a test may SIGKILL and restart on the same buffer file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dcs_edge::Config;
use dcs_edge::config::AggregatorConfig;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::pki::AgentCert;

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
    config.validate().expect("valid agent config");
    let listener = tokio::net::TcpListener::bind(&config.listen.address)
        .await
        .expect("bind agent listener");
    let addr = listener.local_addr().expect("local addr");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(dcs_edge::run(config, listener, async move {
        let _ = rx.await;
    }));
    RunningAgent {
        addr,
        url: format!("http://{addr}"),
        shutdown: Some(tx),
        task: Some(task),
    }
}

/// Path of a workspace binary (`dcs-edge`, `dcs-aggregator`) built beside the
/// test executable. `cargo build --workspace --bins` builds them; the test
/// command in the README does that first.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// A free port on 127.0.0.1 (bound and released; a tiny race is acceptable in tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A `dcs-edge run` process configured entirely through `DCS_EDGE_*` variables.
pub struct AgentProcess {
    pub port: u16,
    pub url: String,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts the process and waits until `/health` answers.
    pub async fn spawn(config: &Config, log: &Path) -> AgentProcess {
        let port = free_port();
        let a = &config.aggregator;
        let mut env = vec![
            ("DCS_EDGE_LISTEN__ADDRESS", format!("127.0.0.1:{port}")),
            (
                "DCS_EDGE_BUFFER__PATH",
                config.buffer.path.display().to_string(),
            ),
            (
                "DCS_EDGE_BUFFER__CAPACITY",
                config.buffer.capacity.0.to_string(),
            ),
            ("DCS_EDGE_AGGREGATOR__URL", a.url.clone()),
            ("DCS_EDGE_AGGREGATOR__CA", a.ca.display().to_string()),
            ("DCS_EDGE_AGGREGATOR__CERT", a.cert.display().to_string()),
            ("DCS_EDGE_AGGREGATOR__KEY", a.key.display().to_string()),
            (
                "DCS_EDGE_BATCH__MAX_RECORDS",
                config.batch.max_records.to_string(),
            ),
            (
                "DCS_EDGE_BATCH__LINGER",
                format!("\"{}ms\"", config.batch.linger.as_millis()),
            ),
            (
                "DCS_EDGE_RETRY__INITIAL",
                format!("\"{}ms\"", config.retry.initial.as_millis()),
            ),
            (
                "DCS_EDGE_RETRY__MAX",
                format!("\"{}ms\"", config.retry.max.as_millis()),
            ),
            ("DCS_EDGE_LOG__FORMAT", "json".into()),
        ];
        if let Some(proxy) = &a.proxy {
            env.push(("DCS_EDGE_AGGREGATOR__PROXY", proxy.clone()));
        }
        let mut p = AgentProcess {
            port,
            url: format!("http://127.0.0.1:{port}"),
            env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            child: None,
            log: log.to_owned(),
        };
        p.start().await;
        p
    }

    /// (Re)starts the process on the same port and buffer file.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "agent process already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log file");
        let child = Command::new(binary("dcs-edge"))
            .arg("run")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn dcs-edge");
        self.child = Some(child);
        let health = format!("{}/health", self.url);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if client
                .get(&health)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "dcs-edge exited with {status} at start; log: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "dcs-edge did not become healthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown code runs, exactly like a crash or an OOM kill.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
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
