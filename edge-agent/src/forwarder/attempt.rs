//! One delivery attempt: the POST of a gzip batch and its answer sorted
//! into an [`Outcome`] the caller acts on.
//!
//! Invariants: a 2xx is `Delivered` whatever its body says (the aggregator
//! answers 2xx only after its commit); the answer's `error` code, not its
//! text, decides between per-record blame, a conflict and the rest; a
//! connection the aggregator closed gracefully is resent at once, a
//! bounded number of times, without counting as a failure.

use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;

use dcs_shared::wire::{BatchAck, ErrorBody, ErrorCode};

use super::Inner;

/// How one delivery attempt ended.
#[derive(Debug)]
pub(super) enum Outcome {
    Delivered(BatchAck),
    /// Worth retrying after a delay; the link is down if `link_down`.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
        link_down: bool,
    },
    /// The aggregator does not accept this agent right now.
    Unauthorized(String),
    TooLarge(String),
    /// Refused for good. `per_record` when the aggregator blamed some of the
    /// batch's records (invalid or refused by PostgreSQL), so the others can
    /// still be delivered.
    Permanent {
        reason: String,
        per_record: bool,
    },
    /// These seqs' keys hold other records at the aggregator.
    Conflict {
        seqs: Vec<i64>,
        reason: String,
    },
}

impl Outcome {
    pub(super) fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered(_) => "delivered",
            Outcome::Retry { .. } => "retry",
            Outcome::Unauthorized(_) => "unauthorized",
            Outcome::TooLarge(_) => "too_large",
            Outcome::Permanent { .. } => "rejected",
            Outcome::Conflict { .. } => "conflict",
        }
    }

    /// Worth sending again after a wait: the batch was not refused for good.
    pub(super) fn is_retry(&self) -> bool {
        matches!(self, Outcome::Retry { .. } | Outcome::Unauthorized(_))
    }
}

/// Immediate resends of a batch whose connection the aggregator closed
/// gracefully; more in a row means something else is wrong.
const GRACEFUL_CLOSE_RESENDS: usize = 3;

impl Inner {
    /// Posts one gzip batch body and sorts the answer.
    pub(super) async fn post(&self, body: Bytes) -> Outcome {
        let mut response = self.send(body.clone()).await;
        // The aggregator closes connections gracefully (max connection age,
        // drain before stop) so a balancer can move agents. A batch caught by
        // that close is resent at once on a new connection: it is not a
        // failure, so no retry is counted, no backoff taken, the link stays
        // up. The (agent, epoch, seq) key makes the resend harmless. Bounded,
        // so a replica that closes every connection is a failure again.
        for _ in 0..GRACEFUL_CLOSE_RESENDS {
            match &response {
                Err(e) if closed_gracefully(e) => {
                    tracing::debug!(message = "connection closed by the aggregator; resending on a new one", error = %error_chain(e));
                    metrics::counter!("dcs_agent_graceful_resends_total").increment(1);
                    response = self.send(body.clone()).await;
                }
                _ => break,
            }
        }
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Retry {
                    reason: format!("send batch: {}", error_chain(&e)),
                    retry_after: None,
                    link_down: true,
                };
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response.text().await.unwrap_or_default();
        if status.is_success() {
            // A 2xx means committed; an unreadable body does not change that.
            let ack = serde_json::from_str(&text).unwrap_or(BatchAck::new(0, 0));
            return Outcome::Delivered(ack);
        }
        let body = serde_json::from_str::<ErrorBody>(&text).ok();
        let (reason, per_record) = match &body {
            Some(body) => (
                format!("{status}: {}: {}", body.error, body.message),
                ErrorCode::parse(&body.error).is_some_and(ErrorCode::blames_records),
            ),
            None => (
                format!("{status}: {}", text.chars().take(200).collect::<String>()),
                false,
            ),
        };
        if let Some(body) = body
            && ErrorCode::parse(&body.error) == Some(ErrorCode::ContentConflict)
        {
            let seqs = body
                .details
                .iter()
                .filter(|d| d.field == "seq")
                .map(|d| d.index)
                .collect();
            return Outcome::Conflict { seqs, reason };
        }
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Outcome::Unauthorized(reason),
            StatusCode::PAYLOAD_TOO_LARGE => Outcome::TooLarge(reason),
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => Outcome::Retry {
                reason,
                retry_after,
                link_down: false,
            },
            s if s.is_server_error() => Outcome::Retry {
                reason,
                retry_after,
                link_down: false,
            },
            _ => Outcome::Permanent { reason, per_record },
        }
    }

    async fn send(&self, body: Bytes) -> reqwest::Result<reqwest::Response> {
        self.client
            .current()
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::CONTENT_ENCODING, "gzip")
            .body(body)
            .send()
            .await
    }
}

/// Whether a send failed only because the server closed its connection on
/// purpose: an HTTP/2 GOAWAY without an error (or the stream it refused), or
/// an HTTP/1.1 connection closed after `Connection: close` before our request
/// got an answer. Timeouts, refused connections and TLS errors are not.
fn closed_gracefully(e: &reqwest::Error) -> bool {
    if e.is_timeout() || e.is_connect() {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = source {
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>()
            && (hyper.is_incomplete_message() || hyper.is_canceled())
        {
            return true;
        }
        // h2's errors are not reachable by type from here; their text is
        // stable: GOAWAY with NO_ERROR, and a stream refused before any
        // processing (both safe to resend by the protocol's definition).
        let text = cause.to_string();
        if text.contains("not a result of an error")
            || text.contains("refused stream before processing")
        {
            return true;
        }
        source = cause.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
