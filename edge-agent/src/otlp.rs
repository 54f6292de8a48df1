//! The OTLP/HTTP logs receiver: `POST /v1/logs` on the push listener.
//!
//! Follows the OTLP specification (protocol/otlp.md, "OTLP/HTTP"):
//! - the body is an `ExportLogsServiceRequest`, as `application/x-protobuf`
//!   or `application/json` (OTLP's JSON mapping: camelCase, hex trace and
//!   span ids, 64-bit integers as strings or numbers), optionally gzip or
//!   zstd ([`crate::body_encoding`]);
//! - the answer has the request's content type: an
//!   `ExportLogsServiceResponse` on success, whose `partial_success` counts
//!   the log records refused and says why; a `google.rpc.Status` on failure;
//! - a full buffer or a stopping agent is a 503 with `Retry-After`: OTLP
//!   exporters retry 429/502/503/504 and drop on anything else, so the push
//!   API's 507 would lose their data.
//!
//! # Mapping
//! Each log record becomes one record. `ts` is `time_unix_nano`, else
//! `observed_time_unix_nano`, else the time the agent received it. The
//! stream is the string value of the attribute `otlp.stream_attribute` (the
//! log record's attributes first, then its resource's), else
//! `otlp.default_stream`. The payload is a JSON object with `resource`
//! (`attributes`, `dropped_attributes_count`, `schema_url`), `scope`
//! (`name`, `version`, `attributes`, `schema_url`), and the log record's
//! fields in snake_case: `time_unix_nano` and `observed_time_unix_nano` (as
//! decimal strings, exact), `severity_number`, `severity_text`, `body` (any
//! JSON value), `attributes`, `trace_id` and `span_id` (lowercase hex),
//! `flags`, `dropped_attributes_count`, `event_name`. Attributes become JSON
//! objects: ints and doubles are numbers (a non-finite double is its name as
//! a string), bytes are base64, arrays and key-value lists nest.
//!
//! A log record that does not make a valid record (an invalid stream name,
//! a payload over `ingest.max_payload_bytes`, a NUL in a string, a payload
//! its stream's schema refuses) is written to `dead_letters` with its reason
//! and counted in `partial_success`; the others are committed in the same
//! transaction. A body that cannot be decoded at all is a 400.
//!
//! # Bounded decoding
//! A decoded message takes far more memory than its encoding: an empty log
//! record is 2 bytes of protobuf or 3 of JSON and about 200 bytes decoded,
//! so 16 MiB of them would take gigabytes. Before decoding, the body's
//! messages (protobuf, walked by the logs schema) or its JSON objects and
//! arrays are counted without allocating; more than [`MAX_OBJECTS`] is a
//! 413. Real exporters send a few thousand log records per request (the
//! OpenTelemetry SDKs batch 512, the Collector 8192 by default).

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use dcs_shared::record::{self, FieldError, Limits, Record};

use crate::body_encoding::{self, Encoding};
use crate::config::OtlpConfig;
use crate::ingest::{self, ApiError, AppState, Invalid, Parsed};
use crate::schema::Schemas;

/// Messages (or JSON objects and arrays) one request may decode to: about
/// 50 MiB of decoded structs at worst, and 20 000 log records with ten
/// attributes each.
pub const MAX_OBJECTS: usize = 262_144;

/// The two encodings OTLP/HTTP defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Protobuf,
    Json,
}

impl Format {
    fn from_headers(headers: &HeaderMap) -> Result<Format, ApiError> {
        let (ct, mime) = crate::ingest::media_type(headers);
        match mime.as_str() {
            "application/x-protobuf" | "application/protobuf" => Ok(Format::Protobuf),
            "application/json" => Ok(Format::Json),
            _ => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "Content-Type {ct:?} is not supported on /v1/logs; send application/x-protobuf or application/json (OTLP)"
                ),
            )),
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Protobuf => "application/x-protobuf",
            Format::Json => "application/json",
        }
    }
}

/// Why a body was not decoded.
#[derive(Debug)]
pub enum DecodeError {
    /// More than [`MAX_OBJECTS`] messages; nothing was decoded.
    TooManyObjects,
    Malformed(String),
}

/// Decodes an `ExportLogsServiceRequest` (already decompressed), counting
/// its messages first ("Bounded decoding").
pub fn decode_request(
    body: &[u8],
    format: Format,
) -> Result<ExportLogsServiceRequest, DecodeError> {
    let objects = match format {
        Format::Protobuf => wire_messages(body, Schema::Request, 0),
        Format::Json => Some(json_containers(body)),
    };
    if objects.is_some_and(|n| n > MAX_OBJECTS) {
        return Err(DecodeError::TooManyObjects);
    }
    decode_unbounded(body, format).map_err(DecodeError::Malformed)
}

fn decode_unbounded(body: &[u8], format: Format) -> Result<ExportLogsServiceRequest, String> {
    match format {
        Format::Protobuf => ExportLogsServiceRequest::decode(body)
            .map_err(|e| format!("the body is not an OTLP ExportLogsServiceRequest: {e}")),
        Format::Json => serde_json::from_slice(body)
            .map_err(|e| format!("the body is not an OTLP ExportLogsServiceRequest in JSON: {e}")),
    }
}

/// The message types of the logs schema that hold other messages, and the
/// field numbers of those.
#[derive(Clone, Copy)]
enum Schema {
    Request,
    ResourceLogs,
    Resource,
    ScopeLogs,
    Scope,
    LogRecord,
    KeyValue,
    AnyValue,
    ArrayValue,
    KeyValueList,
    /// A message with no nested messages we count.
    Leaf,
}

impl Schema {
    fn child(self, field: u64) -> Option<Schema> {
        use Schema::*;
        Some(match (self, field) {
            (Request, 1) => ResourceLogs,
            (ResourceLogs, 1) => Resource,
            (ResourceLogs, 2) => ScopeLogs,
            (Resource, 1) | (Scope, 3) | (LogRecord, 6) | (KeyValueList, 1) => KeyValue,
            (ScopeLogs, 1) => Scope,
            (ScopeLogs, 2) => LogRecord,
            (LogRecord, 5) | (KeyValue, 2) | (ArrayValue, 1) => AnyValue,
            (AnyValue, 5) => ArrayValue,
            (AnyValue, 6) => KeyValueList,
            (Resource, 3) | (Scope, 4) => Leaf, // entity refs and the like
            _ => return None,
        })
    }
}

/// Counts the messages in `body` read as `schema`, without allocating;
/// `None` if the wire format breaks (the decoder then says why).
fn wire_messages(mut body: &[u8], schema: Schema, depth: usize) -> Option<usize> {
    // prost refuses nesting deeper than 100; so does this walk.
    if depth > 100 {
        return None;
    }
    let mut count = 0usize;
    while !body.is_empty() {
        let key = varint(&mut body)?;
        match key & 7 {
            0 => {
                varint(&mut body)?;
            }
            1 => body = body.get(8..)?,
            5 => body = body.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut body)?).ok()?;
                let inner = body.get(..len)?;
                body = &body[len..];
                if let Some(child) = schema.child(key >> 3) {
                    count = count.saturating_add(1).saturating_add(wire_messages(
                        inner,
                        child,
                        depth + 1,
                    )?);
                }
            }
            _ => return None,
        }
        if count > MAX_OBJECTS {
            return Some(count);
        }
    }
    Some(count)
}

fn varint(body: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = body.split_first()?;
        *body = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Objects and arrays in a JSON text (outside strings): each decodes to at
/// most one message or vector.
fn json_containers(body: &[u8]) -> usize {
    let mut count = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => count += 1,
                _ => {}
            }
        }
    }
    count
}

/// Maps every log record of `request` to a record, or to the reasons it
/// cannot be one; `index` counts log records across the whole request.
pub fn to_records(
    request: &ExportLogsServiceRequest,
    config: &OtlpConfig,
    limits: &Limits,
    schemas: &Schemas,
) -> Parsed {
    let mut parsed = Parsed {
        total: 0,
        valid: Vec::new(),
        invalid: Vec::new(),
    };
    for resource_logs in &request.resource_logs {
        let resource = resource_logs.resource.as_ref();
        let resource_attrs = resource.map_or(&[][..], |r| &r.attributes[..]);
        // Serialized once, then copied into each of its log records' payloads.
        let resource_json = to_raw(&json!({
            "attributes": attributes(resource_attrs),
            "dropped_attributes_count": resource.map_or(0, |r| r.dropped_attributes_count),
            "schema_url": resource_logs.schema_url,
        }));
        for scope_logs in &resource_logs.scope_logs {
            let scope = scope_logs.scope.as_ref();
            let scope_json = to_raw(&json!({
                "name": scope.map_or("", |s| &s.name),
                "version": scope.map_or("", |s| &s.version),
                "attributes": attributes(scope.map_or(&[][..], |s| &s.attributes[..])),
                "schema_url": scope_logs.schema_url,
            }));
            for log in &scope_logs.log_records {
                let index = parsed.total;
                parsed.total += 1;
                let payload = serde_json::to_string(&LogPayload {
                    attributes: attributes(&log.attributes),
                    body: log.body.as_ref().map_or(Value::Null, any_value),
                    dropped_attributes_count: log.dropped_attributes_count,
                    event_name: &log.event_name,
                    flags: log.flags,
                    observed_time_unix_nano: log.observed_time_unix_nano.to_string(),
                    resource: &resource_json,
                    scope: &scope_json,
                    severity_number: log.severity_number,
                    severity_text: &log.severity_text,
                    span_id: hex(&log.span_id),
                    time_unix_nano: log.time_unix_nano.to_string(),
                    trace_id: hex(&log.trace_id),
                })
                .expect("a payload of JSON values serializes");
                let stream_value = find_string(&log.attributes, &config.stream_attribute)
                    .or_else(|| find_string(resource_attrs, &config.stream_attribute));
                let ts_nanos = [log.time_unix_nano, log.observed_time_unix_nano]
                    .into_iter()
                    .find(|n| *n != 0);
                match check(index, stream_value, config, &payload, limits, schemas) {
                    Ok(stream) => parsed.valid.push((
                        index,
                        Record {
                            id: None,
                            stream,
                            ts_us: ts_nanos.map(|n| (n / 1_000) as i64),
                            payload,
                        },
                    )),
                    Err(errors) => parsed.invalid.push(Invalid {
                        index,
                        raw: payload,
                        errors,
                    }),
                }
            }
        }
    }
    parsed
}

/// One log record's payload. Fields in alphabetical order: the same bytes
/// a `serde_json::Map` (a sorted map) would write; the resource and the
/// scope are shared by many log records and serialized once.
#[derive(serde::Serialize)]
struct LogPayload<'a> {
    attributes: Value,
    body: Value,
    dropped_attributes_count: u32,
    event_name: &'a str,
    flags: u32,
    observed_time_unix_nano: String,
    resource: &'a RawValue,
    scope: &'a RawValue,
    severity_number: i32,
    severity_text: &'a str,
    span_id: String,
    time_unix_nano: String,
    trace_id: String,
}

fn to_raw(value: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("a JSON value serializes")
}

/// Checks one mapped log record the way the push API checks a record.
fn check(
    index: usize,
    stream: Option<&str>,
    config: &OtlpConfig,
    payload: &str,
    limits: &Limits,
    schemas: &Schemas,
) -> Result<String, Vec<FieldError>> {
    let i = index as i64;
    let mut errors = Vec::new();
    let stream = stream.unwrap_or(&config.default_stream);
    if let Err(reason) = record::validate_stream(stream) {
        errors.push(FieldError::new(
            i,
            &format!("attributes/{}", config.stream_attribute),
            format!("the stream {reason}"),
        ));
    }
    if let Err(reason) = record::validate_payload(payload, limits) {
        errors.push(FieldError::new(i, "payload", reason));
    } else if errors.is_empty()
        && let Err(violations) = schemas.check(stream, payload)
    {
        errors.extend(
            violations
                .iter()
                .map(|v| FieldError::new(i, &v.field(), v.reason())),
        );
    }
    if errors.is_empty() {
        Ok(stream.to_owned())
    } else {
        Err(errors)
    }
}

fn find_string<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attrs.iter().rev().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        }
    })
}

/// Attributes as a JSON object; a repeated key keeps its last value.
fn attributes(attrs: &[KeyValue]) -> Value {
    Value::Object(
        attrs
            .iter()
            .map(|kv| {
                (
                    kv.key.clone(),
                    kv.value.as_ref().map_or(Value::Null, any_value),
                )
            })
            .collect::<Map<String, Value>>(),
    )
}

fn any_value(v: &AnyValue) -> Value {
    use any_value::Value as V;
    match &v.value {
        None => Value::Null,
        Some(V::StringValue(s)) => Value::String(s.clone()),
        Some(V::BoolValue(b)) => Value::Bool(*b),
        Some(V::IntValue(i)) => Value::from(*i),
        Some(V::DoubleValue(d)) => serde_json::Number::from_f64(*d)
            .map_or_else(|| Value::String(d.to_string()), Value::Number),
        Some(V::BytesValue(b)) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        Some(V::ArrayValue(a)) => Value::Array(a.values.iter().map(any_value).collect()),
        Some(V::KvlistValue(kv)) => attributes(&kv.values),
        // An index into a profiles dictionary that logs do not carry.
        Some(V::StringValueStrindex(i)) => Value::from(*i),
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `POST /v1/logs`.
pub async fn post_logs(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // Until the content type is known, errors are the push API's JSON.
    let format = match Format::from_headers(&headers) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    match export(state, &headers, body, format).await {
        Ok(response) => encode(format, StatusCode::OK, &response),
        Err(e) => failure(format, e),
    }
}

async fn export(
    state: AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    format: Format,
) -> Result<ExportLogsServiceResponse, ApiError> {
    let encoding = Encoding::from_headers(headers)?;
    let body = body.map_err(|e| ApiError::new(e.status(), "unreadable_body", e.body_text()))?;
    let (limit, limits) = (state.max_request_bytes, state.limits);
    let (config, schemas) = (state.otlp.clone(), state.schemas.clone());
    let parsed = ingest::off_thread(move || {
        let body = body_encoding::decode(encoding, body, limit)?;
        let request = decode_request(&body, format).map_err(|e| match e {
            DecodeError::Malformed(m) => ApiError::new(StatusCode::BAD_REQUEST, "malformed_otlp", m),
            DecodeError::TooManyObjects => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!(
                    "the request holds more than {MAX_OBJECTS} OTLP messages; send fewer log records per request"
                ),
            ),
        })?;
        Ok(to_records(&request, &config, &limits, &schemas))
    })
    .await?;
    if parsed.total == 0 {
        return Ok(ExportLogsServiceResponse::default());
    }
    let accepted = ingest::commit_partial(&state.buffer, parsed, "otlp")
        .await
        .map_err(retryable)?;
    let partial_success = (accepted.rejected > 0).then(|| {
        let first = &accepted.details[0];
        ExportLogsPartialSuccess {
            rejected_log_records: accepted.rejected as i64,
            error_message: format!(
                "{} log records were refused and kept as dead letters on the agent; the first: log record {} {}: {}",
                accepted.rejected, first.index, first.field, first.reason
            ),
        }
    });
    Ok(ExportLogsServiceResponse { partial_success })
}

/// OTLP exporters retry only 429, 502, 503 and 504: a full buffer (507 on
/// the push API) becomes a 503 so they keep their data and come back.
fn retryable(e: ApiError) -> ApiError {
    if e.status() == StatusCode::INSUFFICIENT_STORAGE {
        let mut out = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "buffer_full", e.message());
        out.set_retry_after(e.retry_after());
        out
    } else {
        e
    }
}

/// `google.rpc.Status`, the body of an OTLP/HTTP failure.
#[derive(Clone, PartialEq, prost::Message, serde::Serialize)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

fn failure(format: Format, e: ApiError) -> Response {
    let status = e.status();
    // gRPC codes as the OTLP spec pairs them with HTTP statuses.
    let code = match status {
        StatusCode::BAD_REQUEST => 3,          // INVALID_ARGUMENT
        StatusCode::PAYLOAD_TOO_LARGE => 8,    // RESOURCE_EXHAUSTED
        StatusCode::TOO_MANY_REQUESTS => 8,    // RESOURCE_EXHAUSTED
        StatusCode::SERVICE_UNAVAILABLE => 14, // UNAVAILABLE
        _ => 2,                                // UNKNOWN
    };
    let retry_after = e.retry_after();
    let mut response = match format {
        // The JSON keeps the push API's error body (code, field, reason)
        // beside google.rpc.Status's `code` and `message`.
        Format::Json => {
            let mut body = serde_json::to_value(e.body()).unwrap_or_default();
            if let Value::Object(map) = &mut body {
                map.insert("code".into(), code.into());
            }
            encode_json(status, &body)
        }
        Format::Protobuf => encode(
            format,
            status,
            &RpcStatus {
                code,
                message: e.message().to_owned(),
            },
        ),
    };
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

fn encode<M: prost::Message + serde::Serialize>(
    format: Format,
    status: StatusCode,
    message: &M,
) -> Response {
    match format {
        Format::Protobuf => (
            status,
            [(header::CONTENT_TYPE, format.content_type())],
            message.encode_to_vec(),
        )
            .into_response(),
        Format::Json => encode_json(status, message),
    }
}

fn encode_json(status: StatusCode, body: &impl serde::Serialize) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, Format::Json.content_type())],
        serde_json::to_vec(body).unwrap_or_default(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::resource::v1::Resource;

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn request(logs: Vec<LogRecord>) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![kv(
                        "service.name",
                        any_value::Value::StringValue("checkout".into()),
                    )],
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "app.logger".into(),
                        version: "1.2".into(),
                        ..Default::default()
                    }),
                    log_records: logs,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn schemas() -> Schemas {
        let mut issues = dcs_shared::config::Issues::default();
        Schemas::compile(&Default::default(), &mut issues)
    }

    #[test]
    fn a_log_record_maps_every_field_into_the_payload() {
        let log = LogRecord {
            time_unix_nano: 1_700_000_000_123_456_789,
            observed_time_unix_nano: 1_700_000_001_000_000_000,
            severity_number: 9,
            severity_text: "INFO".into(),
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue("paid".into())),
            }),
            attributes: vec![
                kv("order", any_value::Value::IntValue(42)),
                kv("ratio", any_value::Value::DoubleValue(f64::NAN)),
                kv("raw", any_value::Value::BytesValue(vec![1, 2, 3])),
            ],
            dropped_attributes_count: 2,
            flags: 1,
            trace_id: vec![0xab; 16],
            span_id: vec![0x01; 8],
            event_name: String::new(),
        };
        let parsed = to_records(
            &request(vec![log]),
            &OtlpConfig::default(),
            &Limits::default(),
            &schemas(),
        );
        assert!(parsed.invalid.is_empty());
        let (_, r) = &parsed.valid[0];
        assert_eq!(r.stream, "otlp.logs");
        assert_eq!(r.ts_us, Some(1_700_000_000_123_456));
        let p: Value = serde_json::from_str(&r.payload).unwrap();
        assert_eq!(p["resource"]["attributes"]["service.name"], "checkout");
        assert_eq!(p["scope"]["name"], "app.logger");
        assert_eq!(p["scope"]["version"], "1.2");
        assert_eq!(p["time_unix_nano"], "1700000000123456789");
        assert_eq!(p["severity_number"], 9);
        assert_eq!(p["severity_text"], "INFO");
        assert_eq!(p["body"], "paid");
        assert_eq!(p["attributes"]["order"], 42);
        assert_eq!(p["attributes"]["ratio"], "NaN");
        assert_eq!(p["attributes"]["raw"], "AQID");
        assert_eq!(p["trace_id"], "ab".repeat(16));
        assert_eq!(p["span_id"], "0101010101010101");
        assert_eq!(p["flags"], 1);
        assert_eq!(p["dropped_attributes_count"], 2);
    }

    #[test]
    fn the_stream_comes_from_the_attribute_and_an_invalid_one_rejects_only_that_record() {
        let with = |stream: &str| LogRecord {
            attributes: vec![kv(
                "dcs.stream",
                any_value::Value::StringValue(stream.into()),
            )],
            ..Default::default()
        };
        let parsed = to_records(
            &request(vec![with("app.audit"), with("CRON"), LogRecord::default()]),
            &OtlpConfig::default(),
            &Limits::default(),
            &schemas(),
        );
        let streams: Vec<&str> = parsed
            .valid
            .iter()
            .map(|(_, r)| r.stream.as_str())
            .collect();
        assert_eq!(streams, ["app.audit", "otlp.logs"]);
        assert_eq!(parsed.invalid.len(), 1);
        assert_eq!(parsed.invalid[0].index, 1);
        assert_eq!(parsed.invalid[0].errors[0].field, "attributes/dcs.stream");
        // Without a timestamp the buffer stamps the receipt time.
        assert_eq!(parsed.valid[1].1.ts_us, None);
    }

    #[test]
    fn the_json_encoding_follows_the_otlp_mapping() {
        let body = br#"{"resourceLogs":[{"resource":{"attributes":[{"key":"host","value":{"stringValue":"a"}}]},
            "scopeLogs":[{"scope":{"name":"s"},"logRecords":[{"timeUnixNano":"1700000000000000000",
            "severityNumber":17,"body":{"kvlistValue":{"values":[{"key":"n","value":{"intValue":"7"}}]}},
            "traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","unknownField":1}]}]}]}"#;
        let req = decode_request(body, Format::Json).unwrap();
        let parsed = to_records(&req, &OtlpConfig::default(), &Limits::default(), &schemas());
        let p: Value = serde_json::from_str(&parsed.valid[0].1.payload).unwrap();
        assert_eq!(p["body"]["n"], 7);
        assert_eq!(p["trace_id"], "5b8efff798038103d269b633813fc60c");
        assert_eq!(p["severity_number"], 17);
        assert_eq!(parsed.valid[0].1.ts_us, Some(1_700_000_000_000_000));
    }

    #[test]
    fn a_body_of_millions_of_empty_log_records_is_refused_before_decoding() {
        // One ResourceLogs holding one ScopeLogs of 1M empty log records.
        let mut scope = Vec::new();
        for _ in 0..1_000_000 {
            scope.extend_from_slice(&[0x12, 0x00]);
        }
        let wrap = |field: u8, inner: &[u8]| {
            let mut out = vec![(field << 3) | 2];
            let mut len = inner.len();
            while len >= 0x80 {
                out.push((len as u8) | 0x80);
                len >>= 7;
            }
            out.push(len as u8);
            out.extend_from_slice(inner);
            out
        };
        let body = wrap(1, &wrap(2, &scope));
        assert!(matches!(
            decode_request(&body, Format::Protobuf),
            Err(DecodeError::TooManyObjects)
        ));
        let json = format!(
            "{{\"resourceLogs\":[{{\"scopeLogs\":[{{\"logRecords\":[{}{{}}]}}]}}]}}",
            "{},".repeat(1_000_000)
        );
        assert!(matches!(
            decode_request(json.as_bytes(), Format::Json),
            Err(DecodeError::TooManyObjects)
        ));
        // The count agrees with prost on a real request.
        let small = request(vec![LogRecord::default(); 3]).encode_to_vec();
        assert_eq!(
            wire_messages(&small, Schema::Request, 0),
            Some(1 + 3 + 1 + 1 + 3)
        );
    }

    #[test]
    fn undecodable_bodies_are_errors_not_panics() {
        for (body, format) in [
            (&b"\xff\xff\xff"[..], Format::Protobuf),
            (&b"{\"resourceLogs\":7}"[..], Format::Json),
            (
                &b"{\"resourceLogs\":[{\"scopeLogs\":[{\"logRecords\":[{\"traceId\":\"zz\"}]}]}]}"
                    [..],
                Format::Json,
            ),
        ] {
            assert!(decode_request(body, format).is_err(), "{body:?}");
        }
    }
}
