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

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::buffer::{self, BufferError};
use crate::seal::Keyring;

/// quick_check reads every page; on a slow disk a multi-GB buffer would hold
/// up the start for minutes. Past this budget the check is abandoned (and
/// logged) rather than blocking ingest.
pub const QUICK_CHECK_BUDGET: Duration = Duration::from_secs(20);
const PENDING: &str = "PENDING";
const REPORT: &str = "report.json";
/// Rows read per query while salvaging.
const SALVAGE_CHUNK: i64 = 500;

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

/// Why the file cannot be used as it is; `None` when it is healthy or absent.
/// Writes nothing to the file or its WAL (see [`open_found`]); the agent
/// calls it at start-up, before anything opens the buffer read-write, so a
/// damaged file can be quarantined as it was found.
pub fn diagnose(path: &Path, budget: Duration) -> Option<String> {
    if !path.exists() {
        return None;
    }
    match open_found(path) {
        Ok(conn) => diagnose_conn(path, &conn, budget),
        Err(error) => Some(format!("cannot open: {error}")),
    }
}

/// [`diagnose`] for `dcs-edge buffer check`: changes no file at all, the
/// shared-memory index included (see [`Snapshot`]).
pub fn diagnose_read_only(path: &Path, budget: Duration) -> Option<String> {
    if !path.exists() {
        return None;
    }
    match Snapshot::open(path, false) {
        Ok(snapshot) => diagnose_conn(path, &snapshot.conn, budget),
        Err(error) => Some(format!("cannot open: {error}")),
    }
}

/// Opens the buffer at start-up for reading without writing to it or its WAL.
///
/// - No WAL: `immutable=1`. SQLite then creates no `-wal`, `-shm` or journal
///   file; a read-only open would create an empty WAL, which makes a lost WAL
///   look like a clean stop to the next check.
/// - A WAL: read-only. SQLite reads the WAL (it holds the commits since the
///   last checkpoint, which `immutable` would ignore) and never writes the
///   file or the WAL, but it does rebuild its shared-memory index in `-shm`;
///   [`prepare`] keeps the `-shm` as found before this runs.
fn open_found(path: &Path) -> rusqlite::Result<Connection> {
    let conn = if wal_of(path).exists() {
        Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?
    } else {
        open_immutable(path)?
    };
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// `file:PATH?immutable=1`: read-only, no locks, no side files.
fn open_immutable(path: &Path) -> rusqlite::Result<Connection> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut uri = String::from("file:");
    for b in absolute.to_string_lossy().bytes() {
        match b {
            b'?' | b'#' | b'%' => uri.push_str(&format!("%{b:02X}")),
            _ => uri.push(b as char),
        }
    }
    uri.push_str("?immutable=1");
    Connection::open_with_flags(
        &uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

/// A read-only view of a buffer file for the offline tools, opened so that
/// no file in its directory changes and none is created:
///
/// - No WAL: the file itself with `immutable=1`. Without a WAL the file is
///   the whole state, and no agent has it open (an open WAL-mode database
///   always has its WAL file).
/// - A WAL that a running agent holds open (its connections keep a lock on
///   the `-shm` file): the file read-only. SQLite never writes the file or
///   the WAL from a read-only connection; the `-shm` index is the running
///   agent's, changed by it all the time anyway. A copy would not do here:
///   the agent may checkpoint between copying the file and the WAL.
/// - A WAL and no running agent (after a crash): file and WAL are copied into
///   a private temporary directory and the copy is opened. A read-only open
///   of the original would rebuild (rewrite) its `-shm`, and `immutable=1`
///   would ignore the WAL, that is the commits since the last checkpoint.
///   With `repair`, a copy is made in every case and its page count repaired
///   (see [`repair_page_count`]), so a truncated file can still be read.
pub struct Snapshot {
    pub conn: Connection,
    work: Option<PathBuf>,
}

impl Snapshot {
    pub fn open(path: &Path, repair: bool) -> Result<Snapshot, BufferError> {
        let open_err = |source| BufferError::Open {
            path: path.to_owned(),
            source,
        };
        let wal = wal_of(path);
        if !repair && !wal.exists() {
            let conn = open_immutable(path).map_err(open_err)?;
            return Ok(Snapshot { conn, work: None });
        }
        if !repair && held_open(path) {
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(open_err)?;
            conn.busy_timeout(Duration::from_secs(5))
                .map_err(open_err)?;
            return Ok(Snapshot { conn, work: None });
        }
        let io = |source| BufferError::Quarantine {
            path: path.to_owned(),
            source,
        };
        let work = private_dir().map_err(io)?;
        let mut snapshot = Snapshot {
            conn: Connection::open_in_memory().map_err(open_err)?,
            work: Some(work.clone()),
        };
        let copy = work.join("buffer.db");
        std::fs::copy(path, &copy).map_err(io)?;
        if wal.exists() {
            std::fs::copy(&wal, wal_of(&copy)).map_err(io)?;
        }
        if repair && let Err(error) = repair_page_count(&copy) {
            tracing::warn!(message = "cannot repair the copy's header", %error);
        }
        // Read-write on the copy: SQLite folds the copied WAL in as it must.
        snapshot.conn = Connection::open(&copy).map_err(open_err)?;
        snapshot
            .conn
            .busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        Ok(snapshot)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            // Close the copy before deleting it.
            let conn = std::mem::replace(
                &mut self.conn,
                Connection::open_in_memory().expect("an in-memory database opens"),
            );
            drop(conn);
            let _ = std::fs::remove_dir_all(work);
        }
    }
}

/// A new directory only we can read, for copies of buffer files (which may
/// hold payloads in clear); under `TMPDIR` when set.
fn private_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt as _;
    let base = std::env::temp_dir();
    loop {
        let dir = base.join(format!("dcs-buffer-{:016x}", fastrand::u64(..)));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Whether an SQLite connection has `path` open: each WAL-mode connection
/// holds a shared lock on byte 128 of the `-shm` file (SQLite's "dead man
/// switch") for as long as it is open.
///
/// Read from `/proc/locks`, which lists every lock, this process's too, and
/// needs no descriptor on the file: closing one would drop every POSIX lock
/// this process holds on it (an agent in the same process would lose its
/// own). Where `/proc/locks` cannot be read, asked with `F_GETLK` on the
/// file, which is safe in a process of its own (the `dcs-edge buffer`
/// commands) and sees other processes' locks.
fn held_open(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let shm = shm_of(path);
    let Ok(meta) = std::fs::metadata(&shm) else {
        return false;
    };
    match std::fs::read_to_string("/proc/locks") {
        Ok(locks) => {
            let (major, minor) = (
                nix::libc::major(meta.dev()) as u64,
                nix::libc::minor(meta.dev()) as u64,
            );
            let file = format!("{major:02x}:{minor:02x}:{}", meta.ino());
            locks.lines().any(|line| {
                // "1: POSIX  ADVISORY  READ 1234 fe:00:5678 128 128"
                let f: Vec<&str> = line.split_whitespace().collect();
                let Some(at) = f.iter().position(|x| *x == file) else {
                    return false;
                };
                let start = f.get(at + 1).and_then(|v| v.parse::<u64>().ok());
                let end = f.get(at + 2).map(|v| {
                    if *v == "EOF" {
                        u64::MAX
                    } else {
                        v.parse().unwrap_or(0)
                    }
                });
                matches!((start, end), (Some(s), Some(e)) if s <= 128 && 128 <= e)
            })
        }
        Err(_) => locked_by_another_process(&shm),
    }
}

fn locked_by_another_process(shm: &Path) -> bool {
    use std::os::fd::AsRawFd as _;
    let Ok(file) = std::fs::File::open(shm) else {
        return false;
    };
    // SAFETY: a zeroed flock is a valid value for every field.
    let mut lock: nix::libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = nix::libc::F_WRLCK as _;
    lock.l_whence = nix::libc::SEEK_SET as _;
    lock.l_start = 128;
    lock.l_len = 1;
    // SAFETY: F_GETLK only fills in `lock`, which outlives the call.
    let rc = unsafe {
        nix::libc::fcntl(
            file.as_raw_fd(),
            nix::libc::F_GETLK,
            &mut lock as *mut nix::libc::flock,
        )
    };
    rc == 0 && i32::from(lock.l_type) != nix::libc::F_UNLCK
}

fn diagnose_conn(path: &Path, conn: &Connection, budget: Duration) -> Option<String> {
    let wal_present = wal_of(path).exists();
    // Interrupted from a timer thread once the budget is spent.
    let interrupt = conn.get_interrupt_handle();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let timer = std::thread::spawn(move || {
        if finished.recv_timeout(budget).is_err() {
            interrupt.interrupt();
        }
    });
    let checked: rusqlite::Result<Vec<String>> = conn
        .prepare("PRAGMA quick_check(5)")
        .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect());
    let _ = done.send(());
    let _ = timer.join();
    match checked {
        Ok(rows) if rows == ["ok"] => {}
        Ok(rows) => return Some(format!("integrity check failed: {}", rows.join("; "))),
        Err(error)
            if error.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted) =>
        {
            tracing::warn!(
                message = "buffer integrity check did not finish in time; going on without it",
                path = %path.display(),
                budget_secs = budget.as_secs()
            );
        }
        Err(error) => return Some(format!("integrity check failed: {error}")),
    }
    invariants(conn, wal_present).err()
}

/// Our own invariants (see the module doc).
fn invariants(conn: &Connection, wal_present: bool) -> Result<(), String> {
    let fail = |e: rusqlite::Error| format!("cannot read the buffer's own tables: {e}");
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'
             AND name IN ('meta', 'records', 'ids', 'dead_letters')",
            [],
            |r| r.get(0),
        )
        .map_err(fail)?;
    if tables == 0 {
        return Ok(()); // created but never initialised: nothing to lose
    }
    if tables < 4 {
        return Err(format!(
            "{} of the buffer's 4 tables are missing",
            4 - tables
        ));
    }
    let meta = |key: &str| -> Result<Option<String>, String> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(fail)
    };
    if meta("epoch")?
        .and_then(|e| e.parse::<Uuid>().ok())
        .is_none()
    {
        return Err("the buffer's epoch is missing or unreadable".into());
    }
    for key in [
        "next_seq",
        "dropped_total",
        "dead_letter_total",
        "delivered_total",
    ] {
        if let Some(value) = meta(key)?
            && !value.parse::<i64>().is_ok_and(|n| n >= 0)
        {
            return Err(format!("counter {key} holds {value:?}"));
        }
    }
    if let Some(next) = meta("next_seq")?.and_then(|v| v.parse::<i64>().ok()) {
        let max_seq: i64 = conn
            .query_row(
                "SELECT max(coalesce((SELECT max(seq) FROM records), 0),
                            coalesce((SELECT max(seq) FROM ids), 0),
                            coalesce((SELECT max(seq) FROM dead_letters), 0))",
                [],
                |r| r.get(0),
            )
            .map_err(fail)?;
        if max_seq >= next {
            return Err(format!(
                "sequence {max_seq} is stored but next_seq is {next}"
            ));
        }
    }
    if meta("clean_close")?.as_deref() == Some("0") && !wal_present {
        return Err("the write-ahead log is missing after an unclean stop: \
                    commits since the last checkpoint are lost"
            .into());
    }
    Ok(())
}

/// Moves the buffer file and its WAL into a new folder of the quarantine
/// directory, byte for byte as found, and puts the `-shm` file there as it
/// was before the check (`shm_found`; none if there was none). The WAL goes
/// first: a WAL left beside a new buffer would be replayed into it.
fn quarantine(
    path: &Path,
    quarantine_dir: &Path,
    reason: &str,
    shm_found: Option<&[u8]>,
) -> std::io::Result<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "buffer.db".into());
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_default();
    let folder = quarantine_dir.join(format!("{name}-{stamp}-{:04x}", fastrand::u16(..)));
    // The new folder's entry (and the quarantine directory's, if new) is
    // fsynced before anything is moved into it.
    crate::durable::create_dir_all(&folder)?;
    write_synced(&folder.join(PENDING), reason.as_bytes())?;
    for suffix in ["-wal", ""] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        if from.exists() {
            move_file(&from, &folder.join(format!("{name}{suffix}")))?;
        }
    }
    if let Some(bytes) = shm_found {
        write_synced(&folder.join(format!("{name}-shm")), bytes)?;
    }
    match std::fs::remove_file(shm_of(path)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    sync_dir(&folder);
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(folder)
}

/// Salvages the damaged file in `folder` into `recovered_dir`, writes the
/// report and clears the pending marker.
fn salvage_folder(
    folder: &Path,
    recovered_dir: &Path,
    keyring: &Keyring,
) -> Result<Report, BufferError> {
    let io = |source| BufferError::Quarantine {
        path: folder.to_owned(),
        source,
    };
    let reason = std::fs::read_to_string(folder.join(PENDING)).unwrap_or_default();
    let db = list_files(folder, ".db").into_iter().next().or_else(|| {
        // A file not named *.db: whatever is not a WAL, SHM or our own file.
        list_files(folder, "").into_iter().find(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            !n.ends_with("-wal") && !n.ends_with("-shm") && n != PENDING && n != REPORT
        })
    });
    // Salvage reads a copy: opening the original would replay and rewrite
    // its WAL, and the quarantined files are the evidence.
    let work = folder.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io)?;
    let mut report = Report::new(
        folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        modified_rfc3339(&folder.join(PENDING)),
        reason.trim().to_owned(),
    );
    if let Some(db) = db {
        let copy = work.join("buffer.db");
        std::fs::copy(&db, &copy).map_err(io)?;
        let wal = wal_of(&db);
        if wal.exists() {
            std::fs::copy(&wal, wal_of(&copy)).map_err(io)?;
        }
        salvage_file(&copy, recovered_dir, keyring, &mut report)?;
    }
    let _ = std::fs::remove_dir_all(&work);
    let json = serde_json::to_vec_pretty(&report).expect("a report serialises");
    write_synced(&folder.join(REPORT), &json).map_err(io)?;
    std::fs::remove_file(folder.join(PENDING)).map_err(io)?;
    sync_dir(folder);
    Ok(report)
}

/// Salvages a copy of `damaged` (and its WAL) into `into`, leaving the file
/// itself untouched; for `dcs-edge buffer salvage`.
pub fn salvage_copy(damaged: &Path, into: &Path, keyring: &Keyring) -> Result<Report, BufferError> {
    let io = |source| BufferError::Quarantine {
        path: damaged.to_owned(),
        source,
    };
    let work = into.join(format!(".salvage-{:08x}", fastrand::u32(..)));
    std::fs::create_dir_all(&work).map_err(io)?;
    let copy = work.join("buffer.db");
    let copied = std::fs::copy(damaged, &copy).and_then(|_| {
        let wal = wal_of(damaged);
        if wal.exists() {
            std::fs::copy(&wal, wal_of(&copy))?;
        }
        Ok(())
    });
    let mut report = Report::new(
        damaged.display().to_string(),
        time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        "offline salvage".into(),
    );
    let result = copied
        .map_err(io)
        .and_then(|()| salvage_file(&copy, into, keyring, &mut report));
    let _ = std::fs::remove_dir_all(&work);
    result.map(|()| report)
}

/// Copies every readable record of `damaged` into `recovered_dir/<epoch>.db`,
/// filling in the report's counts. `damaged` must be a copy: it is repaired
/// in place (see [`repair_page_count`]) before it is read.
fn salvage_file(
    damaged: &Path,
    recovered_dir: &Path,
    keyring: &Keyring,
    report: &mut Report,
) -> Result<(), BufferError> {
    if let Err(error) = repair_page_count(damaged) {
        tracing::warn!(message = "cannot repair the damaged copy's header", %error);
    }
    let Ok(src) = Connection::open(damaged) else {
        return Ok(());
    };
    let _ = src.busy_timeout(Duration::from_secs(5));
    let epoch: Option<Uuid> = src
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
            r.get::<_, String>(0)
        })
        .ok()
        .and_then(|e| e.parse().ok());
    // Without its epoch no salvaged key can be kept: a new one is made, and
    // a record delivered just before the damage may then arrive twice.
    let target_epoch = epoch.unwrap_or_else(Uuid::new_v4);
    // A file that moved to a new epoch holds records of each; every one
    // keeps the key it was buffered under.
    let epochs = crate::epochs::read(&src, target_epoch);
    report.epoch = epoch;
    report.held = expected_buffered(&src).or_else(|| {
        src.query_row("SELECT count(*) FROM records", [], |r| r.get::<_, i64>(0))
            .ok()
            .map(|n| n.max(0) as u64)
    });
    let has_key_id = buffer::has_key_id(&src, "records").unwrap_or(false);
    let key_col = if has_key_id { "key_id" } else { "NULL" };

    crate::durable::create_dir_all(recovered_dir).map_err(|source| BufferError::Quarantine {
        path: recovered_dir.to_owned(),
        source,
    })?;
    let target_path = recovered_dir.join(format!("{target_epoch}.db"));
    let mut dst = buffer::create_with_epoch(&target_path, target_epoch, keyring)?;
    let tx = dst.transaction()?;
    crate::epochs::write(&tx, &epochs)?;
    let columns = "seq, id, stream, ts_us, received_us, size, payload";
    let mut found = 0u64;
    {
        let mut insert = tx.prepare(&format!(
            "INSERT OR IGNORE INTO records ({columns}, key_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        ))?;
        let select = format!("SELECT {columns}, {key_col} FROM records");
        scan(&src, &select, &mut |row| {
            found += 1;
            // A row that does not decode is not salvaged: it is in `held`
            // and so counted as unreadable below.
            let seq: i64 = row.get(0)?;
            if buffer::decode_row(row, keyring, &epochs.of(seq)).is_ok() {
                let values: Vec<rusqlite::types::Value> =
                    (0..8).map(|i| row.get(i)).collect::<Result<_, _>>()?;
                report.salvaged += insert.execute(rusqlite::params_from_iter(values))? as u64;
            }
            Ok(())
        })?;
    }
    {
        let dead_select =
            format!("SELECT {columns}, {key_col}, reason, failed_us FROM dead_letters");
        let mut insert = tx.prepare(&format!(
            "INSERT OR IGNORE INTO dead_letters ({columns}, key_id, reason, failed_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
        ))?;
        scan(&src, &dead_select, &mut |row| {
            let values: Vec<rusqlite::types::Value> =
                (0..10).map(|i| row.get(i)).collect::<Result<_, _>>()?;
            report.dead_letters_salvaged +=
                insert.execute(rusqlite::params_from_iter(values))? as u64;
            Ok(())
        })?;
    }
    // The counters may be unreadable while rows are not: never report fewer
    // held than were found.
    let held = report.held.unwrap_or(found).max(found);
    report.held = Some(held);
    report.unreadable = held.saturating_sub(report.salvaged);
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('dead_letter_total', ?1)",
        [report.dead_letters_salvaged.to_string()],
    )?;
    buffer::finish_created(&tx)?;
    // The recovered file's sequence numbers have the holes of the damaged
    // one: recorded, so its counters prove what it holds like any buffer's.
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('seq_gaps',
             CAST(CAST((SELECT value FROM meta WHERE key = 'next_seq') AS INTEGER) - 1
                  - (SELECT count(*) FROM records) - ?1 AS TEXT))",
        [report.dead_letters_salvaged as i64],
    )?;
    tx.commit()?;
    drop(dst);
    if report.salvaged == 0 && report.dead_letters_salvaged == 0 {
        remove_buffer_files(&target_path);
    } else {
        // The recovered file must outlive a power cut before the caller
        // clears the pending marker that would salvage it again.
        crate::durable::sync_dir(recovered_dir).map_err(|source| BufferError::Quarantine {
            path: recovered_dir.to_owned(),
            source,
        })?;
        report.recovered_file = target_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
    }
    Ok(())
}

/// How many records `records` must hold, from the buffer's own counters,
/// which the writer commits with every change: each sequence number below
/// `next_seq` was handed to a record acknowledged to its producer, and left
/// `records` only counted as delivered, dropped or dead-lettered (source
/// records refused at validation get a sequence number and go straight to
/// `dead_letters`, counted too). `seq_gaps` counts numbers never stored
/// (a recovered buffer's holes), and `rekeyed_total` the numbers a record
/// left when it was moved to a new epoch under a fresh one
/// ([`crate::epochs::rekey`]). `None` when the counters cannot be read.
pub fn expected_buffered(conn: &Connection) -> Option<u64> {
    let meta = |key: &str| -> Option<Option<i64>> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            r.get::<_, String>(0)
        })
        .optional()
        .ok()
        .map(|v| v.and_then(|v| v.parse().ok()))
    };
    let handed_out = meta("next_seq")??.checked_sub(1)?;
    let mut gone = 0i64;
    for key in [
        "delivered_total",
        "dropped_total",
        "dead_letter_total",
        "seq_gaps",
        "rekeyed_total",
    ] {
        gone = gone.checked_add(meta(key)?.unwrap_or(0))?;
    }
    Some(handed_out.saturating_sub(gone).max(0) as u64)
}

/// A truncated file is shorter than the page count in its header, and SQLite
/// then refuses every query ("malformed"), even on the pages that are all
/// there. Cutting the copy to whole pages and writing the real count into
/// the header makes those pages readable again.
fn repair_page_count(path: &Path) -> std::io::Result<()> {
    use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut header = [0u8; 100];
    if file.read_exact(&mut header).is_err() || !header.starts_with(b"SQLite format 3\0") {
        return Ok(());
    }
    let page = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536u64,
        n if n >= 512 && n.is_power_of_two() => u64::from(n),
        _ => return Ok(()),
    };
    let len = file.metadata()?.len();
    let pages = len / page;
    let in_header = u64::from(u32::from_be_bytes([
        header[28], header[29], header[30], header[31],
    ]));
    if len % page != 0 {
        file.set_len(pages * page)?;
    }
    if in_header > pages {
        file.seek(SeekFrom::Start(28))?;
        file.write_all(&(pages as u32).to_be_bytes())?;
    }
    Ok(())
}

/// Calls `each` for every row of `select` (a `SELECT ... FROM table` whose
/// first column is `seq`) that SQLite can still read. Reads in sequence order
/// in chunks; where a chunk fails (a damaged page), it probes the following
/// sequence numbers one by one, doubling the stride until chunked reads work
/// again, so one bad page costs only the rows on it.
pub(crate) fn scan(
    conn: &Connection,
    select: &str,
    each: &mut dyn FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<()>,
) -> Result<(), BufferError> {
    let upper: i64 = conn
        .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
            r.get::<_, String>(0)
        })
        .ok()
        .and_then(|v| v.parse().ok())
        .or_else(|| {
            let table = select.rsplit(' ').next().unwrap_or("records");
            conn.query_row(&format!("SELECT max(seq) + 1 FROM {table}"), [], |r| {
                r.get(0)
            })
            .ok()
        })
        // Neither is readable: probe a bounded range rather than forever.
        .unwrap_or(1 << 20);
    let chunk_sql = format!("{select} WHERE seq > ?1 ORDER BY seq LIMIT ?2");
    let point_sql = format!("{select} WHERE seq = ?1");
    // Reads a chunk after `cursor`, moving it past every row passed on, so a
    // failure part-way leaves it at the last good row.
    let chunk = |cursor: &mut i64,
                 each: &mut dyn FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<()>|
     -> rusqlite::Result<bool> {
        let mut stmt = conn.prepare_cached(&chunk_sql)?;
        let mut rows = stmt.query(params![*cursor, SALVAGE_CHUNK])?;
        let mut any = false;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            each(row)?;
            *cursor = seq;
            any = true;
        }
        Ok(any)
    };
    let readable_after = |cursor: i64| -> bool {
        conn.prepare_cached(&chunk_sql)
            .and_then(|mut stmt| stmt.query(params![cursor, 1])?.next().map(|_| ()))
            .is_ok()
    };
    let mut cursor = 0i64;
    loop {
        match chunk(&mut cursor, each) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(_) => {
                // A damaged page after `cursor`: probe forward row by row.
                let mut stride = 1i64;
                loop {
                    let end = cursor.saturating_add(stride).min(upper);
                    for seq in cursor + 1..=end {
                        if let Ok(mut stmt) = conn.prepare_cached(&point_sql) {
                            let _ = stmt.query_row([seq], |row| each(row));
                        }
                    }
                    cursor = end;
                    if cursor >= upper {
                        return Ok(());
                    }
                    if readable_after(cursor) {
                        break;
                    }
                    stride = (stride * 2).min(1 << 16);
                }
            }
        }
    }
}

fn read_report(folder: &Path) -> Option<Report> {
    let bytes = std::fs::read(folder.join(REPORT)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn wal_of(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}-wal", path.display()))
}

fn shm_of(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}-shm", path.display()))
}

/// Deletes a buffer file with its WAL and shared-memory files.
pub fn remove_buffer_files(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

fn list_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

fn list_files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    out
}

fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        // Another filesystem: copy, sync, then remove.
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
            std::fs::copy(from, to)?;
            std::fs::File::open(to)?.sync_all()?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e),
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn modified_rfc3339(path: &Path) -> String {
    let t = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map(time::OffsetDateTime::from)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_buffer_is_seen_as_held_open_and_a_closed_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let buffer = buffer::Buffer::open(buffer::BufferOptions {
            path: path.clone(),
            capacity_bytes: 1 << 30,
            overflow: buffer::Overflow::Reject,
            durability: buffer::Durability::ProcessCrash,
            dedup_window: 1000,
            min_free_disk: 0,
            quarantine_dir: dir.path().join("quarantine"),
            keyring: Keyring::disabled(),
            retain_delivered: std::time::Duration::ZERO,
        })
        .unwrap();
        assert!(
            held_open(&path),
            "a running agent's buffer is read in place"
        );
        // Asking did not take the agent's lock away.
        assert!(held_open(&path));
        buffer.close().await;
        assert!(!held_open(&path), "nobody holds a closed buffer");
    }
}
