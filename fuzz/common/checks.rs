//! The bodies of the fuzz targets. Both `fuzz_targets/*.rs` (nightly,
//! libFuzzer) and `tests/tests/fuzz_corpus.rs` (stable, every test run)
//! include this file, so the corpus replay runs exactly the fuzzed code.
//!
//! Each function must return normally for every input: refusing an input is
//! fine, a panic (including a failed assertion below) is a bug. The
//! assertions state what must hold between the two tiers: what the agent
//! accepts, the aggregator accepts unchanged after a trip through the wire
//! format.

use dcs_shared::record::{self, IncomingRecord, Limits};
use dcs_shared::wire::{self, FORMAT_VERSION, OutRecord};
use serde_json::value::RawValue;

/// Decompression cap of `batch_decode`: room for every seed, small enough
/// that a bomb costs the fuzzer little.
pub const MAX_DECOMPRESSED: usize = 1 << 20;

/// Id the agent would assign to a record sent without one (any valid id).
const ASSIGNED_ID: &str = "0193a4c2-7d0e-7000-8000-000000000000";

/// A batch body as the aggregator receives it: gzip, decompressed under a
/// cap, parsed, each record checked. The bytes are also parsed as if already
/// decompressed, which lets mutations reach the parser directly.
pub fn batch_decode(data: &[u8]) {
    match wire::gunzip_limited(data, MAX_DECOMPRESSED) {
        Ok(json) => {
            assert!(
                json.len() <= MAX_DECOMPRESSED,
                "gunzip_limited exceeded its cap"
            );
            batch_json(&json);
        }
        Err(wire::DecodeError::Malformed(_) | wire::DecodeError::TooLarge { .. }) => {}
        Err(other) => panic!("gunzip_limited failed with an unexpected error: {other}"),
    }
    batch_json(data);
}

/// Whether a batch's decompressed JSON is one the aggregator would accept
/// (parse and per-record checks); runs the same assertions as
/// [`batch_decode`].
pub fn batch_json(json: &[u8]) -> bool {
    let Ok(batch) = wire::parse_batch(json) else {
        return false;
    };
    assert_eq!(
        batch.v, FORMAT_VERSION,
        "parse_batch accepted another version"
    );
    // The aggregator's own checks (aggregator/src/http/batches.rs `prepare`).
    let valid = wire::check_records(&batch.records, &Limits::default()).is_empty();
    for r in &batch.records {
        let _ = record::format_ts(r.ts);
    }
    if valid {
        // What the aggregator accepts, an agent can send again unchanged.
        let records: Vec<OutRecord<'_>> = batch
            .records
            .iter()
            .map(|r| OutRecord {
                seq: r.seq,
                id: &r.id,
                stream: &r.stream,
                ts_us: r.ts,
                payload: r.payload.get(),
                received: r.received,
            })
            .collect();
        let body = wire::encode_batch(
            batch.epoch,
            batch.backlog.as_ref(),
            records.iter().copied(),
            1,
        );
        let again = wire::gunzip_limited(&body, 4 * json.len() + 4096)
            .expect("a re-encoded batch decompresses");
        let parsed = wire::parse_batch(&again).expect("a re-encoded batch parses");
        assert_eq!(parsed.epoch, batch.epoch);
        assert_eq!(parsed.backlog, batch.backlog);
        assert_eq!(parsed.records.len(), records.len());
        for (p, r) in parsed.records.iter().zip(&records) {
            assert_eq!(
                (p.seq, &*p.id, &*p.stream, p.ts, p.payload.get()),
                (r.seq, r.id, r.stream, r.ts_us, r.payload),
                "a record changed in the round trip"
            );
        }
    }
    valid
}

/// Untrusted record text as the agent receives it, plus the validators on
/// their own.
pub fn record_validate(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    record_text(text);
    // validate_payload's contract is well-formed JSON of any kind.
    if let Ok(raw) = serde_json::from_str::<&RawValue>(text) {
        let _ = record::validate_payload(raw.get(), &Limits::default());
    }
    let _ = record::validate_stream(text);
    let _ = record::validate_id(text);
    let _ = record::parse_ts(text);
}

/// Whether one record's JSON passes the agent's checks (ingest.rs: an object,
/// an `IncomingRecord`, `validate_incoming`); runs the same assertions as
/// [`record_validate`].
pub fn record_text(text: &str) -> bool {
    let Ok(incoming) = serde_json::from_str::<IncomingRecord<'_>>(text) else {
        return false;
    };
    let limits = Limits::default();
    let mut errors = Vec::new();
    let Some(rec) = record::validate_incoming(3, &incoming, &limits, &mut errors) else {
        assert!(!errors.is_empty(), "a refused record names no problem");
        assert!(
            errors.iter().all(|e| e.index == 3),
            "a problem names the wrong index"
        );
        return false;
    };
    assert!(
        errors.is_empty(),
        "an accepted record has problems: {errors:?}"
    );

    // The record goes out in a batch exactly as the forwarder sends it, and
    // the aggregator must take it as it is: anything else is a record that
    // is acknowledged to the producer and then refused upstream.
    let id = rec.id.as_deref().unwrap_or(ASSIGNED_ID);
    let out = OutRecord {
        seq: 1,
        id,
        stream: &rec.stream,
        ts_us: rec.ts_us.unwrap_or(0),
        payload: &rec.payload,
        received: None,
    };
    let body = wire::encode_batch(uuid::Uuid::nil(), None, [out], 1);
    let json = wire::gunzip_limited(&body, 2 * text.len() + 4096)
        .expect("the batch of an accepted record decompresses");
    assert!(
        batch_json(&json),
        "the aggregator refuses a record the agent accepted: {text}"
    );
    let batch = wire::parse_batch(&json).expect("checked above");
    let r = &batch.records[0];
    assert_eq!(
        (&*r.id, &*r.stream, r.ts, r.payload.get()),
        (id, rec.stream.as_str(), out.ts_us, rec.payload.as_str())
    );
    true
}

/// An untrusted `POST /v1/logs` body (already decompressed), decoded both
/// as OTLP protobuf and as OTLP JSON, then mapped to records. Whatever the
/// receiver maps to a valid record must pass the checks every pushed record
/// passes, so the aggregator takes it; every log record is either a record
/// or refused with a reason.
pub fn otlp_decode(data: &[u8]) {
    use dcs_edge::otlp::{self, Format};
    let config = dcs_edge::config::OtlpConfig::default();
    let limits = Limits::default();
    let schemas = dcs_edge::schema::Schemas::default();
    for format in [Format::Protobuf, Format::Json] {
        let Ok(request) = otlp::decode_request(data, format) else {
            continue;
        };
        let parsed = otlp::to_records(&request, &config, &limits, &schemas);
        let log_records: usize = request
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .map(|s| s.log_records.len())
            .sum();
        assert_eq!(parsed.total, log_records, "a log record went missing");
        assert_eq!(
            parsed.valid.len() + parsed.invalid.len(),
            log_records,
            "a log record is neither a record nor refused"
        );
        for invalid in &parsed.invalid {
            assert!(!invalid.errors.is_empty(), "a refusal names no reason");
        }
        for (_, r) in &parsed.valid {
            assert!(record::validate_stream(&r.stream).is_ok(), "{}", r.stream);
            assert!(
                record::validate_payload(&r.payload, &limits).is_ok(),
                "a mapped payload the aggregator would refuse: {}",
                r.payload
            );
            let text = format!(r#"{{"stream":"{}","payload":{}}}"#, r.stream, r.payload);
            assert!(
                record_text(&text),
                "the agent's own checks refuse a mapped record: {text}"
            );
        }
    }
}
