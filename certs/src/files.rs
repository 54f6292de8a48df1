//! Certificates and keys written to disk: every file staged under a
//! temporary name with its final mode, fsynced, then renamed into place and
//! its directory fsynced.
//!
//! Invariants: keys are 0600 from the moment they exist, certificates 0644,
//! new directories 0700; a failure leaves the previous files untouched and
//! no temporary file behind; a name cannot leave its directory.

use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{CA_CERT_FILE, Error, Pem};

pub(crate) const CERT_MODE: u32 = 0o644;
pub(crate) const KEY_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;

/// Writes `DIR/NAME.pem` (0644) and `DIR/NAME-key.pem` (0600), creating `DIR`
/// (0700) if needed. Existing files are replaced: leaf certificates are cheap
/// to reissue, unlike a CA.
pub fn write_pair(dir: &Path, name: &str, pem: &Pem) -> Result<(), Error> {
    validate_file_stem(name)?;
    let cert_name = format!("{name}.pem");
    let key_name = format!("{name}-key.pem");
    write_files(
        dir,
        &[
            OutFile::cert(&cert_name, &pem.cert),
            OutFile::key(&key_name, &pem.key),
        ],
    )
}

/// Writes everything an agent needs into `DIR`: `agent.pem`, `agent-key.pem`
/// and a copy of the CA certificate as `ca.pem` (to verify the aggregator).
///
/// One call rather than [`write_pair`] plus a copy, so that all three files
/// are staged before any of them replaces an older version.
pub fn write_agent_bundle(dir: &Path, agent: &Pem, ca_cert_pem: &str) -> Result<(), Error> {
    write_files(
        dir,
        &[
            OutFile::cert("agent.pem", &agent.cert),
            OutFile::key("agent-key.pem", &agent.key),
            OutFile::cert(CA_CERT_FILE, ca_cert_pem),
        ],
    )
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Io {
            action: "sync directory",
            path: dir.to_owned(),
            source,
        })
}

/// Fsyncs the directory of each path once.
pub(crate) fn sync_dirs_of<'a>(paths: impl Iterator<Item = &'a Path>) -> Result<(), Error> {
    let mut synced: Vec<&Path> = Vec::new();
    for path in paths {
        // A bare file name ("agent.pem") has the empty path as its parent,
        // which cannot be opened: it means the current directory.
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !synced.contains(&dir) {
            sync_dir(dir)?;
            synced.push(dir);
        }
    }
    Ok(())
}

pub(crate) fn validate_file_stem(name: &str) -> Result<(), Error> {
    let invalid = |reason| Error::InvalidFileName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if name.contains(['/', '\0']) {
        return Err(invalid("must not contain '/' or NUL"));
    }
    if name.starts_with('.') {
        // Also keeps it clear of our own ".NAME.tmp-*" staging files.
        return Err(invalid("must not start with '.'"));
    }
    Ok(())
}

/// One file to write: its name in the directory, contents and mode.
pub(crate) struct OutFile<'a> {
    pub(crate) name: &'a str,
    pub(crate) contents: &'a str,
    pub(crate) mode: u32,
}

impl<'a> OutFile<'a> {
    pub(crate) fn cert(name: &'a str, contents: &'a str) -> Self {
        OutFile {
            name,
            contents,
            mode: CERT_MODE,
        }
    }

    pub(crate) fn key(name: &'a str, contents: &'a str) -> Self {
        OutFile {
            name,
            contents,
            mode: KEY_MODE,
        }
    }
}

/// Stages every file under a temporary name in `dir`, then renames them all
/// into place. Staging everything first means a failure (disk full, bad
/// permissions) leaves the previous files untouched and no stray temporary
/// files; the renames themselves are atomic per file.
pub(crate) fn write_files(dir: &Path, files: &[OutFile<'_>]) -> Result<(), Error> {
    create_dir_synced(dir)?;

    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::with_capacity(files.len());
    let cleanup = |staged: &[(PathBuf, PathBuf)]| {
        for (tmp, _) in staged {
            let _ = fs::remove_file(tmp);
        }
    };
    for file in files {
        match stage(dir, file) {
            Ok(tmp) => staged.push((tmp, dir.join(file.name))),
            Err(e) => {
                cleanup(&staged);
                return Err(e);
            }
        }
    }
    move_into_place(&staged)
}

/// Creates `dir` and its missing parents (0700), then fsyncs the parent of
/// each directory it created: a new directory's entry would otherwise be
/// lost in a power cut together with the files renamed into it.
pub(crate) fn create_dir_synced(dir: &Path) -> Result<(), Error> {
    let mut missing: Vec<&Path> = Vec::new();
    let mut at = Some(dir);
    while let Some(p) = at {
        if p.as_os_str().is_empty() || p.exists() {
            break;
        }
        missing.push(p);
        at = p.parent();
    }
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| Error::Io {
            action: "create directory",
            path: dir.to_owned(),
            source,
        })?;
    for created in missing.iter().rev() {
        let parent = match created.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|source| Error::Io {
                action: "sync directory",
                path: parent.to_owned(),
                source,
            })?;
    }
    Ok(())
}

/// Renames staged files (temporary name, target) onto their targets, then
/// syncs each target's directory: without that a crash could lose the
/// renames even though the contents were synced. A failed rename removes
/// the files not yet moved.
fn move_into_place(staged: &[(PathBuf, PathBuf)]) -> Result<(), Error> {
    for (i, (tmp, target)) in staged.iter().enumerate() {
        if let Err(source) = fs::rename(tmp, target) {
            for (tmp, _) in &staged[i..] {
                let _ = fs::remove_file(tmp);
            }
            return Err(Error::Io {
                action: "move into place",
                path: target.clone(),
                source,
            });
        }
    }
    sync_dirs_of(staged.iter().map(|(_, target)| target.as_path()))
}

/// Writes one file under a fresh temporary name and returns that name.
fn stage(dir: &Path, file: &OutFile<'_>) -> Result<PathBuf, Error> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut tmp_name = OsString::from(".");
    tmp_name.push(file.name);
    tmp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);
    stage_as(&tmp, file)?;
    Ok(tmp)
}

/// Writes one file at `tmp`, replacing what an interrupted earlier write
/// left there, with its final mode, and fsyncs it.
pub(crate) fn stage_as(tmp: &Path, file: &OutFile<'_>) -> Result<(), Error> {
    let io_err = |action| {
        let path = tmp.to_owned();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    };
    // remove_file removes a symlink planted at the name, never its target.
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove")(e)),
    }
    // The mode applies at creation, so a private key is never readable by
    // others, not even for an instant. create_new refuses to follow a
    // symlink planted at the temporary name.
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(file.mode)
        .open(tmp)
        .map_err(io_err("create"))?;
    let result = (|| {
        // The umask may have stripped bits (a 0644 certificate created under
        // umask 077); set the exact mode on the still-empty file. This can
        // only widen a certificate, never a key beyond 0600.
        out.set_permissions(Permissions::from_mode(file.mode))
            .map_err(io_err("set permissions on"))?;
        out.write_all(file.contents.as_bytes())
            .map_err(io_err("write"))?;
        out.sync_all().map_err(io_err("sync"))
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    Ok(())
}
