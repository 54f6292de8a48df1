//! The audit trail: who did what, appended and never changed.
//!
//! Appends take any executor, so a state-changing call writes its entry in the
//! same transaction as the change: either both are stored or neither is. The
//! table refuses UPDATE and DELETE from the application role (see the
//! migration), so what is written here stays written.

use axum::extract::{Query, State};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::auth::Principal;
use super::{ApiError, PlatformState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Denied,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

/// One audit row. `action` is a dotted verb (`token.create`, `agent.revoke`).
#[derive(Debug, Clone)]
pub struct Entry {
    pub actor: String,
    pub action: String,
    pub tenant: Option<String>,
    pub target: Option<String>,
    pub outcome: Outcome,
    pub remote: Option<String>,
    pub details: serde_json::Value,
}

impl Entry {
    /// A successful change by `actor`.
    pub fn ok(
        actor: String,
        action: &str,
        tenant: Option<&str>,
        target: impl Into<String>,
    ) -> Self {
        Entry {
            actor,
            action: action.into(),
            tenant: tenant.map(str::to_owned),
            target: Some(target.into()),
            outcome: Outcome::Ok,
            remote: None,
            details: serde_json::Value::Null,
        }
    }

    pub fn with_remote(mut self, remote: Option<String>) -> Self {
        self.remote = remote;
        self
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

pub async fn append<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    entry: &Entry,
) -> Result<(), sqlx::Error> {
    let details = (!entry.details.is_null()).then(|| entry.details.to_string());
    sqlx::query(
        "INSERT INTO audit (actor, action, tenant_id, target, outcome, remote, details) \
         VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)",
    )
    .bind(&entry.actor)
    .bind(&entry.action)
    .bind(&entry.tenant)
    .bind(&entry.target)
    .bind(entry.outcome.as_str())
    .bind(&entry.remote)
    .bind(details)
    .execute(executor)
    .await?;
    Ok(())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub action: Option<String>,
    pub actor: Option<String>,
    pub tenant: Option<String>,
    pub outcome: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditView {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub tenant: Option<String>,
    pub target: Option<String>,
    pub outcome: String,
    pub remote: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub entries: Vec<AuditView>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    id: i64,
    at_us: i64,
    actor: String,
    action: String,
    tenant_id: Option<String>,
    target: Option<String>,
    outcome: String,
    remote: Option<String>,
    details: Option<String>,
}

/// The audit trail, newest first (admins; a tenant's admin sees its tenant's entries).
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", operation_id = "audit_list", params(AuditQuery),
    responses((status = 200, description = "OK", body = AuditPage), (status = 400, description = "a parameter or body is invalid", body = super::openapi::ErrorSchema), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema)))]
pub async fn list(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    principal.require_admin()?;
    let tenant = principal.tenant_scope(q.tenant.as_deref())?;
    let limit = super::page_limit(q.limit)?;
    let before: Option<i64> = match &q.cursor {
        Some(c) => Some(
            super::decode_cursor(c)?
                .parse()
                .map_err(|_| ApiError::BadRequest("cursor is not one this API returned".into()))?,
        ),
        None => None,
    };
    let from = q
        .from
        .as_deref()
        .map(|v| super::parse_time("from", v))
        .transpose()?;
    let to =
        q.to.as_deref()
            .map(|v| super::parse_time("to", v))
            .transpose()?;
    // The audit table is small next to records; optional filters as
    // `$n IS NULL OR ...` keep this one static statement.
    let sql = format!(
        "SELECT id, {at} AS at_us, actor, action, tenant_id, target, outcome, remote, \
                details::text AS details \
         FROM audit \
         WHERE ($1::text IS NULL OR tenant_id = $1) \
           AND ($2::text IS NULL OR action = $2) \
           AND ($3::text IS NULL OR actor = $3) \
           AND ($4::text IS NULL OR outcome = $4) \
           AND ($5::int8 IS NULL OR at >= {from}) \
           AND ($6::int8 IS NULL OR at < {to}) \
           AND ($7::int8 IS NULL OR id < $7) \
         ORDER BY id DESC LIMIT $8",
        at = super::sql_us("at"),
        from = super::sql_ts("$5"),
        to = super::sql_ts("$6"),
    );
    let rows: Vec<AuditRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&tenant)
        .bind(&q.action)
        .bind(&q.actor)
        .bind(&q.outcome)
        .bind(from)
        .bind(to)
        .bind(before)
        .bind(limit)
        .fetch_all(&state.pool)
        .await?;
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| super::encode_cursor(&r.id.to_string())))
        .flatten();
    let entries = rows
        .into_iter()
        .map(|r| AuditView {
            id: r.id,
            at: super::format_time(r.at_us),
            actor: r.actor,
            action: r.action,
            tenant: r.tenant_id,
            target: r.target,
            outcome: r.outcome,
            remote: r.remote,
            details: r.details.and_then(|d| serde_json::from_str(&d).ok()),
        })
        .collect();
    Ok(Json(AuditPage {
        entries,
        next_cursor,
    }))
}
