//! The platform API: how the compliance platform and its operators read what
//! agents sent and manage who may connect. Served on its own HTTPS listener
//! (server TLS only) under `/api/v1`.
//!
//! Design constraints:
//! - **Every request is authenticated by a bearer token** ([`auth`]), and
//!   every token is scoped: a role (`admin` or `reader`) and one tenant or all
//!   of them. A handler never sees a request without a [`auth::Principal`].
//! - **Tenant isolation is decided once, in [`auth::Principal::tenant_scope`]**:
//!   a query for another tenant is refused with 403 before any SQL runs, so a
//!   refusal leaks neither rows nor counts.
//! - **The audit trail is written with the change.** A state-changing call
//!   appends its audit row in the same transaction as the change. Refused
//!   logins (401) and 403s are appended by the middleware through
//!   [`audit::RefusalThrottle`], which bounds the rows a flood of refusals
//!   can write: per one-minute window, only the first refusals of each
//!   source address and address prefix (401s) or token (403s) get a row of
//!   their own, the rest are counted into one `*.suppressed` row, and an
//!   address or prefix refused too often is locked out with 429
//!   `too_many_refusals` (no token lookup, no row of its own) until the
//!   window ends. The application's database role may only INSERT and
//!   SELECT the audit table.
//! - Errors are [`ApiError`]: one status and one stable code each, database
//!   details logged and never sent.
//!
//! # Layout
//! - [`auth`]: tokens (generation, hashing, lookup), roles and scopes.
//! - [`tenants`], [`tokens`]: admin management of both.
//! - [`enrollment`]: one-time enrollment tokens, `POST /api/v1/enroll` and
//!   the agents' renewal: CSRs signed with the DCS CA.
//! - [`records`]: the keyset-paginated query and the NDJSON export.
//! - [`agents`]: what the center knows of each agent.
//! - [`audit`]: appending to and reading the audit trail.
//! - [`openapi`]: the OpenAPI document (`/openapi.json`) and the offline API
//!   page (`/api/docs`), both public.

pub mod agents;
pub mod audit;
pub mod auth;
pub mod enrollment;
pub mod openapi;
pub mod records;
pub mod tenants;
pub mod tokens;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use dcs_shared::wire::ErrorBody;
use sqlx::PgPool;

use crate::connection::PeerAddr;
use crate::revocation::DenyList;

/// Shared by every platform request.
#[derive(Clone)]
pub struct PlatformState {
    pub(crate) pool: PgPool,
    /// Refreshed at once after a revocation made here.
    pub(crate) deny: DenyList,
    /// Signs enrollment CSRs; `None` when `[enrollment]` is off.
    pub(crate) signer: Option<std::sync::Arc<enrollment::Signer>>,
    /// Bounds the audit rows that unauthenticated callers can cause.
    pub(crate) refusals: audit::RefusalThrottle,
}

impl PlatformState {
    pub fn new(pool: PgPool, deny: DenyList) -> Self {
        PlatformState {
            pool,
            deny,
            signer: None,
            refusals: audit::RefusalThrottle::default(),
        }
    }

    /// With enrollment on (`[enrollment]`), signing with `signer`.
    pub fn with_signer(mut self, signer: Option<std::sync::Arc<enrollment::Signer>>) -> Self {
        self.signer = signer;
        self
    }
}

/// The routes under `/api/v1`, all behind token authentication.
pub fn router(state: PlatformState) -> Router {
    let api = Router::new()
        .route("/api/v1/records", get(records::list))
        .route("/api/v1/agents", get(agents::list))
        .route("/api/v1/agents/{id}", get(agents::get_one))
        .route("/api/v1/agents/{id}/revoke", post(agents::revoke))
        .route("/api/v1/agents/{id}/unrevoke", post(agents::unrevoke))
        .route(
            "/api/v1/revoked-serials",
            get(agents::list_serials).post(agents::revoke_serial),
        )
        .route(
            "/api/v1/revoked-serials/{serial}",
            axum::routing::delete(agents::unrevoke_serial),
        )
        .route("/api/v1/tenants", get(tenants::list).post(tenants::create))
        .route("/api/v1/tenants/{id}/disable", post(tenants::disable))
        .route("/api/v1/tenants/{id}/enable", post(tenants::enable))
        .route("/api/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/api/v1/tokens/{id}/revoke", post(tokens::revoke))
        .route("/api/v1/audit", get(audit::list))
        .route(
            "/api/v1/enrollment-tokens",
            get(enrollment::list).post(enrollment::create),
        )
        .route(
            "/api/v1/enrollment-tokens/{id}/disable",
            post(enrollment::disable),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ));
    // The description of the API is public; everything it describes is not.
    // Enrollment is outside the bearer-token layer: the enrollment token in
    // its body is its credential, and a new agent has no API token.
    let docs = Router::new()
        .route(dcs_certs::enroll::ENROLL_PATH, post(enrollment::enroll))
        .route("/openapi.json", get(|| async { Json(openapi::document()) }))
        .route(
            "/api/docs",
            get(|| async { axum::response::Html(openapi::html()) }),
        );
    Router::new()
        .merge(api)
        .merge(docs)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn(crate::error_shape::json_errors))
        .with_state(state)
}

/// Resolves the bearer token to a [`auth::Principal`] for the handler, and
/// appends refused logins and refused calls (401/403) to the audit trail as
/// [`audit::RefusalThrottle`] allows: past its per-window limits refusals are
/// only counted, and a caller whose address or prefix is locked out gets 429
/// before its token is looked up.
async fn authenticate(
    State(state): State<PlatformState>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request.extensions().get::<PeerAddr>().map(|p| p.0);
    let remote = peer.map(|p| p.to_string());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    // Before the lookup: a flood of bad tokens from one place costs the
    // database nothing once that place is locked out.
    if let Some(left) = state.refusals.locked_out(peer.map(|p| p.ip())) {
        return ApiError::TooManyRefusals(left).into_response();
    }
    let principal = match auth::authenticate(&state.pool, request.headers()).await {
        Ok(principal) => principal,
        Err(refusal) => {
            let entry = audit::Entry {
                actor: refusal.actor(),
                action: "auth.failed".into(),
                tenant: None,
                target: Some(format!("{method} {path}")),
                outcome: audit::Outcome::Denied,
                remote,
                details: serde_json::json!({ "reason": refusal.reason() }),
            };
            state
                .refusals
                .append(&state.pool, peer.map(|p| p.ip()), &entry)
                .await;
            metrics::counter!("dcs_aggregator_platform_auth_failures_total").increment(1);
            return refusal.into_error().into_response();
        }
    };
    request.extensions_mut().insert(principal.clone());
    request.extensions_mut().insert(Remote(remote.clone()));
    let response = next.run(request).await;
    if response.status() == StatusCode::FORBIDDEN {
        let entry = audit::Entry {
            actor: principal.actor(),
            action: "access.denied".into(),
            tenant: principal.tenant.clone(),
            target: Some(format!("{method} {path}")),
            outcome: audit::Outcome::Denied,
            remote,
            details: serde_json::json!({ "role": principal.role.as_str() }),
        };
        // A token that may read but not act could otherwise write a row per
        // request: refusals are throttled per token.
        state
            .refusals
            .append_for_token(&state.pool, &principal.actor(), &entry)
            .await;
    }
    response
}

/// The caller's address, for audit entries written by handlers.
#[derive(Debug, Clone)]
pub struct Remote(pub Option<String>);

/// Why a platform request failed; each variant is one status and one code.
#[derive(Debug)]
pub enum ApiError {
    /// No token, an unknown one, or one that expired or was revoked.
    Unauthorized(String),
    /// A valid token whose role or tenant scope does not cover the call.
    Forbidden(String),
    BadRequest(String),
    NotFound(String),
    Conflict(String),
    MethodNotAllowed,
    /// The caller's address or prefix was refused too often in the current
    /// window; retry after the time it holds (audit.rs, `locked_out`).
    TooManyRefusals(std::time::Duration),
    /// The database did not answer; nothing was changed.
    Unavailable,
    Internal,
}

impl ApiError {
    fn status_code_message(&self) -> (StatusCode, &'static str, String) {
        use StatusCode as S;
        match self {
            ApiError::Unauthorized(m) => (S::UNAUTHORIZED, "unauthorized", m.clone()),
            ApiError::Forbidden(m) => (S::FORBIDDEN, "forbidden", m.clone()),
            ApiError::BadRequest(m) => (S::BAD_REQUEST, "bad_request", m.clone()),
            ApiError::NotFound(m) => (S::NOT_FOUND, "not_found", m.clone()),
            ApiError::Conflict(m) => (S::CONFLICT, "conflict", m.clone()),
            ApiError::MethodNotAllowed => (
                S::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route".into(),
            ),
            ApiError::TooManyRefusals(left) => (
                S::TOO_MANY_REQUESTS,
                "too_many_refusals",
                format!(
                    "too many refused requests from this address or its network; retry in {} s",
                    retry_after_secs(*left)
                ),
            ),
            ApiError::Unavailable => (
                S::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable; nothing was changed, retry later".into(),
            ),
            ApiError::Internal => (
                S::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; nothing was changed".into(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = self.status_code_message();
        let mut response = (status, Json(ErrorBody::new(code, message))).into_response();
        if let ApiError::TooManyRefusals(left) = self {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(retry_after_secs(left)),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Whole seconds, rounded up: a client that waits that long is let in.
fn retry_after_secs(left: std::time::Duration) -> u64 {
    left.as_secs() + u64::from(left.subsec_nanos() > 0)
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (status, code, message) = self.status_code_message();
        write!(f, "{message} ({code}, {})", status.as_u16())
    }
}

impl std::error::Error for ApiError {}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match crate::store::classify(&error) {
            crate::store::Failure::Unavailable => {
                tracing::warn!(message = "platform API: database unavailable", %error);
                ApiError::Unavailable
            }
            // Class 22, "data exception": a value of the request that
            // PostgreSQL cannot hold (the NUL and cursor checks catch the
            // known ones first, naming the field). The caller's input, not
            // our bug: 400, never 500.
            _ if error
                .as_database_error()
                .and_then(|e| e.code())
                .is_some_and(|code| code.starts_with("22")) =>
            {
                tracing::info!(message = "platform API: PostgreSQL refused a value", %error);
                ApiError::BadRequest(format!(
                    "a value of the request was refused by the database: {}",
                    error
                        .as_database_error()
                        .map_or_else(String::new, |e| e.message().to_owned())
                ))
            }
            _ => {
                tracing::error!(message = "platform API: database call failed", %error);
                ApiError::Internal
            }
        }
    }
}

/// Page sizes: enough for a UI table, small enough that one page is one quick
/// index scan. Bulk reads use the NDJSON export instead.
pub(crate) const DEFAULT_PAGE: i64 = 100;
pub(crate) const MAX_PAGE: i64 = 1000;

pub(crate) fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE} (got {n})"
        ))),
    }
}

/// The first form of cursors, URL-safe base64 of the last row's key: still
/// decoded (`decode_cursor`) so pages handed out before keep working.
#[cfg(test)]
pub(crate) fn encode_cursor(key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key)
}

pub(crate) fn decode_cursor(cursor: &str) -> Result<String, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| ApiError::BadRequest("cursor is not one this API returned".into()))
}

/// An RFC 3339 timestamp from a query string, as microseconds since the epoch.
pub(crate) fn parse_time(key: &str, value: &str) -> Result<i64, ApiError> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1000) as i64)
        .map_err(|e| ApiError::BadRequest(format!("{key} must be an RFC 3339 timestamp: {e}")))
}

/// Microseconds since the epoch as RFC 3339 in UTC, always with six
/// fractional digits, so the strings sort in time order.
pub(crate) fn format_time(us: i64) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_default()
}

/// SQL for a `timestamptz` column as microseconds since the epoch (int8).
pub(crate) fn sql_us(column: &str) -> String {
    format!("(extract(epoch FROM {column}) * 1000000)::int8")
}

/// SQL turning an int8 parameter of microseconds back into a `timestamptz`.
pub(crate) fn sql_ts(param: &str) -> String {
    format!("('epoch'::timestamptz + {param} * interval '1 microsecond')")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_a_bad_request() {
        let key = "1700000000000000:7:0b5d...:42";
        assert_eq!(decode_cursor(&encode_cursor(key)).unwrap(), key);
        assert!(matches!(
            decode_cursor("not base64!"),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn times_round_trip_through_rfc3339() {
        let us = parse_time("from", "2026-12-04T10:00:00.000123Z").unwrap();
        assert_eq!(format_time(us), "2026-12-04T10:00:00.000123Z");
        assert!(parse_time("from", "yesterday").is_err());
    }

    #[test]
    fn page_limits_are_bounded() {
        assert_eq!(page_limit(None).unwrap(), DEFAULT_PAGE);
        assert_eq!(page_limit(Some(MAX_PAGE)).unwrap(), MAX_PAGE);
        assert!(page_limit(Some(0)).is_err());
        assert!(page_limit(Some(MAX_PAGE + 1)).is_err());
    }
}
