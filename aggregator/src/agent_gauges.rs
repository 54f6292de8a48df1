//! The center's view of the fleet on `/metrics`: the per-agent
//! `dcs_aggregator_agent_*` gauges and the fleet-wide `dcs_aggregator_agents`.
//!
//! Design constraints:
//! - **A silent agent stays visible.** A gauge set only when a batch arrives
//!   vanishes with the process: after a redeploy, an agent that had already
//!   stopped reporting was simply absent, and `DcsAgentSilent` (which needs a
//!   series to compare with `time()`) could not fire. So every replica rebuilds
//!   the gauges from the `agents` table at start-up and every
//!   `metrics.agents_refresh_interval`: each replica exports every known agent,
//!   with the last time *any* replica heard from it. Queries take
//!   `max by (tenant, agent)` across replicas (docs/OBSERVABILITY.md).
//! - **Never backwards.** A batch sets the gauges at once, before its row is
//!   written (and the row's update is skipped when another batch holds it), so
//!   the table can be older than what this replica saw: the table's values
//!   replace an agent's gauges only when its `last_seen` is at least as recent
//!   as this replica's.
//! - **Bounded cardinality.** 5 series per agent per replica;
//!   `metrics.per_agent = false` drops them all, leaving only the fleet-wide
//!   counts by link state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dcs_shared::identity::AgentIdentity;
use dcs_shared::wire;
use sqlx::PgPool;

use crate::config::MetricsConfig;

/// How long an agent may be silent before the center calls its link down
/// (the same rule as `/agents`); agents retry at most every `retry.max` (30 s
/// by default), so five minutes of silence is a real outage, not a pause.
pub(crate) const LINK_DOWN_AFTER_SECS: i64 = 300;

/// One row of `agents`, as the gauges need it.
#[derive(sqlx::FromRow)]
struct AgentRow {
    tenant: String,
    agent: String,
    last_seen: f64,
    backlog_records: Option<i64>,
    backlog_bytes: Option<i64>,
    backlog_oldest_age_secs: Option<i64>,
    dropped_total: Option<i64>,
}

const AGENT_ROWS: &str = "\
    SELECT tenant_id AS tenant, name AS agent, \
        extract(epoch FROM last_seen)::float8 AS last_seen, \
        backlog_records, backlog_bytes, backlog_oldest_age_secs, dropped_total \
    FROM agents";

/// Owned by the `AppState` (batches update it) and by the refresh task.
#[derive(Clone)]
pub(crate) struct AgentGauges {
    per_agent: bool,
    /// Unix time this replica last set each agent's `last_seen` gauge, so a
    /// refresh never moves it back.
    seen: Arc<Mutex<HashMap<(String, String), f64>>>,
}

impl AgentGauges {
    pub(crate) fn new(config: MetricsConfig) -> Self {
        for link in ["up", "down"] {
            metrics::gauge!("dcs_aggregator_agents", "link" => link).set(0.0);
        }
        AgentGauges {
            per_agent: config.per_agent,
            seen: Arc::default(),
        }
    }

    /// A batch arrived from `agent`, with the backlog it reported.
    pub(crate) fn record_batch(&self, agent: &AgentIdentity, backlog: Option<&wire::Backlog>) {
        if !self.per_agent {
            return;
        }
        let now = unix_now();
        self.seen
            .lock()
            .expect("agent gauges lock")
            .insert((agent.tenant.clone(), agent.agent.clone()), now);
        let labels = labels(&agent.tenant, &agent.agent);
        metrics::gauge!("dcs_aggregator_agent_last_seen_timestamp_seconds", &labels).set(now);
        if let Some(b) = backlog {
            set_backlog(
                &labels,
                Some(b.records as i64),
                Some(b.bytes as i64),
                Some(b.oldest_age_secs as i64),
                Some(b.dropped_total as i64),
            );
        }
    }

    /// Rebuilds the gauges from the `agents` table; returns how many agents
    /// it holds.
    pub(crate) async fn refresh(&self, pool: &PgPool) -> Result<usize, sqlx::Error> {
        let rows = sqlx::query_as::<_, AgentRow>(AGENT_ROWS)
            .fetch_all(pool)
            .await?;
        let now = unix_now();
        let down = rows
            .iter()
            .filter(|r| now - r.last_seen > LINK_DOWN_AFTER_SECS as f64)
            .count();
        metrics::gauge!("dcs_aggregator_agents", "link" => "up").set((rows.len() - down) as f64);
        metrics::gauge!("dcs_aggregator_agents", "link" => "down").set(down as f64);
        if !self.per_agent {
            return Ok(rows.len());
        }
        let mut seen = self.seen.lock().expect("agent gauges lock");
        for row in &rows {
            let key = (row.tenant.clone(), row.agent.clone());
            if seen.get(&key).is_some_and(|&ours| ours > row.last_seen) {
                continue;
            }
            seen.insert(key, row.last_seen);
            let labels = labels(&row.tenant, &row.agent);
            metrics::gauge!("dcs_aggregator_agent_last_seen_timestamp_seconds", &labels)
                .set(row.last_seen);
            set_backlog(
                &labels,
                row.backlog_records,
                row.backlog_bytes,
                row.backlog_oldest_age_secs,
                row.dropped_total,
            );
        }
        Ok(rows.len())
    }

    /// Refreshes now and then every `interval` until aborted. A failed
    /// refresh keeps the gauges as they are (PostgreSQL down is its own alert).
    pub(crate) fn spawn_refresh(
        self,
        pool: PgPool,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if let Err(error) = self.refresh(&pool).await {
                    tracing::debug!(message = "refresh agent gauges from the agents table", %error);
                }
            }
        })
    }
}

fn labels(tenant: &str, agent: &str) -> [(&'static str, String); 2] {
    [("tenant", tenant.to_owned()), ("agent", agent.to_owned())]
}

/// Fields the agent did not report keep their gauges as they are.
fn set_backlog(
    labels: &[(&'static str, String); 2],
    records: Option<i64>,
    bytes: Option<i64>,
    oldest_age_secs: Option<i64>,
    dropped_total: Option<i64>,
) {
    for (name, value) in [
        ("dcs_aggregator_agent_backlog_records", records),
        ("dcs_aggregator_agent_backlog_bytes", bytes),
        (
            "dcs_aggregator_agent_backlog_oldest_age_seconds",
            oldest_age_secs,
        ),
        ("dcs_aggregator_agent_dropped_total", dropped_total),
    ] {
        if let Some(value) = value {
            metrics::gauge!(name, labels).set(value as f64);
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
