//! Files that hold records or secrets are readable by the agent's user only,
//! whatever the umask of whoever started it.

use std::fs::{OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Owner read and write, nothing for group or others.
pub const OWNER_ONLY: u32 = 0o600;

/// Creates `path` (empty) with mode 0600 if it does not exist, and sets 0600
/// on it and on SQLite's `-wal` and `-shm` companions if they do. SQLite
/// creates those companions with the main file's mode, so setting it before
/// the first open covers all three.
pub fn owner_only(path: &Path) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(OWNER_ONLY)
        .open(path)?;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::set_permissions(&name, Permissions::from_mode(OWNER_ONLY)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_new_or_existing_file_ends_up_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("buffer.db");
        owner_only(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o600);

        let old = dir.path().join("old.db");
        std::fs::write(&old, b"kept").unwrap();
        std::fs::set_permissions(&old, Permissions::from_mode(0o644)).unwrap();
        let wal = dir.path().join("old.db-wal");
        std::fs::write(&wal, b"").unwrap();
        std::fs::set_permissions(&wal, Permissions::from_mode(0o666)).unwrap();
        owner_only(&old).unwrap();
        assert_eq!((mode(&old), mode(&wal)), (0o600, 0o600));
        assert_eq!(std::fs::read(&old).unwrap(), b"kept", "never truncated");
    }
}
