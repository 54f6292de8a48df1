//! Retention: `records` is partitioned by day on `received_at`; this module
//! keeps partitions created ahead of time and drops those past retention.
//!
//! Design constraints:
//! - Dropping a partition is instant and leaves no dead rows, unlike
//!   `DELETE`; retention is therefore whole UTC days.
//! - The aggregator's role does not own `records`: partitions are created and
//!   dropped by the migration's SECURITY DEFINER functions, the only DDL the
//!   role may run.
//! - Every aggregator runs the task; the functions tolerate a race (a
//!   partition another replica just created or dropped is skipped).
//! - The default partition (records whose agent clock is outside every daily
//!   partition) is never dropped.

use std::time::Duration;

use sqlx::PgPool;

use crate::config::RetentionConfig;
use crate::platform::audit::{self, Entry};

/// What a retention run did (or, dry, would do).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub created: Vec<String>,
    pub dropped: Vec<String>,
    /// Rows of the claim ledger `record_ranges` merged away.
    pub claims_compacted: i64,
    pub dry_run: bool,
}

/// Claims younger than this are left alone by compaction: they may belong
/// to batches still being redelivered, and merging buys nothing yet.
const CLAIMS_SETTLED: &str = "1 hour";

/// Creates partitions from yesterday to `ahead` days from now, then drops
/// the partitions older than `days` (none when `days` is 0), auditing the
/// drop as `actor`, then compacts the claim ledger. With `dry_run` nothing
/// is created, dropped or compacted.
pub async fn run(
    pool: &PgPool,
    days: u32,
    ahead: u32,
    dry_run: bool,
    actor: &str,
) -> Result<Report, sqlx::Error> {
    let created = if dry_run {
        Vec::new()
    } else {
        sqlx::query_scalar(
            "SELECT dcs_ensure_record_partitions(\
                 (now() AT TIME ZONE 'UTC')::date - 1, \
                 (now() AT TIME ZONE 'UTC')::date + $1)",
        )
        .bind(ahead as i32)
        .fetch_all(pool)
        .await?
    };
    let dropped: Vec<String> = if days == 0 {
        Vec::new()
    } else {
        let mut tx = pool.begin().await?;
        let dropped: Vec<String> = sqlx::query_scalar("SELECT dcs_drop_record_partitions($1, $2)")
            .bind(days as i32)
            .bind(dry_run)
            .fetch_all(&mut *tx)
            .await?;
        if !dry_run && !dropped.is_empty() {
            let entry = Entry::ok(actor.to_owned(), "retention.drop", None, "records")
                .with_details(serde_json::json!({ "days": days, "partitions": dropped }));
            audit::append(&mut *tx, &entry).await?;
        }
        tx.commit().await?;
        dropped
    };
    let claims_compacted = if dry_run {
        0
    } else {
        sqlx::query_scalar("SELECT dcs_compact_record_ranges($1::interval)")
            .bind(CLAIMS_SETTLED)
            .fetch_one(pool)
            .await?
    };
    Ok(Report {
        created,
        dropped,
        claims_compacted,
        dry_run,
    })
}

/// Runs [`run`] every `config.interval` until the task is aborted.
pub(crate) fn spawn(pool: PgPool, config: RetentionConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match run(
                &pool,
                config.days,
                config.partitions_ahead,
                false,
                "aggregator",
            )
            .await
            {
                Ok(report) => {
                    if !report.created.is_empty() || !report.dropped.is_empty() {
                        tracing::info!(
                            message = "record partitions maintained",
                            created = ?report.created,
                            dropped = ?report.dropped,
                        );
                    }
                    metrics::counter!("dcs_aggregator_partitions_dropped_total")
                        .increment(report.dropped.len() as u64);
                }
                Err(error) => {
                    tracing::warn!(message = "maintain record partitions; retrying next interval", %error);
                }
            }
            tokio::time::sleep(interval_or_default(config.interval)).await;
        }
    })
}

fn interval_or_default(interval: Duration) -> Duration {
    if interval.is_zero() {
        crate::config::DEFAULT_RETENTION_INTERVAL
    } else {
        interval
    }
}
