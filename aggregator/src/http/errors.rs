//! Every failure of the two listeners as one status, one `error` code
//! ([`ErrorCode`]) and, for what a retry can fix, `Retry-After`.
//!
//! Design constraints:
//! - The status tells the agent what to do with the batch: 2xx = stored (only
//!   after commit), 503 + `Retry-After` = keep it and retry, other 4xx = it can
//!   never be stored (dead-letter it), 5xx = our bug (retry with backoff).
//! - Every error body is a [`dcs_shared::wire::ErrorBody`]; database details
//!   are logged, never sent.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dcs_shared::record::FieldError;
use dcs_shared::wire::{self, ErrorBody, ErrorCode};

use crate::admission::Refusal;
use crate::revocation::Denied;

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
    pub(super) fn status_code_message(&self) -> (StatusCode, ErrorCode, String) {
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
