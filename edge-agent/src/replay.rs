//! Delivered records kept for a while, and their replay after the central
//! database was restored to an earlier point in time.
//!
//! # Design constraints
//! - **Off unless asked for.** With `buffer.retain_delivered = "0s"` (the
//!   default) an acknowledged record is deleted, as before; nothing here
//!   runs. With a duration, an acknowledged record moves to the `delivered`
//!   table in the transaction that acknowledges it, and stays there for that
//!   long.
//! - **Never at the expense of undelivered records.** Retained records share
//!   `buffer.capacity` with the queue but always yield to it: after each
//!   commit the writer trims the oldest retained records until queue and
//!   retained together fit. Retained records are not counted in the queue's
//!   `records`/`bytes`, and never refuse a producer.
//! - **Replay once per request, resumable.** Every batch answer carries the
//!   latest replay request (`BatchAck::replay`: an id and a time). For an id
//!   above `meta.replay_done`, the forwarder sends again every retained
//!   record delivered since that time (less [`CLOCK_MARGIN`]), in seq order,
//!   from a separate cursor: the queue keeps flowing meanwhile. Progress is
//!   stored in `meta.replay_pending` after every batch, so a restart resumes
//!   where it stopped. Replayed records keep their key (epoch, seq) and
//!   content, so those the database still holds are answered as duplicates.
//! - **Retained records are never acknowledged twice.** A replayed batch's
//!   answer moves nothing: the records stay retained until they age out.
//!
//! # On-disk schema
//! - `delivered(seq PK, id, stream, ts_us, received_us, size, payload,
//!   key_id, delivered_us)`: the columns of `records` plus when the
//!   aggregator acknowledged it (this agent's clock).
//! - `meta.replay_done`: the last replay id completed; `meta.replay_pending`:
//!   `ID SINCE_US AFTER_SEQ` of the replay under way.

use std::time::Duration;

use rusqlite::{OptionalExtension, params};

/// The agent's and the database's clocks may disagree: records delivered up
/// to this long before the requested time are sent again too (a duplicate
/// costs a lookup; a gap would lose records).
pub const CLOCK_MARGIN: Duration = Duration::from_secs(300);

pub(crate) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS delivered (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL, stream TEXT NOT NULL,
    ts_us INTEGER NOT NULL, received_us INTEGER NOT NULL, size INTEGER NOT NULL,
    payload TEXT NOT NULL, key_id INTEGER, delivered_us INTEGER NOT NULL);";

/// Copies the acknowledged records `first..=last` into `delivered`; the
/// caller deletes them from `records` in the same transaction. Returns the
/// number of records and their bytes.
pub(crate) fn retain(
    tx: &rusqlite::Transaction<'_>,
    first: i64,
    last: i64,
    now_us: i64,
) -> rusqlite::Result<(u64, u64)> {
    let mut stmt = tx.prepare_cached(
        "INSERT OR REPLACE INTO delivered
             (seq, id, stream, ts_us, received_us, size, payload, key_id, delivered_us)
         SELECT seq, id, stream, ts_us, received_us, size, payload, key_id, ?3
         FROM records WHERE seq BETWEEN ?1 AND ?2
         RETURNING size",
    )?;
    let sizes: Vec<i64> = stmt
        .query_map(params![first, last, now_us], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok((sizes.len() as u64, sizes.iter().sum::<i64>().max(0) as u64))
}

/// Deletes retained records delivered before `older_than_us`, then the
/// oldest ones until at most `keep_bytes` remain of `retained_bytes`.
/// Oldest means lowest seq, which is delivery order up to the batches in
/// flight at once. Returns the records and bytes removed.
pub(crate) fn prune(
    tx: &rusqlite::Transaction<'_>,
    older_than_us: i64,
    retained_bytes: u64,
    keep_bytes: u64,
) -> rusqlite::Result<(u64, u64)> {
    let (mut records, mut bytes) = (0u64, 0u64);
    let mut last_seq = i64::MIN;
    'pages: loop {
        let page: Vec<(i64, i64, i64)> = tx
            .prepare_cached(
                "SELECT seq, delivered_us, size FROM delivered WHERE seq > ?1 ORDER BY seq LIMIT 1000",
            )?
            .query_map([last_seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        if page.is_empty() {
            break;
        }
        let mut cut = None;
        for (seq, delivered_us, size) in &page {
            let over = retained_bytes.saturating_sub(bytes) > keep_bytes;
            if *delivered_us >= older_than_us && !over {
                break;
            }
            cut = Some(*seq);
            records += 1;
            bytes += (*size).max(0) as u64;
        }
        let Some(cut) = cut else { break };
        tx.execute(
            "DELETE FROM delivered WHERE seq > ?1 AND seq <= ?2",
            params![last_seq, cut],
        )?;
        if cut != page[page.len() - 1].0 {
            break 'pages;
        }
        last_seq = cut;
    }
    Ok((records, bytes))
}

/// Retained records and their bytes, at open.
pub(crate) fn totals(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<(u64, u64)> {
    tx.query_row(
        "SELECT count(*), coalesce(sum(size), 0) FROM delivered",
        [],
        |r| {
            Ok((
                r.get::<_, i64>(0)?.max(0) as u64,
                r.get::<_, i64>(1)?.max(0) as u64,
            ))
        },
    )
}

/// A replay under way: which request, from when, and how far it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub id: i64,
    pub since_us: i64,
    /// The last seq sent again; the next batch starts after it.
    pub after_seq: i64,
}

/// The replay state stored in `meta`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State {
    /// The last replay id completed (0: none).
    pub done: i64,
    pub pending: Option<Pending>,
}

impl State {
    pub(crate) fn load(conn: &rusqlite::Connection) -> rusqlite::Result<State> {
        let get = |key: &str| -> rusqlite::Result<Option<String>> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        };
        let done = get("replay_done")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let pending = get("replay_pending")?.and_then(|v| {
            let mut parts = v.split(' ').map(|p| p.parse::<i64>().ok());
            Some(Pending {
                id: parts.next()??,
                since_us: parts.next()??,
                after_seq: parts.next()??,
            })
        });
        Ok(State { done, pending })
    }

    pub(crate) fn store(&self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('replay_done', ?1)",
            [self.done.to_string()],
        )?;
        match self.pending {
            Some(p) => tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('replay_pending', ?1)",
                [format!("{} {} {}", p.id, p.since_us, p.after_seq)],
            )?,
            None => tx.execute("DELETE FROM meta WHERE key = 'replay_pending'", [])?,
        };
        Ok(())
    }

    /// What a replay request seen in an answer starts, if anything: a new
    /// id starts over (a later restore supersedes an earlier one).
    pub fn begin(&self, id: i64, since_us: i64) -> Option<Pending> {
        let current = self.pending.map_or(self.done, |p| p.id.max(self.done));
        (id > current).then(|| Pending {
            id,
            since_us: since_us.saturating_sub(CLOCK_MARGIN.as_micros() as i64),
            after_seq: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_starts_once_and_a_newer_one_supersedes_it() {
        let mut state = State::default();
        let started = state.begin(5, 1_000_000_000).expect("a new id starts");
        assert_eq!(
            started.since_us,
            1_000_000_000 - 300_000_000,
            "clock margin"
        );
        state.pending = Some(started);
        assert_eq!(state.begin(5, 1_000_000_000), None, "the same id again");
        assert!(state.begin(6, 2_000_000_000).is_some(), "a newer id");
        state = State {
            done: 6,
            pending: None,
        };
        assert_eq!(state.begin(6, 2_000_000_000), None, "already done");
        assert_eq!(state.begin(4, 2_000_000_000), None, "an older id");
    }
}
