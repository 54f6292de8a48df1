//! Per-stream JSON Schema validation (`[streams."NAME"]`, see
//! docs/SOURCES.md).
//!
//! # Design constraints
//! - Schemas are compiled once, at start-up; a schema that does not compile
//!   stops the agent with the key that names it. Nothing is compiled per
//!   request.
//! - A schema must be self-contained: the engine (`boon`) is given a URL
//!   loader that refuses every URL, so a `$ref` to anything but the schema
//!   itself (or the standard meta-schemas it embeds) fails to compile
//!   instead of making the agent fetch URLs or read files at run time.
//! - The engine is `boon`, an interpreter of the compiled schema, not
//!   `jsonschema`: the agent runs on client VMs, and `jsonschema` with its
//!   two regex engines and format checkers was a quarter of the agent's
//!   binary (docs/PERFORMANCE.md, "Footprint"). Both pass the official
//!   JSON-Schema-Test-Suite for the drafts the agent accepts.
//! - `format` is asserted (`"format": "date-time"` refuses `"yesterday"`):
//!   an operator who writes it expects it checked.
//! - The schema applies to the record's `payload`, for pushed and pulled
//!   records alike, after the shared record rules
//!   (`dcs_shared::record`) passed. Streams without a schema are not parsed
//!   a second time.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use dcs_shared::config::Issues;

/// Problems reported per record: enough to fix a producer, bounded so a
/// record that is wrong everywhere cannot make a huge response.
pub const MAX_ERRORS_PER_RECORD: usize = 10;

/// `[streams."NAME"]`: settings of one stream.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// A JSON Schema file (JSON) every payload of the stream must match.
    #[serde(default)]
    pub schema_file: Option<PathBuf>,
    /// Or the schema itself, as JSON text.
    #[serde(default)]
    pub schema: Option<String>,
}

/// One way a payload fails its stream's schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaViolation {
    /// JSON pointer into the payload (`""` for the payload itself).
    pub instance_path: String,
    /// The schema keyword that failed, as a JSON pointer into the schema.
    pub schema_path: String,
    pub message: String,
}

impl SchemaViolation {
    /// The field as the ingest API names it: `payload` or `payload/a/0`.
    pub fn field(&self) -> String {
        format!("payload{}", self.instance_path)
    }

    /// The reason as the ingest API and the dead letters give it.
    pub fn reason(&self) -> String {
        format!("{} (schema {})", self.message, self.schema_path)
    }
}

/// One stream's compiled schema: boon keeps compiled schemas in a
/// collection and hands out an index into it.
#[cfg(feature = "json-schema")]
struct Validator {
    schemas: boon::Schemas,
    root: boon::SchemaIndex,
}

/// Without the `json-schema` feature no schema compiles, so none exists.
#[cfg(not(feature = "json-schema"))]
enum Validator {}

/// The compiled schemas by stream name.
#[derive(Clone, Default)]
pub struct Schemas {
    by_stream: HashMap<String, Arc<Validator>>,
}

impl std::fmt::Debug for Schemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.by_stream.keys().collect();
        names.sort();
        f.debug_struct("Schemas").field("streams", &names).finish()
    }
}

impl Schemas {
    /// Compiles every stream's schema; each problem is added to `issues`
    /// under `streams."NAME".schema_file` or `.schema`.
    pub fn compile(streams: &BTreeMap<String, StreamConfig>, issues: &mut Issues) -> Schemas {
        let mut by_stream = HashMap::new();
        for (name, stream) in streams {
            let key = |k: &str| format!("streams.{name:?}.{k}");
            if let Err(reason) = dcs_shared::record::validate_stream(name) {
                issues.check(false, &format!("streams.{name:?}"), reason.to_string());
            }
            let (k, text) = match (&stream.schema_file, &stream.schema) {
                (Some(_), Some(_)) => {
                    issues.check(false, &key("schema"), "set schema or schema_file, not both");
                    continue;
                }
                (None, None) => continue,
                (Some(path), None) => match std::fs::read_to_string(path) {
                    Ok(text) => (key("schema_file"), text),
                    Err(e) => {
                        issues.check(
                            false,
                            &key("schema_file"),
                            format!("cannot read {}: {e}", path.display()),
                        );
                        continue;
                    }
                },
                (None, Some(text)) => (key("schema"), text.clone()),
            };
            match compile_one(&text) {
                Ok(v) => {
                    by_stream.insert(name.clone(), Arc::new(v));
                }
                Err(reason) => issues.check(false, &k, reason),
            }
        }
        Schemas { by_stream }
    }

    pub fn is_empty(&self) -> bool {
        self.by_stream.is_empty()
    }

    pub fn has(&self, stream: &str) -> bool {
        self.by_stream.contains_key(stream)
    }

    /// Checks one payload (JSON text of an object) against its stream's
    /// schema. A stream without a schema accepts everything.
    pub fn check(&self, stream: &str, payload: &str) -> Result<(), Vec<SchemaViolation>> {
        let Some(validator) = self.by_stream.get(stream) else {
            return Ok(());
        };
        let value: serde_json::Value = match serde_json::from_str(payload) {
            Ok(v) => v,
            // The shared record rules parse the payload before this; keep a
            // clear answer anyway rather than a panic.
            Err(e) => {
                return Err(vec![SchemaViolation {
                    instance_path: String::new(),
                    schema_path: String::new(),
                    message: format!("not valid JSON: {e}"),
                }]);
            }
        };
        let violations = violations(validator, &value);
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }
}

#[cfg(not(feature = "json-schema"))]
fn violations(validator: &Validator, _: &serde_json::Value) -> Vec<SchemaViolation> {
    match *validator {}
}

#[cfg(feature = "json-schema")]
fn violations(validator: &Validator, value: &serde_json::Value) -> Vec<SchemaViolation> {
    let Err(error) = validator.schemas.validate(value, validator.root) else {
        return Vec::new();
    };
    // The basic output is the flat list of failed keywords (the leaves of
    // boon's error tree, plus `allOf`/`oneOf`-style branches), each with
    // the keyword's location in the schema and the value's in the payload.
    let output = error.basic_output();
    let units = match &output.error {
        boon::OutputError::Branch(units) => units.iter().collect(),
        boon::OutputError::Leaf(_) => vec![&output],
    };
    units
        .into_iter()
        .filter_map(|unit| match unit.error {
            boon::OutputError::Leaf(kind) => Some((unit, kind)),
            boon::OutputError::Branch(_) => None,
        })
        .take(MAX_ERRORS_PER_RECORD)
        .map(|(unit, kind)| {
            let instance_path = unit.instance_location.to_string();
            SchemaViolation {
                message: message(value.pointer(&instance_path), kind),
                instance_path,
                schema_path: unit.keyword_location.clone(),
            }
        })
        .collect()
}

/// The reason for one failed keyword. The offending value goes in front
/// when it is a scalar the engine's text leaves out (`"hot": want number,
/// but got string`), so a producer sees what it sent; objects and arrays
/// are named by the field alone. The text is cut at `MAX_MESSAGE_CHARS`, so
/// a huge string cannot make a huge response.
#[cfg(feature = "json-schema")]
fn message(value: Option<&serde_json::Value>, kind: &boon::ErrorKind<'_, '_>) -> String {
    const MAX_MESSAGE_CHARS: usize = 200;
    use boon::ErrorKind::{Format, MultipleOf, Pattern};
    let names_value = matches!(kind, Format { .. } | Pattern { .. } | MultipleOf { .. });
    let text = match value {
        Some(v) if !names_value && !v.is_object() && !v.is_array() => format!("{v}: {kind}"),
        _ => kind.to_string(),
    };
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

#[cfg(not(feature = "json-schema"))]
fn compile_one(_: &str) -> Result<Validator, String> {
    Err("this dcs-edge was built without JSON Schema support (cargo feature json-schema)".into())
}

/// Parses and compiles one schema, with `format` asserted.
#[cfg(feature = "json-schema")]
fn compile_one(text: &str) -> Result<Validator, String> {
    /// Refuses every URL the schema refers to (see the module's design
    /// constraints): the standard meta-schemas are built into boon and
    /// never reach a loader.
    struct NoFetch;
    impl boon::UrlLoader for NoFetch {
        fn load(&self, url: &str) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
            Err(format!("{url}: a schema must be self-contained; the agent fetches nothing").into())
        }
    }
    // Where the schema itself lives for boon; `$ref`s relative to it
    // resolve to other URLs there, which NoFetch refuses.
    const LOCATION: &str = "urn:dcs:stream-schema";

    let schema: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    if !schema.is_object() && !schema.is_boolean() {
        return Err("a JSON Schema is an object (or true/false)".into());
    }
    let mut compiler = boon::Compiler::new();
    compiler.set_default_draft(boon::Draft::V2020_12);
    compiler.enable_format_assertions();
    compiler.use_loader(Box::new(NoFetch));
    let invalid = |e: boon::CompileError| format!("not a valid JSON Schema: {e:#}");
    let mut schemas = boon::Schemas::new();
    compiler.add_resource(LOCATION, schema).map_err(invalid)?;
    let root = compiler.compile(LOCATION, &mut schemas).map_err(invalid)?;
    Ok(Validator { schemas, root })
}

/// All violations of one pulled record as one dead-letter reason.
pub fn dead_letter_reason(violations: &[SchemaViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field(), v.reason()))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(all(test, feature = "json-schema"))]
mod tests {
    use super::*;

    const READINGS: &str = r#"{
        "type": "object",
        "required": ["sensor", "value"],
        "properties": {
            "sensor": {"type": "string"},
            "value": {"type": "number", "minimum": -50},
            "at": {"type": "string", "format": "date-time"},
            "tags": {"type": "array", "items": {"type": "string"}}
        }
    }"#;

    fn schemas(entries: &[(&str, StreamConfig)]) -> Result<Schemas, String> {
        let map = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let mut issues = Issues::default();
        let s = Schemas::compile(&map, &mut issues);
        issues.into_result().map(|_| s).map_err(|e| e.to_string())
    }

    fn inline(text: &str) -> StreamConfig {
        StreamConfig {
            schema: Some(text.into()),
            schema_file: None,
        }
    }

    #[test]
    fn a_payload_is_checked_against_its_own_stream_only() {
        let s = schemas(&[("readings", inline(READINGS))]).unwrap();
        assert!(
            s.check("readings", r#"{"sensor":"t1","value":3.5}"#)
                .is_ok()
        );
        assert!(s.check("other", r#"{"anything":true}"#).is_ok());
        assert!(s.has("readings") && !s.has("other"));
    }

    #[test]
    fn each_violation_names_the_field_and_the_keyword() {
        let s = schemas(&[("readings", inline(READINGS))]).unwrap();
        let v = s
            .check(
                "readings",
                r#"{"sensor":"t1","value":"hot","tags":["a",3]}"#,
            )
            .unwrap_err();
        let fields: Vec<String> = v.iter().map(|v| v.field()).collect();
        assert!(fields.contains(&"payload/value".to_string()), "{v:?}");
        assert!(fields.contains(&"payload/tags/1".to_string()), "{v:?}");
        let value = v.iter().find(|v| v.instance_path == "/value").unwrap();
        assert_eq!(value.schema_path, "/properties/value/type");
        assert!(
            value.reason().starts_with("\"hot\": "),
            "{}",
            value.reason()
        );
        assert!(value.reason().ends_with("(schema /properties/value/type)"));

        let missing = s.check("readings", r#"{"value":1}"#).unwrap_err();
        assert_eq!(missing[0].field(), "payload");
        assert!(missing[0].message.contains("sensor"), "{missing:?}");
    }

    #[test]
    fn formats_are_asserted() {
        let s = schemas(&[("readings", inline(READINGS))]).unwrap();
        assert!(
            s.check(
                "readings",
                r#"{"sensor":"a","value":1,"at":"2026-12-04T10:00:00Z"}"#
            )
            .is_ok()
        );
        let v = s
            .check("readings", r#"{"sensor":"a","value":1,"at":"yesterday"}"#)
            .unwrap_err();
        assert_eq!(v[0].field(), "payload/at");
        assert!(
            v[0].message.contains("is not valid date-time")
                && v[0].message.matches("yesterday").count() == 1,
            "the value is named once: {}",
            v[0].message
        );
    }

    #[test]
    fn errors_per_record_are_bounded() {
        let s = schemas(&[(
            "s",
            inline(r#"{"additionalProperties": {"type": "string"}}"#),
        )])
        .unwrap();
        let many: serde_json::Map<String, serde_json::Value> =
            (0..50).map(|i| (format!("f{i}"), i.into())).collect();
        let v = s
            .check("s", &serde_json::Value::Object(many).to_string())
            .unwrap_err();
        assert_eq!(v.len(), MAX_ERRORS_PER_RECORD);
    }

    #[test]
    fn a_bad_schema_is_refused_with_its_key() {
        for (config, key) in [
            (
                inline(r#"{"type": "nope"}"#),
                r#"streams."readings".schema"#,
            ),
            (inline("{not json"), r#"streams."readings".schema"#),
            (inline("[1]"), r#"streams."readings".schema"#),
            (
                inline(r#"{"$ref": "https://example.com/remote.json"}"#),
                r#"streams."readings".schema"#,
            ),
            (
                inline(r#"{"$ref": "file:///etc/passwd"}"#),
                r#"streams."readings".schema"#,
            ),
            (
                inline(r#"{"$ref": "other.json"}"#),
                r#"streams."readings".schema"#,
            ),
            (
                inline(r#"{"properties": {"a": {"pattern": "("}}}"#),
                r#"streams."readings".schema"#,
            ),
            // Look-around has no linear-time engine: refused, not run
            // with backtracking on every record.
            (
                inline(r#"{"properties": {"a": {"pattern": "^(?!x)"}}}"#),
                r#"streams."readings".schema"#,
            ),
            (
                inline(r#"{"properties": {"a": {"pattern": "(a)\\1"}}}"#),
                r#"streams."readings".schema"#,
            ),
            (
                StreamConfig {
                    schema_file: Some("/nonexistent/readings.json".into()),
                    schema: None,
                },
                r#"streams."readings".schema_file"#,
            ),
            (
                StreamConfig {
                    schema_file: Some("/x.json".into()),
                    schema: Some("{}".into()),
                },
                r#"streams."readings".schema"#,
            ),
        ] {
            let err = schemas(&[("readings", config.clone())]).unwrap_err();
            assert!(err.contains(key), "{config:?}: {key} missing from {err}");
        }
        let err = schemas(&[("Bad Name", inline("{}"))]).unwrap_err();
        assert!(err.contains(r#"streams."Bad Name""#), "{err}");
    }

    #[test]
    fn refs_inside_the_schema_and_to_the_standard_drafts_compile() {
        let s = schemas(&[(
            "s",
            inline(
                r##"{"$schema": "http://json-schema.org/draft-07/schema#",
                    "definitions": {"level": {"enum": ["info", "warn"]}},
                    "properties": {"level": {"$ref": "#/definitions/level"}}}"##,
            ),
        )])
        .unwrap();
        assert!(s.check("s", r#"{"level":"info"}"#).is_ok());
        let v = s.check("s", r#"{"level":"loud"}"#).unwrap_err();
        assert_eq!(v[0].field(), "payload/level");
        assert!(
            v[0].schema_path.starts_with("/properties/level/$ref"),
            "{v:?}"
        );
    }

    #[test]
    fn a_long_offending_value_is_cut_in_the_reason() {
        let s = schemas(&[("s", inline(r#"{"properties": {"a": {"maxLength": 3}}}"#))]).unwrap();
        let long = "x".repeat(10_000);
        let v = s.check("s", &format!(r#"{{"a":"{long}"}}"#)).unwrap_err();
        assert!(v[0].message.len() < 300, "{}", v[0].message);
        assert!(v[0].message.starts_with("\"xxx"), "{}", v[0].message);

        let s = schemas(&[("s", inline(r#"{"properties": {"a": {"pattern": "^y"}}}"#))]).unwrap();
        let v = s.check("s", &format!(r#"{{"a":"{long}"}}"#)).unwrap_err();
        assert!(v[0].message.len() < 300, "{}", v[0].message);
    }

    #[test]
    fn a_schema_file_is_read_at_compile_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("readings.json");
        std::fs::write(&path, READINGS).unwrap();
        let s = schemas(&[(
            "readings",
            StreamConfig {
                schema_file: Some(path.clone()),
                schema: None,
            },
        )])
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(s.check("readings", r#"{"value":1}"#).is_err());
    }
}
