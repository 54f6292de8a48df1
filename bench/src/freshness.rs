//! Freshness: how long a record takes from the producer's 2xx to a row a user
//! can query, through the real agent with its own batching (the latency step
//! beside it times one pre-encoded batch against the aggregator only).
//!
//! Producers send open-loop: request k is sent at `t0 + k / rate` whether or
//! not earlier ones were answered, so a slow stretch shows as the queue it
//! builds. A poller asks PostgreSQL every [`POLL`] for the agent's rows above
//! the highest contiguous `seq` it has seen (through the primary key) and
//! notes, per record id, when its answer came back: an upper bound of the
//! moment the row became visible, by at most one poll interval plus the
//! query's own time.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use serde::Serialize;
use tokio::time::Instant;

use crate::bodies::http_client;
use crate::meter::{CpuPerRecord, Meter, Usage, percentile, sorted};
use crate::progress;
use crate::world::{World, start_agent};

/// Records per producer request: a small request, as a live producer sends
/// them, so the agent's linger and batch size decide the freshness.
pub const REQUEST_RECORDS: u64 = 100;
/// How often the poller looks for new rows.
const POLL: Duration = Duration::from_millis(10);

/// One agent setting of the sweep: a name and `DCS_EDGE_*` suffixes.
pub struct Setting {
    pub name: &'static str,
    pub env: &'static [(&'static str, &'static str)],
}

/// The defaults first (the headline), then knobs that trade freshness for
/// throughput.
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "defaults",
        env: &[],
    },
    Setting {
        name: "batch.linger=5ms",
        env: &[("BATCH__LINGER", "5ms")],
    },
    Setting {
        name: "batch.linger=200ms",
        env: &[("BATCH__LINGER", "200ms")],
    },
    Setting {
        name: "batch.max_records=1000",
        env: &[("BATCH__MAX_RECORDS", "1000")],
    },
];

#[derive(Debug, Clone, Serialize)]
pub struct FreshnessResult {
    pub setting: String,
    pub target_records_per_s: f64,
    /// What the producers achieved (sent records / send window).
    pub offered_records_per_s: f64,
    pub records: u64,
    pub request_records: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Requests that did not get a 2xx (their records are not counted).
    pub errors: usize,
    pub cpu: CpuPerRecord,
    pub usage: Usage,
}

/// Runs one freshness measurement: `rate` records/s for `secs` seconds with
/// the agent setting `setting`.
pub async fn step(
    w: &World,
    setting: &Setting,
    rate: f64,
    secs: f64,
) -> anyhow::Result<FreshnessResult> {
    let db = w.database().await?;
    let agg_port = dcs_tests::process::free_port();
    let mut aggregator = w.aggregator_service("fresh-aggregator", agg_port, &db.url);
    aggregator.start().await;
    let env: Vec<(&str, String)> = setting
        .env
        .iter()
        .map(|(k, v)| (*k, (*v).to_owned()))
        .collect();
    let mut agent = w.agent_service_with("fresh-agent", agg_port, "process-crash", &env);
    let url = start_agent(&mut agent).await?;
    let (agent_pid, agg_pid) = (
        agent.pid().context("agent pid")?,
        aggregator.pid().context("aggregator pid")?,
    );
    let requests = ((rate * secs) / REQUEST_RECORDS as f64).ceil().max(10.0) as u64;
    let n = requests * REQUEST_RECORDS;
    let generator = w.generator;
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        tokio::task::spawn_blocking(move || {
            (0..requests)
                .map(|k| {
                    Bytes::from(
                        generator
                            .ndjson(k * REQUEST_RECORDS, (k + 1) * REQUEST_RECORDS)
                            .0,
                    )
                })
                .collect()
        })
        .await?,
    );
    let seen: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n as usize]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (pool, seen, stop) = (db.pool.clone(), seen.clone(), stop.clone());
        tokio::spawn(async move { poll(&pool, n, &seen, &stop).await })
    };

    let meter = Meter::start(Some(agent_pid), Some(agg_pid)).with_db(db.name());
    let client = http_client();
    let post_url = format!("{url}/v1/records");
    let interval = Duration::from_secs_f64(REQUEST_RECORDS as f64 / rate);
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..requests {
        tokio::time::sleep_until(t0 + interval * k as u32).await;
        let request = client
            .post(&post_url)
            .header("content-type", "application/x-ndjson")
            .body(bodies[k as usize].clone())
            .send();
        tasks.spawn(async move {
            let ok = matches!(request.await, Ok(r) if r.status().is_success());
            (k, ok.then(Instant::now))
        });
    }
    let send_secs = t0.elapsed().as_secs_f64();
    let mut acked = vec![None; requests as usize];
    while let Some(done) = tasks.join_next().await {
        let (k, at) = done?;
        acked[k as usize] = at;
    }
    let errors = acked.iter().filter(|a| a.is_none()).count();
    let expected = n - errors as u64 * REQUEST_RECORDS;
    // Every acked record must show up; a generous bound for a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let visible = seen.lock().expect("lock").iter().flatten().count() as u64;
        if visible >= expected {
            break;
        }
        if Instant::now() > deadline {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            bail!(
                "freshness: only {visible} of {expected} acked records visible after 60 s\nagent log:\n{}",
                agent.log_tail()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let usage = meter.stop();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    poller.await.context("poller")??;
    agent.kill();
    aggregator.kill();
    w.remove_buffer("fresh-agent");
    drop(db);

    let seen = seen.lock().expect("lock");
    let mut ages = Vec::with_capacity(n as usize);
    for (i, at) in seen.iter().enumerate() {
        let Some(ack) = acked[i / REQUEST_RECORDS as usize] else {
            continue;
        };
        let at = at.context("an acked record never became visible")?;
        // A row can be visible a moment before its 2xx reaches the producer.
        ages.push(at.saturating_duration_since(ack).as_secs_f64() * 1000.0);
    }
    let ages = sorted(ages);
    progress(&format!(
        "freshness {}: p50 {:.0} ms p99 {:.0} ms",
        setting.name,
        percentile(&ages, 50.0),
        percentile(&ages, 99.0)
    ));
    Ok(FreshnessResult {
        setting: setting.name.to_owned(),
        target_records_per_s: rate,
        offered_records_per_s: n as f64 / send_secs.max(1e-9),
        records: n,
        request_records: REQUEST_RECORDS,
        p50_ms: percentile(&ages, 50.0),
        p90_ms: percentile(&ages, 90.0),
        p99_ms: percentile(&ages, 99.0),
        max_ms: ages.last().copied().unwrap_or(f64::NAN),
        errors,
        cpu: CpuPerRecord::of(&usage, expected),
        usage,
    })
}

/// Notes when each record (by the number in its id, `rec-NNNNNNNNNN`) first
/// came back from a query, until `stop`.
async fn poll(
    pool: &sqlx::PgPool,
    n: u64,
    seen: &Mutex<Vec<Option<Instant>>>,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    let mut agent: Option<(i64, uuid::Uuid)> = None;
    // Every seq up to `watermark` was seen; `above` holds seen ones past it
    // (in-flight batches commit out of order).
    let mut watermark = 0i64;
    let mut above = BTreeSet::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(POLL).await;
        if agent.is_none() {
            agent =
                sqlx::query_as("SELECT id, last_epoch FROM agents WHERE last_epoch IS NOT NULL")
                    .fetch_optional(pool)
                    .await?;
        }
        let Some((id, epoch)) = agent else { continue };
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT seq, record_id FROM records WHERE agent_id = $1 AND epoch = $2 AND seq > $3",
        )
        .bind(id)
        .bind(epoch)
        .bind(watermark)
        .fetch_all(pool)
        .await?;
        let now = Instant::now();
        let mut seen = seen.lock().expect("lock");
        for (seq, record_id) in rows {
            if !above.insert(seq) {
                continue;
            }
            let i: usize = record_id
                .strip_prefix("rec-")
                .and_then(|d| d.parse().ok())
                .with_context(|| format!("unexpected record id {record_id:?}"))?;
            ensure!((i as u64) < n, "record id {record_id} out of range");
            seen[i].get_or_insert(now);
        }
        while above.first() == Some(&(watermark + 1)) {
            above.pop_first();
            watermark += 1;
        }
    }
    Ok(())
}
