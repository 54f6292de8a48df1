-- Every certificate the aggregator signs, with the certificate it renewed.
--
-- A renewal is requested with a valid certificate, so a certificate renewed
-- before its serial was revoked would otherwise outlive the revocation. The
-- deny list revokes every descendant of a revoked serial: this table is how
-- it finds them (a recursive walk over parent_serial).

CREATE TABLE issued_certificates (
    -- Lower-case hex without leading zeros, as revoked_serials stores it.
    serial        text PRIMARY KEY,
    tenant_id     text NOT NULL,
    agent_name    text NOT NULL,
    -- The serial of the certificate that requested this one; NULL for a
    -- certificate issued at enrollment.
    parent_serial text,
    issued_at     timestamptz NOT NULL DEFAULT now(),
    not_after     timestamptz NOT NULL
);
CREATE INDEX issued_certificates_parent ON issued_certificates (parent_serial);

-- Written with each signature, read by the deny list; never changed.
GRANT SELECT, INSERT ON issued_certificates TO dcs_app;
