//! Making files survive a power cut, not only a crash of the agent.
//!
//! A `write` or a `rename` sits in the page cache until the kernel writes it
//! back; a power cut before then loses it, and a new file's directory entry
//! is lost unless the directory itself is fsynced. Everything the agent
//! writes outside SQLite goes through a temporary file, an fsync, a rename
//! and an fsync of the directory (`dcs_certs` for certificates and keys,
//! [`crate::recovery`] for quarantined files); SQLite files (the buffer,
//! checkpoints, jobs) are made durable by their transactions, and a new
//! one's directory entry by [`sync_parent`].
//!
//! Files the agent only reads but relies on (the configuration file and the
//! encryption key files) are fsynced at start-up by [`make_durable`]: an
//! operator who wrote a new key with `openssl rand -hex 32 > key` and started
//! the agent at once must not find, after a power cut, a buffer sealed with a
//! key whose file never reached the disk.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// fsyncs a directory, so that entries created, renamed or removed in it
/// survive a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// fsyncs the directory that holds `path`.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    sync_dir(&parent(path))
}

/// `std::fs::create_dir_all`, and then an fsync of the parent of every
/// directory it created, so a new directory does not vanish in a power cut
/// together with the files it holds.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    let mut missing: Vec<PathBuf> = Vec::new();
    let mut at = Some(dir);
    while let Some(p) = at {
        if p.as_os_str().is_empty() || p.exists() {
            break;
        }
        missing.push(p.to_owned());
        at = p.parent();
    }
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    // Outermost first: each new directory's entry is in its parent.
    for created in missing.iter().rev() {
        sync_parent(created)?;
    }
    Ok(())
}

/// fsyncs `path` (a file the agent reads and relies on) and its directory.
///
/// A file system that cannot fsync (`EINVAL`: some pseudo file systems) or is
/// read-only (`EROFS`: nothing can be pending on it) is not an error.
pub fn make_durable(path: &Path) -> io::Result<()> {
    let tolerated = |e: io::Error| match e.raw_os_error() {
        Some(nix::libc::EINVAL) | Some(nix::libc::EROFS) => Ok(()),
        _ => Err(e),
    };
    File::open(path)?.sync_all().or_else(tolerated)?;
    sync_parent(path).or_else(tolerated)
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_dir_all_creates_nested_directories_and_accepts_existing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        create_dir_all(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_all(&deep).unwrap();
        make_durable(&deep).unwrap();
    }

    #[test]
    fn make_durable_names_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = make_durable(&dir.path().join("nope")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        std::fs::write(dir.path().join("key"), "x").unwrap();
        make_durable(&dir.path().join("key")).unwrap();
        sync_parent(Path::new("relative-file")).unwrap();
    }
}
