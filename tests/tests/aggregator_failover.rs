//! What a PostgreSQL outage or failover looks like from the aggregator,
//! reproduced on a cluster the test owns (see `dcs_tests::pg::PgCluster`):
//! the server crashes or shuts down and comes back, turns read-only (a
//! demoted primary, a standby behind a stale route), a backend is terminated
//! mid-batch, and a COMMIT is lost after PostgreSQL committed.
//! In each case the batch gets 503 with Retry-After and the usual JSON error,
//! no connection to the wrong server is reused, the aggregator recovers
//! without a restart, and a resend is stored exactly once.
//!
//! The whole-system scenarios with Patroni are in `tests/tests/patroni.rs`.

use std::time::{Duration, Instant};

use dcs_shared::wire;
use dcs_tests::aggregator::{
    BatchAnswer, RunningAggregator, agent_client, numbered_batch, start_aggregator_with,
};
use dcs_tests::pg::{PgCluster, TestDb};
use dcs_tests::pki::Pki;
use reqwest::StatusCode;
use sqlx::{Connection as _, PgConnection};
use uuid::Uuid;

const RETRY_AFTER_SECS: u64 = 2;

async fn post(client: &reqwest::Client, agg: &RunningAggregator, body: Vec<u8>) -> BatchAnswer {
    BatchAnswer::post(client, &agg.endpoint(wire::BATCHES_PATH), body).await
}

fn batch(epoch: Uuid, seqs: std::ops::RangeInclusive<i64>) -> Vec<u8> {
    numbered_batch(epoch, seqs, true)
}

/// Resends `body` until it is stored; every answer before that must be a 503
/// (never a 409, a 500 or a 2xx that did not commit).
async fn resend_until_stored(
    client: &reqwest::Client,
    agg: &RunningAggregator,
    body: Vec<u8>,
) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = post(client, agg, body.clone()).await;
        if answer.status == StatusCode::OK {
            return answer.counts();
        }
        answer.assert_retry_later(RETRY_AFTER_SECS);
        assert!(Instant::now() < deadline, "the aggregator did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Setup {
    cluster: PgCluster,
    db: TestDb,
    agg: RunningAggregator,
    client: reqwest::Client,
    admin: PgConnection,
    epoch: Uuid,
}

/// A cluster, an aggregator on it, and a first batch (seqs 1..=10) stored.
async fn setup() -> Setup {
    let cluster = PgCluster::start().await;
    let db = TestDb::on_server(&cluster.url()).await.expect("test db");
    let pki = Pki::new();
    let agg = start_aggregator_with(&pki, &db.url, |config| {
        config.database.acquire_timeout = Duration::from_secs(1);
        config.limits.retry_after = Duration::from_secs(RETRY_AFTER_SECS);
    })
    .await;
    db.until_startup_partitions(dcs_aggregator::config::DEFAULT_PARTITIONS_AHEAD)
        .await;
    let client = agent_client(&pki.agent("acme", "edge-01"));
    let epoch = Uuid::now_v7();
    assert_eq!(
        post(&client, &agg, batch(epoch, 1..=10)).await.counts(),
        (10, 0)
    );
    let admin = PgConnection::connect(&cluster.url())
        .await
        .expect("admin connection");
    Setup {
        cluster,
        db,
        agg,
        client,
        admin,
        epoch,
    }
}

/// `ALTER SYSTEM` and a reload: the change reaches every open session too.
async fn set_system(admin: &mut PgConnection, setting: &str) {
    // Two statements: ALTER SYSTEM cannot run in the implicit transaction
    // of a multi-statement query.
    for sql in [
        format!("ALTER SYSTEM {setting}"),
        "SELECT pg_reload_conf()".into(),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *admin)
            .await
            .unwrap_or_else(|e| panic!("ALTER SYSTEM {setting}: {e}"));
    }
    // Backends apply a reload when they next read a command.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

async fn aggregator_sessions(admin: &mut PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dcs-aggregator'",
    )
    .fetch_one(&mut *admin)
    .await
    .expect("count sessions")
}

/// Where a batch's backend is cut: what it waits on
/// (`pg_stat_activity.wait_event`) and the statement it waits in
/// (`LIKE` pattern). The statement tells the batch apart from the
/// aggregator's own maintenance, whose start-up partition run also commits
/// and, on a loaded machine, can still be running.
struct Cut {
    wait_event: &'static str,
    statement: &'static str,
}

/// Waiting for another transaction's claim on the same seqs.
const AT_CLAIM: Cut = Cut {
    wait_event: "transactionid",
    statement: "%INSERT INTO record_ranges%",
};

/// Committed locally, waiting for the synchronous standby.
const AT_COMMIT: Cut = Cut {
    wait_event: "SyncRep",
    statement: "COMMIT%",
};

/// The aggregator's backend at `cut`, once it is there.
async fn backend_waiting_at(admin: &mut PgConnection, cut: &Cut) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity \
             WHERE application_name = 'dcs-aggregator' AND wait_event = $1 \
               AND query LIKE $2 LIMIT 1",
        )
        .bind(cut.wait_event)
        .bind(cut.statement)
        .fetch_optional(&mut *admin)
        .await
        .expect("find backend");
        if let Some(pid) = pid {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no aggregator backend waits on {} in {}",
            cut.wait_event,
            cut.statement
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn terminate(admin: &mut PgConnection, pid: i32) {
    let done: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut *admin)
        .await
        .expect("pg_terminate_backend");
    assert!(done, "backend {pid} was not terminated");
}

#[tokio::test]
async fn a_read_only_server_gets_503_keeps_no_aggregator_session_and_writes_resume_without_a_restart()
 {
    let Setup {
        cluster: _cluster,
        db,
        agg,
        client,
        mut admin,
        epoch,
    } = setup().await;
    assert!(aggregator_sessions(&mut admin).await > 0);

    // What a demoted primary looks like to sessions that stay connected.
    set_system(&mut admin, "SET default_transaction_read_only = on").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        post(&client, &agg, batch(epoch, 11..=20))
            .await
            .assert_retry_later(RETRY_AFTER_SECS);
        // Pooled sessions are closed after their 25006, new ones refused.
        if aggregator_sessions(&mut admin).await == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the aggregator keeps sessions open on a read-only server"
        );
    }
    let ready = client.get(agg.endpoint("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    set_system(&mut admin, "RESET default_transaction_read_only").await;
    assert_eq!(
        resend_until_stored(&client, &agg, batch(epoch, 11..=20)).await,
        (10, 0)
    );
    assert_eq!(db.count("records").await, 20);
    agg.stop().await;
}

#[tokio::test]
async fn a_backend_terminated_mid_batch_gets_503_and_the_resend_is_stored_once() {
    let Setup {
        cluster: _cluster,
        db,
        agg,
        client,
        mut admin,
        epoch,
    } = setup().await;

    // Hold the batch's seq range in an open transaction, so the batch's
    // claim waits on it and the test can terminate the waiting backend.
    let mut blocker = PgConnection::connect(&db.url).await.expect("blocker");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; INSERT INTO record_ranges (agent_id, epoch, first_seq, last_seq) \
         SELECT id, '{epoch}', 11, 20 FROM agents WHERE name = 'edge-01'"
    )))
    .execute(&mut blocker)
    .await
    .expect("hold the range");
    cut_while_waiting(&client, &agg, &mut admin, batch(epoch, 11..=20), &AT_CLAIM)
        .await
        .assert_retry_later(RETRY_AFTER_SECS);
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut blocker)
        .await
        .expect("release the range");

    assert_eq!(
        resend_until_stored(&client, &agg, batch(epoch, 11..=20)).await,
        (10, 0)
    );
    assert_eq!(db.count("records").await, 20);
    agg.stop().await;
}

#[tokio::test]
async fn a_commit_whose_answer_is_lost_is_not_acknowledged_and_its_resend_is_a_duplicate_success() {
    let Setup {
        cluster,
        db,
        agg,
        client,
        mut admin,
        epoch,
    } = setup().await;

    // A synchronous standby that never answers: COMMIT is written locally,
    // then waits for it. Terminating the backend there is the failover case
    // where PostgreSQL committed and the aggregator never heard so.
    set_system(&mut admin, "SET synchronous_standby_names = 'nobody'").await;
    until_commits_wait_for_the_standby(&cluster.url(), &mut admin).await;
    cut_while_waiting(&client, &agg, &mut admin, batch(epoch, 11..=20), &AT_COMMIT)
        .await
        .assert_retry_later(RETRY_AFTER_SECS);
    // The outcome really was "committed": the 503 is what keeps it safe.
    assert_eq!(db.count("records").await, 20);

    set_system(&mut admin, "RESET synchronous_standby_names").await;
    // Returns once commits stop waiting, which also frees any still queued.
    commit_probe(&cluster.url()).await;
    // The resend meets its own committed range: duplicates, not a 409.
    assert_eq!(
        resend_until_stored(&client, &agg, batch(epoch, 11..=20)).await,
        (0, 10)
    );
    assert_eq!(db.count("records").await, 20);
    agg.stop().await;
}

/// A connection to `url` and the transaction it is about to commit: one with
/// a transaction id, whose commit record is what waits for a synchronous
/// standby. Returns the backend's pid and the commit in flight.
async fn commit_probe_started(
    url: &str,
) -> (i32, tokio::task::JoinHandle<Result<(), sqlx::Error>>) {
    let mut probe = PgConnection::connect(url).await.expect("probe connection");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut probe)
        .await
        .expect("probe pid");
    let commit = tokio::spawn(async move {
        sqlx::query("SELECT txid_current()")
            .execute(&mut probe)
            .await
            .map(drop)
    });
    (pid, commit)
}

/// Commits a probe transaction on `url` and returns once it is committed.
async fn commit_probe(url: &str) {
    let (_, commit) = commit_probe_started(url).await;
    tokio::time::timeout(Duration::from_secs(30), commit)
        .await
        .expect("a commit still waits for the standby 30 s after the reset")
        .expect("probe task")
        .expect("probe commit");
}

/// Returns once a commit waits for the synchronous standby. Whether commits
/// wait is decided for all backends by the checkpointer, which applies a
/// reload in its own time: on a loaded machine a batch sent right after
/// `ALTER SYSTEM` could still commit at once.
async fn until_commits_wait_for_the_standby(url: &str, admin: &mut PgConnection) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (pid, commit) = commit_probe_started(url).await;
        while !commit.is_finished() {
            let waiting: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
                 WHERE pid = $1 AND wait_event = 'SyncRep')",
            )
            .bind(pid)
            .fetch_one(&mut *admin)
            .await
            .expect("read the probe's wait");
            if waiting {
                // Committed locally; terminating it ends the wait.
                terminate(admin, pid).await;
                let _ = commit.await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            Instant::now() < deadline,
            "commits still do not wait for the standby 30 s after the reload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Posts `body`, terminates its backend at `cut`, and returns the answer.
async fn cut_while_waiting(
    client: &reqwest::Client,
    agg: &RunningAggregator,
    admin: &mut PgConnection,
    body: Vec<u8>,
    cut: &Cut,
) -> BatchAnswer {
    let sending = {
        let client = client.clone();
        let url = agg.endpoint(wire::BATCHES_PATH);
        tokio::spawn(async move { BatchAnswer::post(&client, &url, body).await })
    };
    let pid = backend_waiting_at(admin, cut).await;
    terminate(admin, pid).await;
    sending.await.expect("an answer")
}

/// A stopped server turns every batch, and `/ready`, into 503; once it is
/// back, the resend is stored once and `/ready` is 200 again, without an
/// aggregator restart. `mode` is `pg_ctl stop`'s: `immediate` is a crash,
/// `fast` a clean shutdown.
async fn outage_and_recovery(mode: &str) {
    let Setup {
        cluster,
        db,
        agg,
        client,
        epoch,
        ..
    } = setup().await;
    cluster.stop(mode).await;
    for _ in 0..3 {
        post(&client, &agg, batch(epoch, 11..=20))
            .await
            .assert_retry_later(RETRY_AFTER_SECS);
    }
    let ready = client.get(agg.endpoint("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    cluster.start_again().await;
    // Stale pooled connections may cost an attempt or two.
    assert_eq!(
        resend_until_stored(&client, &agg, batch(epoch, 11..=20)).await,
        (10, 0)
    );
    assert_eq!(db.count("records").await, 20);
    let ready = client.get(agg.endpoint("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    agg.stop().await;
}

#[tokio::test]
async fn a_postgres_crash_turns_batches_into_503_until_it_is_back_then_they_are_stored_once() {
    outage_and_recovery("immediate").await;
}

#[tokio::test]
async fn a_postgres_clean_shutdown_turns_batches_into_503_until_it_is_back() {
    outage_and_recovery("fast").await;
}
