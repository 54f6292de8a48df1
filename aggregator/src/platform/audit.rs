//! The audit trail: who did what, appended and never changed.
//!
//! Appends take any executor, so a state-changing call writes its entry in the
//! same transaction as the change: either both are stored or neither is. The
//! table refuses UPDATE and DELETE from the application role (see the
//! migration), so what is written here stays written.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

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

/// Longest value stored in each text column, in bytes. A refused request's
/// target is its path, which a caller chooses; without a bound one request
/// could write a row of tens of KiB, and the application may never delete it.
pub const MAX_ACTOR_BYTES: usize = 256;
pub const MAX_ACTION_BYTES: usize = 128;
pub const MAX_TENANT_BYTES: usize = 128;
pub const MAX_TARGET_BYTES: usize = 512;
pub const MAX_REMOTE_BYTES: usize = 128;
/// `details` as JSON text; a larger object is replaced by its truncated text.
pub const MAX_DETAILS_BYTES: usize = 2048;
/// Ends every value that was cut, so nobody mistakes it for the whole.
pub const TRUNCATED_MARKER: &str = "…[truncated]";

/// `value` cut to at most `max` bytes (on a character boundary), marker
/// included, when it is longer.
pub fn bounded(value: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if value.len() <= max {
        return value.into();
    }
    let mut end = max.saturating_sub(TRUNCATED_MARKER.len());
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{TRUNCATED_MARKER}", &value[..end]).into()
}

pub async fn append<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    entry: &Entry,
) -> Result<(), sqlx::Error> {
    let details = (!entry.details.is_null()).then(|| {
        let text = entry.details.to_string();
        if text.len() <= MAX_DETAILS_BYTES {
            text
        } else {
            serde_json::json!({ "truncated": bounded(&text, MAX_DETAILS_BYTES - 64) }).to_string()
        }
    });
    let opt = |value: &Option<String>, max| value.as_deref().map(|v| bounded(v, max).into_owned());
    sqlx::query(
        "INSERT INTO audit (actor, action, tenant_id, target, outcome, remote, details) \
         VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)",
    )
    .bind(bounded(&entry.actor, MAX_ACTOR_BYTES).as_ref())
    .bind(bounded(&entry.action, MAX_ACTION_BYTES).as_ref())
    .bind(opt(&entry.tenant, MAX_TENANT_BYTES))
    .bind(opt(&entry.target, MAX_TARGET_BYTES))
    .bind(entry.outcome.as_str())
    .bind(opt(&entry.remote, MAX_REMOTE_BYTES))
    .bind(details)
    .execute(executor)
    .await?;
    Ok(())
}

/// Refusals cost the caller nothing, and each one used to be an audit row:
/// a loop of bad requests could grow the table, which the application may
/// never delete from, without bound. Refusals are counted in windows, per
/// scope:
/// - of unauthenticated callers (a wrong bearer token, an unknown enrollment
///   token) per source address *and* per address prefix (/24 for IPv4, /64
///   for IPv6), since one host usually holds a whole prefix;
/// - of authenticated callers (403s) per token.
///
/// The first refusals of a window are audited one by one
/// ([`RefusalThrottle::PER_ADDRESS`], [`RefusalThrottle::PER_PREFIX`],
/// [`RefusalThrottle::PER_TOKEN`]); the rest are counted, and the count is
/// audited as one `*.suppressed` entry when that scope is next refused after
/// the window (or when the table of scopes is pruned). Metrics count every
/// refusal either way.
#[derive(Clone, Debug)]
pub struct RefusalThrottle {
    inner: Arc<Mutex<HashMap<Scope, Window>>>,
    window: Duration,
}

/// What a window counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scope {
    Address(Option<IpAddr>),
    Prefix(IpAddr),
    Token(String),
}

impl Scope {
    fn limit(&self) -> u32 {
        match self {
            Scope::Address(_) => RefusalThrottle::PER_ADDRESS,
            Scope::Prefix(_) => RefusalThrottle::PER_PREFIX,
            Scope::Token(_) => RefusalThrottle::PER_TOKEN,
        }
    }

    /// Refusals in one window after which the scope is locked out until
    /// the window ends; `None`: never (a token's refusals cost no lookup).
    fn lockout(&self) -> Option<u64> {
        match self {
            Scope::Address(_) => Some(RefusalThrottle::LOCKOUT_PER_ADDRESS),
            Scope::Prefix(_) => Some(RefusalThrottle::LOCKOUT_PER_PREFIX),
            Scope::Token(_) => None,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Scope::Address(_) => "address",
            Scope::Prefix(_) => "prefix",
            Scope::Token(_) => "token",
        }
    }

    /// The /24 or /64 an address belongs to.
    fn prefix_of(ip: IpAddr) -> Scope {
        Scope::Prefix(match ip {
            IpAddr::V4(v4) => IpAddr::from(std::net::Ipv4Addr::from(u32::from(v4) & 0xffff_ff00)),
            IpAddr::V6(v6) => IpAddr::from(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        })
    }
}

#[derive(Debug)]
struct Window {
    started: Instant,
    audited: u32,
    suppressed: u64,
    /// Every refusal of the window, audited or not: what a lockout counts.
    refused: u64,
    /// The action, actor and remote of the suppressed refusals, for their
    /// summary.
    action: String,
    actor: String,
    remote: Option<String>,
}

/// What the caller must append: the refusal itself, and perhaps summaries
/// of earlier windows whose refusals were counted but not written.
#[derive(Debug, Default)]
pub struct Admitted {
    pub write_entry: bool,
    pub summaries: Vec<Entry>,
}

impl Default for RefusalThrottle {
    fn default() -> Self {
        RefusalThrottle::new(Duration::from_secs(60))
    }
}

impl RefusalThrottle {
    /// Audited one by one per source address and window.
    pub const PER_ADDRESS: u32 = 20;
    /// Audited one by one per /24 or /64 and window, all its addresses together.
    pub const PER_PREFIX: u32 = 50;
    /// Audited one by one per token and window (403s).
    pub const PER_TOKEN: u32 = 20;
    /// Refused unauthenticated requests from one address in a window after
    /// which every further request from it is refused (429) before its token
    /// is looked up, until the window ends. A 256-bit token cannot be
    /// guessed, so nobody legitimate gets near this; what it stops is a flood
    /// that costs the database a lookup per request.
    pub const LOCKOUT_PER_ADDRESS: u64 = 50;
    /// The same for a /24 or /64, all its addresses together.
    pub const LOCKOUT_PER_PREFIX: u64 = 100;
    /// Kept for callers that knew only one limit.
    pub const PER_WINDOW: u32 = Self::PER_ADDRESS;
    /// Scopes remembered before windows that ended are pruned.
    const MAX_SCOPES: usize = 10_000;

    pub fn new(window: Duration) -> Self {
        RefusalThrottle {
            inner: Arc::default(),
            window,
        }
    }

    /// Records a refusal of an unauthenticated caller at `ip` and says what
    /// to append.
    pub fn admit(&self, ip: Option<IpAddr>, entry: &Entry) -> Admitted {
        let mut scopes = vec![Scope::Address(ip)];
        scopes.extend(ip.map(Scope::prefix_of));
        self.admit_in(&scopes, entry)
    }

    /// Records a refusal of the caller holding `token` (its audit actor).
    pub fn admit_token(&self, token: &str, entry: &Entry) -> Admitted {
        self.admit_in(&[Scope::Token(token.to_owned())], entry)
    }

    fn admit_in(&self, scopes: &[Scope], entry: &Entry) -> Admitted {
        let now = Instant::now();
        let mut summaries = Vec::new();
        let mut windows = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() + scopes.len() > Self::MAX_SCOPES
            && scopes.iter().any(|s| !windows.contains_key(s))
        {
            windows.retain(|scope, w| {
                let live = now.duration_since(w.started) < self.window;
                if !live && w.suppressed > 0 {
                    summaries.push(w.summary(scope, self.window));
                }
                live
            });
        }
        for scope in scopes {
            let window = windows
                .entry(scope.clone())
                .or_insert_with(|| Window::new(now, scope, entry));
            if now.duration_since(window.started) >= self.window {
                if window.suppressed > 0 {
                    summaries.push(window.summary(scope, self.window));
                }
                *window = Window::new(now, scope, entry);
            }
        }
        for scope in scopes {
            if let Some(w) = windows.get_mut(scope) {
                w.refused += 1;
            }
        }
        // Written only when every scope has room; otherwise counted once, in
        // the first scope that is full.
        let full = scopes.iter().find(|scope| {
            windows
                .get(*scope)
                .is_some_and(|w| w.audited >= scope.limit())
        });
        let write_entry = match full {
            None => {
                for scope in scopes {
                    if let Some(w) = windows.get_mut(scope) {
                        w.audited += 1;
                    }
                }
                true
            }
            Some(scope) => {
                if let Some(w) = windows.get_mut(scope) {
                    w.suppressed += 1;
                }
                metrics::counter!("dcs_aggregator_platform_refusals_unaudited_total", "scope" => scope.name())
                    .increment(1);
                false
            }
        };
        Admitted {
            write_entry,
            summaries,
        }
    }

    /// How long the caller at `ip` stays locked out, if its address or
    /// prefix was refused [`RefusalThrottle::LOCKOUT_PER_ADDRESS`] or
    /// [`RefusalThrottle::LOCKOUT_PER_PREFIX`] times in the current window.
    /// A request refused here is counted as a suppressed refusal of that
    /// scope (its summary row says how many) and in
    /// `dcs_aggregator_platform_locked_out_total{scope}`.
    pub fn locked_out(&self, ip: Option<IpAddr>) -> Option<Duration> {
        let ip = ip?;
        let now = Instant::now();
        let mut windows = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for scope in [Scope::Address(Some(ip)), Scope::prefix_of(ip)] {
            let Some(window) = windows.get_mut(&scope) else {
                continue;
            };
            let age = now.duration_since(window.started);
            if age < self.window && scope.lockout().is_some_and(|n| window.refused >= n) {
                window.suppressed += 1;
                metrics::counter!("dcs_aggregator_platform_locked_out_total", "scope" => scope.name())
                    .increment(1);
                return Some(self.window - age);
            }
        }
        None
    }

    /// Appends `entry` (a refusal of an unauthenticated caller) as
    /// [`RefusalThrottle::admit`] decides. Failures are logged: a refusal
    /// is answered whether or not its audit row could be written.
    pub async fn append(&self, pool: &PgPool, ip: Option<IpAddr>, entry: &Entry) {
        let admitted = self.admit(ip, entry);
        write_admitted(pool, admitted, entry).await;
    }

    /// Appends `entry` (a refusal of an authenticated caller) as
    /// [`RefusalThrottle::admit_token`] decides.
    pub async fn append_for_token(&self, pool: &PgPool, token: &str, entry: &Entry) {
        let admitted = self.admit_token(token, entry);
        write_admitted(pool, admitted, entry).await;
    }
}

async fn write_admitted(pool: &PgPool, admitted: Admitted, entry: &Entry) {
    let entries = admitted
        .summaries
        .iter()
        .chain(admitted.write_entry.then_some(entry));
    for entry in entries {
        if let Err(error) = append(pool, entry).await {
            tracing::error!(message = "append audit entry for a refused request", action = %entry.action, %error);
        }
    }
}

impl Window {
    fn new(started: Instant, scope: &Scope, entry: &Entry) -> Self {
        Window {
            started,
            audited: 0,
            suppressed: 0,
            refused: 0,
            action: entry.action.clone(),
            actor: match scope {
                Scope::Token(_) => entry.actor.clone(),
                _ => "anonymous".into(),
            },
            remote: match scope {
                Scope::Prefix(net) => {
                    Some(format!("{net}/{}", if net.is_ipv4() { 24 } else { 64 }))
                }
                _ => entry.remote.clone(),
            },
        }
    }

    fn summary(&self, scope: &Scope, window: Duration) -> Entry {
        Entry {
            actor: self.actor.clone(),
            action: format!("{}.suppressed", self.action),
            tenant: None,
            target: None,
            outcome: Outcome::Denied,
            remote: self.remote.clone(),
            details: serde_json::json!({
                "refusals": self.suppressed,
                "scope": scope.name(),
                "window_secs": window.as_secs(),
                "audited_individually": scope.limit(),
            }),
        }
    }
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

/// What a `cursor` of the audit trail may be: an entry id (or nothing).
pub(crate) const CURSOR_PATTERN: &str = "^[0-9]{0,18}$";

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
    // The cursor is the last entry's id ([`CURSOR_PATTERN`]); base64 of it
    // (the earlier form) is still taken. An empty cursor is the first page.
    let before: Option<i64> = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => Some(
            if c.bytes().all(|b| b.is_ascii_digit()) {
                c.to_owned()
            } else {
                super::decode_cursor(c)?
            }
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
        .then(|| rows.last().map(|r| r.id.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(remote: &str) -> Entry {
        Entry {
            actor: "anonymous".into(),
            action: "auth.failed".into(),
            tenant: None,
            target: None,
            outcome: Outcome::Denied,
            remote: Some(remote.into()),
            details: serde_json::Value::Null,
        }
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn each_address_gets_its_own_allowance_of_audited_refusals() {
        let throttle = RefusalThrottle::new(Duration::from_secs(3600));
        let written = |addr: &str| {
            (0..30)
                .filter(|_| throttle.admit(ip(addr), &refusal(addr)).write_entry)
                .count()
        };
        assert_eq!(written("192.0.2.1"), RefusalThrottle::PER_WINDOW as usize);
        assert_eq!(written("192.0.2.2"), RefusalThrottle::PER_WINDOW as usize);
        assert_eq!(written("192.0.2.1"), 0);
    }

    #[test]
    fn an_address_refused_too_often_is_locked_out_until_its_window_ends() {
        let throttle = RefusalThrottle::new(Duration::from_millis(300));
        let entry = refusal("192.0.2.1");
        for _ in 0..RefusalThrottle::LOCKOUT_PER_ADDRESS {
            assert_eq!(throttle.locked_out(ip("192.0.2.1")), None);
            throttle.admit(ip("192.0.2.1"), &entry);
        }
        let left = throttle.locked_out(ip("192.0.2.1")).expect("locked out");
        assert!(left <= Duration::from_millis(300));
        // Another /24 is not affected.
        assert_eq!(throttle.locked_out(ip("198.51.100.1")), None);
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(throttle.locked_out(ip("192.0.2.1")), None);
        // The lockouts are summarised with the other unaudited refusals.
        let next = throttle.admit(ip("192.0.2.1"), &entry);
        let unaudited =
            RefusalThrottle::LOCKOUT_PER_ADDRESS - u64::from(RefusalThrottle::PER_ADDRESS) + 1;
        assert_eq!(next.summaries[0].details["refusals"], unaudited);
    }

    #[test]
    fn a_prefix_is_locked_out_by_all_its_addresses_together() {
        let throttle = RefusalThrottle::new(Duration::from_secs(3600));
        let per_host = RefusalThrottle::LOCKOUT_PER_ADDRESS / 2;
        let hosts = RefusalThrottle::LOCKOUT_PER_PREFIX / per_host;
        for host in 1..=hosts {
            let addr = format!("192.0.2.{host}");
            for _ in 0..per_host {
                throttle.admit(ip(&addr), &refusal(&addr));
            }
        }
        assert!(throttle.locked_out(ip("192.0.2.200")).is_some());
        assert_eq!(throttle.locked_out(ip("192.0.3.1")), None);
        assert_eq!(
            throttle.locked_out(None),
            None,
            "an unknown peer has no scope"
        );
    }

    #[test]
    fn refusals_counted_but_not_written_are_summarised_in_the_next_window() {
        let throttle = RefusalThrottle::new(Duration::from_millis(100));
        let entry = refusal("192.0.2.1");
        for _ in 0..RefusalThrottle::PER_WINDOW + 7 {
            throttle.admit(ip("192.0.2.1"), &entry);
        }
        std::thread::sleep(Duration::from_millis(150));
        let next = throttle.admit(ip("192.0.2.1"), &entry);
        assert!(next.write_entry, "a new window audits again");
        assert_eq!(next.summaries.len(), 1);
        let summary = &next.summaries[0];
        assert_eq!(summary.action, "auth.failed.suppressed");
        assert_eq!(summary.details["refusals"], 7);
        assert_eq!(summary.remote.as_deref(), Some("192.0.2.1"));
    }

    #[test]
    fn a_full_table_of_addresses_prunes_ended_windows_and_keeps_their_counts() {
        let throttle = RefusalThrottle::new(Duration::from_millis(500));
        let entry = refusal("192.0.2.1");
        for _ in 0..RefusalThrottle::PER_WINDOW + 3 {
            throttle.admit(ip("192.0.2.1"), &entry);
        }
        // Each in its own /64, so no prefix window fills up.
        for n in 0..RefusalThrottle::MAX_SCOPES as u32 / 2 {
            let addr = IpAddr::from(std::net::Ipv6Addr::from((u128::from(n) + 1) << 64));
            throttle.admit(Some(addr), &entry);
        }
        std::thread::sleep(Duration::from_millis(600));
        let admitted = throttle.admit(ip("198.51.100.1"), &entry);
        let suppressed: Vec<_> = admitted
            .summaries
            .iter()
            .map(|s| s.details["refusals"].as_u64().unwrap())
            .collect();
        assert_eq!(suppressed, [3]);
    }

    #[test]
    fn a_prefix_shares_one_allowance_among_all_its_addresses() {
        let throttle = RefusalThrottle::new(Duration::from_secs(3600));
        // 50 loopback-like addresses of one /24, 5 refusals each.
        let written: usize = (1..=50)
            .flat_map(|host| (0..5).map(move |_| host))
            .filter(|host| {
                let addr = format!("192.0.2.{host}");
                throttle.admit(ip(&addr), &refusal(&addr)).write_entry
            })
            .count();
        assert_eq!(written, RefusalThrottle::PER_PREFIX as usize);
        // Another /24 still has its own.
        assert!(
            throttle
                .admit(ip("198.51.100.1"), &refusal("198.51.100.1"))
                .write_entry
        );
        let v6 = |last: u16| format!("2001:db8::{last:x}");
        let written_v6 = (1..=100)
            .filter(|n| throttle.admit(ip(&v6(*n)), &refusal(&v6(*n))).write_entry)
            .count();
        assert_eq!(written_v6, RefusalThrottle::PER_PREFIX as usize, "one /64");
    }

    #[test]
    fn authenticated_refusals_are_throttled_per_token_and_summarised() {
        let throttle = RefusalThrottle::new(Duration::from_millis(100));
        let mut entry = refusal("192.0.2.1");
        entry.actor = "token:7:reader".into();
        entry.action = "access.denied".into();
        let written = (0..100)
            .filter(|_| throttle.admit_token("token:7:reader", &entry).write_entry)
            .count();
        assert_eq!(written, RefusalThrottle::PER_TOKEN as usize);
        assert!(throttle.admit_token("token:8:other", &entry).write_entry);
        std::thread::sleep(Duration::from_millis(150));
        let next = throttle.admit_token("token:7:reader", &entry);
        assert_eq!(next.summaries.len(), 1);
        let summary = &next.summaries[0];
        assert_eq!(summary.action, "access.denied.suppressed");
        assert_eq!(summary.actor, "token:7:reader");
        assert_eq!(summary.details["refusals"], 80);
        assert_eq!(summary.details["scope"], "token");
    }

    #[test]
    fn long_values_are_cut_with_a_marker() {
        let path = "/".repeat(60_000);
        let cut = bounded(&path, MAX_TARGET_BYTES);
        assert!(cut.len() <= MAX_TARGET_BYTES);
        assert!(cut.ends_with(TRUNCATED_MARKER));
        assert_eq!(bounded("short", MAX_TARGET_BYTES), "short");
        // Never inside a character.
        let wide = "é".repeat(1000);
        assert!(bounded(&wide, 101).ends_with(TRUNCATED_MARKER));
    }
}
