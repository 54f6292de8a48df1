-- Platform API: tenants an operator manages, API tokens with roles, agent
-- revocation, and an append-only audit trail.
--
-- The aggregator should connect as the role `dcs_app` (or a login role that is
-- a member of it), not as the owner of the schema: `dcs_app` may only INSERT
-- and SELECT the audit table, so the trail cannot be rewritten through the
-- application. The owner (a separate role) runs the migrations:
--
--   ALTER ROLE dcs_app WITH LOGIN PASSWORD '...';   -- once, by a DBA
--   dcs-aggregator migrate     (database.url = the owner)
--   dcs-aggregator serve       (database.url = dcs_app, migrate_on_start = false)

-- Roles are cluster-wide and several databases may be migrated at once (tests
-- do): a concurrent CREATE ROLE loses with unique_violation, not
-- duplicate_object.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dcs_app') THEN
        CREATE ROLE dcs_app NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

-- A human-readable name, and when the tenant was disabled (`disabled` itself
-- stays the flag the write path reads).
ALTER TABLE tenants
    ADD COLUMN display_name text,
    ADD COLUMN disabled_at timestamptz;

-- Tokens are shown once at creation; only their SHA-256 is stored, so a copy
-- of the database does not hand out API access.
CREATE TABLE api_tokens (
    id          bigserial PRIMARY KEY,
    token_hash  bytea NOT NULL UNIQUE,
    name        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('admin', 'reader')),
    -- NULL: every tenant (a platform operator). Otherwise the only tenant the
    -- token can see or change.
    tenant_id   text REFERENCES tenants,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL,
    expires_at  timestamptz,
    revoked_at  timestamptz
);

-- Revocation: an operator refuses an agent (by tenant and name) or a single
-- certificate (by serial) without waiting for the certificate to expire. The
-- certificate columns are what the agent last connected with.
ALTER TABLE agents
    ADD COLUMN revoked boolean NOT NULL DEFAULT false,
    ADD COLUMN revoked_at timestamptz,
    ADD COLUMN cert_fingerprint text,
    ADD COLUMN cert_serial text,
    ADD COLUMN cert_not_after timestamptz;

CREATE TABLE revoked_serials (
    -- Lower-case hex, no separators, as the agents list shows it.
    serial      text PRIMARY KEY,
    revoked_at  timestamptz NOT NULL DEFAULT now(),
    revoked_by  text NOT NULL,
    reason      text
);

-- Append-only: the application role gets INSERT and SELECT, never UPDATE or
-- DELETE (below), so a compromised aggregator cannot erase what it did.
CREATE TABLE audit (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    -- `token:<id>:<name>`, `cli:<os user>`, or `anonymous` for a failed login.
    actor       text NOT NULL,
    action      text NOT NULL,
    tenant_id   text,
    target      text,
    -- `ok`, `denied`, `failed`.
    outcome     text NOT NULL,
    remote      text,
    details     jsonb
);
CREATE INDEX audit_action_at ON audit (action, at);
CREATE INDEX audit_tenant_at ON audit (tenant_id, at);

-- Keyset pagination of a tenant's records in time order.
CREATE INDEX records_tenant_ts_key ON records (tenant_id, ts, agent_id, epoch, seq);

GRANT USAGE ON SCHEMA public TO dcs_app;
-- Least privilege: records are only ever inserted (retention drops whole
-- partitions as the owner), and unrevoking a serial deletes its row.
GRANT SELECT, INSERT ON records TO dcs_app;
GRANT SELECT, INSERT, UPDATE ON tenants, agents, api_tokens TO dcs_app;
GRANT SELECT, INSERT, DELETE ON revoked_serials TO dcs_app;
GRANT SELECT, INSERT ON audit TO dcs_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO dcs_app;
-- Belt and braces: nobody but the owner rewrites history.
REVOKE UPDATE, DELETE, TRUNCATE ON audit FROM PUBLIC;
