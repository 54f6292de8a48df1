//! A fleet of edge agents against one central tier, for the fleet test
//! (`tests/tests/fleet.rs`) and the fleet benchmark (`dcs-fleet`).
//!
//! Design constraints:
//! - **The real delivery path.** A simulated agent is an edge agent without
//!   its local HTTP API: its own SQLite buffer (so its own epoch and seq
//!   stream), and the agent's own [`Forwarder`] (batching, gzip, retries,
//!   `Retry-After`, max-age reconnects) with its own mutual-TLS client, so
//!   its own certificate and its own connection. Only the producer is
//!   simulated: records are appended to the buffer, which is what the ingest
//!   API does after parsing.
//! - **Certificates from our own CA code**, cached on disk ([`Pki::cached`]),
//!   so a thousand agents do not mean a thousand signatures per run.
//! - **Offered load per agent**: every agent offers `rate` records/s except
//!   the first `heavy` ones, which offer `heavy_factor` times that (a few
//!   heavy sites, many light ones). Fairness is judged among the light ones.
//! - **Real processes too**: `real_agents` of the fleet are `dcs-edge run`
//!   processes fed over their HTTP API at the same rate.
//! - **A ledger**: a record counts as acknowledged once its append committed
//!   (simulated) or its producer got a 2xx (real). [`Fleet::verify`] compares
//!   that with PostgreSQL, per agent.
//!
//! Buffers use `durability = "process-crash"`: every agent of a real fleet
//! fsyncs its own disk; a thousand of them fsyncing this machine's one disk
//! would measure the disk, not the central tier.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dcs_edge::buffer::{Buffer, Durability};
use dcs_edge::config::AggregatorConfig;
use dcs_edge::forwarder::{Forwarder, Link, SharedClient, http_client};
use dcs_shared::record::Record;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agent::status as agent_status;
use crate::agent::{self, AgentProcess};
use crate::pki::{AgentCert, Pki};

/// Producers top up their agent this often.
const PRODUCE_EVERY: Duration = Duration::from_millis(250);
/// Stream the fleet's records are written under.
pub const STREAM: &str = "fleet";

#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub tenant: String,
    /// Agents in all, simulated and real.
    pub agents: usize,
    /// How many of them are `dcs-edge` processes (the last ones).
    pub real_agents: usize,
    /// Records/s a light agent offers.
    pub rate: f64,
    /// How many agents (the first ones) are heavy.
    pub heavy: usize,
    /// A heavy agent offers `rate * heavy_factor`.
    pub heavy_factor: f64,
    /// Approximate payload size of a record.
    pub record_bytes: usize,
    /// The balancer or aggregator, `https://localhost:PORT`.
    pub aggregator_url: String,
    /// Buffers and logs.
    pub dir: PathBuf,
}

/// What one agent of the fleet is.
enum Kind {
    Simulated {
        buffer: Buffer,
        link: Arc<Link>,
        forwarder: JoinHandle<()>,
    },
    Real {
        process: AgentProcess,
    },
}

/// One agent and its producer's ledger.
struct Member {
    name: String,
    rate: f64,
    heavy: bool,
    kind: Kind,
    /// Records acknowledged to the producer.
    acked: Arc<AtomicU64>,
    /// Records the producer tried to hand over.
    offered: Arc<AtomicU64>,
}

/// Per-agent figures at one moment.
#[derive(Debug, Clone, Default)]
pub struct AgentSample {
    pub name: String,
    pub heavy: bool,
    pub offered: u64,
    pub acked: u64,
    /// Records the aggregator acknowledged to the agent.
    pub delivered: u64,
    /// Records still buffered.
    pub backlog: u64,
    /// Delivery attempts repeated after a failure.
    pub retries: u64,
}

/// The fleet against PostgreSQL.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub acked: u64,
    /// Rows of the fleet's agents in `records`.
    pub in_pg: u64,
    /// Acknowledged records not in PostgreSQL.
    pub missing: u64,
    /// Rows beyond the first of a record id.
    pub duplicated: u64,
}

pub struct Fleet {
    members: Vec<Member>,
    stop_forwarders: watch::Sender<bool>,
    stop_producers: watch::Sender<bool>,
    producers: Vec<JoinHandle<()>>,
    tenant: String,
}

impl Fleet {
    /// Starts every agent (connections are opened by their first batch, the
    /// high-water check) and its producer.
    pub async fn start(config: &FleetConfig, pki: &Pki) -> anyhow::Result<Fleet> {
        dcs_shared::tls::install_crypto_provider();
        std::fs::create_dir_all(&config.dir)?;
        let (stop_forwarders, forwarders_stop) = watch::channel(false);
        let (stop_producers, producers_stop) = watch::channel(false);
        let simulated = config.agents.saturating_sub(config.real_agents);
        let mut members = Vec::with_capacity(config.agents);
        for i in 0..config.agents {
            let name = format!("agent-{i:05}");
            let cert = pki.agent_cached(&config.tenant, &name);
            let heavy = i < config.heavy;
            let rate = if heavy {
                config.rate * config.heavy_factor
            } else {
                config.rate
            };
            let buffer_path = config.dir.join(format!("{name}.db"));
            let kind = if i < simulated {
                simulated_agent(config, &cert, &buffer_path, forwarders_stop.clone()).await?
            } else {
                let agent_config = agent::test_config(&cert, &config.aggregator_url, &buffer_path);
                let process =
                    AgentProcess::spawn(&agent_config, &config.dir.join(format!("{name}.log")))
                        .await;
                Kind::Real { process }
            };
            members.push(Member {
                name,
                rate,
                heavy,
                kind,
                acked: Arc::default(),
                offered: Arc::default(),
            });
        }
        let producers = members
            .iter()
            .map(|m| {
                let producer = Producer {
                    name: m.name.clone(),
                    rate: m.rate,
                    record_bytes: config.record_bytes,
                    acked: m.acked.clone(),
                    offered: m.offered.clone(),
                };
                let target = match &m.kind {
                    Kind::Simulated { buffer, .. } => Target::Buffer(buffer.clone()),
                    Kind::Real { process } => Target::Http(process.url.clone()),
                };
                tokio::spawn(producer.run(target, producers_stop.clone()))
            })
            .collect();
        Ok(Fleet {
            members,
            stop_forwarders,
            stop_producers,
            producers,
            tenant: config.tenant.clone(),
        })
    }

    /// Each agent's figures now.
    pub async fn sample(&self) -> Vec<AgentSample> {
        let mut out = Vec::with_capacity(self.members.len());
        for m in &self.members {
            let (delivered, backlog, retries) = match &m.kind {
                Kind::Simulated { buffer, link, .. } => {
                    let stats = buffer.stats();
                    (
                        stats.delivered_total,
                        stats.records,
                        link.snapshot().retries,
                    )
                }
                Kind::Real { process } => {
                    let status = agent_status(&process.url).await;
                    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
                    (
                        n(&status["buffer"]["delivered_total"]),
                        // An unanswered status is not an empty buffer.
                        status["buffer"]["records"].as_u64().unwrap_or(u64::MAX),
                        n(&status["delivery"]["retries"]),
                    )
                }
            };
            out.push(AgentSample {
                name: m.name.clone(),
                heavy: m.heavy,
                offered: m.offered.load(Ordering::Relaxed),
                acked: m.acked.load(Ordering::Relaxed),
                delivered,
                backlog,
                retries,
            });
        }
        out
    }

    /// Stops the producers; the agents keep delivering.
    pub async fn stop_producing(&mut self) {
        let _ = self.stop_producers.send(true);
        for p in self.producers.drain(..) {
            let _ = p.await;
        }
    }

    /// Waits until every agent's buffer is empty; false on timeout.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.sample().await.iter().all(|s| s.backlog == 0) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Compares every agent's ledger with its rows in PostgreSQL.
    pub async fn verify(&self, pool: &PgPool) -> anyhow::Result<Verification> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT a.name, count(*)::int8, count(DISTINCT r.record_id)::int8 \
             FROM records r JOIN agents a ON a.id = r.agent_id \
             WHERE a.tenant_id = $1 AND r.stream = $2 GROUP BY a.name",
        )
        .bind(&self.tenant)
        .bind(STREAM)
        .fetch_all(pool)
        .await?;
        let stored: std::collections::HashMap<String, (u64, u64)> = rows
            .into_iter()
            .map(|(name, rows, distinct)| (name, (rows as u64, distinct as u64)))
            .collect();
        let mut v = Verification::default();
        for m in &self.members {
            let acked = m.acked.load(Ordering::Relaxed);
            let (rows, distinct) = stored.get(&m.name).copied().unwrap_or_default();
            v.acked += acked;
            v.in_pg += rows;
            v.duplicated += rows - distinct;
            // Ids are issued in order and an append is all or nothing, so
            // the distinct ids stored are the acknowledged ones (plus, for a
            // real agent, a push whose 2xx was lost) when nothing is missing.
            v.missing += acked.saturating_sub(distinct);
        }
        Ok(v)
    }

    /// Stops every agent the way SIGTERM does.
    pub async fn stop(mut self) {
        self.stop_producing().await;
        let _ = self.stop_forwarders.send(true);
        for m in self.members {
            match m.kind {
                Kind::Simulated {
                    buffer, forwarder, ..
                } => {
                    let _ = forwarder.await;
                    buffer.close().await;
                }
                Kind::Real { mut process } => {
                    tokio::task::block_in_place(|| process.terminate());
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// Opens an agent's buffer and starts its forwarder.
async fn simulated_agent(
    config: &FleetConfig,
    cert: &AgentCert,
    buffer_path: &Path,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Kind> {
    let mut agent = dcs_edge::Config::with_aggregator(AggregatorConfig {
        url: config.aggregator_url.clone(),
        ca: cert.ca.clone(),
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        proxy: None,
        connect_timeout: dcs_edge::config::DEFAULT_CONNECT_TIMEOUT,
        request_timeout: dcs_edge::config::DEFAULT_REQUEST_TIMEOUT,
    });
    agent.buffer.path = buffer_path.to_owned();
    agent.buffer.durability = Durability::ProcessCrash;
    agent.buffer.capacity = dcs_shared::config::ByteSize(256 << 20);
    agent.buffer.min_free_disk = dcs_shared::config::ByteSize(16 << 20);
    let options = agent.buffer_options()?;
    let buffer = tokio::task::spawn_blocking(move || Buffer::open(options)).await??;
    let link = Arc::new(Link::default());
    let client = SharedClient::new(http_client(&agent)?);
    let forwarder = Forwarder::with_client(&agent, buffer.clone(), link.clone(), client)?;
    let forwarder = tokio::spawn(forwarder.run(stop));
    Ok(Kind::Simulated {
        buffer,
        link,
        forwarder,
    })
}

enum Target {
    Buffer(Buffer),
    /// A `dcs-edge` process's URL.
    Http(String),
}

struct Producer {
    name: String,
    rate: f64,
    record_bytes: usize,
    acked: Arc<AtomicU64>,
    offered: Arc<AtomicU64>,
}

impl Producer {
    /// Offers `rate` records/s (with fractions carried over) until stopped.
    async fn run(self, target: Target, mut stop: watch::Receiver<bool>) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        let filler = "x".repeat(self.record_bytes.saturating_sub(40));
        let mut tick = tokio::time::interval(PRODUCE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Spread the fleet's ticks over the period.
        tokio::time::sleep(PRODUCE_EVERY.mul_f64(fastrand::f64())).await;
        let started = Instant::now();
        let mut next = 0u64;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {}
            }
            let due = (started.elapsed().as_secs_f64() * self.rate) as u64;
            if due <= next {
                continue;
            }
            let ids: Vec<String> = (next..due).map(|i| format!("{}-{i}", self.name)).collect();
            next = due;
            let n = ids.len() as u64;
            self.offered.fetch_add(n, Ordering::Relaxed);
            let ok = match &target {
                Target::Buffer(buffer) => {
                    let records = ids
                        .into_iter()
                        .map(|id| Record {
                            id: Some(id),
                            stream: STREAM.to_owned(),
                            ts_us: None,
                            payload: format!("{{\"v\":1,\"pad\":\"{filler}\"}}"),
                        })
                        .collect();
                    buffer.append(records).await.is_ok()
                }
                Target::Http(url) => {
                    let body: String = ids
                        .iter()
                        .map(|id| {
                            format!(
                                "{{\"stream\":\"{STREAM}\",\"id\":\"{id}\",\"payload\":{{\"v\":1,\"pad\":\"{filler}\"}}}}\n"
                            )
                        })
                        .collect();
                    http.post(format!("{url}/v1/records"))
                        .header("content-type", "application/x-ndjson")
                        .body(body)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                }
            };
            if ok {
                self.acked.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}
