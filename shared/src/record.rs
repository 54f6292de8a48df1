//! The record model and the one validator both tiers apply.
//!
//! A producer sends records as JSON; the agent validates every record of a
//! request before it writes any of them, and the aggregator validates again with
//! this same code so that a record PostgreSQL would refuse can never reach the
//! database and poison a retry loop.
//!
//! Payloads are kept as the JSON text the producer sent (a [`RawValue`]); they are
//! never re-serialised, so what arrives in PostgreSQL is what was pushed.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Longest stream name: long enough for `site.subsystem.kind` names, short enough
/// to keep the PostgreSQL index on (tenant, stream, ts) compact.
pub const MAX_STREAM_LEN: usize = 64;
/// Longest producer-supplied id: fits a UUID, a ULID or a hash with a prefix.
pub const MAX_ID_LEN: usize = 128;
/// Default payload limit. Records are events, not files; large blobs belong elsewhere.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// PostgreSQL's `numeric` (which backs jsonb numbers) refuses very large exponents;
/// we refuse them first so a batch never fails inside the database.
const MAX_NUMBER_EXPONENT: u32 = 1000;
/// Digits `numeric` keeps after the decimal point (`NUMERIC_DSCALE_MAX`); one
/// more and PostgreSQL answers "value overflows numeric format".
const NUMERIC_MAX_SCALE: i64 = 16383;
/// Digits `numeric` holds before the decimal point (weight 32767 in base 10000).
const NUMERIC_MAX_INTEGER_DIGITS: i64 = 131_072;
/// Deepest nesting of objects and arrays in a payload. PostgreSQL parses jsonb
/// recursively and refuses deep documents with "stack depth limit exceeded"
/// (about 10 000 levels at the default `max_stack_depth`, about 500 at its
/// 100kB minimum) — an error no retry can cure. No real event nests this deep.
pub const MAX_NESTING_DEPTH: usize = 256;

/// Limits a validator enforces; both tiers load them from their configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_payload_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

/// One record as a producer sends it. Every field is kept raw so that a wrong type
/// is reported against its field rather than as an opaque parse error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingRecord<'a> {
    #[serde(borrow, default)]
    pub stream: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub ts: Option<&'a RawValue>,
}

/// A record that passed validation, ready to be buffered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Producer's idempotency key, or `None` when the agent must assign one.
    pub id: Option<String>,
    pub stream: String,
    /// Event time in microseconds since the Unix epoch (UTC).
    pub ts_us: Option<i64>,
    /// The payload's JSON text, an object.
    pub payload: String,
}

/// Why one field of one record was refused. `index` is the record's position in
/// the request (agent) or its sequence number (aggregator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub index: i64,
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(index: i64, field: &str, reason: impl Into<String>) -> Self {
        FieldError {
            index,
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Validates one incoming record, pushing one [`FieldError`] per bad field so the
/// producer learns everything wrong with a request at once.
pub fn validate_incoming(
    index: i64,
    raw: &IncomingRecord<'_>,
    limits: &Limits,
    errors: &mut Vec<FieldError>,
) -> Option<Record> {
    let before = errors.len();
    let stream = match raw.stream {
        None => {
            errors.push(FieldError::new(index, "stream", "is required"));
            None
        }
        Some(v) => match json_string(v) {
            Some(s) => match validate_stream(&s) {
                Ok(()) => Some(s.into_owned()),
                Err(reason) => {
                    errors.push(FieldError::new(index, "stream", reason));
                    None
                }
            },
            None => {
                errors.push(FieldError::new(index, "stream", "must be a string"));
                None
            }
        },
    };
    let payload = match raw.payload {
        None => {
            errors.push(FieldError::new(index, "payload", "is required"));
            None
        }
        Some(v) => match validate_payload(v.get(), limits) {
            Ok(()) => Some(v.get().to_owned()),
            Err(reason) => {
                errors.push(FieldError::new(index, "payload", reason));
                None
            }
        },
    };
    let id = match raw.id {
        None => None,
        Some(v) if v.get() == "null" => None,
        Some(v) => match json_string(v) {
            Some(s) => match validate_id(&s) {
                Ok(()) => Some(s.into_owned()),
                Err(reason) => {
                    errors.push(FieldError::new(index, "id", reason));
                    None
                }
            },
            None => {
                errors.push(FieldError::new(index, "id", "must be a string"));
                None
            }
        },
    };
    let ts_us = match raw.ts {
        None => None,
        Some(v) if v.get() == "null" => None,
        Some(v) => match json_string(v) {
            Some(s) => match parse_ts(&s) {
                Ok(us) => Some(us),
                Err(reason) => {
                    errors.push(FieldError::new(index, "ts", reason));
                    None
                }
            },
            None => {
                errors.push(FieldError::new(
                    index,
                    "ts",
                    "must be an RFC 3339 timestamp string",
                ));
                None
            }
        },
    };
    if errors.len() > before {
        return None;
    }
    Some(Record {
        id,
        stream: stream?,
        ts_us,
        payload: payload?,
    })
}

fn json_string<'a>(raw: &'a RawValue) -> Option<Cow<'a, str>> {
    serde_json::from_str::<Cow<'a, str>>(raw.get()).ok()
}

/// A stream name: 1–64 characters of `[a-z0-9_.-]`.
pub fn validate_stream(stream: &str) -> Result<(), String> {
    if stream.is_empty() {
        return Err("must not be empty".into());
    }
    if stream.len() > MAX_STREAM_LEN {
        return Err(format!(
            "must be at most {MAX_STREAM_LEN} characters, got {}",
            stream.len()
        ));
    }
    if let Some(c) = stream
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '.' | '-'))
    {
        return Err(format!(
            "may contain only a-z, 0-9, '_', '.' and '-', found {c:?}"
        ));
    }
    Ok(())
}

/// A record id: 1–128 characters, no control characters (PostgreSQL text cannot
/// hold NUL, and ids end up in logs and URLs).
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    let chars = id.chars().count();
    if chars > MAX_ID_LEN {
        return Err(format!(
            "must be at most {MAX_ID_LEN} characters, got {chars}"
        ));
    }
    if id.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// Parses an RFC 3339 timestamp into microseconds since the Unix epoch.
pub fn parse_ts(ts: &str) -> Result<i64, String> {
    let t = OffsetDateTime::parse(ts, &Rfc3339)
        .map_err(|e| format!("is not an RFC 3339 timestamp ({e}), e.g. 2026-11-23T13:45:00Z"))?;
    Ok(unix_micros(t))
}

/// Microseconds since the Unix epoch of `t`.
pub fn unix_micros(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000) as i64
}

/// Formats microseconds since the Unix epoch as RFC 3339 (UTC).
pub fn format_ts(us: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| us.to_string())
}

/// Checks a payload given as JSON text that is already known to be well-formed
/// JSON: it must be an object within the size limit, and hold nothing that
/// PostgreSQL's jsonb would refuse (NUL characters, unpaired surrogates, numbers
/// `numeric` cannot hold, nesting deeper than [`MAX_NESTING_DEPTH`]). Refusing
/// those here is what keeps a poison record out of the buffer.
pub fn validate_payload(json: &str, limits: &Limits) -> Result<(), String> {
    if !json.starts_with('{') {
        return Err("must be a JSON object".into());
    }
    if json.len() > limits.max_payload_bytes {
        return Err(format!(
            "is {} bytes, more than the limit of {} bytes",
            json.len(),
            limits.max_payload_bytes
        ));
    }
    scan_for_jsonb_hazards(json.as_bytes())
}

fn scan_for_jsonb_hazards(b: &[u8]) -> Result<(), String> {
    let mut i = 0;
    let mut in_string = false;
    // A high surrogate escape must be followed directly by a low one.
    let mut pending_high = false;
    let mut depth = 0usize;
    while i < b.len() {
        let c = b[i];
        if in_string {
            match c {
                b'\\' => {
                    let esc = b.get(i + 1).copied().unwrap_or(b'\\');
                    if esc == b'u' {
                        let code = b
                            .get(i + 2..i + 6)
                            .and_then(|h| std::str::from_utf8(h).ok())
                            .and_then(|h| u16::from_str_radix(h, 16).ok())
                            .ok_or("contains a malformed \\u escape")?;
                        match code {
                            0 => return Err("must not contain \\u0000 (NUL)".into()),
                            0xD800..=0xDBFF => {
                                if pending_high {
                                    return Err("contains an unpaired UTF-16 surrogate".into());
                                }
                                pending_high = true;
                            }
                            0xDC00..=0xDFFF => {
                                if !pending_high {
                                    return Err("contains an unpaired UTF-16 surrogate".into());
                                }
                                pending_high = false;
                            }
                            _ if pending_high => {
                                return Err("contains an unpaired UTF-16 surrogate".into());
                            }
                            _ => {}
                        }
                        i += 6;
                        continue;
                    }
                    if pending_high {
                        return Err("contains an unpaired UTF-16 surrogate".into());
                    }
                    i += 2;
                    continue;
                }
                _ if pending_high => {
                    return Err("contains an unpaired UTF-16 surrogate".into());
                }
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match c {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    if depth > MAX_NESTING_DEPTH {
                        return Err(format!("nests deeper than {MAX_NESTING_DEPTH} levels"));
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                // Outside strings a '-' or a digit can only start a number.
                b'-' | b'0'..=b'9' => {
                    i = check_number(b, i)?;
                    continue;
                }
                _ => {}
            }
        }
        i += 1;
    }
    Ok(())
}

/// Checks the number (`-? int frac? exp?`, well-formed) that starts at `start`
/// against what `numeric` can hold; returns the index just past it.
fn check_number(b: &[u8], start: usize) -> Result<usize, String> {
    let digits_end = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        j
    };
    let int_start = if b[start] == b'-' { start + 1 } else { start };
    let mut end = digits_end(int_start);
    // JSON has no leading zeros, so only a lone "0" has no significant digit.
    let int_digits = match &b[int_start..end] {
        b"0" => 0,
        digits => digits.len() as i64,
    };
    let mut frac_digits = 0;
    if b.get(end) == Some(&b'.') {
        let frac_end = digits_end(end + 1);
        frac_digits = (frac_end - end - 1) as i64;
        end = frac_end;
    }
    let mut exponent = 0i64;
    if matches!(b.get(end), Some(b'e' | b'E')) {
        let mut j = end + 1;
        let negative = b.get(j) == Some(&b'-');
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        end = digits_end(j);
        let magnitude: u32 = std::str::from_utf8(&b[j..end])
            .ok()
            .and_then(|d| d.parse().ok())
            .unwrap_or(u32::MAX);
        if magnitude > MAX_NUMBER_EXPONENT {
            return Err(format!(
                "contains a number whose exponent exceeds {MAX_NUMBER_EXPONENT}"
            ));
        }
        exponent = if negative {
            -i64::from(magnitude)
        } else {
            i64::from(magnitude)
        };
    }
    if frac_digits - exponent > NUMERIC_MAX_SCALE {
        return Err(format!(
            "contains a number with more than {NUMERIC_MAX_SCALE} digits after the decimal point"
        ));
    }
    if int_digits > 0 && int_digits + exponent > NUMERIC_MAX_INTEGER_DIGITS {
        return Err(format!(
            "contains a number with more than {NUMERIC_MAX_INTEGER_DIGITS} digits before the decimal point"
        ));
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str) -> Result<Option<Record>, Vec<FieldError>> {
        let raw: IncomingRecord = serde_json::from_str(json).unwrap();
        let mut errors = Vec::new();
        let rec = validate_incoming(0, &raw, &Limits::default(), &mut errors);
        if errors.is_empty() {
            Ok(rec)
        } else {
            Err(errors)
        }
    }

    fn fields(errors: Vec<FieldError>) -> Vec<String> {
        errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_minimal_record_needs_only_stream_and_payload() {
        let rec = check(r#"{"stream":"app.logs","payload":{"a":1}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(rec.stream, "app.logs");
        assert_eq!(rec.payload, r#"{"a":1}"#);
        assert_eq!(rec.id, None);
        assert_eq!(rec.ts_us, None);
    }

    #[test]
    fn id_and_ts_are_kept_when_given() {
        let rec =
            check(r#"{"stream":"s","payload":{},"id":"order-42","ts":"1970-01-01T00:00:01.5Z"}"#)
                .unwrap()
                .unwrap();
        assert_eq!(rec.id.as_deref(), Some("order-42"));
        assert_eq!(rec.ts_us, Some(1_500_000));
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let errs =
            check(r#"{"stream":"Bad Name","payload":[1],"id":"","ts":"yesterday"}"#).unwrap_err();
        assert_eq!(fields(errs), ["stream", "payload", "id", "ts"]);
    }

    #[test]
    fn missing_stream_and_payload_are_named() {
        let errs = check(r#"{}"#).unwrap_err();
        assert_eq!(fields(errs), ["stream", "payload"]);
    }

    #[test]
    fn stream_rules() {
        assert!(validate_stream("a").is_ok());
        assert!(validate_stream(&"a".repeat(64)).is_ok());
        assert!(validate_stream(&"a".repeat(65)).is_err());
        assert!(validate_stream("").is_err());
        assert!(validate_stream("UPPER").is_err());
        assert!(validate_stream("with space").is_err());
        assert!(validate_stream("ok_name-1.2").is_ok());
    }

    #[test]
    fn id_rules() {
        assert!(validate_id(&"x".repeat(128)).is_ok());
        assert!(validate_id(&"x".repeat(129)).is_err());
        assert!(validate_id("a\u{0}b").is_err());
        assert!(validate_id("ünïcode-ok").is_ok());
    }

    #[test]
    fn oversize_payload_is_refused_with_its_size() {
        let limits = Limits {
            max_payload_bytes: 10,
        };
        let err = validate_payload(r#"{"k":"0123456789"}"#, &limits).unwrap_err();
        assert!(err.contains("18 bytes"), "{err}");
    }

    #[test]
    fn payloads_postgres_would_refuse_are_refused_here() {
        let l = Limits::default();
        assert!(validate_payload(r#"{"a":"\u0000"}"#, &l).is_err());
        assert!(validate_payload(r#"{"a":"\ud800"}"#, &l).is_err());
        assert!(validate_payload(r#"{"a":"\udc00"}"#, &l).is_err());
        assert!(validate_payload(r#"{"a":"\ud800x"}"#, &l).is_err());
        assert!(validate_payload(r#"{"a":1e100000}"#, &l).is_err());
        assert!(validate_payload(r#"{"a":"\ud83d\ude00","b":1.5e-300,"t":true}"#, &l).is_ok());
        assert!(validate_payload(r#"{"e":"1e99999"}"#, &l).is_ok());
    }

    #[test]
    fn payloads_nested_deeper_than_postgres_parses_are_refused() {
        let l = Limits::default();
        let nested = |depth: usize| {
            // The payload object itself is the first level.
            format!(
                "{{\"a\":{}1{}}}",
                "[".repeat(depth - 1),
                "]".repeat(depth - 1)
            )
        };
        assert!(validate_payload(&nested(MAX_NESTING_DEPTH), &l).is_ok());
        let err = validate_payload(&nested(MAX_NESTING_DEPTH + 1), &l).unwrap_err();
        assert!(err.contains("nests deeper"), "{err}");
        assert!(validate_payload(&nested(20_000), &l).is_err());
        // Brackets inside strings are text, not nesting.
        let text = format!("{{\"a\":\"{}\"}}", "[{".repeat(1000));
        assert!(validate_payload(&text, &l).is_ok());
    }

    #[test]
    fn numbers_numeric_cannot_hold_are_refused_at_its_exact_limits() {
        // The limits of PostgreSQL 15's numeric, checked against the server.
        let l = Limits::default();
        let num =
            |n: String| validate_payload(&format!("{{\"n\":{n},\"t\":[true,false,null]}}"), &l);
        let zeros = |n: usize| "0".repeat(n);
        assert!(num(format!("0.{}1", zeros(16382))).is_ok());
        assert!(num(format!("0.{}1", zeros(16383))).is_err());
        assert!(num(format!("1.{}", zeros(16384))).is_err());
        assert!(num(format!("-0.{}1e1", zeros(16383))).is_ok());
        assert!(num(format!("0.{}1e-1", zeros(16382))).is_err());
        let big = Limits {
            max_payload_bytes: 1 << 20,
        };
        let int = |n: String| validate_payload(&format!("{{\"n\":{n}}}"), &big);
        assert!(int(format!("1{}", zeros(131_071))).is_ok());
        assert!(int(format!("-1{}", zeros(131_072))).is_err());
        assert!(int(format!("1{}e1", zeros(131_071))).is_err());
        assert!(num("1e1000".into()).is_ok());
        assert!(num("1E-1000".into()).is_ok());
        assert!(num("1e+1001".into()).is_err());
        assert!(num("-0".into()).is_ok());
    }

    #[test]
    fn timestamps_round_trip_through_micros() {
        let us = parse_ts("2026-11-23T13:45:00.123456Z").unwrap();
        assert_eq!(format_ts(us), "2026-11-23T13:45:00.123456Z");
        assert!(parse_ts("2026-11-23 13:45").is_err());
    }

    #[test]
    fn unknown_fields_are_a_parse_error() {
        assert!(
            serde_json::from_str::<IncomingRecord>(r#"{"stream":"s","payload":{},"x":1}"#).is_err()
        );
    }
}
