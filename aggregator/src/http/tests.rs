//! Unit tests of the batch checks that need no database, the admin
//! `/agents` access rule and the error responses.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use dcs_shared::config::ByteSize;
use dcs_shared::wire::{self, OutRecord};
use uuid::Uuid;

use super::batches::{MAX_ERROR_DETAILS, check_headers, prepare, read_body};
use super::*;

fn limits() -> LimitsConfig {
    LimitsConfig::default()
}

fn rec<'a>(seq: i64, stream: &'a str, payload: &'a str) -> OutRecord<'a> {
    OutRecord {
        seq,
        id: "id-1",
        stream,
        ts_us: 1_700_000_000_000_000,
        payload,
        received: None,
    }
}

#[test]
fn a_valid_batch_is_prepared_with_one_row_per_record() {
    let body = wire::encode_batch(
        Uuid::nil(),
        None,
        [rec(1, "a", "{}"), rec(2, "b", r#"{"x":1}"#)],
        1,
    );
    let prepared = prepare(&body, &limits(), u64::MAX).unwrap();
    assert_eq!(prepared.records, 2);
    assert_eq!(prepared.epoch, Uuid::nil());
}

#[test]
fn every_bad_record_is_reported_by_seq_and_field() {
    let body = wire::encode_batch(
        Uuid::nil(),
        None,
        [rec(1, "ok", "{}"), rec(0, "Bad Stream", "[1]")],
        1,
    );
    let Err(Error::InvalidRecords { total, details }) = prepare(&body, &limits(), u64::MAX) else {
        panic!("expected invalid records");
    };
    assert_eq!(total, 3);
    let fields: Vec<_> = details
        .iter()
        .map(|d| (d.index, d.field.as_str()))
        .collect();
    assert_eq!(fields, [(0, "seq"), (0, "stream"), (0, "payload")]);
}

#[test]
fn too_many_records_is_too_large() {
    let body = wire::encode_batch(Uuid::nil(), None, (1..=3).map(|i| rec(i, "s", "{}")), 1);
    let small = LimitsConfig {
        max_records_per_batch: 2,
        ..limits()
    };
    assert!(matches!(
        prepare(&body, &small, u64::MAX),
        Err(Error::BatchTooLarge(_))
    ));
}

#[test]
fn an_oversize_payload_is_named() {
    let body = wire::encode_batch(Uuid::nil(), None, [rec(5, "s", r#"{"k":"0123456789"}"#)], 1);
    let small = LimitsConfig {
        max_payload_bytes: ByteSize(8),
        ..limits()
    };
    let Err(Error::InvalidRecords { details, .. }) = prepare(&body, &small, u64::MAX) else {
        panic!("expected invalid records");
    };
    assert_eq!(
        (details[0].index, details[0].field.as_str()),
        (5, "payload")
    );
}

#[test]
fn error_details_are_capped() {
    let body = wire::encode_batch(Uuid::nil(), None, (1..=500).map(|i| rec(i, "BAD", "{}")), 1);
    let Err(error @ Error::InvalidRecords { .. }) = prepare(&body, &limits(), u64::MAX) else {
        panic!("expected invalid records");
    };
    let (_, _, message) = error.status_code_message();
    assert!(message.starts_with("500 problems"), "{message}");
    let Error::InvalidRecords { details, .. } = error else {
        unreachable!()
    };
    assert_eq!(details.len(), MAX_ERROR_DETAILS);
}

#[test]
fn headers_are_checked_before_the_body() {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    assert!(matches!(
        check_headers(&h, &limits()),
        Err(Error::UnsupportedEncoding(_))
    ));
    h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("GZIP"));
    assert!(check_headers(&h, &limits()).is_ok());
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    assert!(check_headers(&h, &limits()).is_ok());
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    assert!(matches!(
        check_headers(&h, &limits()),
        Err(Error::UnsupportedMediaType(_))
    ));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(17u64 << 20));
    assert!(matches!(
        check_headers(&h, &limits()),
        Err(Error::BatchTooLarge(_))
    ));
}

#[tokio::test]
async fn a_body_past_the_cap_is_too_large_even_without_content_length() {
    let small = LimitsConfig {
        max_compressed_bytes: ByteSize(10),
        ..limits()
    };
    let admission = Admission::new(Default::default(), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let body = Body::from(vec![0u8; 11]);
    assert!(matches!(
        read_body(body, &small, &admission, deadline).await,
        Err(Error::BatchTooLarge(_))
    ));
    let body = Body::from(vec![0u8; 10]);
    let (read, _memory) = read_body(body, &small, &admission, deadline).await.unwrap();
    assert_eq!(read.len(), 10);
}

#[test]
fn the_admin_agents_list_needs_a_token_or_a_loopback_bind() {
    let mut config = Config::default();
    config.admin.address = "127.0.0.1:9464".parse().unwrap();
    assert!(
        AgentsAccess::from_config(&config)
            .check(&HeaderMap::new())
            .is_ok()
    );
    config.admin.address = "0.0.0.0:9464".parse().unwrap();
    assert!(matches!(
        AgentsAccess::from_config(&config).check(&HeaderMap::new()),
        Err(Error::AdminForbidden(_))
    ));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "s3cret\n").unwrap();
    config.admin.agents_token_file = Some(file);
    let access = AgentsAccess::from_config(&config);
    assert!(matches!(
        access.check(&HeaderMap::new()),
        Err(Error::AdminUnauthorized)
    ));
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer s3cre"),
    );
    assert!(access.check(&h).is_err());
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer s3cret"),
    );
    assert!(access.check(&h).is_ok());
}

#[test]
fn retry_after_is_whole_seconds_and_never_zero() {
    let response = Error::DatabaseUnavailable {
        retry_after: Duration::from_millis(300),
    }
    .into_response();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
}
