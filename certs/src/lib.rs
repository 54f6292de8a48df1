//! Certificate tooling for DCS.
//!
//! Edge agents and the aggregator authenticate each other with mutual TLS
//! under one private CA. This crate creates that CA, the aggregator's server
//! certificate and one client certificate per agent. An agent's identity is
//! carried in a URI SAN `dcs://TENANT/AGENT`, which the aggregator reads from
//! the verified chain, so the tenant and agent ids here must obey exactly the
//! rule the aggregator enforces (see [`validate_identifier`]).
//!
//! Everything is generated in memory before any file is touched, and every
//! file is written under a temporary name and renamed into place, so a failed
//! or interrupted run never leaves a half-written certificate or key behind.
//!
//! `ca` creates and loads the CA, `leaf` issues the server and agent
//! certificates (and signs agents' CSRs) under the naming rules, `files`
//! writes certificates and keys (staged, synced, renamed) and
//! `identity_files` writes and recovers an agent's identity files as one.

pub mod enroll;

mod ca;
mod files;
mod identity_files;
mod leaf;
#[cfg(test)]
mod tests;

pub use ca::Ca;
pub use files::{write_agent_bundle, write_pair};
pub use identity_files::{IdentityRecovery, recover_identity_files, write_identity_files};
pub use leaf::{validate_dns_name, validate_identifier};

use std::fmt;
use std::io;
use std::path::PathBuf;

use rcgen::CertificateParams;
use time::{Duration, OffsetDateTime, UtcOffset};

/// File name of the CA certificate, both in the CA directory and in an agent's
/// bundle (where the agent uses it to verify the aggregator).
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in the CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// Longest tenant or agent id. The ids end up in database keys and in the URI
/// SAN, so the aggregator caps them; issuing a longer one would produce a
/// certificate the aggregator rejects.
pub use dcs_shared::identity::MAX_IDENTIFIER_LEN;

/// Common name of a server certificate issued without any DNS name. Only the
/// SANs matter to TLS clients; the CN is for humans reading the certificate.
pub const DEFAULT_SERVER_CN: &str = "dcs-aggregator";

/// Clock skew tolerated by [`Validity::days_from_now`]: edge devices often
/// have slightly wrong clocks, and a certificate that is "not yet valid" for a
/// few minutes after issuance is a confusing failure.
const CLOCK_SKEW: Duration = Duration::minutes(5);

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tenant or agent id breaks the identifier rule. `kind` says which one
    /// ("tenant", "agent") so the caller can point at the right argument.
    #[error("invalid {kind} id {value:?}: {reason}")]
    InvalidIdentifier {
        kind: &'static str,
        value: String,
        reason: String,
    },

    /// A DNS name for the server certificate is malformed; TLS clients would
    /// never match it, so issuing it would only defer the failure.
    #[error("invalid DNS name {value:?}: {reason}")]
    InvalidDnsName { value: String, reason: String },

    /// A server certificate without any name cannot be verified by anyone.
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoServerNames,

    /// The CA common name is unusable.
    #[error("invalid CA common name {value:?}: {reason}")]
    InvalidCommonName { value: String, reason: &'static str },

    /// The validity range is empty or reversed.
    #[error(
        "invalid validity: not_after ({not_after}) must be later than not_before ({not_before})"
    )]
    InvalidValidity {
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    },

    /// A file name given to [`write_pair`] would escape the target directory
    /// or collide with the temporary files used while writing.
    #[error("invalid output file name {name:?}: {reason}")]
    InvalidFileName { name: String, reason: &'static str },

    /// Neither CA file exists in the directory.
    #[error("CA not found at {}: run `dcs-certs init --out {}` first", dir.display(), dir.display())]
    CaNotFound { dir: PathBuf },

    /// Only one of the two CA files exists. Kept apart from `CaNotFound`
    /// because `init` would refuse this directory without `--force`.
    #[error(
        "CA at {} is incomplete: {missing} is missing (restore it, or replace the CA with `dcs-certs init --out {} --force`)",
        dir.display(),
        dir.display()
    )]
    CaIncomplete { dir: PathBuf, missing: &'static str },

    /// Writing a CA would replace an existing one, which silently invalidates
    /// every certificate it has issued.
    #[error(
        "a CA already exists at {} ({existing} present); refusing to overwrite it (use --force to replace it and invalidate every certificate it issued)",
        dir.display()
    )]
    CaExists {
        dir: PathBuf,
        existing: &'static str,
    },

    /// The CA files exist but cannot be used to issue certificates.
    #[error("invalid CA file {}: {reason}", path.display())]
    InvalidCa { path: PathBuf, reason: String },

    /// A file system operation failed.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A certificate signing request that cannot be signed: not PEM, not a
    /// CSR, a signature that does not verify, or an unsupported extension.
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(String),

    /// A certificate that cannot be read (an agent's own, before renewal).
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),

    /// rcgen refused to build a certificate or key.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// PEM text of a certificate and its private key.
///
/// `Debug` leaves the key out so that logging a `Pem` never leaks it.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pem")
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The period during which a certificate is valid.
///
/// Any range is accepted, including one entirely in the past, because tests
/// need expired certificates. Only an empty or reversed range is rejected, at
/// issuance time (the fields are public, so it cannot be enforced earlier).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// Valid from five minutes ago (clock skew) until `days` days from now.
    ///
    /// Saturates at the largest representable date instead of panicking, so
    /// an absurd `days` yields a long-lived certificate rather than a crash.
    pub fn days_from_now(days: u32) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - CLOCK_SKEW,
            not_after: now.saturating_add(Duration::days(i64::from(days))),
        }
    }

    /// A validity range checked up front, for callers that prefer to fail
    /// when they build the range rather than when they issue with it.
    pub fn new(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Result<Validity, Error> {
        let validity = Validity {
            not_before,
            not_after,
        };
        validity.check()?;
        Ok(validity)
    }

    fn check(&self) -> Result<(), Error> {
        if self.not_after <= self.not_before {
            return Err(Error::InvalidValidity {
                not_before: self.not_before,
                not_after: self.not_after,
            });
        }
        Ok(())
    }

    fn apply(&self, params: &mut CertificateParams) -> Result<(), Error> {
        self.check()?;
        // rcgen picks UTCTime vs GeneralizedTime from the year as given, so
        // normalise the offset first or a date near a year boundary could be
        // encoded in the wrong form.
        params.not_before = self.not_before.to_offset(UtcOffset::UTC);
        params.not_after = self.not_after.to_offset(UtcOffset::UTC);
        Ok(())
    }
}
