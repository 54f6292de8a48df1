//! The quarantine folder of one damaged buffer: the files moved in as
//! found, the `PENDING` marker, the salvage and its `report.json`.
//!
//! Invariants: the quarantined files are evidence and stay byte for byte
//! (salvage reads a copy; the `-shm` is kept as it was before the check);
//! the WAL moves first, so none is left to be replayed into a new buffer;
//! the marker is removed only after the report is written and synced, so a
//! crash in between salvages again instead of forgetting.

use std::path::{Path, PathBuf};

use super::salvage::salvage_file;
use super::{PENDING, REPORT, Report, shm_of, wal_of};
use crate::buffer::BufferError;
use crate::seal::Keyring;

/// Moves the buffer file and its WAL into a new folder of the quarantine
/// directory, byte for byte as found, and puts the `-shm` file there as it
/// was before the check (`shm_found`; none if there was none). The WAL goes
/// first: a WAL left beside a new buffer would be replayed into it.
pub(super) fn quarantine(
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
pub(super) fn salvage_folder(
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

pub(super) fn read_report(folder: &Path) -> Option<Report> {
    let bytes = std::fs::read(folder.join(REPORT)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub(super) fn list_dirs(dir: &Path) -> Vec<PathBuf> {
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

pub(super) fn list_files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
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
