//! Jobs: every run of a pull source, scheduled or triggered through the API,
//! is a job with a persistent record in the buffer's `jobs` table.
//!
//! # Design constraints
//! - A source never runs twice at once: a trigger while it runs is refused
//!   (409), a scheduled tick while it runs is skipped.
//! - A job is written to the `jobs` table before its id is returned, so an
//!   id handed to a client can always be looked up, across restarts too. Jobs
//!   a crash interrupted are marked `failed` at the next start.
//! - Finished jobs older than `jobs.retention` are deleted after each job.
//! - Sources arrive compiled ([`Source`]): schedules were parsed when the
//!   configuration was checked, so a scheduler never meets one it cannot
//!   read.
//!
//! States: `queued` (accepted, not started) → `running` → `succeeded` (read
//! everything without an error) or `failed` (an error; what was read before
//! it is stored, with its checkpoint, and the next run resumes there).
//!
//! # On-disk schema
//! - `jobs(id PK, source, trigger, state, created_us, started_us,
//!   finished_us, collected, rejected, errors, checkpoint_before,
//!   checkpoint_after)`, indexed by `created_us` for listing and pruning:
//!   `SCHEMA`, created by the buffer with its other tables.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use dcs_shared::record::{Limits, format_ts};

use crate::buffer::{Buffer, BufferError};
use crate::ingest::ApiError;
use crate::schema::Schemas;
use crate::sources::schedule::{self, CronSchedule, MAX_SLEEP_SLICE};
use crate::sources::{self, RunContext, RunReport, Schedule, Source};

/// Jobs listed when the client gives no `limit`.
const DEFAULT_LIST_LIMIT: u32 = 50;
const MAX_LIST_LIMIT: u32 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
}

impl JobState {
    fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<JobState> {
        [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// `GET /api/v1/jobs/status/{job_id}` and the elements of `GET /api/v1/jobs`.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub job_id: String,
    pub source: String,
    /// `api` or `schedule`.
    pub trigger: String,
    pub state: JobState,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_ms: Option<i64>,
}

/// `GET /api/v1/jobs/result/{job_id}`.
#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    pub job_id: String,
    pub source: String,
    pub state: JobState,
    pub records_collected: u64,
    pub records_rejected: u64,
    pub errors: Vec<String>,
    /// The source's checkpoints (by key) when the job started and ended.
    pub checkpoint_before: serde_json::Value,
    pub checkpoint_after: serde_json::Value,
}

/// The `jobs` table and its index, which only this module queries. The
/// buffer runs it when it opens its file, right after `checkpoints` (see
/// `buffer::schema`); `IF NOT EXISTS` leaves an existing file's table as
/// it is, and the text is the one schema 3 created, so new and old files
/// hold the same definition.
pub(crate) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS jobs (
             id TEXT PRIMARY KEY, source TEXT NOT NULL, trigger TEXT NOT NULL,
             state TEXT NOT NULL, created_us INTEGER NOT NULL, started_us INTEGER,
             finished_us INTEGER, collected INTEGER NOT NULL DEFAULT 0,
             rejected INTEGER NOT NULL DEFAULT 0, errors TEXT NOT NULL DEFAULT '[]',
             checkpoint_before TEXT, checkpoint_after TEXT);
         CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_us);";

/// A `jobs` row.
#[derive(Debug, Clone)]
struct JobRow {
    id: String,
    source: String,
    trigger: String,
    state: JobState,
    created_us: i64,
    started_us: Option<i64>,
    finished_us: Option<i64>,
    collected: i64,
    rejected: i64,
    errors: String,
    before: Option<String>,
    after: Option<String>,
}

const COLUMNS: &str = "id, source, trigger, state, created_us, started_us, finished_us, \
                       collected, rejected, errors, checkpoint_before, checkpoint_after";

impl JobRow {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
        let state: String = r.get(3)?;
        Ok(JobRow {
            id: r.get(0)?,
            source: r.get(1)?,
            trigger: r.get(2)?,
            state: JobState::parse(&state).unwrap_or(JobState::Failed),
            created_us: r.get(4)?,
            started_us: r.get(5)?,
            finished_us: r.get(6)?,
            collected: r.get(7)?,
            rejected: r.get(8)?,
            errors: r.get(9)?,
            before: r.get(10)?,
            after: r.get(11)?,
        })
    }

    fn status(&self) -> JobStatus {
        JobStatus {
            job_id: self.id.clone(),
            source: self.source.clone(),
            trigger: self.trigger.clone(),
            state: self.state,
            created_at: format_ts(self.created_us),
            started_at: self.started_us.map(format_ts),
            finished_at: self.finished_us.map(format_ts),
            duration_ms: self
                .started_us
                .zip(self.finished_us)
                .map(|(s, f)| (f - s) / 1000),
        }
    }

    fn result(&self) -> JobResult {
        let json = |s: &Option<String>| {
            s.as_deref()
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or(serde_json::Value::Null)
        };
        JobResult {
            job_id: self.id.clone(),
            source: self.source.clone(),
            state: self.state,
            records_collected: self.collected.max(0) as u64,
            records_rejected: self.rejected.max(0) as u64,
            errors: serde_json::from_str(&self.errors).unwrap_or_default(),
            checkpoint_before: json(&self.before),
            checkpoint_after: json(&self.after),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("no source named {0:?}")]
    UnknownSource(String),
    #[error("source {0:?} is already running")]
    Running(String),
    #[error("the agent is shutting down")]
    Stopping,
    #[error(transparent)]
    Buffer(#[from] BufferError),
}

/// One configured source and whether it runs now.
struct Slot {
    source: Source,
    running: AtomicBool,
}

/// The sources, their schedulers and their running jobs.
pub struct Jobs {
    buffer: Buffer,
    sources: BTreeMap<String, Arc<Slot>>,
    limits: Limits,
    /// The per-stream JSON Schemas pulled records must match.
    schemas: Arc<Schemas>,
    retention: Duration,
    /// Seen by collectors between chunks: commit and return.
    stop: Arc<AtomicBool>,
    stop_tx: watch::Sender<bool>,
    /// Schedulers and running jobs, awaited by [`Jobs::shutdown`].
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Jobs {
    /// Marks jobs a crash interrupted as failed and starts one scheduler per
    /// source that has an interval or a cron expression. The first run of an
    /// interval starts at once; a cron source waits for its first fire.
    pub async fn start(
        sources: Vec<Source>,
        retention: Duration,
        buffer: Buffer,
        limits: Limits,
        schemas: Arc<Schemas>,
    ) -> Result<Arc<Jobs>, BufferError> {
        let now = now_us();
        buffer
            .exec(move |tx| {
                tx.execute(
                    "UPDATE jobs SET state = 'failed', finished_us = ?1,
                         errors = '[\"the agent stopped during the run\"]'
                     WHERE state IN ('queued', 'running')",
                    [now],
                )
                .map(|_| ())
            })
            .await?;
        let (stop_tx, _) = watch::channel(false);
        let jobs = Arc::new(Jobs {
            buffer,
            sources: sources
                .into_iter()
                .map(|source| {
                    let name = source.name.clone();
                    let slot = Slot {
                        source,
                        running: AtomicBool::new(false),
                    };
                    (name, Arc::new(slot))
                })
                .collect(),
            limits,
            schemas,
            retention,
            stop: Arc::new(AtomicBool::new(false)),
            stop_tx,
            tasks: Mutex::new(Vec::new()),
        });
        for slot in jobs.sources.values() {
            let (name, jitter) = (slot.source.name.clone(), slot.source.jitter);
            let task = match &slot.source.schedule {
                Schedule::Every(every) => tokio::spawn(jobs.clone().schedule(name, *every, jitter)),
                Schedule::Cron(cron) => {
                    tokio::spawn(jobs.clone().schedule_cron(name, (**cron).clone(), jitter))
                }
                // Runs only when triggered through the API.
                Schedule::Manual => continue,
            };
            jobs.tasks.lock().expect("tasks lock").push(task);
        }
        Ok(jobs)
    }

    async fn schedule(self: Arc<Self>, source: String, every: Duration, jitter: Duration) {
        let mut stop = self.stop_tx.subscribe();
        loop {
            if !self.scheduled_run(&source).await {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(every + schedule::jitter_delay(jitter)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Runs `source` at every fire of `cron` (plus jitter). The next fire is
    /// counted from the last one, so a slow run skips the fires it covered
    /// and never repeats one.
    async fn schedule_cron(self: Arc<Self>, source: String, cron: CronSchedule, jitter: Duration) {
        let mut stop = self.stop_tx.subscribe();
        let mut after = jiff::Timestamp::now();
        loop {
            let Some(fire) = cron.next_after(after) else {
                tracing::warn!(message = "cron schedule has no further fire time", source);
                return;
            };
            let at = fire
                + jiff::SignedDuration::try_from(schedule::jitter_delay(jitter))
                    .unwrap_or(jiff::SignedDuration::ZERO);
            // In slices, reading the wall clock after each: a clock stepped
            // while the agent waits moves the run with it.
            loop {
                let left = schedule::until(at, jiff::Timestamp::now());
                if left.is_zero() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(left.min(MAX_SLEEP_SLICE)) => {}
                    _ = stop.changed() => return,
                }
            }
            if !self.scheduled_run(&source).await {
                return;
            }
            // Fires that passed during a long jitter are not made up.
            after = fire.max(jiff::Timestamp::now() - jiff::SignedDuration::from_millis(1));
        }
    }

    /// Starts one scheduled run; `false` once the agent is stopping.
    async fn scheduled_run(self: &Arc<Self>, source: &str) -> bool {
        match self.trigger(source, "schedule").await {
            Ok(_) | Err(TriggerError::Running(_)) => true,
            Err(TriggerError::Stopping) => false,
            Err(error) => {
                tracing::warn!(message = "cannot start scheduled run", source, %error);
                true
            }
        }
    }

    /// Starts a run of `source` now; returns its job id once the job is stored.
    pub async fn trigger(
        self: &Arc<Self>,
        source: &str,
        trigger: &'static str,
    ) -> Result<String, TriggerError> {
        let slot = self
            .sources
            .get(source)
            .ok_or_else(|| TriggerError::UnknownSource(source.to_owned()))?
            .clone();
        if self.stop.load(Ordering::SeqCst) {
            return Err(TriggerError::Stopping);
        }
        if slot.running.swap(true, Ordering::SeqCst) {
            return Err(TriggerError::Running(source.to_owned()));
        }
        let id = uuid::Uuid::now_v7().to_string();
        let (row_id, row_source) = (id.clone(), source.to_owned());
        let created = now_us();
        let stored = self
            .buffer
            .exec(move |tx| {
                tx.execute(
                    "INSERT INTO jobs (id, source, trigger, state, created_us)
                     VALUES (?1, ?2, ?3, 'queued', ?4)",
                    params![row_id, row_source, trigger, created],
                )
                .map(|_| ())
            })
            .await;
        if let Err(e) = stored {
            slot.running.store(false, Ordering::SeqCst);
            return Err(e.into());
        }
        let task = tokio::spawn(self.clone().run(slot, id.clone()));
        let mut tasks = self.tasks.lock().expect("tasks lock");
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
        Ok(id)
    }

    async fn run(self: Arc<Self>, slot: Arc<Slot>, id: String) {
        let name = slot.source.name.clone();
        let started = now_us();
        let before = self.snapshot(&name).await;
        let (row_id, row_before) = (id.clone(), before.clone());
        let marked = self
            .buffer
            .exec(move |tx| {
                tx.execute(
                    "UPDATE jobs SET state = 'running', started_us = ?2, checkpoint_before = ?3
                     WHERE id = ?1",
                    params![row_id, started, row_before],
                )
                .map(|_| ())
            })
            .await;
        let mut report = RunReport::default();
        if let Err(error) = marked {
            report.errors.push(format!("record job start: {error}"));
        } else {
            let ctx = RunContext {
                buffer: self.buffer.clone(),
                limits: self.limits,
                stop: self.stop.clone(),
                transform: slot.source.transform.clone(),
                schemas: self.schemas.clone(),
            };
            let (r, result) = sources::collect(slot.source.clone(), ctx).await;
            report = r;
            if let Err(error) = result {
                report.errors.push(error.to_string());
            }
        }
        let after = self.snapshot(&name).await;
        let finished = now_us();
        let state = if report.errors.is_empty() {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        record_metrics(&name, state, &report, finished);
        if state == JobState::Failed {
            tracing::warn!(message = "source run failed", source = %name, job = %id, errors = ?report.errors);
        } else {
            tracing::debug!(message = "source run done", source = %name, job = %id, collected = report.collected);
        }
        let errors = serde_json::to_string(&report.errors).expect("strings are JSON");
        let prune_before = finished - self.retention.as_micros() as i64;
        let stored = self
            .buffer
            .exec(move |tx| {
                tx.execute(
                    "UPDATE jobs SET state = ?2, finished_us = ?3, collected = ?4, rejected = ?5,
                         errors = ?6, checkpoint_after = ?7
                     WHERE id = ?1",
                    params![
                        id,
                        state.as_str(),
                        finished,
                        report.collected as i64,
                        report.rejected as i64,
                        errors,
                        after
                    ],
                )?;
                tx.execute(
                    "DELETE FROM jobs WHERE finished_us IS NOT NULL AND finished_us < ?1",
                    [prune_before],
                )
                .map(|_| ())
            })
            .await;
        if let Err(error) = stored {
            tracing::error!(message = "cannot record the end of a job", source = %name, %error);
        }
        slot.running.store(false, Ordering::SeqCst);
    }

    /// The source's checkpoints as one JSON object (each value parsed).
    async fn snapshot(&self, source: &str) -> Option<String> {
        let buffer = self.buffer.clone();
        let source = source.to_owned();
        let map = tokio::task::spawn_blocking(move || buffer.checkpoints(&source))
            .await
            .ok()?
            .ok()?;
        let object: serde_json::Map<String, serde_json::Value> = map
            .into_iter()
            .map(|(k, v)| {
                let mut v = serde_json::from_str(&v).unwrap_or(serde_json::Value::String(v));
                // A file checkpoint keeps the file's first bytes to detect
                // truncation; they are the file's content, which the jobs API
                // (open to every local user) must not show.
                if let Some(fields) = v.as_object_mut() {
                    fields.remove("prefix");
                }
                (k, v)
            })
            .collect();
        Some(serde_json::Value::Object(object).to_string())
    }

    async fn find(&self, id: String) -> Result<Option<JobRow>, BufferError> {
        let buffer = self.buffer.clone();
        tokio::task::spawn_blocking(move || {
            buffer.read_with(|conn| {
                conn.query_row(
                    &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
                    [id],
                    JobRow::from_row,
                )
                .optional()
            })
        })
        .await
        .map_err(|_| BufferError::Closed)?
    }

    async fn list(
        &self,
        source: Option<String>,
        state: Option<JobState>,
        limit: u32,
    ) -> Result<Vec<JobRow>, BufferError> {
        let buffer = self.buffer.clone();
        tokio::task::spawn_blocking(move || {
            buffer.read_with(|conn| {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM jobs
                     WHERE (?1 IS NULL OR source = ?1) AND (?2 IS NULL OR state = ?2)
                     ORDER BY created_us DESC, id DESC LIMIT ?3"
                ))?;
                stmt.query_map(
                    params![source, state.map(JobState::as_str), limit],
                    JobRow::from_row,
                )?
                .collect()
            })
        })
        .await
        .map_err(|_| BufferError::Closed)?
    }

    /// Stops the schedulers, lets running collectors commit what they read
    /// and waits for them, so the buffer can then be closed.
    pub async fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.stop_tx.send(true);
        loop {
            let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock().expect("tasks lock"));
            if tasks.is_empty() {
                break;
            }
            for task in tasks {
                let _ = task.await;
            }
        }
    }
}

fn record_metrics(source: &str, state: JobState, report: &RunReport, finished_us: i64) {
    let source = source.to_owned();
    metrics::counter!("dcs_agent_source_runs_total", "source" => source.clone(), "state" => state.as_str())
        .increment(1);
    metrics::counter!("dcs_agent_source_records_total", "source" => source.clone(), "result" => "collected")
        .increment(report.collected);
    metrics::counter!("dcs_agent_source_records_total", "source" => source.clone(), "result" => "rejected")
        .increment(report.rejected);
    metrics::counter!("dcs_agent_source_errors_total", "source" => source.clone())
        .increment(report.errors.len() as u64);
    if state == JobState::Succeeded {
        metrics::gauge!("dcs_agent_source_last_success_timestamp_seconds", "source" => source)
            .set(finished_us as f64 / 1e6);
    }
}

fn now_us() -> i64 {
    dcs_shared::record::unix_micros(time::OffsetDateTime::now_utc())
}

/// The jobs API, merged into the agent's local listener by [`crate::run`].
pub fn router(jobs: Arc<Jobs>) -> Router {
    Router::new()
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/jobs/trigger", post(trigger_job))
        .route("/api/v1/jobs/status/{job_id}", get(job_status))
        .route("/api/v1/jobs/result/{job_id}", get(job_result))
        .layer(middleware::from_fn(crate::ingest::count_requests))
        .with_state(jobs)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerRequest {
    source: String,
}

#[derive(Debug, Serialize)]
struct Triggered {
    job_id: String,
}

impl From<TriggerError> for ApiError {
    fn from(e: TriggerError) -> Self {
        match e {
            TriggerError::UnknownSource(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_source", e.to_string())
            }
            TriggerError::Running(_) => {
                ApiError::new(StatusCode::CONFLICT, "already_running", e.to_string())
            }
            TriggerError::Stopping => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                e.to_string(),
            ),
            TriggerError::Buffer(e) => e.into(),
        }
    }
}

/// A trigger must say it is JSON: an HTML form (or any page a local browser
/// loads) can post `text/plain` or a form body across origins without a
/// preflight, but never `application/json`.
async fn trigger_job(
    State(jobs): State<Arc<Jobs>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "a trigger must be sent with Content-Type: application/json (got {content_type:?})"
            ),
        ));
    }
    let request: TriggerRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_request",
            format!("expected {{\"source\": NAME}}: {e}"),
        )
    })?;
    let job_id = jobs.trigger(&request.source, "api").await?;
    Ok((StatusCode::ACCEPTED, Json(Triggered { job_id })).into_response())
}

fn no_job(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_job",
        format!("no job {id:?} (never created, or older than jobs.retention)"),
    )
}

async fn job_status(
    State(jobs): State<Arc<Jobs>>,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    let row = jobs.find(id.clone()).await?.ok_or_else(|| no_job(&id))?;
    Ok(Json(row.status()))
}

async fn job_result(
    State(jobs): State<Arc<Jobs>>,
    Path(id): Path<String>,
) -> Result<Json<JobResult>, ApiError> {
    let row = jobs.find(id.clone()).await?.ok_or_else(|| no_job(&id))?;
    if matches!(row.state, JobState::Queued | JobState::Running) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_not_finished",
            format!(
                "job {id} is {}; its result is ready when it has finished",
                row.state.as_str()
            ),
        ));
    }
    Ok(Json(row.result()))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    source: Option<String>,
    state: Option<String>,
    limit: Option<u32>,
}

async fn list_jobs(
    State(jobs): State<Arc<Jobs>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<JobStatus>>, ApiError> {
    let Query(q) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("state {s:?} is not one of queued, running, succeeded, failed"),
            )
        })?),
    };
    let limit = q
        .limit
        .unwrap_or(DEFAULT_LIST_LIMIT)
        .clamp(1, MAX_LIST_LIMIT);
    let rows = jobs
        .list(q.source.filter(|s| !s.is_empty()), state, limit)
        .await?;
    Ok(Json(rows.iter().map(JobRow::status).collect()))
}
