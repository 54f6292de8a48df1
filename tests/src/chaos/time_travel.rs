//! Scenarios of time going wrong: the agent's buffer reverted to a
//! snapshot, and timestamps far in the past and future.
//!
//! Invariant: neither loses, doubles, dead-letters nor reorders a record;
//! a reverted buffer moves to a new epoch.

use std::sync::Arc;

use sqlx::PgPool;

use super::producers::produce_count;
use super::{DRAIN_TIMEOUT, Ledger, Plan, Report, STREAM, World};
use crate::agent;
use crate::faultproxy::Fault;

/// Scenario 12: the agent's VM is reverted to a snapshot. The snapshot is
/// taken of a stopped agent with a backlog (records acknowledged but not yet
/// delivered); the agent then continues and delivers everything, including
/// records the snapshot never saw. It is killed, its buffer directory is put
/// back to the snapshot, and it starts again with new records to push: the
/// restored buffer's next seqs were already delivered with other records.
/// Every acknowledged record must arrive once, and none may become a dead
/// letter: the agent moves to a new epoch instead.
pub async fn snapshot_revert(records: usize) -> Report {
    let mut world = World::new(|_| {}).await;
    let buffer = world.agent_config.buffer.path.clone();
    let snapshot = world.dir.path().join("snapshot");
    let ledger = Arc::new(Ledger::default());
    let part = (records / 5).max(1);
    let push = async |url: &str, producer: usize| {
        produce_count(url.to_owned(), producer, 250, part, ledger.clone()).await;
    };

    push(&world.agent.url, 0).await;
    wait_drained(&world.agent.url).await;
    world.proxy.set(Fault::Refuse);
    push(&world.agent.url, 1).await;
    assert!(world.agent.terminate(), "agent did not stop on SIGTERM");
    copy_files(&buffer, &snapshot);
    world.agent.start().await;
    world.proxy.set(Fault::Pass);
    push(&world.agent.url, 2).await;
    wait_drained(&world.agent.url).await;

    world.agent.kill();
    let _ = std::fs::remove_dir_all(buffer.parent().expect("buffer dir").join("quarantine"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", buffer.display()));
    }
    copy_files(
        &snapshot.join(buffer.file_name().expect("buffer file")),
        buffer.parent().expect("dir"),
    );
    // The first new records are buffered before the agent can ask the
    // aggregator anything, so they take seqs that are already delivered and
    // meet 409s (re-keyed); the rest arrive after it moved to a new epoch.
    world.proxy.set(Fault::Refuse);
    world.agent.start().await;
    push(&world.agent.url, 3).await;
    world.proxy.set(Fault::Pass);
    push(&world.agent.url, 4).await;

    let mut report = world.check("snapshot-revert", &ledger).await;
    let status = world.agent_status().await;
    let dead = status["dead_letters"]["records"]
        .as_u64()
        .unwrap_or(u64::MAX);
    let rekeyed = status["buffer"]["rekeyed_total"].as_u64().unwrap_or(0);
    let pool = PgPool::connect(&world.cluster.url())
        .await
        .expect("connect");
    let epochs: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT epoch) FROM records WHERE stream = $1")
            .bind(STREAM)
            .fetch_one(&pool)
            .await
            .expect("count epochs");
    let shared_keys: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM records GROUP BY agent_id, epoch, seq HAVING count(*) > 1) k",
    )
    .fetch_one(&pool)
    .await
    .expect("count keys");
    pool.close().await;
    report.note("dead_letters", dead);
    report.note("rekeyed", rekeyed);
    report.note("epochs", epochs);
    report.note("keys_with_two_records", shared_keys);
    assert_eq!(dead, 0, "records became dead letters: {report}");
    assert_eq!(shared_keys, 0, "a key holds two records: {report}");
    assert!(
        epochs >= 2,
        "the agent did not move to a new epoch: {report}"
    );
    report
}

/// Waits (bounded) until the agent reports an empty buffer.
async fn wait_drained(agent_url: &str) {
    let drained = agent::wait_until(DRAIN_TIMEOUT, || async {
        crate::agent::status(agent_url).await["buffer"]["records"] == 0
    })
    .await;
    assert!(drained, "the agent's buffer did not drain");
}

/// Copies `path` and its SQLite companions (`-wal`, `-shm`, when present)
/// into `dir`, keeping their names.
fn copy_files(path: &std::path::Path, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("create snapshot dir");
    for suffix in ["", "-wal", "-shm"] {
        let from = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        if from.exists() {
            let name = from.file_name().expect("file name");
            std::fs::copy(&from, dir.join(name)).expect("copy buffer file");
        }
    }
}

/// Scenario 9: timestamps far in the past and future (a producer or agent
/// clock that jumped) neither reorder nor drop records.
pub async fn clock_jump(plan: Plan) -> Report {
    let world = World::new(|_| {}).await;
    let client = reqwest::Client::new();
    let ledger = Ledger::default();
    let stamps = [
        "1970-01-01T00:00:00Z",
        "2099-12-31T23:59:59.999999Z",
        "2001-09-09T01:46:40+05:30",
        "1999-12-31T23:59:59-08:00",
    ];
    let n = plan.chunk * 8;
    let body: String = (0..n)
        .map(|i| {
            format!(
                "{{\"stream\":\"{STREAM}\",\"id\":\"t-{i}\",\"ts\":\"{}\",\"payload\":{{\"i\":{i}}}}}\n",
                stamps[i % stamps.len()]
            )
        })
        .collect();
    let r = client
        .post(format!("{}/v1/records", world.agent.url))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("push");
    assert!(r.status().is_success());
    ledger
        .acked
        .lock()
        .expect("ledger")
        .extend((0..n).map(|i| format!("t-{i}")));
    let report = world.check("clock-jump", &ledger).await;
    let pool = PgPool::connect(&world.cluster.url())
        .await
        .expect("connect");
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT record_id FROM records WHERE stream = $1 ORDER BY seq")
            .bind(STREAM)
            .fetch_all(&pool)
            .await
            .expect("ids");
    let expected: Vec<String> = (0..n).map(|i| format!("t-{i}")).collect();
    assert_eq!(
        ids, expected,
        "sequence order is push order whatever the timestamps"
    );
    let extremes: (String, String) =
        sqlx::query_as("SELECT min(ts)::text, max(ts)::text FROM records WHERE stream = $1")
            .bind(STREAM)
            .fetch_one(&pool)
            .await
            .expect("ts");
    pool.close().await;
    assert!(extremes.0.starts_with("1970-01-01"), "{extremes:?}");
    assert!(extremes.1.starts_with("2099-12-31"), "{extremes:?}");
    report
}
