//! Scenarios of failing processes and links: the agent or the aggregator
//! killed, PostgreSQL restarted, the link cut in each way the fault proxy
//! knows, and an aggregator that answers 429 and 503.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Ledger, Plan, Report, World, produce, verify};
use crate::agent;
use crate::faultproxy::Fault;
use crate::pki::Pki;

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
    let mut with_backlog = 0u64;
    let ledger = world
        .run(plan, async |w, _| {
            for _ in 0..kills {
                jitter_sleep(every / 2, every).await;
                // Records acknowledged to producers and not yet delivered:
                // what the kill puts at risk.
                if w.agent_status().await["buffer"]["records"].as_u64() > Some(0) {
                    with_backlog += 1;
                }
                w.agent.kill();
                w.agent.start().await;
            }
        })
        .await;
    let mut report = world.check("agent-kill", &ledger).await;
    report.note("kills", kills);
    report.hit("kills_with_backlog", with_backlog);
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
    report.hit(
        "answers_cut",
        world
            .proxy
            .answers_cut
            .load(std::sync::atomic::Ordering::Relaxed),
    );
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
    let mut report = world.check("postgres-restart", &ledger).await;
    // Batches the aggregator refused (503) or could not answer while
    // PostgreSQL was down, counted by the agent that retried them.
    let retried = agent::metric_sample(
        &world.agent.url,
        "dcs_agent_batches_sent_total",
        &[("outcome", "retry")],
    )
    .await
    .unwrap_or(0.0);
    report.hit("batches_retried", retried as u64);
    report
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
    let proxy = &world.proxy;
    report.hit(
        "acks_dropped",
        proxy
            .acks_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
    );
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
    report.hit("refusals", refusals as u64);
    report.note("retried_too_soon", too_soon);
    assert_eq!(too_soon, 0, "the agent ignored Retry-After: {report}");
    agent.stop().await;
    aggregator.stop().await;
    report
}
