//! What the center knows of each agent: when it was seen, the backlog it
//! reported, the certificate it connected with, and whether it is revoked.

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::auth::Principal;
use super::{ApiError, PlatformState};

/// How long an agent may be silent before its link is called down; agents
/// retry at most every `retry.max` (30 s by default), so five minutes of
/// silence is a real outage, not a pause.
pub const LINK_DOWN_AFTER_SECS: i64 = 300;

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct AgentView {
    /// Stable numeric id, used in `/api/v1/agents/{id}`.
    pub id: i64,
    pub tenant: String,
    /// The agent id from its certificate.
    pub agent: String,
    pub first_seen: String,
    pub last_seen: String,
    pub last_batch_at: Option<String>,
    pub last_epoch: Option<String>,
    /// `up` when heard from within the last five minutes, else `down`.
    pub link: String,
    pub backlog_records: Option<i64>,
    pub backlog_bytes: Option<i64>,
    pub backlog_oldest_age_secs: Option<i64>,
    pub dropped_total: Option<i64>,
    pub revoked: bool,
    pub revoked_at: Option<String>,
    /// SHA-256 of the certificate (DER), lower-case hex.
    pub cert_fingerprint: Option<String>,
    /// Serial number, lower-case hex.
    pub cert_serial: Option<String>,
    pub cert_not_after: Option<String>,
    /// Whether the last certificate's serial is on the revoked list.
    pub cert_revoked: bool,
}

pub(crate) fn select_agents() -> String {
    let ts = |c: &str| format!("to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')");
    format!(
        "SELECT a.id, a.tenant_id AS tenant, a.name AS agent, \
                {first_seen} AS first_seen, {last_seen} AS last_seen, \
                {last_batch_at} AS last_batch_at, a.last_epoch::text AS last_epoch, \
                CASE WHEN a.last_seen > now() - make_interval(secs => {LINK_DOWN_AFTER_SECS}) \
                     THEN 'up' ELSE 'down' END AS link, \
                a.backlog_records, a.backlog_bytes, a.backlog_oldest_age_secs, a.dropped_total, \
                a.revoked, {revoked_at} AS revoked_at, \
                a.cert_fingerprint, a.cert_serial, {not_after} AS cert_not_after, \
                EXISTS (SELECT 1 FROM revoked_serials s WHERE s.serial = a.cert_serial) \
                    AS cert_revoked \
         FROM agents a",
        first_seen = ts("a.first_seen"),
        last_seen = ts("a.last_seen"),
        last_batch_at = ts("a.last_batch_at"),
        revoked_at = ts("a.revoked_at"),
        not_after = ts("a.cert_not_after"),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsQuery {
    pub tenant: Option<String>,
}

/// Every agent in `tenant` (`None`: all), ordered by tenant and name.
pub async fn list_agents(pool: &PgPool, tenant: Option<&str>) -> Result<Vec<AgentView>, ApiError> {
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{} WHERE ($1::text IS NULL OR a.tenant_id = $1) ORDER BY a.tenant_id, a.name",
        select_agents()
    )))
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

pub async fn list(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Query(q): Query<AgentsQuery>,
) -> Result<Json<Vec<AgentView>>, ApiError> {
    let tenant = principal.tenant_scope(q.tenant.as_deref())?;
    Ok(Json(list_agents(&state.pool, tenant.as_deref()).await?))
}

/// The agent `id` if the principal's scope covers it. Another tenant's agent
/// is "not found", exactly like a missing one, so ids do not probe tenants.
pub(crate) async fn visible_agent(
    pool: &PgPool,
    principal: &Principal,
    id: i64,
) -> Result<AgentView, ApiError> {
    let row: Option<AgentView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{} WHERE a.id = $1",
        select_agents()
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    match row {
        Some(agent) if principal.covers(&agent.tenant) => Ok(agent),
        _ => Err(ApiError::NotFound(format!("no agent {id}"))),
    }
}

pub async fn get_one(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<i64>,
) -> Result<Json<AgentView>, ApiError> {
    Ok(Json(visible_agent(&state.pool, &principal, id).await?))
}
