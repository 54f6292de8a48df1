//! A private PostgreSQL cluster for `--pg-cluster private|tuned`: stock or
//! tuned settings, plus the logging that ties a latency stall to its cause.

use anyhow::{Context as _, ensure};
use sqlx::Connection as _;

use crate::progress;

/// PostgreSQL settings for a write-heavy collector on this machine size
/// (24 GiB, 2 cores); see docs/PERFORMANCE.md, "PostgreSQL settings".
pub(crate) const TUNED_SETTINGS: &[(&str, &str)] = &[
    ("shared_buffers", "2GB"),
    ("max_wal_size", "8GB"),
    ("min_wal_size", "1GB"),
    ("checkpoint_timeout", "15min"),
    ("wal_buffers", "64MB"),
    ("wal_compression", "lz4"),
];

/// On every private cluster: its log says when checkpoints ran and which
/// statements were slow, so a latency stall can be matched to its cause
/// (`--perf-dir` keeps the log).
const OBSERVED_SETTINGS: &[(&str, &str)] = &[
    ("log_checkpoints", "on"),
    ("log_min_duration_statement", "40ms"),
    ("track_wal_io_timing", "on"),
    ("log_line_prefix", "%m [%p] "),
];

/// A fresh cluster of our own (initdb, port of its own), optionally tuned.
pub(crate) async fn start_cluster(
    tuned: bool,
    extra: &[String],
) -> anyhow::Result<dcs_tests::pg::PgCluster> {
    let extra = extra
        .iter()
        .map(|kv| {
            let (name, value) = kv
                .split_once('=')
                .with_context(|| format!("--pg-set {kv:?}: expected NAME=VALUE"))?;
            ensure!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !value.contains('\''),
                "--pg-set {kv:?}: not a setting name and plain value"
            );
            Ok((name, value))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    progress(&format!(
        "starting a private PostgreSQL cluster ({})",
        if tuned { "tuned" } else { "stock settings" }
    ));
    let cluster = dcs_tests::pg::PgCluster::try_start().await?;
    {
        let mut conn = sqlx::PgConnection::connect(&cluster.url()).await?;
        let tuning = if tuned { TUNED_SETTINGS } else { &[] };
        for (name, value) in OBSERVED_SETTINGS.iter().chain(tuning).copied().chain(extra) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER SYSTEM SET {name} = '{value}'"
            )))
            .execute(&mut conn)
            .await?;
        }
        let _ = conn.close().await;
        cluster.stop("fast").await;
        cluster.start_again().await;
    }
    Ok(cluster)
}
