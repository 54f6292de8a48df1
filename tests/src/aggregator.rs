//! An in-process aggregator on 127.0.0.1 and a free port, plus HTTP clients
//! that talk to it the way an agent does (mutual TLS, gzip bodies).

use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dcs_aggregator::Config;
use dcs_aggregator::config::{DatabaseConfig, TlsConfig};
use dcs_shared::wire::{self, BatchAck, ErrorBody, OutRecord};
use flate2::Compression;
use flate2::write::GzEncoder;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::pki::{AgentCert, Pki};

/// Bounds every test request so a hung server fails the test instead of
/// hanging it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct RunningAggregator {
    pub addr: SocketAddr,
    /// `https://localhost:PORT`, matching the server certificate's DNS name.
    pub url: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), dcs_aggregator::Error>>>,
}

impl RunningAggregator {
    /// `url` + `path`.
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Signals shutdown and waits for `serve` to return; panics if it failed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("aggregator task panicked")
                .expect("aggregator serve failed");
        }
    }
}

impl Drop for RunningAggregator {
    fn drop(&mut self) {
        // A test that panicked never called stop(): still stop accepting.
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The configuration [`start_aggregator`] uses: the Pki's server certificate,
/// the database at `db_url`, small pool, default limits, text logs.
pub fn test_config(pki: &Pki, db_url: &str) -> Config {
    let mut config = Config {
        tls: TlsConfig {
            ca: pki.ca.clone(),
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            ..TlsConfig::default()
        },
        database: DatabaseConfig::with_url(db_url),
        ..Config::default()
    };
    config.listen.address = "127.0.0.1:0".parse().expect("address");
    // Many aggregators share a test process: their admin ports must not clash.
    config.admin.address = "127.0.0.1:0".parse().expect("address");
    config.database.max_connections = 4;
    config.database.migrate_on_start = false;
    // No balancer to wait for: stopping a test aggregator starts closing its
    // connections at once.
    config.shutdown.drain_delay = Duration::ZERO;
    config
}

/// Starts an aggregator for `pki` writing to `db_url` (already migrated).
pub async fn start_aggregator(pki: &Pki, db_url: &str) -> RunningAggregator {
    start_aggregator_with(pki, db_url, |_| {}).await
}

/// Like [`start_aggregator`], after `adjust` has changed the configuration
/// (smaller limits, shorter timeouts).
pub async fn start_aggregator_with(
    pki: &Pki,
    db_url: &str,
    adjust: impl FnOnce(&mut Config),
) -> RunningAggregator {
    dcs_shared::tls::install_crypto_provider();
    let mut config = test_config(pki, db_url);
    adjust(&mut config);
    let listener = tokio::net::TcpListener::bind(config.listen.address)
        .await
        .expect("bind aggregator listener");
    let addr = listener.local_addr().expect("local addr");
    let pool = dcs_aggregator::connect(&config.database)
        .await
        .expect("aggregator pool");
    let (tx, rx) = oneshot::channel::<()>();
    // A dropped sender (test over) also means "stop".
    let shutdown = async move {
        let _ = rx.await;
    };
    let task = tokio::spawn(dcs_aggregator::serve(listener, config, pool, shutdown));
    RunningAggregator {
        addr,
        url: format!("https://localhost:{}", addr.port()),
        shutdown: Some(tx),
        task: Some(task),
    }
}

/// A client presenting `cert` and trusting only its CA, as an agent does.
pub fn agent_client(cert: &AgentCert) -> reqwest::Client {
    dcs_shared::tls::install_crypto_provider();
    let tls =
        dcs_shared::tls::client_config(&cert.ca, &cert.cert, &cert.key).expect("agent TLS config");
    build_client(tls)
}

/// Like [`client_without_certificate`], with `adjust` applied to the
/// builder (a local address to send from, a fixed resolution).
pub fn client_from(
    ca: &Path,
    adjust: impl FnOnce(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
) -> reqwest::Client {
    dcs_shared::tls::install_crypto_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in dcs_shared::tls::load_certs(ca).expect("CA certificate") {
        roots.add(cert).expect("add CA");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    adjust(
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(CLIENT_TIMEOUT),
    )
    .build()
    .expect("reqwest client")
}

/// A client that trusts `ca` but presents no certificate at all.
pub fn client_without_certificate(ca: &Path) -> reqwest::Client {
    client_from(ca, |builder| builder)
}

fn build_client(tls: rustls::ClientConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(CLIENT_TIMEOUT)
        .build()
        .expect("reqwest client")
}

/// Gzip-compresses `bytes` (a JSON document, usually) as an agent would.
pub fn gzip_json(bytes: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(bytes).expect("gzip to memory");
    gz.finish().expect("gzip to memory")
}

/// Gzip of `size` zero bytes (a multiple of 1 MiB): about a thousandth of
/// that on the wire, built in milliseconds. One MiB of zeros is deflated once
/// and its blocks repeated: after a sync flush they are byte-aligned, none
/// final, and refer only to data inside themselves.
pub fn gzip_bomb(size: usize) -> Vec<u8> {
    const MIB: usize = 1 << 20;
    let zeros = vec![0u8; MIB];
    let mut deflate = flate2::write::DeflateEncoder::new(Vec::new(), Compression::best());
    deflate.write_all(&zeros).expect("deflate to memory");
    deflate.flush().expect("sync flush");
    let blocks = deflate.get_ref().clone();
    let mut crc = flate2::Crc::new();
    let mut bomb = vec![0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0xff];
    for _ in 0..size / MIB {
        bomb.extend_from_slice(&blocks);
        crc.update(&zeros);
    }
    // An empty final block (fixed Huffman, end-of-block), then the trailer.
    bomb.extend_from_slice(&[0x03, 0x00]);
    bomb.extend_from_slice(&crc.sum().to_le_bytes());
    bomb.extend_from_slice(&crc.amount().to_le_bytes());
    bomb
}

/// An aggregator with the platform API enabled on its own port.
pub struct RunningPlatform {
    pub aggregator: RunningAggregator,
    /// `https://localhost:PORT` of the platform API.
    pub url: String,
    /// `http://127.0.0.1:PORT` of the admin listener (`/metrics`).
    pub admin_url: String,
    /// A client trusting only the test CA, without a client certificate:
    /// platform callers authenticate with bearer tokens.
    pub client: reqwest::Client,
}

impl RunningPlatform {
    /// `url` + `path`.
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

/// Like [`start_aggregator_with`], with the platform API listening on
/// 127.0.0.1 and a free port (server TLS with the Pki's server certificate).
pub async fn start_platform_with(
    pki: &Pki,
    db_url: &str,
    adjust: impl FnOnce(&mut Config),
) -> RunningPlatform {
    dcs_shared::tls::install_crypto_provider();
    let mut config = test_config(pki, db_url);
    config.platform.enabled = true;
    config.platform.address = "127.0.0.1:0".parse().expect("address");
    adjust(&mut config);
    let agents = tokio::net::TcpListener::bind(config.listen.address)
        .await
        .expect("bind aggregator listener");
    let platform = tokio::net::TcpListener::bind(config.platform.address)
        .await
        .expect("bind platform listener");
    let addr = agents.local_addr().expect("local addr");
    let platform_port = platform.local_addr().expect("local addr").port();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind admin listener");
    let admin_addr = admin.local_addr().expect("local addr");
    let pool = dcs_aggregator::connect(&config.database)
        .await
        .expect("aggregator pool");
    let (tx, rx) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = rx.await;
    };
    let listeners = dcs_aggregator::Listeners {
        agents,
        admin: Some(admin),
        platform: Some(platform),
    };
    let task = tokio::spawn(dcs_aggregator::serve_all(listeners, config, pool, shutdown));
    RunningPlatform {
        aggregator: RunningAggregator {
            addr,
            url: format!("https://localhost:{}", addr.port()),
            shutdown: Some(tx),
            task: Some(task),
        },
        url: format!("https://localhost:{platform_port}"),
        admin_url: format!("http://{admin_addr}"),
        client: client_without_certificate(&pki.ca),
    }
}

/// `url` with its user replaced by `role` (no password: the test server
/// trusts loopback connections).
pub fn with_user(url: &str, role: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let host = rest.find('@').map_or(rest, |at| &rest[at + 1..]);
    format!("{}{role}@{host}", &url[..start])
}

/// POSTs `body`, a batch as `wire::encode_batch` makes it (gzip JSON), to an
/// aggregator's batch endpoint at `url`, as the agent whose certificate
/// `client` holds.
pub async fn post_batch(client: &reqwest::Client, url: &str, body: Vec<u8>) -> reqwest::Response {
    client
        .post(url)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(body)
        .send()
        .await
        .expect("batch reaches the aggregator")
}

/// What the aggregator answered a batch, read whole: status, `Retry-After`
/// and the body.
#[derive(Debug)]
pub struct BatchAnswer {
    pub status: reqwest::StatusCode,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

impl BatchAnswer {
    /// Posts `body` like [`post_batch`] and reads the whole answer.
    pub async fn post(client: &reqwest::Client, url: &str, body: Vec<u8>) -> BatchAnswer {
        BatchAnswer::read(post_batch(client, url, body).await).await
    }

    pub async fn read(response: reqwest::Response) -> BatchAnswer {
        BatchAnswer {
            status: response.status(),
            retry_after: response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().expect("Retry-After is ASCII").to_owned()),
            body: response.bytes().await.expect("answer body").to_vec(),
        }
    }

    /// The acknowledgement's `(accepted, duplicates)`; panics (with the
    /// body) on anything but 200.
    pub fn counts(&self) -> (u64, u64) {
        assert_eq!(self.status, reqwest::StatusCode::OK, "{}", self.text());
        let ack: BatchAck = serde_json::from_slice(&self.body).expect("ack body");
        (ack.accepted, ack.duplicates)
    }

    /// The JSON error body; panics when the body is not one.
    pub fn error(&self) -> ErrorBody {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not a JSON error body ({e}): {}", self.text()))
    }

    /// A 503 `database_unavailable` with `Retry-After: retry_after_secs`:
    /// nothing was written and the agent keeps the batch.
    pub fn assert_retry_later(&self, retry_after_secs: u64) {
        assert_eq!(
            self.status,
            reqwest::StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            self.text()
        );
        assert_eq!(
            self.retry_after.as_deref(),
            Some(retry_after_secs.to_string().as_str())
        );
        assert_eq!(
            self.error().error,
            "database_unavailable",
            "{}",
            self.text()
        );
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A batch of `seqs` in `epoch`, every record on stream `s` with id `id` and
/// payload `{"n":seq}`. With `received`, each carries an agent accept time
/// derived from its seq.
pub fn numbered_batch(epoch: Uuid, seqs: RangeInclusive<i64>, received: bool) -> Vec<u8> {
    let payloads: Vec<(i64, String)> = seqs.map(|s| (s, format!(r#"{{"n":{s}}}"#))).collect();
    wire::encode_batch(
        epoch,
        None,
        payloads.iter().map(|(seq, payload)| OutRecord {
            seq: *seq,
            id: "id",
            stream: "s",
            ts_us: 1_700_000_000_000_000,
            payload,
            received: received.then_some(1_700_000_000_000_000 + seq),
        }),
        1,
    )
}
