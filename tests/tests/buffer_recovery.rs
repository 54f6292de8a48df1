//! Recovery tells the truth and destroys no evidence: the offline tools
//! never change a file they read (nor create one beside it), so running
//! `buffer check` cannot hide a lost write-ahead log from the agent; a
//! quarantined file, its WAL and its `-shm` are kept byte for byte as found;
//! and every acknowledged record that could not be recovered is counted, in
//! the report, `/v1/status`, the metric and the tools. Real agent processes,
//! real SQLite files damaged on disk.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use dcs_tests::agent::{self, AgentProcess, push, start_agent, wait_until};
use dcs_tests::aggregator::start_aggregator_with;
use dcs_tests::pg::TestDb;
use dcs_tests::pki::Pki;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);
const OLD: usize = 3000;
const WAL_ONLY: usize = 500;

struct Site {
    pki: Pki,
    dir: tempfile::TempDir,
    /// Where the aggregator would be; nothing listens there unless a test
    /// starts one, so records stay buffered.
    port: u16,
}

impl Site {
    fn new() -> Site {
        Site {
            pki: Pki::new(),
            dir: tempfile::tempdir().unwrap(),
            port: agent::free_port(),
        }
    }

    fn buffer_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn buffer(&self) -> PathBuf {
        self.buffer_dir().join("buffer.db")
    }

    fn config(&self) -> dcs_edge::Config {
        agent::test_config(
            &self.pki.agent("acme", "edge-1"),
            &format!("https://localhost:{}", self.port),
            &self.buffer(),
        )
    }

    /// Buffers `n` records and stops the agent cleanly (WAL folded in).
    async fn fill(&self, n: usize) {
        let agent = start_agent(self.config()).await;
        let http = reqwest::Client::new();
        push_all(&http, &agent.url, "old", 0..n).await;
        agent.stop().await;
    }

    /// [`Site::fill`], then `WAL_ONLY` more records pushed to an agent
    /// process that is then killed: they are only in its WAL.
    async fn fill_and_kill(&self) {
        self.fill(OLD).await;
        let log = self.dir.path().join("killed.log");
        let mut process = AgentProcess::spawn(&self.config(), &log).await;
        push_all(
            &reqwest::Client::new(),
            &process.url,
            "walonly",
            0..WAL_ONLY,
        )
        .await;
        process.kill();
        assert!(
            dcs_edge::recovery::wal_of(&self.buffer()).exists(),
            "a killed agent leaves its WAL"
        );
    }
}

async fn push_all(http: &reqwest::Client, url: &str, prefix: &str, range: std::ops::Range<usize>) {
    for start in range.clone().step_by(500) {
        let body = agent::ndjson("s", prefix, start..(start + 500).min(range.end));
        let r = push(http, url, "application/x-ndjson", body).await;
        assert_eq!(r.status(), 200);
    }
}

/// Every file and directory under `dir` (recursively) with its bytes: what
/// "nothing changed, nothing created" is checked against.
fn tree(dir: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            if path.is_dir() {
                stack.push(path);
                out.insert(name, None);
            } else {
                out.insert(name, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

fn names(tree: &BTreeMap<String, Option<Vec<u8>>>) -> Vec<&str> {
    tree.keys().map(String::as_str).collect()
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

fn page_size(path: &Path) -> usize {
    let header = std::fs::read(path).unwrap();
    match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        n => usize::from(n),
    }
}

/// Zeroes the page of the main file holding the payload of record `i` (a
/// leaf page of the `records` table: payloads are stored nowhere else).
/// Returns the page number.
fn destroy_page_of_record(path: &Path, i: usize) -> usize {
    let mut bytes = std::fs::read(path).unwrap();
    let needle = format!("\"msg\":\"record {i}\"}}");
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap_or_else(|| panic!("record {i} is in the main file"));
    let page = page_size(path);
    let k = at / page;
    bytes[k * page..(k + 1) * page].fill(0);
    std::fs::write(path, &bytes).unwrap();
    k
}

/// The ids of every buffered record `dcs-edge buffer export` writes.
fn exported_ids(path: &Path) -> BTreeSet<String> {
    let (_, out, err) = dcs_edge(&["buffer", "export", "--path", path.to_str().unwrap()]);
    out.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}; {err}")))
        .filter(|v| v["state"] == "buffered")
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Runs `buffer check`, `stats`, `export` and `salvage` on `path`, each time
/// checking that no file in its directory changed and none appeared.
/// Returns (check exit code, stats, export's stdout lines, salvage report).
fn every_command_changes_nothing(path: &Path, into: &Path) -> (i32, Value, usize, Value) {
    let dir = path.parent().unwrap();
    let p = path.to_str().unwrap();
    let before = tree(dir);
    let unchanged = |command: &str| {
        let after = tree(dir);
        assert_eq!(
            names(&after),
            names(&before),
            "`buffer {command}` left the directory listing as it was"
        );
        for (name, bytes) in &before {
            assert!(&after[name] == bytes, "`buffer {command}` changed {name}");
        }
    };
    let (check, _, _) = dcs_edge(&["buffer", "check", "--path", p]);
    unchanged("check");
    let (code, out_stats, err) = dcs_edge(&["buffer", "stats", "--path", p]);
    assert_eq!(code, 0, "{err}");
    unchanged("stats");
    let stats: Value = serde_json::from_str(&out_stats).unwrap();
    let (_, exported, _) = dcs_edge(&["buffer", "export", "--path", p]);
    unchanged("export");
    let (code, report, err) = dcs_edge(&[
        "buffer",
        "salvage",
        "--path",
        p,
        "--into",
        into.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    unchanged("salvage");
    (
        check,
        stats,
        exported.lines().count(),
        serde_json::from_str(&report).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_buffer_command_leaves_every_file_byte_identical() {
    // A cleanly stopped buffer: no WAL.
    let site = Site::new();
    site.fill(1200).await;
    let (check, stats, exported, report) =
        every_command_changes_nothing(&site.buffer(), &site.dir.path().join("s1"));
    assert_eq!(check, 0);
    assert_eq!(stats["buffered"]["records"], 1200, "{stats}");
    assert_eq!(stats["held"], 1200, "{stats}");
    assert_eq!(stats["unreadable"], 0, "{stats}");
    assert_eq!(exported, 1200);
    assert_eq!(report["salvaged"], 1200, "{report}");

    // A killed agent's buffer: the newest records are only in the WAL, and
    // the tools see them without folding the WAL into the file.
    let site = Site::new();
    site.fill_and_kill().await;
    let all = (OLD + WAL_ONLY) as u64;
    let (check, stats, exported, report) =
        every_command_changes_nothing(&site.buffer(), &site.dir.path().join("s2"));
    assert_eq!(check, 0, "a crash with its WAL is not damage");
    assert_eq!(stats["buffered"]["records"], all, "{stats}");
    assert_eq!(stats["closed_cleanly"], false, "{stats}");
    assert_eq!(exported as u64, all);
    assert_eq!(report["salvaged"], all, "{report}");
    assert_eq!(report["unreadable"], 0, "{report}");

    // Damaged pages.
    let site = Site::new();
    site.fill(OLD).await;
    destroy_page_of_record(&site.buffer(), OLD / 2);
    let (check, stats, exported, report) =
        every_command_changes_nothing(&site.buffer(), &site.dir.path().join("s3"));
    assert_eq!(check, 1);
    let readable = stats["buffered"]["records"].as_u64().unwrap();
    assert!(readable > 0 && readable < OLD as u64, "{stats}");
    assert_eq!(stats["held"], OLD as u64, "{stats}");
    assert_eq!(stats["unreadable"], OLD as u64 - readable, "{stats}");
    assert_eq!(exported as u64, readable, "export reads what stats counts");
    assert_eq!(report["salvaged"], readable, "{report}");
}

/// Issue: `buffer check` on a buffer whose WAL was lost left an empty WAL
/// behind, so a second check passed and the agent reused delivered keys.
async fn lost_wal(check_first: bool) {
    let site = Site::new();
    site.fill_and_kill().await;
    let buffer = site.buffer();
    std::fs::remove_file(dcs_edge::recovery::wal_of(&buffer)).unwrap();
    let _ = std::fs::remove_file(format!("{}-shm", buffer.display()));
    let found = tree(&site.buffer_dir());

    if check_first {
        for run in 0..2 {
            let (code, out, _) = dcs_edge(&["buffer", "check", "--path", buffer.to_str().unwrap()]);
            assert_eq!(code, 1, "check run {run} finds the lost WAL: {out}");
            assert!(out.contains("write-ahead log is missing"), "{out}");
            assert_eq!(
                tree(&site.buffer_dir()),
                found,
                "check run {run} changed nothing"
            );
        }
    }

    let log = site.dir.path().join("after.log");
    let process = AgentProcess::spawn(&site.config(), &log).await;
    let status = agent::status(&process.url).await;
    let reports = status["quarantine"].as_array().unwrap();
    assert_eq!(reports.len(), 1, "the agent quarantines the file: {status}");
    let report = &reports[0];
    // What the file proves it held is all saved, and waits for delivery.
    agent::assert_lost_wal_salvaged_all(report, OLD as u64);
    assert_eq!(report["unreadable"], 0, "{report}");
    assert_eq!(status["recovered"]["records"], OLD as u64, "{status}");
    assert_eq!(status["recovered"]["files"], 1, "{status}");
    // The quarantined file is the file as found (no WAL, no -shm).
    let folder = site
        .buffer_dir()
        .join("quarantine")
        .join(report["folder"].as_str().unwrap());
    assert_eq!(
        std::fs::read(folder.join("buffer.db")).unwrap(),
        found["buffer.db"].clone().unwrap()
    );
    assert!(!folder.join("buffer.db-wal").exists());
    assert!(!folder.join("buffer.db-shm").exists());
    drop(process);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_wal_is_quarantined_even_after_buffer_check_ran_twice() {
    lost_wal(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_wal_is_quarantined_without_buffer_check() {
    lost_wal(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_keeps_the_file_its_wal_and_its_shm_byte_identical_and_counts_every_loss() {
    let site = Site::new();
    site.fill_and_kill().await;
    let buffer = site.buffer();
    // Damage pages that only the main file holds (the WAL has the newer ones).
    destroy_page_of_record(&buffer, OLD / 3);
    destroy_page_of_record(&buffer, OLD * 2 / 3);
    let found = tree(&site.buffer_dir());
    for name in ["buffer.db", "buffer.db-wal", "buffer.db-shm"] {
        assert!(found.contains_key(name), "{name} is there before the start");
    }

    let log = site.dir.path().join("after.log");
    let process = AgentProcess::spawn(&site.config(), &log).await;
    let status = agent::status(&process.url).await;
    let report = status["quarantine"][0].clone();
    assert!(
        report["reason"].as_str().unwrap().contains("integrity"),
        "{status}"
    );
    let folder = site
        .buffer_dir()
        .join("quarantine")
        .join(report["folder"].as_str().unwrap());
    for name in ["buffer.db", "buffer.db-wal", "buffer.db-shm"] {
        assert!(
            std::fs::read(folder.join(name)).ok() == found[name],
            "quarantine keeps {name} byte for byte"
        );
    }

    // Every record acknowledged to a producer is either salvaged or counted.
    let held = report["held"].as_u64().unwrap();
    let salvaged = report["salvaged"].as_u64().unwrap();
    let unreadable = report["unreadable"].as_u64().unwrap();
    assert_eq!(held, (OLD + WAL_ONLY) as u64, "{report}");
    assert!(unreadable > 0, "{report}");
    assert_eq!(salvaged + unreadable, held, "{report}");
    assert_eq!(status["recovered"]["records"], salvaged, "{status}");
    assert_eq!(
        agent::metric_sample(
            &process.url,
            "dcs_agent_buffer_unsalvageable_records_total",
            &[]
        )
        .await,
        Some(unreadable as f64)
    );
    drop(process);
    let recovered = site
        .buffer_dir()
        .join("recovered")
        .join(format!("{}.db", report["epoch"].as_str().unwrap()));
    let ids = exported_ids(&recovered);
    let missing = (0..OLD)
        .map(|i| format!("old-{i}"))
        .chain((0..WAL_ONLY).map(|i| format!("walonly-{i}")))
        .filter(|id| !ids.contains(id))
        .count();
    assert_eq!(
        missing as u64, unreadable,
        "the count is the records missing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salvage_counts_exactly_the_acknowledged_records_lost_on_damaged_pages() {
    // Some records delivered first, so the count rests on the buffer's
    // counters, not on its first sequence number.
    let site = Site::new();
    let db = TestDb::new().await;
    let port = site.port;
    let aggregator = start_aggregator_with(&site.pki, &db.url, |c| {
        c.listen.address = format!("127.0.0.1:{port}").parse().unwrap();
    })
    .await;
    let agent = start_agent(site.config()).await;
    let http = reqwest::Client::new();
    push_all(&http, &agent.url, "sent", 0..1000).await;
    let delivered = wait_until(TIMEOUT, || async {
        agent::status(&agent.url).await["buffer"]["delivered_total"] == 1000
    })
    .await;
    assert!(delivered, "the first records are delivered");
    aggregator.stop().await;
    push_all(&http, &agent.url, "old", 0..OLD).await;
    agent.stop().await;

    let buffer = site.buffer();
    let mut pages = BTreeSet::new();
    // Indices the delivered records never had: their payloads may linger
    // in freed pages.
    for i in [1200, OLD / 2, OLD * 4 / 5] {
        pages.insert(destroy_page_of_record(&buffer, i));
    }
    let into = site.dir.path().join("salvaged");
    let (code, out, err) = dcs_edge(&[
        "buffer",
        "salvage",
        "--path",
        buffer.to_str().unwrap(),
        "--into",
        into.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let recovered = into.join(format!("{}.db", report["epoch"].as_str().unwrap()));
    let ids = exported_ids(&recovered);
    let missing: Vec<String> = (0..OLD)
        .map(|i| format!("old-{i}"))
        .filter(|id| !ids.contains(id))
        .collect();
    assert!(!missing.is_empty(), "pages {pages:?} held records");
    assert_eq!(report["held"], OLD as u64, "{report}");
    assert_eq!(
        report["unreadable"],
        missing.len() as u64,
        "unreadable counts exactly the records missing: {report}"
    );
    assert_eq!(ids.len() + missing.len(), OLD);

    // The recovered file proves what it holds too: nothing is unreadable.
    let (_, out, _) = dcs_edge(&["buffer", "stats", "--path", recovered.to_str().unwrap()]);
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["held"], ids.len() as u64, "{stats}");
    assert_eq!(stats["unreadable"], 0, "{stats}");

    // export reads every readable record of the damaged file, as salvage
    // does, and says how many it could not.
    let (code, out, err) = dcs_edge(&["buffer", "export", "--path", buffer.to_str().unwrap()]);
    assert_eq!(code, 1, "records are missing: {err}");
    assert_eq!(out.lines().count(), ids.len());
    assert!(
        err.contains(&format!("could not be read: {}", missing.len())),
        "{err}"
    );
}
