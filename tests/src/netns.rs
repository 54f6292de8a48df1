//! Real network-layer partitions, when running as root: the agent and the
//! aggregator in two Linux network namespaces joined by a veth pair (iproute2),
//! which a scenario cuts (`ip link set down`), heals, and impairs with
//! `tc netem` (loss, delay) or, where the kernel has no netem, `tc tbf` (a rate
//! limit). This is scenario 5 of the fault suite; the userspace
//! [`FaultProxy`] covers the same faults on any machine.
//!
//! Topology of one [`NetPair`] (all addresses in `10.231.X.0/24`, X picked so
//! that no address of the root namespace already uses it):
//!
//! ```text
//!   namespace A (agent)                       namespace G (aggregator)
//!   dcs-link 10.231.X.1/30  <==== link ====>  dcs-link 10.231.X.2/30
//!   dcs-up   10.231.X.5/30                    dcs-up   10.231.X.9/30
//!        |  ingest uplink                          |  service uplink
//!   root: dcs<pid>a<n> 10.231.X.6/30          root: dcs<pid>g<n> 10.231.X.10/30
//! ```
//!
//! The link is the only path between A and G: neither namespace has a default
//! route, so nothing reaches the other namespace through the root namespace
//! even where the root namespace forwards. The uplinks exist so that cutting
//! the link cuts nothing else: producers (in the root namespace) reach the
//! agent's ingest API over A's uplink, and the aggregator reaches PostgreSQL
//! and the test reaches the aggregator over G's uplink.
//!
//! Each veth pair is created with one end already inside a namespace, so
//! deleting the two namespaces removes every interface and address this module
//! added; `Drop` (which also runs while a failed test unwinds) deletes the
//! uplinks' root ends, then both namespaces. Namespaces
//! left behind by a test process that was SIGKILLed are deleted by the next
//! [`NetPair::new`] once that process is gone.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::agent::{self, AgentProcess};
use crate::chaos::{self, Ledger, Plan, Report};
use crate::faultproxy::FaultProxy;
use crate::pg::PgCluster;
use crate::pki::Pki;
use crate::process::{Service, free_port};

/// Name of the link's veth end in each namespace.
pub const LINK_IF: &str = "dcs-link";
/// Name of the uplink's veth end inside its namespace.
pub const UPLINK_IF: &str = "dcs-up";
/// Namespace names: `dcs-a-<pid>-<n>`, `dcs-g-<pid>-<n>`, `dcs-probe-<pid>-<n>`.
const NS_PREFIXES: [&str; 3] = ["dcs-a-", "dcs-g-", "dcs-probe-"];

static NEXT: AtomicU32 = AtomicU32::new(0);
/// Picking a free `10.231.X` and claiming it is one step within this process.
static CREATING: Mutex<()> = Mutex::new(());

/// A veth pair between a namespace and the root namespace.
#[derive(Debug, Clone)]
pub struct Uplink {
    /// The root namespace's end.
    pub root_if: String,
    /// The address inside the namespace.
    pub inside: Ipv4Addr,
    /// The address of the root namespace's end.
    pub outside: Ipv4Addr,
}

/// Two network namespaces joined by a veth pair, each with an uplink to the
/// root namespace. Deleted on `Drop`.
#[derive(Debug)]
pub struct NetPair {
    /// Namespace of the agent (`dcs-a-<pid>-<n>`).
    pub agent_ns: String,
    /// Namespace of the aggregator (`dcs-g-<pid>-<n>`).
    pub aggregator_ns: String,
    /// The agent's end of the link.
    pub agent_ip: Ipv4Addr,
    /// The aggregator's end of the link.
    pub aggregator_ip: Ipv4Addr,
    pub agent_uplink: Uplink,
    pub aggregator_uplink: Uplink,
}

impl NetPair {
    /// `Ok` when this process may create namespaces and veth pairs: it runs as
    /// root (effective uid 0) and `ip netns add` and a veth pair work (a probe
    /// namespace is created and deleted). Otherwise the reason.
    pub fn available() -> Result<(), String> {
        match effective_uid() {
            Some(0) => {}
            Some(uid) => {
                return Err(format!(
                    "not root (effective uid {uid}): network namespaces need root"
                ));
            }
            None => return Err("cannot read the effective uid from /proc/self/status".into()),
        }
        let probe = format!(
            "dcs-probe-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &probe])?;
        let veth = ip(&[
            "-n", &probe, "link", "add", "dcs-p0", "type", "veth", "peer", "name", "dcs-p1",
        ]);
        let deleted = ip(&["netns", "del", &probe]);
        veth?;
        deleted?;
        Ok(())
    }

    /// Creates the namespaces, the link and the uplinks, all up. An error
    /// carries the failing command and what it printed; whatever was already
    /// created is deleted.
    pub fn new() -> Result<NetPair, String> {
        reap_stale();
        let _guard = CREATING.lock().unwrap_or_else(|e| e.into_inner());
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let x = free_octet(pid, n)?;
        let at = |host| Ipv4Addr::new(10, 231, x, host);
        let pair = NetPair {
            agent_ns: format!("dcs-a-{pid}-{n}"),
            aggregator_ns: format!("dcs-g-{pid}-{n}"),
            agent_ip: at(1),
            aggregator_ip: at(2),
            agent_uplink: Uplink {
                root_if: format!("dcs{pid}a{n}"),
                inside: at(5),
                outside: at(6),
            },
            aggregator_uplink: Uplink {
                root_if: format!("dcs{pid}g{n}"),
                inside: at(9),
                outside: at(10),
            },
        };
        // From here on, `pair` deletes what exists if a step fails.
        pair.build()?;
        Ok(pair)
    }

    fn build(&self) -> Result<(), String> {
        let (a, g) = (self.agent_ns.as_str(), self.aggregator_ns.as_str());
        for ns in [a, g] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
        }
        ip(&[
            "-n", a, "link", "add", LINK_IF, "type", "veth", "peer", "name", LINK_IF, "netns", g,
        ])?;
        for (ns, addr) in [(a, self.agent_ip), (g, self.aggregator_ip)] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/30"),
                "dev",
                LINK_IF,
            ])?;
            ip(&["-n", ns, "link", "set", "dev", LINK_IF, "up"])?;
        }
        for (ns, up) in [(a, &self.agent_uplink), (g, &self.aggregator_uplink)] {
            ip(&[
                "link",
                "add",
                &up.root_if,
                "type",
                "veth",
                "peer",
                "name",
                UPLINK_IF,
                "netns",
                ns,
            ])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/30", up.inside),
                "dev",
                UPLINK_IF,
            ])?;
            ip(&["-n", ns, "link", "set", "dev", UPLINK_IF, "up"])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/30", up.outside),
                "dev",
                &up.root_if,
            ])?;
            ip(&["link", "set", "dev", &up.root_if, "up"])?;
        }
        Ok(())
    }

    /// The command prefix that runs a program inside `ns`, for
    /// [`Service::with_prefix`].
    pub fn exec_prefix(ns: &str) -> [&str; 4] {
        ["ip", "netns", "exec", ns]
    }

    /// Cuts the link: the aggregator's end goes administratively down, so the
    /// agent's end loses carrier. From the agent's side this is a pulled cable:
    /// its route stays, its packets vanish, connections and requests time out
    /// (rather than failing at once as an unreachable network would).
    pub fn link_down(&self) {
        ip(&[
            "-n",
            &self.aggregator_ns,
            "link",
            "set",
            "dev",
            LINK_IF,
            "down",
        ])
        .unwrap_or_else(|e| panic!("link down: {e}"));
    }

    /// Heals the link cut by [`NetPair::link_down`].
    pub fn link_up(&self) {
        ip(&[
            "-n",
            &self.aggregator_ns,
            "link",
            "set",
            "dev",
            LINK_IF,
            "up",
        ])
        .unwrap_or_else(|e| panic!("link up: {e}"));
    }

    /// `tc netem` on both ends of the link: each direction loses `loss_pct` %
    /// of its packets and is delayed by `delay_ms`. `Err` carries the kernel's
    /// refusal (e.g. "Specified qdisc kind is unknown" without netem); then
    /// nothing stays applied.
    pub fn try_netem(&self, loss_pct: f64, delay_ms: u32) -> Result<(), String> {
        let (loss, delay) = (format!("{loss_pct}%"), format!("{delay_ms}ms"));
        self.on_both_ends(&["netem", "loss", &loss, "delay", &delay])
    }

    /// `tc tbf` on both ends of the link: each direction limited to
    /// `rate_kbit` kbit/s (packets queue up to 400 ms, then drop).
    pub fn try_tbf(&self, rate_kbit: u32) -> Result<(), String> {
        let rate = format!("{rate_kbit}kbit");
        self.on_both_ends(&["tbf", "rate", &rate, "burst", "32kbit", "latency", "400ms"])
    }

    /// Removes any qdisc [`NetPair::try_netem`] or [`NetPair::try_tbf`] added.
    pub fn clear_qdisc(&self) {
        for ns in [&self.agent_ns, &self.aggregator_ns] {
            // Fails harmlessly when no root qdisc was added.
            let _ = run("tc", &["-n", ns, "qdisc", "del", "dev", LINK_IF, "root"]);
        }
    }

    fn on_both_ends(&self, qdisc: &[&str]) -> Result<(), String> {
        for ns in [&self.agent_ns, &self.aggregator_ns] {
            let mut args = vec![
                "-n",
                ns.as_str(),
                "qdisc",
                "replace",
                "dev",
                LINK_IF,
                "root",
            ];
            args.extend_from_slice(qdisc);
            if let Err(e) = run("tc", &args) {
                self.clear_qdisc();
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // The kernel destroys a deleted namespace (and the veth ends in it)
        // asynchronously; deleting the root ends first removes the uplinks
        // from the root namespace before `drop` returns.
        for up in [&self.agent_uplink, &self.aggregator_uplink] {
            let _ = ip(&["link", "del", "dev", &up.root_if]);
        }
        for ns in [&self.agent_ns, &self.aggregator_ns] {
            if namespace_exists(ns)
                && let Err(e) = ip(&["netns", "del", ns])
            {
                eprintln!("warning: could not delete network namespace {ns}: {e}");
            }
        }
    }
}

/// Runs `ip ARGS`; `Err` holds the command and its stderr.
fn ip(args: &[&str]) -> Result<String, String> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`{program}` could not run: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // Uid: real effective saved filesystem
    line.split_whitespace().nth(2)?.parse().ok()
}

fn namespaces() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn namespace_exists(ns: &str) -> bool {
    namespaces().iter().any(|n| n == ns)
}

/// Deletes our namespaces whose creating process no longer exists (a test
/// process that was SIGKILLed never ran `Drop`).
fn reap_stale() {
    for ns in namespaces() {
        let Some(rest) = NS_PREFIXES.iter().find_map(|p| ns.strip_prefix(p)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

/// A third octet X such that no address of the root namespace is in
/// 10.231.X.0/24 (the uplinks put two addresses there).
fn free_octet(pid: u32, n: u32) -> Result<u8, String> {
    let used: Vec<u8> = ip(&["-4", "-o", "addr", "show"])?
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("10.231."))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    let start = pid.wrapping_mul(31).wrapping_add(n.wrapping_mul(97));
    (0..256u32)
        .map(|i| (start.wrapping_add(i) % 256) as u8)
        .find(|x| !used.contains(x))
        .ok_or_else(|| "every 10.231.X.0/24 is in use in the root namespace".to_owned())
}

/// Scenario 5's world: the agent in namespace A, the aggregator in namespace
/// G, the link between them real (a veth pair), PostgreSQL the test-owned
/// cluster in the root namespace.
///
/// PostgreSQL listens on 127.0.0.1 of the root namespace, which G cannot
/// reach; a forwarding [`FaultProxy`] (left on `Pass`) on the root end of G's
/// uplink relays the aggregator's database connections to it. That relay is
/// not on the path being faulted, which is the agent-aggregator link.
///
/// Fields drop in order: processes first, then the relay and PostgreSQL, then
/// the namespaces (which also removes the interfaces), then the files.
pub struct NetWorld {
    pub agent: AgentProcess,
    pub aggregator: Service,
    pub pg_relay: FaultProxy,
    pub cluster: PgCluster,
    pub net: NetPair,
    pub pki: Pki,
    pub dir: tempfile::TempDir,
}

impl NetWorld {
    /// `Err` when the namespaces cannot be created (the reason).
    pub async fn new(adjust_agent: impl FnOnce(&mut dcs_edge::Config)) -> Result<NetWorld, String> {
        dcs_shared::tls::install_crypto_provider();
        let net = NetPair::new()?;
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::new();
        let cluster = PgCluster::start_migrated().await;
        let pg_relay = FaultProxy::start_on(
            SocketAddr::new(IpAddr::V4(net.aggregator_uplink.outside), 0),
            SocketAddr::from(([127, 0, 0, 1], cluster.port())),
        )
        .await;

        // The agent dials the aggregator's end of the link, so the server
        // certificate must name that address.
        let server = pki
            .authority()
            .issue_server(
                &["localhost".to_owned()],
                &[IpAddr::V4(net.aggregator_ip)],
                dcs_certs::Validity::days_from_now(1),
            )
            .expect("server certificate for the link address");
        dcs_certs::write_pair(pki.path(), "server-netns", &server).expect("write server pair");

        // Inside G every address is ours: listen on all of them (the link for
        // the agent, the uplink for the readiness probe).
        let agg_port = free_port();
        let env = [
            ("LISTEN__ADDRESS", format!("0.0.0.0:{agg_port}")),
            ("ADMIN__ADDRESS", "127.0.0.1:0".into()),
            ("TLS__CA", pki.ca.display().to_string()),
            (
                "TLS__CERT",
                pki.path().join("server-netns.pem").display().to_string(),
            ),
            (
                "TLS__KEY",
                pki.path()
                    .join("server-netns-key.pem")
                    .display()
                    .to_string(),
            ),
            (
                "DATABASE__URL",
                format!("postgres://postgres@{}/postgres", pg_relay.addr),
            ),
            ("DATABASE__MIGRATE_ON_START", "false".into()),
            ("DATABASE__ACQUIRE_TIMEOUT", "\"1s\"".into()),
            ("DATABASE__MAX_CONNECTIONS", "4".into()),
            ("LIMITS__RETRY_AFTER", "\"1s\"".into()),
            ("LOG__FORMAT", "json".into()),
        ];
        let mut aggregator = Service::aggregator(env, agg_port, &dir.path().join("aggregator.log"))
            .with_prefix(&NetPair::exec_prefix(&net.aggregator_ns))
            .with_ready_addr(SocketAddr::new(
                IpAddr::V4(net.aggregator_uplink.inside),
                agg_port,
            ));
        aggregator.start().await;

        let mut config = agent::test_config(
            &pki.agent("acme", "netns-1"),
            &format!("https://{}:{agg_port}", net.aggregator_ip),
            &dir.path().join("buffer.db"),
        );
        config.batch.max_records = 500;
        config.retry.max = Duration::from_secs(1);
        config.aggregator.request_timeout = Duration::from_secs(3);
        adjust_agent(&mut config);
        // The agent's ingest API listens on A's uplink only.
        let ingest = SocketAddr::new(IpAddr::V4(net.agent_uplink.inside), free_port());
        let service = Service::new(
            "dcs-edge",
            &["run"],
            agent::agent_env(&config, ingest),
            ingest.port(),
            &dir.path().join("agent.log"),
        )
        .with_prefix(&NetPair::exec_prefix(&net.agent_ns))
        .with_ready_addr(ingest);
        let mut agent = AgentProcess {
            service,
            url: format!("http://{ingest}"),
        };
        agent.start().await;
        Ok(NetWorld {
            agent,
            aggregator,
            pg_relay,
            cluster,
            net,
            pki,
            dir,
        })
    }

    /// Records waiting in the agent's buffer (`None` while it does not answer).
    pub async fn buffered(&self) -> Option<u64> {
        crate::agent::status(&self.agent.url).await["buffer"]["records"].as_u64()
    }

    /// Runs `plan.producers` producers ([`chaos::produce`]) against the agent
    /// until `plan.duration` has passed, while `faults` runs.
    pub async fn run(&self, plan: Plan, faults: impl AsyncFnOnce(&NetWorld)) -> Arc<Ledger> {
        let ledger = Arc::new(Ledger::default());
        let until = Instant::now() + plan.duration;
        let producers: Vec<_> = (0..plan.producers)
            .map(|p| {
                tokio::spawn(chaos::produce(
                    self.agent.url.clone(),
                    p,
                    plan,
                    until,
                    ledger.clone(),
                ))
            })
            .collect();
        faults(self).await;
        for p in producers {
            p.await.expect("producer panicked");
        }
        ledger
    }

    /// [`chaos::verify`] against this world's PostgreSQL and agent.
    pub async fn check(&self, scenario: &str, ledger: &Ledger) -> Report {
        chaos::verify_at(&self.cluster.url(), &self.agent.url, scenario, ledger).await
    }
}

/// PostgreSQL's count of scenario records.
async fn in_pg(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM records WHERE stream = $1")
        .bind(chaos::STREAM)
        .fetch_one(pool)
        .await
        .expect("count records")
}

/// Scenario 5: [`chaos::Plan`] producers push while the agent-aggregator link
/// is cut for `cut`, healed, then impaired for `impaired` with netem (10 %
/// loss, 200 ms delay each way) or, where the kernel refuses netem, with a
/// `tbf` rate limit, then cleared. `Err` (the reason) when namespaces are
/// unavailable: the caller skips.
///
/// Besides the usual verdict the report notes what crossed the link while it
/// was cut (`delivered_during_cut`, which must be 0: the link is the agent's
/// only way out) and what piled up in the agent meanwhile.
pub async fn netns_partition(
    plan: Plan,
    cut: Duration,
    impaired: Duration,
) -> Result<Report, String> {
    NetPair::available()?;
    let world = NetWorld::new(|_| {}).await?;
    let pool = PgPool::connect(&world.cluster.url())
        .await
        .expect("connect cluster");
    let lead = plan.duration.saturating_sub(cut + impaired) / 4;
    // A batch already handed to the aggregator may still commit just after
    // the cut; counting starts once that has settled.
    let settle = Duration::from_secs(1).min(cut / 2);
    let mut during_cut = (0i64, 0u64);
    let mut impairment = "none";
    let ledger = world
        .run(plan, async |w| {
            tokio::time::sleep(lead).await;
            w.net.link_down();
            tokio::time::sleep(settle).await;
            let before = in_pg(&pool).await;
            tokio::time::sleep(cut - settle).await;
            during_cut = (in_pg(&pool).await - before, w.buffered().await.unwrap_or(0));
            w.net.link_up();
            tokio::time::sleep(lead).await;
            impairment = match w.net.try_netem(10.0, 200) {
                Ok(()) => "netem",
                Err(reason) => {
                    eprintln!("netem unavailable: {reason}; skipped that phase");
                    w.net
                        .try_tbf(256)
                        .unwrap_or_else(|e| panic!("neither netem nor tbf works: {e}"));
                    "tbf"
                }
            };
            tokio::time::sleep(impaired).await;
            w.net.clear_qdisc();
        })
        .await;
    pool.close().await;
    let mut report = world.check("netns-partition", &ledger).await;
    report.note("cut_secs", cut.as_secs());
    report.note("delivered_during_cut", during_cut.0);
    report.note("buffered_at_cut_end", during_cut.1);
    report.note("impairment", impairment);
    assert_eq!(
        during_cut.0, 0,
        "records crossed the cut link: it is not the agent's only path: {report}"
    );
    assert!(
        during_cut.1 > 0,
        "nothing piled up in the agent during the cut: {report}"
    );
    Ok(report)
}
