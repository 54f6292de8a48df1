//! The `file` source: tails files matching glob patterns, one record a line.
//!
//! # Checkpoints
//! A file is known by its identity, `device:inode`, not by its name, so a
//! renamed file is still the same file. Its checkpoint (`checkpoints` row
//! with key `DEV:INO`) holds the byte offset after the last line stored, the
//! path it was last seen at, and up to [`PREFIX_BYTES`] of its first bytes.
//! Only complete lines (ending in `\n`) are read; a partial last line waits
//! for the next run.
//!
//! # Rotation and truncation
//! - Rename + create (logrotate's default): the new file has a new identity
//!   and is read from the start. The renamed file is found again by identity
//!   in the directory it was last seen in, even when its new name no longer
//!   matches the pattern, and read to its end; once it is gone from that
//!   directory its checkpoint is forgotten.
//! - Truncation (copytruncate, `> file`): a file shorter than its offset, or
//!   whose first bytes differ from the stored prefix (a new file that reused
//!   the inode), is read again from the start.
//!
//! # Symbolic links
//! A symlink in a watched directory is skipped unless `follow_symlinks =
//! true`, and even then only a link whose target (resolved in full) lies
//! inside that directory is read: a link to the agent's own key, or to
//! `/etc/shadow`, is never read and shipped. A name swapped for a link after
//! the directory was listed is caught by the identity check at open.
//!
//! A file truncated and then refilled past the old offset with the same
//! first bytes before a run sees it cannot be told from an appended file;
//! the lines between are missed. Short intervals make that window small.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use dcs_shared::config::Issues;

use super::{RunContext, RunReport, Source, SourceError};
use crate::buffer::{Rejected, SourceBatch};

/// Enough of a file's start to tell a replaced file from an appended one
/// (two different log files rarely share their first 64 bytes), small
/// enough to keep checkpoints tiny.
pub const PREFIX_BYTES: usize = 64;
/// Records per transaction: big enough to share one commit among many lines,
/// small enough that a run's progress is saved often.
const CHUNK_RECORDS: usize = 5_000;
/// Bytes read per transaction, for files with long lines.
const CHUNK_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Absolute patterns; `*` and `?` may appear in the file name only, e.g.
    /// `/var/log/app/*.log`.
    pub paths: Vec<String>,
    pub format: Format,
    /// Read symlinks whose target is inside the pattern's directory.
    #[serde(default)]
    pub follow_symlinks: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Each line is a JSON object: the payload.
    Ndjson,
    /// The first line names the columns; each other line becomes an object
    /// of strings. Quoted fields may hold commas and `""`, not line breaks.
    Csv,
    /// Each line becomes `{"line": "..."}`.
    Lines,
}

impl FileConfig {
    pub fn validate(&self, key: &str, issues: &mut Issues) {
        issues.check(
            !self.paths.is_empty(),
            &format!("{key}.paths"),
            "needs at least one pattern",
        );
        for (i, pattern) in self.paths.iter().enumerate() {
            if let Err(reason) = split_pattern(pattern) {
                issues.check(false, &format!("{key}.paths[{i}]"), reason);
            }
        }
    }
}

/// `/dir/name*.log` → (`/dir`, `name*.log`).
fn split_pattern(pattern: &str) -> Result<(PathBuf, String), String> {
    let path = Path::new(pattern);
    if !path.is_absolute() {
        return Err(format!("{pattern:?} must be an absolute path"));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{pattern:?} has no file name"))?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    if dir.to_string_lossy().contains(['*', '?', '[']) {
        return Err(format!(
            "{pattern:?}: wildcards are allowed in the file name only"
        ));
    }
    if name.contains('[') {
        return Err(format!("{pattern:?}: only * and ? are supported"));
    }
    Ok((dir.to_owned(), name.to_owned()))
}

/// Shell-style match of `*` (any run) and `?` (one character).
fn matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A file's checkpoint, stored as JSON in `checkpoints.value`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCheckpoint {
    pub path: PathBuf,
    pub offset: u64,
    /// Hex of the file's first bytes (up to [`PREFIX_BYTES`], never past `offset`).
    pub prefix: String,
}

type Identity = (u64, u64);

fn key_of((dev, ino): Identity) -> String {
    format!("{dev}:{ino}")
}

struct Candidate {
    path: PathBuf,
    identity: Identity,
    modified: std::time::SystemTime,
}

/// A regular file to read at `path`, or `None`. A symlink counts only with
/// `follow` and only when its resolved target lies inside `dir` (itself
/// resolved); the identity is then the target's.
fn candidate(path: PathBuf, dir: &Path, follow: bool) -> Option<Candidate> {
    let mut meta = std::fs::symlink_metadata(&path).ok()?;
    if meta.file_type().is_symlink() {
        if !follow {
            tracing::debug!(message = "symlink skipped (follow_symlinks = false)", path = %path.display());
            return None;
        }
        let target = std::fs::canonicalize(&path).ok()?;
        let root = std::fs::canonicalize(dir).ok()?;
        if !target.starts_with(&root) {
            tracing::warn!(
                message = "symlink to outside its directory skipped",
                path = %path.display(),
                target = %target.display()
            );
            return None;
        }
        meta = std::fs::metadata(&target).ok()?;
    }
    meta.is_file().then(|| Candidate {
        identity: (meta.dev(), meta.ino()),
        modified: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
        path,
    })
}

fn list_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect()
}

pub fn collect(
    source: &Source,
    cfg: &FileConfig,
    ctx: &RunContext,
    report: &mut RunReport,
) -> Result<(), SourceError> {
    let mut checkpoints: BTreeMap<String, FileCheckpoint> = BTreeMap::new();
    for (key, value) in ctx.buffer.checkpoints(&source.name)? {
        match serde_json::from_str(&value) {
            Ok(cp) => {
                checkpoints.insert(key, cp);
            }
            Err(e) => report.errors.push(format!(
                "checkpoint {key} is unreadable ({e}); reading that file again"
            )),
        }
    }
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    for pattern in &cfg.paths {
        let Ok((dir, name)) = split_pattern(pattern) else {
            continue;
        };
        match list_dir(&dir) {
            Ok(entries) => {
                for path in entries {
                    let matched = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| matches(&name, n));
                    if let Some(c) = matched
                        .then(|| candidate(path, &dir, cfg.follow_symlinks))
                        .flatten()
                        && seen.insert(c.identity)
                    {
                        files.push(c);
                    }
                }
            }
            Err(e) => report.errors.push(format!("list {}: {e}", dir.display())),
        }
    }
    // Files read before that no pattern matches any more: rotated away under
    // a new name, most often in the same directory.
    let mut forget = Vec::new();
    for (key, cp) in &checkpoints {
        if files.iter().any(|c| key_of(c.identity) == *key) {
            continue;
        }
        let found = cp.path.parent().and_then(|dir| {
            list_dir(dir)
                .ok()?
                .into_iter()
                .filter_map(|path| candidate(path, dir, cfg.follow_symlinks))
                .find(|c| key_of(c.identity) == *key)
        });
        match found {
            Some(c) if seen.insert(c.identity) => files.push(c),
            Some(_) => {}
            None => forget.push((key.clone(), None)),
        }
    }
    // Oldest first, so a rotated file's last lines come before the new file's.
    files.sort_by(|a, b| a.modified.cmp(&b.modified).then(a.path.cmp(&b.path)));
    let mut tail = Tail {
        source,
        cfg,
        ctx,
        report,
        pending: forget,
    };
    for file in files {
        if ctx.stopping() {
            break;
        }
        let key = key_of(file.identity);
        let cp = checkpoints.get(&key).cloned().unwrap_or_default();
        if let Err(e) = tail.read(&file.path, file.identity, cp) {
            match e {
                ReadError::Io(e) => tail
                    .report
                    .errors
                    .push(format!("read {}: {e}", file.path.display())),
                ReadError::Source(e) => return Err(e),
            }
        }
    }
    if !tail.pending.is_empty() {
        let pending = std::mem::take(&mut tail.pending);
        tail.commit(Vec::new(), Vec::new(), pending)?;
    }
    Ok(())
}

enum ReadError {
    Io(std::io::Error),
    Source(SourceError),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

impl From<SourceError> for ReadError {
    fn from(e: SourceError) -> Self {
        ReadError::Source(e)
    }
}

struct Tail<'a> {
    source: &'a Source,
    cfg: &'a FileConfig,
    ctx: &'a RunContext,
    report: &'a mut RunReport,
    /// Checkpoints to forget, sent with the next commit.
    pending: Vec<(String, Option<String>)>,
}

impl Tail<'_> {
    fn commit(
        &mut self,
        records: Vec<dcs_shared::record::Record>,
        rejected: Vec<Rejected>,
        mut checkpoints: Vec<(String, Option<String>)>,
    ) -> Result<(), SourceError> {
        checkpoints.append(&mut self.pending);
        let n_rejected = rejected.len() as u64;
        let appended = self.ctx.buffer.append_from_source(SourceBatch {
            source: self.source.name.clone(),
            stream: self.source.stream.clone(),
            records,
            rejected,
            checkpoints,
        })?;
        self.report.collected += appended.new.iter().filter(|n| **n).count() as u64;
        self.report.rejected += n_rejected;
        Ok(())
    }

    fn read(
        &mut self,
        path: &Path,
        identity: Identity,
        cp: FileCheckpoint,
    ) -> Result<(), ReadError> {
        let mut file = File::open(path)?;
        let meta = file.metadata()?;
        if (meta.dev(), meta.ino()) != identity {
            // The name was replaced since the directory was listed: the new
            // file is picked up, with its own checkpoint, by the next run.
            return Ok(());
        }
        let key = key_of(identity);
        let mut head = Vec::with_capacity(PREFIX_BYTES);
        (&mut file)
            .take(PREFIX_BYTES as u64)
            .read_to_end(&mut head)?;
        let stored = hex_decode(&cp.prefix);
        let mut offset = cp.offset;
        if meta.len() < offset || !head.starts_with(&stored) {
            tracing::info!(
                message = "file truncated or replaced; reading it from the start",
                source = %self.source.name,
                path = %path.display(),
                offset
            );
            offset = 0;
        }
        let checkpoint = |offset: u64| {
            let cp = FileCheckpoint {
                path: path.to_owned(),
                offset,
                prefix: hex_encode(&head[..head.len().min(offset as usize)]),
            };
            (
                key.clone(),
                Some(serde_json::to_string(&cp).expect("checkpoint is JSON")),
            )
        };
        file.seek(SeekFrom::Start(0))?;
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let mut line = Vec::new();
        let header = if self.cfg.format == Format::Csv {
            if reader.read_until(b'\n', &mut line)? == 0 || !line.ends_with(b"\n") {
                return Ok(()); // no complete header yet
            }
            let header = split_csv(&String::from_utf8_lossy(trim_eol(&line)));
            offset = offset.max(line.len() as u64);
            line.clear();
            header
        } else {
            Vec::new()
        };
        reader.seek(SeekFrom::Start(offset))?;
        let start = offset;
        let (mut records, mut rejected) = (Vec::new(), Vec::new());
        let mut chunk_bytes = 0u64;
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)? as u64;
            if n == 0 || !line.ends_with(b"\n") {
                break; // end of file, or a line still being written
            }
            let position = format!("{key}@{offset}");
            offset += n;
            chunk_bytes += n;
            let text = trim_eol(&line);
            if !text.iter().all(u8::is_ascii_whitespace) {
                match self.payload(text, &header) {
                    Ok(payload) => match self.ctx.prepare(&self.source.stream, &payload) {
                        Ok(record) => records.push(record),
                        Err(reason) => rejected.push(Rejected {
                            position,
                            raw: String::from_utf8_lossy(text).into_owned(),
                            reason,
                        }),
                    },
                    Err(reason) => rejected.push(Rejected {
                        position,
                        raw: String::from_utf8_lossy(text).into_owned(),
                        reason,
                    }),
                }
            }
            if records.len() + rejected.len() >= CHUNK_RECORDS || chunk_bytes >= CHUNK_BYTES {
                self.commit(
                    std::mem::take(&mut records),
                    std::mem::take(&mut rejected),
                    vec![checkpoint(offset)],
                )?;
                chunk_bytes = 0;
                if self.ctx.stopping() {
                    return Ok(());
                }
            }
        }
        if offset != cp.offset || offset != start || !records.is_empty() || !rejected.is_empty() {
            self.commit(records, rejected, vec![checkpoint(offset)])?;
        }
        Ok(())
    }

    /// The payload JSON for one line, or why it cannot be one.
    fn payload(&self, text: &[u8], header: &[String]) -> Result<String, String> {
        let text = std::str::from_utf8(text).map_err(|e| format!("not UTF-8: {e}"))?;
        match self.cfg.format {
            Format::Ndjson => Ok(text.to_owned()),
            Format::Lines => Ok(serde_json::json!({ "line": text }).to_string()),
            Format::Csv => {
                let fields = split_csv(text);
                if fields.len() != header.len() {
                    return Err(format!(
                        "{} fields, the header names {}",
                        fields.len(),
                        header.len()
                    ));
                }
                let object: serde_json::Map<String, serde_json::Value> = header
                    .iter()
                    .cloned()
                    .zip(fields.into_iter().map(serde_json::Value::String))
                    .collect();
                Ok(serde_json::Value::Object(object).to_string())
            }
        }
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// One CSV line (RFC 4180 quoting, without line breaks inside quotes).
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if field.is_empty() => quoted = true,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_a_shell() {
        assert!(matches("*.log", "app.log"));
        assert!(!matches("*.log", "app.log.1"));
        assert!(matches("app-?.csv", "app-1.csv"));
        assert!(matches("*", "anything"));
        assert!(!matches("a*b", "acbd"));
        assert!(split_pattern("relative/*.log").is_err());
        assert!(split_pattern("/var/*/x.log").is_err());
        assert_eq!(
            split_pattern("/var/log/*.log").unwrap(),
            (PathBuf::from("/var/log"), "*.log".to_owned())
        );
    }

    #[test]
    fn csv_fields_keep_quoted_commas_and_quotes() {
        assert_eq!(
            split_csv(r#"a,"b,c","say ""hi""",,"#),
            ["a", "b,c", "say \"hi\"", "", ""]
        );
    }

    #[test]
    fn symlinks_are_read_only_when_followed_and_only_inside_the_directory() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("logs");
        std::fs::create_dir(&dir).unwrap();
        let secret = root.path().join("agent-key.pem");
        std::fs::write(&secret, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        std::fs::write(dir.join("app.log"), "{}\n").unwrap();
        symlink(dir.join("app.log"), dir.join("inside.log")).unwrap();
        symlink(&secret, dir.join("key.log")).unwrap();
        symlink("../agent-key.pem", dir.join("relative.log")).unwrap();

        let found = |name: &str, follow: bool| candidate(dir.join(name), &dir, follow).is_some();
        assert!(found("app.log", false));
        assert!(!found("inside.log", false), "a link is skipped by default");
        assert!(found("inside.log", true));
        for outside in ["key.log", "relative.log"] {
            assert!(!found(outside, false), "{outside}");
            assert!(
                !found(outside, true),
                "{outside}: a link out of the directory"
            );
        }
    }

    #[test]
    fn prefixes_round_trip_through_hex() {
        assert_eq!(hex_decode(&hex_encode(b"\x00ab\xff")), b"\x00ab\xff");
    }
}
