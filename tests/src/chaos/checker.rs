//! The checker: what producers were told (the `Ledger`) against what
//! PostgreSQL holds, as one `Report` per scenario.
//!
//! Invariant: a scenario passes only when every acknowledged record is
//! present exactly once and no refused record is present.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::{DRAIN_TIMEOUT, STREAM};

/// What producers were told, by record id.
#[derive(Debug, Default)]
pub struct Ledger {
    pub(super) acked: Mutex<HashSet<String>>,
    pub(super) refused: Mutex<HashSet<String>>,
    /// No definitive answer before the scenario ended (agent down at the end).
    pub(super) unknown: Mutex<HashSet<String>>,
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
    /// Evidence that the scenario's fault met traffic (answers cut, 503s
    /// seen, acks dropped...): each must be above zero, or the scenario
    /// proved nothing whatever the counts say.
    pub hits: Vec<(String, u64)>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.refused_present == 0
    }

    pub fn note(&mut self, key: &str, value: impl fmt::Display) {
        self.notes.push((key.to_owned(), value.to_string()));
    }

    /// Records `key=count` as evidence that the fault hit traffic;
    /// [`Report::assert_ok`] fails when it is zero.
    pub fn hit(&mut self, key: &str, count: u64) {
        self.note(key, count);
        self.hits.push((key.to_owned(), count));
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
        for (what, count) in &self.hits {
            assert!(*count > 0, "the fault never met traffic ({what}=0): {self}");
        }
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

/// [`verify`] over a connection of its own to the database at `pg_url`.
pub async fn verify_at(pg_url: &str, agent_url: &str, scenario: &str, ledger: &Ledger) -> Report {
    let pool = PgPool::connect(pg_url).await.expect("connect for check");
    let report = verify(&pool, agent_url, scenario, ledger).await;
    pool.close().await;
    report
}

/// Waits (bounded) until every acknowledged record is in `pool` or was
/// evicted by the agent, and the agent's buffer is empty, then compares
/// PostgreSQL with the ledger.
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
        let status = crate::agent::status(agent_url).await;
        let drained = status["buffer"]["records"] == 0;
        // Records a `drop_oldest` buffer evicted never arrive: they are
        // counted, not waited for (compare still reports them missing).
        let evicted = status["buffer"]["dropped_total"].as_u64().unwrap_or(0) as usize;
        if (present as usize + evicted >= acked.len() && drained) || Instant::now() > deadline {
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
        hits: Vec::new(),
    }
}
