//! Agent enrollment and certificate renewal: the aggregator signs certificate
//! signing requests with the DCS CA, so an agent's private key never leaves
//! its machine.
//!
//! Design constraints:
//! - **One token, one certificate.** An admin creates an enrollment token for
//!   one agent id of one tenant, with an expiry; it is shown once and stored
//!   as its SHA-256. `enroll` locks the token's row (`FOR UPDATE`), checks it,
//!   signs, and marks it used in the same transaction, so of two concurrent
//!   uses exactly one gets a certificate and the other sees a used token.
//! - **The identity is never the CSR's.** The CA takes only the CSR's public
//!   key; the certificate's `dcs://TENANT/AGENT` comes from the token
//!   (enrollment) or from the verified client certificate (renewal), see
//!   [`dcs_certs::Ca::sign_agent_csr`]. A CSR naming another agent, asking
//!   for a CA flag or extra names gets none of it.
//! - **Outcomes are audited**: a successful enrollment in the transaction
//!   that spends the token; a refused one (unknown, used, expired or
//!   disabled token) on its own, outside the rolled-back transaction, as
//!   `RefusalThrottle` allows: past its per-window limits refusals are only
//!   counted, and an address or prefix refused too often gets 429
//!   `too_many_refusals` before its token is looked up. Refused renewals are
//!   appended one by one (a renewal carries a valid client certificate).
//! - Off unless `[enrollment] enabled = true`: without the CA key the
//!   endpoints answer 404 `enrollment_disabled`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use dcs_certs::enroll::{EnrollRequest, IssuedCertificate};
use dcs_shared::identity::AgentIdentity;
use dcs_shared::wire::ErrorBody;
use ring::rand::SecureRandom as _;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::audit::{self, Entry, Outcome};
use super::auth::{self, Principal};
use super::{ApiError, PlatformState, Remote};
use crate::config::Config;
use crate::connection::PeerAddr;
use crate::revocation::{Denied, DenyList, Verdict};

/// Tells an enrollment token apart from an API token (`dcs_`) at a glance.
pub const ENROLLMENT_TOKEN_PREFIX: &str = "dcse_";
/// A token's lifetime when the admin gives none: a working day to install
/// the agent.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Certificates start this much before "now" so an agent whose clock is a
/// little behind can use them at once; capped at a tenth of the validity so
/// that short-lived certificates keep most of their life ahead of them.
const MAX_BACKDATE: Duration = Duration::from_secs(300);

/// The CA that signs agents' CSRs, loaded once at start-up.
pub struct Signer {
    ca: dcs_certs::Ca,
    /// What agents must trust: the `tls.ca` file as configured (it may hold
    /// the old and the new CA during a rotation).
    ca_bundle: String,
    validity: Duration,
    max_token_ttl: Duration,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// `None` when enrollment is off; an error names the file that failed.
    pub fn load(config: &Config) -> Result<Option<Arc<Signer>>, String> {
        let e = &config.enrollment;
        if !e.enabled {
            return Ok(None);
        }
        let ca = dcs_certs::Ca::load_files(e.ca_cert(&config.tls), &e.ca_key)
            .map_err(|error| format!("enrollment: {error}"))?;
        let ca_bundle = std::fs::read_to_string(&config.tls.ca)
            .map_err(|error| format!("enrollment: read {}: {error}", config.tls.ca.display()))?;
        Ok(Some(Arc::new(Signer {
            ca,
            ca_bundle,
            validity: e.validity,
            max_token_ttl: e.max_token_ttl,
        })))
    }

    /// Signs `csr` for `identity` with the configured validity.
    fn sign(&self, csr: &str, identity: &AgentIdentity) -> Result<IssuedCertificate, EnrollError> {
        let now = time::OffsetDateTime::now_utc();
        let backdate = MAX_BACKDATE.min(self.validity / 10);
        let validity = dcs_certs::Validity {
            not_before: now - backdate,
            not_after: now + self.validity,
        };
        let certificate = self
            .ca
            .sign_agent_csr(csr, &identity.tenant, &identity.agent, validity)
            .map_err(|error| match error {
                dcs_certs::Error::InvalidCsr(reason) => EnrollError::InvalidCsr(reason),
                other => {
                    tracing::error!(message = "sign an agent certificate", error = %other);
                    EnrollError::Api(ApiError::Internal)
                }
            })?;
        let info = dcs_certs::enroll::certificate_info(&certificate)
            .map_err(|_| EnrollError::Api(ApiError::Internal))?;
        Ok(IssuedCertificate {
            tenant: identity.tenant.clone(),
            agent: identity.agent.clone(),
            certificate,
            ca: self.ca_bundle.clone(),
            serial: info.serial,
            not_after: super::format_time(info.not_after.saturating_mul(1_000_000)),
        })
    }
}

/// Why an enrollment or a renewal was refused; one status and code each, so
/// `dcs-edge enroll` can tell the operator what to do.
#[derive(Debug)]
pub enum EnrollError {
    /// No `[enrollment]` on this aggregator.
    Disabled,
    UnknownToken,
    TokenUsed,
    TokenExpired,
    TokenDisabled,
    TenantDisabled,
    /// The agent (or, on renewal, its certificate) is on the deny list.
    Revoked(&'static str),
    InvalidCsr(String),
    /// A renewal before half of the presented certificate's lifetime passed.
    RenewalNotDue {
        retry_after: u64,
    },
    /// A renewal sooner than the agent's last one allows.
    RenewalTooSoon {
        retry_after: u64,
    },
    Api(ApiError),
}

/// Exports `dcs_aggregator_certificate_requests_refused_total` at 0 for the
/// refusals of each kind (enrollment with a token, renewal over mutual TLS),
/// so the first refusal is seen by `increase()`.
pub(crate) fn register_metrics() {
    let enroll = [
        EnrollError::Disabled,
        EnrollError::UnknownToken,
        EnrollError::TokenUsed,
        EnrollError::TokenExpired,
        EnrollError::TokenDisabled,
        EnrollError::TenantDisabled,
        EnrollError::Revoked(""),
        EnrollError::InvalidCsr(String::new()),
    ];
    let renew = [
        EnrollError::Disabled,
        EnrollError::Revoked(""),
        EnrollError::InvalidCsr(String::new()),
        EnrollError::RenewalNotDue { retry_after: 0 },
        EnrollError::RenewalTooSoon { retry_after: 0 },
    ];
    for (kind, errors) in [("enroll", &enroll[..]), ("renew", &renew[..])] {
        for error in errors {
            metrics::counter!("dcs_aggregator_certificate_requests_refused_total", "kind" => kind, "reason" => error.status_code_message().1)
                .increment(0);
        }
    }
}

impl EnrollError {
    fn status_code_message(&self) -> (StatusCode, &'static str, String) {
        use StatusCode as S;
        match self {
            EnrollError::Disabled => (
                S::NOT_FOUND,
                "enrollment_disabled",
                "this aggregator does not sign certificates ([enrollment] is not enabled)".into(),
            ),
            EnrollError::UnknownToken => (
                S::UNAUTHORIZED,
                "unknown_token",
                "no such enrollment token".into(),
            ),
            EnrollError::TokenUsed => (
                S::GONE,
                "token_used",
                "the enrollment token was already used; ask an admin for a new one".into(),
            ),
            EnrollError::TokenExpired => (
                S::GONE,
                "token_expired",
                "the enrollment token has expired; ask an admin for a new one".into(),
            ),
            EnrollError::TokenDisabled => (
                S::FORBIDDEN,
                "token_disabled",
                "the enrollment token was disabled by an admin".into(),
            ),
            EnrollError::TenantDisabled => (
                S::FORBIDDEN,
                "tenant_disabled",
                "the tenant is disabled".into(),
            ),
            EnrollError::Revoked(why) => (
                S::FORBIDDEN,
                "revoked",
                format!("this agent may not get a certificate ({why})"),
            ),
            EnrollError::InvalidCsr(reason) => (
                S::BAD_REQUEST,
                "invalid_csr",
                format!("the certificate signing request cannot be signed: {reason}"),
            ),
            EnrollError::RenewalNotDue { retry_after } => (
                S::TOO_MANY_REQUESTS,
                "renewal_not_due",
                format!(
                    "a certificate may be renewed once half of its lifetime has passed; retry in {retry_after} s"
                ),
            ),
            EnrollError::RenewalTooSoon { retry_after } => (
                S::TOO_MANY_REQUESTS,
                "renewal_rate_limited",
                format!("this agent renewed too recently; retry in {retry_after} s"),
            ),
            EnrollError::Api(error) => {
                let (status, code, message) = error.status_code_message();
                (status, code, message)
            }
        }
    }

    /// For the audit trail.
    fn reason(&self) -> String {
        self.status_code_message().1.to_owned()
    }
}

impl IntoResponse for EnrollError {
    fn into_response(self) -> Response {
        match self {
            EnrollError::Api(error) => error.into_response(),
            other => {
                let (status, code, message) = other.status_code_message();
                let retry_after = match other {
                    EnrollError::RenewalNotDue { retry_after }
                    | EnrollError::RenewalTooSoon { retry_after } => Some(retry_after.max(1)),
                    _ => None,
                };
                let mut response = (status, Json(ErrorBody::new(code, message))).into_response();
                if let Some(secs) = retry_after {
                    response.headers_mut().insert(
                        axum::http::header::RETRY_AFTER,
                        axum::http::HeaderValue::from(secs),
                    );
                }
                response
            }
        }
    }
}

impl From<sqlx::Error> for EnrollError {
    fn from(error: sqlx::Error) -> Self {
        EnrollError::Api(error.into())
    }
}

impl From<ApiError> for EnrollError {
    fn from(error: ApiError) -> Self {
        EnrollError::Api(error)
    }
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEnrollmentToken {
    /// The tenant the agent will belong to; a tenant's admin may leave it
    /// out (its own tenant), a platform admin must name it.
    pub tenant: Option<String>,
    /// The agent id the certificate will carry (`dcs://TENANT/AGENT`).
    pub agent: String,
    /// Lifetime, e.g. `2h` (default 24h, at most `enrollment.max_token_ttl`).
    pub expires_in: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct EnrollmentTokenView {
    pub id: i64,
    pub tenant: String,
    pub agent: String,
    pub created_at: String,
    pub created_by: String,
    pub expires_at: String,
    /// When the token was spent, and the serial of the certificate it got.
    pub used_at: Option<String>,
    pub cert_serial: Option<String>,
    pub disabled_at: Option<String>,
}

/// The answer to a creation: the only time the token itself is shown.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedEnrollmentToken {
    pub token: String,
    #[serde(flatten)]
    pub info: EnrollmentTokenView,
}

/// The enrollment request body (`dcs_certs::enroll::EnrollRequest`).
#[derive(utoipa::ToSchema)]
#[schema(as = EnrollRequest)]
pub struct EnrollRequestSchema {
    /// The one-time enrollment token (`dcse_...`).
    pub token: String,
    /// PEM `CERTIFICATE REQUEST` for a key pair made on the agent's machine.
    /// Only its public key is used: subject, SANs and extensions are ignored.
    pub csr: String,
}

/// A signed certificate (`dcs_certs::enroll::IssuedCertificate`).
#[derive(utoipa::ToSchema)]
#[schema(as = IssuedCertificate)]
pub struct IssuedCertificateSchema {
    pub tenant: String,
    pub agent: String,
    /// PEM of the agent's certificate (`dcs://TENANT/AGENT`, clientAuth).
    pub certificate: String,
    /// PEM of the CA bundle that verifies the aggregator.
    pub ca: String,
    /// Lower-case hex.
    pub serial: String,
    /// RFC 3339.
    pub not_after: String,
}

const SELECT_TOKENS: &str = "SELECT id, tenant_id AS tenant, agent_name AS agent, \
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS created_at, \
    created_by, \
    to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS expires_at, \
    to_char(used_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS used_at, \
    cert_serial, \
    to_char(disabled_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS disabled_at \
    FROM enrollment_tokens";

fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system's random number generator works");
    format!(
        "{ENROLLMENT_TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Creates an enrollment token and audits it as `actor`. `max_ttl` caps the
/// lifetime. Shared by the API and the CLI.
pub async fn create_enrollment_token(
    pool: &PgPool,
    new: &NewEnrollmentToken,
    max_ttl: Duration,
    actor: String,
    remote: Option<String>,
) -> Result<CreatedEnrollmentToken, ApiError> {
    let tenant = new.tenant.as_deref().ok_or_else(|| {
        ApiError::BadRequest("tenant is required for a token not scoped to a tenant".into())
    })?;
    dcs_shared::identity::validate_identifier("agent", &new.agent)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let ttl = match new.expires_in.as_deref() {
        None => DEFAULT_TOKEN_TTL.min(max_ttl),
        Some(v) => humantime::parse_duration(v)
            .map_err(|e| ApiError::BadRequest(format!("expires_in: {e}")))?,
    };
    if ttl.is_zero() || ttl > max_ttl {
        return Err(ApiError::BadRequest(format!(
            "expires_in must be greater than zero and at most {} (enrollment.max_token_ttl)",
            humantime::format_duration(max_ttl)
        )));
    }
    let token = generate_token();
    let mut tx = pool.begin().await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)")
        .bind(tenant)
        .fetch_one(&mut *tx)
        .await?;
    if !exists {
        return Err(ApiError::NotFound(format!("no tenant {tenant}")));
    }
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO enrollment_tokens (token_hash, tenant_id, agent_name, created_by, expires_at) \
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) RETURNING id",
    )
    .bind(auth::hash_token(&token))
    .bind(tenant)
    .bind(&new.agent)
    .bind(&actor)
    .bind(ttl.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    let entry = Entry::ok(
        actor,
        "enrollment_token.create",
        Some(tenant),
        format!("enrollment-token:{id}"),
    )
    .with_remote(remote)
    .with_details(serde_json::json!({
        "agent": new.agent, "expires_in_secs": ttl.as_secs(),
    }));
    audit::append(&mut *tx, &entry).await?;
    let info = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_TOKENS} WHERE id = $1"
    )))
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(CreatedEnrollmentToken { token, info })
}

/// Create a one-time enrollment token for one agent (admins). The response
/// is the only time the token is shown. A tenant's admin can only create
/// tokens for its own tenant.
#[utoipa::path(post, path = "/api/v1/enrollment-tokens", tag = "enrollment", operation_id = "enrollment_tokens_create", request_body = NewEnrollmentToken,
    responses((status = 201, description = "created", body = CreatedEnrollmentToken), (status = 400, description = "a parameter or body is invalid", body = super::openapi::ErrorSchema), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema), (status = 404, description = "enrollment is not enabled on this aggregator", body = super::openapi::ErrorSchema)))]
pub async fn create(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Extension(Remote(remote)): Extension<Remote>,
    Json(new): Json<NewEnrollmentToken>,
) -> Result<(StatusCode, Json<CreatedEnrollmentToken>), EnrollError> {
    principal.require_admin()?;
    let tenant = principal.tenant_scope(new.tenant.as_deref())?;
    let signer = state.signer.as_ref().ok_or(EnrollError::Disabled)?;
    let new = NewEnrollmentToken { tenant, ..new };
    let created = create_enrollment_token(
        &state.pool,
        &new,
        signer.max_token_ttl,
        principal.actor(),
        remote,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Enrollment tokens of tenant `only` (`None`: all), newest first.
pub async fn list_enrollment_tokens(
    pool: &PgPool,
    only: Option<&str>,
) -> Result<Vec<EnrollmentTokenView>, ApiError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_TOKENS} WHERE ($1::text IS NULL OR tenant_id = $1) ORDER BY id DESC LIMIT 1000"
    )))
    .bind(only)
    .fetch_all(pool)
    .await?)
}

/// Enrollment tokens the admin's scope covers (never the tokens themselves).
#[utoipa::path(get, path = "/api/v1/enrollment-tokens", tag = "enrollment", operation_id = "enrollment_tokens_list",
    responses((status = 200, description = "OK", body = Vec<EnrollmentTokenView>), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema)))]
pub async fn list(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Vec<EnrollmentTokenView>>, ApiError> {
    principal.require_admin()?;
    let tenant = principal.tenant_scope(None)?;
    Ok(Json(
        list_enrollment_tokens(&state.pool, tenant.as_deref()).await?,
    ))
}

/// Disables enrollment token `id` if `scope` covers it (`None`: any).
pub async fn disable_enrollment_token(
    pool: &PgPool,
    id: i64,
    scope: Option<&str>,
    actor: String,
    remote: Option<String>,
) -> Result<EnrollmentTokenView, ApiError> {
    let mut tx = pool.begin().await?;
    let tenant: Option<String> =
        sqlx::query_scalar("SELECT tenant_id FROM enrollment_tokens WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let tenant = match (tenant, scope) {
        (Some(t), Some(own)) if t != own => None,
        (t, _) => t,
    }
    .ok_or_else(|| ApiError::NotFound(format!("no enrollment token {id}")))?;
    sqlx::query(
        "UPDATE enrollment_tokens SET disabled_at = coalesce(disabled_at, now()) WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    audit::append(
        &mut *tx,
        &Entry::ok(
            actor,
            "enrollment_token.disable",
            Some(&tenant),
            format!("enrollment-token:{id}"),
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

/// Disable an unused enrollment token.
#[utoipa::path(post, path = "/api/v1/enrollment-tokens/{id}/disable", tag = "enrollment", operation_id = "enrollment_tokens_disable", params(("id" = i64, Path)),
    responses((status = 200, description = "OK", body = EnrollmentTokenView), (status = 403, description = "the token's role or tenant scope does not allow this", body = super::openapi::ErrorSchema), (status = 404, description = "not found, or outside the token's scope", body = super::openapi::ErrorSchema)))]
pub async fn disable(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    Extension(Remote(remote)): Extension<Remote>,
    Path(id): Path<i64>,
) -> Result<Json<EnrollmentTokenView>, ApiError> {
    principal.require_admin()?;
    let view = disable_enrollment_token(
        &state.pool,
        id,
        principal.tenant.as_deref(),
        principal.actor(),
        remote,
    )
    .await?;
    Ok(Json(view))
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    id: i64,
    tenant_id: String,
    agent_name: String,
    used: bool,
    expired: bool,
    disabled: bool,
    tenant_disabled: bool,
    agent_revoked: bool,
}

/// Enroll an agent: exchange a one-time enrollment token and a CSR for a
/// certificate. No bearer token: the enrollment token in the body is the
/// credential. The certificate's identity is the token's tenant and agent;
/// the CSR's subject and extensions are ignored.
#[utoipa::path(post, path = "/api/v1/enroll", tag = "enrollment", operation_id = "enroll", request_body = EnrollRequestSchema, security(()),
    responses((status = 201, description = "the signed certificate and the CA bundle", body = IssuedCertificateSchema),
        (status = 400, description = "invalid_csr: the CSR cannot be signed (the token is not spent)", body = super::openapi::ErrorSchema),
        (status = 401, description = "unknown_token", body = super::openapi::ErrorSchema),
        (status = 403, description = "token_disabled, tenant_disabled or revoked", body = super::openapi::ErrorSchema),
        (status = 404, description = "enrollment_disabled: this aggregator does not sign certificates", body = super::openapi::ErrorSchema),
        (status = 410, description = "token_used or token_expired", body = super::openapi::ErrorSchema)))]
pub(crate) async fn enroll(
    State(state): State<PlatformState>,
    peer: Option<Extension<PeerAddr>>,
    request: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<IssuedCertificate>), EnrollError> {
    let peer = peer.map(|Extension(PeerAddr(addr))| addr);
    let remote = peer.map(|addr| addr.to_string());
    let signer = state.signer.clone().ok_or(EnrollError::Disabled)?;
    if let Some(left) = state.refusals.locked_out(peer.map(|p| p.ip())) {
        return Err(EnrollError::Api(ApiError::TooManyRefusals(left)));
    }
    let Json(request) = request.map_err(bad_body)?;
    let mut refused = RefusalAudit {
        actor: "anonymous".into(),
        tenant: None,
        target: None,
        remote: remote.clone(),
    };
    let result = spend_and_sign(&state.pool, &signer, &request, &mut refused).await;
    match result {
        Ok(issued) => {
            metrics::counter!("dcs_aggregator_certificates_issued_total", "kind" => "enroll")
                .increment(1);
            tracing::info!(message = "agent enrolled", tenant = %issued.tenant, agent = %issued.agent, serial = %issued.serial);
            Ok((StatusCode::CREATED, Json(issued)))
        }
        Err(error) => {
            metrics::counter!("dcs_aggregator_certificate_requests_refused_total", "kind" => "enroll", "reason" => error.status_code_message().1)
                .increment(1);
            // A database failure is not a refusal of the caller. Anyone can
            // send tokens: the throttle bounds the rows they cause.
            if !matches!(error, EnrollError::Api(_)) {
                let entry = refused.entry("agent.enroll", &error);
                state
                    .refusals
                    .append(&state.pool, peer.map(|p| p.ip()), &entry)
                    .await;
            }
            Err(error)
        }
    }
}

/// A body that is not the expected JSON, as a JSON error like every other.
pub(crate) fn bad_body(rejection: JsonRejection) -> EnrollError {
    EnrollError::Api(ApiError::BadRequest(rejection.body_text()))
}

/// Who a refused enrollment was, as far as it got.
struct RefusalAudit {
    actor: String,
    tenant: Option<String>,
    target: Option<String>,
    remote: Option<String>,
}

impl RefusalAudit {
    fn entry(&self, action: &str, error: &EnrollError) -> Entry {
        Entry {
            actor: self.actor.clone(),
            action: action.into(),
            tenant: self.tenant.clone(),
            target: self.target.clone(),
            outcome: Outcome::Denied,
            remote: self.remote.clone(),
            details: serde_json::json!({ "reason": error.reason() }),
        }
    }

    async fn append(&self, pool: &PgPool, action: &str, error: &EnrollError) {
        let entry = self.entry(action, error);
        if let Err(error) = audit::append(pool, &entry).await {
            tracing::error!(message = "append audit entry for a refused certificate request", %error);
        }
    }
}

async fn spend_and_sign(
    pool: &PgPool,
    signer: &Signer,
    request: &EnrollRequest,
    refused: &mut RefusalAudit,
) -> Result<IssuedCertificate, EnrollError> {
    if !request.token.starts_with(ENROLLMENT_TOKEN_PREFIX) {
        return Err(EnrollError::UnknownToken);
    }
    let mut tx = pool.begin().await?;
    // FOR UPDATE: a concurrent use of the same token waits here until this
    // transaction ends, then reads the row as this one left it (used).
    let row: Option<TokenRow> = sqlx::query_as(
        "SELECT t.id, t.tenant_id, t.agent_name, \
                t.used_at IS NOT NULL AS used, \
                t.expires_at <= now() AS expired, \
                t.disabled_at IS NOT NULL AS disabled, \
                coalesce((SELECT disabled FROM tenants WHERE id = t.tenant_id), false) AS tenant_disabled, \
                coalesce((SELECT revoked FROM agents a WHERE a.tenant_id = t.tenant_id AND a.name = t.agent_name), false) AS agent_revoked \
         FROM enrollment_tokens t WHERE t.token_hash = $1 FOR UPDATE OF t",
    )
    .bind(auth::hash_token(&request.token))
    .fetch_optional(&mut *tx)
    .await?;
    let row = row.ok_or(EnrollError::UnknownToken)?;
    refused.actor = format!("enrollment-token:{}", row.id);
    refused.tenant = Some(row.tenant_id.clone());
    refused.target = Some(format!("dcs://{}/{}", row.tenant_id, row.agent_name));
    if row.used {
        return Err(EnrollError::TokenUsed);
    }
    if row.expired {
        return Err(EnrollError::TokenExpired);
    }
    if row.disabled {
        return Err(EnrollError::TokenDisabled);
    }
    if row.tenant_disabled {
        return Err(EnrollError::TenantDisabled);
    }
    if row.agent_revoked {
        return Err(EnrollError::Revoked(Denied::Agent.as_str()));
    }
    let identity = AgentIdentity {
        tenant: row.tenant_id.clone(),
        agent: row.agent_name.clone(),
    };
    let issued = signer.sign(&request.csr, &identity)?;
    let spent = sqlx::query(
        "UPDATE enrollment_tokens SET used_at = now(), used_from = $2, cert_serial = $3 \
         WHERE id = $1 AND used_at IS NULL",
    )
    .bind(row.id)
    .bind(&refused.remote)
    .bind(&issued.serial)
    .execute(&mut *tx)
    .await?;
    if spent.rows_affected() != 1 {
        // Unreachable under the row lock; refuse rather than issue twice.
        return Err(EnrollError::TokenUsed);
    }
    record_lineage(&mut *tx, &issued, None).await?;
    let entry = Entry::ok(
        refused.actor.clone(),
        "agent.enroll",
        Some(&row.tenant_id),
        format!("dcs://{}/{}", row.tenant_id, row.agent_name),
    )
    .with_remote(refused.remote.clone())
    .with_details(serde_json::json!({
        "serial": issued.serial, "not_after": issued.not_after,
    }));
    audit::append(&mut *tx, &entry).await?;
    tx.commit().await?;
    Ok(issued)
}

/// Signs a renewal for the agent whose verified client certificate made the
/// request (`identity`, `presented`). Refused if the deny list refuses the
/// agent, its certificate or its tenant; refused with 429 before half of the
/// presented certificate's lifetime has passed (agents renew when a third is
/// left) and sooner than `throttle` allows. The new certificate's parent is
/// the presented one, so revoking either serial revokes the new one too.
/// Audited either way, with the caller's address when the listener knows it.
pub(crate) async fn renew(
    pool: &PgPool,
    signer: Option<&Signer>,
    deny: &DenyList,
    throttle: &RenewalThrottle,
    request: Renewal<'_>,
) -> Result<IssuedCertificate, EnrollError> {
    let Renewal {
        identity,
        presented,
        remote,
        csr,
    } = request;
    let signer = signer.ok_or(EnrollError::Disabled)?;
    let actor = format!("agent:dcs://{}/{}", identity.tenant, identity.agent);
    let refusal = RefusalAudit {
        actor: actor.clone(),
        tenant: Some(identity.tenant.clone()),
        target: Some(format!("dcs://{}/{}", identity.tenant, identity.agent)),
        remote: remote.clone(),
    };
    let verdict = match deny.check(identity, presented) {
        Verdict::Allowed => Ok(()),
        Verdict::Denied(why) => Err(EnrollError::Revoked(why.as_str())),
        Verdict::Unknown => Err(EnrollError::Api(ApiError::Unavailable)),
    };
    let result = verdict
        .and_then(|()| renewal_due(presented, unix_now()))
        .and_then(|()| throttle.admit(identity, presented))
        .and_then(|()| signer.sign(csr, identity));
    let issued = match result {
        Ok(issued) => issued,
        Err(error) => {
            metrics::counter!("dcs_aggregator_certificate_requests_refused_total", "kind" => "renew", "reason" => error.status_code_message().1)
                .increment(1);
            if !matches!(error, EnrollError::Api(_)) {
                refusal.append(pool, "agent.renew", &error).await;
            }
            return Err(error);
        }
    };
    // The certificate is only handed out once the renewal and its lineage
    // are on record.
    let entry = Entry::ok(
        actor,
        "agent.renew",
        Some(&identity.tenant),
        format!("dcs://{}/{}", identity.tenant, identity.agent),
    )
    .with_remote(remote)
    .with_details(serde_json::json!({
        "serial": issued.serial,
        "previous_serial": presented.map(|p| p.serial.clone()),
        "not_after": issued.not_after,
    }));
    let mut tx = pool.begin().await?;
    record_lineage(&mut *tx, &issued, presented.map(|p| p.serial.as_str())).await?;
    audit::append(&mut *tx, &entry).await?;
    tx.commit().await?;
    metrics::counter!("dcs_aggregator_certificates_issued_total", "kind" => "renew").increment(1);
    tracing::info!(message = "agent certificate renewed", agent = %identity, serial = %issued.serial);
    Ok(issued)
}

/// Who asks for a renewal, with what.
pub(crate) struct Renewal<'a> {
    /// From the verified client certificate.
    pub identity: &'a AgentIdentity,
    /// That certificate, when the listener read it.
    pub presented: Option<&'a crate::revocation::AgentCertificate>,
    /// The caller's address, when the listener passes it on.
    pub remote: Option<String>,
    pub csr: &'a str,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The renewal window opens when half of the presented certificate's
/// lifetime has passed. Agents renew when a third is left, so the window
/// leaves them a sixth of the lifetime of slack, while a stolen key can no
/// longer chain renewals faster than certificates age.
fn renewal_due(
    presented: Option<&crate::revocation::AgentCertificate>,
    now: i64,
) -> Result<(), EnrollError> {
    let Some(cert) = presented else {
        return Ok(());
    };
    let opens = cert.not_before + (cert.not_after - cert.not_before).max(0) / 2;
    if now < opens {
        return Err(EnrollError::RenewalNotDue {
            retry_after: (opens - now) as u64,
        });
    }
    Ok(())
}

/// One renewal per agent per tenth of its certificate's lifetime (between
/// 1 s and 1 h), per aggregator replica: a certificate inside its window
/// cannot be turned into a stream of sibling certificates.
#[derive(Default)]
pub(crate) struct RenewalThrottle {
    last: std::sync::Mutex<std::collections::HashMap<AgentIdentity, std::time::Instant>>,
}

const RENEWAL_INTERVAL_MIN: Duration = Duration::from_secs(1);
const RENEWAL_INTERVAL_MAX: Duration = Duration::from_secs(3600);

impl RenewalThrottle {
    fn admit(
        &self,
        identity: &AgentIdentity,
        presented: Option<&crate::revocation::AgentCertificate>,
    ) -> Result<(), EnrollError> {
        let lifetime = presented.map_or(RENEWAL_INTERVAL_MAX * 10, |c| {
            Duration::from_secs((c.not_after - c.not_before).max(0) as u64)
        });
        let interval = (lifetime / 10).clamp(RENEWAL_INTERVAL_MIN, RENEWAL_INTERVAL_MAX);
        let now = std::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = last.get(identity)
            && now.duration_since(*at) < interval
        {
            let wait = interval - now.duration_since(*at);
            return Err(EnrollError::RenewalTooSoon {
                retry_after: wait.as_secs().max(1),
            });
        }
        // Forget what no longer limits anyone, so the map stays as large
        // as the set of agents renewing within the last hour.
        last.retain(|_, at| now.duration_since(*at) < RENEWAL_INTERVAL_MAX);
        last.insert(identity.clone(), now);
        Ok(())
    }
}

/// Records `issued` with the serial it was renewed from (`None` at enrollment).
async fn record_lineage(
    executor: impl sqlx::PgExecutor<'_>,
    issued: &IssuedCertificate,
    parent: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO issued_certificates (serial, tenant_id, agent_name, parent_serial, not_after) \
         VALUES ($1, $2, $3, $4, $5::text::timestamptz) ON CONFLICT (serial) DO NOTHING",
    )
    .bind(&issued.serial)
    .bind(&issued.tenant)
    .bind(&issued.agent)
    .bind(parent)
    .bind(&issued.not_after)
    .execute(executor)
    .await?;
    Ok(())
}

#[cfg(test)]
mod renewal_tests {
    use super::*;
    use crate::revocation::AgentCertificate;

    fn cert(not_before: i64, not_after: i64) -> AgentCertificate {
        AgentCertificate {
            fingerprint: String::new(),
            serial: "abc".into(),
            not_before,
            not_after,
        }
    }

    #[test]
    fn renewal_opens_at_half_the_lifetime() {
        let c = cert(1000, 1100);
        assert!(matches!(
            renewal_due(Some(&c), 1010),
            Err(EnrollError::RenewalNotDue { retry_after: 40 })
        ));
        assert!(renewal_due(Some(&c), 1050).is_ok());
        assert!(renewal_due(Some(&c), 1099).is_ok());
    }

    #[test]
    fn one_renewal_per_tenth_of_the_lifetime_per_agent() {
        let throttle = RenewalThrottle::default();
        let day = cert(0, 10 * 3600);
        let a = AgentIdentity::new("acme", "edge-1").unwrap();
        let b = AgentIdentity::new("acme", "edge-2").unwrap();
        assert!(throttle.admit(&a, Some(&day)).is_ok());
        assert!(matches!(
            throttle.admit(&a, Some(&day)),
            Err(EnrollError::RenewalTooSoon { .. })
        ));
        assert!(throttle.admit(&b, Some(&day)).is_ok());
    }
}
