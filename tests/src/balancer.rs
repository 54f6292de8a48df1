//! The deployed topology on one machine: `dcs-aggregator serve` replicas as
//! real processes behind HAProxy (the Debian package; TCP mode, so TLS passes
//! through to the replicas, and a health check on `/ready`, as in
//! compose/haproxy/haproxy.cfg). Used by the scale-out scenarios and the
//! fleet test and benchmark.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::agent;
use crate::pki::Pki;
use crate::process::{Service, free_port};

/// One `dcs-aggregator serve` process and its admin port (metrics, `/ready`).
pub struct Replica {
    pub service: Service,
    pub admin: u16,
}

impl Replica {
    /// Replica `n` (it names the log file `aggregator-N.log` in `dir`),
    /// configured through `DCS_AGG_*` variables; `extra` (keys without the
    /// prefix, e.g. `LIMITS__MAX_CONNECTION_AGE`) adds or overrides.
    pub fn new(dir: &Path, pki: &Pki, db_url: &str, n: usize, extra: &[(&str, String)]) -> Replica {
        let port = free_port();
        let admin = free_port();
        let mut env: Vec<(String, String)> = [
            ("LISTEN__ADDRESS", format!("127.0.0.1:{port}")),
            ("ADMIN__ADDRESS", format!("127.0.0.1:{admin}")),
            ("TLS__CA", pki.ca.display().to_string()),
            ("TLS__CERT", pki.server_cert.display().to_string()),
            ("TLS__KEY", pki.server_key.display().to_string()),
            ("DATABASE__URL", db_url.to_owned()),
            ("DATABASE__MIGRATE_ON_START", "false".into()),
            ("LIMITS__RETRY_AFTER", "\"1s\"".into()),
            ("LOG__FORMAT", "text".into()),
            ("LOG__LEVEL", "info".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (key, value) in extra {
            env.retain(|(k, _)| k != key);
            env.push(((*key).to_owned(), value.clone()));
        }
        let service = Service::aggregator(env, port, &dir.join(format!("aggregator-{n}.log")));
        Replica { service, admin }
    }

    /// The replica's `/metrics` text; `None` while it is down.
    pub async fn metrics(&self, http: &reqwest::Client) -> Option<String> {
        if !self.service.is_running() {
            return None;
        }
        http.get(format!("http://127.0.0.1:{}/metrics", self.admin))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    /// Records this replica has ingested since it started; `None` while down.
    pub async fn ingested(&self, http: &reqwest::Client) -> Option<f64> {
        let text = self.metrics(http).await?;
        Some(metric_value(&text, "dcs_aggregator_records_ingested_total").unwrap_or(0.0))
    }

    pub async fn ready(&self, http: &reqwest::Client) -> bool {
        http.get(format!("http://127.0.0.1:{}/ready", self.admin))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }
}

/// The value of the first sample in a Prometheus text exposition whose line
/// starts with `series` (a name, or a name with its `{labels}`).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// `replicas` aggregators, all started, behind one balancer: the deployed
/// topology of compose/ on this machine.
pub struct Cluster {
    // Drop order: the balancer before the replicas.
    pub balancer: Balancer,
    pub replicas: Vec<Replica>,
}

impl Cluster {
    pub async fn start(
        dir: &Path,
        pki: &Pki,
        db_url: &str,
        replicas: usize,
        extra: &[(&str, String)],
    ) -> Cluster {
        dcs_shared::tls::install_crypto_provider();
        let mut replicas: Vec<Replica> = (1..=replicas)
            .map(|n| Replica::new(dir, pki, db_url, n, extra))
            .collect();
        for replica in &mut replicas {
            replica.service.start().await;
        }
        let http = reqwest::Client::new();
        for replica in &replicas {
            assert!(
                agent::wait_until(Duration::from_secs(10), || replica.ready(&http)).await,
                "replica not ready:\n{}",
                replica.service.log_tail()
            );
        }
        let balancer = Balancer::start(dir, &replicas).await;
        // The balancer's first checks (500 ms apart) must pass before agents come.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        Cluster { balancer, replicas }
    }

    /// `https://localhost:PORT` of the balancer (the server certificate names
    /// localhost).
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.balancer.port)
    }

    /// Sum over the replicas of `series` (0 for a replica without it).
    pub async fn sum(&self, http: &reqwest::Client, series: &str) -> f64 {
        let mut total = 0.0;
        for replica in &self.replicas {
            if let Some(text) = replica.metrics(http).await {
                total += metric_value(&text, series).unwrap_or(0.0);
            }
        }
        total
    }
}

/// HAProxy with its own configuration in the scenario's directory.
pub struct Balancer {
    child: Child,
    pub port: u16,
}

/// Health checks fast enough for a test: a draining replica is out within
/// inter x fall = 1 s.
pub const FAST_CHECKS: &str = "inter 500ms fall 2 rise 1";
/// The checks of compose/haproxy/haproxy.cfg.
pub const COMPOSE_CHECKS: &str = "inter 2s fall 2 rise 2";

impl Balancer {
    /// Starts HAProxy in front of `replicas` (running or not: a stopped one
    /// fails its check) and waits until it listens.
    pub async fn start(dir: &Path, replicas: &[Replica]) -> Balancer {
        Balancer::start_with_checks(dir, replicas, FAST_CHECKS).await
    }

    /// Like [`Balancer::start`], with `checks` (e.g. `inter 2s fall 2 rise
    /// 2`, the compose file's) on every server.
    pub async fn start_with_checks(dir: &Path, replicas: &[Replica], checks: &str) -> Balancer {
        let binary = haproxy();
        let port = free_port();
        let servers: String = replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                format!(
                    "    server r{} 127.0.0.1:{} check port {} {checks}\n",
                    i + 1,
                    r.service.port,
                    r.admin
                )
            })
            .collect();
        // As compose/haproxy/haproxy.cfg, with checks fast enough for a test:
        // a draining replica is out within inter x fall = 1 s.
        let config = format!(
            "global\n    maxconn 4000\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10m\n    timeout server 10m\n    timeout check 1s\n    retries 3\n    option redispatch\n\
             frontend agents\n    bind 127.0.0.1:{port}\n    default_backend aggregators\n\
             backend aggregators\n    balance leastconn\n    option httpchk\n    http-check send meth GET uri /ready ver HTTP/1.1 hdr Host localhost\n    http-check expect status 200\n{servers}"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let log = std::fs::File::create(dir.join("haproxy.log")).expect("haproxy log");
        let child = Command::new(&binary)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let ready = agent::wait_until(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(ready, "haproxy did not listen on {port}");
        Balancer { child, port }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HAProxy from PATH or /usr/sbin; scripts/test.sh installs the Debian package.
pub fn haproxy() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
        .expect("haproxy not found: scripts/test.sh installs it (apt package haproxy)")
}
