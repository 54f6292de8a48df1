//! The agents' listener (mTLS: batches, renewal, health) and the admin
//! listener (plain HTTP: metrics, health, readiness, `/agents`).
//!
//! The module root holds the state every request shares, the agents'
//! router, liveness and readiness, and the counters exported at 0.
//! [`batches`] is `POST /v1/batches`, [`renewal`] what an agent does with its
//! own certificate, [`admin`] the operators' listener and [`errors`] the one
//! mapping of a failure to a status, an `error` code and `Retry-After`.
//!
//! Invariants: both routers answer every failure with an
//! [`dcs_shared::wire::ErrorBody`] (unknown routes and methods too); a
//! draining replica fails `/ready` while it still accepts batches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dcs_shared::wire;
use sqlx::PgPool;
use tracing::debug;

use crate::admission::{Admission, Refusal};
use crate::agent_gauges::AgentGauges;
use crate::config::{Config, LimitsConfig};
use crate::platform::enrollment::{self, Signer};
use crate::revocation::{Denied, DenyList};

mod admin;
mod batches;
mod errors;
mod renewal;
#[cfg(test)]
mod tests;

pub(crate) use admin::admin_router;

use admin::AgentsAccess;
use batches::{BATCH_OUTCOMES, post_batch};
use errors::Error;
use renewal::renew;

/// `/ready` must answer before a load balancer's probe gives up (typically
/// 3–5 s), whatever the pool's acquire timeout is.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Shared by every request.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Inner>);

struct Inner {
    pool: PgPool,
    limits: LimitsConfig,
    /// Per-agent and per-tenant shares, the memory budget and the database
    /// slots: more batches writing than there are connections would only queue.
    admission: Admission,
    /// Revoked agents and serials, disabled tenants; refreshed in the background.
    deny: DenyList,
    /// Signs renewals; `None` when `[enrollment]` is off.
    signer: Option<Arc<Signer>>,
    /// Set when the process was asked to stop: `/ready` fails so balancers
    /// take this replica out while it still accepts batches.
    draining: std::sync::atomic::AtomicBool,
    /// How often each agent may renew.
    renewals: enrollment::RenewalThrottle,
    /// Who may read the admin listener's `/agents`.
    agents_access: AgentsAccess,
    /// The latest replay request, put into every batch answer.
    replay: crate::replay::ReplayNotice,
    /// The per-agent gauges; a refresh task rebuilds them from `agents`.
    agent_gauges: AgentGauges,
}

impl AppState {
    pub(crate) fn new(
        config: &Config,
        pool: PgPool,
        deny: DenyList,
        signer: Option<Arc<Signer>>,
        agent_gauges: AgentGauges,
    ) -> Self {
        AppState(Arc::new(Inner {
            pool,
            limits: config.limits,
            admission: Admission::new(config.admission, config.database.max_connections as usize),
            deny,
            signer,
            draining: std::sync::atomic::AtomicBool::new(false),
            renewals: enrollment::RenewalThrottle::default(),
            agents_access: AgentsAccess::from_config(config),
            replay: crate::replay::ReplayNotice::default(),
            agent_gauges,
        }))
    }

    pub(crate) fn replay_notice(&self) -> &crate::replay::ReplayNotice {
        &self.0.replay
    }

    /// From now on `/ready` answers 503 `{"status":"draining"}`.
    pub(crate) fn start_draining(&self) {
        self.0
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route(wire::BATCHES_PATH, post(post_batch))
        .route(dcs_certs::enroll::RENEW_PATH, post(renew))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .fallback(|| async { Error::NotFound })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(axum::middleware::from_fn(crate::error_shape::json_errors))
        .layer(axum::middleware::from_fn(time_requests))
        .with_state(state)
}

async fn time_requests(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::histogram!(
        "dcs_aggregator_http_request_duration_seconds",
        "route" => route,
        "status" => response.status().as_u16().to_string()
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// Exports the counters of the agents' listener and of the platform at 0, so
/// `increase()` sees their first event and dashboards show 0, not "No data".
pub(crate) fn register_metrics() {
    for outcome in BATCH_OUTCOMES {
        metrics::counter!("dcs_aggregator_batches_total", "outcome" => outcome).increment(0);
    }
    for name in [
        "dcs_aggregator_records_ingested_total",
        "dcs_aggregator_records_duplicate_total",
        "dcs_aggregator_platform_auth_failures_total",
        "dcs_aggregator_platform_refusals_unaudited_total",
        "dcs_aggregator_partitions_dropped_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for scope in ["address", "prefix"] {
        metrics::counter!("dcs_aggregator_platform_locked_out_total", "scope" => scope)
            .increment(0);
    }
    for why in [Denied::Agent, Denied::Serial, Denied::TenantDisabled] {
        metrics::counter!("dcs_aggregator_batches_refused_revoked_total", "reason" => why.as_str())
            .increment(0);
    }
    for refusal in [
        Refusal::AgentInFlight,
        Refusal::TenantInFlight,
        Refusal::MemoryBudget,
        Refusal::DatabaseSlots,
        Refusal::FairShare,
    ] {
        metrics::counter!("dcs_aggregator_admission_refused_total", "reason" => refusal.reason())
            .increment(0);
    }
    for outcome in ["ok", "failed"] {
        metrics::counter!("dcs_aggregator_server_cert_reloads_total", "outcome" => outcome)
            .increment(0);
    }
    for kind in ["enroll", "renew"] {
        metrics::counter!("dcs_aggregator_certificates_issued_total", "kind" => kind).increment(0);
    }
    enrollment::register_metrics();
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn ready(State(app): State<AppState>) -> Result<Response, Error> {
    if app.0.draining.load(std::sync::atomic::Ordering::SeqCst) {
        let body = Json(serde_json::json!({ "status": "draining" }));
        return Ok((StatusCode::SERVICE_UNAVAILABLE, body).into_response());
    }
    let probe = sqlx::query("SELECT 1").execute(&app.0.pool);
    match tokio::time::timeout(READY_TIMEOUT, probe).await {
        Ok(Ok(_)) => Ok(Json(serde_json::json!({ "status": "ready" })).into_response()),
        Ok(Err(error)) => {
            debug!(message = "readiness probe failed", %error);
            Err(Error::NotReady {
                retry_after: app.0.limits.retry_after,
            })
        }
        Err(_) => {
            debug!(message = "readiness probe timed out");
            Err(Error::NotReady {
                retry_after: app.0.limits.retry_after,
            })
        }
    }
}
