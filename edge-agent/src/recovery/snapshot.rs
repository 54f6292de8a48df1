//! Buffer files opened for the offline `dcs-edge buffer` commands without
//! changing any file beside them, even while an agent runs on them.
//!
//! Invariant: no file in the buffer's directory is written or created; where
//! SQLite would have to (a WAL nobody holds open, a repair), a private copy
//! is opened instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::check::open_immutable;
use super::salvage::repair_page_count;
use super::{shm_of, wal_of};
use crate::buffer::BufferError;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer;
    use crate::seal::Keyring;

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
