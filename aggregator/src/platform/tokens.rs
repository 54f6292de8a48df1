//! API tokens: created by an admin within its scope, shown once, revoked
//! (never deleted, so the audit trail's `token:<id>` keeps its meaning).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::audit::{self, Entry};
use super::auth::{self, Principal, Role};
use super::{ApiError, PlatformState, Remote};

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Who or what holds the token, for lists and the audit trail.
    pub name: String,
    /// `admin` or `reader`.
    pub role: String,
    /// The only tenant the token may see; absent for every tenant.
    pub tenant: Option<String>,
    /// Lifetime, e.g. `90d` or `12h`; absent for a token that does not expire.
    pub expires_in: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TokenView {
    pub id: i64,
    pub name: String,
    pub role: String,
    pub tenant: Option<String>,
    pub created_at: String,
    pub created_by: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
}

/// The answer to a creation: the only time the token itself is shown.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedToken {
    pub token: String,
    #[serde(flatten)]
    pub info: TokenView,
}

const SELECT_TOKENS: &str = "SELECT id, name, role, tenant_id AS tenant, \
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS created_at, \
    created_by, \
    to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS expires_at, \
    to_char(revoked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS revoked_at \
    FROM api_tokens";

/// Creates a token and audits it as `actor`. Shared by the API, the CLI and
/// tests (which need a first admin token).
pub async fn create_token(
    pool: &PgPool,
    new: &NewToken,
    actor: String,
    remote: Option<String>,
) -> Result<CreatedToken, ApiError> {
    let role = Role::parse(&new.role)
        .ok_or_else(|| ApiError::BadRequest("role must be admin or reader".into()))?;
    // Characters, not bytes, as the OpenAPI document's maxLength counts.
    if new.name.trim().is_empty() || new.name.chars().count() > 200 {
        return Err(ApiError::BadRequest(
            "name must be 1 to 200 characters".into(),
        ));
    }
    let expires_in: Option<Duration> = new
        .expires_in
        .as_deref()
        .map(|v| {
            humantime::parse_duration(v)
                .map_err(|e| ApiError::BadRequest(format!("expires_in: {e}")))
        })
        .transpose()?;
    let token = auth::generate_token();
    let mut tx = pool.begin().await?;
    if let Some(tenant) = &new.tenant {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)")
                .bind(tenant)
                .fetch_one(&mut *tx)
                .await?;
        if !exists {
            return Err(ApiError::NotFound(format!("no tenant {tenant}")));
        }
    }
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO api_tokens (token_hash, name, role, tenant_id, created_by, expires_at) \
         VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6)) RETURNING id",
    )
    .bind(auth::hash_token(&token))
    .bind(&new.name)
    .bind(role.as_str())
    .bind(&new.tenant)
    .bind(&actor)
    .bind(expires_in.map(|d| d.as_secs_f64()))
    .fetch_one(&mut *tx)
    .await?;
    let entry = Entry::ok(
        actor,
        "token.create",
        new.tenant.as_deref(),
        format!("token:{id}"),
    )
    .with_remote(remote)
    .with_details(serde_json::json!({
        "name": new.name, "role": role.as_str(), "expires_in": new.expires_in,
    }));
    audit::append(&mut *tx, &entry).await?;
    let info = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_TOKENS} WHERE id = $1"
    )))
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(CreatedToken { token, info })
}

/// Create a token; the response is the only time it is shown. A tenant's
/// admin can only create tokens for its own tenant.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", operation_id = "tokens_create", request_body = NewToken,
    responses((status = 201, description = "created", body = CreatedToken), (status = 400, description = "a parameter or body is invalid", body = super::openapi::ErrorSchema), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema)))]
pub async fn create(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Extension(Remote(remote)): Extension<Remote>,
    Json(new): Json<NewToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    principal.require_admin()?;
    // A scoped admin hands out tokens for its own tenant only, never wider.
    let tenant = principal.tenant_scope(new.tenant.as_deref())?;
    let new = NewToken { tenant, ..new };
    let created = create_token(&state.pool, &new, principal.actor(), remote).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Tokens of tenant `only` (`None`: every token), ordered by id.
pub async fn list_tokens(pool: &PgPool, only: Option<&str>) -> Result<Vec<TokenView>, ApiError> {
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_TOKENS} WHERE ($1::text IS NULL OR tenant_id = $1) ORDER BY id"
    )))
    .bind(only)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Tokens the admin's scope covers; never the tokens themselves.
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", operation_id = "tokens_list",
    responses((status = 200, description = "OK", body = Vec<TokenView>), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema)))]
pub async fn list(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    principal.require_admin()?;
    let tenant = principal.tenant_scope(None)?;
    Ok(Json(list_tokens(&state.pool, tenant.as_deref()).await?))
}

/// Revokes token `id` if `scope` covers it (`None`: any), auditing as `actor`.
pub async fn revoke_token(
    pool: &PgPool,
    id: i64,
    scope: Option<&str>,
    actor: String,
    remote: Option<String>,
) -> Result<TokenView, ApiError> {
    let mut tx = pool.begin().await?;
    let tenant: Option<Option<String>> =
        sqlx::query_scalar("SELECT tenant_id FROM api_tokens WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    // A token outside the scope is reported as missing: its existence is
    // another tenant's business.
    let tenant = match (tenant, scope) {
        (None, _) => return Err(ApiError::NotFound(format!("no token {id}"))),
        (Some(t), Some(own)) if t.as_deref() != Some(own) => {
            return Err(ApiError::NotFound(format!("no token {id}")));
        }
        (Some(t), _) => t,
    };
    sqlx::query("UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    audit::append(
        &mut *tx,
        &Entry::ok(
            actor,
            "token.revoke",
            tenant.as_deref(),
            format!("token:{id}"),
        )
        .with_remote(remote),
    )
    .await?;
    let view = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_TOKENS} WHERE id = $1"
    )))
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(view)
}

/// Revoke a token; it is refused from the next request on.
#[utoipa::path(post, path = "/api/v1/tokens/{id}/revoke", tag = "tokens", operation_id = "tokens_revoke", params(("id" = i64, Path)),
    responses((status = 200, description = "OK", body = TokenView), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema), (status = 404, description = "not found, or outside the token's scope", body = super::openapi::ErrorSchema)))]
pub async fn revoke(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Extension(Remote(remote)): Extension<Remote>,
    Path(id): Path<i64>,
) -> Result<Json<TokenView>, ApiError> {
    principal.require_admin()?;
    let view = revoke_token(
        &state.pool,
        id,
        principal.tenant.as_deref(),
        principal.actor(),
        remote,
    )
    .await?;
    Ok(Json(view))
}
