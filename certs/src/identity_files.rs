//! An agent's identity files (certificate, key, CA) at the paths its
//! configuration names, written at enrollment and renewal, and recovered
//! after a write was cut.
//!
//! Invariant: the three files change together or not at all, even across a
//! power cut: staged and synced in the order CA, key, certificate, renamed
//! in that order, and [`recover_identity_files`] completes or removes what a
//! cut left staged.

use std::fs;
use std::path::{Path, PathBuf};

use crate::Error;
use crate::enroll;
use crate::files::{
    CERT_MODE, KEY_MODE, OutFile, create_dir_synced, stage_as, sync_dir, sync_dirs_of,
    validate_file_stem,
};

/// Writes an agent's identity to the paths its configuration names, which
/// may lie in different directories: `cert` and `ca` 0644, `key` 0600.
/// Missing directories are created (0700). `ca` is optional: a renewal keeps
/// the trust anchor the agent already has.
///
/// The files change together or not at all, even across a power cut:
/// 1. each file is staged beside its target as `.NAME.next` in the order
///    ca, key, cert, each fsynced and its directory fsynced before the next
///    one starts, so a staged certificate means everything before it is
///    staged and durable;
/// 2. the staged files are renamed into place in the same order, the
///    certificate last, and the directories fsynced.
///
/// A crash between two renames leaves the new key beside the old
/// certificate; [`recover_identity_files`], which the agent runs before it
/// loads its identity, completes the move from the staged files.
pub fn write_identity_files(
    cert: (&Path, &str),
    key: (&Path, &str),
    ca: Option<(&Path, &str)>,
) -> Result<(), Error> {
    let mut targets: Vec<((&Path, &str), u32)> = Vec::with_capacity(3);
    targets.extend(ca.map(|ca| (ca, CERT_MODE)));
    targets.push((key, KEY_MODE));
    targets.push((cert, CERT_MODE));
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::with_capacity(targets.len());
    for ((path, contents), mode) in targets {
        let (dir, name) = split_target(path)?;
        let next = dir.join(next_name(&name));
        let result = create_dir_synced(&dir)
            .and_then(|()| {
                stage_as(
                    &next,
                    &OutFile {
                        name: &name,
                        contents,
                        mode,
                    },
                )
            })
            .and_then(|()| sync_dir(&dir));
        if let Err(e) = result {
            // Nothing is renamed yet: the previous identity is whole.
            for (next, _) in &staged {
                let _ = fs::remove_file(next);
            }
            let _ = fs::remove_file(&next);
            return Err(e);
        }
        staged.push((next, path.to_owned()));
    }
    let last = staged.len() - 1;
    for (i, (next, target)) in staged.iter().enumerate() {
        if i == last {
            failpoint("identity-between-renames");
        }
        // On a failure here the staged files stay: the next start's
        // recovery finishes what was begun (some renames may be done).
        fs::rename(next, target).map_err(|source| Error::Io {
            action: "move into place",
            path: target.clone(),
            source,
        })?;
    }
    sync_dirs_of(staged.iter().map(|(_, target)| target.as_path()))
}

/// What [`recover_identity_files`] found beside the identity files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityRecovery {
    /// No staged files: the last write finished, or there was none.
    Clean,
    /// A write was cut after its files were staged: it is now complete, and
    /// the new identity is in place.
    RolledForward,
    /// A write was cut while it staged its files: they were removed, and
    /// the previous identity is in place.
    DiscardedPartial,
}

/// Finishes or undoes a [`write_identity_files`] that a crash or power cut
/// interrupted, so the certificate, its key and the CA on disk belong
/// together again. A staged certificate that matches the staged (or, if that
/// was already renamed, the installed) key means staging had completed: the
/// remaining renames are done. Anything else staged is an incomplete write
/// and is removed, leaving the previous identity.
pub fn recover_identity_files(
    cert: &Path,
    key: &Path,
    ca: Option<&Path>,
) -> Result<IdentityRecovery, Error> {
    let next_of = |path: &Path| -> Result<PathBuf, Error> {
        let (dir, name) = split_target(path)?;
        Ok(dir.join(next_name(&name)))
    };
    let mut pairs = Vec::with_capacity(3);
    if let Some(ca) = ca {
        pairs.push((next_of(ca)?, ca.to_owned()));
    }
    pairs.push((next_of(key)?, key.to_owned()));
    pairs.push((next_of(cert)?, cert.to_owned()));
    let present = |p: &Path| fs::symlink_metadata(p).is_ok();
    if !pairs.iter().any(|(next, _)| present(next)) {
        return Ok(IdentityRecovery::Clean);
    }
    let (cert_next, key_next) = (&pairs[pairs.len() - 1].0, &pairs[pairs.len() - 2].0);
    let key_now = if present(key_next) { key_next } else { key };
    let complete = match (fs::read_to_string(cert_next), fs::read_to_string(key_now)) {
        (Ok(c), Ok(k)) => enroll::check_pair(&c, &k).is_ok(),
        _ => false,
    };
    let outcome = if complete {
        for (next, target) in &pairs {
            if present(next) {
                fs::rename(next, target).map_err(|source| Error::Io {
                    action: "move into place",
                    path: target.clone(),
                    source,
                })?;
            }
        }
        IdentityRecovery::RolledForward
    } else {
        for (next, _) in &pairs {
            match fs::remove_file(next) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Io {
                        action: "remove",
                        path: next.clone(),
                        source,
                    });
                }
            }
        }
        IdentityRecovery::DiscardedPartial
    };
    sync_dirs_of(pairs.iter().map(|(_, target)| target.as_path()))?;
    Ok(outcome)
}

/// The staging name of an identity file: hidden, and never a valid target
/// name itself ([`validate_file_stem`] refuses a leading '.').
pub(crate) fn next_name(name: &str) -> String {
    format!(".{name}.next")
}

/// Pauses the calling thread for good when the environment variable
/// `DCS_TEST_FAILPOINT` names this point, after saying so on stderr. The
/// power-cut tests use it to cut the power at an exact moment; nothing sets
/// it in production.
fn failpoint(name: &str) {
    if std::env::var_os("DCS_TEST_FAILPOINT").is_some_and(|v| v == name) {
        eprintln!("failpoint {name}: reached, pausing");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// The directory and file name of a target path, refusing a path without a
/// usable file name (a directory, `..`, a non-UTF-8 name).
fn split_target(path: &Path) -> Result<(PathBuf, String), Error> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::InvalidFileName {
            name: path.display().to_string(),
            reason: "must end in a UTF-8 file name",
        })?;
    validate_file_stem(name)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name.to_owned()))
}
