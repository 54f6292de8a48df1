//! Record transforms: a fixed field mapping applied to each pulled record's
//! payload before it is validated and buffered (`[sources.transform]`, see
//! docs/SOURCES.md).
//!
//! # Design constraints
//! - Deterministic: the steps always run in one order, `rename`, `drop`,
//!   `select`, `set`, and rules whose outcome would depend on an order
//!   *within* a step (two renames onto one field, a rename chain `a → b`,
//!   `b → c`, a field both dropped and set) are refused at start-up, naming
//!   the key. What a transform does to a record can be read off its config.
//! - Fields are named as top-level keys (`"temp"`) or JSON pointers into
//!   nested objects (`"/meta/site"`, RFC 6901 with `~1` for `/` and `~0`
//!   for `~`). `select` takes top-level keys only.
//! - A rule whose field a record lacks does nothing. A record the transform
//!   cannot apply to (`set` through a field that is not an object) fails with
//!   a reason and becomes a dead letter, like any other refused pulled item.
//! - The payload of a transformed record is re-serialised by serde_json: keys
//!   come out sorted, and numbers outside 64-bit integers or doubles are
//!   rounded. A source without a transform keeps its items' exact text.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::{Map, Value};

use dcs_shared::config::Issues;

/// `[sources.transform]` as written in the config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// Moves a field: `{ "old" = "new", "/a/b" = "flat_b" }`.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Removes fields.
    #[serde(default)]
    pub drop: Vec<String>,
    /// When present, keeps only these top-level fields (after renames).
    #[serde(default)]
    pub select: Option<Vec<String>>,
    /// Sets fields to constants, overwriting what the record had.
    #[serde(default)]
    pub set: BTreeMap<String, Value>,
}

/// A field: the keys from the payload's root down to it.
type FieldPath = Vec<String>;

/// A validated transform, ready to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Transform {
    renames: Vec<(FieldPath, FieldPath)>,
    drops: Vec<FieldPath>,
    select: Option<BTreeSet<String>>,
    sets: Vec<(FieldPath, Value)>,
}

/// Parses a top-level name or a JSON pointer.
fn parse_field(field: &str) -> Result<FieldPath, String> {
    if field.is_empty() {
        return Err("a field name must not be empty".into());
    }
    let Some(pointer) = field.strip_prefix('/') else {
        return Ok(vec![field.to_owned()]);
    };
    let mut path = Vec::new();
    for raw in pointer.split('/') {
        if raw.is_empty() {
            return Err(format!(
                "{field:?}: a JSON pointer must not have empty parts"
            ));
        }
        if raw.replace("~0", "").replace("~1", "").contains('~') {
            return Err(format!(
                "{field:?}: '~' in a JSON pointer must be written ~0 ('~') or ~1 ('/')"
            ));
        }
        path.push(raw.replace("~1", "/").replace("~0", "~"));
    }
    Ok(path)
}

/// Two fields overlap when one is the other or lies inside it: rules on them
/// would interfere.
fn overlap(a: &FieldPath, b: &FieldPath) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

impl TransformConfig {
    /// Checks the rules and builds the transform; every problem is added to
    /// `issues` under `KEY.rename."old"`, `KEY.drop[1]` and so on.
    pub fn compile(&self, key: &str, issues: &mut Issues) -> Option<Transform> {
        let mut local = Problems::default();
        let problems = &mut local;
        let mut bad_fields = Vec::new();
        let mut field = |k: String, f: &str| match parse_field(f) {
            Ok(p) => Some((k, p)),
            Err(reason) => {
                bad_fields.push((k, reason));
                None
            }
        };
        let renames: Vec<_> = self
            .rename
            .iter()
            .filter_map(|(from, to)| {
                let k = format!("{key}.rename.{from:?}");
                let from = field(k.clone(), from)?.1;
                let (_, to) = field(k.clone(), to)?;
                Some((k, from, to))
            })
            .collect();
        let drops: Vec<_> = self
            .drop
            .iter()
            .enumerate()
            .filter_map(|(i, f)| field(format!("{key}.drop[{i}]"), f))
            .collect();
        let sets: Vec<_> = self
            .set
            .iter()
            .filter_map(|(f, v)| {
                field(format!("{key}.set.{f:?}"), f).map(|(k, p)| (k, p, v.clone()))
            })
            .collect();
        for (k, reason) in bad_fields {
            problems.check(false, &k, reason);
        }

        // Within a step: no two rules on overlapping fields.
        for (i, (k, from, to)) in renames.iter().enumerate() {
            for (_, from2, to2) in &renames[i + 1..] {
                problems.check(
                    !overlap(from, from2),
                    k,
                    "overlaps another renamed field; rename a field or its parent, not both",
                );
                problems.check(!overlap(to, to2), k, "two renames write the same field");
            }
            for (_, from2, _) in &renames {
                problems.check(
                    !overlap(to, from2),
                    k,
                    "renames onto a field another rename moves (chains such as a → b, b → c depend on order); rename directly",
                );
            }
        }
        for (i, (k, f)) in drops.iter().enumerate() {
            for (_, f2) in &drops[i + 1..] {
                problems.check(!overlap(f, f2), k, "overlaps another dropped field");
            }
            for (_, from, to) in &renames {
                // Dropping what is left of an object a field was moved out
                // of is fine (renames run first); anything else is not.
                let parent_of_moved = f.len() < from.len();
                problems.check(
                    (parent_of_moved || !overlap(f, from)) && !overlap(f, to),
                    k,
                    "is also renamed (or renamed onto); drop it or rename it, not both",
                );
            }
        }
        for (i, (k, f, _)) in sets.iter().enumerate() {
            for (_, f2, _) in &sets[i + 1..] {
                problems.check(!overlap(f, f2), k, "overlaps another set field");
            }
            for (_, from, to) in &renames {
                problems.check(
                    !overlap(f, from) && !overlap(f, to),
                    k,
                    "is also renamed (or renamed onto); a field is either mapped or set",
                );
            }
            for (_, d) in &drops {
                problems.check(
                    !overlap(f, d),
                    k,
                    "is also dropped; a field is either dropped or set",
                );
            }
        }
        let select = self.select.as_ref().map(|names| {
            for (i, name) in names.iter().enumerate() {
                problems.check(
                    !name.is_empty() && !name.starts_with('/'),
                    &format!("{key}.select[{i}]"),
                    "takes top-level field names, not JSON pointers",
                );
            }
            let names: BTreeSet<String> = names.iter().cloned().collect();
            for (k, _, to) in &renames {
                problems.check(
                    names.contains(&to[0]),
                    k,
                    format!(
                        "renames onto {:?}, which select does not keep; add it to select",
                        to[0]
                    ),
                );
            }
            names
        });
        if !local.0.is_empty() {
            for (k, reason) in local.0 {
                issues.check(false, &k, reason);
            }
            return None;
        }
        Some(Transform {
            renames: renames.into_iter().map(|(_, f, t)| (f, t)).collect(),
            drops: drops.into_iter().map(|(_, f)| f).collect(),
            select,
            sets: sets.into_iter().map(|(_, f, v)| (f, v)).collect(),
        })
    }
}

/// Problems found while compiling, kept apart so that `compile` knows
/// whether its own rules were all right.
#[derive(Default)]
struct Problems(Vec<(String, String)>);

impl Problems {
    fn check(&mut self, ok: bool, key: &str, reason: impl Into<String>) {
        if !ok {
            self.0.push((key.to_owned(), reason.into()));
        }
    }
}

impl Transform {
    /// Applies the transform to one payload (JSON text of an object) and
    /// returns the new payload's text, or why it could not be applied.
    pub fn apply(&self, payload: &str) -> Result<String, String> {
        let value: Value =
            serde_json::from_str(payload).map_err(|e| format!("not valid JSON: {e}"))?;
        let Value::Object(mut object) = value else {
            return Err("payload: must be a JSON object".into());
        };
        self.apply_to(&mut object)?;
        Ok(Value::Object(object).to_string())
    }

    fn apply_to(&self, object: &mut Map<String, Value>) -> Result<(), String> {
        // Every source is taken out before any target is written, so the
        // renames act at once (the rules cannot overlap anyway).
        let moved: Vec<(&FieldPath, Value)> = self
            .renames
            .iter()
            .filter_map(|(from, to)| take(object, from).map(|v| (to, v)))
            .collect();
        for (to, value) in moved {
            put(object, to, value)?;
        }
        for path in &self.drops {
            take(object, path);
        }
        if let Some(keep) = &self.select {
            object.retain(|k, _| keep.contains(k));
        }
        for (path, value) in &self.sets {
            put(object, path, value.clone())?;
        }
        Ok(())
    }
}

/// Removes and returns the field at `path`, if the record has it.
fn take(object: &mut Map<String, Value>, path: &[String]) -> Option<Value> {
    let (last, parents) = path.split_last()?;
    let mut current = object;
    for key in parents {
        current = current.get_mut(key)?.as_object_mut()?;
    }
    current.remove(last)
}

/// Writes `value` at `path`, creating the objects on the way.
fn put(object: &mut Map<String, Value>, path: &[String], value: Value) -> Result<(), String> {
    let (last, parents) = path.split_last().expect("paths are never empty");
    let mut current = object;
    for (depth, key) in parents.iter().enumerate() {
        let next = current
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        current = next.as_object_mut().ok_or_else(|| {
            format!(
                "transform: /{} is not an object, cannot write {} inside it",
                pointer(&path[..=depth]),
                pointer(path)
            )
        })?;
    }
    current.insert(last.clone(), value);
    Ok(())
}

fn pointer(path: &[String]) -> String {
    path.iter()
        .map(|k| k.replace('~', "~0").replace('/', "~1"))
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(toml_text: &str) -> Result<Transform, String> {
        let cfg: TransformConfig = toml::from_str(toml_text).unwrap();
        let mut issues = Issues::default();
        match cfg.compile("t", &mut issues) {
            Some(t) => Ok(t),
            None => Err(issues.into_result().unwrap_err().to_string()),
        }
    }

    #[test]
    fn rename_drop_select_and_set_run_in_that_order() {
        let t = compile(
            r#"
rename = { "temp_c" = "temperature", "/meta/site" = "site_code" }
drop = ["secret", "/meta/token"]
select = ["id", "temperature", "site_code", "meta"]
set = { source = "plant-3", "/meta/schema" = 2 }
"#,
        )
        .unwrap();
        let out = t
            .apply(
                r#"{"id":7,"temp_c":21.5,"secret":"x","noise":1,"meta":{"site":"B","token":"t"}}"#,
            )
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            serde_json::json!({
                "id": 7, "temperature": 21.5, "site_code": "B",
                "meta": {"schema": 2}, "source": "plant-3"
            })
        );
    }

    #[test]
    fn the_example_in_the_sources_guide_maps_as_it_says() {
        let t = compile(
            r#"
rename = { "temp_c" = "temperature", "/meta/site" = "site" }
drop = ["password", "meta"]
select = ["id", "temperature", "site"]
set = { plant = "berlin-3", "/origin/kind" = "sensor" }
"#,
        )
        .unwrap();
        assert_eq!(
            t.apply(r#"{"id":7,"temp_c":21.5,"password":"x","meta":{"site":"B"}}"#)
                .unwrap(),
            r#"{"id":7,"origin":{"kind":"sensor"},"plant":"berlin-3","site":"B","temperature":21.5}"#
        );
    }

    #[test]
    fn a_rule_for_a_missing_field_does_nothing() {
        let t = compile(
            r#"rename = { "a" = "b" }
drop = ["/x/y"]"#,
        )
        .unwrap();
        assert_eq!(t.apply(r#"{"c":1}"#).unwrap(), r#"{"c":1}"#);
    }

    #[test]
    fn a_field_can_be_moved_out_of_an_object_that_is_then_dropped() {
        let t = compile(
            r#"rename = { "/probe/name" = "sensor" }
drop = ["probe"]"#,
        )
        .unwrap();
        assert_eq!(
            t.apply(r#"{"probe":{"name":"t1","slot":4},"v":1}"#)
                .unwrap(),
            r#"{"sensor":"t1","v":1}"#
        );
    }

    #[test]
    fn set_creates_nested_objects_but_never_writes_through_a_value() {
        let t = compile(r#"set = { "/a/b/c" = true }"#).unwrap();
        assert_eq!(t.apply("{}").unwrap(), r#"{"a":{"b":{"c":true}}}"#);
        let err = t.apply(r#"{"a":{"b":5}}"#).unwrap_err();
        assert!(err.contains("/a/b is not an object"), "{err}");
    }

    #[test]
    fn json_pointer_escapes_name_keys_with_slashes_and_tildes() {
        let t = compile(r#"rename = { "/a~1b/c~0d" = "flat" }"#).unwrap();
        assert_eq!(
            t.apply(r#"{"a/b":{"c~d":1}}"#).unwrap(),
            r#"{"a/b":{},"flat":1}"#
        );
        assert!(compile(r#"drop = ["/a~2"]"#).unwrap_err().contains("~0"));
    }

    #[test]
    fn rules_whose_outcome_would_depend_on_order_are_refused_by_key() {
        for (rules, key, why) in [
            (
                r#"rename = { "a" = "x", "b" = "x" }"#,
                "t.rename.\"a\"",
                "same field",
            ),
            (
                r#"rename = { "a" = "b", "b" = "c" }"#,
                "t.rename.\"a\"",
                "chains",
            ),
            (
                r#"rename = { "/m" = "x", "/m/k" = "y" }"#,
                "t.rename.\"/m\"",
                "parent",
            ),
            (
                "rename = { a = \"b\" }\ndrop = [\"a\"]",
                "t.drop[0]",
                "renamed",
            ),
            (
                "rename = { \"/a/b\" = \"c\" }\ndrop = [\"/a/b/d\"]",
                "t.drop[0]",
                "renamed",
            ),
            (
                "rename = { a = \"b\" }\ndrop = [\"/b/c\"]",
                "t.drop[0]",
                "renamed",
            ),
            ("drop = [\"a\"]\nset = { a = 1 }", "t.set.\"a\"", "dropped"),
            (
                "rename = { a = \"b\" }\nset = { \"/b/c\" = 1 }",
                "t.set.\"/b/c\"",
                "renamed",
            ),
            (
                "rename = { a = \"b\" }\nselect = [\"c\"]",
                "t.rename.\"a\"",
                "select",
            ),
            (r#"select = ["/a"]"#, "t.select[0]", "top-level"),
            (r#"drop = [""]"#, "t.drop[0]", "empty"),
            (r#"drop = ["/a//b"]"#, "t.drop[0]", "empty parts"),
        ] {
            let err = compile(rules).unwrap_err();
            assert!(err.contains(key), "{rules}: {key} missing from {err}");
            assert!(err.contains(why), "{rules}: {why:?} missing from {err}");
        }
    }

    #[test]
    fn the_same_record_always_maps_to_the_same_text() {
        let t = compile(
            r#"rename = { "z" = "a", "y" = "b" }
set = { k = "v" }"#,
        )
        .unwrap();
        let first = t.apply(r#"{"y":1,"z":2,"m":3}"#).unwrap();
        for _ in 0..10 {
            assert_eq!(t.apply(r#"{"y":1,"z":2,"m":3}"#).unwrap(), first);
        }
    }
}
