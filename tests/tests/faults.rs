//! The fault suite (short CI variants). Each scenario drives real agent and
//! aggregator processes against a test-owned PostgreSQL and prints one line:
//! `scenario=NAME acked=N in_pg=M missing=0 duplicated=0 refused=R`.
//! Each asserts that its fault met traffic (see `Report::hit`), so the
//! short durations here still prove something; the whole file runs in about
//! two minutes on 2 cores. Long runs:
//! `cargo run -p dcs-tests --bin dcs-chaos -- --scenario NAME --duration 10m`.

use std::time::Duration;

use dcs_tests::chaos::{self, Plan};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkilled_ten_times_during_ingest_and_forwarding_loses_nothing() {
    chaos::agent_kill(Plan::with_duration(Duration::from_secs(12)), 10)
        .await
        .assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_sigkilled_ten_times_with_batches_in_flight_loses_nothing() {
    chaos::aggregator_kill(Plan::with_duration(Duration::from_secs(12)), 10)
        .await
        .assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_fast_and_immediate_mid_stream_loses_nothing() {
    chaos::postgres_restart(Plan::with_duration(Duration::from_secs(12)))
        .await
        .assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_resets_lost_acks_latency_and_throttling_lose_and_double_nothing() {
    let report = chaos::partition(Plan::with_duration(Duration::from_secs(24))).await;
    report.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_refuses_with_507_loses_nothing_acknowledged_and_recovers() {
    chaos::buffer_full(Plan::with_duration(Duration::from_secs(10)))
        .await
        .assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_reports_exactly_the_records_it_evicted() {
    chaos::drop_oldest(Plan::with_duration(Duration::from_secs(10)))
        .await
        .assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_backlog_drains_in_sequence_order_with_bounded_memory() {
    // CI variant; `dcs-chaos --scenario long-outage --records 1000000` is the full one.
    chaos::long_outage(100_000).await.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_from_a_jumped_clock_neither_reorder_nor_drop_records() {
    chaos::clock_jump(Plan::short()).await.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_aggregator_answering_429_and_503_is_waited_for_as_told() {
    chaos::overload(Plan::with_duration(Duration::from_secs(9)))
        .await
        .assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_buffer_refuses_with_507_and_recovers() {
    if let Some(report) = chaos::disk_full(Plan::with_duration(Duration::from_secs(16))).await {
        report.assert_ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_reverted_to_a_snapshot_moves_to_a_new_epoch_and_loses_and_doubles_nothing() {
    // CI variant; `dcs-chaos --scenario snapshot-revert --records 1000000` is the full one.
    chaos::snapshot_revert(20_000).await.assert_ok();
}
