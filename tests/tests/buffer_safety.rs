//! The buffer heals itself and protects what it holds: a damaged file is
//! quarantined and salvaged instead of crash-looping the agent, counters
//! survive restarts, and payloads can be encrypted at rest. Real agents, real
//! SQLite files damaged on disk, real aggregator and PostgreSQL.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dcs_tests::agent::{self, AgentProcess, push, start_agent, wait_until};
use dcs_tests::aggregator::{RunningAggregator, start_aggregator_with};
use dcs_tests::pg::TestDb;
use dcs_tests::pki::Pki;
use serde_json::Value;
use sqlx::PgPool;

const TIMEOUT: Duration = Duration::from_secs(60);
const OLD: usize = 3000;

struct Site {
    pki: Pki,
    db: TestDb,
    dir: tempfile::TempDir,
    /// The aggregator's port, fixed before it runs so agents can be
    /// configured (and fill their buffers) while it is down.
    port: u16,
}

impl Site {
    async fn new() -> Site {
        Site {
            pki: Pki::new(),
            db: TestDb::new().await,
            dir: tempfile::tempdir().unwrap(),
            port: agent::free_port(),
        }
    }

    fn buffer(&self) -> PathBuf {
        self.dir.path().join("buffer.db")
    }

    fn config(&self) -> dcs_edge::Config {
        agent::test_config(
            &self.pki.agent("acme", "edge-1"),
            &format!("https://localhost:{}", self.port),
            &self.buffer(),
        )
    }

    async fn aggregator(&self) -> RunningAggregator {
        let port = self.port;
        start_aggregator_with(&self.pki, &self.db.url, |c| {
            c.listen.address = format!("127.0.0.1:{port}").parse().unwrap();
        })
        .await
    }

    /// Buffers `range` of `prefix` records with the aggregator down, then
    /// stops the agent cleanly (its WAL folded into the file). Returns the epoch.
    async fn fill(&self, config: dcs_edge::Config, prefix: &str, n: usize) -> String {
        let agent = start_agent(config).await;
        let http = reqwest::Client::new();
        for start in (0..n).step_by(500) {
            let body = agent::ndjson("s", prefix, start..(start + 500).min(n));
            let r = push(&http, &agent.url, "application/x-ndjson", body).await;
            assert_eq!(r.status(), 200);
        }
        let status = agent::status(&agent.url).await;
        assert_eq!(status["buffer"]["records"], n as u64);
        agent.stop().await;
        status["epoch"].as_str().unwrap().to_owned()
    }
}

/// (record_id, epoch) of every stored row.
async fn stored(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT record_id, epoch::text FROM records")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM records")
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

/// Starts an agent on a damaged buffer with the aggregator up and checks the
/// whole promise: it starts, reports the quarantine with consistent counts,
/// takes new records, and delivers every salvaged record once, under its
/// original epoch. Returns the report.
async fn recover_and_deliver(site: &Site) -> Value {
    let aggregator = site.aggregator().await;
    let agent = start_agent(site.config()).await;
    let http = reqwest::Client::new();
    let st = agent::status(&agent.url).await;
    let reports = st["quarantine"].as_array().unwrap().clone();
    assert_eq!(reports.len(), 1, "one quarantine reported: {st}");
    let report = reports[0].clone();
    let salvaged = report["salvaged"].as_u64().unwrap();
    let unreadable = report["unreadable"].as_u64().unwrap();
    if let Some(held) = report["held"].as_u64() {
        assert!(salvaged + unreadable <= held, "{report}");
    }
    assert!(salvaged <= OLD as u64, "{report}");
    assert!(!report["reason"].as_str().unwrap().is_empty());

    // Ingest works on the new buffer, under a new epoch.
    let r = push(
        &http,
        &agent.url,
        "application/x-ndjson",
        agent::ndjson("s", "new", 0..10),
    )
    .await;
    assert_eq!(r.status(), 200);
    let expected = salvaged as i64 + 10;
    wait_until(TIMEOUT, || async { count(&site.db.pool).await >= expected }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows = stored(&site.db.pool).await;
    assert_eq!(rows.len() as i64, expected, "salvaged + new, nothing else");
    let ids: HashSet<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "no record twice");
    let old_epochs: HashSet<&str> = rows
        .iter()
        .filter(|(id, _)| id.starts_with("old-"))
        .map(|(_, e)| e.as_str())
        .collect();
    if salvaged > 0 {
        assert_eq!(old_epochs.len(), 1, "salvaged records keep their epoch");
        assert_eq!(
            report["epoch"].as_str(),
            old_epochs.iter().next().copied(),
            "{report}"
        );
    }
    assert_ne!(
        st["epoch"], report["epoch"],
        "the new buffer has a new epoch"
    );

    // The damaged file is kept as evidence, the recovered buffer goes once delivered.
    let folder = site
        .dir
        .path()
        .join("quarantine")
        .join(report["folder"].as_str().unwrap());
    assert!(folder.join("buffer.db").exists());
    assert!(folder.join("report.json").exists());
    assert!(!folder.join("PENDING").exists());
    let recovered = site.dir.path().join("recovered");
    assert!(
        wait_until(TIMEOUT, || async {
            std::fs::read_dir(&recovered).map_or(true, |d| d.count() == 0)
        })
        .await,
        "the recovered buffer is removed once delivered"
    );
    agent.stop().await;

    // A restart reports the same quarantine and salvages nothing again.
    let agent = start_agent(site.config()).await;
    let again = agent::status(&agent.url).await;
    assert_eq!(again["quarantine"], Value::Array(reports));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&site.db.pool).await, expected);
    agent.stop().await;
    aggregator.stop().await;
    report
}

fn page_size(path: &Path) -> u64 {
    let header = std::fs::read(path).unwrap();
    match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        n => u64::from(n),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_truncated_mid_page_is_quarantined_and_what_remains_is_delivered_once() {
    let site = Site::new().await;
    site.fill(site.config(), "old", OLD).await;
    let path = site.buffer();
    let len = std::fs::metadata(&path).unwrap().len();
    let page = page_size(&path);
    let cut = (len * 6 / 10) / page * page + page / 3;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut)
        .unwrap();

    let report = recover_and_deliver(&site).await;
    let salvaged = report["salvaged"].as_u64().unwrap();
    assert!(salvaged > 0, "the pages before the cut are read: {report}");
    assert!(
        salvaged < OLD as u64,
        "the pages after it are gone: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_with_damaged_pages_is_quarantined_and_every_readable_record_delivered_once() {
    let site = Site::new().await;
    site.fill(site.config(), "old", OLD).await;
    let path = site.buffer();
    let page = page_size(&path);
    let pages = std::fs::metadata(&path).unwrap().len() / page;
    let mut bytes = std::fs::read(&path).unwrap();
    let mut rng = fastrand::Rng::with_seed(11);
    // Scribble over the headers of a few pages in the middle of the file and
    // flip random bytes around them.
    for k in [pages * 4 / 10, pages / 2, pages * 6 / 10] {
        let at = (k * page) as usize;
        bytes[at..at + 12].fill(0xA5);
        for _ in 0..16 {
            let i = at + rng.usize(..page as usize);
            bytes[i] ^= 1 << rng.u8(..8);
        }
    }
    std::fs::write(&path, &bytes).unwrap();

    let report = recover_and_deliver(&site).await;
    assert!(report["salvaged"].as_u64().unwrap() > 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_write_ahead_log_is_detected_and_the_checkpointed_records_are_delivered_exactly() {
    let site = Site::new().await;
    // OLD records checkpointed into the file by a clean stop ...
    let epoch = site.fill(site.config(), "old", OLD).await;
    // ... then more that live only in the WAL when the process is killed.
    let log = site.dir.path().join("agent.log");
    let mut process = AgentProcess::spawn(&site.config(), &log).await;
    let http = reqwest::Client::new();
    let r = push(
        &http,
        &process.url,
        "application/x-ndjson",
        agent::ndjson("s", "walonly", 0..500),
    )
    .await;
    assert_eq!(r.status(), 200);
    process.kill();
    let wal = dcs_edge::recovery::wal_of(&site.buffer());
    assert!(wal.exists(), "a killed agent leaves its WAL");
    std::fs::remove_file(&wal).unwrap();
    let _ = std::fs::remove_file(format!("{}-shm", site.buffer().display()));

    let report = recover_and_deliver(&site).await;
    // The file itself is intact: exactly what was checkpointed is saved.
    agent::assert_lost_wal_salvaged_all(&report, OLD as u64);
    assert_eq!(report["epoch"], epoch.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_are_the_same_before_and_after_a_restart() {
    let site = Site::new().await;
    let aggregator = site.aggregator().await;
    let http = reqwest::Client::new();
    let agent = start_agent(site.config()).await;
    let r = push(
        &http,
        &agent.url,
        "application/x-ndjson",
        agent::ndjson("s", "a", 0..400),
    )
    .await;
    assert_eq!(r.status(), 200);
    wait_until(TIMEOUT, || async {
        agent::status(&agent.url).await["buffer"]["delivered_total"] == 400
    })
    .await;
    aggregator.stop().await;
    let r = push(
        &http,
        &agent.url,
        "application/x-ndjson",
        agent::ndjson("s", "b", 0..250),
    )
    .await;
    assert_eq!(r.status(), 200);
    let before = agent::status(&agent.url).await;
    agent.stop().await;

    let agent = start_agent(site.config()).await;
    let after = agent::status(&agent.url).await;
    for key in [
        "records",
        "bytes",
        "delivered_total",
        "dropped_total",
        "capacity_bytes",
    ] {
        assert_eq!(before["buffer"][key], after["buffer"][key], "buffer.{key}");
    }
    assert_eq!(before["buffer"]["records"], 250);
    assert_eq!(before["buffer"]["delivered_total"], 400);
    assert_eq!(
        before["dead_letters"]["records"],
        after["dead_letters"]["records"]
    );
    assert_eq!(before["epoch"], after["epoch"]);
    agent.stop().await;
}

fn write_key(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let path = dir.join(name);
    let hex: String = std::iter::repeat_n(format!("{byte:02x}"), 32).collect();
    std::fs::write(&path, hex).unwrap();
    path
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn buffer_bytes(path: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    if let Ok(wal) = std::fs::read(dcs_edge::recovery::wal_of(path)) {
        bytes.extend(wal);
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_payloads_leave_no_plaintext_on_disk_survive_a_key_rotation_and_a_wrong_key_is_refused()
 {
    let site = Site::new().await;
    let keys = tempfile::tempdir().unwrap();
    let k1 = write_key(keys.path(), "k1", 0x11);
    let k2 = write_key(keys.path(), "k2", 0x22);
    let k3 = write_key(keys.path(), "k3", 0x33);

    let mut first = site.config();
    first.buffer.encryption.key_file = Some(k1.clone());
    let agent = start_agent(first).await;
    let http = reqwest::Client::new();
    let body: String = (0..300)
        .map(|i| format!("{{\"stream\":\"s\",\"id\":\"e-{i}\",\"payload\":{{\"secret\":\"PLAINTEXT-MARKER-{i}\"}}}}\n"))
        .collect();
    assert_eq!(
        push(&http, &agent.url, "application/x-ndjson", body)
            .await
            .status(),
        200
    );
    // Checked while the agent runs (WAL) and after it stopped (main file).
    assert!(!contains(
        &buffer_bytes(&site.buffer()),
        b"PLAINTEXT-MARKER"
    ));
    agent.stop().await;
    let at_rest = buffer_bytes(&site.buffer());
    assert!(!contains(&at_rest, b"PLAINTEXT-MARKER"));
    assert!(contains(&at_rest, b"e-299"), "ids stay readable for dedup");

    // A wrong key: a clear start-up error naming the key, nothing overwritten.
    let mut wrong = site.config();
    wrong.buffer.encryption.key_file = Some(k3);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = dcs_edge::run(wrong.compile().unwrap(), listener, async {})
        .await
        .expect_err("a wrong key is refused");
    let text = error.to_string();
    assert!(text.contains("previous_key_files"), "{text}");
    assert!(text.contains("not configured"), "{text}");
    assert_eq!(
        buffer_bytes(&site.buffer()),
        at_rest,
        "the file is untouched"
    );
    // No key at all: refused too.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = dcs_edge::run(site.config().compile().unwrap(), listener, async {})
        .await
        .expect_err("no key is refused");
    assert!(error.to_string().contains("no encryption key"), "{error}");

    // Rotated: k2 seals new records, k1 still opens the old ones.
    let aggregator = site.aggregator().await;
    let mut rotated = site.config();
    rotated.buffer.encryption.key_file = Some(k2);
    rotated.buffer.encryption.previous_key_files = vec![k1];
    let agent = start_agent(rotated).await;
    let body: String = (300..350)
        .map(|i| format!("{{\"stream\":\"s\",\"id\":\"e-{i}\",\"payload\":{{\"secret\":\"PLAINTEXT-MARKER-{i}\"}}}}\n"))
        .collect();
    assert_eq!(
        push(&http, &agent.url, "application/x-ndjson", body)
            .await
            .status(),
        200
    );
    wait_until(TIMEOUT, || async { count(&site.db.pool).await >= 350 }).await;
    let secrets: Vec<String> =
        sqlx::query_scalar("SELECT payload->>'secret' FROM records ORDER BY seq")
            .fetch_all(&site.db.pool)
            .await
            .unwrap();
    let expected: Vec<String> = (0..350).map(|i| format!("PLAINTEXT-MARKER-{i}")).collect();
    assert_eq!(secrets, expected, "every record arrives intact, once");
    agent.stop().await;
    aggregator.stop().await;
}

fn dcs_edge(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(agent::binary("dcs-edge"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offline_tools_check_count_export_and_salvage_a_buffer() {
    let site = Site::new().await;
    let epoch = site.fill(site.config(), "old", 1200).await;
    let path = site.buffer();
    let p = path.to_str().unwrap();

    let (code, out, _) = dcs_edge(&["buffer", "check", "--path", p]);
    assert_eq!((code, out.starts_with("ok")), (0, true), "{out}");

    let (code, out, err) = dcs_edge(&["buffer", "stats", "--path", p]);
    assert_eq!(code, 0, "{err}");
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["integrity"], "ok");
    assert_eq!(stats["epoch"], epoch.as_str());
    assert_eq!(stats["buffered"]["records"], 1200);
    assert_eq!(stats["streams"]["s"]["buffered"], 1200);
    assert_eq!(stats["closed_cleanly"], true);

    let (code, out, err) = dcs_edge(&["buffer", "export", "--path", p]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1200);
    assert_eq!(lines[7]["id"], "old-7");
    assert_eq!(lines[7]["payload"]["i"], 7);
    assert_eq!(lines[7]["state"], "buffered");

    // Damage it: check says so (exit 1), salvage copies what is readable.
    let page = page_size(&path);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / page / 2 * page + 100)
        .unwrap();
    let before = std::fs::read(&path).unwrap();
    let (code, out, _) = dcs_edge(&["buffer", "check", "--path", p]);
    assert_eq!((code, out.starts_with("damaged")), (1, true), "{out}");
    let into = site.dir.path().join("salvaged");
    let (code, out, err) = dcs_edge(&[
        "buffer",
        "salvage",
        "--path",
        p,
        "--into",
        into.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let salvaged = report["salvaged"].as_u64().unwrap();
    assert!(salvaged > 0 && salvaged < 1200, "{report}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the damaged file is untouched"
    );
    let recovered = into.join(format!("{epoch}.db"));
    let (code, out, _) = dcs_edge(&["buffer", "stats", "--path", recovered.to_str().unwrap()]);
    assert_eq!(code, 0);
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["buffered"]["records"], salvaged);
    assert_eq!(stats["epoch"], epoch.as_str());
}
