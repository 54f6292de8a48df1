//! Start-up integrity check of the buffer file, quarantine and salvage.
//!
//! # Design constraints
//! - A damaged buffer never stops the agent and is never silently discarded:
//!   it is moved into the quarantine folder (with its WAL), ingest continues
//!   on a new buffer with a new epoch, and every record that can still be read
//!   is salvaged and delivered.
//! - Salvaged records keep their delivery key (epoch, seq). They go into a
//!   *recovered* buffer file of their own (`recovered/<epoch>.db` beside the
//!   buffer) that the agent drains and then deletes. Had they been re-buffered
//!   under new keys, a record delivered just before the damage (its ack lost
//!   with the WAL, say) would arrive twice; with its old key the aggregator
//!   recognises it.
//! - The quarantined files are evidence and stay untouched: salvage reads a
//!   working copy. A `PENDING` marker is written before the files move and
//!   removed after the salvage report is written, so a crash in between
//!   redoes the salvage at the next start instead of forgetting it.
//! - "Damaged" means: SQLite's `quick_check` fails (bounded in time; a check
//!   that runs out of time is logged, not treated as damage), or our own
//!   invariants fail: epoch present, counters non-negative, every sequence
//!   number below `next_seq`, and a WAL present after an unclean stop (the
//!   WAL holds the commits since the last checkpoint; without it the file
//!   is an older state whose sequence numbers may be handed out again).
//!
//! # Layout
//! The module root runs recovery at start-up ([`prepare`]) and keeps the
//! reports and the recovered buffers waiting for delivery. `check`
//! decides whether a file is damaged, `quarantine` moves
//! it aside with its pending marker, `salvage` copies out what can still
//! be read, and `snapshot` opens a file for the offline tools without
//! changing it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::buffer::{self, BufferError};

mod check;
mod quarantine;
mod salvage;
mod snapshot;

pub use check::{diagnose, diagnose_read_only, expected_buffered};
pub use salvage::salvage_copy;
pub(crate) use salvage::scan;
pub use snapshot::Snapshot;

use quarantine::{list_dirs, list_files, quarantine, read_report, salvage_folder};

/// quick_check reads every page; on a slow disk a multi-GB buffer would hold
/// up the start for minutes. Past this budget the check is abandoned (and
/// logged) rather than blocking ingest.
pub const QUICK_CHECK_BUDGET: Duration = Duration::from_secs(20);
/// Written into a quarantine folder before the files move, removed once
/// its report is written: a crash in between salvages again.
const PENDING: &str = "PENDING";
/// The salvage report in a quarantine folder.
const REPORT: &str = "report.json";

/// What one quarantine found and saved; kept as `report.json` in the
/// quarantine folder and shown in `/v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The folder (inside the quarantine directory) holding the damaged files.
    pub folder: String,
    pub quarantined_at: String,
    pub reason: String,
    /// The damaged file's epoch, when it could still be read.
    pub epoch: Option<Uuid>,
    /// Buffered records the damaged file held: what its own counters prove
    /// (see [`expected_buffered`]), else what could still be counted.
    pub held: Option<u64>,
    /// Buffered records copied into the recovered buffer for delivery.
    pub salvaged: u64,
    /// Buffered records that could not be recovered: `held - salvaged`,
    /// whether their rows were lost with a damaged page or found and
    /// unreadable (damaged values, unknown keys). Each was acknowledged to
    /// its producer and never delivered.
    pub unreadable: u64,
    /// Dead letters copied (kept for inspection, not delivered).
    pub dead_letters_salvaged: u64,
    /// Recovered buffer file (name inside `recovered/`), if any record was saved.
    pub recovered_file: Option<String>,
}

impl Report {
    /// A report before salvage has counted anything.
    fn new(folder: String, quarantined_at: String, reason: String) -> Report {
        Report {
            folder,
            quarantined_at,
            reason,
            epoch: None,
            held: None,
            salvaged: 0,
            unreadable: 0,
            dead_letters_salvaged: 0,
            recovered_file: None,
        }
    }
}

/// The state of recovery at start-up.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Every report in the quarantine folder, oldest first.
    pub reports: Vec<Report>,
    /// Reports written by this start (also in `reports`).
    pub new_reports: usize,
    /// Recovered buffer files waiting to be delivered.
    pub recovered: Vec<PathBuf>,
}

/// Recovered buffers open for delivery, for `/v1/status`: their records
/// were acknowledged to producers and are not delivered yet.
#[derive(Clone, Default)]
pub struct Waiting(std::sync::Arc<std::sync::Mutex<Vec<buffer::Buffer>>>);

/// Salvaged records waiting for delivery, in `/v1/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WaitingStatus {
    /// Recovered buffer files being delivered.
    pub files: u64,
    /// Records in them not yet delivered.
    pub records: u64,
    pub bytes: u64,
}

impl Waiting {
    pub fn add(&self, buffer: buffer::Buffer) {
        self.0.lock().expect("waiting lock").push(buffer);
    }

    pub fn remove(&self, path: &Path) {
        self.0
            .lock()
            .expect("waiting lock")
            .retain(|b| b.path() != path);
    }

    pub fn status(&self) -> WaitingStatus {
        let buffers = self.0.lock().expect("waiting lock");
        buffers
            .iter()
            .map(|b| b.stats())
            .fold(WaitingStatus::default(), |mut w, s| {
                w.files += 1;
                w.records += s.records;
                w.bytes += s.bytes;
                w
            })
    }
}

/// Where recovered buffers live: `recovered/` beside the buffer file.
pub fn recovered_dir(buffer_path: &Path) -> PathBuf {
    buffer_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("recovered")
}

/// Checks the buffer file, quarantines it if damaged, finishes any pending
/// salvage and lists what there is to deliver. Blocking.
pub fn prepare(opts: &buffer::BufferOptions) -> Result<Prepared, BufferError> {
    // The check reads a WAL through SQLite's shared-memory index, which
    // SQLite rebuilds in the `-shm` file; the file and the WAL it leaves
    // untouched. So the `-shm` is kept as found, for the quarantine.
    let shm_found = std::fs::read(shm_of(&opts.path)).ok();
    if let Some(reason) = diagnose(&opts.path, QUICK_CHECK_BUDGET) {
        tracing::error!(
            message = "buffer file is damaged: moving it to quarantine and salvaging its records",
            path = %opts.path.display(),
            %reason
        );
        quarantine(
            &opts.path,
            &opts.quarantine_dir,
            &reason,
            shm_found.as_deref(),
        )
        .map_err(|source| BufferError::Quarantine {
            path: opts.path.clone(),
            source,
        })?;
    }
    let recovered_dir = recovered_dir(&opts.path);
    let mut prepared = Prepared::default();
    for folder in list_dirs(&opts.quarantine_dir) {
        if folder.join(PENDING).exists() {
            let report = salvage_folder(&folder, &recovered_dir, &opts.keyring)?;
            tracing::error!(
                message = "buffer salvage finished",
                folder = %folder.display(),
                reason = %report.reason,
                held = report.held,
                salvaged = report.salvaged,
                unreadable = report.unreadable,
                dead_letters_salvaged = report.dead_letters_salvaged
            );
            metrics::counter!("dcs_agent_buffer_quarantines_total").increment(1);
            metrics::counter!("dcs_agent_buffer_salvaged_records_total").increment(report.salvaged);
            metrics::counter!("dcs_agent_buffer_unsalvageable_records_total")
                .increment(report.unreadable);
            prepared.new_reports += 1;
        }
        if let Some(report) = read_report(&folder) {
            prepared.reports.push(report);
        }
    }
    prepared
        .reports
        .sort_by(|a, b| a.quarantined_at.cmp(&b.quarantined_at));
    metrics::gauge!("dcs_agent_buffer_quarantined_files").set(prepared.reports.len() as f64);
    prepared.recovered = list_files(&recovered_dir, ".db");
    Ok(prepared)
}

pub fn wal_of(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}-wal", path.display()))
}

pub(super) fn shm_of(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}-shm", path.display()))
}

/// Deletes a buffer file with its WAL and shared-memory files.
pub fn remove_buffer_files(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
