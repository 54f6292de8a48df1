//! OTLP/HTTP log batches of the benchmark's records, for the `otlp` step:
//! the same records as the NDJSON steps, each a log record whose body is
//! the record's payload text and whose `dcs.stream` attribute names its
//! stream, so the agent stores comparable records.

use anyhow::{Context as _, ensure};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;

use crate::records::Generator;

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// Records `start..end` as one `ExportLogsServiceRequest`, protobuf-encoded.
pub fn request(generator: &Generator, start: u64, end: u64) -> Vec<u8> {
    let log_records = (start..end)
        .map(|i| {
            let r = generator.record(i);
            LogRecord {
                time_unix_nano: r.ts_us as u64 * 1_000,
                severity_number: 9,
                severity_text: "INFO".into(),
                body: Some(AnyValue {
                    value: Some(Value::StringValue(r.payload)),
                }),
                attributes: vec![string("dcs.stream", r.stream), string("record.id", &r.id)],
                ..Default::default()
            }
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![string("service.name", "dcs-bench")],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                log_records,
                ..Default::default()
            }],
            schema_url: String::new(),
        }],
    }
    .encode_to_vec()
}

/// Fails unless the agent's answer to request `k` accepted every log record.
pub fn check_fully_accepted(body: &[u8], k: u64) -> anyhow::Result<()> {
    let answer = ExportLogsServiceResponse::decode(body)
        .with_context(|| format!("decode the agent's OTLP answer to request {k}"))?;
    ensure!(
        answer.partial_success.is_none(),
        "the agent refused part of request {k}: {:?}",
        answer.partial_success
    );
    Ok(())
}
