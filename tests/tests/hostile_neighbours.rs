//! The central tier under hostile and noisy neighbours (docs/SECURITY.md).
//!
//! One aggregator process (so its RSS can be read) with the platform API on.
//! A victim tenant's agent sends a 10-record batch every [`VICTIM_EVERY`]
//! throughout, one at a time. For each attack of [`ATTACKS`] the suite
//! measures the victim's p99 for [`PHASE`] right before the attack (the
//! baseline), then while the attack runs (at least [`PHASE`]), and asserts:
//! - none of the victim's batches failed, and its p99 stayed within twice
//!   that baseline, or within [`SLACK`] of it where that is more;
//! - the aggregator's peak RSS stayed under its memory budget (1 GiB);
//! - the attacker got the documented refusal.
//!
//! It prints one line per attack for the CI log:
//! `attack=NAME victim_p99_ms=… baseline_ms=… peak_rss_mb=… refusal=…`.
//!
//! Measuring honestly on a shared 2-core machine:
//! - each p99 is taken over about 250 batches, so it is the third-slowest
//!   batch, not the single slowest;
//! - the baseline is measured again right before each attack, so it reflects
//!   whatever else the machine is doing at the time;
//! - the attacker's own client work (TLS handshakes, building gzip bombs)
//!   runs on threads at a lower CPU priority than the victim's client, as it
//!   would on the attacker's own machine; the aggregator runs at normal
//!   priority and does all of its work for both. Payloads are built before
//!   the baseline, not during it;
//! - a p99 over the bound is measured again, baseline and attack, up to
//!   [`ATTEMPTS`] times (each miss is printed as a `miss attack=…` line); a
//!   failed victim batch is never retried away.
//!
//! The aggregator runs at normal priority and does all of its work for
//! both, except that its platform API (which the platform attacks reach)
//! runs on threads of its own at a lower CPU priority, as shipped
//! (`dcs_aggregator::PLATFORM_NICE`).
//!
//! The suite's aggregator uses the defaults except shorter handshake and
//! header deadlines ([`DEADLINE`]), so the slowloris phases see them fire.
//! The 10 000-connection flood needs an open-file limit above 10 000 in the
//! test process (the aggregator inherits it): `scripts/test.sh` raises the
//! soft limit to the hard one.
//!
//! Run by `scripts/test.sh` as its own step (it is `#[ignore]`d in the
//! workspace run so it does not run twice):
//! `cargo test -p dcs-tests --test e2e -- --ignored --nocapture hostile_neighbours::`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcs_aggregator::platform::tokens::{NewToken, create_token};
use dcs_shared::wire::{self, ErrorBody, OutRecord};
use dcs_tests::agent;
use dcs_tests::aggregator::{agent_client, client_without_certificate, gzip_bomb};
use dcs_tests::http::Fetch as _;
use dcs_tests::pg::TestDb;
use dcs_tests::pki::{AgentCert, Pki};
use dcs_tests::process::Service;
use reqwest::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use uuid::Uuid;

/// The aggregator's memory budget the suite holds it to (the default
/// `admission.memory_budget` is 512 MiB; RSS adds the runtime and the pools).
const RSS_LIMIT_MB: u64 = 1024;
/// How long each baseline and each attack run.
const PHASE: Duration = Duration::from_secs(5);
/// The victim's pace: about 250 batches per phase.
const VICTIM_EVERY: Duration = Duration::from_millis(20);
/// Baseline-and-attack measurements per attack before a p99 miss fails.
const ATTEMPTS: usize = 5;
/// The least the victim's p99 may rise over its baseline: the bound is
/// twice the baseline, but never under baseline + `SLACK`. With baselines
/// of 5 to 9 ms, twice the baseline leaves a few milliseconds, which a
/// few scheduler slices on a shared 2-core machine take (misses of +5 to
/// +21 ms were seen under `connections_10k` and `oversized_batches`, each
/// refused as documented and with no victim batch failing); a neighbour
/// that starves a tenant shows up as failed batches or p99s of hundreds of
/// milliseconds, far above it.
const SLACK: Duration = Duration::from_millis(20);
/// `limits.handshake_timeout` and `connections.header_timeout` of the
/// suite's aggregator (default 10 s each).
const DEADLINE: Duration = Duration::from_secs(3);
/// Connections of the connection flood, and the source addresses they come
/// from (fewer than `connections.max_connections_per_address` each).
const FLOOD_CONNECTIONS: usize = 10_000;
const FLOOD_ADDRESSES: u8 = 10;
/// Connections each slowloris attack holds.
const SLOWLORIS_CONNECTIONS: usize = 100;
/// The CPU priority (nice value) of the attacker's client threads.
const ATTACKER_NICE: i32 = 10;

type AttackFuture = Pin<Box<dyn Future<Output = String> + Send>>;
type Attack = fn(Arc<Bench>, Instant) -> AttackFuture;

/// The attacks, in order: each runs until the instant it is given (at
/// least), asserts the refusal it must get, and returns it as printed.
const ATTACKS: &[(&str, Attack)] = &[
    ("slowloris_agents", |b, _| {
        Box::pin(slowloris(b, Listener::Agents))
    }),
    ("slowloris_platform", |b, _| {
        Box::pin(slowloris(b, Listener::Platform))
    }),
    ("slowloris_admin", |b, _| {
        Box::pin(slowloris(b, Listener::Admin))
    }),
    ("connections_10k", |b, _| Box::pin(connection_flood(b))),
    ("slow_bodies", |b, _| Box::pin(slow_bodies(b))),
    ("agent_flood", |b, until| Box::pin(agent_flood(b, until))),
    ("oversized_batches", |b, _| Box::pin(oversized_batches(b))),
    ("gzip_bombs", |b, _| Box::pin(gzip_bombs(b))),
    ("deep_nesting", |b, _| Box::pin(deep_nesting(b))),
    ("platform_nul", |b, _| Box::pin(platform_nul(b))),
    ("crafted_cursor", |b, _| Box::pin(crafted_cursor(b))),
    ("audit_flood", |b, _| Box::pin(audit_flood(b))),
];

struct Bench {
    db: TestDb,
    pki: Pki,
    aggregator: Service,
    agents_port: u16,
    platform_port: u16,
    admin_port: u16,
    token: String,
    /// Built once, before any baseline (see the module documentation).
    big_batch: Vec<u8>,
    bomb: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl Bench {
    async fn start() -> Bench {
        let db = TestDb::new().await;
        let pki = Pki::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let agents_port = agent::free_port();
        let platform_port = agent::free_port();
        let admin_port = agent::free_port();
        let deadline = format!("{}s", DEADLINE.as_secs());
        let env = [
            ("LISTEN__ADDRESS", format!("127.0.0.1:{agents_port}")),
            ("ADMIN__ADDRESS", format!("127.0.0.1:{admin_port}")),
            ("PLATFORM__ENABLED", "true".into()),
            ("PLATFORM__ADDRESS", format!("127.0.0.1:{platform_port}")),
            ("TLS__CA", pki.ca.display().to_string()),
            ("TLS__CERT", pki.server_cert.display().to_string()),
            ("TLS__KEY", pki.server_key.display().to_string()),
            ("DATABASE__URL", db.url.clone()),
            ("DATABASE__MIGRATE_ON_START", "false".into()),
            ("LIMITS__HANDSHAKE_TIMEOUT", deadline.clone()),
            ("CONNECTIONS__HEADER_TIMEOUT", deadline),
            ("LOG__FORMAT", "json".into()),
            ("LOG__LEVEL", "warn".into()),
        ];
        let mut aggregator =
            Service::aggregator(env, agents_port, &dir.path().join("aggregator.log"));
        aggregator.start().await;
        for tenant in ["victim", "attacker", "acme"] {
            sqlx::query("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(tenant)
                .execute(&db.pool)
                .await
                .expect("tenant");
        }
        let token = create_token(
            &db.pool,
            &NewToken {
                name: "hostile-suite".into(),
                role: "admin".into(),
                tenant: None,
                expires_in: None,
            },
            "test".into(),
            None,
        )
        .await
        .expect("token")
        .token;
        Bench {
            db,
            pki,
            aggregator,
            agents_port,
            platform_port,
            admin_port,
            token,
            big_batch: big_batch(900_000),
            bomb: gzip_bomb(1 << 30),
            _dir: dir,
        }
    }

    fn peak_rss_mb(&self) -> u64 {
        self.aggregator.peak_rss_kib().expect("peak RSS") / 1024
    }

    fn batches(&self) -> String {
        format!(
            "https://localhost:{}{}",
            self.agents_port,
            wire::BATCHES_PATH
        )
    }

    fn platform_url(&self) -> String {
        format!("https://localhost:{}", self.platform_port)
    }

    /// `dcs_aggregator_connections_refused_total{listener, reason}` now.
    async fn refusals(&self, listener: &str, reason: &str) -> u64 {
        let text = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/metrics", self.admin_port))
            .timeout(Duration::from_secs(30))
            .fetch_text()
            .await;
        let (l, r) = (
            format!("listener=\"{listener}\""),
            format!("reason=\"{reason}\""),
        );
        text.lines()
            .filter(|line| line.starts_with("dcs_aggregator_connections_refused_total{"))
            .find(|line| line.contains(&l) && line.contains(&r))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }
}

/// Lowers the calling thread's CPU priority (Linux nice values are per
/// thread). The attacker's client work then yields to the victim's.
fn lower_priority() {
    // SAFETY: setpriority has no memory-safety preconditions; `0` names the
    // calling thread.
    unsafe {
        nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, ATTACKER_NICE);
    }
}

/// The soft open-file limit of this process (the aggregator inherits it).
fn open_file_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// The victim

/// Sends one small batch every [`VICTIM_EVERY`], one at a time, on its own
/// thread at normal priority, and records each batch's latency and any
/// failure.
struct Victim {
    latencies: Arc<Mutex<Vec<Duration>>>,
    failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Victim {
    fn start(cert: AgentCert, url: String) -> Victim {
        let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let (l, f, s) = (latencies.clone(), failures.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("victim runtime");
            runtime.block_on(async move {
                let client = agent_client(&cert);
                let epoch = Uuid::now_v7();
                let mut seq = 0i64;
                let mut tick = tokio::time::interval(VICTIM_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !s.load(Ordering::SeqCst) {
                    tick.tick().await;
                    let records: Vec<OutRecord> = (0..10)
                        .map(|i| OutRecord {
                            seq: seq + i + 1,
                            id: "victim",
                            stream: "plant.sensors",
                            ts_us: 1_700_000_000_000_000 + seq + i,
                            payload: r#"{"temperature":21.5}"#,
                            received: None,
                        })
                        .collect();
                    seq += 10;
                    let body = wire::encode_batch(epoch, None, records, 1);
                    let started = Instant::now();
                    let result = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("content-encoding", "gzip")
                        .body(body)
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await;
                    let elapsed = started.elapsed();
                    match result {
                        Ok(r) if r.status() == StatusCode::OK => l.lock().unwrap().push(elapsed),
                        Ok(r) => {
                            let failure =
                                format!("{}: {}", r.status(), r.text().await.unwrap_or_default());
                            f.lock().unwrap().push(failure);
                        }
                        Err(e) => f.lock().unwrap().push(e.to_string()),
                    }
                }
            });
        });
        Victim {
            latencies,
            failures,
            stop,
            thread: Some(thread),
        }
    }

    /// The p99 and failures since the last call, which starts a new phase.
    fn phase(&self) -> (Duration, usize, Vec<String>) {
        let mut latencies = std::mem::take(&mut *self.latencies.lock().unwrap());
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        latencies.sort();
        let p99 = latencies
            .get((latencies.len() * 99).div_ceil(100).saturating_sub(1))
            .copied()
            .unwrap_or_default();
        (p99, latencies.len(), failures)
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Attacks

/// The aggregator's three listeners.
#[derive(Debug, Clone, Copy)]
enum Listener {
    Agents,
    Platform,
    Admin,
}

impl Listener {
    fn label(self) -> &'static str {
        match self {
            Listener::Agents => "agents",
            Listener::Platform => "platform",
            Listener::Admin => "admin",
        }
    }

    fn port(self, b: &Bench) -> u16 {
        match self {
            Listener::Agents => b.agents_port,
            Listener::Platform => b.platform_port,
            Listener::Admin => b.admin_port,
        }
    }

    /// How an attacker speaks TLS to it (none on the admin listener); on
    /// the agents' listener with a valid certificate of its own tenant.
    fn connector(self, b: &Bench) -> Option<TlsConnector> {
        let mut config = match self {
            Listener::Admin => return None,
            Listener::Agents => {
                let cert = b.pki.agent("attacker", "loris-1");
                dcs_shared::tls::client_config(&cert.ca, &cert.cert, &cert.key)
                    .expect("attacker TLS config")
            }
            Listener::Platform => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in dcs_shared::tls::load_certs(&b.pki.ca).expect("CA") {
                    roots.add(cert).expect("add CA");
                }
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth()
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(TlsConnector::from(Arc::new(config)))
    }
}

/// A TCP connection to `port` from `source`.
async fn connect_from(source: IpAddr, port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
}

/// Waits until the server closes `stream`, writing `drip` every 500 ms
/// meanwhile (nothing if empty); `None` if it is still open at `deadline`.
async fn held_until_closed<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    drip: &[u8],
    opened: Instant,
    deadline: tokio::time::Instant,
) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Some(opened.elapsed()),
                // An error response before the close is fine: keep reading.
                Ok(_) => {}
            },
            () = tokio::time::sleep(Duration::from_millis(500)), if !drip.is_empty() => {
                if stream.write_all(drip).await.is_err() || stream.flush().await.is_err() {
                    return Some(opened.elapsed());
                }
            }
            () = tokio::time::sleep_until(deadline) => return None,
        }
    }
}

/// Slowloris on one listener: [`SLOWLORIS_CONNECTIONS`] connections from
/// other loopback addresses, on TLS listeners half of them silent before
/// the handshake and half sending a request head one header line per
/// 500 ms, never finishing it (on the admin listener all of them). Each
/// must be closed within its deadline, counted by reason.
async fn slowloris(b: Arc<Bench>, listener: Listener) -> String {
    let label = listener.label();
    let before_handshake = b.refusals(label, "handshake_timeout").await;
    let before_header = b.refusals(label, "header_timeout").await;
    let connector = listener.connector(&b);
    let port = listener.port(&b);
    let deadline = tokio::time::Instant::now() + DEADLINE + Duration::from_secs(5);
    let mut tasks = Vec::new();
    let mut silent = 0;
    for i in 0..SLOWLORIS_CONNECTIONS {
        let source = IpAddr::from([127, 0, 0, 20 + (i % 5) as u8]);
        let before_tls = connector.is_some() && i % 2 == 0;
        silent += usize::from(before_tls);
        let connector = connector.clone();
        tasks.push(tokio::spawn(async move {
            let opened = Instant::now();
            let mut tcp = connect_from(source, port).await.expect("connect");
            let head = b"GET /health HTTP/1.1\r\nhost: localhost\r\n";
            let drip = b"x-slow: 1\r\n";
            match connector {
                _ if before_tls => held_until_closed(tcp, b"", opened, deadline).await,
                None => {
                    tcp.write_all(head).await.expect("head");
                    held_until_closed(tcp, drip, opened, deadline).await
                }
                Some(connector) => {
                    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
                    let mut tls = connector.connect(name, tcp).await.expect("TLS");
                    tls.write_all(head).await.expect("head");
                    tls.flush().await.expect("flush");
                    held_until_closed(tls, drip, opened, deadline).await
                }
            }
        }));
    }
    let mut slowest = Duration::ZERO;
    let mut still_open = 0;
    for task in tasks {
        match task.await.expect("slowloris connection") {
            Some(held) => slowest = slowest.max(held),
            None => still_open += 1,
        }
    }
    let handshake = b.refusals(label, "handshake_timeout").await - before_handshake;
    let header = b.refusals(label, "header_timeout").await - before_header;
    let refusal = format!(
        "closed_{}_of_{SLOWLORIS_CONNECTIONS}_within_{}ms,handshake_timeout_x{handshake},header_timeout_x{header}",
        SLOWLORIS_CONNECTIONS - still_open,
        slowest.as_millis()
    );
    assert_eq!(still_open, 0, "slowloris {label}: {refusal}");
    assert!(
        slowest <= DEADLINE + Duration::from_secs(2),
        "slowloris {label}: {refusal}"
    );
    assert!(
        handshake as usize >= silent && header as usize >= SLOWLORIS_CONNECTIONS - silent,
        "slowloris {label}: {refusal}"
    );
    refusal
}

/// [`FLOOD_CONNECTIONS`] TCP connections at once to the platform listener
/// (which needs no client certificate), from [`FLOOD_ADDRESSES`] loopback
/// addresses, held silent: past `connections.max_connections` each is
/// closed right after accept, the rest at the handshake deadline; every one
/// is counted by reason and none outlives its deadline.
async fn connection_flood(b: Arc<Bench>) -> String {
    let limit = open_file_limit();
    assert!(
        limit as usize > FLOOD_CONNECTIONS + 2_000,
        "connections_10k needs an open-file limit above {} (ulimit -n is {limit}; \
         scripts/test.sh raises the soft limit to the hard one)",
        FLOOD_CONNECTIONS + 2_000
    );
    let before_cap = b.refusals("platform", "max_connections").await;
    let before_handshake = b.refusals("platform", "handshake_timeout").await;
    let port = b.platform_port;
    let per_address = FLOOD_CONNECTIONS / usize::from(FLOOD_ADDRESSES);
    let mut openers = Vec::new();
    for a in 0..FLOOD_ADDRESSES {
        let source = IpAddr::from([127, 0, 0, 30 + a]);
        openers.push(tokio::spawn(async move {
            let mut held = Vec::with_capacity(per_address);
            let mut failed = 0usize;
            for _ in 0..per_address {
                let opened = Instant::now();
                match tokio::time::timeout(Duration::from_secs(10), connect_from(source, port))
                    .await
                {
                    Ok(Ok(tcp)) => {
                        // Each connection's own deadline: on a loaded machine
                        // opening all 10,000 takes longer than the server
                        // takes to close the first ones.
                        let deadline = tokio::time::Instant::from_std(opened)
                            + DEADLINE
                            + Duration::from_secs(20);
                        held.push(tokio::spawn(held_until_closed(tcp, b"", opened, deadline)))
                    }
                    _ => failed += 1,
                }
            }
            (held, failed)
        }));
    }
    let mut held = Vec::new();
    let mut failed = 0;
    for opener in openers {
        let (h, f) = opener.await.expect("opener");
        held.extend(h);
        failed += f;
    }
    let connected = held.len();
    let mut still_open = 0;
    let mut slowest = Duration::ZERO;
    for h in held {
        match h.await.expect("held connection") {
            Some(d) => slowest = slowest.max(d),
            None => still_open += 1,
        }
    }
    let capped = b.refusals("platform", "max_connections").await - before_cap;
    let timed_out = b.refusals("platform", "handshake_timeout").await - before_handshake;
    let refusal = format!(
        "max_connections_x{capped},handshake_timeout_x{timed_out},connect_failed_x{failed},\
         still_open_x{still_open},slowest_close_{}ms",
        slowest.as_millis()
    );
    assert_eq!(connected + failed, FLOOD_CONNECTIONS);
    assert_eq!(still_open, 0, "connections_10k: {refusal}");
    assert_eq!(
        (capped + timed_out) as usize,
        connected,
        "connections_10k: every connection is refused or timed out, by reason: {refusal}"
    );
    refusal
}

/// A batch of `records` records, each a small JSON object, compressed hard.
fn big_batch(records: usize) -> Vec<u8> {
    let payload =
        r#"{"filler":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    let out: Vec<OutRecord> = (0..records)
        .map(|i| OutRecord {
            seq: i as i64 + 1,
            id: "flood",
            stream: "flood",
            ts_us: 1_700_000_000_000_000,
            payload,
            received: None,
        })
        .collect();
    wire::encode_batch(Uuid::now_v7(), None, out, 6)
}

/// Posts a batch; `(status, error code)`, or `(0, why)` when no answer came.
async fn try_post_batch(client: &reqwest::Client, url: &str, body: Vec<u8>) -> (u16, String) {
    match client
        .post(url)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            let code = r
                .json::<ErrorBody>()
                .await
                .map(|e| e.error)
                .unwrap_or_default();
            (status, code)
        }
        Err(e) => (0, e.to_string()),
    }
}

/// `(status, code)` pairs summarised as `429 too_many_in_flight ×12, 200 ×4`.
fn tally(outcomes: &[(u16, String)]) -> String {
    let mut counts: Vec<((u16, String), usize)> = Vec::new();
    for o in outcomes {
        match counts.iter_mut().find(|(k, _)| k == o) {
            Some((_, n)) => *n += 1,
            None => counts.push((o.clone(), 1)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    counts
        .iter()
        .map(|((s, c), n)| format!("{s}_{c}_x{n}").replace("__", "_"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Sixteen bodies trickled at a byte per 200 ms by one agent: four are
/// admitted (and hold no database slot while they trickle), the rest are
/// refused at once with 429.
async fn slow_bodies(b: Arc<Bench>) -> String {
    let cert = b.pki.agent("attacker", "slow-1");
    let mut config = dcs_shared::tls::client_config(&cert.ca, &cert.cert, &cert.key)
        .expect("attacker TLS config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    let addr = format!("127.0.0.1:{}", b.agents_port);
    let mut streams = Vec::new();
    for _ in 0..16 {
        let tcp = TcpStream::connect(&addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = connector.connect(name, tcp).await.expect("TLS");
        let head = format!(
            "POST {} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
             content-encoding: gzip\r\ncontent-length: 100000\r\n\r\n",
            wire::BATCHES_PATH
        );
        tls.write_all(head.as_bytes()).await.expect("head");
        tls.flush().await.expect("flush");
        streams.push(tls);
    }
    let mut tasks = Vec::new();
    for mut tls in streams {
        tasks.push(tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + PHASE;
            let mut reply = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                tokio::select! {
                    read = tls.read(&mut chunk) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            reply.extend_from_slice(&chunk[..n]);
                            if reply.windows(4).any(|w| w == b"\r\n\r\n") { break; }
                        }
                    },
                    () = tokio::time::sleep(Duration::from_millis(200)) => {
                        if tls.write_all(b"\x1f").await.is_err() { break; }
                        let _ = tls.flush().await;
                    }
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            let text = String::from_utf8_lossy(&reply).into_owned();
            let status = text
                .strip_prefix("HTTP/1.1 ")
                .and_then(|r| r.get(..3))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0u16);
            let code = text
                .split("\"error\":\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or(if status == 0 { "still_trickling" } else { "" })
                .to_owned();
            (status, code)
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("slow client"));
    }
    let refused = outcomes
        .iter()
        .filter(|(s, c)| *s == 429 && c == "too_many_in_flight")
        .count();
    assert_eq!(refused, 12, "slow_bodies: {}", tally(&outcomes));
    tally(&outcomes)
}

/// Sixteen small valid batches at once from one agent, again and again.
async fn agent_flood(b: Arc<Bench>, until: Instant) -> String {
    let client = agent_client(&b.pki.agent("attacker", "flood-1"));
    let url = b.batches();
    let mut outcomes = Vec::new();
    while Instant::now() < until {
        let rounds: Vec<_> = (0..16)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move { try_post_batch(&client, &url, big_batch(20)).await })
            })
            .collect();
        for r in rounds {
            outcomes.push(r.await.expect("flood request"));
        }
    }
    assert!(
        outcomes
            .iter()
            .any(|(s, c)| *s == 429 && c == "too_many_in_flight"),
        "agent_flood: {}",
        tally(&outcomes)
    );
    // A refusal sent before the body was read may reset the stream under
    // a client still sending it: the client sees a transport error (0),
    // which an agent retries like a 429. Nothing else is acceptable.
    assert!(
        outcomes.iter().all(|(s, _)| matches!(s, 0 | 200 | 429)),
        "agent_flood: {}",
        tally(&outcomes)
    );
    let outcomes: Vec<_> = outcomes
        .into_iter()
        .map(|(s, c)| {
            if s == 0 {
                (0, "reset".to_owned())
            } else {
                (s, c)
            }
        })
        .collect();
    tally(&outcomes)
}

/// Sixteen parallel batches of ~128 MiB of JSON each (what took the old
/// aggregator to 5.9 GB), from four agents of one tenant.
async fn oversized_batches(b: Arc<Bench>) -> String {
    let clients: Vec<_> = (0..4)
        .map(|i| agent_client(&b.pki.agent("attacker", &format!("big-{i}"))))
        .collect();
    let mut outcomes = Vec::new();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (client, b) = (clients[i % 4].clone(), b.clone());
            tokio::spawn(
                async move { try_post_batch(&client, &b.batches(), b.big_batch.clone()).await },
            )
        })
        .collect();
    for t in tasks {
        outcomes.push(t.await.expect("oversized request"));
    }
    assert!(
        outcomes
            .iter()
            .all(|(s, c)| *s == 413 && c == "batch_too_large"),
        "oversized_batches: {}",
        tally(&outcomes)
    );
    tally(&outcomes)
}

/// Sixteen parallel 1 GiB gzip bombs from four agents.
async fn gzip_bombs(b: Arc<Bench>) -> String {
    let clients: Vec<_> = (0..4)
        .map(|i| agent_client(&b.pki.agent("attacker", &format!("bomb-{i}"))))
        .collect();
    let mut outcomes = Vec::new();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (client, b) = (clients[i % 4].clone(), b.clone());
            tokio::spawn(async move { try_post_batch(&client, &b.batches(), b.bomb.clone()).await })
        })
        .collect();
    for t in tasks {
        outcomes.push(t.await.expect("bomb request"));
    }
    assert!(
        outcomes
            .iter()
            .all(|(s, c)| *s == 413 && c == "batch_too_large"),
        "gzip_bombs: {}",
        tally(&outcomes)
    );
    tally(&outcomes)
}

/// A record whose payload nests 100 000 arrays deep.
async fn deep_nesting(b: Arc<Bench>) -> String {
    let depth = 100_000;
    let payload = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let body = wire::encode_batch(
        Uuid::now_v7(),
        None,
        [OutRecord {
            seq: 1,
            id: "deep",
            stream: "deep",
            ts_us: 1_700_000_000_000_000,
            payload: &payload,
            received: None,
        }],
        6,
    );
    let client = agent_client(&b.pki.agent("attacker", "deep-1"));
    let outcome = try_post_batch(&client, &b.batches(), body).await;
    assert!(matches!(outcome.0, 400 | 422), "deep_nesting: {outcome:?}");
    tally(&[outcome])
}

/// NULs in query parameters, path ids and JSON strings of the platform API.
async fn platform_nul(b: Arc<Bench>) -> String {
    let client = client_without_certificate(&b.pki.ca);
    let token = &b.token;
    let mut outcomes = Vec::new();
    platform_nul_round(&b, &client, token, &mut outcomes).await;
    assert!(
        outcomes
            .iter()
            .all(|(s, c)| *s == 400 && c == "bad_request"),
        "platform_nul: {}",
        tally(&outcomes)
    );
    tally(&outcomes)
}

async fn platform_nul_round(
    b: &Bench,
    client: &reqwest::Client,
    token: &str,
    outcomes: &mut Vec<(u16, String)>,
) {
    for (method, path) in [
        ("GET", "/api/v1/records?tenant=acme%00"),
        ("GET", "/api/v1/records?stream=%00"),
        ("GET", "/api/v1/agents/1%00"),
        ("POST", "/api/v1/tenants/%00x/disable"),
        ("GET", "/api/v1/audit?action=%00"),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let r = client
            .request(method, format!("{}{path}", b.platform_url()))
            .bearer_auth(token)
            .send()
            .await
            .expect("platform request");
        let status = r.status().as_u16();
        let body: ErrorBody = r.json().await.expect("JSON error body");
        assert!(body.message.contains("NUL"), "{path}: {}", body.message);
        outcomes.push((status, body.error));
    }
    let r = client
        .post(format!("{}/api/v1/tenants", b.platform_url()))
        .bearer_auth(token)
        .json(&serde_json::json!({ "id": "evil\u{0}", "display_name": "x" }))
        .send()
        .await
        .expect("platform request");
    let status = r.status().as_u16();
    let body: ErrorBody = r.json().await.expect("JSON error body");
    assert!(body.message.contains("/id"), "{}", body.message);
    outcomes.push((status, body.error));
}

/// A cursor naming a timestamp PostgreSQL cannot hold, and parameters of
/// the wrong type.
async fn crafted_cursor(b: Arc<Bench>) -> String {
    use base64::Engine as _;
    let client = client_without_certificate(&b.pki.ca);
    let cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        "{}:1:{}:1",
        i64::MAX,
        Uuid::nil()
    ));
    let mut outcomes = Vec::new();
    let paths = [
        format!("/api/v1/records?tenant=acme&cursor={cursor}"),
        "/api/v1/records?tenant=acme&limit=abc".to_owned(),
        "/api/v1/agents/abc".to_owned(),
    ];
    for path in &paths {
        let r = client
            .get(format!("{}{path}", b.platform_url()))
            .bearer_auth(&b.token)
            .send()
            .await
            .expect("platform request");
        let status = r.status().as_u16();
        let body: ErrorBody = r.json().await.expect("JSON error body");
        outcomes.push((status, body.error));
    }
    assert!(
        outcomes.iter().all(|(s, _)| *s == 400),
        "crafted_cursor: {}",
        tally(&outcomes)
    );
    tally(&outcomes)
}

/// 1 000 refused logins with 8 KB paths from 50 addresses of one /24: the
/// audit trail takes at most the prefix's allowance, each row bounded.
async fn audit_flood(b: Arc<Bench>) -> String {
    let before = b.db.count("audit").await;
    // As long as the listener takes in a request head (larger is 431).
    let long = "a".repeat(8_000);
    let port = b.platform_port;
    let mut tasks = Vec::new();
    for host in 2..52u8 {
        let client = dcs_tests::aggregator::client_from(&b.pki.ca, |builder| {
            builder
                .local_address(std::net::IpAddr::from([127, 0, 0, host]))
                .resolve(
                    "localhost",
                    std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                )
        });
        // A matched route, so the request is authenticated (and refused)
        // with its 8 KB path as the audit target.
        let url = format!("{}/api/v1/tenants/{long}/disable", b.platform_url());
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..20 {
                let outcome = match client
                    .post(&url)
                    .bearer_auth("dcs_not_a_token")
                    .send()
                    .await
                {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let retry_after = r.headers().contains_key("retry-after");
                        let code = r
                            .json::<ErrorBody>()
                            .await
                            .map_or_else(|_| "?".into(), |b| b.error);
                        let with_retry_after = if retry_after {
                            ""
                        } else {
                            "_without_retry_after"
                        };
                        (status, format!("{code}{with_retry_after}"))
                    }
                    Err(_) => (0, "transport".to_owned()),
                };
                outcomes.push(outcome);
            }
            outcomes
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.extend(t.await.expect("audit flood client"));
    }
    let rows = b.db.count("audit").await - before;
    let widest: i32 = sqlx::query_scalar("SELECT coalesce(max(length(target)), 0) FROM audit")
        .fetch_one(&b.db.pool)
        .await
        .expect("audit widths");
    // Refused with 401 until the prefix is locked out, then with 429 before
    // any token lookup. A request is checked against the lockout before its
    // lookup and counted after it, so each of the 50 clients may have one
    // lookup in flight when the prefix reaches its count.
    let unauthorized = outcomes.iter().filter(|(s, _)| *s == 401).count();
    let in_flight = 50;
    assert!(
        outcomes
            .iter()
            .all(|(s, c)| *s == 401 || (*s == 429 && c == "too_many_refusals")),
        "audit_flood: {}",
        tally(&outcomes)
    );
    assert!(
        unauthorized as u64
            <= dcs_aggregator::platform::audit::RefusalThrottle::LOCKOUT_PER_PREFIX + in_flight,
        "audit_flood: {} looked up past the lockout",
        tally(&outcomes)
    );
    assert!(
        rows <= i64::from(dcs_aggregator::platform::audit::RefusalThrottle::PER_PREFIX) + 1,
        "audit_flood wrote {rows} rows"
    );
    assert!(
        widest as usize <= dcs_aggregator::platform::audit::MAX_TARGET_BYTES,
        "an audit target of {widest} bytes"
    );
    format!(
        "{}_audit_rows={rows}_widest_target={widest}",
        tally(&outcomes)
    )
}

/// One attack's measurement: the victim's baseline right before it, then
/// the victim's p99 and failures while it ran.
struct Measured {
    baseline: Duration,
    p99: Duration,
    sent: usize,
    failures: Vec<String>,
    refusal: String,
}

async fn measure(b: &Arc<Bench>, victim: &Victim, attack: Attack) -> Measured {
    victim.phase();
    tokio::time::sleep(PHASE).await;
    let (baseline, base_sent, base_failures) = victim.phase();
    assert!(
        base_sent > 100 && base_failures.is_empty(),
        "baseline: {base_sent} sent, {base_failures:?}"
    );
    let started = Instant::now();
    let until = started + PHASE;
    let refusal = tokio::spawn(attack(b.clone(), until))
        .await
        .expect("attack task");
    // Every attack overlaps a whole phase of the victim's sending.
    if let Some(rest) = PHASE.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let (p99, sent, failures) = victim.phase();
    Measured {
        baseline,
        p99,
        sent,
        failures,
        refusal,
    }
}

async fn suite() {
    let b = Arc::new(Bench::start().await);
    // Started before this thread's priority is lowered: the victim's thread
    // inherits it. (The aggregator was spawned from here too.)
    let victim = Victim::start(b.pki.agent("victim", "edge-1"), b.batches());
    lower_priority();
    // The first batches pay for the TLS handshake and the agent's first row:
    // not part of the steady state the baselines measure.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // `DCS_HOSTILE_ATTACKS=a,b` runs only those attacks (while working on one).
    let only = std::env::var("DCS_HOSTILE_ATTACKS").ok();
    let chosen = |attack: &str| {
        only.as_deref()
            .is_none_or(|list| list.split(',').any(|a| a.trim() == attack))
    };
    let mut problems = Vec::new();
    for &(attack, run) in ATTACKS.iter().filter(|(attack, _)| chosen(attack)) {
        for attempt in 1..=ATTEMPTS {
            let m = measure(&b, &victim, run).await;
            let rss = b.peak_rss_mb();
            let bound = (m.baseline * 2).max(m.baseline + SLACK);
            let within = m.p99 <= bound;
            let line = format!(
                "attack={attack} victim_p99_ms={} baseline_ms={} peak_rss_mb={rss} refusal={}",
                m.p99.as_millis(),
                m.baseline.as_millis(),
                m.refusal,
            );
            if !within && m.failures.is_empty() && attempt < ATTEMPTS {
                println!("miss {line} attempt={attempt}/{ATTEMPTS}");
                continue;
            }
            println!("{line}");
            if !m.failures.is_empty() {
                problems.push(format!(
                    "{attack}: the victim's batches failed: {:?}",
                    m.failures
                ));
            }
            if m.sent == 0 {
                problems.push(format!("{attack}: the victim sent nothing"));
            }
            if !within {
                problems.push(format!(
                    "{attack}: victim p99 {:?} > {bound:?} (2 × baseline {:?}, at least baseline + {SLACK:?}) in {ATTEMPTS} attempts",
                    m.p99, m.baseline
                ));
            }
            if rss > RSS_LIMIT_MB {
                problems.push(format!("{attack}: peak RSS {rss} MB > {RSS_LIMIT_MB} MB"));
            }
            break;
        }
    }
    drop(victim);
    assert!(
        problems.is_empty(),
        "{}\nlog:\n{}",
        problems.join("\n"),
        b.aggregator.log_tail()
    );
}

#[test]
#[ignore = "run by scripts/test.sh as its own step, with --nocapture"]
fn no_neighbour_can_exhaust_the_aggregator_or_stall_another_tenant() {
    dcs_shared::tls::install_crypto_provider();
    // The attacker's side: every thread of this runtime but the test's own
    // (which lowers itself once the aggregator and the victim are started).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(lower_priority)
        .build()
        .expect("attacker runtime");
    runtime.block_on(suite());
}
