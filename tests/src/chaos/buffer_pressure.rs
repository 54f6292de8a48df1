//! Scenarios of a buffer under pressure: full (`reject` and `drop-oldest`),
//! on a filesystem that runs out of space, and a long outage's backlog.
//!
//! Invariant: what is lost is only what the overflow policy documents, and
//! exactly as much as the agent reports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::producers::produce_count;
use super::{Ledger, Plan, Report, STREAM, World};
use crate::agent;
use crate::faultproxy::Fault;

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
    let mut report = world.check("buffer-full", &ledger).await;
    report.hit("refused_507", report.refused as u64);
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
    let disk = match SmallDisk::mount("12m") {
        Ok(d) => d,
        Err(reason) => {
            crate::skip(
                "disk-full on a small filesystem",
                &format!("cannot mount tmpfs: {reason}"),
            );
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
            // The link stays cut until the disk has refused producers for a
            // moment, however fast this machine fills it (bounded by the
            // first three quarters of the run).
            let latest = until - plan.duration / 4;
            let filled =
                agent::wait_until(latest.saturating_duration_since(Instant::now()), || async {
                    agent::metric_sample(
                        &w.agent.url,
                        "dcs_agent_requests_total",
                        &[("status", "507")],
                    )
                    .await
                    .is_some_and(|n| n > 0.0)
                })
                .await;
            if filled {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            w.proxy.set(Fault::Pass);
        })
        .await;
    let mut report = world.check("disk-full", &ledger).await;
    report.hit("refused_507", report.refused as u64);
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
    report.hit("dropped", dropped);
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
    report.hit("buffered", buffered);
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
    // The order in which PostgreSQL committed the rows (the cluster runs
    // with track_commit_timestamp), not a time the agent put in them: a
    // later seq never committed before an earlier one.
    let out_of_order: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT committed < lag(committed) OVER (ORDER BY seq) AS back
             FROM (SELECT seq, pg_xact_commit_timestamp(xmin) AS committed
                   FROM records WHERE stream = $1) c) t WHERE back",
    )
    .bind(STREAM)
    .fetch_one(&pool)
    .await
    .expect("order check");
    pool.close().await;
    report.note("out_of_order", out_of_order);
    assert_eq!(
        out_of_order, 0,
        "batches committed out of sequence order: {report}"
    );
    report
}
