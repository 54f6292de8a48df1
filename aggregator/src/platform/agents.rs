//! What the center knows of each agent: when it was seen, the backlog it
//! reported, the certificate it connected with, and whether it is revoked.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::auth::Principal;
use super::{ApiError, PlatformState, Remote};

/// How long an agent may be silent before its link is called down; agents
/// retry at most every `retry.max` (30 s by default), so five minutes of
/// silence is a real outage, not a pause.
pub const LINK_DOWN_AFTER_SECS: i64 = 300;

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AgentsQuery {
    /// An unscoped token may name a tenant; a scoped token may name only its own.
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

/// Every agent the token's scope covers.
#[utoipa::path(get, path = "/api/v1/agents", tag = "agents", operation_id = "agents_list", params(AgentsQuery),
    responses((status = 200, description = "OK", body = Vec<AgentView>), (status = 403, description = "another tenant", body = super::openapi::ErrorSchema)))]
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

/// One agent; another tenant's agent is 404 like a missing one.
#[utoipa::path(get, path = "/api/v1/agents/{id}", tag = "agents", operation_id = "agents_get_one", params(("id" = i64, Path)),
    responses((status = 200, description = "OK", body = AgentView), (status = 404, description = "not found, or outside the token's scope", body = super::openapi::ErrorSchema)))]
pub async fn get_one(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<i64>,
) -> Result<Json<AgentView>, ApiError> {
    Ok(Json(visible_agent(&state.pool, &principal, id).await?))
}

/// Revokes (or reinstates) agent `tenant/name` and audits it as `actor`.
/// An agent that never connected is registered revoked, so an operator can
/// refuse a stolen certificate before it is first used.
pub async fn set_agent_revoked(
    pool: &PgPool,
    tenant: &str,
    name: &str,
    revoked: bool,
    actor: String,
    remote: Option<String>,
) -> Result<AgentView, ApiError> {
    dcs_shared::identity::AgentIdentity::new(tenant, name)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO agents AS a (tenant_id, name, revoked, revoked_at) \
         VALUES ($1, $2, $3, CASE WHEN $3 THEN now() END) \
         ON CONFLICT (tenant_id, name) DO UPDATE SET revoked = $3, \
             revoked_at = CASE WHEN $3 THEN coalesce(a.revoked_at, now()) END \
         RETURNING id",
    )
    .bind(tenant)
    .bind(name)
    .bind(revoked)
    .fetch_one(&mut *tx)
    .await?;
    let action = if revoked {
        "agent.revoke"
    } else {
        "agent.unrevoke"
    };
    super::audit::append(
        &mut *tx,
        &super::audit::Entry::ok(actor, action, Some(tenant), format!("{tenant}/{name}"))
            .with_remote(remote)
            .with_details(serde_json::json!({ "agent_id": id })),
    )
    .await?;
    let view = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{} WHERE a.id = $1",
        select_agents()
    )))
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(view)
}

async fn revoke_by_id(
    state: &PlatformState,
    principal: &Principal,
    remote: Option<String>,
    id: i64,
    revoked: bool,
) -> Result<Json<AgentView>, ApiError> {
    principal.require_admin()?;
    let agent = visible_agent(&state.pool, principal, id).await?;
    let view = set_agent_revoked(
        &state.pool,
        &agent.tenant,
        &agent.agent,
        revoked,
        principal.actor(),
        remote,
    )
    .await?;
    state.deny.apply(crate::revocation::Change::Agent {
        tenant: &agent.tenant,
        agent: &agent.agent,
        revoked,
    });
    state.deny.reload_after_change(&state.pool).await;
    Ok(Json(view))
}

/// Revoke an agent: its next batch is refused with 403 and nothing it sends is written.
#[utoipa::path(post, path = "/api/v1/agents/{id}/revoke", tag = "agents", operation_id = "agents_revoke", params(("id" = i64, Path)),
    responses((status = 200, description = "OK", body = AgentView), (status = 403, description = "not an admin", body = super::openapi::ErrorSchema), (status = 404, description = "not found, or outside the token's scope", body = super::openapi::ErrorSchema)))]
pub async fn revoke(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Extension(Remote(remote)): Extension<Remote>,
    Path(id): Path<i64>,
) -> Result<Json<AgentView>, ApiError> {
    revoke_by_id(&state, &principal, remote, id, true).await
}

/// Reinstate a revoked agent.
#[utoipa::path(post, path = "/api/v1/agents/{id}/unrevoke", tag = "agents", operation_id = "agents_unrevoke", params(("id" = i64, Path)),
    responses((status = 200, description = "OK", body = AgentView), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema), (status = 404, description = "not found, or outside the token's scope", body = super::openapi::ErrorSchema)))]
pub async fn unrevoke(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Extension(Remote(remote)): Extension<Remote>,
    Path(id): Path<i64>,
) -> Result<Json<AgentView>, ApiError> {
    revoke_by_id(&state, &principal, remote, id, false).await
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRevokedSerial {
    /// Hex, with or without `:` separators or a `0x` prefix.
    pub serial: String,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RevokedSerialView {
    pub serial: String,
    pub revoked_at: String,
    pub revoked_by: String,
    pub reason: Option<String>,
}

const SELECT_SERIALS: &str = "SELECT serial, \
    to_char(revoked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS revoked_at, \
    revoked_by, reason FROM revoked_serials";

/// Revokes one certificate by serial and audits it as `actor`. Serials are
/// issued by the one DCS CA, so this is a platform-wide operation.
pub async fn revoke_serial_as(
    pool: &PgPool,
    new: &NewRevokedSerial,
    actor: String,
    remote: Option<String>,
) -> Result<RevokedSerialView, ApiError> {
    let serial = crate::revocation::normalize_serial(&new.serial)
        .ok_or_else(|| ApiError::BadRequest("serial must be hexadecimal".into()))?;
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO revoked_serials (serial, revoked_by, reason) VALUES ($1, $2, $3) \
         ON CONFLICT (serial) DO NOTHING",
    )
    .bind(&serial)
    .bind(&actor)
    .bind(&new.reason)
    .execute(&mut *tx)
    .await?;
    // The tenant of the agent last seen with it, for the tenant's own trail.
    let tenant: Option<String> =
        sqlx::query_scalar("SELECT tenant_id FROM agents WHERE cert_serial = $1 LIMIT 1")
            .bind(&serial)
            .fetch_optional(&mut *tx)
            .await?;
    super::audit::append(
        &mut *tx,
        &super::audit::Entry::ok(
            actor,
            "serial.revoke",
            tenant.as_deref(),
            format!("serial:{serial}"),
        )
        .with_remote(remote)
        .with_details(serde_json::json!({ "reason": new.reason })),
    )
    .await?;
    let view = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_SERIALS} WHERE serial = $1"
    )))
    .bind(&serial)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(view)
}

/// Lifts a serial's revocation and audits it as `actor`.
pub async fn unrevoke_serial_as(
    pool: &PgPool,
    serial: &str,
    actor: String,
    remote: Option<String>,
) -> Result<(), ApiError> {
    let serial = crate::revocation::normalize_serial(serial)
        .ok_or_else(|| ApiError::BadRequest("serial must be hexadecimal".into()))?;
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query("DELETE FROM revoked_serials WHERE serial = $1")
        .bind(&serial)
        .execute(&mut *tx)
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(ApiError::NotFound(format!(
            "serial {serial} is not revoked"
        )));
    }
    super::audit::append(
        &mut *tx,
        &super::audit::Entry::ok(actor, "serial.unrevoke", None, format!("serial:{serial}"))
            .with_remote(remote),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Revoke one certificate by serial (platform admins).
#[utoipa::path(post, path = "/api/v1/revoked-serials", tag = "agents", operation_id = "agents_revoke_serial", request_body = NewRevokedSerial,
    responses((status = 201, description = "created", body = RevokedSerialView), (status = 400, description = "a parameter or body is invalid", body = super::openapi::ErrorSchema), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema)))]
pub async fn revoke_serial(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Extension(Remote(remote)): Extension<Remote>,
    Json(new): Json<NewRevokedSerial>,
) -> Result<(StatusCode, Json<RevokedSerialView>), ApiError> {
    principal.require_platform_admin()?;
    let view = revoke_serial_as(&state.pool, &new, principal.actor(), remote).await?;
    state.deny.apply(crate::revocation::Change::Serial {
        serial: &view.serial,
        revoked: true,
    });
    state.deny.reload_after_change(&state.pool).await;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Lift a serial's revocation (platform admins).
#[utoipa::path(delete, path = "/api/v1/revoked-serials/{serial}", tag = "agents", operation_id = "agents_unrevoke_serial", params(("serial" = String, Path)),
    responses((status = 204, description = "done, no content"), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema), (status = 404, description = "not found, or outside the token's scope", body = super::openapi::ErrorSchema)))]
pub async fn unrevoke_serial(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Extension(Remote(remote)): Extension<Remote>,
    Path(serial): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require_platform_admin()?;
    unrevoke_serial_as(&state.pool, &serial, principal.actor(), remote).await?;
    state.deny.reload_after_change(&state.pool).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Every revoked serial (platform admins).
#[utoipa::path(get, path = "/api/v1/revoked-serials", tag = "agents", operation_id = "agents_list_serials",
    responses((status = 200, description = "OK", body = Vec<RevokedSerialView>), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema)))]
pub async fn list_serials(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Vec<RevokedSerialView>>, ApiError> {
    principal.require_platform_admin()?;
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_SERIALS} ORDER BY revoked_at, serial"
    )))
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(rows))
}
