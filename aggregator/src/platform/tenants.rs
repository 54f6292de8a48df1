//! Tenants: created by a platform admin (or on an agent's first contact),
//! disabled to refuse every token and agent of the tenant at once.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::audit::{self, Entry};
use super::auth::Principal;
use super::{ApiError, PlatformState, Remote};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    /// The id agents carry in their certificates (`dcs://TENANT/AGENT`).
    pub id: String,
    pub display_name: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TenantView {
    pub id: String,
    pub display_name: Option<String>,
    pub created_at: String,
    pub disabled: bool,
    pub disabled_at: Option<String>,
}

const SELECT_TENANTS: &str = "SELECT id, display_name, \
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS created_at, \
    disabled, \
    to_char(disabled_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS disabled_at \
    FROM tenants";

/// Creates a tenant and audits it as `actor`. Shared by the API and the CLI.
pub async fn create_tenant(
    pool: &PgPool,
    new: &NewTenant,
    actor: String,
    remote: Option<String>,
) -> Result<TenantView, ApiError> {
    dcs_shared::identity::validate_identifier("tenant", &new.id)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO tenants (id, display_name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(&new.id)
    .bind(&new.display_name)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::Conflict(format!("tenant {} exists", new.id)));
    }
    let entry = Entry::ok(actor, "tenant.create", Some(&new.id), new.id.clone())
        .with_remote(remote)
        .with_details(serde_json::json!({ "display_name": new.display_name }));
    audit::append(&mut *tx, &entry).await?;
    let view = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_TENANTS} WHERE id = $1"
    )))
    .bind(&new.id)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(view)
}

/// Create a tenant (platform admins).
#[utoipa::path(post, path = "/api/v1/tenants", tag = "tenants", operation_id = "tenants_create", request_body = NewTenant,
    responses((status = 201, description = "created", body = TenantView), (status = 400, description = "a parameter or body is invalid", body = super::openapi::ErrorSchema), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema), (status = 409, description = "already exists", body = super::openapi::ErrorSchema)))]
pub async fn create(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Extension(Remote(remote)): Extension<Remote>,
    Json(new): Json<NewTenant>,
) -> Result<(StatusCode, Json<TenantView>), ApiError> {
    principal.require_platform_admin()?;
    let view = create_tenant(&state.pool, &new, principal.actor(), remote).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Tenant `only` (`None`: every tenant), ordered by id.
pub async fn list_tenants(pool: &PgPool, only: Option<&str>) -> Result<Vec<TenantView>, ApiError> {
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_TENANTS} WHERE ($1::text IS NULL OR id = $1) ORDER BY id"
    )))
    .bind(only)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Tenants the token's scope covers (admins).
#[utoipa::path(get, path = "/api/v1/tenants", tag = "tenants", operation_id = "tenants_list",
    responses((status = 200, description = "OK", body = Vec<TenantView>), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema)))]
pub async fn list(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Vec<TenantView>>, ApiError> {
    principal.require_admin()?;
    let tenant = principal.tenant_scope(None)?;
    Ok(Json(list_tenants(&state.pool, tenant.as_deref()).await?))
}

/// Disables or re-enables a tenant and audits it as `actor`.
pub async fn set_disabled(
    pool: &PgPool,
    id: &str,
    disabled: bool,
    actor: String,
    remote: Option<String>,
) -> Result<TenantView, ApiError> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE tenants SET disabled = $2, \
             disabled_at = CASE WHEN $2 THEN coalesce(disabled_at, now()) END \
         WHERE id = $1",
    )
    .bind(id)
    .bind(disabled)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(ApiError::NotFound(format!("no tenant {id}")));
    }
    let action = if disabled {
        "tenant.disable"
    } else {
        "tenant.enable"
    };
    audit::append(
        &mut *tx,
        &Entry::ok(actor, action, Some(id), id).with_remote(remote),
    )
    .await?;
    let view = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_TENANTS} WHERE id = $1"
    )))
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(view)
}

/// Disable a tenant: its tokens and agents are refused (platform admins).
#[utoipa::path(post, path = "/api/v1/tenants/{id}/disable", tag = "tenants", operation_id = "tenants_disable", params(("id" = String, Path)),
    responses((status = 200, description = "OK", body = TenantView), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema), (status = 404, description = "not found, or outside the token's scope", body = super::openapi::ErrorSchema)))]
pub async fn disable(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Extension(Remote(remote)): Extension<Remote>,
    Path(id): Path<String>,
) -> Result<Json<TenantView>, ApiError> {
    principal.require_platform_admin()?;
    let view = set_disabled(&state.pool, &id, true, principal.actor(), remote).await?;
    // Before the answer: this replica refuses (or accepts) the tenant's next
    // batch; other replicas follow within revocation.refresh_interval.
    state.deny.apply(crate::revocation::Change::Tenant {
        id: &id,
        disabled: true,
    });
    state.deny.reload_after_change(&state.pool).await;
    Ok(Json(view))
}

/// Enable a disabled tenant (platform admins).
#[utoipa::path(post, path = "/api/v1/tenants/{id}/enable", tag = "tenants", operation_id = "tenants_enable", params(("id" = String, Path)),
    responses((status = 200, description = "OK", body = TenantView), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema), (status = 404, description = "not found, or outside the token's scope", body = super::openapi::ErrorSchema)))]
pub async fn enable(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Extension(Remote(remote)): Extension<Remote>,
    Path(id): Path<String>,
) -> Result<Json<TenantView>, ApiError> {
    principal.require_platform_admin()?;
    let view = set_disabled(&state.pool, &id, false, principal.actor(), remote).await?;
    // Before the answer: this replica refuses (or accepts) the tenant's next
    // batch; other replicas follow within revocation.refresh_interval.
    state.deny.apply(crate::revocation::Change::Tenant {
        id: &id,
        disabled: false,
    });
    state.deny.reload_after_change(&state.pool).await;
    Ok(Json(view))
}
