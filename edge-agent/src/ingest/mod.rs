//! The local HTTP API producers push records to, plus health and status.
//!
//! Every request is validated in full before anything is written: one bad
//! record refuses the whole request with a JSON body naming each bad record's
//! index, field and reason. A 2xx is sent only after the buffer committed the
//! records at the configured durability. A stream with a JSON Schema
//! (`[streams."NAME"]`, [`crate::schema`]) refuses payloads that do not match
//! it the same way: the field is `payload` plus the JSON pointer of the bad
//! value (`payload/value`), the reason the schema error and the keyword.
//!
//! With partial acceptance (`?partial=true`, or `ingest.partial = true` as
//! the default) the valid records are committed and each invalid one is
//! written to `dead_letters` with its reason and raw text in the same
//! transaction; the answer is 200 with exact `accepted` and `rejected`
//! counts and a `details` entry per reason. Bodies may be gzip or zstd
//! ([`crate::body_encoding`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dcs_shared::metrics::LabelCap;
use dcs_shared::metrics::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use dcs_shared::record::{self, FieldError, IncomingRecord, Limits, Record};
use dcs_shared::wire::ErrorBody;

use crate::body_encoding::{self, Encoding};
use crate::buffer::{Buffer, BufferError, RecordState, Rejected};
use crate::forwarder::Link;
use crate::schema::Schemas;

/// Seconds a producer is told to wait when the buffer is full.
const FULL_RETRY_AFTER_SECS: u64 = 5;

/// Streams seen as metric labels; producers choose stream names, so the
/// label is capped to keep the series count bounded.
static STREAM_LABELS: LabelCap = LabelCap::new(100);

#[derive(Clone)]
pub struct AppState {
    pub buffer: Buffer,
    pub link: Arc<Link>,
    pub limits: Limits,
    pub max_request_bytes: usize,
    pub metrics: PrometheusHandle,
    /// Damaged buffer files quarantined so far (see `crate::recovery`).
    pub quarantine: Arc<Vec<crate::recovery::Report>>,
    /// Salvaged records being delivered from `recovered/`.
    pub recovered: crate::recovery::Waiting,
    /// Per-stream JSON Schemas, compiled at start-up.
    pub schemas: Arc<Schemas>,
    /// `ingest.partial`: the answer mode of requests that do not choose one.
    pub partial: bool,
    /// `[otlp]`: how `POST /v1/logs` maps log records.
    pub otlp: Arc<crate::config::OtlpConfig>,
}

pub fn router(state: AppState) -> Router {
    let limit = state.max_request_bytes;
    Router::new()
        .route("/v1/records", post(post_records))
        .route("/v1/logs", post(crate::otlp::post_logs))
        .route("/v1/records/{id}", get(get_record).put(put_record))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(count_requests))
        .with_state(state)
}

pub(crate) async fn count_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let response = next.run(request).await;
    metrics::counter!(
        "dcs_agent_requests_total",
        "route" => route,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    response
}

/// Counts records per stream and result (`accepted`, `duplicate`, `rejected`).
pub(crate) fn count_records<'a>(streams: impl Iterator<Item = (&'a str, &'static str)>) {
    let mut counts: std::collections::HashMap<(String, &'static str), u64> = Default::default();
    for (stream, result) in streams {
        *counts
            .entry((STREAM_LABELS.label(stream), result))
            .or_default() += 1;
    }
    for ((stream, result), n) in counts {
        metrics::counter!("dcs_agent_records_received_total", "stream" => stream, "result" => result)
            .increment(n);
    }
}

/// An error response: a status and the shared JSON error body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody::new(code, message),
            retry_after: None,
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }

    pub(crate) fn message(&self) -> &str {
        &self.body.message
    }

    pub(crate) fn body(&self) -> &ErrorBody {
        &self.body
    }

    pub(crate) fn set_retry_after(&mut self, secs: Option<u64>) {
        self.retry_after = secs;
    }

    fn invalid(details: Vec<FieldError>, total: usize) -> Self {
        let bad: std::collections::BTreeSet<i64> = details.iter().map(|d| d.index).collect();
        let mut e = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_records",
            format!(
                "{} of {total} records are invalid; nothing was written",
                bad.len()
            ),
        );
        e.body.details = details;
        e
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<BufferError> for ApiError {
    fn from(e: BufferError) -> Self {
        match e {
            BufferError::Full { .. } => {
                let mut err = ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "buffer_full",
                    e.to_string(),
                );
                err.retry_after = Some(FULL_RETRY_AFTER_SECS);
                err
            }
            BufferError::DiskFull => {
                let mut err = ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "disk_full",
                    "the disk holding the buffer is full; nothing was written",
                );
                err.retry_after = Some(FULL_RETRY_AFTER_SECS);
                err
            }
            BufferError::Closed => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the agent is shutting down",
            ),
            other => {
                tracing::error!(message = "buffer error in request", error = %other);
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "buffer_error",
                    "the buffer could not store the records; nothing was written",
                )
            }
        }
    }
}

/// How long a request body may take to arrive and how large it may be.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub deadline: std::time::Duration,
    pub max_bytes: usize,
}

/// Middleware (`from_fn_with_state`) that reads each request body within its
/// deadline (408 otherwise) and size (413), before any handler runs. Without
/// it a client could hold a connection and a handler indefinitely by sending
/// its body slowly: the listener bounds only the headers.
pub async fn read_body_within(
    State(limits): State<BodyLimits>,
    request: Request,
    next: Next,
) -> Response {
    let BodyLimits {
        deadline,
        max_bytes: limit,
    } = limits;
    use http_body_util::BodyExt as _;
    let (parts, body) = request.into_parts();
    let read = http_body_util::Limited::new(body, limit).collect();
    let body = match tokio::time::timeout(deadline, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        // Answered before routing, so `count_requests` never sees them.
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            count_refused_body(parts.uri.path(), StatusCode::PAYLOAD_TOO_LARGE);
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "the request body exceeds ingest.max_request_bytes",
            )
            .into_response();
        }
        Ok(Err(error)) => {
            count_refused_body(parts.uri.path(), StatusCode::BAD_REQUEST);
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                format!("could not read the request body: {error}"),
            )
            .into_response();
        }
        Err(_) => {
            metrics::counter!("dcs_agent_request_body_timeouts_total").increment(1);
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within listen.body_timeout ({})",
                    humantime::format_duration(deadline)
                ),
            )
            .into_response();
            // The rest of the body is still on its way: this connection
            // cannot carry another request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(body)))
        .await
}

/// Counts a request refused for its body before the router matched it, in
/// `dcs_agent_requests_total` like every other answer. The route label is
/// the template the router would have matched: a raw path would let any
/// client create series.
fn count_refused_body(path: &str, status: StatusCode) {
    metrics::counter!(
        "dcs_agent_requests_total",
        "route" => route_template(path),
        "status" => status.as_u16().to_string()
    )
    .increment(1);
}

/// The route template of a local API path that takes a body.
fn route_template(path: &str) -> &'static str {
    match path {
        "/v1/records" => "/v1/records",
        "/v1/logs" => "/v1/logs",
        "/api/v1/jobs/trigger" => "/api/v1/jobs/trigger",
        p if p
            .strip_prefix("/v1/records/")
            .is_some_and(|id| !id.is_empty() && !id.contains('/')) =>
        {
            "/v1/records/{id}"
        }
        _ => "unmatched",
    }
}

fn body_error(rejection: BytesRejection) -> ApiError {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "request_too_large",
            "the request body exceeds ingest.max_request_bytes",
        )
    } else {
        ApiError::new(status, "unreadable_body", rejection.body_text())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Ndjson,
}

/// The request's `Content-Type` as sent (for error messages) and its media
/// type without parameters, lowercased (for matching).
pub(crate) fn media_type(headers: &HeaderMap) -> (&str, String) {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    (ct, mime)
}

fn content_format(headers: &HeaderMap) -> Result<Format, ApiError> {
    let (ct, mime) = media_type(headers);
    match mime.as_str() {
        "application/json" => Ok(Format::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(Format::Ndjson),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type {ct:?} is not supported; send application/json (one record or an array) or application/x-ndjson"
            ),
        )),
    }
}

/// One request's elements, each either a valid record or refused for the
/// reasons listed, in request order.
pub struct Parsed {
    pub total: usize,
    pub valid: Vec<(usize, Record)>,
    pub invalid: Vec<Invalid>,
}

/// An element that is not a valid record: its index, the text it was sent
/// as (kept in `dead_letters` under partial acceptance) and every reason.
pub struct Invalid {
    pub index: usize,
    pub raw: String,
    pub errors: Vec<FieldError>,
}

/// Parses and validates a whole request; returns records only if all are valid.
fn parse_records(
    body: &[u8],
    format: Format,
    limits: &Limits,
    schemas: &Schemas,
) -> Result<Vec<Record>, ApiError> {
    parse_elements(body, format, limits, schemas)?.all_or_nothing()
}

impl Parsed {
    /// The records if every element is valid, else a 400 naming each problem.
    pub(crate) fn all_or_nothing(self) -> Result<Vec<Record>, ApiError> {
        if self.invalid.is_empty() {
            return Ok(self.valid.into_iter().map(|(_, r)| r).collect());
        }
        count_records(std::iter::repeat_n(("invalid", "rejected"), self.total));
        let details = self.invalid.into_iter().flat_map(|i| i.errors).collect();
        Err(ApiError::invalid(details, self.total))
    }
}

/// Parses a request into its elements and validates each one; only a body
/// that cannot be split into elements at all is an error here.
fn parse_elements(
    body: &[u8],
    format: Format,
    limits: &Limits,
    schemas: &Schemas,
) -> Result<Parsed, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not UTF-8: {e}"),
        )
    })?;
    // Each element is first taken as raw JSON so that one malformed record is
    // reported against its index rather than failing the parse opaquely.
    let elements: Vec<(&str, Result<&RawValue, String>)> = match format {
        Format::Json => {
            let trimmed = text.trim_start();
            if trimmed.starts_with('[') {
                serde_json::from_str::<Vec<&RawValue>>(text)
                    .map_err(|e| malformed(&e))?
                    .into_iter()
                    .map(|raw| (raw.get(), Ok(raw)))
                    .collect()
            } else {
                let raw = serde_json::from_str::<&RawValue>(text).map_err(|e| malformed(&e))?;
                vec![(raw.get(), Ok(raw))]
            }
        }
        Format::Ndjson => text
            .split('\n')
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(n, line)| {
                let line = line.trim_end_matches('\r');
                (
                    line,
                    serde_json::from_str::<&RawValue>(line)
                        .map_err(|e| format!("line {}: invalid JSON: {e}", n + 1)),
                )
            })
            .collect(),
    };
    if elements.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "no_records",
            "the request holds no records",
        ));
    }
    let total = elements.len();
    let mut parsed = Parsed {
        total,
        valid: Vec::with_capacity(total),
        invalid: Vec::new(),
    };
    for (index, (text, element)) in elements.into_iter().enumerate() {
        let i = index as i64;
        let mut errors = Vec::new();
        match element {
            Err(reason) => errors.push(FieldError::new(i, "record", reason)),
            Ok(raw) if !raw.get().starts_with('{') => {
                errors.push(FieldError::new(i, "record", "must be a JSON object"))
            }
            Ok(raw) => match serde_json::from_str::<IncomingRecord>(raw.get()) {
                Ok(incoming) => {
                    if let Some(r) = record::validate_incoming(i, &incoming, limits, &mut errors) {
                        match schemas.check(&r.stream, &r.payload) {
                            Ok(()) => parsed.valid.push((index, r)),
                            Err(violations) => errors.extend(
                                violations
                                    .iter()
                                    .map(|v| FieldError::new(i, &v.field(), v.reason())),
                            ),
                        }
                    }
                }
                Err(e) => errors.push(FieldError::new(i, "record", e.to_string())),
            },
        }
        if !errors.is_empty() {
            parsed.invalid.push(Invalid {
                index,
                raw: text.to_owned(),
                errors,
            });
        }
    }
    Ok(parsed)
}

fn malformed(e: &serde_json::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "malformed_json",
        format!("the body is not valid JSON: {e}"),
    )
}

#[derive(Debug, Serialize)]
pub struct Accepted {
    /// Records newly buffered.
    pub accepted: usize,
    /// Records whose id was already known, so not buffered again.
    pub duplicates: usize,
    /// Records refused and written to `dead_letters` (partial acceptance
    /// only; always 0 otherwise, where one invalid record refuses all).
    pub rejected: usize,
    /// Sequence range of the newly buffered records.
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
    /// The id of every record in request order (assigned when absent);
    /// `null` for a rejected one.
    pub ids: Vec<Option<String>>,
    /// One entry per reason a record was rejected: index, field, reason.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<FieldError>,
}

/// Query parameters of `POST /v1/records`.
#[derive(Debug, Default, Deserialize)]
pub struct IngestQuery {
    /// Overrides `ingest.partial` for this request.
    partial: Option<bool>,
}

/// `?partial=` when given, else the listener's `ingest.partial`.
pub(crate) fn partial_mode(
    query: Result<Query<IngestQuery>, QueryRejection>,
    default: bool,
) -> Result<bool, ApiError> {
    match query {
        Ok(Query(q)) => Ok(q.partial.unwrap_or(default)),
        Err(rejection) => Err(ApiError {
            body: ErrorBody {
                details: vec![FieldError::new(
                    -1,
                    "partial",
                    format!("must be true or false ({})", rejection.body_text()),
                )],
                ..ErrorBody::new("invalid_query", "the query string is not valid")
            },
            status: StatusCode::BAD_REQUEST,
            retry_after: None,
        }),
    }
}

/// Decodes the body's `Content-Encoding` and parses it, on a blocking
/// thread: both inflating and validating are CPU work.
pub(crate) async fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "parser failed",
        )
    })?
}

async fn post_records(
    State(state): State<AppState>,
    query: Result<Query<IngestQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Accepted>, ApiError> {
    let format = content_format(&headers)?;
    let encoding = Encoding::from_headers(&headers)?;
    let partial = partial_mode(query, state.partial)?;
    let body = body.map_err(body_error)?;
    let limits = state.limits;
    let limit = state.max_request_bytes;
    let schemas = state.schemas.clone();
    let parsed = off_thread(move || {
        let body = body_encoding::decode(encoding, body, limit)?;
        parse_elements(&body, format, &limits, &schemas)
    })
    .await?;
    if partial {
        commit_partial(&state.buffer, parsed, "ingest").await
    } else {
        commit(&state.buffer, parsed.all_or_nothing()?).await
    }
    .map(Json)
}

/// Commits the valid records of `parsed` and dead-letters the invalid ones
/// in one transaction. `origin` names the API in the dead letters' ids
/// (`source:<origin>:<request>/<index>`) and is their stream.
pub(crate) async fn commit_partial(
    buffer: &Buffer,
    parsed: Parsed,
    origin: &str,
) -> Result<Accepted, ApiError> {
    let request = uuid::Uuid::now_v7();
    let records: Vec<Record> = parsed.valid.into_iter().map(|(_, r)| r).collect();
    let mut rejected = Vec::with_capacity(parsed.invalid.len());
    let mut details = Vec::new();
    for invalid in parsed.invalid {
        let reason = invalid
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.reason))
            .collect::<Vec<_>>()
            .join("; ");
        rejected.push((
            invalid.index,
            Rejected {
                position: format!("{request}/{}", invalid.index),
                raw: invalid.raw,
                reason,
            },
        ));
        details.extend(invalid.errors);
    }
    let total = parsed.total;
    let mut accepted = if rejected.is_empty() {
        commit(buffer, records).await?
    } else {
        let dead: Vec<Rejected> = rejected.iter().map(|(_, r)| r.clone()).collect();
        let streams: Vec<String> = records.iter().map(|r| r.stream.clone()).collect();
        let appended = buffer
            .append_partial(origin, records, dead)
            .await
            .inspect_err(|_| count_records(std::iter::repeat_n(("invalid", "rejected"), total)))?;
        count_records(std::iter::repeat_n(("invalid", "rejected"), rejected.len()));
        accepted_answer(&streams, appended)
    };
    // Rejected records hold their place in `ids` as null.
    let mut ids = vec![None; total];
    for (slot, id) in accepted_positions(&accepted, total, &rejected) {
        ids[slot] = id;
    }
    accepted.ids = ids;
    accepted.rejected = rejected.len();
    accepted.details = details;
    Ok(accepted)
}

/// Where each accepted id goes in the full request order.
fn accepted_positions(
    accepted: &Accepted,
    total: usize,
    rejected: &[(usize, Rejected)],
) -> Vec<(usize, Option<String>)> {
    let refused: std::collections::HashSet<usize> = rejected.iter().map(|(i, _)| *i).collect();
    (0..total)
        .filter(|i| !refused.contains(i))
        .zip(accepted.ids.iter().cloned())
        .collect()
}

/// Appends `records` (all valid) and answers with counts and ids.
pub(crate) async fn commit(buffer: &Buffer, records: Vec<Record>) -> Result<Accepted, ApiError> {
    let streams: Vec<String> = records.iter().map(|r| r.stream.clone()).collect();
    let appended = match buffer.append(records).await {
        Ok(a) => a,
        Err(e) => {
            count_records(streams.iter().map(|s| (s.as_str(), "rejected")));
            return Err(e.into());
        }
    };
    Ok(accepted_answer(&streams, appended))
}

fn accepted_answer(streams: &[String], appended: crate::buffer::Appended) -> Accepted {
    count_records(
        streams
            .iter()
            .zip(&appended.new)
            .map(|(s, new)| (s.as_str(), if *new { "accepted" } else { "duplicate" })),
    );
    let new_seqs = appended
        .seqs
        .iter()
        .zip(&appended.new)
        .filter(|(_, new)| **new)
        .map(|(s, _)| *s);
    let first_seq = new_seqs.clone().min();
    let last_seq = new_seqs.max();
    let accepted = appended.new.iter().filter(|n| **n).count();
    Accepted {
        accepted,
        duplicates: appended.new.len() - accepted,
        rejected: 0,
        first_seq,
        last_seq,
        ids: appended.ids.into_iter().map(Some).collect(),
        details: Vec::new(),
    }
}

#[derive(Debug, Serialize)]
pub struct RecordInfo {
    pub id: String,
    pub seq: i64,
    pub state: RecordState,
}

/// Idempotent ingest of one record under a producer-chosen id: the same id
/// twice is buffered once.
async fn put_record(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if let Err(reason) = record::validate_id(&id) {
        return Err(ApiError::invalid(vec![FieldError::new(0, "id", reason)], 1));
    }
    if content_format(&headers)? != Format::Json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "PUT takes one record as application/json",
        ));
    }
    let encoding = Encoding::from_headers(&headers)?;
    let body = body.map_err(body_error)?;
    let (limits, limit, schemas) = (state.limits, state.max_request_bytes, state.schemas.clone());
    let mut records = off_thread(move || {
        let body = body_encoding::decode(encoding, body, limit)?;
        parse_records(&body, Format::Json, &limits, &schemas)
    })
    .await?;
    if records.len() != 1 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "one_record_expected",
            "PUT takes exactly one record",
        ));
    }
    let mut rec = records.remove(0);
    match &rec.id {
        Some(body_id) if *body_id != id => {
            return Err(ApiError::invalid(
                vec![FieldError::new(0, "id", "must match the id in the URL")],
                1,
            ));
        }
        _ => rec.id = Some(id.clone()),
    }
    let appended = state.buffer.append(vec![rec]).await?;
    let new = appended.new[0];
    let seq = appended.seqs[0];
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let info = if new {
        RecordInfo {
            id,
            seq,
            state: RecordState::Buffered,
        }
    } else {
        lookup(&state, id.clone()).await?.unwrap_or(RecordInfo {
            id,
            seq,
            state: RecordState::Delivered,
        })
    };
    Ok((status, Json(info)).into_response())
}

async fn lookup(state: &AppState, id: String) -> Result<Option<RecordInfo>, ApiError> {
    let buffer = state.buffer.clone();
    let found = tokio::task::spawn_blocking({
        let id = id.clone();
        move || buffer.lookup(&id)
    })
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "lookup failed",
        )
    })??;
    Ok(found.map(|(seq, state)| RecordInfo { id, seq, state }))
}

async fn get_record(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RecordInfo>, ApiError> {
    lookup(&state, id.clone()).await?.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no record with id {id:?}: never buffered, evicted by drop-oldest, or delivered longer ago than the dedup window"
            ),
        )
    })
}

/// What `/metrics` and `/v1/status` report of the buffer.
struct BufferView {
    stats: crate::buffer::Stats,
    /// Age of the oldest buffered record; `None` when the buffer is empty.
    age_secs: Option<f64>,
    dead: crate::buffer::DeadLetterSummary,
}

/// Reads the parts of the buffer's state that need a query, off the async threads.
async fn buffer_view(buffer: &Buffer) -> Result<BufferView, ApiError> {
    let reader = buffer.clone();
    let (oldest, dead) = tokio::task::spawn_blocking(move || {
        Ok::<_, BufferError>((reader.oldest_received_us()?, reader.dead_letter_summary()?))
    })
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "read buffer state",
        )
    })??;
    let now = record::unix_micros(time::OffsetDateTime::now_utc());
    Ok(BufferView {
        stats: buffer.stats(),
        age_secs: oldest.map(|us| now.saturating_sub(us).max(0) as f64 / 1e6),
        dead,
    })
}

/// Prometheus exposition; buffer gauges are read from the buffer at scrape time
/// so they are exact, survive restarts and can never go negative.
async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let BufferView {
        stats,
        age_secs,
        dead,
    } = buffer_view(&state.buffer).await?;
    metrics::gauge!("dcs_agent_buffer_records").set(stats.records as f64);
    metrics::gauge!("dcs_agent_buffer_bytes").set(stats.bytes as f64);
    metrics::gauge!("dcs_agent_buffer_capacity_bytes").set(state.buffer.capacity_bytes() as f64);
    metrics::gauge!("dcs_agent_buffer_oldest_age_seconds").set(age_secs.unwrap_or(0.0));
    metrics::counter!("dcs_agent_records_dropped_total", "reason" => "drop_oldest")
        .absolute(stats.dropped_total);
    metrics::counter!("dcs_agent_records_delivered_total").absolute(stats.delivered_total);
    metrics::gauge!("dcs_agent_dead_letter_records").set(dead.records as f64);
    let body = dcs_shared::metrics::render(&state.metrics);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn ready(State(state): State<AppState>) -> Response {
    let stats = state.buffer.stats();
    if stats.bytes < state.buffer.capacity_bytes() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "buffer_full",
            "the buffer is at capacity",
        )
        .into_response()
    }
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub epoch: String,
    pub buffer: BufferStatus,
    pub dead_letters: crate::buffer::DeadLetterSummary,
    pub delivery: crate::forwarder::LinkStatus,
    /// One entry per damaged buffer file moved aside, with what it held and
    /// what was salvaged; empty on a healthy agent.
    pub quarantine: Vec<crate::recovery::Report>,
    /// Records salvaged from damaged buffer files, acknowledged to their
    /// producers and waiting in `recovered/` for delivery.
    pub recovered: crate::recovery::WaitingStatus,
}

#[derive(Debug, Serialize)]
pub struct BufferStatus {
    pub records: u64,
    pub bytes: u64,
    pub capacity_bytes: u64,
    pub oldest_age_secs: Option<u64>,
    pub dropped_total: u64,
    pub delivered_total: u64,
    /// Records moved to a new epoch because their key was taken at the
    /// aggregator (the buffer went back in time); never lost or dead-lettered.
    pub rekeyed_total: u64,
    /// Acknowledged records kept for a replay (`buffer.retain_delivered`),
    /// and their bytes; not part of `records`/`bytes`.
    pub retained: u64,
    pub retained_bytes: u64,
}

async fn status(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    let BufferView {
        stats,
        age_secs,
        dead,
    } = buffer_view(&state.buffer).await?;
    Ok(Json(Status {
        epoch: state.buffer.epoch().to_string(),
        buffer: BufferStatus {
            records: stats.records,
            bytes: stats.bytes,
            capacity_bytes: state.buffer.capacity_bytes(),
            oldest_age_secs: age_secs.map(|s| s as u64),
            dropped_total: stats.dropped_total,
            delivered_total: stats.delivered_total,
            rekeyed_total: stats.rekeyed_total,
            retained: stats.retained,
            retained_bytes: stats.retained_bytes,
        },
        dead_letters: dead,
        delivery: state.link.snapshot(),
        quarantine: state.quarantine.as_ref().clone(),
        recovered: state.recovered.status(),
    }))
}

#[cfg(test)]
mod tests;
