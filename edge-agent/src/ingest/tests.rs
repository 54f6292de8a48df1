//! Unit tests of request parsing: stream schemas checked with the record
//! rules, whole-request refusal, and route labels of refused bodies.

use super::*;
use dcs_shared::config::Issues;

fn schemas() -> Schemas {
    let streams = [(
        "readings".to_string(),
        crate::schema::StreamConfig {
            schema: Some(
                r#"{"type":"object","required":["value"],"properties":{"value":{"type":"number"}}}"#
                    .into(),
            ),
            schema_file: None,
        },
    )]
    .into_iter()
    .collect();
    let mut issues = Issues::default();
    let s = Schemas::compile(&streams, &mut issues);
    issues.into_result().unwrap();
    s
}

fn details(e: ApiError) -> (StatusCode, Vec<FieldError>) {
    (e.status, e.body.details)
}

#[test]
fn a_payload_failing_its_stream_schema_refuses_the_whole_request() {
    let body = br#"[
        {"stream":"readings","payload":{"value":1}},
        {"stream":"other","payload":{"value":"free text"}},
        {"stream":"readings","payload":{"value":"high"}}
    ]"#;
    let err = parse_records(body, Format::Json, &Limits::default(), &schemas()).unwrap_err();
    let (status, details) = details(err);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(details.len(), 1, "{details:?}");
    assert_eq!(details[0].index, 2);
    assert_eq!(details[0].field, "payload/value");
    assert!(details[0].reason.contains("number"), "{details:?}");
}

#[test]
fn schema_errors_and_record_errors_are_reported_together() {
    let body =
        b"{\"stream\":\"readings\",\"payload\":{}}\n{\"stream\":\"Bad Stream\",\"payload\":{}}\n";
    let err = parse_records(body, Format::Ndjson, &Limits::default(), &schemas()).unwrap_err();
    let (_, details) = details(err);
    let fields: Vec<(i64, &str)> = details
        .iter()
        .map(|d| (d.index, d.field.as_str()))
        .collect();
    assert_eq!(fields, vec![(0, "payload"), (1, "stream")]);
}

#[test]
fn a_body_refused_before_routing_is_counted_under_its_route_template() {
    for (path, route) in [
        ("/v1/records", "/v1/records"),
        ("/v1/records/abc-1", "/v1/records/{id}"),
        ("/api/v1/jobs/trigger", "/api/v1/jobs/trigger"),
        ("/v1/records/", "unmatched"),
        ("/v1/records/a/b", "unmatched"),
        ("/anything/else", "unmatched"),
    ] {
        assert_eq!(route_template(path), route, "{path}");
    }
}

#[test]
fn matching_payloads_pass_unchanged() {
    let body = br#"{"stream":"readings","payload":{"value": 2.50}}"#;
    let records = parse_records(body, Format::Json, &Limits::default(), &schemas()).unwrap();
    assert_eq!(records[0].payload, r#"{"value": 2.50}"#);
}
