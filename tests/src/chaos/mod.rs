//! Fault scenarios in the manner of Jepsen: concurrent producers push records
//! with unique ids through a real agent process, a fault is injected (kills,
//! partitions, outages, a full buffer), and the checker then proves that every
//! acknowledged record is in PostgreSQL exactly once and every refused one is
//! absent. The same scenarios run briefly as tests and for hours through the
//! `dcs-chaos` binary.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;

use crate::agent::{self, AgentProcess};
use crate::faultproxy::{Fault, FaultProxy};
use crate::pg::PgCluster;
use crate::pki::Pki;
use crate::process::{Service, free_port};

/// The stream every chaos record is pushed on.
pub const STREAM: &str = "chaos";
/// How long the checker waits for the backlog to drain after the faults stop.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(180);

/// How long and how hard a scenario pushes.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub duration: Duration,
    pub producers: usize,
    /// Records per request.
    pub chunk: usize,
    /// Pause between one producer's requests.
    pub pace: Duration,
}

impl Plan {
    /// The short variant for CI.
    pub fn short() -> Plan {
        Plan {
            duration: Duration::from_secs(15),
            producers: 4,
            chunk: 50,
            pace: Duration::from_millis(10),
        }
    }

    pub fn with_duration(duration: Duration) -> Plan {
        Plan {
            duration,
            ..Plan::short()
        }
    }
}

/// What producers were told, by record id.
#[derive(Debug, Default)]
pub struct Ledger {
    acked: Mutex<HashSet<String>>,
    refused: Mutex<HashSet<String>>,
    /// No definitive answer before the scenario ended (agent down at the end).
    unknown: Mutex<HashSet<String>>,
}

impl Ledger {
    pub fn acked(&self) -> usize {
        self.acked.lock().expect("ledger").len()
    }
    pub fn refused(&self) -> usize {
        self.refused.lock().expect("ledger").len()
    }
    /// Records that `ids` were acknowledged (2xx).
    pub fn add_acked(&self, ids: &[String]) {
        self.acked
            .lock()
            .expect("ledger")
            .extend(ids.iter().cloned());
    }
    /// Records that `ids` were refused (4xx or 5xx).
    pub fn add_refused(&self, ids: &[String]) {
        self.refused
            .lock()
            .expect("ledger")
            .extend(ids.iter().cloned());
    }
    /// Records that `ids` got no definitive answer.
    pub fn add_unknown(&self, ids: &[String]) {
        self.unknown
            .lock()
            .expect("ledger")
            .extend(ids.iter().cloned());
    }
}

/// The verdict of one scenario.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub scenario: String,
    pub acked: usize,
    pub in_pg: usize,
    pub missing: usize,
    pub duplicated: usize,
    pub refused: usize,
    /// Refused records that nevertheless reached PostgreSQL.
    pub refused_present: usize,
    pub unknown: usize,
    /// Extra figures a scenario reports (kills, peak RSS, dropped...).
    pub notes: Vec<(String, String)>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.refused_present == 0
    }

    pub fn note(&mut self, key: &str, value: impl fmt::Display) {
        self.notes.push((key.to_owned(), value.to_string()));
    }

    /// Panics with the report when a record was lost, doubled or wrongly kept.
    /// The line also goes to the file named by `DCS_SCENARIO_LOG`, which
    /// `scripts/test.sh` prints after the tests: `cargo test` shows a passing
    /// test's output to nobody.
    pub fn assert_ok(&self) {
        println!("{self}");
        log_scenario(&self.to_string());
        assert!(self.ok(), "{self}");
        assert!(self.acked > 0, "no record was acknowledged: {self}");
    }
}

/// Appends one `scenario=` line to the file named by `DCS_SCENARIO_LOG`, if set.
pub fn log_scenario(line: &str) {
    use std::io::Write as _;
    let Ok(path) = std::env::var("DCS_SCENARIO_LOG") else {
        return;
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(error) = written {
        eprintln!("cannot append to DCS_SCENARIO_LOG {path}: {error}");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "scenario={} acked={} in_pg={} missing={} duplicated={} refused={}",
            self.scenario, self.acked, self.in_pg, self.missing, self.duplicated, self.refused
        )?;
        if self.refused_present > 0 {
            write!(f, " refused_present={}", self.refused_present)?;
        }
        if self.unknown > 0 {
            write!(f, " unknown={}", self.unknown)?;
        }
        for (k, v) in &self.notes {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

/// One agent, one aggregator, one test-owned PostgreSQL, a fault proxy on
/// the link between agent and aggregator.
pub struct World {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub cluster: PgCluster,
    pub aggregator: Service,
    pub proxy: FaultProxy,
    pub agent: AgentProcess,
    pub agent_config: dcs_edge::Config,
}

impl World {
    pub async fn new(adjust_agent: impl FnOnce(&mut dcs_edge::Config)) -> World {
        dcs_shared::tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::new();
        let cluster = PgCluster::start().await;
        let pool = PgPool::connect(&cluster.url())
            .await
            .expect("connect cluster");
        dcs_aggregator::migrate(&pool).await.expect("migrate");
        pool.close().await;

        let agg_port = free_port();
        let env = [
            ("LISTEN__ADDRESS", format!("127.0.0.1:{agg_port}")),
            ("ADMIN__ADDRESS", "127.0.0.1:0".into()),
            ("TLS__CA", pki.ca.display().to_string()),
            ("TLS__CERT", pki.server_cert.display().to_string()),
            ("TLS__KEY", pki.server_key.display().to_string()),
            ("DATABASE__URL", cluster.url()),
            ("DATABASE__MIGRATE_ON_START", "false".into()),
            ("DATABASE__ACQUIRE_TIMEOUT", "\"1s\"".into()),
            ("DATABASE__MAX_CONNECTIONS", "4".into()),
            ("LIMITS__RETRY_AFTER", "\"1s\"".into()),
            ("LOG__FORMAT", "json".into()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("DCS_AGG_{k}"), v))
        .collect();
        let mut aggregator = Service::new(
            "dcs-aggregator",
            &["serve"],
            env,
            agg_port,
            &dir.path().join("aggregator.log"),
        );
        aggregator.start().await;
        let proxy = FaultProxy::start(([127, 0, 0, 1], agg_port).into()).await;

        let mut agent_config = agent::test_config(
            &pki.agent("acme", "chaos-1"),
            &format!("https://localhost:{}", proxy.addr.port()),
            &dir.path().join("buffer.db"),
        );
        agent_config.batch.max_records = 500;
        agent_config.retry.max = Duration::from_secs(1);
        adjust_agent(&mut agent_config);
        let agent = AgentProcess::spawn(&agent_config, &dir.path().join("agent.log")).await;
        World {
            dir,
            pki,
            cluster,
            aggregator,
            proxy,
            agent,
            agent_config,
        }
    }

    /// The agent's `/v1/status`, or `Null` while it is down.
    pub async fn agent_status(&self) -> Value {
        agent_status(&self.agent.url).await
    }

    /// Runs `plan.producers` producers against the agent until `plan.duration`
    /// has passed, while `faults` runs; returns the ledger once both are done.
    pub async fn run(
        &mut self,
        plan: Plan,
        faults: impl AsyncFnOnce(&mut World, Instant),
    ) -> Arc<Ledger> {
        let ledger = Arc::new(Ledger::default());
        let until = Instant::now() + plan.duration;
        let producers: Vec<_> = (0..plan.producers)
            .map(|p| {
                tokio::spawn(produce(
                    self.agent.url.clone(),
                    p,
                    plan,
                    until,
                    ledger.clone(),
                ))
            })
            .collect();
        faults(self, until).await;
        for p in producers {
            p.await.expect("producer panicked");
        }
        ledger
    }

    /// Waits for every acknowledged record to arrive (bounded), then compares
    /// PostgreSQL with the ledger.
    pub async fn check(&self, scenario: &str, ledger: &Ledger) -> Report {
        let pool = PgPool::connect(&self.cluster.url())
            .await
            .expect("connect for check");
        let report = verify(&pool, &self.agent.url, scenario, ledger).await;
        pool.close().await;
        report
    }
}

/// The agent's `/v1/status`, or `Null` while it is down.
pub async fn agent_status(agent_url: &str) -> Value {
    match reqwest::Client::new()
        .get(format!("{agent_url}/v1/status"))
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// Waits (bounded) until every acknowledged record is in `pool` and the
/// agent's buffer is empty, then compares PostgreSQL with the ledger.
pub async fn verify(pool: &PgPool, agent_url: &str, scenario: &str, ledger: &Ledger) -> Report {
    let acked: HashSet<String> = ledger.acked.lock().expect("ledger").clone();
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let present: i64 =
            sqlx::query_scalar("SELECT count(DISTINCT record_id) FROM records WHERE stream = $1")
                .bind(STREAM)
                .fetch_one(pool)
                .await
                .unwrap_or(0);
        let drained = agent_status(agent_url).await["buffer"]["records"] == 0;
        if (present as usize >= acked.len() && drained) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    compare(pool, scenario, ledger).await
}

/// Compares PostgreSQL with the ledger, without waiting for a drain.
pub async fn compare(pool: &PgPool, scenario: &str, ledger: &Ledger) -> Report {
    compare_on(pool, scenario, ledger, RecordKey::RecordId).await
}

/// What identifies a record of a scenario in PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKey {
    /// The record's `id` (pushed records).
    RecordId,
    /// The payload's `k` field (pulled records carry no id).
    PayloadK,
}

impl RecordKey {
    pub fn sql(self) -> &'static str {
        match self {
            RecordKey::RecordId => "record_id",
            RecordKey::PayloadK => "payload->>'k'",
        }
    }
}

/// [`compare`], with the records told apart by `key`.
pub async fn compare_on(pool: &PgPool, scenario: &str, ledger: &Ledger, key: RecordKey) -> Report {
    let acked: HashSet<String> = ledger.acked.lock().expect("ledger").clone();
    let key = key.sql();
    let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {key}, count(*) FROM records WHERE stream = $1 AND {key} IS NOT NULL GROUP BY 1"
    )))
    .bind(STREAM)
    .fetch_all(pool)
    .await
    .expect("read records");
    let counts: HashMap<String, i64> = rows.into_iter().collect();
    let refused = ledger.refused.lock().expect("ledger");
    let unknown = ledger.unknown.lock().expect("ledger");
    Report {
        scenario: scenario.to_owned(),
        acked: acked.len(),
        in_pg: counts.values().sum::<i64>() as usize,
        missing: acked.iter().filter(|id| !counts.contains_key(*id)).count(),
        duplicated: counts.values().filter(|c| **c > 1).count(),
        refused: refused.len(),
        refused_present: refused.iter().filter(|id| counts.contains_key(*id)).count(),
        unknown: unknown.len(),
        notes: Vec::new(),
    }
}

/// One producer: pushes NDJSON requests of unique ids until `until`. A request
/// without a definitive answer (the agent died mid-request) is retried with
/// the same ids, which the agent deduplicates, so every id ends acknowledged
/// or refused.
pub async fn produce(
    url: String,
    producer: usize,
    plan: Plan,
    until: Instant,
    ledger: Arc<Ledger>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut next = 0usize;
    while Instant::now() < until {
        let ids: Vec<String> = (next..next + plan.chunk)
            .map(|i| format!("p{producer}-{i}"))
            .collect();
        next += plan.chunk;
        let body: String = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                format!(
                    "{{\"stream\":\"{STREAM}\",\"id\":\"{id}\",\"payload\":{{\"producer\":{producer},\"n\":{i},\"note\":\"chaos record\"}}}}\n"
                )
            })
            .collect();
        let give_up = until + Duration::from_secs(60);
        loop {
            let answer = client
                .post(format!("{url}/v1/records"))
                .header("content-type", "application/x-ndjson")
                .body(body.clone())
                .send()
                .await;
            match answer {
                Ok(r) if r.status().is_success() => {
                    ledger
                        .acked
                        .lock()
                        .expect("ledger")
                        .extend(ids.iter().cloned());
                    break;
                }
                Ok(r) if r.status().is_client_error() || r.status().is_server_error() => {
                    ledger
                        .refused
                        .lock()
                        .expect("ledger")
                        .extend(ids.iter().cloned());
                    break;
                }
                _ if Instant::now() > give_up => {
                    ledger
                        .unknown
                        .lock()
                        .expect("ledger")
                        .extend(ids.iter().cloned());
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        tokio::time::sleep(plan.pace).await;
    }
}

/// Sleeps a random time in `[lo, hi)`.
async fn jitter_sleep(lo: Duration, hi: Duration) {
    let span = hi.saturating_sub(lo);
    tokio::time::sleep(lo + span.mul_f64(fastrand::f64())).await;
}

/// Interval between faults so that at least `count` fit in `duration`.
fn interval(duration: Duration, count: u32) -> Duration {
    duration / (count + 1)
}

/// Scenario 1: the agent is SIGKILLed at random moments and restarted.
pub async fn agent_kill(plan: Plan, kills: u32) -> Report {
    let mut world = World::new(|_| {}).await;
    let every = interval(plan.duration, kills);
    let ledger = world
        .run(plan, async |w, _| {
            for _ in 0..kills {
                jitter_sleep(every / 2, every).await;
                w.agent.kill();
                w.agent.start().await;
            }
        })
        .await;
    let mut report = world.check("agent-kill", &ledger).await;
    report.note("kills", kills);
    report
}

/// Scenario 2: the aggregator is SIGKILLed while batches are in flight.
pub async fn aggregator_kill(plan: Plan, kills: u32) -> Report {
    let mut world = World::new(|_| {}).await;
    let every = interval(plan.duration, kills);
    let ledger = world
        .run(plan, async |w, _| {
            for _ in 0..kills {
                jitter_sleep(every / 2, every).await;
                w.aggregator.kill();
                jitter_sleep(Duration::from_millis(50), Duration::from_millis(500)).await;
                w.aggregator.start().await;
            }
        })
        .await;
    let mut report = world.check("aggregator-kill", &ledger).await;
    report.note("kills", kills);
    report
}

/// Scenario 3: PostgreSQL stopped (fast, then immediate) and restarted mid-stream.
pub async fn postgres_restart(plan: Plan) -> Report {
    let mut world = World::new(|_| {}).await;
    let step = plan.duration / 5;
    let ledger = world
        .run(plan, async |w, _| {
            for mode in ["fast", "immediate"] {
                tokio::time::sleep(step).await;
                w.cluster.stop(mode).await;
                tokio::time::sleep(step).await;
                w.cluster.start_again().await;
            }
        })
        .await;
    world.check("postgres-restart", &ledger).await
}

/// Scenario 4: the link between agent and aggregator fails in each way the
/// fault proxy knows, then heals.
pub async fn partition(plan: Plan) -> Report {
    let mut world = World::new(|c| c.aggregator.request_timeout = Duration::from_secs(3)).await;
    let faults = [
        Fault::Refuse,
        Fault::Blackhole,
        Fault::ResetMidRequest,
        Fault::LostAck,
        Fault::Latency(200),
        Fault::Throttle(64 * 1024),
    ];
    let step = plan.duration / (faults.len() as u32 * 2);
    let ledger = world
        .run(plan, async |w, _| {
            for fault in faults {
                tokio::time::sleep(step).await;
                w.proxy.set(fault);
                tokio::time::sleep(step).await;
                w.proxy.set(Fault::Pass);
            }
        })
        .await;
    let mut report = world.check("partition", &ledger).await;
    report.note(
        "acks_dropped",
        world
            .proxy
            .acks_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    report
}

/// Scenario 6a: the link is down and the buffer fills: producers get 507,
/// nothing acknowledged is lost, ingest recovers when the link returns.
pub async fn buffer_full(plan: Plan) -> Report {
    let mut world = World::new(|c| c.buffer.capacity = dcs_shared::config::ByteSize(1 << 20)).await;
    world.proxy.set(Fault::Refuse);
    let ledger = world
        .run(plan, async |w, until| {
            tokio::time::sleep(until.saturating_duration_since(Instant::now()) / 2).await;
            w.proxy.set(Fault::Pass);
        })
        .await;
    let report = world.check("buffer-full", &ledger).await;
    assert!(report.refused > 0, "the buffer never filled: {report}");
    report
}

/// A small tmpfs for a buffer that must run out of disk; unmounted on drop.
pub struct SmallDisk {
    pub dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (e.g. "6m"); `Err` with the reason when this
    /// process may not mount (not root, or no tmpfs).
    pub fn mount(size: &str) -> Result<SmallDisk, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(SmallDisk { dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Scenario 6c: the buffer's filesystem fills up for real (SQLite reports a
/// full disk): producers get 507, nothing acknowledged is lost, and ingest
/// works again once delivery frees pages. `None` when tmpfs cannot be mounted.
pub async fn disk_full(plan: Plan) -> Option<Report> {
    let disk = match SmallDisk::mount("16m") {
        Ok(d) => d,
        Err(reason) => {
            eprintln!("SKIP disk-full on a small filesystem: cannot mount tmpfs: {reason}");
            return None;
        }
    };
    let path = disk.dir.path().join("buffer.db");
    let mut world = World::new(|c| {
        c.buffer.path = path;
        c.buffer.capacity = dcs_shared::config::ByteSize(1 << 30);
        c.buffer.min_free_disk = dcs_shared::config::ByteSize(3 << 20);
    })
    .await;
    world.proxy.set(Fault::Refuse);
    let ledger = world
        .run(plan, async |w, until| {
            tokio::time::sleep(until.saturating_duration_since(Instant::now()) / 2).await;
            w.proxy.set(Fault::Pass);
        })
        .await;
    let mut report = world.check("disk-full", &ledger).await;
    assert!(report.refused > 0, "the disk never filled: {report}");
    let after = reqwest::Client::new()
        .post(format!("{}/v1/records", world.agent.url))
        .header("content-type", "application/x-ndjson")
        .body(agent::ndjson("after-full", "after", 0..100))
        .send()
        .await
        .expect("push after recovery");
    report.note("ingest_after_recovery", after.status().as_u16());
    assert_eq!(after.status(), 200, "ingest did not recover: {report}");
    drop(world);
    drop(disk);
    Some(report)
}

/// Scenario 6b: `drop-oldest`: the buffer evicts, and the number of evicted
/// records the agent reports equals exactly the acknowledged records missing.
pub async fn drop_oldest(plan: Plan) -> Report {
    let mut world = World::new(|c| {
        c.buffer.capacity = dcs_shared::config::ByteSize(1 << 20);
        c.buffer.overflow = dcs_edge::buffer::Overflow::DropOldest;
    })
    .await;
    world.proxy.set(Fault::Refuse);
    let ledger = world
        .run(plan, async |w, until| {
            tokio::time::sleep(until.saturating_duration_since(Instant::now()) / 2).await;
            w.proxy.set(Fault::Pass);
        })
        .await;
    let mut report = world.check("drop-oldest", &ledger).await;
    let dropped = world.agent_status().await["buffer"]["dropped_total"]
        .as_u64()
        .unwrap_or(u64::MAX);
    report.note("dropped", dropped);
    assert!(dropped > 0, "nothing was evicted: {report}");
    assert_eq!(
        report.missing as u64, dropped,
        "missing records must be exactly the evicted ones: {report}"
    );
    // Eviction is the documented loss under this policy; it is accounted for.
    report.missing = 0;
    report
}

/// Scenario 8: a long outage with a large backlog, then the drain. Records
/// arrive in sequence order (one batch in flight) and agent memory stays flat.
pub async fn long_outage(records: usize) -> Report {
    let world = World::new(|c| {
        c.batch.max_in_flight = 1;
        c.batch.max_records = 5000;
        c.buffer.capacity = dcs_shared::config::ByteSize(4 << 30);
    })
    .await;
    world.proxy.set(Fault::Refuse);
    const PRODUCERS: usize = 2;
    const CHUNK: usize = 1000;
    let ledger = Arc::new(Ledger::default());
    let tasks: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            tokio::spawn(produce_count(
                world.agent.url.clone(),
                p,
                CHUNK,
                records / PRODUCERS,
                ledger.clone(),
            ))
        })
        .collect();
    for t in tasks {
        t.await.expect("producer");
    }
    let buffered = world.agent_status().await["buffer"]["records"]
        .as_u64()
        .unwrap_or(0);
    let started = Instant::now();
    world.proxy.set(Fault::Pass);
    let mut report = world.check("long-outage", &ledger).await;
    let drain = started.elapsed();
    report.note("buffered", buffered);
    report.note("drain_secs", format!("{:.1}", drain.as_secs_f64()));
    report.note(
        "drain_records_per_sec",
        format!("{:.0}", buffered as f64 / drain.as_secs_f64()),
    );
    report.note(
        "agent_peak_rss_mib",
        world
            .agent
            .service
            .peak_rss_kib()
            .map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
    );
    let pool = PgPool::connect(&world.cluster.url())
        .await
        .expect("connect");
    let out_of_order: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT received_at < lag(received_at) OVER (ORDER BY seq) AS back
             FROM records WHERE stream = $1) t WHERE back",
    )
    .bind(STREAM)
    .fetch_one(&pool)
    .await
    .expect("order check");
    pool.close().await;
    report.note("out_of_order", out_of_order);
    assert_eq!(
        out_of_order, 0,
        "records arrived out of sequence order: {report}"
    );
    report
}

/// Pushes exactly `count` records (in requests of `chunk`) as producer `producer`.
async fn produce_count(
    url: String,
    producer: usize,
    chunk: usize,
    count: usize,
    ledger: Arc<Ledger>,
) {
    for offset in (0..count).step_by(chunk) {
        produce_offset(&url, producer, chunk.min(count - offset), offset, &ledger).await;
    }
}

/// One request of `chunk` records starting at `offset` (same id scheme as
/// [`produce`]), retried until the agent gives a definitive answer.
async fn produce_offset(url: &str, producer: usize, chunk: usize, offset: usize, ledger: &Ledger) {
    let client = reqwest::Client::new();
    let ids: Vec<String> = (offset..offset + chunk)
        .map(|i| format!("p{producer}-{i}"))
        .collect();
    let body: String = ids
        .iter()
        .map(|id| {
            format!(
                "{{\"stream\":\"{STREAM}\",\"id\":\"{id}\",\"payload\":{{\"producer\":{producer},\"note\":\"backlog record with some text\"}}}}\n"
            )
        })
        .collect();
    for _ in 0..100 {
        match client
            .post(format!("{url}/v1/records"))
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                ledger.acked.lock().expect("ledger").extend(ids);
                return;
            }
            Ok(_) => {
                ledger.refused.lock().expect("ledger").extend(ids);
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    ledger.unknown.lock().expect("ledger").extend(ids);
}

/// Scenario 12: the agent's VM is reverted to a snapshot. The snapshot is
/// taken of a stopped agent with a backlog (records acknowledged but not yet
/// delivered); the agent then continues and delivers everything, including
/// records the snapshot never saw. It is killed, its buffer directory is put
/// back to the snapshot, and it starts again with new records to push: the
/// restored buffer's next seqs were already delivered with other records.
/// Every acknowledged record must arrive once, and none may become a dead
/// letter: the agent moves to a new epoch instead.
pub async fn snapshot_revert(records: usize) -> Report {
    let mut world = World::new(|_| {}).await;
    let buffer = world.agent_config.buffer.path.clone();
    let snapshot = world.dir.path().join("snapshot");
    let ledger = Arc::new(Ledger::default());
    let part = (records / 5).max(1);
    let push = async |url: &str, producer: usize| {
        produce_count(url.to_owned(), producer, 250, part, ledger.clone()).await;
    };

    push(&world.agent.url, 0).await;
    wait_drained(&world.agent.url).await;
    world.proxy.set(Fault::Refuse);
    push(&world.agent.url, 1).await;
    assert!(world.agent.terminate(), "agent did not stop on SIGTERM");
    copy_files(&buffer, &snapshot);
    world.agent.start().await;
    world.proxy.set(Fault::Pass);
    push(&world.agent.url, 2).await;
    wait_drained(&world.agent.url).await;

    world.agent.kill();
    let _ = std::fs::remove_dir_all(buffer.parent().expect("buffer dir").join("quarantine"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", buffer.display()));
    }
    copy_files(
        &snapshot.join(buffer.file_name().expect("buffer file")),
        buffer.parent().expect("dir"),
    );
    // The first new records are buffered before the agent can ask the
    // aggregator anything, so they take seqs that are already delivered and
    // meet 409s (re-keyed); the rest arrive after it moved to a new epoch.
    world.proxy.set(Fault::Refuse);
    world.agent.start().await;
    push(&world.agent.url, 3).await;
    world.proxy.set(Fault::Pass);
    push(&world.agent.url, 4).await;

    let mut report = world.check("snapshot-revert", &ledger).await;
    let status = world.agent_status().await;
    let dead = status["dead_letters"]["records"]
        .as_u64()
        .unwrap_or(u64::MAX);
    let rekeyed = status["buffer"]["rekeyed_total"].as_u64().unwrap_or(0);
    let pool = PgPool::connect(&world.cluster.url())
        .await
        .expect("connect");
    let epochs: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT epoch) FROM records WHERE stream = $1")
            .bind(STREAM)
            .fetch_one(&pool)
            .await
            .expect("count epochs");
    let shared_keys: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM records GROUP BY agent_id, epoch, seq HAVING count(*) > 1) k",
    )
    .fetch_one(&pool)
    .await
    .expect("count keys");
    pool.close().await;
    report.note("dead_letters", dead);
    report.note("rekeyed", rekeyed);
    report.note("epochs", epochs);
    report.note("keys_with_two_records", shared_keys);
    assert_eq!(dead, 0, "records became dead letters: {report}");
    assert_eq!(shared_keys, 0, "a key holds two records: {report}");
    assert!(
        epochs >= 2,
        "the agent did not move to a new epoch: {report}"
    );
    report
}

/// Waits (bounded) until the agent reports an empty buffer.
async fn wait_drained(agent_url: &str) {
    let drained = agent::wait_until(DRAIN_TIMEOUT, || async {
        agent_status(agent_url).await["buffer"]["records"] == 0
    })
    .await;
    assert!(drained, "the agent's buffer did not drain");
}

/// Copies `path` and its SQLite companions (`-wal`, `-shm`, when present)
/// into `dir`, keeping their names.
fn copy_files(path: &std::path::Path, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("create snapshot dir");
    for suffix in ["", "-wal", "-shm"] {
        let from = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        if from.exists() {
            let name = from.file_name().expect("file name");
            std::fs::copy(&from, dir.join(name)).expect("copy buffer file");
        }
    }
}

/// Scenario 9: timestamps far in the past and future (a producer or agent
/// clock that jumped) neither reorder nor drop records.
pub async fn clock_jump(plan: Plan) -> Report {
    let world = World::new(|_| {}).await;
    let client = reqwest::Client::new();
    let ledger = Ledger::default();
    let stamps = [
        "1970-01-01T00:00:00Z",
        "2099-12-31T23:59:59.999999Z",
        "2001-09-09T01:46:40+05:30",
        "1999-12-31T23:59:59-08:00",
    ];
    let n = plan.chunk * 8;
    let body: String = (0..n)
        .map(|i| {
            format!(
                "{{\"stream\":\"{STREAM}\",\"id\":\"t-{i}\",\"ts\":\"{}\",\"payload\":{{\"i\":{i}}}}}\n",
                stamps[i % stamps.len()]
            )
        })
        .collect();
    let r = client
        .post(format!("{}/v1/records", world.agent.url))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("push");
    assert!(r.status().is_success());
    ledger
        .acked
        .lock()
        .expect("ledger")
        .extend((0..n).map(|i| format!("t-{i}")));
    let report = world.check("clock-jump", &ledger).await;
    let pool = PgPool::connect(&world.cluster.url())
        .await
        .expect("connect");
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT record_id FROM records WHERE stream = $1 ORDER BY seq")
            .bind(STREAM)
            .fetch_all(&pool)
            .await
            .expect("ids");
    let expected: Vec<String> = (0..n).map(|i| format!("t-{i}")).collect();
    assert_eq!(
        ids, expected,
        "sequence order is push order whatever the timestamps"
    );
    let extremes: (String, String) =
        sqlx::query_as("SELECT min(ts)::text, max(ts)::text FROM records WHERE stream = $1")
            .bind(STREAM)
            .fetch_one(&pool)
            .await
            .expect("ts");
    pool.close().await;
    assert!(extremes.0.starts_with("1970-01-01"), "{extremes:?}");
    assert!(extremes.1.starts_with("2099-12-31"), "{extremes:?}");
    report
}

/// Scenario 7: an overloaded aggregator (behind a gate that answers 429, then
/// 503, with `Retry-After`) refuses most batches; the agent waits as told
/// and loses nothing.
pub async fn overload(plan: Plan) -> Report {
    use crate::gate::{Gate, Overload};
    const RETRY_AFTER_SECS: u64 = 1;
    let pki = Pki::new();
    let db = crate::pg::TestDb::new().await;
    let aggregator = crate::aggregator::start_aggregator(&pki, &db.url).await;
    let cert = pki.agent("acme", "overload-1");
    let gate = Gate::start(&pki, &cert, &aggregator.url).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = agent::test_config(&cert, &gate.url(), &dir.path().join("buffer.db"));
    // One batch at a time, so the gate's log is the agent's retry timeline.
    config.batch.max_in_flight = 1;
    config.retry.max = Duration::from_secs(5);
    let agent = agent::start_agent(config).await;
    let ledger = Arc::new(Ledger::default());
    let until = Instant::now() + plan.duration;
    let producers: Vec<_> = (0..plan.producers)
        .map(|p| tokio::spawn(produce(agent.url.clone(), p, plan, until, ledger.clone())))
        .collect();
    for status in [429, 503] {
        gate.overload(Some(Overload {
            status,
            retry_after_secs: RETRY_AFTER_SECS,
            pass_every: 3,
        }));
        tokio::time::sleep(plan.duration / 3).await;
    }
    gate.overload(None);
    for p in producers {
        p.await.expect("producer");
    }
    let mut report = verify(&db.pool, &agent.url, "overload", &ledger).await;
    let seen = gate.seen();
    let refusals = seen
        .iter()
        .filter(|s| s.status == 429 || s.status == 503)
        .count();
    let too_soon = seen
        .windows(2)
        .filter(|w| {
            (w[0].status == 429 || w[0].status == 503)
                && w[1].at.duration_since(w[0].at) < Duration::from_millis(RETRY_AFTER_SECS * 900)
        })
        .count();
    report.note("refusals", refusals);
    report.note("retried_too_soon", too_soon);
    assert!(refusals > 0, "the gate never refused: {report}");
    assert_eq!(too_soon, 0, "the agent ignored Retry-After: {report}");
    agent.stop().await;
    aggregator.stop().await;
    report
}

/// Every scenario by name, for `dcs-chaos`.
pub const SCENARIOS: [&str; 13] = [
    "agent-kill",
    "aggregator-kill",
    "postgres-restart",
    "partition",
    "netns-partition",
    "buffer-full",
    "disk-full",
    "drop-oldest",
    "long-outage",
    "clock-jump",
    "overload",
    "snapshot-revert",
    "all",
];

/// Runs one named scenario for `duration` (long-outage: `records`).
pub async fn run_named(name: &str, duration: Duration, records: usize) -> Vec<Report> {
    let plan = Plan::with_duration(duration);
    let kills = (duration.as_secs() / 2).clamp(10, 10_000) as u32;
    match name {
        "agent-kill" => vec![agent_kill(plan, kills).await],
        "aggregator-kill" => vec![aggregator_kill(plan, kills).await],
        "postgres-restart" => vec![postgres_restart(plan).await],
        "partition" => vec![partition(plan).await],
        "netns-partition" => {
            let phase = (duration / 4).max(Duration::from_secs(5));
            match crate::netns::netns_partition(plan, phase, phase).await {
                Ok(report) => vec![report],
                Err(reason) => {
                    eprintln!("SKIP netns-partition: {reason}");
                    Vec::new()
                }
            }
        }
        "buffer-full" => vec![buffer_full(plan).await],
        "disk-full" => disk_full(plan).await.into_iter().collect(),
        "drop-oldest" => vec![drop_oldest(plan).await],
        "long-outage" => vec![long_outage(records).await],
        "clock-jump" => vec![clock_jump(plan).await],
        "overload" => vec![overload(plan).await],
        "snapshot-revert" => vec![snapshot_revert(records).await],
        "all" => {
            let mut all = Vec::new();
            for n in &SCENARIOS[..SCENARIOS.len() - 1] {
                all.extend(Box::pin(run_named(n, duration, records)).await);
            }
            all
        }
        other => panic!("unknown scenario {other:?}; known: {SCENARIOS:?}"),
    }
}
