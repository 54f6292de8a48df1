//! One syslog message to one record: parsing (RFC 5424, then RFC 3164, by
//! `syslog_loose`), the stream template and the payload.
//!
//! The record then goes through the push API's own checks
//! ([`dcs_shared::record::validate_incoming`] and the stream's JSON Schema),
//! so a syslog record is held to exactly the rules of a pushed one.

use std::net::SocketAddr;

use dcs_shared::record::{self, FieldError, IncomingRecord, Limits, Record};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use syslog_loose::{Message, ProcId, Variant};

use crate::schema::Schemas;

/// A `stream` setting compiled once at start-up: literal text and fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

/// The message fields a stream template may name, as `${name}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    AppName,
    Hostname,
    Facility,
    Severity,
    MsgId,
}

impl Field {
    const ALL: [(&'static str, Field); 5] = [
        ("appname", Field::AppName),
        ("hostname", Field::Hostname),
        ("facility", Field::Facility),
        ("severity", Field::Severity),
        ("msgid", Field::MsgId),
    ];
}

impl StreamTemplate {
    /// Compiles `text`; the error names the first unknown or unclosed field.
    pub fn compile(text: &str) -> Result<StreamTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("{text:?}: \"${{\" without a closing \"}}\""))?;
            let name = &after[..end];
            let field = Field::ALL
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, f)| *f)
                .ok_or_else(|| {
                    let known: Vec<String> = Field::ALL
                        .iter()
                        .map(|(n, _)| format!("${{{n}}}"))
                        .collect();
                    format!("unknown field ${{{name}}}; use {}", known.join(", "))
                })?;
            parts.push(Part::Field(field));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        let template = StreamTemplate { parts };
        if template.is_literal() {
            record::validate_stream(text).map_err(|reason| format!("{text:?} {reason}"))?;
        }
        Ok(template)
    }

    fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// The stream for `message`. Field values are lowercased, since stream
    /// names are; a missing field expands to nothing.
    fn expand(&self, message: &Message<&str>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Field(field) => {
                    let value = match field {
                        Field::AppName => message.appname,
                        Field::Hostname => message.hostname,
                        Field::Facility => message.facility.map(|f| f.as_str()),
                        Field::Severity => message.severity.map(|s| s.as_str()),
                        Field::MsgId => message.msgid,
                    };
                    out.extend(value.unwrap_or("").chars().flat_map(char::to_lowercase));
                }
            }
        }
        out
    }
}

/// How one listener turns messages into records.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub stream: StreamTemplate,
    /// Used when the template expands to something that is not a valid
    /// stream name: the message is kept, never refused for its stream.
    pub fallback_stream: String,
    pub limits: Limits,
}

/// What became of one message.
#[derive(Debug)]
pub enum Outcome {
    /// A record; `fell_back` when the template's expansion was not a valid
    /// stream, `parsed` false when the text was not syslog and is kept raw.
    Record {
        record: Record,
        fell_back: bool,
        parsed: bool,
    },
    /// Refused by the record checks (size, the stream's JSON Schema).
    Invalid(Vec<FieldError>),
}

/// Parses `raw` (one frame or datagram) from `sender` into a record.
pub fn to_record(raw: &[u8], sender: SocketAddr, recipe: &Recipe, schemas: &Schemas) -> Outcome {
    let text = String::from_utf8_lossy(raw);
    let text = text.trim_end_matches(['\n', '\r', '\0']);
    let parsed = parse(text);
    let mut payload = Map::new();
    let (stream, fell_back, ts) = match &parsed {
        Some(message) => {
            fill_payload(&mut payload, message);
            let expanded = recipe.stream.expand(message);
            let (stream, fell_back) = match record::validate_stream(&expanded) {
                Ok(()) => (expanded, false),
                Err(_) => (recipe.fallback_stream.clone(), true),
            };
            // A date the record checks cannot take (year 0, 10000) is
            // dropped: the agent's receive time stands in, and the message
            // is kept.
            let ts = message
                .timestamp
                .map(|t| t.to_rfc3339())
                .filter(|t| record::parse_ts(t).is_ok());
            (stream, fell_back, ts)
        }
        None => {
            payload.insert("message".into(), Value::String(text.to_owned()));
            payload.insert("protocol".into(), Value::String("unparsed".into()));
            let template_is_fixed = recipe.stream.is_literal();
            let stream = if template_is_fixed {
                recipe.stream.expand(&empty_message())
            } else {
                recipe.fallback_stream.clone()
            };
            (stream, !template_is_fixed, None)
        }
    };
    payload.insert("sender".into(), Value::String(sender.to_string()));
    let payload = Value::Object(payload).to_string();
    let stream_json = Value::String(stream).to_string();
    let ts_json = ts.map(|t| Value::String(t).to_string());
    let raw_value = |json: &str| -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).expect("serde_json output is valid JSON")
    };
    let (stream_raw, payload_raw) = (raw_value(&stream_json), raw_value(&payload));
    let ts_raw = ts_json.as_deref().map(raw_value);
    let incoming = IncomingRecord {
        stream: Some(&*stream_raw),
        payload: Some(&*payload_raw),
        id: None,
        ts: ts_raw.as_deref(),
    };
    let mut errors = Vec::new();
    let Some(record) = record::validate_incoming(0, &incoming, &recipe.limits, &mut errors) else {
        return Outcome::Invalid(errors);
    };
    if let Err(violations) = schemas.check(&record.stream, &record.payload) {
        return Outcome::Invalid(
            violations
                .iter()
                .map(|v| FieldError::new(0, &v.field(), v.reason()))
                .collect(),
        );
    }
    Outcome::Record {
        record,
        fell_back,
        parsed: parsed.is_some(),
    }
}

/// RFC 5424 first, then RFC 3164; `None` when the text is neither.
fn parse(text: &str) -> Option<Message<&str>> {
    syslog_loose::parse_message_with_year_exact(text, year_of, Variant::Either).ok()
}

/// RFC 3164 timestamps have no year: the current one, unless that would put
/// the message more than a month in the future (a December message read in
/// January belongs to last year).
fn year_of((month, ..): syslog_loose::IncompleteDate) -> i32 {
    let now = time::OffsetDateTime::now_utc();
    let this_month = u32::from(u8::from(now.month()));
    if month > this_month + 1 {
        now.year() - 1
    } else {
        now.year()
    }
}

fn empty_message() -> Message<&'static str> {
    Message {
        protocol: syslog_loose::Protocol::RFC3164,
        facility: None,
        severity: None,
        timestamp: None,
        hostname: None,
        appname: None,
        procid: None,
        msgid: None,
        structured_data: Vec::new(),
        msg: "",
    }
}

fn fill_payload(payload: &mut Map<String, Value>, message: &Message<&str>) {
    let mut put = |key: &str, value: Option<&str>| {
        if let Some(v) = value {
            payload.insert(key.into(), Value::String(v.to_owned()));
        }
    };
    put("host", message.hostname);
    put("appname", message.appname);
    put("msgid", message.msgid);
    put("facility", message.facility.map(|f| f.as_str()));
    put("severity", message.severity.map(|s| s.as_str()));
    match &message.procid {
        Some(ProcId::PID(pid)) => {
            payload.insert("procid".into(), Value::from(*pid));
        }
        Some(ProcId::Name(name)) => {
            payload.insert("procid".into(), Value::String((*name).to_owned()));
        }
        None => {}
    }
    if !message.structured_data.is_empty() {
        let mut elements = Map::new();
        for element in &message.structured_data {
            let params: Map<String, Value> = element
                .params()
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect();
            elements.insert(element.id.to_owned(), Value::Object(params));
        }
        payload.insert("structured_data".into(), Value::Object(elements));
    }
    payload.insert("message".into(), Value::String(message.msg.to_owned()));
    let protocol = match message.protocol {
        syslog_loose::Protocol::RFC5424(_) => "rfc5424",
        syslog_loose::Protocol::RFC3164 => "rfc3164",
    };
    payload.insert("protocol".into(), Value::String(protocol.into()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(stream: &str) -> Recipe {
        Recipe {
            stream: StreamTemplate::compile(stream).unwrap(),
            fallback_stream: "syslog".into(),
            limits: Limits::default(),
        }
    }

    fn sender() -> SocketAddr {
        "192.0.2.7:514".parse().unwrap()
    }

    fn record(raw: &str, stream: &str) -> (Record, bool, bool, Value) {
        match to_record(
            raw.as_bytes(),
            sender(),
            &recipe(stream),
            &Schemas::default(),
        ) {
            Outcome::Record {
                record,
                fell_back,
                parsed,
            } => {
                let payload = serde_json::from_str(&record.payload).unwrap();
                (record, fell_back, parsed, payload)
            }
            Outcome::Invalid(e) => panic!("{raw}: {e:?}"),
        }
    }

    #[test]
    fn an_rfc5424_message_fills_every_payload_field_and_the_timestamp() {
        let (record, fell_back, parsed, payload) = record(
            r#"<165>1 2026-12-06T03:04:05.123456Z web1 nginx 4242 ACCESS [req@32473 path="/x" code="200"] GET /x"#,
            "syslog.${appname}",
        );
        assert!(parsed && !fell_back);
        assert_eq!(record.stream, "syslog.nginx");
        assert_eq!(
            record.ts_us,
            Some(record::parse_ts("2026-12-06T03:04:05.123456Z").unwrap())
        );
        assert_eq!(
            payload,
            serde_json::json!({
                "host": "web1", "appname": "nginx", "procid": 4242, "msgid": "ACCESS",
                "facility": "local4", "severity": "notice",
                "structured_data": {"req@32473": {"path": "/x", "code": "200"}},
                "message": "GET /x", "protocol": "rfc5424", "sender": "192.0.2.7:514"
            })
        );
    }

    #[test]
    fn an_rfc3164_message_is_parsed_and_its_fields_expand_lowercased() {
        let (record, fell_back, _, payload) = record(
            "<78>Dec  6 03:04:05 host-a CRON[991]: (root) CMD (run-parts)",
            "${facility}.${appname}",
        );
        assert!(!fell_back);
        assert_eq!(record.stream, "cron.cron");
        assert_eq!(payload["appname"], "CRON");
        assert_eq!(payload["procid"], 991);
        assert_eq!(payload["protocol"], "rfc3164");
        assert!(record.ts_us.is_some());
    }

    #[test]
    fn an_expansion_that_is_not_a_stream_name_falls_back_to_the_default_stream() {
        let (record, fell_back, parsed, _) = record(
            "<13>1 2026-12-06T03:04:05Z h my/app - - - text",
            "app.${appname}",
        );
        assert!(parsed && fell_back);
        assert_eq!(record.stream, "syslog");
    }

    #[test]
    fn text_that_is_not_syslog_is_kept_raw() {
        let (record, _, parsed, payload) = record("\u{1}\u{2} not syslog at all", "syslog");
        assert!(!parsed);
        assert_eq!(record.stream, "syslog");
        assert_eq!(payload["protocol"], "unparsed");
        assert_eq!(payload["message"], "\u{1}\u{2} not syslog at all");
        assert_eq!(record.ts_us, None);
    }

    #[test]
    fn a_message_larger_than_the_payload_limit_is_invalid_not_truncated() {
        let mut r = recipe("syslog");
        r.limits.max_payload_bytes = 100;
        let raw = format!("<13>1 - h a - - - {}", "x".repeat(200));
        let outcome = to_record(raw.as_bytes(), sender(), &r, &Schemas::default());
        assert!(
            matches!(&outcome, Outcome::Invalid(e) if e[0].field == "payload"),
            "{outcome:?}"
        );
    }

    #[test]
    fn templates_naming_unknown_fields_or_invalid_literals_are_refused() {
        for (template, fragment) in [
            ("syslog.${program}", "unknown field ${program}"),
            ("syslog.${appname", "without a closing"),
            ("Syslog", "Syslog"),
        ] {
            let err = StreamTemplate::compile(template).unwrap_err();
            assert!(err.contains(fragment), "{template}: {err}");
        }
        StreamTemplate::compile("logs.${hostname}.${severity}").unwrap();
    }
}
