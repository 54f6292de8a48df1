//! Copying every record that can still be read out of a damaged buffer
//! into a recovered buffer, `recovered/<epoch>.db`, that the agent drains.
//!
//! Invariants: a salvaged record keeps its delivery key (epoch and seq), so
//! a record delivered just before the damage is a duplicate at the
//! aggregator, not a second copy; salvage only ever reads a copy; one bad
//! page costs only the rows on it; the report never counts fewer records
//! held than were found.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, params};
use uuid::Uuid;

use super::{Report, expected_buffered, remove_buffer_files, wal_of};
use crate::buffer::{self, BufferError};
use crate::seal::Keyring;

/// Rows read per query while salvaging.
const SALVAGE_CHUNK: i64 = 500;

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
pub(super) fn salvage_file(
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

/// A truncated file is shorter than the page count in its header, and SQLite
/// then refuses every query ("malformed"), even on the pages that are all
/// there. Cutting the copy to whole pages and writing the real count into
/// the header makes those pages readable again.
pub(super) fn repair_page_count(path: &Path) -> std::io::Result<()> {
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
