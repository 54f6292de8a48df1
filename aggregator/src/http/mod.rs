//! Routes of the agents' listener and the mapping of every failure to a status.
//!
//! Design constraints:
//! - The status tells the agent what to do with the batch: 2xx = stored (only
//!   after commit), 503 + `Retry-After` = keep it and retry, other 4xx = it can
//!   never be stored (dead-letter it), 5xx = our bug (retry with backoff).
//! - Cheap checks first: headers, then the agent's share of batches in
//!   progress, then the body under a size cap and a time limit, then
//!   decompression and validation on a blocking thread, and only then a
//!   database slot within the tenant's share (see [`crate::admission`]): a
//!   slow body never holds a database slot, and every byte a batch holds is
//!   reserved from the memory budget first.
//! - The database write runs in its own task, so an agent that disconnects
//!   mid-request cannot cancel a transaction (or a COPY) half-way.
//! - Every error body is a [`dcs_shared::wire::ErrorBody`]; database details
//!   are logged, never sent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use dcs_shared::identity::AgentIdentity;
use dcs_shared::record::{self, FieldError};
use dcs_shared::wire::{self, BatchAck, ErrorBody, ErrorCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use sqlx::PgPool;
use tracing::{debug, error, info, warn};

use crate::admission::{self, Admission, MemoryPermit, Refusal};
use crate::agent_gauges::{AgentGauges, LINK_DOWN_AFTER_SECS};
use crate::config::{Config, LimitsConfig};
use crate::connection::PresentedCertificate;
use crate::platform::enrollment::{self, EnrollError, Signer};
use crate::revocation::{Denied, DenyList, Verdict};
use crate::store::{self, CopyRows, Failure, PreparedBatch};

/// `/ready` must answer before a load balancer's probe gives up (typically
/// 3–5 s), whatever the pool's acquire timeout is.
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// Enough to tell a producer what is wrong with its records; a batch of
/// 100 000 bad records would otherwise produce a reply of several MiB.
const MAX_ERROR_DETAILS: usize = 100;

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

/// `/agents` lists every tenant's agents; the admin listener has no other
/// authentication (scrapers read `/metrics` there).
enum AgentsAccess {
    /// `admin.agents_token_file`: this bearer token.
    Token(String),
    /// No token and a loopback `admin.address`: whoever can reach it.
    Loopback,
    /// No token and another address: nobody.
    Refused,
}

impl AgentsAccess {
    fn from_config(config: &Config) -> Self {
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

    fn check(&self, headers: &HeaderMap) -> Result<(), Error> {
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

/// Every value of `dcs_aggregator_batches_total{outcome}`.
const BATCH_OUTCOMES: [&str; 9] = [
    "accepted",
    "rejected",
    "too_large",
    "throttled",
    "unavailable",
    "error",
    "unauthorized",
    "revoked",
    "conflict",
];

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

/// The outcome label of a batch request, from its result.
fn batch_outcome(result: &Result<Json<BatchAck>, Error>) -> &'static str {
    match result {
        Ok(_) => "accepted",
        Err(e) => match e.status_code_message().0 {
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::TOO_MANY_REQUESTS => "throttled",
            StatusCode::CONFLICT => "conflict",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => "unauthorized",
            s if s.is_client_error() => "rejected",
            _ => "error",
        },
    }
}

/// Why a request failed; each variant is one status and one `error` code.
#[derive(Debug)]
pub(crate) enum Error {
    /// On the deny list: the agent, its certificate's serial, or its tenant.
    Revoked(Denied),
    UnsupportedEncoding(String),
    UnsupportedMediaType(String),
    BatchTooLarge(String),
    RequestTimeout,
    BodyRead(String),
    Malformed(String),
    UnsupportedVersion(u32),
    InvalidRecords {
        total: usize,
        details: Vec<FieldError>,
    },
    RejectedByDatabase(String),
    /// Records reuse a stored `(agent, epoch, seq)` with different content
    /// or another `received_at`; each conflicting seq is named.
    ContentConflict {
        seqs: Vec<i64>,
    },
    DatabaseUnavailable {
        retry_after: Duration,
    },
    /// Refused by [`crate::admission`]: 429 for the agent's own share, 503
    /// for everything shared.
    NotAdmitted {
        refusal: Refusal,
        retry_after: Duration,
    },
    NotReady {
        retry_after: Duration,
    },
    NotFound,
    MethodNotAllowed,
    /// The admin `/agents` without the token it needs.
    AdminUnauthorized,
    AdminForbidden(&'static str),
    Internal,
}

impl Error {
    fn status_code_message(&self) -> (StatusCode, ErrorCode, String) {
        use ErrorCode as C;
        use StatusCode as S;
        match self {
            Error::Revoked(why) => (
                S::FORBIDDEN,
                C::Revoked,
                format!(
                    "this agent may not send batches ({}); nothing was written",
                    why.as_str()
                ),
            ),
            Error::UnsupportedEncoding(m) => {
                (S::UNSUPPORTED_MEDIA_TYPE, C::UnsupportedEncoding, m.clone())
            }
            Error::UnsupportedMediaType(m) => (
                S::UNSUPPORTED_MEDIA_TYPE,
                C::UnsupportedMediaType,
                m.clone(),
            ),
            Error::BatchTooLarge(m) => (S::PAYLOAD_TOO_LARGE, C::BatchTooLarge, m.clone()),
            Error::RequestTimeout => (
                S::REQUEST_TIMEOUT,
                C::RequestTimeout,
                "the request body was not received in time".into(),
            ),
            Error::BodyRead(m) => (S::BAD_REQUEST, C::BodyReadFailed, m.clone()),
            Error::Malformed(m) => (S::BAD_REQUEST, C::MalformedBatch, m.clone()),
            Error::UnsupportedVersion(v) => (
                S::BAD_REQUEST,
                C::UnsupportedVersion,
                format!(
                    "batch format version {v} is not supported; this aggregator speaks version {}",
                    wire::FORMAT_VERSION
                ),
            ),
            Error::InvalidRecords { total, details } => (
                S::UNPROCESSABLE_ENTITY,
                C::InvalidRecords,
                if *total > details.len() {
                    format!(
                        "{total} problems in the batch's records, the first {} listed; nothing was written",
                        details.len()
                    )
                } else {
                    format!("{total} problems in the batch's records; nothing was written")
                },
            ),
            Error::RejectedByDatabase(m) => (
                S::UNPROCESSABLE_ENTITY,
                C::RejectedByDatabase,
                format!("PostgreSQL refused the batch's data ({m}); nothing was written"),
            ),
            Error::ContentConflict { seqs } => (
                S::CONFLICT,
                C::ContentConflict,
                format!(
                    "{} records reuse an (agent, epoch, seq) already stored with different content; nothing was written",
                    seqs.len()
                ),
            ),
            Error::DatabaseUnavailable { .. } => (
                S::SERVICE_UNAVAILABLE,
                C::DatabaseUnavailable,
                "the database is unavailable; nothing was written, retry later".into(),
            ),
            Error::NotAdmitted { refusal, .. } => match refusal {
                Refusal::AgentInFlight => (
                    S::TOO_MANY_REQUESTS,
                    C::TooManyInFlight,
                    "this agent already has its share of batches in progress; nothing was written, retry later".into(),
                ),
                Refusal::TenantInFlight => (
                    S::SERVICE_UNAVAILABLE,
                    C::Overloaded,
                    "this tenant's agents hold all the database slots it may use; nothing was written, retry later".into(),
                ),
                Refusal::MemoryBudget => (
                    S::SERVICE_UNAVAILABLE,
                    C::Overloaded,
                    "the aggregator's memory budget for batches is in use; nothing was written, retry later".into(),
                ),
                Refusal::DatabaseSlots => (
                    S::SERVICE_UNAVAILABLE,
                    C::Overloaded,
                    "too many batches in progress; nothing was written, retry later".into(),
                ),
                Refusal::FairShare => (
                    S::SERVICE_UNAVAILABLE,
                    C::Overloaded,
                    "this agent's earlier batches held its share of the aggregator until the request timed out; nothing was written, retry later".into(),
                ),
            },
            Error::NotReady { .. } => (
                S::SERVICE_UNAVAILABLE,
                C::NotReady,
                "the database does not answer".into(),
            ),
            Error::NotFound => (S::NOT_FOUND, C::NotFound, "no such route".into()),
            Error::AdminUnauthorized => (
                S::UNAUTHORIZED,
                C::Unauthorized,
                "/agents needs Authorization: Bearer <the token in admin.agents_token_file>".into(),
            ),
            Error::AdminForbidden(why) => (S::FORBIDDEN, C::Forbidden, (*why).into()),
            Error::MethodNotAllowed => (
                S::METHOD_NOT_ALLOWED,
                C::MethodNotAllowed,
                "method not allowed on this route".into(),
            ),
            Error::Internal => (
                S::INTERNAL_SERVER_ERROR,
                C::Internal,
                "internal error; nothing was written".into(),
            ),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::DatabaseUnavailable { retry_after }
            | Error::NotAdmitted { retry_after, .. }
            | Error::NotReady { retry_after } => Some(*retry_after),
            _ => None,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code, message) = self.status_code_message();
        let code = code.as_str();
        let retry_after = self.retry_after();
        let body = match self {
            Error::InvalidRecords { details, .. } => {
                ErrorBody::new(code, message).with_details(details)
            }
            // Every seq, uncapped (a batch bounds the list): the agent moves
            // exactly these records to a new epoch and resends the rest.
            Error::ContentConflict { seqs } => ErrorBody::new(code, message).with_details(
                seqs.into_iter()
                    .map(|seq| {
                        FieldError::new(
                            seq,
                            "seq",
                            "already stored with other content or another received time",
                        )
                    })
                    .collect(),
            ),
            _ => ErrorBody::new(code, message),
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(after) = retry_after {
            // Retry-After takes whole seconds; never tell a client "0".
            let secs = after.as_secs().max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
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

async fn post_batch(
    state: State<AppState>,
    agent: Extension<AgentIdentity>,
    presented: Option<Extension<PresentedCertificate>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BatchAck>, Error> {
    let presented = presented.map(|Extension(p)| p);
    // First, before a byte of the body is read: a revoked agent gets nothing.
    match state
        .0
        .0
        .deny
        .check(&agent, presented.as_ref().map(|p| &*p.cert))
    {
        Verdict::Allowed => {}
        Verdict::Denied(why) => {
            metrics::counter!("dcs_aggregator_batches_refused_revoked_total", "reason" => why.as_str())
                .increment(1);
            metrics::counter!("dcs_aggregator_batches_total", "outcome" => "revoked").increment(1);
            let error = Error::Revoked(why);
            log_refusal(&error, &agent);
            return Err(error);
        }
        Verdict::Unknown => {
            metrics::counter!("dcs_aggregator_batches_total", "outcome" => "unavailable")
                .increment(1);
            return Err(Error::DatabaseUnavailable {
                retry_after: state.0.0.limits.retry_after,
            });
        }
    }
    let result = handle_batch(state.clone(), agent.clone(), headers, body).await;
    // An empty batch (an agent asking for its high-water mark) creates no
    // agent row, so there would be nothing to record the certificate on.
    if result
        .as_ref()
        .is_ok_and(|Json(ack)| ack.accepted + ack.duplicates > 0)
        && let Some(presented) = presented
    {
        record_certificate(&state.0.0.pool, &agent, &presented).await;
    }
    metrics::counter!("dcs_aggregator_batches_total", "outcome" => batch_outcome(&result))
        .increment(1);
    if let Ok(Json(ack)) = &result {
        metrics::counter!("dcs_aggregator_records_ingested_total").increment(ack.accepted);
        metrics::counter!("dcs_aggregator_records_duplicate_total").increment(ack.duplicates);
    }
    result
}

/// Stores the certificate an agent's connection presented on its row, once
/// per connection and only when it changed, so operators see fingerprints,
/// serials and expiry without the batch path paying for it on every batch.
/// Renews the calling agent's certificate: the identity is the verified
/// client certificate's, so an agent can only ever renew as itself, and the
/// deny list is checked first (a revoked agent or certificate gets 403).
async fn renew(
    state: State<AppState>,
    agent: Extension<AgentIdentity>,
    presented: Option<Extension<PresentedCertificate>>,
    peer: Option<Extension<crate::connection::PeerAddr>>,
    request: Result<Json<dcs_certs::enroll::RenewRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<dcs_certs::enroll::IssuedCertificate>, EnrollError> {
    let Json(request) = request.map_err(enrollment::bad_body)?;
    let inner = &state.0.0;
    let presented = presented.map(|Extension(p)| p.cert);
    let remote = peer.map(|Extension(p)| p.0.to_string());
    let issued = enrollment::renew(
        &inner.pool,
        inner.signer.as_deref(),
        &inner.deny,
        &inner.renewals,
        enrollment::Renewal {
            identity: &agent,
            presented: presented.as_deref(),
            remote,
            csr: &request.csr,
        },
    )
    .await
    .inspect_err(|error| {
        info!(message = "certificate renewal refused", agent = %agent.0, ?error);
    })?;
    Ok(Json(issued))
}

async fn record_certificate(
    pool: &PgPool,
    agent: &AgentIdentity,
    presented: &PresentedCertificate,
) {
    use std::sync::atomic::Ordering;
    if presented.recorded.load(Ordering::Relaxed) {
        return;
    }
    let cert = &presented.cert;
    let result = sqlx::query(
        "UPDATE agents SET cert_fingerprint = $3, cert_serial = $4, \
             cert_not_after = to_timestamp($5) \
         WHERE tenant_id = $1 AND name = $2 AND cert_fingerprint IS DISTINCT FROM $3",
    )
    .bind(&agent.tenant)
    .bind(&agent.agent)
    .bind(&cert.fingerprint)
    .bind(&cert.serial)
    .bind(cert.not_after as f64)
    .execute(pool)
    .await;
    match result {
        Ok(_) => presented.recorded.store(true, Ordering::Relaxed),
        // Retried with the connection's next batch.
        Err(error) => debug!(message = "record agent certificate", %error, agent = %agent),
    }
}

/// The most deflate can inflate one byte to (RFC 1951's longest match, 258
/// bytes, in at least 2 bits: about 1032:1).
const MAX_DEFLATE_RATIO: u64 = 1032;

async fn handle_batch(
    State(app): State<AppState>,
    Extension(agent): Extension<AgentIdentity>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BatchAck>, Error> {
    let started = Instant::now();
    let limits = app.0.limits;
    // One deadline for reading the body and waiting for memory and a database
    // slot: a client is owed an answer within the request timeout either way.
    let deadline = tokio::time::Instant::now() + limits.request_timeout;
    check_headers(&headers, &limits).inspect_err(|e| log_refusal(e, &agent))?;
    let admission = &app.0.admission;
    let not_admitted = |refusal| Error::NotAdmitted {
        refusal,
        retry_after: limits.retry_after,
    };

    let ticket = admission
        .enter(&agent.to_string())
        .map_err(not_admitted)
        .inspect_err(|e| log_refusal(e, &agent))?;
    let (compressed, mut memory) = read_body(body, &limits, admission, deadline)
        .await
        .inspect_err(|e| log_refusal(e, &agent))?;
    // A member's true size is at least what its trailer states (the trailer
    // holds it mod 2^32), so a stated size past the cap is refused before a
    // byte is inflated: oversized batches and gzip bombs cost no CPU.
    let stated = admission::stated_size(&compressed);
    // Deflate inflates at most 1032:1: a larger stated size cannot be a
    // complete stream's, so the trailer read is garbage (a body cut short,
    // random bytes) and the body is malformed, not large.
    if stated > (compressed.len() as u64).saturating_mul(MAX_DEFLATE_RATIO) {
        let error = Error::Malformed(format!(
            "gzip: the body is not a complete gzip stream (its last 4 bytes state {stated} bytes decompressed, more than {} compressed bytes can hold)",
            compressed.len()
        ));
        log_refusal(&error, &agent);
        return Err(error);
    }
    if compressed.starts_with(&[0x1f, 0x8b]) && stated > limits.max_decompressed_bytes.0 {
        let error = Error::BatchTooLarge(format!(
            "the gzip trailer states {stated} bytes decompressed, more than limits.max_decompressed_bytes ({})",
            limits.max_decompressed_bytes.0
        ));
        log_refusal(&error, &agent);
        return Err(error);
    }
    // The JSON and the rows encoded for COPY, each at most the decompressed size.
    let estimate = admission::decompressed_estimate(&compressed, limits.max_decompressed_bytes.0);
    memory.merge(
        admission
            .reserve(estimate.saturating_mul(2), deadline)
            .await
            .map_err(not_admitted)
            .inspect_err(|e| log_refusal(e, &agent))?,
    );
    // Held through inflating, parsing and writing: where the batch's CPU goes.
    let turn = admission
        .turn(&ticket, deadline)
        .await
        .map_err(not_admitted)
        .inspect_err(|e| log_refusal(e, &agent))?;
    let prepared = tokio::task::spawn_blocking(move || prepare(&compressed, &limits, estimate))
        .await
        .map_err(|error| {
            error!(message = "batch preparation panicked", %error, agent = %agent);
            Error::Internal
        })?
        .inspect_err(|e| log_refusal(e, &agent))?;

    app.0
        .agent_gauges
        .record_batch(&agent, prepared.backlog.as_ref());
    if prepared.records == 0 {
        // An empty batch is how an agent asks for its epoch's high-water
        // mark before it sends (see `BatchAck::high_seq`).
        let high_seq = store::high_seq(&app.0.pool, &agent, prepared.epoch).await;
        return match high_seq {
            Ok(high_seq) => Ok(Json(BatchAck {
                high_seq,
                replay: app.0.replay.current(),
                ..BatchAck::new(0, 0)
            })),
            Err(error) => {
                warn!(message = "database unavailable, empty batch refused with 503", %error, agent = %agent);
                Err(Error::DatabaseUnavailable {
                    retry_after: limits.retry_after,
                })
            }
        };
    }

    let slot = admission
        .database_slot(&agent.tenant, deadline)
        .await
        .map_err(not_admitted)
        .inspect_err(|e| log_refusal(e, &agent))?;
    let pool = app.0.pool.clone();
    let writer = agent.clone();
    let epoch = prepared.epoch;
    let records = prepared.records;
    // Spawned, not awaited in place: if the agent disconnects this handler is
    // dropped, but the transaction still runs to commit or rollback.
    let write_started = Instant::now();
    let written =
        tokio::spawn(async move { store::write_batch(&pool, &writer, &prepared).await }).await;
    metrics::histogram!("dcs_aggregator_db_write_duration_seconds")
        .record(write_started.elapsed().as_secs_f64());
    drop(slot);
    drop(turn);
    drop(memory);

    match written {
        Ok(Ok(store::Written::Conflict { seqs })) => {
            warn!(
                message = "batch reuses stored (agent, epoch, seq) keys with other content; refused",
                agent = %agent,
                epoch = %epoch,
                conflicting = seqs.len(),
                first_seq = seqs.first().copied().unwrap_or_default(),
            );
            Err(Error::ContentConflict { seqs })
        }
        Ok(Ok(store::Written::Stored(mut ack))) => {
            ack.replay = app.0.replay.current();
            debug!(
                message = "batch written",
                agent = %agent,
                records,
                accepted = ack.accepted,
                duplicates = ack.duplicates,
                elapsed_ms = started.elapsed().as_millis() as u64,
            );
            Ok(Json(ack))
        }
        Ok(Err(db_error)) => Err(match store::classify_write(&db_error) {
            Failure::Unavailable => {
                warn!(message = "database unavailable, batch refused with 503", error = %db_error, agent = %agent);
                Error::DatabaseUnavailable {
                    retry_after: limits.retry_after,
                }
            }
            Failure::Rejected(reason) => {
                warn!(message = "database rejected the batch's data", error = %db_error, agent = %agent);
                Error::RejectedByDatabase(reason)
            }
            Failure::Internal => {
                error!(message = "batch write failed", error = %db_error, agent = %agent);
                Error::Internal
            }
        }),
        Err(join_error) => {
            error!(message = "batch write task failed", error = %join_error, agent = %agent);
            Err(Error::Internal)
        }
    }
}

fn log_refusal(error: &Error, agent: &AgentIdentity) {
    let (status, code, message) = error.status_code_message();
    info!(message = "batch refused", status = status.as_u16(), code = code.as_str(), reason = %message, agent = %agent);
}

fn check_headers(headers: &HeaderMap, limits: &LimitsConfig) -> Result<(), Error> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("").trim().to_ascii_lowercase());
    if encoding.as_deref() != Some("gzip") {
        return Err(Error::UnsupportedEncoding(format!(
            "batches must be sent with Content-Encoding: gzip (got {})",
            encoding.as_deref().unwrap_or("none")
        )));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(Error::UnsupportedMediaType(format!(
            "batches must be sent with Content-Type: application/json (got {content_type:?})"
        )));
    }
    // Refuse a declared oversize body before reading any of it.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = declared
        && length > limits.max_compressed_bytes.0
    {
        return Err(too_large_compressed(limits));
    }
    Ok(())
}

fn too_large_compressed(limits: &LimitsConfig) -> Error {
    Error::BatchTooLarge(format!(
        "the compressed batch exceeds {}",
        limits.max_compressed_bytes
    ))
}

/// Reads the body under the compressed cap by `deadline`, reserving its bytes
/// from the memory budget as they arrive.
async fn read_body(
    body: Body,
    limits: &LimitsConfig,
    admission: &Admission,
    deadline: tokio::time::Instant,
) -> Result<(Bytes, MemoryPermit), Error> {
    let mut limited = Limited::new(body, limits.max_compressed_bytes.as_usize());
    let mut memory = MemoryPermit::none();
    let mut buffer = bytes::BytesMut::new();
    let read = async {
        while let Some(frame) = limited.frame().await {
            let frame = frame.map_err(|error| {
                if error.downcast_ref::<LengthLimitError>().is_some() {
                    too_large_compressed(limits)
                } else if crate::connection::SlowBody::is_cause_of(error.as_ref()) {
                    // Cut by the listener's minimum body rate: a timeout,
                    // which the agent retries, not a bad batch.
                    Error::RequestTimeout
                } else {
                    Error::BodyRead(format!("could not read the request body: {error}"))
                }
            })?;
            if let Ok(data) = frame.into_data() {
                let total = (buffer.len() + data.len()) as u64;
                admission
                    .grow(&mut memory, total, deadline)
                    .await
                    .map_err(|refusal| Error::NotAdmitted {
                        refusal,
                        retry_after: limits.retry_after,
                    })?;
                buffer.extend_from_slice(&data);
            }
        }
        Ok::<_, Error>(())
    };
    match tokio::time::timeout_at(deadline, read).await {
        Err(_) => Err(Error::RequestTimeout),
        Ok(Err(error)) => Err(error),
        Ok(Ok(())) => Ok((buffer.freeze(), memory)),
    }
}

/// Decompresses, parses and validates a batch and encodes it for COPY. CPU-bound
/// (up to max_decompressed_bytes of JSON): run it on a blocking thread.
/// `reserved` is what the memory budget holds for the JSON (see
/// [`admission::decompressed_estimate`]); decompression stops there.
fn prepare(
    compressed: &[u8],
    limits: &LimitsConfig,
    reserved: u64,
) -> Result<PreparedBatch, Error> {
    let json = wire::gunzip_limited(compressed, reserved as usize).map_err(|error| {
        match error {
            // A gzip trailer states the decompressed size; a body larger than
            // it says is corrupt, not merely large.
            dcs_shared::Error::BatchTooLarge { .. }
                if reserved < limits.max_decompressed_bytes.0 =>
            {
                Error::Malformed(
                    "gzip: the body decompresses to more than its trailer states".into(),
                )
            }
            dcs_shared::Error::BatchTooLarge { .. } => Error::BatchTooLarge(format!(
                "the batch exceeds {} bytes once decompressed",
                limits.max_decompressed_bytes
            )),
            other => wire_error(other),
        }
    })?;
    let batch = wire::parse_batch(&json).map_err(wire_error)?;
    if batch.records.len() > limits.max_records_per_batch {
        return Err(Error::BatchTooLarge(format!(
            "the batch holds {} records, more than the limit of {}",
            batch.records.len(),
            limits.max_records_per_batch
        )));
    }

    let record_limits = record::Limits {
        max_payload_bytes: limits.max_payload_bytes.as_usize(),
    };
    let mut problems = wire::check_records(&batch.records, &record_limits);
    if !problems.is_empty() {
        let total = problems.len();
        problems.truncate(MAX_ERROR_DETAILS);
        return Err(Error::InvalidRecords {
            total,
            details: problems,
        });
    }

    // Escaping grows the text a little; the JSON length is a close upper bound
    // of the unescaped rows.
    let mut copy_rows = CopyRows::with_capacity(json.len() + json.len() / 16);
    for r in &batch.records {
        // received_at is part of the stored key, so it must be the same on
        // every redelivery. An agent too old to send `received` gets its
        // record's own ts instead of the aggregator's clock: now() would
        // differ on a redelivery and store the record twice.
        let received = r.received.unwrap_or(r.ts);
        copy_rows.push(r.seq, &r.id, &r.stream, r.ts, received, r.payload.get());
    }
    Ok(PreparedBatch {
        epoch: batch.epoch,
        backlog: batch.backlog,
        records: batch.records.len() as u64,
        seqs: (
            batch.records.first().map_or(0, |r| r.seq),
            batch.records.last().map_or(0, |r| r.seq),
        ),
        copy_rows,
    })
}

fn wire_error(error: dcs_shared::Error) -> Error {
    match error {
        dcs_shared::Error::BatchTooLarge { limit } => {
            Error::BatchTooLarge(format!("the batch exceeds {limit} bytes once decompressed"))
        }
        dcs_shared::Error::MalformedBatch(m) => Error::Malformed(m),
        dcs_shared::Error::UnsupportedVersion(v) => Error::UnsupportedVersion(v),
        other => Error::Malformed(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcs_shared::config::ByteSize;
    use dcs_shared::wire::OutRecord;
    use uuid::Uuid;

    fn limits() -> LimitsConfig {
        LimitsConfig::default()
    }

    fn rec<'a>(seq: i64, stream: &'a str, payload: &'a str) -> OutRecord<'a> {
        OutRecord {
            seq,
            id: "id-1",
            stream,
            ts_us: 1_700_000_000_000_000,
            payload,
            received: None,
        }
    }

    #[test]
    fn a_valid_batch_is_prepared_with_one_row_per_record() {
        let body = wire::encode_batch(
            Uuid::nil(),
            None,
            [rec(1, "a", "{}"), rec(2, "b", r#"{"x":1}"#)],
            1,
        );
        let prepared = prepare(&body, &limits(), u64::MAX).unwrap();
        assert_eq!(prepared.records, 2);
        assert_eq!(prepared.epoch, Uuid::nil());
    }

    #[test]
    fn every_bad_record_is_reported_by_seq_and_field() {
        let body = wire::encode_batch(
            Uuid::nil(),
            None,
            [rec(1, "ok", "{}"), rec(0, "Bad Stream", "[1]")],
            1,
        );
        let Err(Error::InvalidRecords { total, details }) = prepare(&body, &limits(), u64::MAX)
        else {
            panic!("expected invalid records");
        };
        assert_eq!(total, 3);
        let fields: Vec<_> = details
            .iter()
            .map(|d| (d.index, d.field.as_str()))
            .collect();
        assert_eq!(fields, [(0, "seq"), (0, "stream"), (0, "payload")]);
    }

    #[test]
    fn too_many_records_is_too_large() {
        let body = wire::encode_batch(Uuid::nil(), None, (1..=3).map(|i| rec(i, "s", "{}")), 1);
        let small = LimitsConfig {
            max_records_per_batch: 2,
            ..limits()
        };
        assert!(matches!(
            prepare(&body, &small, u64::MAX),
            Err(Error::BatchTooLarge(_))
        ));
    }

    #[test]
    fn an_oversize_payload_is_named() {
        let body = wire::encode_batch(Uuid::nil(), None, [rec(5, "s", r#"{"k":"0123456789"}"#)], 1);
        let small = LimitsConfig {
            max_payload_bytes: ByteSize(8),
            ..limits()
        };
        let Err(Error::InvalidRecords { details, .. }) = prepare(&body, &small, u64::MAX) else {
            panic!("expected invalid records");
        };
        assert_eq!(
            (details[0].index, details[0].field.as_str()),
            (5, "payload")
        );
    }

    #[test]
    fn error_details_are_capped() {
        let body = wire::encode_batch(Uuid::nil(), None, (1..=500).map(|i| rec(i, "BAD", "{}")), 1);
        let Err(error @ Error::InvalidRecords { .. }) = prepare(&body, &limits(), u64::MAX) else {
            panic!("expected invalid records");
        };
        let (_, _, message) = error.status_code_message();
        assert!(message.starts_with("500 problems"), "{message}");
        let Error::InvalidRecords { details, .. } = error else {
            unreachable!()
        };
        assert_eq!(details.len(), MAX_ERROR_DETAILS);
    }

    #[test]
    fn headers_are_checked_before_the_body() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(matches!(
            check_headers(&h, &limits()),
            Err(Error::UnsupportedEncoding(_))
        ));
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("GZIP"));
        assert!(check_headers(&h, &limits()).is_ok());
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(check_headers(&h, &limits()).is_ok());
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(matches!(
            check_headers(&h, &limits()),
            Err(Error::UnsupportedMediaType(_))
        ));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(17u64 << 20));
        assert!(matches!(
            check_headers(&h, &limits()),
            Err(Error::BatchTooLarge(_))
        ));
    }

    #[tokio::test]
    async fn a_body_past_the_cap_is_too_large_even_without_content_length() {
        let small = LimitsConfig {
            max_compressed_bytes: ByteSize(10),
            ..limits()
        };
        let admission = Admission::new(Default::default(), 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let body = Body::from(vec![0u8; 11]);
        assert!(matches!(
            read_body(body, &small, &admission, deadline).await,
            Err(Error::BatchTooLarge(_))
        ));
        let body = Body::from(vec![0u8; 10]);
        let (read, _memory) = read_body(body, &small, &admission, deadline).await.unwrap();
        assert_eq!(read.len(), 10);
    }

    #[test]
    fn the_admin_agents_list_needs_a_token_or_a_loopback_bind() {
        let mut config = Config::default();
        config.admin.address = "127.0.0.1:9464".parse().unwrap();
        assert!(
            AgentsAccess::from_config(&config)
                .check(&HeaderMap::new())
                .is_ok()
        );
        config.admin.address = "0.0.0.0:9464".parse().unwrap();
        assert!(matches!(
            AgentsAccess::from_config(&config).check(&HeaderMap::new()),
            Err(Error::AdminForbidden(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        config.admin.agents_token_file = Some(file);
        let access = AgentsAccess::from_config(&config);
        assert!(matches!(
            access.check(&HeaderMap::new()),
            Err(Error::AdminUnauthorized)
        ));
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cre"),
        );
        assert!(access.check(&h).is_err());
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        assert!(access.check(&h).is_ok());
    }

    #[test]
    fn retry_after_is_whole_seconds_and_never_zero() {
        let response = Error::DatabaseUnavailable {
            retry_after: Duration::from_millis(300),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
