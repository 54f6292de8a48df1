//! `POST /v1/batches`: an agent's batch, from the deny list to the commit.
//!
//! Design constraints:
//! - Cheap checks first: the deny list, headers, then the agent's share of
//!   batches in progress, then the body under a size cap and a time limit,
//!   then decompression and validation on a blocking thread, and only then a
//!   database slot within the tenant's share (see [`crate::admission`]): a
//!   slow body never holds a database slot, and every byte a batch holds is
//!   reserved from the memory budget first.
//! - The database write runs in its own task, so an agent that disconnects
//!   mid-request cannot cancel a transaction (or a COPY) half-way.
//! - 2xx only after the commit for a non-empty batch; an empty batch only
//!   reads the epoch's `high_seq`.

use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;
use dcs_shared::identity::AgentIdentity;
use dcs_shared::record;
use dcs_shared::wire::{self, BatchAck, DecodeError};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tracing::{debug, error, info, warn};

use super::renewal::record_certificate;
use super::{AppState, Error};
use crate::admission::{self, Admission, MemoryPermit};
use crate::config::LimitsConfig;
use crate::connection::PresentedCertificate;
use crate::revocation::Verdict;
use crate::store::{self, CopyRows, Failure, PreparedBatch};

/// Enough to tell a producer what is wrong with its records; a batch of
/// 100 000 bad records would otherwise produce a reply of several MiB.
pub(super) const MAX_ERROR_DETAILS: usize = 100;

/// Every value of `dcs_aggregator_batches_total{outcome}`.
pub(super) const BATCH_OUTCOMES: [&str; 9] = [
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

pub(super) async fn post_batch(
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

pub(super) fn check_headers(headers: &HeaderMap, limits: &LimitsConfig) -> Result<(), Error> {
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
pub(super) async fn read_body(
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
pub(super) fn prepare(
    compressed: &[u8],
    limits: &LimitsConfig,
    reserved: u64,
) -> Result<PreparedBatch, Error> {
    let json = wire::gunzip_limited(compressed, reserved as usize).map_err(|error| {
        match error {
            // A gzip trailer states the decompressed size; a body larger than
            // it says is corrupt, not merely large.
            DecodeError::TooLarge { .. } if reserved < limits.max_decompressed_bytes.0 => {
                Error::Malformed(
                    "gzip: the body decompresses to more than its trailer states".into(),
                )
            }
            DecodeError::TooLarge { .. } => Error::BatchTooLarge(format!(
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

fn wire_error(error: DecodeError) -> Error {
    match error {
        DecodeError::TooLarge { limit } => {
            Error::BatchTooLarge(format!("the batch exceeds {limit} bytes once decompressed"))
        }
        DecodeError::Malformed(m) => Error::Malformed(m),
        DecodeError::UnsupportedVersion(v) => Error::UnsupportedVersion(v),
    }
}
