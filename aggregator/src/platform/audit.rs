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

/// Refusals of callers nobody has authenticated (a wrong bearer token, an
/// unknown enrollment token) cost an attacker nothing, and each one used to
/// be an audit row: a loop of bad requests could grow the table, which the
/// application may never delete from, without bound. Per source address,
/// the first [`RefusalThrottle::PER_WINDOW`] refusals of a window are
/// audited one by one; the rest are counted, and the count is audited as
/// one `*.suppressed` entry when that address is next refused after the
/// window (or when the table of addresses is pruned). Metrics count every
/// refusal either way.
#[derive(Clone, Debug)]
pub struct RefusalThrottle {
    inner: Arc<Mutex<HashMap<Option<IpAddr>, Window>>>,
    window: Duration,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    audited: u32,
    suppressed: u64,
    /// The action and remote of the suppressed refusals, for their summary.
    action: String,
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
    /// Audited one by one per address and window.
    pub const PER_WINDOW: u32 = 20;
    /// Addresses remembered before windows that ended are pruned.
    const MAX_ADDRESSES: usize = 10_000;

    pub fn new(window: Duration) -> Self {
        RefusalThrottle {
            inner: Arc::default(),
            window,
        }
    }

    /// Records a refusal of `entry` from `ip` and says what to append.
    pub fn admit(&self, ip: Option<IpAddr>, entry: &Entry) -> Admitted {
        let now = Instant::now();
        let mut summaries = Vec::new();
        let mut windows = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= Self::MAX_ADDRESSES && !windows.contains_key(&ip) {
            windows.retain(|_, w| {
                let live = now.duration_since(w.started) < self.window;
                if !live && w.suppressed > 0 {
                    summaries.push(w.summary(self.window));
                }
                live
            });
        }
        let window = windows.entry(ip).or_insert_with(|| Window::new(now, entry));
        if now.duration_since(window.started) >= self.window {
            if window.suppressed > 0 {
                summaries.push(window.summary(self.window));
            }
            *window = Window::new(now, entry);
        }
        let write_entry = if window.audited < Self::PER_WINDOW {
            window.audited += 1;
            true
        } else {
            window.suppressed += 1;
            metrics::counter!("dcs_aggregator_platform_refusals_unaudited_total").increment(1);
            false
        };
        Admitted {
            write_entry,
            summaries,
        }
    }

    /// Appends `entry` (a refusal of an unauthenticated caller) as
    /// [`RefusalThrottle::admit`] decides. Failures are logged: a refusal
    /// is answered whether or not its audit row could be written.
    pub async fn append(&self, pool: &PgPool, ip: Option<IpAddr>, entry: &Entry) {
        let admitted = self.admit(ip, entry);
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
}

impl Window {
    fn new(started: Instant, entry: &Entry) -> Self {
        Window {
            started,
            audited: 0,
            suppressed: 0,
            action: entry.action.clone(),
            remote: entry.remote.clone(),
        }
    }

    fn summary(&self, window: Duration) -> Entry {
        Entry {
            actor: "anonymous".into(),
            action: format!("{}.suppressed", self.action),
            tenant: None,
            target: None,
            outcome: Outcome::Denied,
            remote: self.remote.clone(),
            details: serde_json::json!({
                "refusals": self.suppressed,
                "window_secs": window.as_secs(),
                "audited_individually": RefusalThrottle::PER_WINDOW,
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
        for n in 0..RefusalThrottle::MAX_ADDRESSES as u32 {
            let addr = IpAddr::from(std::net::Ipv6Addr::from(u128::from(n) + 1));
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
}
