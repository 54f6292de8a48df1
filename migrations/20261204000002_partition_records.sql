-- Records partitioned by day on received_at, so retention drops whole
-- partitions instead of deleting rows.
--
-- The primary key of a partitioned table must include the partition key, so
-- the delivery key becomes (agent_id, epoch, seq, received_at). That is still
-- exactly-once because received_at is the same on every redelivery of a
-- record: it is the time the *agent* accepted the record (the wire field
-- `received`), stored in the agent's buffer with the record, or for agents
-- too old to send it, the record's own ts. Never the aggregator's clock.
--
-- Daily partitions are named records_pYYYYMMDD and cover one UTC day.
-- records_default catches clocks outside the partitions that exist (an agent
-- whose clock is years off); retention never drops it.
--
-- The aggregator runs as dcs_app, which does not own the table and so cannot
-- create or drop partitions itself: the two functions below do that as the
-- owner (SECURITY DEFINER) and are all dcs_app may call.
--
-- Existing rows are copied into the new table: on a large table, run this
-- migration in a maintenance window.

ALTER TABLE records RENAME TO records_unpartitioned;
ALTER TABLE records_unpartitioned RENAME CONSTRAINT records_pkey TO records_unpartitioned_pkey;

CREATE TABLE records (
    agent_id     bigint NOT NULL,
    epoch        uuid NOT NULL,
    seq          bigint NOT NULL,
    tenant_id    text NOT NULL,
    record_id    text NOT NULL,
    stream       text NOT NULL,
    ts           timestamptz NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    payload      jsonb NOT NULL,
    content_hash bigint,
    PRIMARY KEY (agent_id, epoch, seq, received_at)
) PARTITION BY RANGE (received_at);

CREATE TABLE records_default PARTITION OF records DEFAULT;

-- Creates the daily partitions from first_day to last_day (UTC) that do not
-- exist yet and returns their names. A day whose rows already sit in the
-- default partition cannot get its partition (PostgreSQL refuses); that is
-- reported as a warning and the rows stay where they are.
CREATE FUNCTION dcs_ensure_record_partitions(first_day date, last_day date)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    day date := first_day;
    name text;
BEGIN
    IF last_day - first_day > 3660 THEN
        RAISE EXCEPTION 'refusing to create % partitions at once', last_day - first_day + 1;
    END IF;
    WHILE day <= last_day LOOP
        name := 'records_p' || to_char(day, 'YYYYMMDD');
        IF to_regclass(name) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF records FOR VALUES FROM (%L) TO (%L)',
                    name, day::text || ' 00:00:00+00', (day + 1)::text || ' 00:00:00+00');
                RETURN NEXT name;
            EXCEPTION WHEN OTHERS THEN
                -- Another aggregator created it first, or the default
                -- partition holds rows of that day.
                RAISE WARNING 'partition % not created: %', name, SQLERRM;
            END;
        END IF;
        day := day + 1;
    END LOOP;
END
$$;

-- Drops (or, with dry_run, only lists) every daily partition that ends on or
-- before the start of the UTC day `retention_days` days ago: with 30, today's
-- and the 30 previous days' partitions are kept.
CREATE FUNCTION dcs_drop_record_partitions(retention_days int, dry_run boolean)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    cutoff date;
    name text;
BEGIN
    IF retention_days IS NULL OR retention_days < 1 THEN
        RAISE EXCEPTION 'retention_days must be at least 1';
    END IF;
    cutoff := (now() AT TIME ZONE 'UTC')::date - retention_days;
    FOR name IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'records'::regclass AND c.relname ~ '^records_p[0-9]{8}$'
        ORDER BY c.relname
    LOOP
        IF to_date(substr(name, 10), 'YYYYMMDD') + 1 <= cutoff THEN
            IF NOT dry_run THEN
                EXECUTE format('DROP TABLE IF EXISTS %I', name);
            END IF;
            RETURN NEXT name;
        END IF;
    END LOOP;
END
$$;

-- Partitions for the days the existing rows cover (at most the last year;
-- older rows go to the default partition) and the next few days.
DO $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    oldest date;
BEGIN
    SELECT min(received_at AT TIME ZONE 'UTC')::date INTO oldest FROM records_unpartitioned;
    PERFORM dcs_ensure_record_partitions(
        greatest(least(coalesce(oldest, today), today - 1), today - 366), today + 3);
END
$$;

INSERT INTO records
    (agent_id, epoch, seq, tenant_id, record_id, stream, ts, received_at, payload, content_hash)
SELECT agent_id, epoch, seq, tenant_id, record_id, stream, ts, received_at, payload, content_hash
FROM records_unpartitioned;
DROP TABLE records_unpartitioned;

CREATE INDEX records_tenant_stream_ts ON records (tenant_id, stream, ts);
CREATE INDEX records_tenant_ts_key ON records (tenant_id, ts, agent_id, epoch, seq);

GRANT SELECT, INSERT ON records TO dcs_app;
REVOKE EXECUTE ON FUNCTION dcs_ensure_record_partitions(date, date) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dcs_drop_record_partitions(int, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dcs_ensure_record_partitions(date, date) TO dcs_app;
GRANT EXECUTE ON FUNCTION dcs_drop_record_partitions(int, boolean) TO dcs_app;
