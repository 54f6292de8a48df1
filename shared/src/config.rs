//! Typed configuration: a TOML file, then `DCS_*` environment overrides, then
//! validation that names every bad key at once.
//!
//! An environment variable `PREFIX` + `SECTION__KEY` overrides `section.key`
//! (double underscore for nesting, matched case-insensitively). Its value is read
//! as a TOML value when it parses as one (numbers, booleans, arrays, quoted
//! strings) and as a plain string otherwise, so `DCS_EDGE_BATCH__MAX_RECORDS=500`
//! is a number and `DCS_EDGE_BUFFER__PATH=/var/lib/dcs/buffer.db` a string.
//!
//! Unknown keys are errors (`deny_unknown_fields` on every section), because a
//! misspelt key silently falling back to its default is how outages start.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// One problem with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub key: String,
    pub reason: String,
}

/// Everything wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub issues: Vec<Issue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration:")?;
        for issue in &self.issues {
            write!(f, "\n  {}: {}", issue.key, issue.reason)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn one(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            issues: vec![Issue {
                key: key.into(),
                reason: reason.into(),
            }],
        }
    }
}

/// Collects validation problems so a config reports all of them in one run.
#[derive(Debug, Default)]
pub struct Issues(Vec<Issue>);

impl Issues {
    /// Records `reason` against `key` when `ok` is false.
    pub fn check(&mut self, ok: bool, key: &str, reason: impl Into<String>) {
        if !ok {
            self.0.push(Issue {
                key: key.to_owned(),
                reason: reason.into(),
            });
        }
    }

    /// Problems recorded so far, so a checker can tell whether its own
    /// checks added any.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_result(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { issues: self.0 })
        }
    }
}

/// Loads `T` from an optional TOML file overlaid with environment variables that
/// start with `env_prefix` (e.g. `DCS_EDGE_`). Pass `std::env::vars()` as `env`;
/// tests pass a map.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    env_prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::one(path.display().to_string(), format!("cannot read: {e}"))
            })?;
            toml::from_str::<toml::Table>(&text)
                .map_err(|e| ConfigError::one(path.display().to_string(), e.to_string()))?
        }
        None => toml::Table::new(),
    };
    // Key path (dotted) → the variable that set it, to name it in errors.
    let mut origins = BTreeMap::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(env_prefix) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::one(name, "malformed variable name"));
        }
        set_path(&mut table, &path, parse_env_value(&value))
            .map_err(|reason| ConfigError::one(name.clone(), reason))?;
        origins.insert(path.join("."), name);
    }
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let origin = origins
            .iter()
            .find(|(path, _)| key == **path || key.starts_with(&format!("{path}.")))
            .map(|(_, var)| format!(" (set by {var})"))
            .unwrap_or_default();
        let key = if key == "." {
            "(top level)".into()
        } else {
            key
        };
        ConfigError::one(format!("{key}{origin}"), e.into_inner().to_string())
    })
}

fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut t = table;
    for p in parents {
        t = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a section"))?;
    }
    t.insert(last.clone(), value);
    Ok(())
}

/// Serde adapter for durations written as `"250ms"`, `"5s"`, `"1h 30m"`.
pub mod duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration ({e}); write e.g. \"250ms\", \"5s\", \"2m\""
            ))
        })
    }
}

/// A size in bytes, written as an integer or as `"64MiB"`, `"1GB"`, `"512KiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size; write e.g. 1048576, \"64MiB\", \"1GB\""))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "kib" | "k" => 1 << 10,
            "mb" => 1_000_000,
            "mib" | "m" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" | "g" => 1 << 30,
            "tb" => 1_000_000_000_000,
            "tib" | "t" => 1 << 40,
            other => return Err(format!("unknown size unit {other:?} in {s:?}")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }

    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        name: String,
        #[serde(default)]
        inner: Inner,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[serde(default)]
        count: u32,
        #[serde(default)]
        size: Option<ByteSize>,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let s: Sample = load(
            None,
            "DCS_T_",
            env(&[
                ("DCS_T_NAME", "x"),
                ("DCS_T_INNER__COUNT", "7"),
                ("DCS_T_INNER__SIZE", "2MiB"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(s.name, "x");
        assert_eq!(s.inner.count, 7);
        assert_eq!(s.inner.size, Some(ByteSize(2 << 20)));
    }

    #[test]
    fn a_misspelt_variable_is_named_in_the_error() {
        let err = load::<Sample>(
            None,
            "DCS_T_",
            env(&[("DCS_T_NAME", "x"), ("DCS_T_INNER__CUONT", "7")]),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("cuont"), "{text}");
        assert!(text.contains("DCS_T_INNER__CUONT"), "{text}");
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let err = load::<Sample>(
            None,
            "DCS_T_",
            env(&[("DCS_T_NAME", "x"), ("DCS_T_INNER__COUNT", "many")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("inner.count"), "{err}");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("1024").unwrap(), ByteSize(1024));
        assert_eq!(ByteSize::parse("1KiB").unwrap(), ByteSize(1024));
        assert_eq!(ByteSize::parse("1 GB").unwrap(), ByteSize(1_000_000_000));
        assert!(ByteSize::parse("lots").is_err());
        assert!(ByteSize::parse("1ZB").is_err());
    }
}
