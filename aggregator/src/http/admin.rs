//! The plain-HTTP admin listener for operators and scrapers: `/metrics`,
//! `/health`, `/ready` and `/agents`.
//!
//! Invariant: `/agents` lists every tenant's agents, so it answers only the
//! bearer token of `admin.agents_token_file`, or anyone when there is no
//! token and the listener is bound to loopback; otherwise nobody. The
//! listener never takes batches.

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::routing::get;
use axum::{Json, Router};
use tracing::{error, warn};

use super::{AppState, Error, health, ready};
use crate::agent_gauges::LINK_DOWN_AFTER_SECS;
use crate::config::Config;

/// `/agents` lists every tenant's agents; the admin listener has no other
/// authentication (scrapers read `/metrics` there).
pub(super) enum AgentsAccess {
    /// `admin.agents_token_file`: this bearer token.
    Token(String),
    /// No token and a loopback `admin.address`: whoever can reach it.
    Loopback,
    /// No token and another address: nobody.
    Refused,
}

impl AgentsAccess {
    pub(super) fn from_config(config: &Config) -> Self {
        match &config.admin.agents_token_file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => match text.lines().next().map(str::trim) {
                    Some(token) if !token.is_empty() => AgentsAccess::Token(token.to_owned()),
                    _ => {
                        error!(message = "admin.agents_token_file is empty; /agents is refused", path = %path.display());
                        AgentsAccess::Refused
                    }
                },
                Err(e) => {
                    error!(message = "cannot read admin.agents_token_file; /agents is refused", path = %path.display(), error = %e);
                    AgentsAccess::Refused
                }
            },
            None if config.admin.address.ip().is_loopback() => AgentsAccess::Loopback,
            None => AgentsAccess::Refused,
        }
    }

    pub(super) fn check(&self, headers: &HeaderMap) -> Result<(), Error> {
        match self {
            AgentsAccess::Loopback => Ok(()),
            AgentsAccess::Refused => Err(Error::AdminForbidden(
                "/agents needs admin.agents_token_file when admin.address is not a loopback address",
            )),
            AgentsAccess::Token(expected) => {
                let given = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or("");
                // Constant time: the comparison must not tell how much matched.
                let same = given.len() == expected.len()
                    && given
                        .bytes()
                        .zip(expected.bytes())
                        .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                        == 0;
                if same {
                    Ok(())
                } else {
                    Err(Error::AdminUnauthorized)
                }
            }
        }
    }
}

/// The plain-HTTP admin listener for operators and scrapers, which hold no
/// agent certificate: metrics, liveness and readiness. Never batches.
pub(crate) fn admin_router(
    state: AppState,
    metrics: dcs_shared::metrics::PrometheusHandle,
) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        dcs_shared::metrics::render(&metrics),
                    )
                }
            }),
        )
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/agents", get(agents))
        .fallback(|| async { Error::NotFound })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(axum::middleware::from_fn(crate::error_shape::json_errors))
        .with_state(state)
}

/// An agent as the center knows it, with the backlog it last reported.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
struct AgentView {
    tenant: String,
    agent: String,
    first_seen: String,
    last_seen: String,
    last_batch_at: Option<String>,
    last_epoch: Option<String>,
    /// `up` when heard from within the last five minutes.
    link: String,
    backlog_records: Option<i64>,
    backlog_bytes: Option<i64>,
    backlog_oldest_age_secs: Option<i64>,
    dropped_total: Option<i64>,
}

async fn agents(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<AgentView>>, Error> {
    app.0.agents_access.check(&headers)?;
    let rows = sqlx::query_as::<_, AgentView>(
        "SELECT tenant_id AS tenant, name AS agent,
                to_char(first_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS first_seen,
                to_char(last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS last_seen,
                to_char(last_batch_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS last_batch_at,
                last_epoch::text AS last_epoch,
                CASE WHEN last_seen > now() - make_interval(secs => $1) THEN 'up' ELSE 'down' END AS link,
                backlog_records, backlog_bytes, backlog_oldest_age_secs, dropped_total
         FROM agents ORDER BY tenant_id, name",
    )
    .bind(LINK_DOWN_AFTER_SECS as f64)
    .fetch_all(&app.0.pool)
    .await
    .map_err(|error| {
        warn!(message = "list agents", %error);
        Error::DatabaseUnavailable {
            retry_after: app.0.limits.retry_after,
        }
    })?;
    Ok(Json(rows))
}
