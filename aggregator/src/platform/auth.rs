//! Bearer tokens, roles and tenant scopes.
//!
//! A token is `dcs_` followed by 32 random bytes in URL-safe base64. It is
//! shown once, when it is created; the database keeps only its SHA-256, and a
//! request's token is looked up by that hash. Looking up by hash needs no
//! constant-time comparison: what an attacker can time is an index probe on a
//! value they cannot steer towards a stored hash.

use axum::http::{HeaderMap, header};
use base64::Engine as _;
use ring::rand::SecureRandom as _;
use sqlx::PgPool;

use super::ApiError;

/// Tells a DCS token apart from other secrets in logs and secret scanners.
pub const TOKEN_PREFIX: &str = "dcs_";
/// 256 bits: unguessable, and there is nothing to gain from more.
const TOKEN_BYTES: usize = 32;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads, and manages tenants, tokens and agents within its scope.
    Admin,
    /// Reads only.
    Reader,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Reader => "reader",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "reader" => Some(Role::Reader),
            _ => None,
        }
    }
}

/// The caller of a platform request, resolved from its token.
#[derive(Debug, Clone)]
pub struct Principal {
    pub token_id: i64,
    pub name: String,
    pub role: Role,
    /// `None`: every tenant (a platform operator).
    pub tenant: Option<String>,
}

impl Principal {
    /// How the caller appears in the audit trail.
    pub fn actor(&self) -> String {
        format!("token:{}:{}", self.token_id, self.name)
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Reader => Err(ApiError::Forbidden(
                "this call needs an admin token; the token is a reader".into(),
            )),
        }
    }

    /// Platform-wide operations (creating tenants) need an unscoped admin.
    pub fn require_platform_admin(&self) -> Result<(), ApiError> {
        self.require_admin()?;
        match &self.tenant {
            None => Ok(()),
            Some(_) => Err(ApiError::Forbidden(
                "this call needs a platform admin token (one not scoped to a tenant)".into(),
            )),
        }
    }

    /// The tenant a query runs against. A scoped token always gets its own
    /// tenant; naming another one is refused before anything is read. An
    /// unscoped token may name one or, with `None`, see them all.
    pub fn tenant_scope(&self, requested: Option<&str>) -> Result<Option<String>, ApiError> {
        match (&self.tenant, requested) {
            (Some(own), None) => Ok(Some(own.clone())),
            (Some(own), Some(asked)) if asked == own => Ok(Some(own.clone())),
            (Some(_), Some(_)) => Err(ApiError::Forbidden(
                "the token is scoped to another tenant".into(),
            )),
            (None, asked) => Ok(asked.map(str::to_owned)),
        }
    }

    /// Whether an object of `tenant` is within the token's scope.
    pub fn covers(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|own| own == tenant)
    }
}

/// A new random token in its shown-once form.
pub fn generate_token() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system's random number generator works");
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// What the database stores for a token.
pub fn hash_token(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

/// Why a request was not authenticated: the client hears only "unauthorized",
/// the audit trail hears which.
#[derive(Debug)]
pub(crate) enum Refusal {
    Missing,
    Malformed,
    Unknown,
    Expired { token_id: i64 },
    Revoked { token_id: i64 },
    TenantDisabled { token_id: i64 },
    Database(ApiError),
}

impl Refusal {
    pub(crate) fn actor(&self) -> String {
        match self {
            Refusal::Expired { token_id }
            | Refusal::Revoked { token_id }
            | Refusal::TenantDisabled { token_id } => format!("token:{token_id}"),
            _ => "anonymous".into(),
        }
    }

    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing => "no bearer token",
            Refusal::Malformed => "malformed authorization header",
            Refusal::Unknown => "unknown token",
            Refusal::Expired { .. } => "token expired",
            Refusal::Revoked { .. } => "token revoked",
            Refusal::TenantDisabled { .. } => "tenant disabled",
            Refusal::Database(_) => "database unavailable",
        }
    }

    pub(crate) fn into_error(self) -> ApiError {
        match self {
            Refusal::Database(error) => error,
            other => ApiError::Unauthorized(format!(
                "{}; send Authorization: Bearer <token>",
                other.reason()
            )),
        }
    }
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    id: i64,
    name: String,
    role: String,
    tenant_id: Option<String>,
    expired: bool,
    revoked: bool,
    tenant_disabled: bool,
}

pub(crate) async fn authenticate(pool: &PgPool, headers: &HeaderMap) -> Result<Principal, Refusal> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(Refusal::Missing)?
        .to_str()
        .map_err(|_| Refusal::Malformed)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(Refusal::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Refusal::Malformed);
    }
    let token = token.trim();
    if !token.starts_with(TOKEN_PREFIX) {
        return Err(Refusal::Unknown);
    }
    let row: Option<TokenRow> = sqlx::query_as(
        "SELECT t.id, t.name, t.role, t.tenant_id, \
                coalesce(t.expires_at <= now(), false) AS expired, \
                t.revoked_at IS NOT NULL AS revoked, \
                coalesce(n.disabled, false) AS tenant_disabled \
         FROM api_tokens t LEFT JOIN tenants n ON n.id = t.tenant_id \
         WHERE t.token_hash = $1",
    )
    .bind(hash_token(token))
    .fetch_optional(pool)
    .await
    .map_err(|e| Refusal::Database(e.into()))?;
    let row = row.ok_or(Refusal::Unknown)?;
    if row.revoked {
        return Err(Refusal::Revoked { token_id: row.id });
    }
    if row.expired {
        return Err(Refusal::Expired { token_id: row.id });
    }
    if row.tenant_disabled {
        return Err(Refusal::TenantDisabled { token_id: row.id });
    }
    let role = Role::parse(&row.role).ok_or(Refusal::Unknown)?;
    Ok(Principal {
        token_id: row.id,
        name: row.name,
        role,
        tenant: row.tenant_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: Role, tenant: Option<&str>) -> Principal {
        Principal {
            token_id: 1,
            name: "t".into(),
            role,
            tenant: tenant.map(str::to_owned),
        }
    }

    #[test]
    fn tokens_are_random_prefixed_and_hashed_to_32_bytes() {
        let (a, b) = (generate_token(), generate_token());
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 43);
        assert_eq!(hash_token(&a).len(), 32);
        assert_ne!(hash_token(&a), hash_token(&b));
    }

    #[test]
    fn a_scoped_token_sees_only_its_own_tenant() {
        let p = principal(Role::Reader, Some("acme"));
        assert_eq!(p.tenant_scope(None).unwrap().as_deref(), Some("acme"));
        assert_eq!(
            p.tenant_scope(Some("acme")).unwrap().as_deref(),
            Some("acme")
        );
        assert!(matches!(
            p.tenant_scope(Some("globex")),
            Err(ApiError::Forbidden(_))
        ));
        assert!(p.covers("acme") && !p.covers("globex"));
    }

    #[test]
    fn an_unscoped_token_may_name_any_tenant_or_none() {
        let p = principal(Role::Reader, None);
        assert_eq!(p.tenant_scope(None).unwrap(), None);
        assert_eq!(p.tenant_scope(Some("x")).unwrap().as_deref(), Some("x"));
        assert!(p.covers("anything"));
    }

    #[test]
    fn readers_cannot_administer_and_scoped_admins_cannot_run_the_platform() {
        assert!(principal(Role::Reader, None).require_admin().is_err());
        assert!(principal(Role::Admin, Some("a")).require_admin().is_ok());
        assert!(
            principal(Role::Admin, Some("a"))
                .require_platform_admin()
                .is_err()
        );
        assert!(
            principal(Role::Admin, None)
                .require_platform_admin()
                .is_ok()
        );
    }
}
