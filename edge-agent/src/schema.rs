//! Per-stream JSON Schema validation (`[streams."NAME"]`, see
//! docs/SOURCES.md).
//!
//! # Design constraints
//! - Schemas are compiled once, at start-up; a schema that does not compile
//!   stops the agent with the key that names it. Nothing is compiled per
//!   request.
//! - A schema must be self-contained: the `jsonschema` crate is built
//!   without its remote and file resolvers, so a `$ref` to anything but the
//!   schema itself (or the standard meta-schemas it embeds) fails to compile
//!   instead of making the agent fetch URLs or read files at run time.
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

#[cfg(feature = "json-schema")]
type Validator = jsonschema::Validator;

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
    validator
        .iter_errors(value)
        .take(MAX_ERRORS_PER_RECORD)
        .map(|e| SchemaViolation {
            instance_path: e.instance_path().as_str().to_owned(),
            schema_path: e.schema_path().as_str().to_owned(),
            message: e.to_string(),
        })
        .collect()
}

#[cfg(not(feature = "json-schema"))]
fn compile_one(_: &str) -> Result<Validator, String> {
    Err("this dcs-edge was built without JSON Schema support (cargo feature json-schema)".into())
}

/// Parses and compiles one schema, with `format` asserted.
#[cfg(feature = "json-schema")]
fn compile_one(text: &str) -> Result<Validator, String> {
    let schema: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    if !schema.is_object() && !schema.is_boolean() {
        return Err("a JSON Schema is an object (or true/false)".into());
    }
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .map_err(|e| format!("not a valid JSON Schema: {e}"))
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
        assert!(value.reason().contains("\"hot\""), "{}", value.reason());

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
