//! One syslog message to one record: parsing (RFC 5424, then RFC 3164, by
//! `syslog_loose`), the stream template and the payload.
//!
//! The record is held to the push API's own rules: its payload to
//! [`dcs_shared::record::validate_payload`] and the stream's JSON Schema, its
//! stream to [`dcs_shared::record::validate_stream`] (a template's expansion
//! here, literal templates and the fallback at start-up), its timestamp to
//! [`dcs_shared::record::parse_ts`].

use dcs_shared::record::{self, FieldError, Limits, Record};
use serde::Serialize;
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

/// Parses `raw` (one frame or datagram) from `sender` (its `ip:port`) into
/// a record.
///
/// The payload is written straight from the parsed message (keys in sorted
/// order, as a JSON object map would give them) and then held to the push
/// API's payload checks ([`record::validate_payload`]) and the stream's JSON
/// Schema. The stream needs no check here: a template's expansion is checked
/// below, and literal templates and the fallback were checked at start-up.
pub fn to_record(raw: &[u8], sender: &str, recipe: &Recipe, schemas: &Schemas) -> Outcome {
    let text = String::from_utf8_lossy(raw);
    let text = text.trim_end_matches(['\n', '\r', '\0']);
    let parsed = parse(text);
    let (payload, stream, fell_back, ts_us) = match &parsed {
        Some(message) => {
            let expanded = recipe.stream.expand(message);
            let (stream, fell_back) = match record::validate_stream(&expanded) {
                Ok(()) => (expanded, false),
                Err(_) => (recipe.fallback_stream.clone(), true),
            };
            // A date the record checks cannot take (year 0, 10000) is
            // dropped: the agent's receive time stands in, and the message
            // is kept.
            let ts_us = message
                .timestamp
                .and_then(|t| record::parse_ts(&t.to_rfc3339()).ok());
            (Payload::parsed(message, sender), stream, fell_back, ts_us)
        }
        None => {
            let template_is_fixed = recipe.stream.is_literal();
            let stream = if template_is_fixed {
                recipe.stream.expand(&empty_message())
            } else {
                recipe.fallback_stream.clone()
            };
            (
                Payload::unparsed(text, sender),
                stream,
                !template_is_fixed,
                None,
            )
        }
    };
    let payload = serde_json::to_string(&payload).expect("a payload of strings serializes");
    if let Err(reason) = record::validate_payload(&payload, &recipe.limits) {
        return Outcome::Invalid(vec![FieldError::new(0, "payload", reason)]);
    }
    let record = Record {
        id: None,
        stream,
        ts_us,
        payload,
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

/// A record's payload, borrowed from the message. Fields in alphabetical
/// order: the same bytes a `serde_json::Map` (a sorted map) would write.
#[derive(Serialize)]
struct Payload<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    appname: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    facility: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a str>,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    msgid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    procid: Option<ProcIdValue<'a>>,
    protocol: &'static str,
    sender: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    severity: Option<&'static str>,
    /// Element id to its parameters; a repeated id or name keeps the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    structured_data: Option<Map<String, Value>>,
}

/// A process id as sent: a number when it is one, else its text.
#[derive(Serialize)]
#[serde(untagged)]
enum ProcIdValue<'a> {
    Pid(i32),
    Name(&'a str),
}

impl<'a> Payload<'a> {
    fn parsed(message: &'a Message<&'a str>, sender: &'a str) -> Self {
        let structured_data = (!message.structured_data.is_empty()).then(|| {
            message
                .structured_data
                .iter()
                .map(|element| {
                    let params: Map<String, Value> = element
                        .params()
                        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                        .collect();
                    (element.id.to_owned(), Value::Object(params))
                })
                .collect()
        });
        Payload {
            appname: message.appname,
            facility: message.facility.map(|f| f.as_str()),
            host: message.hostname,
            message: message.msg,
            msgid: message.msgid,
            procid: message.procid.as_ref().map(|p| match p {
                ProcId::PID(pid) => ProcIdValue::Pid(*pid),
                ProcId::Name(name) => ProcIdValue::Name(name),
            }),
            protocol: match message.protocol {
                syslog_loose::Protocol::RFC5424(_) => "rfc5424",
                syslog_loose::Protocol::RFC3164 => "rfc3164",
            },
            sender,
            severity: message.severity.map(|s| s.as_str()),
            structured_data,
        }
    }

    /// Text that is not syslog, kept whole.
    fn unparsed(text: &'a str, sender: &'a str) -> Self {
        Payload {
            appname: None,
            facility: None,
            host: None,
            message: text,
            msgid: None,
            procid: None,
            protocol: "unparsed",
            sender,
            severity: None,
            structured_data: None,
        }
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

    fn sender() -> &'static str {
        "192.0.2.7:514"
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
