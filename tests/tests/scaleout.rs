//! Scale out for real: aggregator replicas behind HAProxy (TCP mode, health
//! check on `/ready`, as in compose/haproxy/haproxy.cfg) under a steady load
//! from a fleet of agents. With a short `limits.max_connection_age`, a
//! restarted or added replica must take its share of the fleet within max
//! age + 10 s, a rolling restart (SIGTERM, drain) must cost the agents no
//! delivery retry, and every acknowledged record must be in PostgreSQL
//! exactly once.
//!
//! Each scenario prints `scenario=NAME acked=N missing=0 duplicated=0
//! retries=R balance=B` (balance: the smallest replica's share of a 5 s
//! window times the number of replicas; 1.0 is even). They take about a
//! minute each, so they are `#[ignore]`d in `cargo test --workspace` and run
//! in their own step of scripts/test.sh:
//!
//! ```text
//! cargo test -p dcs-tests --test e2e -- --ignored --nocapture --test-threads=1 scaleout::
//! ```
//!
//! The agents are real `dcs-edge` agents (buffer, forwarder, HTTP/2 client)
//! run in this process, so fifty of them fit on a small CI machine; each has
//! its own client and so its own connection through the balancer. The share
//! of each replica is read from its own `dcs_aggregator_records_ingested_total`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcs_tests::agent::status as agent_status;
use dcs_tests::agent::{self, RunningAgent};
use dcs_tests::balancer::{self, Balancer, Replica};
use dcs_tests::pg::TestDb;
use dcs_tests::pki::Pki;

const AGENTS: usize = 50;
/// Each agent's producer pushes this many records per tick.
const RECORDS_PER_PUSH: usize = 4;
const PUSH_EVERY: Duration = Duration::from_millis(250);
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(5);
/// The measuring window of the issue: a replica's share of what all ingested.
const WINDOW: Duration = Duration::from_secs(5);
/// A replica must reach its share within max age + this.
const SETTLE: Duration = Duration::from_secs(10);
const MIN_BALANCE: f64 = 0.6;
const STREAM: &str = "scaleout";

/// A replica as these scenarios run it: a short max age, a fast drain.
/// Replica `n`: short max age and fast checks, so each scenario takes
/// about a minute; with `defaults`, what a deployment runs (the
/// aggregator's default max age and grace).
fn replica(dir: &Path, pki: &Pki, db_url: &str, n: usize, defaults: bool) -> Replica {
    let mut extra = vec![
        ("DATABASE__MAX_CONNECTIONS", "4".to_owned()),
        // The balancer checks every 500 ms and needs two failures: 2 s
        // of draining is ample for it to take the replica out.
        ("SHUTDOWN__DRAIN_DELAY", "\"2s\"".into()),
        ("SHUTDOWN__GRACE", "\"10s\"".into()),
    ];
    if !defaults {
        extra.push((
            "LIMITS__MAX_CONNECTION_AGE",
            format!("\"{}s\"", MAX_CONNECTION_AGE.as_secs()),
        ));
        extra.push(("LIMITS__MAX_CONNECTION_AGE_GRACE", "\"5s\"".into()));
    }
    Replica::new(dir, pki, db_url, n, &extra)
}

/// Record ids the agents acknowledged (2xx to the producer).
#[derive(Default)]
struct Ledger(Mutex<HashSet<String>>);

/// The replicas, the balancer, the fleet and its producers.
struct World {
    // Fields drop in this order: processes before the database and files.
    agents: Vec<RunningAgent>,
    balancer: Balancer,
    replicas: Vec<Replica>,
    db: TestDb,
    dir: tempfile::TempDir,
    _pki: Pki,
    ledger: Arc<Ledger>,
    stop_producing: tokio::sync::watch::Sender<bool>,
    producers: Vec<tokio::task::JoinHandle<()>>,
    http: reqwest::Client,
}

impl World {
    /// `declared` replicas behind the balancer, of which the first `running`
    /// are started; the fleet connects and pushes from then on.
    async fn start(declared: usize, running: usize) -> World {
        World::start_with(declared, running, false).await
    }

    /// With `defaults`: the aggregator's default max age and the compose
    /// file's health checks.
    async fn start_with(declared: usize, running: usize, defaults: bool) -> World {
        dcs_shared::tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::new();
        let db = TestDb::new().await;
        let mut replicas: Vec<Replica> = (1..=declared)
            .map(|n| replica(dir.path(), &pki, &db.url, n, defaults))
            .collect();
        for replica in replicas.iter_mut().take(running) {
            replica.service.start().await;
        }
        let checks = if defaults {
            balancer::COMPOSE_CHECKS
        } else {
            balancer::FAST_CHECKS
        };
        let balancer = Balancer::start_with_checks(dir.path(), &replicas, checks).await;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        // The balancer must see the running replicas up before agents come.
        for replica in replicas.iter().take(running) {
            assert!(
                agent::wait_until(Duration::from_secs(10), || replica.ready(&http)).await,
                "replica not ready"
            );
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;

        let url = format!("https://localhost:{}", balancer.port);
        let mut agents = Vec::with_capacity(AGENTS);
        for i in 0..AGENTS {
            let mut config = agent::test_config(
                &pki.agent("scale", &format!("agent-{i}")),
                &url,
                &dir.path().join(format!("buffer-{i}.db")),
            );
            config.batch.linger = Duration::from_millis(100);
            agents.push(agent::start_agent(config).await);
        }
        let ledger = Arc::new(Ledger::default());
        let (stop_producing, stop) = tokio::sync::watch::channel(false);
        let producers = agents
            .iter()
            .enumerate()
            .map(|(i, a)| tokio::spawn(produce(a.url.clone(), i, ledger.clone(), stop.clone())))
            .collect();
        World {
            dir,
            _pki: pki,
            db,
            replicas,
            balancer,
            agents,
            ledger,
            stop_producing,
            producers,
            http,
        }
    }

    /// Samples every replica's ingest counter once a second, from now until a
    /// 5 s window satisfies `good` or `limit` has passed; returns the best
    /// window's shares (by balance) and whether it was good.
    async fn watch_shares(
        &self,
        replicas: usize,
        limit: Duration,
        good: impl Fn(&[f64]) -> bool,
    ) -> (Vec<f64>, bool) {
        let deadline = Instant::now() + limit;
        let mut samples: Vec<(Instant, Vec<Option<f64>>)> = Vec::new();
        let mut best: Vec<f64> = vec![0.0; replicas];
        loop {
            let mut counts = Vec::with_capacity(replicas);
            for replica in self.replicas.iter().take(replicas) {
                counts.push(replica.ingested(&self.http).await);
            }
            let now = Instant::now();
            samples.push((now, counts));
            let (end_at, end) = samples.last().expect("a sample");
            if let Some((_, start)) = samples
                .iter()
                .rev()
                .find(|(at, _)| end_at.duration_since(*at) >= WINDOW)
            {
                let deltas: Option<Vec<f64>> = start
                    .iter()
                    .zip(end)
                    .map(|(a, b)| Some((b.as_ref()? - a.as_ref()?).max(0.0)))
                    .collect();
                if let Some(deltas) = deltas {
                    let total: f64 = deltas.iter().sum();
                    if total > 0.0 {
                        let shares: Vec<f64> = deltas.iter().map(|d| d / total).collect();
                        if balance(&shares) >= balance(&best) {
                            best = shares.clone();
                        }
                        if good(&shares) {
                            return (shares, true);
                        }
                    }
                }
            }
            if now >= deadline {
                return (best, false);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Stops the producers, waits for every agent's buffer to drain, and
    /// compares PostgreSQL with the ledger; prints and checks the result line.
    async fn finish(self, scenario: &str, shares: &[f64], check_retries: bool) {
        let _ = self.stop_producing.send(true);
        for p in self.producers {
            p.await.expect("producer panicked");
        }
        let acked: HashSet<String> = self.ledger.0.lock().expect("ledger").clone();
        let drained = agent::wait_until(Duration::from_secs(60), || async {
            for a in &self.agents {
                if agent_status(&a.url).await["buffer"]["records"] != 0 {
                    return false;
                }
            }
            true
        })
        .await;
        let mut retries = 0u64;
        for a in &self.agents {
            retries += agent_status(&a.url).await["delivery"]["retries"]
                .as_u64()
                .unwrap_or(0);
        }
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT record_id, count(*) FROM records WHERE stream = $1 GROUP BY record_id",
        )
        .bind(STREAM)
        .fetch_all(&self.db.pool)
        .await
        .expect("read records");
        let counts: HashMap<String, i64> = rows.into_iter().collect();
        let missing = acked.iter().filter(|id| !counts.contains_key(*id)).count();
        let duplicated = counts.values().filter(|c| **c > 1).count();
        let balance = balance(shares);
        let shares_text: Vec<String> = shares.iter().map(|s| format!("{s:.2}")).collect();
        let line = format!(
            "scenario={scenario} acked={} missing={missing} duplicated={duplicated} retries={retries} balance={balance:.2} shares={}",
            acked.len(),
            shares_text.join("/")
        );
        eprintln!("{line}");
        for agent in self.agents {
            agent.stop().await;
        }
        drop(self.balancer);
        let logs = self.dir.path().to_owned();
        assert!(drained, "agents' buffers did not drain: {line}");
        assert!(acked.len() > 1000, "too little load to judge: {line}");
        assert_eq!(missing, 0, "{line}");
        assert_eq!(duplicated, 0, "{line}");
        assert!(
            balance >= MIN_BALANCE,
            "unbalanced: {line} (logs in {logs:?})"
        );
        if check_retries {
            assert_eq!(retries, 0, "a rolling restart cost agents retries: {line}");
        }
    }
}

/// The smallest share times the number of replicas: 1.0 is even, 0 is a
/// replica without load.
fn balance(shares: &[f64]) -> f64 {
    shares.iter().copied().fold(f64::INFINITY, f64::min) * shares.len() as f64
}

/// Pushes records with unique ids to one agent until told to stop; ids with a
/// 2xx go into the ledger.
async fn produce(
    url: String,
    producer: usize,
    ledger: Arc<Ledger>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut next = 0usize;
    let mut tick = tokio::time::interval(PUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let ids: Vec<String> = (next..next + RECORDS_PER_PUSH)
            .map(|i| format!("a{producer}-{i}"))
            .collect();
        next += RECORDS_PER_PUSH;
        let body: String = ids
            .iter()
            .map(|id| {
                format!("{{\"stream\":\"{STREAM}\",\"id\":\"{id}\",\"payload\":{{\"v\":1}}}}\n")
            })
            .collect();
        let answer = client
            .post(format!("{url}/v1/records"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await;
        if answer.is_ok_and(|r| r.status().is_success()) {
            ledger.0.lock().expect("ledger").extend(ids);
        }
    }
}

/// Balanced: every share within what `balance >= 0.6` allows.
fn balanced(shares: &[f64]) -> bool {
    balance(shares) >= MIN_BALANCE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about a minute with HAProxy and 50 agents: run by scripts/test.sh with --ignored"]
async fn a_replica_killed_and_restarted_takes_its_share_again() {
    let mut world = World::start(2, 2).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    world.replicas[0].service.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    world.replicas[0].service.start().await;
    let (shares, _) = world
        .watch_shares(2, MAX_CONNECTION_AGE + SETTLE, balanced)
        .await;
    world.finish("restart", &shares, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about a minute with HAProxy and 50 agents: run by scripts/test.sh with --ignored"]
async fn a_rolling_restart_costs_agents_no_retry_and_ends_balanced() {
    let mut world = World::start(2, 2).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    for i in 0..2 {
        // Waiting for the exit blocks; the fleet runs on in this runtime.
        let exited = tokio::task::block_in_place(|| world.replicas[i].service.terminate());
        assert!(exited, "replica {} did not exit 0 on SIGTERM", i + 1);
        world.replicas[i].service.start().await;
        let replica = &world.replicas[i];
        assert!(
            agent::wait_until(Duration::from_secs(10), || replica.ready(&world.http)).await,
            "replica {} not ready after restart",
            i + 1
        );
        // The balancer's next check (500 ms) puts it back in rotation; max
        // age brings it agents.
        tokio::time::sleep(MAX_CONNECTION_AGE).await;
    }
    let (shares, _) = world
        .watch_shares(2, MAX_CONNECTION_AGE + SETTLE, balanced)
        .await;
    world.finish("rolling-restart", &shares, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about a minute with HAProxy and 50 agents: run by scripts/test.sh with --ignored"]
async fn an_added_replica_takes_a_share_within_max_age() {
    let mut world = World::start(3, 2).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    world.replicas[2].service.start().await;
    let (shares, ok) = world
        .watch_shares(3, MAX_CONNECTION_AGE + SETTLE, |s| s[2] >= 0.2)
        .await;
    assert!(
        ok,
        "replica 3 did not reach 20 % within max age + 10 s: {shares:?}"
    );
    // Balance is judged once the fleet has spread over all three.
    let (shares, _) = world
        .watch_shares(3, MAX_CONNECTION_AGE + SETTLE, balanced)
        .await;
    world.finish("scale-out", &shares, false).await;
}

/// The by-hand check of the scale-out issue, with what a deployment runs
/// (default max age and grace, the compose file's health checks): a replica
/// killed and restarted under load is back to 30-70 % of the load within
/// 150 s. About three minutes, so it is not in scripts/test.sh:
///
/// ```text
/// cargo test -p dcs-tests --test e2e -- --ignored --nocapture scaleout::with_default_settings
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about three minutes: a documented command (docs/OPERATIONS.md), not in CI"]
async fn with_default_settings_a_restarted_replica_takes_its_share_within_150_s() {
    const LIMIT: Duration = Duration::from_secs(150);
    let mut world = World::start_with(2, 2, true).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    world.replicas[0].service.kill();
    tokio::time::sleep(Duration::from_secs(10)).await;
    world.replicas[0].service.start().await;
    let restarted = Instant::now();
    let (shares, ok) = world
        .watch_shares(2, LIMIT, |s| s.iter().all(|x| (0.3..=0.7).contains(x)))
        .await;
    let took = restarted.elapsed().as_secs();
    eprintln!(
        "default settings: the restarted replica reached {:.0} % of the load {took} s after its restart (limit {} s)",
        shares[0] * 100.0,
        LIMIT.as_secs()
    );
    assert!(ok, "not within 30-70 % after {took} s: {shares:?}");
    world
        .finish("restart-default-settings", &shares, false)
        .await;
}
