//! The agent's graceful shutdown (`retry.shutdown_grace`, docs/GUARANTEES.md):
//! on SIGTERM a batch in flight gets the grace to be acknowledged; one that
//! is not acknowledged in time is abandoned, stays buffered and is sent again
//! after the restart. Either way every record reaches PostgreSQL once.
//!
//! A real `dcs-edge` process, SIGTERMed (not killed), with a fault proxy that
//! delays every chunk on a warm link, so the batch is provably on the wire
//! and not yet committed when the signal lands.

use std::time::{Duration, Instant};

use dcs_tests::agent::{ndjson, push, wait_until};
use dcs_tests::chaos::World;
use dcs_tests::faultproxy::Fault;
use serde_json::Value;
use sqlx::PgPool;

const STREAM: &str = "shutdown";
/// Each chunk through the proxy waits this long: a batch needs at least
/// twice this (request up, answer down) once the link is warm.
const LINK_DELAY: Duration = Duration::from_secs(3);
const RECORDS: usize = 50;

async fn rows(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT record_id) FROM records WHERE stream = $1")
        .bind(STREAM)
        .fetch_one(pool)
        .await
        .expect("count records")
}

async fn buffered(agent_url: &str) -> Value {
    dcs_tests::agent::status(agent_url).await["buffer"]["records"].clone()
}

/// Starts a world whose agent has `grace`, warms its link with one delivered
/// record, slows the link, sends [`RECORDS`] records and SIGTERMs the agent
/// while their batch is on the wire. Returns the world, a pool on its
/// PostgreSQL and how long the agent took to exit.
async fn sigterm_with_a_batch_in_flight(grace: Duration) -> (World, PgPool, Duration) {
    let mut world = World::new(|c| {
        c.retry.shutdown_grace = grace;
        c.batch.linger = Duration::from_millis(20);
        c.batch.max_in_flight = 1;
        // Longer than any delayed batch: the grace, not a timeout, decides.
        c.aggregator.request_timeout = Duration::from_secs(60);
    })
    .await;
    let pool = PgPool::connect(&world.cluster.url())
        .await
        .expect("connect");
    let http = reqwest::Client::new();

    let warm = push(
        &http,
        &world.agent.url,
        "application/x-ndjson",
        ndjson(STREAM, "warm", 0..1),
    )
    .await;
    assert!(warm.status().is_success(), "warm-up record refused");
    assert!(
        wait_until(Duration::from_secs(30), || async {
            rows(&pool).await.0 == 1
        })
        .await,
        "the warm-up record never arrived"
    );

    world
        .proxy
        .set(Fault::Latency(LINK_DELAY.as_millis() as u64));
    let sent = push(
        &http,
        &world.agent.url,
        "application/x-ndjson",
        ndjson(STREAM, "r", 0..RECORDS),
    )
    .await;
    assert!(sent.status().is_success(), "records refused");
    // Past the linger, so the forwarder has read and sent the batch; well
    // short of the proxy's delay, so the aggregator has not seen it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        rows(&pool).await.0,
        1,
        "the batch must still be in flight at SIGTERM"
    );

    let started = Instant::now();
    assert!(world.agent.terminate(), "dcs-edge must exit 0 on SIGTERM");
    let took = started.elapsed();
    // The link stays cut until the test has read the restarted agent's
    // buffer: nothing may be delivered behind its back first.
    world.proxy.set(Fault::Refuse);
    (world, pool, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_a_batch_in_flight_within_the_grace_and_exits_with_it_delivered() {
    let (mut world, pool, took) = sigterm_with_a_batch_in_flight(Duration::from_secs(30)).await;

    assert!(
        took >= LINK_DELAY,
        "the agent exited after {took:?}, before its batch could have been acknowledged"
    );
    assert_eq!(
        rows(&pool).await,
        (RECORDS as i64 + 1, RECORDS as i64 + 1),
        "the agent exits only after PostgreSQL committed the batch"
    );
    // Acknowledged before exit, so nothing is left to send after a restart.
    world.agent.start().await;
    assert_eq!(buffered(&world.agent.url).await, 0);
    world.proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rows(&pool).await.0, RECORDS as i64 + 1);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_abandons_a_batch_past_the_grace_which_stays_buffered_and_is_sent_once_after_restart()
 {
    let grace = Duration::from_millis(300);
    let (mut world, pool, took) = sigterm_with_a_batch_in_flight(grace).await;

    assert!(
        took < LINK_DELAY,
        "the agent took {took:?} to exit: it waited for the batch past its {grace:?} grace"
    );
    world.agent.start().await;
    assert_eq!(
        buffered(&world.agent.url).await,
        RECORDS,
        "the abandoned batch is still in the buffer after the restart"
    );
    world.proxy.set(Fault::Pass);
    assert!(
        wait_until(Duration::from_secs(60), || async {
            rows(&pool).await.0 > RECORDS as i64 && buffered(&world.agent.url).await == 0
        })
        .await,
        "the abandoned batch was not delivered after the restart"
    );
    // The first copy may also have reached the aggregator as the agent hung
    // up; the second is then a counted duplicate, never a second row.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rows(&pool).await, (RECORDS as i64 + 1, RECORDS as i64 + 1));
    pool.close().await;
}
