//! Fault scenarios in the manner of Jepsen: concurrent producers push records
//! with unique ids through a real agent process, a fault is injected (kills,
//! partitions, outages, a full buffer), and the checker then proves that every
//! acknowledged record is in PostgreSQL exactly once and every refused one is
//! absent. The same scenarios run briefly as tests and for hours through the
//! `dcs-chaos` binary.
//!
//! `world` starts the system under test, `producers` push and note every
//! answer in the `Ledger`, `checker` compares the ledger with PostgreSQL;
//! the scenarios are grouped as `faults` (kills, restarts, partitions,
//! overload), `buffer_pressure` (full buffer, full disk, drop-oldest, a long
//! outage) and `time_travel` (a reverted snapshot, clock jumps).

use std::time::Duration;

mod buffer_pressure;
mod checker;
mod faults;
mod producers;
mod time_travel;
mod world;

pub use buffer_pressure::{SmallDisk, buffer_full, disk_full, drop_oldest, long_outage};
pub use checker::{
    Ledger, RecordKey, Report, compare, compare_on, log_scenario, verify, verify_at,
};
pub use faults::{agent_kill, aggregator_kill, overload, partition, postgres_restart};
pub use producers::{Request, produce, produce_until};
pub use time_travel::{clock_jump, snapshot_revert};
pub use world::World;

/// The stream every chaos record is pushed on.
pub const STREAM: &str = "chaos";
/// How long the checker waits for the backlog to drain after the faults stop.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(180);

/// How long and how hard a scenario pushes.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub duration: Duration,
    pub producers: usize,
    /// Records per request.
    pub chunk: usize,
    /// Pause between one producer's requests.
    pub pace: Duration,
}

impl Plan {
    /// The short variant for CI.
    pub fn short() -> Plan {
        Plan {
            duration: Duration::from_secs(15),
            producers: 4,
            chunk: 50,
            pace: Duration::from_millis(25),
        }
    }

    pub fn with_duration(duration: Duration) -> Plan {
        Plan {
            duration,
            ..Plan::short()
        }
    }
}

/// Every scenario by name, for `dcs-chaos`.
pub const SCENARIOS: [&str; 13] = [
    "agent-kill",
    "aggregator-kill",
    "postgres-restart",
    "partition",
    "netns-partition",
    "buffer-full",
    "disk-full",
    "drop-oldest",
    "long-outage",
    "clock-jump",
    "overload",
    "snapshot-revert",
    "all",
];

/// Runs one named scenario for `duration` (long-outage: `records`).
pub async fn run_named(name: &str, duration: Duration, records: usize) -> Vec<Report> {
    let plan = Plan::with_duration(duration);
    let kills = (duration.as_secs() / 2).clamp(10, 10_000) as u32;
    match name {
        "agent-kill" => vec![agent_kill(plan, kills).await],
        "aggregator-kill" => vec![aggregator_kill(plan, kills).await],
        "postgres-restart" => vec![postgres_restart(plan).await],
        "partition" => vec![partition(plan).await],
        "netns-partition" => {
            let phase = (duration / 4).max(Duration::from_secs(5));
            match crate::netns::netns_partition(plan, phase, phase).await {
                Ok(report) => vec![report],
                Err(reason) => {
                    eprintln!("SKIP netns-partition: {reason}");
                    Vec::new()
                }
            }
        }
        "buffer-full" => vec![buffer_full(plan).await],
        "disk-full" => disk_full(plan).await.into_iter().collect(),
        "drop-oldest" => vec![drop_oldest(plan).await],
        "long-outage" => vec![long_outage(records).await],
        "clock-jump" => vec![clock_jump(plan).await],
        "overload" => vec![overload(plan).await],
        "snapshot-revert" => vec![snapshot_revert(records).await],
        "all" => {
            let mut all = Vec::new();
            for n in &SCENARIOS[..SCENARIOS.len() - 1] {
                all.extend(Box::pin(run_named(n, duration, records)).await);
            }
            all
        }
        other => panic!("unknown scenario {other:?}; known: {SCENARIOS:?}"),
    }
}
