//! The fuzz targets' seed corpora (`fuzz/corpus/<target>/`), replayed on
//! stable Rust on every test run through the very code the fuzzer runs
//! (`fuzz/common/checks.rs`), plus a few thousand deterministic mutations of
//! each seed. A panic is a bug; the input that caused it is saved under
//! `target/tmp/` and named in the failure.
//!
//! Seeds whose name starts with `valid-` must also be accepted end to end, so
//! the fuzzer always starts from inputs that reach the deepest code.
//!
//! The corpus is written by `regenerate_the_seed_corpus` (ignored):
//! `cargo test -p dcs-tests --test e2e -- --ignored fuzz_corpus::`.

use std::io::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use dcs_shared::wire::{self, Backlog, OutRecord};
use flate2::Compression;
use flate2::write::GzEncoder;
use uuid::Uuid;

#[path = "../../fuzz/common/checks.rs"]
mod checks;
#[path = "../../fuzz/common/syslog_checks.rs"]
mod syslog_checks;

const BATCH_DECODE: &str = "batch_decode";
const RECORD_VALIDATE: &str = "record_validate";
const SYSLOG_PARSE: &str = "syslog_parse";
const OTLP_DECODE: &str = "otlp_decode";
/// Mutations replayed per seed; a few seconds for both corpora in a debug build.
const MUTATIONS_PER_SEED: usize = 1000;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Every seed of `target`, sorted by name.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).expect("read seed"))
        })
        .collect();
    seeds.sort();
    assert!(
        seeds.len() >= 12,
        "{} holds only {} seeds; regenerate the corpus",
        dir.display(),
        seeds.len()
    );
    seeds
}

/// Runs `check` on `input`; on a panic saves the input and fails naming it.
fn replay(target: &str, what: &str, input: &[u8], check: fn(&[u8])) {
    if catch_unwind(AssertUnwindSafe(|| check(input))).is_err() {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes");
        std::fs::create_dir_all(&dir).expect("crash dir");
        let path = dir.join(format!("{target}-{what}"));
        std::fs::write(&path, input).expect("save crash input");
        panic!(
            "{target} panicked on {what}; input saved to {} (replay it with `cargo fuzz run {target} {}`)",
            path.display(),
            path.display()
        );
    }
}

#[test]
fn every_batch_decode_seed_replays_without_panicking() {
    for (name, data) in seeds(BATCH_DECODE) {
        replay(BATCH_DECODE, &name, &data, checks::batch_decode);
    }
}

#[test]
fn every_record_validate_seed_replays_without_panicking() {
    for (name, data) in seeds(RECORD_VALIDATE) {
        replay(RECORD_VALIDATE, &name, &data, checks::record_validate);
    }
}

#[test]
fn every_syslog_parse_seed_replays_without_panicking() {
    for (name, data) in seeds(SYSLOG_PARSE) {
        replay(SYSLOG_PARSE, &name, &data, syslog_checks::syslog_parse);
    }
}

#[test]
fn every_otlp_decode_seed_replays_without_panicking() {
    for (name, data) in seeds(OTLP_DECODE) {
        replay(OTLP_DECODE, &name, &data, checks::otlp_decode);
    }
}

#[test]
fn mutated_syslog_seeds_replay_without_panicking() {
    let mut rng = fastrand::Rng::with_seed(0x0051_5109);
    for (name, data) in seeds(SYSLOG_PARSE) {
        for n in 0..MUTATIONS_PER_SEED {
            let input = mutate(&mut rng, &data);
            replay(
                SYSLOG_PARSE,
                &format!("{name}-mutation-{n}"),
                &input,
                syslog_checks::syslog_parse,
            );
        }
    }
}

#[test]
fn valid_otlp_seeds_decode_to_records_the_aggregator_accepts() {
    use dcs_edge::otlp::{self, Format};
    for (name, data) in seeds(OTLP_DECODE) {
        if !name.starts_with("valid-") {
            continue;
        }
        let format = if name.ends_with(".json") {
            Format::Json
        } else {
            Format::Protobuf
        };
        let request =
            otlp::decode_request(&data, format).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let parsed = otlp::to_records(
            &request,
            &Default::default(),
            &Default::default(),
            &Default::default(),
        );
        assert!(parsed.total > 0 && parsed.invalid.is_empty(), "{name}");
    }
}

#[test]
fn mutated_otlp_seeds_replay_without_panicking() {
    let mut rng = fastrand::Rng::with_seed(0x0071_5eed);
    for (name, data) in seeds(OTLP_DECODE) {
        for n in 0..MUTATIONS_PER_SEED / 2 {
            let input = mutate(&mut rng, &data);
            replay(
                OTLP_DECODE,
                &format!("{name}-mutation-{n}"),
                &input,
                checks::otlp_decode,
            );
        }
    }
}

#[test]
fn valid_batch_seeds_are_accepted_by_the_aggregator_checks() {
    for (name, data) in seeds(BATCH_DECODE) {
        if !name.starts_with("valid-") {
            continue;
        }
        let json = if name.ends_with(".gz") {
            wire::gunzip_limited(&data, checks::MAX_DECOMPRESSED)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        } else {
            data
        };
        assert!(checks::batch_json(&json), "{name} is refused");
    }
}

#[test]
fn valid_record_seeds_are_accepted_by_the_agent_checks() {
    for (name, data) in seeds(RECORD_VALIDATE) {
        if !name.starts_with("valid-") {
            continue;
        }
        let text = std::str::from_utf8(&data).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(checks::record_text(text), "{name} is refused");
    }
}

/// Bytes worth inserting: JSON structure, escapes, digits and exponents.
const INTERESTING: &[u8] = b"\0\xff\"\\{}[]:,-+.0019eEu\n\r\t ";

/// A deterministic mutation of `seed`, in the spirit of libFuzzer's.
fn mutate(rng: &mut fastrand::Rng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..rng.usize(1..=4) {
        let len = data.len();
        match rng.u8(0..7) {
            0 if len > 0 => {
                let i = rng.usize(..len);
                data[i] ^= 1 << rng.u8(0..8);
            }
            1 if len > 0 => {
                let i = rng.usize(..len);
                data[i] = INTERESTING[rng.usize(..INTERESTING.len())];
            }
            2 => {
                let i = rng.usize(..=len);
                data.insert(i, INTERESTING[rng.usize(..INTERESTING.len())]);
            }
            3 if len > 0 => data.truncate(rng.usize(..len)),
            4 if len > 0 => {
                // Repeat a slice: deeper nesting, longer numbers, more records.
                let a = rng.usize(..len);
                let b = rng.usize(a..=len.min(a + 64));
                let piece = data[a..b].to_vec();
                let at = rng.usize(..=len);
                for _ in 0..rng.usize(1..=32) {
                    data.splice(at..at, piece.iter().copied());
                }
            }
            5 if len > 1 => {
                let i = rng.usize(..len);
                let j = rng.usize(i..len.min(i + 16));
                data.drain(i..=j);
            }
            _ => data.push(rng.u8(..)),
        }
    }
    data
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(data).expect("gzip to memory");
    gz.finish().expect("gzip to memory")
}

#[test]
fn mutated_batch_seeds_replay_without_panicking() {
    let mut rng = fastrand::Rng::with_seed(0xdc5_ba7c);
    for (name, data) in seeds(BATCH_DECODE) {
        // Mutating the JSON inside the gzip gets past the CRC to the parser.
        let json = wire::gunzip_limited(&data, checks::MAX_DECOMPRESSED).ok();
        for n in 0..MUTATIONS_PER_SEED {
            let input = match &json {
                Some(json) if n % 2 == 0 => gzip(&mutate(&mut rng, json)),
                _ => mutate(&mut rng, &data),
            };
            replay(
                BATCH_DECODE,
                &format!("{name}-mutation-{n}"),
                &input,
                checks::batch_decode,
            );
        }
    }
}

#[test]
fn mutated_record_seeds_replay_without_panicking() {
    let mut rng = fastrand::Rng::with_seed(0x05ee_ddc5);
    for (name, data) in seeds(RECORD_VALIDATE) {
        for n in 0..MUTATIONS_PER_SEED {
            let input = mutate(&mut rng, &data);
            replay(
                RECORD_VALIDATE,
                &format!("{name}-mutation-{n}"),
                &input,
                checks::record_validate,
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The seed corpus generator.

fn out<'a>(seq: i64, id: &'a str, stream: &'a str, payload: &'a str) -> OutRecord<'a> {
    OutRecord {
        seq,
        id,
        stream,
        ts_us: 1_700_000_000_000_000 + seq,
        payload,
        received: None,
    }
}

fn epoch() -> Uuid {
    Uuid::from_u128(0x0193_a4c2_7d0e_7000_8000_0000_0000_0001)
}

fn batch_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = fastrand::Rng::with_seed(7);
    let backlog = Backlog {
        records: 120,
        bytes: 40_960,
        oldest_age_secs: 30,
        dropped_total: 2,
    };
    let minimal = wire::encode_batch(epoch(), None, [out(1, "a", "s", "{}")], 1);
    let rich_payloads = [
        r#"{"temp":21.5,"unit":"C","ok":true,"none":null}"#,
        r#"{"q":"\"quoted\" \\ back\/slash","tab":"a\tb","nl":"x\ny"}"#,
        r#"{"emoji":"\ud83d\ude00","cjk":"日本","big":12345678901234567890,"tiny":1.5e-300}"#,
        r#"{"nested":{"a":[1,[2,[3,{"b":[]}]]]},"neg":-0.0,"exp":1E+10}"#,
    ];
    let rich = wire::encode_batch(
        epoch(),
        Some(&backlog),
        rich_payloads
            .iter()
            .enumerate()
            .map(|(i, p)| out(i as i64 + 1, "producer\\id ü \"x\"", "plant.line-1_a", p)),
        6,
    );
    let many_payloads: Vec<String> = (0..50).map(|i| format!(r#"{{"i":{i}}}"#)).collect();
    let many_ids: Vec<String> = (0..50).map(|i| format!("id-{i}")).collect();
    let many = wire::encode_batch(
        epoch(),
        Some(&backlog),
        (0..50).map(|i| out(i as i64 + 1, &many_ids[i], "bulk", &many_payloads[i])),
        9,
    );
    let plain = br#"{"v":1,"epoch":"0193a4c2-7d0e-7000-8000-000000000001","backlog":null,"records":[{"seq":9,"id":"p","stream":"plain","ts":-1,"payload":{"k":[1,2]}}]}"#.to_vec();

    let deep = format!(r#"{{"a":{}1{}}}"#, "[".repeat(300), "]".repeat(300));
    let long_fraction = format!(r#"{{"n":0.{}1}}"#, "0".repeat(16_383));
    let invalid = wire::encode_batch(
        epoch(),
        None,
        [
            out(0, "seq-zero", "s", "{}"),
            out(2, "", "Bad Stream", "[1]"),
            out(3, "nul", "s", r#"{"a":"\u0000"}"#),
            out(4, "surrogate", "s", r#"{"a":"\ud800"}"#),
            out(5, "exponent", "s", r#"{"a":1e1001}"#),
            out(6, "deep", "s", &deep),
            out(7, "fraction", "s", &long_fraction),
        ],
        1,
    );
    let wrong_types = gzip(
        br#"{"v":1,"epoch":"0193a4c2-7d0e-7000-8000-000000000001","records":[{"seq":"1","id":2,"stream":null,"ts":1.5,"payload":"{}"}]}"#,
    );
    let unknown_version = gzip(br#"{"v":2,"epoch":"x","records":[],"future":true}"#);
    let unknown_field =
        br#"{"v":1,"epoch":"0193a4c2-7d0e-7000-8000-000000000001","records":[],"extra":1}"#
            .to_vec();
    let mut bomb = GzEncoder::new(Vec::new(), Compression::best());
    for _ in 0..3 {
        bomb.write_all(&[b' '; 1 << 20]).unwrap();
    }
    let bomb = bomb.finish().unwrap();
    let mut trailing = minimal.clone();
    trailing.extend_from_slice(b"trailing garbage");
    let mut two_members = minimal.clone();
    two_members.extend_from_slice(&rich);
    let random: Vec<u8> = (0..512).map(|_| rng.u8(..)).collect();
    let mut gzip_header_random = vec![0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0, 0xff];
    gzip_header_random.extend((0..256).map(|_| rng.u8(..)));

    vec![
        ("valid-minimal.gz", minimal.clone()),
        ("valid-rich-payloads.gz", rich.clone()),
        ("valid-empty.gz", wire::encode_batch(epoch(), None, [], 1)),
        ("valid-fifty-records-level9.gz", many),
        ("valid-plain-json.json", plain),
        ("invalid-records.gz", invalid),
        ("wrong-types.gz", wrong_types),
        ("unknown-version.gz", unknown_version),
        ("unknown-field.json", unknown_field),
        ("bomb-3mib.gz", bomb),
        ("truncated-mid-stream.gz", rich[..rich.len() / 2].to_vec()),
        ("truncated-trailer.gz", rich[..rich.len() - 4].to_vec()),
        ("trailing-garbage.gz", trailing),
        ("two-members.gz", two_members),
        ("garbage-random.bin", random),
        ("garbage-gzip-header.bin", gzip_header_random),
        ("garbage-empty.bin", Vec::new()),
    ]
}

fn record_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = fastrand::Rng::with_seed(11);
    let text = |s: &str| s.as_bytes().to_vec();
    let random: Vec<u8> = (0..256).map(|_| rng.u8(..)).collect();
    vec![
        ("valid-minimal.json", text(r#"{"stream":"s","payload":{}}"#)),
        (
            "valid-full.json",
            text(
                r#"{"stream":"plant.line-1_a","id":"order-42 ü","ts":"2026-11-23T13:45:00.123456+01:00","payload":{"temp":21.5,"tags":["a","b"],"ok":true,"n":null}}"#,
            ),
        ),
        (
            "valid-null-id-and-ts.json",
            text(r#"{"stream":"s","payload":{"a":1},"id":null,"ts":null}"#),
        ),
        (
            "valid-escapes.json",
            text(
                "{\"stream\":\"s\",\"id\":\"\\u00e9\\\"q\\\\\",\"payload\":{\"e\":\"\\ud83d\\ude00\",\"x\":\"\\/\\b\\f\\n\\r\\t\"}}",
            ),
        ),
        (
            "valid-numbers-at-the-limits.json",
            format!(
                r#"{{"stream":"s","payload":{{"a":1e1000,"b":-1E-1000,"c":0.{}1,"d":-0}}}}"#,
                "0".repeat(16_382)
            )
            .into_bytes(),
        ),
        (
            "valid-nested-256.json",
            format!(
                r#"{{"stream":"s","payload":{{"a":{}1{}}}}}"#,
                "[".repeat(255),
                "]".repeat(255)
            )
            .into_bytes(),
        ),
        (
            "wrong-types.json",
            text(r#"{"stream":1,"payload":"{}","id":2,"ts":3}"#),
        ),
        (
            "nul-and-surrogate.json",
            text(r#"{"stream":"s","payload":{"a":"\u0000","b":"\ud800x"}}"#),
        ),
        (
            "exponent-too-large.json",
            text(r#"{"stream":"s","payload":{"a":1e1001}}"#),
        ),
        (
            "nested-too-deep.json",
            format!(
                r#"{{"stream":"s","payload":{{"a":{}1{}}}}}"#,
                "[".repeat(2000),
                "]".repeat(2000)
            )
            .into_bytes(),
        ),
        (
            "fraction-too-long.json",
            format!(
                r#"{{"stream":"s","payload":{{"a":0.{}1}}}}"#,
                "0".repeat(16_383)
            )
            .into_bytes(),
        ),
        (
            "bad-fields.json",
            format!(
                r#"{{"stream":"Bad Name","id":"{}","ts":"2026-13-45T99:00:00Z","payload":[1]}}"#,
                "x".repeat(129)
            )
            .into_bytes(),
        ),
        (
            "unknown-field.json",
            text(r#"{"stream":"s","payload":{},"extra":1}"#),
        ),
        (
            "truncated.json",
            text(r#"{"stream":"s","payload":{"a":[1,"#),
        ),
        (
            "garbage-invalid-utf8.bin",
            b"{\"stream\":\"s\",\"payload\":{\"a\":\"\xff\xfe\"}}".to_vec(),
        ),
        ("garbage-random.bin", random),
    ]
}

/// Writes the seed corpus into `fuzz/corpus/` (files are replaced, extra
/// files the fuzzer or a person added are kept).
#[test]
#[ignore = "writes fuzz/corpus; run with --ignored to regenerate the seeds"]
fn regenerate_the_seed_corpus() {
    for (target, files) in [
        (BATCH_DECODE, batch_seeds()),
        (RECORD_VALIDATE, record_seeds()),
        (OTLP_DECODE, otlp_seeds()),
    ] {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (name, data) in files {
            std::fs::write(dir.join(name), data).expect("write seed");
        }
    }
}

fn otlp_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{
        AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value::Value,
    };
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use prost::Message as _;

    let any = |v: Value| Some(AnyValue { value: Some(v) });
    let kv = |k: &str, v: Value| KeyValue {
        key: k.into(),
        value: any(v),
        ..Default::default()
    };
    let request = |records: Vec<LogRecord>, stream: Option<&str>| ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: [kv("service.name", Value::StringValue("shop".into()))]
                    .into_iter()
                    .chain(stream.map(|s| kv("dcs.stream", Value::StringValue(s.into()))))
                    .collect(),
                dropped_attributes_count: 1,
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "app".into(),
                    version: "1.0".into(),
                    attributes: vec![kv("lib", Value::BoolValue(true))],
                    dropped_attributes_count: 0,
                }),
                log_records: records,
                schema_url: "https://opentelemetry.io/schemas/1.24.0".into(),
            }],
            schema_url: String::new(),
        }],
    };
    let rich = LogRecord {
        time_unix_nano: 1_765_000_000_123_456_789,
        observed_time_unix_nano: 1_765_000_000_223_456_789,
        severity_number: 17,
        severity_text: "ERROR".into(),
        body: any(Value::KvlistValue(KeyValueList {
            values: vec![
                kv("msg", Value::StringValue("payment \"failed\" ü".into())),
                kv("code", Value::IntValue(-42)),
                kv("ratio", Value::DoubleValue(0.25)),
                kv("raw", Value::BytesValue(vec![0, 1, 2, 255])),
                kv(
                    "list",
                    Value::ArrayValue(ArrayValue {
                        values: vec![
                            AnyValue {
                                value: Some(Value::BoolValue(false)),
                            },
                            AnyValue { value: None },
                        ],
                    }),
                ),
            ],
        })),
        attributes: vec![kv("http.status", Value::IntValue(502))],
        dropped_attributes_count: 3,
        flags: 1,
        trace_id: (1..=16).collect(),
        span_id: (1..=8).collect(),
        event_name: "payment.failed".into(),
    };
    let plain = |i: u64| LogRecord {
        time_unix_nano: 1_765_000_000_000_000_000 + i,
        body: any(Value::StringValue(format!("line {i}"))),
        ..Default::default()
    };
    let rich_pb = request(vec![rich.clone()], Some("shop.payments")).encode_to_vec();
    let many = request((0..50).map(plain).collect(), None).encode_to_vec();
    let rich_json = serde_json::to_vec(&request(vec![rich], None)).expect("OTLP JSON");
    let nan = request(
        vec![LogRecord {
            body: any(Value::DoubleValue(f64::INFINITY)),
            ..Default::default()
        }],
        None,
    )
    .encode_to_vec();
    let bad_stream = request(vec![plain(1)], Some("Not Valid")).encode_to_vec();
    let nul = request(
        vec![LogRecord {
            body: any(Value::StringValue("nul \u{0} inside".into())),
            ..Default::default()
        }],
        None,
    )
    .encode_to_vec();
    let mut deep = AnyValue {
        value: Some(Value::IntValue(1)),
    };
    for _ in 0..120 {
        deep = AnyValue {
            value: Some(Value::ArrayValue(ArrayValue { values: vec![deep] })),
        };
    }
    let deep = request(
        vec![LogRecord {
            body: Some(deep),
            ..Default::default()
        }],
        None,
    )
    .encode_to_vec();
    let text = |s: &str| s.as_bytes().to_vec();
    vec![
        ("valid-rich.pb", rich_pb.clone()),
        ("valid-fifty-records.pb", many),
        ("valid-rich.json", rich_json),
        (
            "valid-spec-example.json",
            text(
                r#"{"resourceLogs":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"my.service"}}]},"scopeLogs":[{"scope":{"name":"my.library","version":"1.0.0","attributes":[{"key":"my.scope.attribute","value":{"stringValue":"some scope attribute"}}]},"logRecords":[{"timeUnixNano":"1544712660300000000","observedTimeUnixNano":"1544712660300000000","severityNumber":10,"severityText":"Information","traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","body":{"stringValue":"Example log record"},"attributes":[{"key":"string.attribute","value":{"stringValue":"some string"}},{"key":"boolean.attribute","value":{"boolValue":true}},{"key":"int.attribute","value":{"intValue":"10"}},{"key":"double.attribute","value":{"doubleValue":637.704}},{"key":"array.attribute","value":{"arrayValue":{"values":[{"stringValue":"many"},{"stringValue":"values"}]}}},{"key":"map.attribute","value":{"kvlistValue":{"values":[{"key":"some.map.key","value":{"stringValue":"some value"}}]}}}]}]}]}]}"#,
            ),
        ),
        ("infinite-double.pb", nan),
        ("invalid-stream.pb", bad_stream),
        ("nul-in-body.pb", nul),
        ("nested-121.pb", deep),
        ("truncated.pb", rich_pb[..rich_pb.len() / 2].to_vec()),
        ("empty.pb", Vec::new()),
        (
            "wrong-types.json",
            text(
                r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"timeUnixNano":true,"traceId":12,"body":"x"}]}]}]}"#,
            ),
        ),
        (
            "bad-hex.json",
            text(
                r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"traceId":"xyz","spanId":"0"}]}]}]}"#,
            ),
        ),
        (
            "int-as-number-and-string.json",
            text(
                r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"timeUnixNano":1,"observedTimeUnixNano":"18446744073709551615","body":{"intValue":"-9223372036854775808"}}]}]}]}"#,
            ),
        ),
    ]
}
