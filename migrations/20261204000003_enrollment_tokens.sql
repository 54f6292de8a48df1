-- One-time enrollment tokens: an admin lets one agent of one tenant get its
-- first certificate by sending a CSR (its private key never leaves its
-- machine). Like API tokens, a token is shown once and only its SHA-256 is
-- stored, so a copy of the database does not hand out certificates.
--
-- A token is spent by `UPDATE ... SET used_at = now() WHERE used_at IS NULL`
-- in the transaction that signs the certificate: of two concurrent uses,
-- exactly one updates the row, the other sees it used.

CREATE TABLE enrollment_tokens (
    id          bigserial PRIMARY KEY,
    token_hash  bytea NOT NULL UNIQUE,
    tenant_id   text NOT NULL REFERENCES tenants,
    -- The agent id the certificate will carry (`dcs://tenant/agent`).
    agent_name  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL,
    expires_at  timestamptz NOT NULL,
    -- Set once, by the enrollment that used the token.
    used_at     timestamptz,
    used_from   text,
    -- Serial (lower-case hex) of the certificate the token was spent on.
    cert_serial text,
    disabled_at timestamptz
);
CREATE INDEX enrollment_tokens_tenant ON enrollment_tokens (tenant_id, id);

-- dcs_app creates, spends and disables tokens; nobody deletes them, so the
-- audit trail's `enrollment-token:<id>` keeps its meaning.
GRANT SELECT, INSERT, UPDATE ON enrollment_tokens TO dcs_app;
GRANT USAGE ON SEQUENCE enrollment_tokens_id_seq TO dcs_app;
