-- DCS aggregator schema, version 1.
--
-- Records are keyed by their delivery key (agent, epoch, seq): an agent may send
-- a batch any number of times and `INSERT ... ON CONFLICT DO NOTHING` on this key
-- is what makes the write exactly-once. Tenant and agent rows are created on
-- first contact from the client certificate; nobody registers agents by hand.

CREATE TABLE tenants (
    id          text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Reserved for refusing a tenant's traffic without revoking every certificate.
    disabled    boolean NOT NULL DEFAULT false
);

CREATE TABLE agents (
    id                       bigserial PRIMARY KEY,
    tenant_id                text NOT NULL REFERENCES tenants,
    name                     text NOT NULL,
    first_seen               timestamptz NOT NULL DEFAULT now(),
    last_seen                timestamptz NOT NULL DEFAULT now(),
    last_batch_at            timestamptz,
    -- The buffer file the agent last sent from: a new epoch means the agent lost
    -- or replaced its buffer.
    last_epoch               uuid,
    -- The agent's own report of its backlog with its latest batch, so an operator
    -- sees a site falling behind even when only a trickle gets through.
    backlog_records          int8,
    backlog_bytes            int8,
    backlog_oldest_age_secs  int8,
    dropped_total            int8,
    UNIQUE (tenant_id, name)
);

-- No foreign key from records to agents (or tenants): PostgreSQL would check it
-- row by row on the hot path, one index probe per record, for rows whose agent
-- was upserted a moment earlier in the same transaction. The aggregator is the
-- only writer, so the reference holds by construction.
--
-- Partitioning: once the table grows large, it becomes
-- `PARTITION BY RANGE (ts)` with one partition per day, created ahead by a
-- maintenance job and dropped for retention. The primary key must then include
-- the partition key, i.e. (agent_id, epoch, seq, ts); since ts is part of the
-- record that is still exactly-once for a redelivered record (same ts), so the
-- change is a data migration, not a change to the write path.
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
    PRIMARY KEY (agent_id, epoch, seq)
);

-- The common query: one tenant's stream over a time range.
CREATE INDEX records_tenant_stream_ts ON records (tenant_id, stream, ts);
