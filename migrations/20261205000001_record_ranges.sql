-- One key, one record: the ledger of claimed sequence ranges.
--
-- Since `records` is partitioned on received_at, its primary key includes
-- received_at, so the key alone no longer stops a reused (agent, epoch, seq)
-- with a new received_at from being stored as a second row. The ledger below
-- is the key's guard, independent of how `records` is laid out:
--
-- - Every committed batch claims the seq range it stored, [first_seq,
--   last_seq], for its (agent, epoch). Claims never overlap (the exclusion
--   constraint), so a batch whose range is new to the ledger cannot meet a
--   stored record and is COPYed straight in (the normal case: one insert of
--   one row per batch, not per record).
-- - A batch that overlaps a claim (a redelivery, or a reused seq after a
--   rollback) fails its claim with exclusion_violation (23P01) and is written
--   through the slow path, which compares each record with the stored one:
--   same content and received_at is a duplicate, anything else a conflict
--   (409 content_conflict, nothing written).
-- - The exclusion check also waits for a concurrent, uncommitted claim that
--   overlaps, so two transactions can never both store one key.
--
-- The table is not partitioned, so dropping record partitions stays a plain
-- DROP TABLE; claims are compacted (adjacent ranges merged) by
-- dcs_compact_record_ranges, which the retention task calls, so the ledger
-- holds a few rows per (agent, epoch) rather than one per batch.
--
-- The ledger also gives each (agent, epoch) its high-water mark, the highest
-- stored seq, which the aggregator returns with every batch answer: an agent
-- whose buffer is behind it (a VM snapshot revert, a restored backup, a lost
-- WAL) knows that it is about to reuse seqs and moves to a new epoch.
--
-- btree_gist provides `=` on bigint and uuid inside a GiST index; it is a
-- trusted extension, so the database owner can create it without superuser.
-- Existing records are claimed by one range per (agent, epoch): on a large
-- table that scan takes a while, so run this migration in a maintenance window.

CREATE EXTENSION IF NOT EXISTS btree_gist;

CREATE TABLE record_ranges (
    agent_id   bigint NOT NULL,
    epoch      uuid NOT NULL,
    first_seq  bigint NOT NULL,
    last_seq   bigint NOT NULL,
    stored_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (first_seq >= 1 AND last_seq >= first_seq),
    CONSTRAINT record_ranges_disjoint EXCLUDE USING gist (
        agent_id WITH =,
        epoch WITH =,
        int8range(first_seq, last_seq, '[]') WITH &&
    )
);

-- The high-water mark: max(last_seq) of one (agent, epoch), one index probe.
CREATE INDEX record_ranges_high ON record_ranges (agent_id, epoch, last_seq);

INSERT INTO record_ranges (agent_id, epoch, first_seq, last_seq)
SELECT agent_id, epoch, min(seq), max(seq)
FROM records
GROUP BY agent_id, epoch;

-- Merges the adjacent claims of every (agent, epoch) that are older than
-- `settled` into as few rows as cover the same seqs, and returns how many rows
-- it removed. Gaps (seqs an agent dead-lettered and never stored) stay gaps.
-- One caller at a time (an advisory lock; other replicas skip the run), and
-- never a row younger than `settled`, so claims in flight are not touched.
CREATE FUNCTION dcs_compact_record_ranges(settled interval)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    cutoff timestamptz := now() - settled;
    removed bigint := 0;
    deleted bigint;
    k record;
    merged int8range[];
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('dcs_compact_record_ranges')) THEN
        RETURN 0;
    END IF;
    FOR k IN
        SELECT agent_id, epoch FROM record_ranges
        WHERE stored_at < cutoff
        GROUP BY agent_id, epoch HAVING count(*) > 1
    LOOP
        SELECT array_agg(r) INTO merged FROM (
            SELECT unnest(range_agg(int8range(first_seq, last_seq, '[]'))) AS r
            FROM record_ranges
            WHERE agent_id = k.agent_id AND epoch = k.epoch AND stored_at < cutoff
        ) AS m;
        DELETE FROM record_ranges
        WHERE agent_id = k.agent_id AND epoch = k.epoch AND stored_at < cutoff;
        GET DIAGNOSTICS deleted = ROW_COUNT;
        INSERT INTO record_ranges (agent_id, epoch, first_seq, last_seq, stored_at)
        SELECT k.agent_id, k.epoch, lower(r), upper(r) - 1, cutoff FROM unnest(merged) AS r;
        removed := removed + deleted - coalesce(array_length(merged, 1), 0);
    END LOOP;
    RETURN removed;
END
$$;

GRANT SELECT, INSERT ON record_ranges TO dcs_app;
REVOKE EXECUTE ON FUNCTION dcs_compact_record_ranges(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dcs_compact_record_ranges(interval) TO dcs_app;
