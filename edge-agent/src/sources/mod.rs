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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Unique among sources; names jobs, checkpoints and metric labels.
    pub name: String,
    pub kind: SourceKind,
    /// The stream every record of this source is buffered under.
    pub stream: String,
    /// An interval such as `"30s"`, a cron expression (`"*/5 * * * *"`, or
    /// six fields with seconds first), or `"manual"` (only `POST
    /// /api/v1/jobs/trigger` runs it). See [`schedule`].
    #[serde(default = "default_schedule")]
    pub schedule: String,
    /// The time zone a cron schedule's fields are read in (default UTC).
    #[serde(default)]
    pub timezone: Option<String>,
    /// A random delay of up to this much is added to every interval or cron
    /// fire, so many agents started together do not hit a shared database
    /// in step.
    #[serde(default = "zero", with = "duration")]
    pub jitter: Duration,
    /// A field mapping applied to every record before it is validated
    /// ([`crate::transform`]).
    #[serde(default)]
    pub transform: Option<TransformConfig>,
    /// Settings of a `kind = "file"` source.
    #[serde(default)]
    pub file: Option<file::FileConfig>,
    /// Settings of a `kind = "database"` source.
    #[serde(default)]
    pub database: Option<database::DatabaseConfig>,
    /// Settings of a `kind = "http"` source.
    #[serde(default)]
    pub http: Option<http::HttpConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    File,
    Database,
    Http,
}

fn default_schedule() -> String {
    DEFAULT_SCHEDULE.into()
}
fn zero() -> Duration {
    Duration::ZERO
}

impl SourceConfig {
    pub fn schedule(&self) -> Result<Schedule, String> {
        Schedule::parse(&self.schedule, self.timezone.as_deref()).map_err(|e| e.to_string())
    }

    /// The compiled transform; `None` without one (or with invalid rules,
    /// which [`validate`] refuses first).
    pub fn compiled_transform(&self) -> Option<Transform> {
        let mut ignored = Issues::default();
        self.transform
            .as_ref()
            .and_then(|t| t.compile("transform", &mut ignored))
    }
}

/// Checks every `[[sources]]` entry, naming keys as `sources[INDEX].KEY`.
pub fn validate(sources: &[SourceConfig], issues: &mut Issues) {
    let mut seen = std::collections::HashSet::new();
    for (i, s) in sources.iter().enumerate() {
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
        match Schedule::parse(&s.schedule, s.timezone.as_deref()) {
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
            }
            Err(error @ schedule::ScheduleError::TimezoneWithoutCron) => {
                issues.check(false, &key("timezone"), error.to_string())
            }
            Err(error @ schedule::ScheduleError::Timezone(_)) => {
                issues.check(false, &key("timezone"), error.to_string())
            }
            Err(error @ schedule::ScheduleError::Cron { .. }) => {
                issues.check(false, &key("schedule.cron"), error.to_string())
            }
            Err(error) => issues.check(false, &key("schedule"), error.to_string()),
        }
        if let Some(t) = &s.transform {
            t.compile(&key("transform"), issues);
        }
        match s.kind {
            SourceKind::File => match &s.file {
                Some(f) => f.validate(&key("file"), issues),
                None => issues.check(
                    false,
                    &key("file"),
                    "a [sources.file] section is required when kind = \"file\"",
                ),
            },
            SourceKind::Database => match &s.database {
                Some(d) => d.validate(&key("database"), issues),
                None => issues.check(
                    false,
                    &key("database"),
                    "a [sources.database] section is required when kind = \"database\"",
                ),
            },
            SourceKind::Http => match &s.http {
                Some(h) => h.validate(&key("http"), issues),
                None => issues.check(
                    false,
                    &key("http"),
                    "a [sources.http] section is required when kind = \"http\"",
                ),
            },
        }
        issues.check(
            s.kind == SourceKind::File || s.file.is_none(),
            &key("file"),
            "only allowed when kind = \"file\"",
        );
        issues.check(
            s.kind == SourceKind::Database || s.database.is_none(),
            &key("database"),
            "only allowed when kind = \"database\"",
        );
        issues.check(
            s.kind == SourceKind::Http || s.http.is_none(),
            &key("http"),
            "only allowed when kind = \"http\"",
        );
    }
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
    /// The source's field mapping, applied before validation.
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
pub async fn collect(
    source: SourceConfig,
    ctx: RunContext,
) -> (RunReport, Result<(), SourceError>) {
    let mut report = RunReport::default();
    let result = match (&source.kind, &source.file, &source.database) {
        (SourceKind::File, Some(_), _) => {
            let outcome = tokio::task::spawn_blocking(move || {
                let cfg = source.file.as_ref().expect("matched above");
                let mut report = RunReport::default();
                let result = file::collect(&source, cfg, &ctx, &mut report);
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
        (SourceKind::Database, _, Some(cfg)) => {
            database::collect(&source, cfg, &ctx, &mut report).await
        }
        (SourceKind::Http, _, _) if source.http.is_some() => {
            let cfg = source.http.as_ref().expect("guarded");
            http::collect(&source, cfg, &ctx, &mut report).await
        }
        // Refused by `validate`: a config that reaches here is a bug.
        _ => unreachable!(
            "source {} passed validation without its settings",
            source.name
        ),
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
            kind: SourceKind::File,
            stream: "s".into(),
            schedule: schedule.into(),
            timezone: None,
            jitter: Duration::ZERO,
            transform: None,
            file: Some(file::FileConfig {
                paths: vec!["/var/log/x/*.log".into()],
                format: file::Format::Lines,
                follow_symlinks: false,
            }),
            database: None,
            http: None,
        }
    }

    fn problems(sources: &[SourceConfig]) -> String {
        let mut issues = Issues::default();
        validate(sources, &mut issues);
        issues
            .into_result()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn schedules_are_intervals_cron_expressions_or_manual() {
        let mut s = source("30s");
        assert_eq!(s.schedule(), Ok(Schedule::Every(Duration::from_secs(30))));
        s.schedule = "manual".into();
        assert_eq!(s.schedule(), Ok(Schedule::Manual));
        s.schedule = "*/5 * * * *".into();
        assert!(matches!(s.schedule(), Ok(Schedule::Cron(_))));
        s.schedule = "1ms".into();
        assert!(s.schedule().is_err());
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
