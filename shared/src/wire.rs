//! The batch wire format: the only place that knows the bytes on the network.
//!
//! A batch is one JSON document, gzip-compressed, sent as the body of
//! `POST /v1/batches` with `Content-Encoding: gzip`:
//!
//! ```json
//! {"v":1,"epoch":"<uuid>","backlog":{...},
//!  "records":[{"seq":1,"id":"…","stream":"…","ts":1700000000000000,"payload":{…}}]}
//! ```
//!
//! - `v` is the format version; a receiver refuses versions it does not know.
//! - `epoch` names the agent's buffer file; `(agent, epoch, seq)` is the record's
//!   delivery key, which makes redelivery idempotent.
//! - `ts` is microseconds since the Unix epoch.
//! - `received` (optional) is when the agent accepted the record, also in
//!   microseconds. It never changes for a buffered record, so it is the same
//!   on every redelivery: the aggregator partitions by it and keys on it.
//! - `payload` is the producer's JSON object text, written and read without
//!   re-serialisation.
//!
//! JSON was chosen over a binary format because gzip removes most of its
//! redundancy (repeated keys) and the payloads are JSON already; a binary
//! envelope would save little and cost a second schema.

use std::borrow::Cow;
use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::record::FieldError;

pub const FORMAT_VERSION: u32 = 1;
/// Path of the aggregator's batch endpoint.
pub const BATCHES_PATH: &str = "/v1/batches";

/// What the agent reports about its own buffer with every batch, so the center
/// sees a site's backlog even when only a trickle of batches gets through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backlog {
    pub records: u64,
    pub bytes: u64,
    /// Age in seconds of the oldest record still buffered.
    pub oldest_age_secs: u64,
    /// Records ever evicted by the `drop-oldest` overflow policy.
    pub dropped_total: u64,
}

/// A decoded batch, borrowing from the decompressed body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch<'a> {
    pub v: u32,
    pub epoch: Uuid,
    #[serde(default)]
    pub backlog: Option<Backlog>,
    #[serde(borrow)]
    pub records: Vec<WireRecord<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireRecord<'a> {
    pub seq: i64,
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub stream: Cow<'a, str>,
    pub ts: i64,
    /// When the agent accepted the record (µs); absent from older agents.
    #[serde(default)]
    pub received: Option<i64>,
    #[serde(borrow)]
    pub payload: &'a RawValue,
}

/// One record to encode; the payload is JSON text already validated at ingest.
#[derive(Debug, Clone, Copy)]
pub struct OutRecord<'a> {
    pub seq: i64,
    pub id: &'a str,
    pub stream: &'a str,
    pub ts_us: i64,
    pub payload: &'a str,
    /// When the agent accepted the record (µs since the Unix epoch).
    pub received: Option<i64>,
}

/// Encodes and gzip-compresses a batch. `level` is the gzip level (0–9); low
/// levels already shrink repetitive JSON several-fold at a fraction of the CPU.
pub fn encode_batch<'a>(
    epoch: Uuid,
    backlog: Option<&Backlog>,
    records: impl IntoIterator<Item = OutRecord<'a>>,
    level: u32,
) -> Vec<u8> {
    // The JSON reaches gzip in 64 KiB chunks: flate2 clears its output
    // buffer on every write, and a write per field made that the agent's
    // largest CPU cost (see docs/PERFORMANCE.md), while the whole batch's
    // JSON in one buffer (megabytes, grown by doubling) was the largest part
    // of the agent's heap during a drain.
    let gz = GzEncoder::new(Vec::with_capacity(64 * 1024), Compression::new(level));
    let mut json = std::io::BufWriter::with_capacity(JSON_CHUNK, gz);
    // Writing into a Vec cannot fail, hence the expects below.
    write_batch_json(&mut json, epoch, backlog, records).expect("write to memory");
    json.into_inner()
        .map_err(|e| e.into_error())
        .expect("compress in memory")
        .finish()
        .expect("finish gzip in memory")
}

/// How much batch JSON is handed to gzip per write.
const JSON_CHUNK: usize = 64 * 1024;

fn write_batch_json<'a>(
    w: &mut impl Write,
    epoch: Uuid,
    backlog: Option<&Backlog>,
    records: impl IntoIterator<Item = OutRecord<'a>>,
) -> std::io::Result<()> {
    write!(w, r#"{{"v":{FORMAT_VERSION},"epoch":"{epoch}","#)?;
    if let Some(b) = backlog {
        w.write_all(br#""backlog":"#)?;
        serde_json::to_writer(&mut *w, b)?;
        w.write_all(b",")?;
    }
    w.write_all(br#""records":["#)?;
    for (i, r) in records.into_iter().enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        write!(w, r#"{{"seq":{},"id":"#, r.seq)?;
        serde_json::to_writer(&mut *w, r.id)?;
        w.write_all(br#","stream":"#)?;
        serde_json::to_writer(&mut *w, r.stream)?;
        write!(w, r#","ts":{},"#, r.ts_us)?;
        if let Some(received) = r.received {
            write!(w, r#""received":{received},"#)?;
        }
        w.write_all(br#""payload":"#)?;
        w.write_all(r.payload.as_bytes())?;
        w.write_all(b"}")?;
    }
    w.write_all(b"]}")
}

/// Why a batch body could not be decoded. Decoding has an error of its own,
/// apart from the crate's [`crate::Error`] (files and TLS): the aggregator
/// maps each case to its answer, and the fuzz targets accept exactly these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The decompressed batch would exceed the limit (a gzip bomb or a
    /// misconfigured agent); the aggregator answers 413.
    #[error("batch exceeds {limit} bytes once decompressed")]
    TooLarge { limit: usize },
    /// Not gzip, truncated, or not the batch JSON shape; 400.
    #[error("malformed batch: {0}")]
    Malformed(String),
    /// A format version this build does not speak; 400 naming it.
    #[error("unsupported batch format version {0} (this build speaks version {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
}

/// Decompresses a gzip body, refusing to produce more than `limit` bytes. Reading
/// stops at the limit, so a gzip bomb costs at most `limit` bytes of memory.
pub fn gunzip_limited(body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    // One byte past the limit tells "too large" from "exactly the limit";
    // saturating, so a limit of usize::MAX means no limit rather than 0.
    let mut decoder = GzDecoder::new(body).take((limit as u64).saturating_add(1));
    decoder
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Malformed(format!("gzip: {e}")))?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge { limit });
    }
    Ok(out)
}

/// Parses a decompressed batch.
pub fn parse_batch(json: &[u8]) -> Result<Batch<'_>, DecodeError> {
    // Peek at the version first so that a future format gets a clear
    // "unsupported version" rather than a confusing field error.
    #[derive(Deserialize)]
    struct VersionOnly {
        v: u32,
    }
    if let Ok(VersionOnly { v }) = serde_json::from_slice::<VersionOnly>(json)
        && v != FORMAT_VERSION
    {
        return Err(DecodeError::UnsupportedVersion(v));
    }
    serde_json::from_slice(json).map_err(|e| DecodeError::Malformed(e.to_string()))
}

/// The aggregator's per-record checks of a parsed batch, the one copy of
/// them: the aggregator refuses a batch when this finds anything, and the
/// fuzz targets call it to learn what the aggregator accepts. Every problem
/// of every record is reported, in record order; `index` is the seq.
///
/// - `seq` is at least 1, below `i64::MAX`, and greater than the previous
///   record's (an agent sends its buffer in seq order, and the aggregator
///   claims a batch's `first..=last`);
/// - `id`, `stream` and `payload` pass the record checks the agent applied
///   when it took the record in ([`crate::record`]).
pub fn check_records(
    records: &[WireRecord<'_>],
    limits: &crate::record::Limits,
) -> Vec<FieldError> {
    use crate::record;
    let mut problems = Vec::new();
    let mut previous = 0;
    for r in records {
        if r.seq < 1 || r.seq == i64::MAX {
            problems.push(FieldError::new(
                r.seq,
                "seq",
                "must be at least 1 and below 9223372036854775807",
            ));
        } else if r.seq <= previous {
            problems.push(FieldError::new(
                r.seq,
                "seq",
                "must be greater than the previous record's seq",
            ));
        }
        previous = previous.max(r.seq);
        if let Err(reason) = record::validate_id(&r.id) {
            problems.push(FieldError::new(r.seq, "id", reason));
        }
        if let Err(reason) = record::validate_stream(&r.stream) {
            problems.push(FieldError::new(r.seq, "stream", reason));
        }
        if let Err(reason) = record::validate_payload(r.payload.get(), limits) {
            problems.push(FieldError::new(r.seq, "payload", reason));
        }
    }
    problems
}

/// The `error` codes of the agents' batch API ([`ErrorBody::error`]): the
/// aggregator answers with them and the forwarder branches on them, so both
/// tiers use this one list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The client certificate carries no valid identity (403).
    BadIdentity,
    /// The agent, its certificate or its tenant may not send (403).
    Revoked,
    /// A body not sent as gzip (415).
    UnsupportedEncoding,
    /// A content type other than JSON (415).
    UnsupportedMediaType,
    /// Too many records or bytes; the agent halves the batch (413).
    BatchTooLarge,
    /// The body did not arrive in time (408).
    RequestTimeout,
    /// The body could not be read (400).
    BodyReadFailed,
    /// Not a batch: bad gzip or JSON (400).
    MalformedBatch,
    /// A batch format version this aggregator does not speak (400).
    UnsupportedVersion,
    /// Some records fail the checks; `details` names them by seq (422).
    InvalidRecords,
    /// PostgreSQL refused some record's data (422).
    RejectedByDatabase,
    /// Some keys hold other records; `details` lists their seqs (409).
    ContentConflict,
    /// PostgreSQL is down or the commit's outcome is unknown (503).
    DatabaseUnavailable,
    /// This agent already has its share of batches in progress (429).
    TooManyInFlight,
    /// The tenant's or the aggregator's capacity is in use (503).
    Overloaded,
    /// The database does not answer (503).
    NotReady,
    /// No such route (404).
    NotFound,
    /// The admin `/agents` without its token (401).
    Unauthorized,
    /// The admin `/agents` refused (403).
    Forbidden,
    /// A method the route does not take (405).
    MethodNotAllowed,
    /// A bug; nothing was written (500).
    Internal,
}

impl ErrorCode {
    /// Every code, for tests and documentation checks.
    pub const ALL: [ErrorCode; 21] = [
        ErrorCode::BadIdentity,
        ErrorCode::Revoked,
        ErrorCode::UnsupportedEncoding,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::BatchTooLarge,
        ErrorCode::RequestTimeout,
        ErrorCode::BodyReadFailed,
        ErrorCode::MalformedBatch,
        ErrorCode::UnsupportedVersion,
        ErrorCode::InvalidRecords,
        ErrorCode::RejectedByDatabase,
        ErrorCode::ContentConflict,
        ErrorCode::DatabaseUnavailable,
        ErrorCode::TooManyInFlight,
        ErrorCode::Overloaded,
        ErrorCode::NotReady,
        ErrorCode::NotFound,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Internal,
    ];

    /// The code as it travels in [`ErrorBody::error`].
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadIdentity => "bad_identity",
            ErrorCode::Revoked => "revoked",
            ErrorCode::UnsupportedEncoding => "unsupported_encoding",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::BatchTooLarge => "batch_too_large",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::BodyReadFailed => "body_read_failed",
            ErrorCode::MalformedBatch => "malformed_batch",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::InvalidRecords => "invalid_records",
            ErrorCode::RejectedByDatabase => "rejected_by_database",
            ErrorCode::ContentConflict => "content_conflict",
            ErrorCode::DatabaseUnavailable => "database_unavailable",
            ErrorCode::TooManyInFlight => "too_many_in_flight",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code named by `text`, if it is one of ours.
    pub fn parse(text: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == text)
    }

    /// Refused for what some of the batch's records hold, not for the batch
    /// as a whole: the agent halves the batch until the blamed records stand
    /// alone, and only they become dead letters.
    pub fn blames_records(self) -> bool {
        matches!(
            self,
            ErrorCode::InvalidRecords | ErrorCode::RejectedByDatabase
        )
    }
}

/// The aggregator's answer to a batch, sent only after the transaction committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchAck {
    /// Records newly written.
    pub accepted: u64,
    /// Records that were already stored (a redelivery); not written again.
    pub duplicates: u64,
    /// The highest seq stored for the batch's epoch, after this batch. An
    /// agent that has not yet assigned that seq knows its buffer went back
    /// in time (a snapshot revert, a restored backup, a lost WAL) and moves
    /// to a new epoch before it reuses a delivered seq. Absent from
    /// aggregators older than the field, and for an epoch with no record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_seq: Option<i64>,
    /// The latest replay an operator asked for (`dcs-aggregator replay`),
    /// typically after restoring PostgreSQL to a point in time: records an
    /// agent acknowledged after `since_us` may be gone from the database, and
    /// an agent that retains delivered records (`buffer.retain_delivered`)
    /// sends them again, once per `id`. Redelivery is idempotent, so records
    /// that survived the restore are counted as duplicates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<Replay>,
}

/// See [`BatchAck::replay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replay {
    /// Increases with every request; an agent acts on each id once.
    pub id: i64,
    /// Microseconds since the Unix epoch, the database's clock: records
    /// acknowledged from then on are sent again.
    pub since_us: i64,
}

impl BatchAck {
    pub fn new(accepted: u64, duplicates: u64) -> Self {
        BatchAck {
            accepted,
            duplicates,
            high_seq: None,
            replay: None,
        }
    }
}

/// The JSON body of every error response on both tiers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable machine-readable code, e.g. `invalid_records`, `buffer_full`.
    pub error: String,
    /// A sentence for humans.
    pub message: String,
    /// Per-record problems, when the error is about records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<FieldError>,
}

impl ErrorBody {
    pub fn new(error: &str, message: impl Into<String>) -> Self {
        ErrorBody {
            error: error.to_owned(),
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn with_details(mut self, details: Vec<FieldError>) -> Self {
        self.details = details;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_reads_back_as_itself_and_unknown_text_is_none() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::parse("no_such_code"), None);
        // docs/API.md's table is read literally by operators and checkers.
        let api = include_str!("../../docs/API.md");
        for code in ErrorCode::ALL {
            assert!(
                api.contains(&format!("| `{}` |", code.as_str())),
                "docs/API.md's batch API table lacks `{}`",
                code.as_str()
            );
        }
        let blaming: Vec<_> = ErrorCode::ALL
            .into_iter()
            .filter(|c| c.blames_records())
            .collect();
        assert_eq!(
            blaming,
            [ErrorCode::InvalidRecords, ErrorCode::RejectedByDatabase]
        );
    }

    #[test]
    fn check_records_reports_every_problem_of_every_record_by_seq() {
        let json = br#"{"v":1,"epoch":"0193a4c2-7d0e-7000-8000-000000000000","records":[
            {"seq":1,"id":"a","stream":"ok","ts":0,"payload":{}},
            {"seq":1,"id":"b","stream":"ok","ts":0,"payload":{}},
            {"seq":3,"id":"","stream":"Not Valid","ts":0,"payload":[1]},
            {"seq":0,"id":"d","stream":"ok","ts":0,"payload":{}},
            {"seq":9223372036854775807,"id":"e","stream":"ok","ts":0,"payload":{}}]}"#;
        let batch = parse_batch(json).unwrap();
        let problems = check_records(&batch.records, &crate::record::Limits::default());
        let found: Vec<(i64, &str)> = problems
            .iter()
            .map(|p| (p.index, p.field.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (1, "seq"),
                (3, "id"),
                (3, "stream"),
                (3, "payload"),
                (0, "seq"),
                (i64::MAX, "seq"),
            ]
        );
        let good = br#"{"v":1,"epoch":"0193a4c2-7d0e-7000-8000-000000000000","records":[
            {"seq":1,"id":"a","stream":"ok","ts":0,"payload":{}},
            {"seq":5,"id":"b","stream":"ok","ts":0,"payload":{"n":1}}]}"#;
        let batch = parse_batch(good).unwrap();
        assert!(check_records(&batch.records, &crate::record::Limits::default()).is_empty());
    }

    fn sample() -> Vec<u8> {
        let recs = [
            OutRecord {
                seq: 1,
                id: "a",
                stream: "s",
                ts_us: 5,
                payload: r#"{"x":"quote\" and \\ backslash"}"#,
                received: Some(1_700_000_000_000_123),
            },
            OutRecord {
                seq: 2,
                id: "ü\"",
                stream: "s.t",
                ts_us: -1,
                payload: r#"{}"#,
                received: None,
            },
        ];
        let backlog = Backlog {
            records: 2,
            bytes: 40,
            oldest_age_secs: 3,
            dropped_total: 0,
        };
        encode_batch(Uuid::nil(), Some(&backlog), recs, 1)
    }

    #[test]
    fn a_batch_survives_the_round_trip_with_payloads_untouched() {
        let json = gunzip_limited(&sample(), 1 << 20).unwrap();
        let batch = parse_batch(&json).unwrap();
        assert_eq!(batch.v, 1);
        assert_eq!(batch.backlog.unwrap().records, 2);
        assert_eq!(batch.records.len(), 2);
        assert_eq!(
            batch.records[0].payload.get(),
            r#"{"x":"quote\" and \\ backslash"}"#
        );
        assert_eq!(batch.records[1].id, "ü\"");
        assert_eq!(batch.records[1].ts, -1);
        assert_eq!(batch.records[0].received, Some(1_700_000_000_000_123));
        assert_eq!(batch.records[1].received, None, "optional on the wire");
    }

    #[test]
    fn decompression_stops_at_the_limit() {
        let bomb = encode_batch(
            Uuid::nil(),
            None,
            (0..10_000).map(|i| OutRecord {
                seq: i,
                id: "id",
                stream: "s",
                ts_us: 0,
                payload: "{}",
                received: None,
            }),
            9,
        );
        assert!(matches!(
            gunzip_limited(&bomb, 1000),
            Err(DecodeError::TooLarge { limit: 1000 })
        ));
    }

    #[test]
    fn the_largest_limit_means_no_limit() {
        let json = gunzip_limited(&sample(), usize::MAX).unwrap();
        assert!(parse_batch(&json).is_ok());
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        assert!(matches!(
            gunzip_limited(b"not gzip at all", 1000),
            Err(DecodeError::Malformed(_))
        ));
        let truncated = &sample()[..20];
        assert!(gunzip_limited(truncated, 1 << 20).is_err());
        assert!(matches!(
            parse_batch(br#"{"v":1,"records":"#),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn an_unknown_version_is_named() {
        assert!(matches!(
            parse_batch(br#"{"v":7,"epoch":"x","records":[],"new":1}"#),
            Err(DecodeError::UnsupportedVersion(7))
        ));
    }
}
