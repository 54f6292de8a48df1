//! Pull sources: the agent reads records itself (files, databases, HTTP
//! APIs; see docs/SOURCES.md) instead of waiting for producers to push them.
//!
//! # Design constraints
//! - A pulled record takes the same road as a pushed one: it is validated by
//!   `dcs_shared::record` exactly as `POST /v1/records` validates, then
//!   appended to the buffer, and only a committed buffer row is forwarded.
//! - How far a source has read (its checkpoint) is stored in the buffer's
//!   SQLite file in the transaction that stores the records read up to that
//!   point ([`Buffer::append_from_source`]). A crash at any moment therefore
//!   leaves records and checkpoint in agreement: nothing lost, nothing twice.
//! - A pulled item that fails validation is not retried forever: it goes to
//!   `dead_letters` with the reason, in the same transaction, and is counted.
//! - Each run is a job ([`crate::jobs`]); a source never runs twice at once.
//! - A source runs only as [`compile`] made it at start-up ([`Source`]: its
//!   schedule parsed, its transform compiled); nothing is parsed per run.
//!   What a source reads is one [`SourceKind`] with that kind's settings,
//!   so a source without them cannot be written down.
//!
//! The file collector is blocking code (file reads, the buffer's blocking
//! call) and runs on tokio's blocking pool; the database collector is async
//! (sqlx) and hands each page to the buffer from the blocking pool.

pub mod database;
pub mod file;
pub mod http;
pub mod schedule;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use dcs_shared::config::{Issues, duration};
use dcs_shared::record::{self, IncomingRecord, Limits, Record};

use crate::buffer::{Buffer, BufferError};
use crate::schema::{self, Schemas};
use crate::transform::{Transform, TransformConfig};

pub use schedule::{MIN_INTERVAL, Schedule};

/// A source with no `schedule` runs once a minute: fresh enough for logs and
/// exports, cheap for a database.
pub const DEFAULT_SCHEDULE: &str = "60s";

/// A `[[sources]]` entry as written in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "SourceEntry")]
pub struct SourceConfig {
    /// Unique among sources; names jobs, checkpoints and metric labels.
    pub name: String,
    /// What the source reads: `kind = "file"` with a `[sources.file]`
    /// section, and so on.
    pub kind: SourceKind,
    /// The stream every record of this source is buffered under.
    pub stream: String,
    /// An interval such as `"30s"`, a cron expression (`"*/5 * * * *"`, or
    /// six fields with seconds first), or `"manual"` (only `POST
    /// /api/v1/jobs/trigger` runs it). See [`schedule`].
    pub schedule: String,
    /// The time zone a cron schedule's fields are read in (default UTC).
    pub timezone: Option<String>,
    /// A random delay of up to this much is added to every interval or cron
    /// fire, so many agents started together do not hit a shared database
    /// in step.
    pub jitter: Duration,
    /// A field mapping applied to every record before it is validated
    /// ([`crate::transform`]).
    pub transform: Option<TransformConfig>,
}

/// What a source reads, with the settings of that kind.
#[derive(Debug, Clone)]
pub enum SourceKind {
    /// `kind = "file"` and `[sources.file]`.
    File(file::FileConfig),
    /// `kind = "database"` and `[sources.database]`.
    Database(database::DatabaseConfig),
    /// `kind = "http"` and `[sources.http]`.
    Http(http::HttpConfig),
}

/// `[[sources]]` as TOML lays it out: `kind` names which one of the kinds'
/// sections the entry must have. Only [`SourceConfig`]'s deserializer sees
/// it; a serde-flattened tagged enum would lose the key path of errors
/// inside the section (`sources[0].file.format`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceEntry {
    name: String,
    kind: KindName,
    stream: String,
    #[serde(default = "default_schedule")]
    schedule: String,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default = "zero", with = "duration")]
    jitter: Duration,
    #[serde(default)]
    transform: Option<TransformConfig>,
    #[serde(default)]
    file: Option<file::FileConfig>,
    #[serde(default)]
    database: Option<database::DatabaseConfig>,
    #[serde(default)]
    http: Option<http::HttpConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum KindName {
    File,
    Database,
    Http,
}

impl KindName {
    const ALL: [KindName; 3] = [KindName::File, KindName::Database, KindName::Http];

    fn as_str(self) -> &'static str {
        match self {
            KindName::File => "file",
            KindName::Database => "database",
            KindName::Http => "http",
        }
    }
}

impl TryFrom<SourceEntry> for SourceConfig {
    type Error = String;

    fn try_from(entry: SourceEntry) -> Result<SourceConfig, String> {
        let present = [
            entry.file.is_some(),
            entry.database.is_some(),
            entry.http.is_some(),
        ];
        let kind = match (entry.kind, entry.file, entry.database, entry.http) {
            (KindName::File, Some(f), None, None) => SourceKind::File(f),
            (KindName::Database, None, Some(d), None) => SourceKind::Database(d),
            (KindName::Http, None, None, Some(h)) => SourceKind::Http(h),
            (kind, ..) => return Err(section_mismatch(kind, present)),
        };
        Ok(SourceConfig {
            name: entry.name,
            kind,
            stream: entry.stream,
            schedule: entry.schedule,
            timezone: entry.timezone,
            jitter: entry.jitter,
            transform: entry.transform,
        })
    }
}

/// Names the section `kind` needs and every section it does not allow.
fn section_mismatch(kind: KindName, present: [bool; 3]) -> String {
    let mut problems = Vec::new();
    for (other, present) in KindName::ALL.into_iter().zip(present) {
        let name = other.as_str();
        if other == kind && !present {
            problems.push(format!(
                "a [sources.{name}] section is required when kind = \"{name}\""
            ));
        } else if other != kind && present {
            problems.push(format!(
                "[sources.{name}] is only allowed when kind = \"{name}\""
            ));
        }
    }
    problems.join("; ")
}

fn default_schedule() -> String {
    DEFAULT_SCHEDULE.into()
}
fn zero() -> Duration {
    Duration::ZERO
}

/// A source as start-up checked it: what the scheduler and the collectors
/// run.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub stream: String,
    pub schedule: Schedule,
    pub jitter: Duration,
    /// Shared by every run.
    pub transform: Option<Arc<Transform>>,
    pub kind: SourceKind,
}

/// Checks every `[[sources]]` entry, naming keys as `sources[INDEX].KEY`,
/// and returns the entries that passed, compiled.
pub fn compile(sources: &[SourceConfig], issues: &mut Issues) -> Vec<Source> {
    let mut seen = std::collections::HashSet::new();
    let mut compiled = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        let before = issues.len();
        let key = |k: &str| format!("sources[{i}].{k}");
        let name_ok = record::validate_stream(&s.name);
        issues.check(
            name_ok.is_ok(),
            &key("name"),
            name_ok
                .err()
                .map(|r| format!("{:?}: {r}", s.name))
                .unwrap_or_default(),
        );
        issues.check(
            seen.insert(s.name.as_str()),
            &key("name"),
            format!("{:?} is used by an earlier source", s.name),
        );
        if let Err(reason) = record::validate_stream(&s.stream) {
            issues.check(false, &key("stream"), format!("{:?}: {reason}", s.stream));
        }
        let schedule = match Schedule::parse(&s.schedule, s.timezone.as_deref()) {
            Ok(schedule) => {
                if let Some(max) = schedule.max_jitter() {
                    issues.check(
                        s.jitter <= max,
                        &key("jitter"),
                        format!(
                            "must not exceed the schedule's interval or the shortest gap between its fires ({})",
                            humantime::format_duration(max)
                        ),
                    );
                }
                Some(schedule)
            }
            Err(error) => {
                let k = match &error {
                    schedule::ScheduleError::TimezoneWithoutCron
                    | schedule::ScheduleError::Timezone(_) => "timezone",
                    schedule::ScheduleError::Cron { .. } => "schedule.cron",
                    _ => "schedule",
                };
                issues.check(false, &key(k), error.to_string());
                None
            }
        };
        let transform = s
            .transform
            .as_ref()
            .and_then(|t| t.compile(&key("transform"), issues));
        match &s.kind {
            SourceKind::File(f) => f.validate(&key("file"), issues),
            SourceKind::Database(d) => d.validate(&key("database"), issues),
            SourceKind::Http(h) => h.validate(&key("http"), issues),
        }
        match schedule {
            Some(schedule) if issues.len() == before => compiled.push(Source {
                name: s.name.clone(),
                stream: s.stream.clone(),
                schedule,
                jitter: s.jitter,
                transform: transform.map(Arc::new),
                kind: s.kind.clone(),
            }),
            _ => {}
        }
    }
    compiled
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error("stopped by shutdown")]
    Stopped,
    /// Connecting or querying failed; the text never holds the URL.
    #[error("database: {0}")]
    Database(String),
    #[error("http: {0}")]
    Http(String),
}

/// What a collector needs from the agent.
#[derive(Clone)]
pub struct RunContext {
    pub buffer: Buffer,
    pub limits: Limits,
    /// Set at shutdown; collectors commit what they have and return.
    pub stop: Arc<AtomicBool>,
    /// The source's compiled field mapping ([`Source::transform`]),
    /// applied before validation.
    pub transform: Option<Arc<Transform>>,
    /// The per-stream JSON Schemas, shared with the ingest API.
    pub schemas: Arc<Schemas>,
}

impl RunContext {
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Stores a step's records, dead letters and checkpoints in one buffer
    /// transaction (on the blocking pool) and counts them in `report`.
    pub async fn commit(
        &self,
        batch: crate::buffer::SourceBatch,
        report: &mut RunReport,
    ) -> Result<(), SourceError> {
        let rejected = batch.rejected.len() as u64;
        let buffer = self.buffer.clone();
        let appended = tokio::task::spawn_blocking(move || buffer.append_from_source(batch))
            .await
            .map_err(|_| SourceError::Stopped)??;
        report.collected += appended.new.iter().filter(|n| **n).count() as u64;
        report.rejected += rejected;
        Ok(())
    }

    /// Turns one pulled item (JSON text) into a record of `stream`: the
    /// source's transform, then the rules `POST /v1/records` applies, then
    /// the stream's schema. `Err` is the dead-letter reason.
    pub fn prepare(&self, stream: &str, payload: &str) -> Result<Record, String> {
        prepare(
            stream,
            payload,
            self.transform.as_deref(),
            &self.limits,
            &self.schemas,
        )
    }
}

/// See [`RunContext::prepare`].
pub fn prepare(
    stream: &str,
    payload: &str,
    transform: Option<&Transform>,
    limits: &Limits,
    schemas: &Schemas,
) -> Result<Record, String> {
    let transformed;
    let payload = match transform {
        Some(t) => {
            transformed = t.apply(payload)?;
            transformed.as_str()
        }
        None => payload,
    };
    let record = validate_pulled(stream, payload, limits)?;
    schemas
        .check(stream, &record.payload)
        .map_err(|v| schema::dead_letter_reason(&v))?;
    Ok(record)
}

/// What one run did; becomes a job's result.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunReport {
    pub collected: u64,
    pub rejected: u64,
    /// Problems that did not stop the run (a file it could not open).
    pub errors: Vec<String>,
}

/// Runs one collection of `source` to completion.
pub async fn collect(source: Source, ctx: RunContext) -> (RunReport, Result<(), SourceError>) {
    let mut report = RunReport::default();
    let result = match &source.kind {
        SourceKind::File(cfg) => {
            let cfg = cfg.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                let mut report = RunReport::default();
                let result = file::collect(&source, &cfg, &ctx, &mut report);
                (report, result)
            })
            .await;
            match outcome {
                Ok((r, result)) => {
                    report = r;
                    result
                }
                Err(_) => Err(SourceError::Stopped),
            }
        }
        SourceKind::Database(cfg) => database::collect(&source, cfg, &ctx, &mut report).await,
        SourceKind::Http(cfg) => http::collect(&source, cfg, &ctx, &mut report).await,
    };
    (report, result)
}

/// Validates one pulled payload (JSON text) with the very code `POST
/// /v1/records` uses, so a pulled record is buffered only if a pushed one
/// with the same content would be.
pub fn validate_pulled(stream: &str, payload: &str, limits: &Limits) -> Result<Record, String> {
    // Parsed alone first: text such as `{}, "id": "x"` must not be able to
    // add fields to the record around it.
    let payload: &serde_json::value::RawValue =
        serde_json::from_str(payload).map_err(|e| format!("not valid JSON: {e}"))?;
    let payload = payload.get();
    let doc = format!(
        "{{\"stream\":{},\"payload\":{payload}}}",
        serde_json::Value::String(stream.to_owned())
    );
    let incoming: IncomingRecord<'_> =
        serde_json::from_str(&doc).map_err(|e| format!("not valid JSON: {e}"))?;
    let mut errors = Vec::new();
    match record::validate_incoming(0, &incoming, limits, &mut errors) {
        Some(r) if errors.is_empty() => Ok(r),
        _ => Err(errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.reason))
            .collect::<Vec<_>>()
            .join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pulled_payload_is_held_to_the_ingest_rules() {
        let limits = Limits::default();
        assert!(validate_pulled("s", r#"{"a":1}"#, &limits).is_ok());
        let not_object = validate_pulled("s", "[1,2]", &limits).unwrap_err();
        assert!(not_object.contains("payload"), "{not_object}");
        let broken = validate_pulled("s", r#"{"a":"#, &limits).unwrap_err();
        assert!(broken.contains("JSON"), "{broken}");
        let injected = validate_pulled("s", r#"{}, "id": "x""#, &limits);
        assert!(injected.is_err(), "a line cannot smuggle record fields");
    }

    fn source(schedule: &str) -> SourceConfig {
        SourceConfig {
            name: "n".into(),
            kind: SourceKind::File(file::FileConfig {
                paths: vec!["/var/log/x/*.log".into()],
                format: file::Format::Lines,
                follow_symlinks: false,
            }),
            stream: "s".into(),
            schedule: schedule.into(),
            timezone: None,
            jitter: Duration::ZERO,
            transform: None,
        }
    }

    fn problems(sources: &[SourceConfig]) -> String {
        let mut issues = Issues::default();
        compile(sources, &mut issues);
        issues
            .into_result()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    fn schedule_of(schedule: &str) -> Option<Schedule> {
        let mut issues = Issues::default();
        let compiled = compile(&[source(schedule)], &mut issues);
        compiled.into_iter().next().map(|s| s.schedule)
    }

    #[test]
    fn schedules_are_intervals_cron_expressions_or_manual() {
        assert_eq!(
            schedule_of("30s"),
            Some(Schedule::Every(Duration::from_secs(30)))
        );
        assert_eq!(schedule_of("manual"), Some(Schedule::Manual));
        assert!(matches!(
            schedule_of("*/5 * * * *"),
            Some(Schedule::Cron(_))
        ));
        assert_eq!(schedule_of("1ms"), None);
    }

    #[test]
    fn only_sources_without_problems_are_compiled() {
        let mut issues = Issues::default();
        let mut bad = source("30s");
        bad.name = "m".into();
        bad.stream = "Not A Stream".into();
        let compiled = compile(&[source("30s"), bad], &mut issues);
        assert_eq!(compiled.len(), 1);
        assert_eq!(compiled[0].name, "n");
        assert!(issues.into_result().is_err());
    }

    #[test]
    fn a_source_needs_the_section_of_its_kind_and_no_other() {
        let parse = |toml: &str| {
            toml::from_str::<SourceConfig>(toml)
                .map(|s| s.kind)
                .map_err(|e| e.to_string())
        };
        let head = "name = \"a\"\nstream = \"a\"\n";
        let file = "[file]\npaths = [\"/x/*\"]\nformat = \"lines\"\n";
        let parsed = parse(&format!("{head}kind = \"file\"\n{file}"));
        assert!(matches!(parsed, Ok(SourceKind::File(_))), "{parsed:?}");

        let err = parse(&format!(
            "{head}kind = \"database\"\n[http]\nurl = \"https://x.example/\"\n"
        ))
        .unwrap_err();
        assert!(
            err.contains("a [sources.database] section is required when kind = \"database\""),
            "{err}"
        );
        assert!(
            err.contains("[sources.http] is only allowed when kind = \"http\""),
            "{err}"
        );
        let err = parse(&format!("{head}kind = \"http\"\n{file}")).unwrap_err();
        assert!(err.contains("[sources.http] section is required"), "{err}");
        assert!(err.contains("[sources.file] is only allowed"), "{err}");
    }

    #[test]
    fn a_bad_cron_schedule_is_named_by_index_and_key() {
        let good = source("*/5 * * * *");
        let mut bad = source("*/5 * * 13 *");
        bad.name = "m".into();
        let err = problems(&[good, bad]);
        assert!(err.contains("sources[1].schedule.cron"), "{err}");
        assert!(!err.contains("sources[0]"), "{err}");

        let mut tz = source("0 9 * * *");
        tz.timezone = Some("Nowhere/City".into());
        assert!(problems(&[tz]).contains("sources[0].timezone"));
        let mut tz_on_interval = source("30s");
        tz_on_interval.timezone = Some("UTC".into());
        assert!(problems(&[tz_on_interval]).contains("sources[0].timezone"));
    }

    #[test]
    fn jitter_may_not_exceed_the_gap_between_cron_fires() {
        let mut s = source("*/10 * * * * *");
        s.jitter = Duration::from_secs(10);
        assert_eq!(problems(std::slice::from_ref(&s)), "");
        s.jitter = Duration::from_secs(11);
        assert!(problems(&[s]).contains("sources[0].jitter"));
    }

    #[test]
    fn a_pulled_item_is_transformed_then_checked_against_its_stream_schema() {
        let stream_cfg = crate::schema::StreamConfig {
            schema: Some(
                r#"{"type":"object","required":["temp"],"properties":{"temp":{"type":"number"}}}"#
                    .into(),
            ),
            schema_file: None,
        };
        let mut issues = Issues::default();
        let schemas = Schemas::compile(
            &[("s".to_string(), stream_cfg)].into_iter().collect(),
            &mut issues,
        );
        let transform: TransformConfig = toml::from_str(r#"rename = { "t" = "temp" }"#).unwrap();
        let mapping = transform.compile("transform", &mut issues);
        assert!(issues.into_result().is_ok());
        let limits = Limits::default();
        let with = |item: &str| prepare("s", item, mapping.as_ref(), &limits, &schemas);
        let without = |stream: &str, item: &str| prepare(stream, item, None, &limits, &schemas);
        assert_eq!(with(r#"{"t":21.5}"#).unwrap().payload, r#"{"temp":21.5}"#);
        let reason = with(r#"{"t":"warm"}"#).unwrap_err();
        assert!(reason.starts_with("payload/temp: "), "{reason}");
        // Without the mapping the same item lacks the field the schema wants.
        let reason = without("s", r#"{"t":21.5}"#).unwrap_err();
        assert!(reason.contains("temp"), "{reason}");
        assert!(without("other", r#"{"t":1}"#).is_ok());
    }
}
