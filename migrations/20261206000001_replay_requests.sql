-- Replays an operator asked for (`dcs-aggregator replay --since T`), typically
-- after restoring PostgreSQL to a point in time T: every batch answer carries
-- the latest one, and agents that retain delivered records
-- (`buffer.retain_delivered`) send those acknowledged since T again. The
-- redelivery is idempotent, so what survived the restore is a duplicate.

CREATE TABLE replay_requests (
    -- Microseconds since the Unix epoch when it was requested, not a
    -- sequence: a restore winds sequences back, and an agent acts on each id
    -- once, so ids must keep increasing across restores.
    id           bigint PRIMARY KEY,
    since        timestamptz NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    requested_by text NOT NULL,
    reason       text NOT NULL DEFAULT ''
);

-- Read by every replica, written by the operator command (which may run
-- with the application's role).
GRANT SELECT, INSERT ON replay_requests TO dcs_app;
