//! The recipes of docs/INTEGRATIONS.md, each run with the real program from
//! Debian's packages: program → agent → aggregator → PostgreSQL, at least
//! 10,000 messages each, every one asserted exactly once (over UDP, losses
//! are counted from the kernel and reported instead).
//!
//! `#[ignore]`d in the workspace run: `scripts/test.sh` runs them in their own
//! step after `scripts/ensure-syslog-tools.sh` has unpacked syslog-ng and
//! rsyslog (`DCS_SYSLOG_TOOLS`); each prints a `scenario=` line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use dcs_tests::agent::{RunningAgent, free_port, metric_sample, start_agent, wait_until};
use dcs_tests::chaos::log_scenario;
use dcs_tests::pki::{AgentCert, Pki};
use dcs_tests::site::Site;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const MESSAGES: usize = 10_000;
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// Where `scripts/ensure-syslog-tools.sh` unpacked syslog-ng and rsyslog.
fn tools() -> PathBuf {
    let root = std::env::var_os("DCS_SYSLOG_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/dcs/syslog-tools/root")
        });
    assert!(
        root.join("usr/sbin/syslog-ng").is_file(),
        "syslog-ng not found under {}: run scripts/ensure-syslog-tools.sh",
        root.display()
    );
    root
}

struct Pipeline {
    site: Site,
    /// The agent's own certificate, for the senders' TLS client side.
    cert: AgentCert,
    agent: RunningAgent,
}

/// Aggregator, database and an agent with `syslog` listeners.
async fn pipeline(syslog: impl FnOnce(&Pki) -> Vec<Value>) -> Pipeline {
    let site = Site::new().await;
    let mut config = site.agent_config();
    config.batch.linger = Duration::from_millis(50);
    config.syslog = syslog(&site.pki)
        .into_iter()
        .map(|v| serde_json::from_value(v).expect("syslog listener"))
        .collect();
    let cert = AgentCert {
        cert: config.aggregator.cert.clone(),
        key: config.aggregator.key.clone(),
        ca: config.aggregator.ca.clone(),
    };
    let agent = start_agent(config).await;
    // The syslog sockets are bound before the API serves: once it answers,
    // senders can connect.
    let health = agent.endpoint("/health");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            reqwest::get(&health)
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await,
        "the agent did not start"
    );
    Pipeline { site, cert, agent }
}

/// The message texts of a scenario: unique, and easy to find in payloads.
fn texts(scenario: &str) -> Vec<String> {
    (0..MESSAGES)
        .map(|i| format!("{scenario} message {i:05}"))
        .collect()
}

/// Writes `texts` one per line to `in.log` in the pipeline's directory.
fn input_file(p: &Pipeline, texts: &[String]) -> PathBuf {
    let path = p.site.dir.path().join("in.log");
    std::fs::write(
        &path,
        texts.iter().map(|t| format!("{t}\n")).collect::<String>(),
    )
    .unwrap();
    path
}

impl Pipeline {
    /// How many rows hold each `payload.message`.
    async fn messages(&self) -> HashMap<String, i64> {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT coalesce(payload->>'message', ''), count(*) FROM records GROUP BY 1",
        )
        .fetch_all(&self.site.db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
    }

    async fn rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM records")
            .fetch_one(&self.site.db.pool)
            .await
            .unwrap_or(-1)
    }

    /// Waits until every text arrived (or the timeout), then reports and
    /// asserts each exactly once.
    async fn expect_each_once(&self, scenario: &str, texts: &[String], program: &mut Child) {
        let n = texts.len() as i64;
        let arrived = wait_until(DELIVERY_TIMEOUT, || async { self.rows().await >= n }).await;
        // A late duplicate would show within the linger of a batch or two.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = program.start_kill();
        let got = self.messages().await;
        let in_pg = texts.iter().filter(|t| got.contains_key(*t)).count();
        let missing = texts.len() - in_pg;
        let duplicated = got.values().filter(|c| **c > 1).count();
        let extra = got.keys().filter(|k| !texts.contains(k)).count();
        let line = format!(
            "scenario={scenario} sent={} in_pg={in_pg} missing={missing} duplicated={duplicated}",
            texts.len()
        );
        println!("{line}");
        log_scenario(&line);
        if missing > 0 || extra > 0 {
            let sample: Vec<(String, String)> = sqlx::query_as(
                "SELECT stream, payload::text FROM records ORDER BY received_at LIMIT 3",
            )
            .fetch_all(&self.site.db.pool)
            .await
            .unwrap_or_default();
            for log in ["rsyslogd.log", "syslog-ng.log"] {
                if let Ok(text) = std::fs::read_to_string(self.site.dir.path().join(log)) {
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    eprintln!("{log} (last lines, newest first):\n{}", tail.join("\n"));
                }
            }
            let absent: Vec<&String> = texts
                .iter()
                .filter(|t| !got.contains_key(*t))
                .take(20)
                .collect();
            panic!(
                "{line} extra={extra} arrived={arrived}; missing (first 20): {absent:?}; sample rows: {sample:?}"
            );
        }
        assert_eq!(duplicated, 0, "{line}");
    }
}

fn spawn(program: &Path, args: &[&str], env: &[(&str, String)], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.display()))
}

/// syslog-ng in the foreground, without capabilities, with `config` (the
/// part after `@version`) and its state files in the pipeline's directory.
fn syslog_ng(p: &Pipeline, config: &str) -> Child {
    let root = tools();
    let dir = p.site.dir.path();
    let conf = dir.join("syslog-ng.conf");
    std::fs::write(&conf, format!("@version: 3.38\n{config}")).unwrap();
    let libs = format!(
        "{}:{}",
        root.join("usr/lib/syslog-ng").display(),
        root.join("usr/lib/x86_64-linux-gnu").display()
    );
    let arg = |name: &str, file: &str| format!("--{name}={}", dir.join(file).display());
    spawn(
        &root.join("usr/sbin/syslog-ng"),
        &[
            "-F",
            "--no-caps",
            &format!("--cfgfile={}", conf.display()),
            &arg("persist-file", "syslog-ng.persist"),
            &arg("control", "syslog-ng.ctl"),
            &arg("pidfile", "syslog-ng.pid"),
            &format!(
                "--module-path={}",
                root.join("usr/lib/syslog-ng/3.38").display()
            ),
        ],
        &[("LD_LIBRARY_PATH", libs)],
        &dir.join("syslog-ng.log"),
    )
}

/// rsyslogd in the foreground with `config`, its modules from the unpacked
/// package and its work files in the pipeline's directory.
fn rsyslogd(p: &Pipeline, config: &str) -> Child {
    let root = tools();
    let dir = p.site.dir.path();
    let conf = dir.join("rsyslog.conf");
    std::fs::write(
        &conf,
        format!("global(workDirectory=\"{}\")\n{config}", dir.display()),
    )
    .unwrap();
    let modules = root.join("usr/lib/x86_64-linux-gnu/rsyslog");
    spawn(
        &root.join("usr/sbin/rsyslogd"),
        &[
            "-n",
            "-f",
            &conf.display().to_string(),
            "-i",
            &dir.join("rsyslogd.pid").display().to_string(),
            "-M",
            &modules.display().to_string(),
        ],
        &[],
        &dir.join("rsyslogd.log"),
    )
}

/// The file source every syslog-ng recipe reads its messages from.
fn syslog_ng_file_source(input: &Path) -> String {
    format!(
        "source s_app {{ file(\"{}\" flags(no-parse) program-override(\"app\") follow-freq(0.2)); }};\n",
        input.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs syslog-ng from scripts/ensure-syslog-tools.sh; run by scripts/test.sh"]
async fn syslog_ng_http_destination_posts_ndjson_to_the_push_api() {
    let p = pipeline(|_| Vec::new()).await;
    let texts = texts("syslog-ng-http");
    let input = input_file(&p, &texts);
    let config = format!(
        r#"options {{ use-uniqid(yes); }};
{source}
destination d_dcs {{
    http(
        url("{url}/v1/records")
        method("POST")
        headers("Content-Type: application/x-ndjson")
        body('$(format-json --scope none stream="app.logs" id="${{UNIQID}}" ts="${{ISODATE}}" payload.message="${{MSG}}" payload.host="${{HOST}}" payload.program="${{PROGRAM}}")')
        body-suffix("\n")
        batch-lines(500)
        batch-timeout(100)
        response-action(400 => drop, 413 => drop)
    );
}};
log {{ source(s_app); destination(d_dcs); }};
"#,
        source = syslog_ng_file_source(&input),
        url = p.agent.url,
    );
    let mut program = syslog_ng(&p, &config);
    p.expect_each_once("syslog-ng-http", &texts, &mut program)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs syslog-ng from scripts/ensure-syslog-tools.sh; run by scripts/test.sh"]
async fn syslog_ng_network_and_syslog_destinations_feed_the_syslog_listener() {
    let port = free_port();
    let p = pipeline(|_| {
        vec![json!({"protocol": "tcp", "listen": format!("127.0.0.1:{port}"), "stream": "syslog.${appname}"})]
    })
    .await;
    // network(): RFC 3164, LF-framed; syslog(): RFC 5424, octet-counted.
    for (scenario, driver) in [
        ("syslog-ng-network", "network"),
        ("syslog-ng-syslog", "syslog"),
    ] {
        sqlx::query("DELETE FROM records")
            .execute(&p.site.db.pool)
            .await
            .unwrap();
        let texts = texts(scenario);
        let input = input_file(&p, &texts);
        let config = format!(
            "{source}destination d_dcs {{ {driver}(\"127.0.0.1\" port({port}) transport(\"tcp\")); }};\nlog {{ source(s_app); destination(d_dcs); }};\n",
            source = syslog_ng_file_source(&input),
        );
        let _ = std::fs::remove_file(p.site.dir.path().join("syslog-ng.persist"));
        let mut program = syslog_ng(&p, &config);
        p.expect_each_once(scenario, &texts, &mut program).await;
        let _ = program.wait().await;
    }
    let stream: String = sqlx::query_scalar("SELECT DISTINCT stream FROM records")
        .fetch_one(&p.site.db.pool)
        .await
        .unwrap();
    assert_eq!(stream, "syslog.app");
}

/// rsyslog reads `in.log` with imfile and forwards it with omfwd.
fn rsyslog_forwarding(input: &Path, port: u16, tls: &str) -> String {
    format!(
        r#"module(load="imfile")
input(type="imfile" file="{input}" tag="app" readMode="0" freshStartTail="off")
action(type="omfwd" target="127.0.0.1" port="{port}" protocol="tcp" tcp_framing="octet-counted"
       template="RSYSLOG_SyslogProtocol23Format" {tls}
       queue.type="LinkedList" action.resumeRetryCount="-1")
"#,
        input = input.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rsyslog from scripts/ensure-syslog-tools.sh; run by scripts/test.sh"]
async fn rsyslog_omfwd_over_tcp_feeds_the_syslog_listener() {
    let port = free_port();
    let p =
        pipeline(|_| vec![json!({"protocol": "tcp", "listen": format!("127.0.0.1:{port}")})]).await;
    let texts = texts("rsyslog-tcp");
    let input = input_file(&p, &texts);
    let mut program = rsyslogd(&p, &rsyslog_forwarding(&input, port, ""));
    p.expect_each_once("rsyslog-tcp", &texts, &mut program)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rsyslog-gnutls from scripts/ensure-syslog-tools.sh; run by scripts/test.sh"]
async fn rsyslog_omfwd_over_mutual_tls_feeds_the_syslog_listener() {
    let port = free_port();
    let p = pipeline(|pki| {
        vec![json!({
            "protocol": "tls", "listen": format!("127.0.0.1:{port}"),
            "tls": {"cert": pki.server_cert, "key": pki.server_key, "client_ca": pki.ca},
        })]
    })
    .await;
    let texts = texts("rsyslog-tls");
    let input = input_file(&p, &texts);
    let tls_global = format!(
        "global(defaultNetstreamDriver=\"gtls\" defaultNetstreamDriverCAFile=\"{}\" defaultNetstreamDriverCertFile=\"{}\" defaultNetstreamDriverKeyFile=\"{}\")\n",
        p.site.pki.ca.display(),
        p.cert.cert.display(),
        p.cert.key.display()
    );
    let config = tls_global
        + &rsyslog_forwarding(
            &input,
            port,
            r#"streamDriver="gtls" streamDriverMode="1" streamDriverAuthMode="x509/name" streamDriverPermittedPeers="localhost""#,
        );
    let mut program = rsyslogd(&p, &config);
    p.expect_each_once("rsyslog-tls", &texts, &mut program)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by scripts/test.sh with the other recipes"]
async fn logger_rfc5424_over_tcp_feeds_the_syslog_listener() {
    let port = free_port();
    let p =
        pipeline(|_| vec![json!({"protocol": "tcp", "listen": format!("127.0.0.1:{port}")})]).await;
    let texts = texts("logger-tcp");
    let input = input_file(&p, &texts);
    let port = port.to_string();
    let mut program = Command::new("logger")
        .args([
            "--rfc5424",
            "--tcp",
            "--octet-count",
            "-n",
            "127.0.0.1",
            "-P",
            &port,
            "-t",
            "app",
        ])
        .stdin(std::fs::File::open(&input).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("logger (util-linux)");
    let status = program.wait().await.unwrap();
    assert!(status.success(), "logger failed: {status}");
    p.expect_each_once("logger-tcp", &texts, &mut program).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by scripts/test.sh with the other recipes"]
async fn logger_over_udp_loses_only_what_the_kernel_counts_as_dropped() {
    let port = free_port();
    let p = pipeline(|_| {
        vec![json!({"name": "udp", "protocol": "udp", "listen": format!("127.0.0.1:{port}")})]
    })
    .await;
    let texts = texts("logger-udp");
    let input = input_file(&p, &texts);
    let port_arg = port.to_string();
    let backlog_drops_before = backlog_drops();
    let status = Command::new("logger")
        .args([
            "--rfc5424",
            "--udp",
            "-n",
            "127.0.0.1",
            "-P",
            &port_arg,
            "-t",
            "app",
        ])
        .stdin(std::fs::File::open(&input).unwrap())
        .status()
        .await
        .expect("logger (util-linux)");
    assert!(status.success(), "logger failed: {status}");
    let url = p.agent.url.clone();
    let settled = |url: String| async move {
        let received = metric_sample(
            &url,
            "dcs_agent_syslog_messages_received_total",
            &[("listener", "udp")],
        )
        .await;
        let drops = metric_sample(
            &url,
            "dcs_agent_syslog_udp_drops_total",
            &[("listener", "udp")],
        )
        .await;
        (received.unwrap_or(0.0) + drops.unwrap_or(0.0)) as usize
    };
    // The drop count is read from the kernel every second.
    wait_until(DELIVERY_TIMEOUT, || async {
        settled(url.clone()).await >= MESSAGES
    })
    .await;
    let received = metric_sample(
        &url,
        "dcs_agent_syslog_messages_received_total",
        &[("listener", "udp")],
    )
    .await
    .unwrap_or(0.0) as i64;
    wait_until(DELIVERY_TIMEOUT, || async { p.rows().await >= received }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = p.messages().await;
    let in_pg = texts.iter().filter(|t| got.contains_key(*t)).count();
    let duplicated = got.values().filter(|c| **c > 1).count();
    let drops = metric_sample(
        &url,
        "dcs_agent_syslog_udp_drops_total",
        &[("listener", "udp")],
    )
    .await
    .unwrap_or(-1.0) as usize;
    let backlog = backlog_drops().saturating_sub(backlog_drops_before);
    let lost = MESSAGES - in_pg;
    let line = format!(
        "scenario=logger-udp sent={MESSAGES} in_pg={in_pg} lost={lost} socket_drops={drops} backlog_drops={backlog} duplicated={duplicated}"
    );
    println!("{line}");
    log_scenario(&line);
    assert_eq!(duplicated, 0, "{line}");
    // Each loss is a drop the kernel counted: at the socket (the agent did
    // not read in time; dcs_agent_syslog_udp_drops_total) or, over loopback,
    // in the host's input backlog before any socket saw the datagram.
    assert!(
        drops <= lost && lost <= drops + backlog,
        "a loss the kernel did not count: {line}"
    );
}

/// Packets the kernel dropped host-wide from its per-CPU input backlog
/// (`/proc/net/softnet_stat`, second column, hexadecimal).
fn backlog_drops() -> usize {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter_map(|hex| usize::from_str_radix(hex, 16).ok())
        .sum()
}
