//! Replay after a restore: the latest [`Replay`] an operator asked for,
//! carried in every batch answer.
//!
//! After PostgreSQL is restored to a point in time T, records acknowledged
//! after T are gone from the database, while the agents have already moved
//! them out of their queues. Agents that keep delivered records for a while
//! (`buffer.retain_delivered`) can send them again: `dcs-aggregator replay
//! --since T` stores a request, every replica reads the latest one every
//! `revocation.refresh_interval`, and each agent acts on each request id once
//! (see the agent's `replay` module). Redelivery is idempotent: the records
//! that survived the restore are answered as duplicates.
//!
//! A request id is the request time in microseconds, not a sequence value,
//! so ids keep increasing across a restore that winds sequences back.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use dcs_shared::wire::Replay;
use sqlx::PgPool;
use time::OffsetDateTime;

/// The latest replay request, shared by every handler of a replica.
#[derive(Clone, Default)]
pub struct ReplayNotice(Arc<RwLock<Option<Replay>>>);

impl ReplayNotice {
    pub fn current(&self) -> Option<Replay> {
        *self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn load(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let latest: Option<(i64, i64)> = sqlx::query_as(
            "SELECT id, (extract(epoch FROM since) * 1000000)::int8
             FROM replay_requests ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(pool)
        .await?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) =
            latest.map(|(id, since_us)| Replay { id, since_us });
        Ok(())
    }

    /// Keeps the notice fresh until the returned task is aborted.
    pub(crate) fn spawn_refresh(
        &self,
        pool: PgPool,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let notice = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                match notice.load(&pool).await {
                    Ok(()) => failing = false,
                    Err(error) => {
                        if !failing {
                            tracing::warn!(message = "refresh the replay notice; keeping the last one", %error);
                        }
                        failing = true;
                    }
                }
                tokio::time::sleep(every).await;
            }
        })
    }
}

/// What `dcs-aggregator replay` stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayRequest {
    pub id: i64,
    /// RFC 3339.
    pub since: String,
    pub requested_by: String,
    pub reason: String,
}

/// Stores a replay request and audits it.
pub async fn request(
    pool: &PgPool,
    since: OffsetDateTime,
    actor: String,
    reason: &str,
) -> Result<ReplayRequest, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // The request time in microseconds, but always above the latest id, so
    // two requests in one microsecond (or a clock step back) still order.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO replay_requests (id, since, requested_by, reason)
         SELECT greatest((extract(epoch FROM clock_timestamp()) * 1000000)::bigint,
                         coalesce(max(id), 0) + 1),
                'epoch'::timestamptz + $1 * interval '1 microsecond', $2, $3
         FROM replay_requests
         RETURNING id",
    )
    .bind(micros(since))
    .bind(&actor)
    .bind(reason)
    .fetch_one(&mut *tx)
    .await?;
    let since_text = since
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    crate::platform::audit::append(
        &mut *tx,
        &crate::platform::audit::Entry::ok(
            actor.clone(),
            "replay.request",
            None,
            format!("replay:{id}"),
        )
        .with_details(serde_json::json!({
            "since": since_text,
            "reason": reason,
        })),
    )
    .await?;
    tx.commit().await?;
    Ok(ReplayRequest {
        id,
        since: since_text,
        requested_by: actor,
        reason: reason.to_owned(),
    })
}

fn micros(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1000) as i64
}
