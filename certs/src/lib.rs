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

pub mod enroll;

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    string::Ia5String,
};
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

const CERT_MODE: u32 = 0o644;
const KEY_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;

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

/// A certificate authority able to issue DCS server and agent certificates.
///
/// Holds the PEM text alongside the parsed signing state so that [`Ca::write`]
/// reproduces exactly what was loaded or generated.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Generates a new self-signed CA with a fresh ECDSA P-256 key.
    pub fn generate(common_name: &str, validity: Validity) -> Result<Ca, Error> {
        if common_name.trim().is_empty() {
            return Err(Error::InvalidCommonName {
                value: common_name.to_owned(),
                reason: "must not be empty",
            });
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        validity.apply(&mut params)?;
        params.distinguished_name = common_name_only(common_name);
        // Path length 0: this CA only ever signs leaves, so a leaked leaf key
        // (or a leaf mistakenly marked as CA elsewhere) cannot extend the chain.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        // Build the issuer from the certificate we just produced, exactly as
        // `load` does, so a fresh CA and a reloaded one sign identically.
        let issuer = Issuer::from_ca_cert_der(cert.der(), key)?;
        Ok(Ca {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    /// Reads `DIR/ca.pem` and `DIR/ca-key.pem`.
    ///
    /// Checks that the certificate is a CA and that the key belongs to it:
    /// otherwise every certificate issued afterwards would fail verification
    /// at handshake time, far from the actual mistake.
    pub fn load(dir: &Path) -> Result<Ca, Error> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (false, false) => {
                return Err(Error::CaNotFound {
                    dir: dir.to_owned(),
                });
            }
            (true, false) => {
                return Err(Error::CaIncomplete {
                    dir: dir.to_owned(),
                    missing: CA_KEY_FILE,
                });
            }
            (false, true) => {
                return Err(Error::CaIncomplete {
                    dir: dir.to_owned(),
                    missing: CA_CERT_FILE,
                });
            }
            (true, true) => {}
        }
        Ca::load_files(&cert_path, &key_path)
    }

    /// Reads a CA certificate and its key from two files of any name (the
    /// aggregator's `[enrollment]` section names them), with the checks of
    /// [`Ca::load`]. Only the first certificate of `cert_path` is used.
    pub fn load_files(cert_path: &Path, key_path: &Path) -> Result<Ca, Error> {
        let cert_pem = read_to_string(cert_path)?;
        let key_pem = read_to_string(key_path)?;
        let invalid_cert = |reason: String| Error::InvalidCa {
            path: cert_path.to_owned(),
            reason,
        };

        let key = KeyPair::from_pem(&key_pem).map_err(|e| Error::InvalidCa {
            path: key_path.to_owned(),
            reason: format!("not a usable private key: {e}"),
        })?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| invalid_cert(format!("not a PEM certificate: {e}")))?;
        let x509 = pem
            .parse_x509()
            .map_err(|e| invalid_cert(format!("not an X.509 certificate: {e}")))?;
        if !x509.is_ca() {
            return Err(invalid_cert(
                "certificate is not a CA (basicConstraints CA flag is not set)".to_owned(),
            ));
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::InvalidCa {
                path: key_path.to_owned(),
                reason: format!("private key does not belong to {}", cert_path.display()),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&pem.contents.clone().into(), key)
            .map_err(|e| invalid_cert(e.to_string()))?;
        Ok(Ca {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    /// PEM text of the CA certificate: the trust anchor both sides configure.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// PEM text of the CA private key.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Writes `DIR/ca.pem` (0644) and `DIR/ca-key.pem` (0600), creating `DIR`
    /// (0700) if needed.
    ///
    /// Refuses with [`Error::CaExists`] if either file is already there:
    /// replacing a CA key invalidates every certificate it issued, so it must
    /// be explicit ([`Ca::write_replacing`]).
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        for existing in [CA_CERT_FILE, CA_KEY_FILE] {
            // symlink_metadata so that a dangling symlink also counts as
            // "something is there".
            if fs::symlink_metadata(dir.join(existing)).is_ok() {
                return Err(Error::CaExists {
                    dir: dir.to_owned(),
                    existing,
                });
            }
        }
        self.write_replacing(dir)
    }

    /// Like [`Ca::write`] but replaces an existing CA (`init --force`).
    pub fn write_replacing(&self, dir: &Path) -> Result<(), Error> {
        write_files(
            dir,
            &[
                OutFile::cert(CA_CERT_FILE, &self.cert_pem),
                OutFile::key(CA_KEY_FILE, &self.key_pem),
            ],
        )
    }

    /// Issues the aggregator's server certificate (EKU serverAuth).
    ///
    /// DNS names and IP addresses are kept apart, because a TLS client
    /// connecting to an IP only matches an IP SAN, never a DNS SAN spelling
    /// the same address. The CN is the first DNS name, or
    /// [`DEFAULT_SERVER_CN`] if there is none.
    pub fn issue_server(
        &self,
        dns: &[String],
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<Pem, Error> {
        if dns.is_empty() && ips.is_empty() {
            return Err(Error::NoServerNames);
        }
        let mut sans = Vec::with_capacity(dns.len() + ips.len());
        for name in dns {
            validate_dns_name(name)?;
            sans.push(SanType::DnsName(ia5(name)?));
        }
        sans.extend(ips.iter().copied().map(SanType::IpAddress));
        let cn = dns.first().map_or(DEFAULT_SERVER_CN, String::as_str);
        self.issue_leaf(cn, sans, ExtendedKeyUsagePurpose::ServerAuth, validity)
    }

    /// Issues an agent's client certificate (EKU clientAuth) with the URI SAN
    /// `dcs://TENANT/AGENT` and CN = AGENT.
    ///
    /// The aggregator derives the agent's identity from that URI alone, so
    /// both ids are validated here with the aggregator's rule.
    pub fn issue_agent(&self, tenant: &str, agent: &str, validity: Validity) -> Result<Pem, Error> {
        validate_identifier("tenant", tenant)?;
        validate_identifier("agent", agent)?;
        let uri = ia5(&agent_uri(tenant, agent))?;
        self.issue_leaf(
            agent,
            vec![SanType::URI(uri)],
            ExtendedKeyUsagePurpose::ClientAuth,
            validity,
        )
    }

    /// Signs an agent's certificate signing request (enrollment, renewal):
    /// the agent made its key pair itself and only its public key travels.
    ///
    /// Only the CSR's public key (and its self-signature, checked by rcgen)
    /// is used. Its subject, SANs, key usages and basic constraints are
    /// ignored, never copied: the identity is `dcs://TENANT/AGENT` from the
    /// caller (an enrollment token, or the client certificate that asks for a
    /// renewal), and the certificate is always a clientAuth leaf, so a CSR
    /// cannot smuggle in another identity, a CA flag or extra names.
    /// Returns the certificate's PEM.
    pub fn sign_agent_csr(
        &self,
        csr_pem: &str,
        tenant: &str,
        agent: &str,
        validity: Validity,
    ) -> Result<String, Error> {
        self.sign_parsed_csr(
            CertificateSigningRequestParams::from_pem(csr_pem),
            tenant,
            agent,
            validity,
        )
    }

    fn sign_parsed_csr(
        &self,
        parsed: Result<CertificateSigningRequestParams, rcgen::Error>,
        tenant: &str,
        agent: &str,
        validity: Validity,
    ) -> Result<String, Error> {
        validate_identifier("tenant", tenant)?;
        validate_identifier("agent", agent)?;
        let csr = parsed.map_err(|e| {
            Error::InvalidCsr(match e {
                rcgen::Error::InvalidCertificationRequestSignature => {
                    "its signature does not verify with its own public key".to_owned()
                }
                rcgen::Error::UnsupportedExtension => {
                    "it requests an extension this CA does not handle".to_owned()
                }
                other => other.to_string(),
            })
        })?;
        let uri = ia5(&agent_uri(tenant, agent))?;
        let params = leaf_params(
            agent,
            vec![SanType::URI(uri)],
            ExtendedKeyUsagePurpose::ClientAuth,
            validity,
        )?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.pem())
    }

    fn issue_leaf(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        eku: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<Pem, Error> {
        let params = leaf_params(common_name, sans, eku, validity)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// Checks a tenant or agent id by the rule of
/// [`dcs_shared::identity::validate_identifier`] (the one copy of it).
/// `kind` names the id ("tenant", "agent") in the error.
pub fn validate_identifier(kind: &'static str, value: &str) -> Result<(), Error> {
    match dcs_shared::identity::identifier_problem(value) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidIdentifier {
            kind,
            value: value.to_owned(),
            reason,
        }),
    }
}

/// The URI SAN of an agent certificate, as the aggregator reads it back.
fn agent_uri(tenant: &str, agent: &str) -> String {
    dcs_shared::identity::AgentIdentity {
        tenant: tenant.to_owned(),
        agent: agent.to_owned(),
    }
    .uri()
}

/// Checks a DNS name for a server certificate: ASCII labels of letters,
/// digits, `-` and `_`, 1 to 63 characters each, at most 253 in total, with
/// an optional leading `*.` wildcard label.
///
/// An IP address is refused with a hint, because as a DNS SAN it would never
/// match a connection to that address.
pub fn validate_dns_name(value: &str) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidDnsName {
        value: value.to_owned(),
        reason,
    };
    if value.parse::<IpAddr>().is_ok() {
        return Err(invalid(
            "is an IP address; pass it as an IP address (--ip) instead".to_owned(),
        ));
    }
    if value.is_empty() {
        return Err(invalid("must not be empty".to_owned()));
    }
    if value.len() > 253 {
        return Err(invalid("is longer than 253 characters".to_owned()));
    }
    let rest = value.strip_prefix("*.").unwrap_or(value);
    for label in rest.split('.') {
        if label.is_empty() {
            return Err(invalid("contains an empty label".to_owned()));
        }
        if label.len() > 63 {
            return Err(invalid(format!(
                "label {label:?} is longer than 63 characters"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid(format!("label {label:?} starts or ends with '-'")));
        }
        // Underscores are not valid in hostnames but are common in container
        // service names, and rustls accepts them.
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(invalid(format!(
                "character {bad:?} is not allowed (allowed: letters, digits, '-', '_', and '.' between labels)"
            )));
        }
    }
    Ok(())
}

/// Writes `DIR/NAME.pem` (0644) and `DIR/NAME-key.pem` (0600), creating `DIR`
/// (0700) if needed. Existing files are replaced: leaf certificates are cheap
/// to reissue, unlike a CA.
pub fn write_pair(dir: &Path, name: &str, pem: &Pem) -> Result<(), Error> {
    validate_file_stem(name)?;
    let cert_name = format!("{name}.pem");
    let key_name = format!("{name}-key.pem");
    write_files(
        dir,
        &[
            OutFile::cert(&cert_name, &pem.cert),
            OutFile::key(&key_name, &pem.key),
        ],
    )
}

/// Writes everything an agent needs into `DIR`: `agent.pem`, `agent-key.pem`
/// and a copy of the CA certificate as `ca.pem` (to verify the aggregator).
///
/// One call rather than [`write_pair`] plus a copy, so that all three files
/// are staged before any of them replaces an older version.
pub fn write_agent_bundle(dir: &Path, agent: &Pem, ca_cert_pem: &str) -> Result<(), Error> {
    write_files(
        dir,
        &[
            OutFile::cert("agent.pem", &agent.cert),
            OutFile::key("agent-key.pem", &agent.key),
            OutFile::cert(CA_CERT_FILE, ca_cert_pem),
        ],
    )
}

/// Writes an agent's identity to the paths its configuration names, which
/// may lie in different directories: `cert` and `ca` 0644, `key` 0600.
/// Missing directories are created (0700). `ca` is optional: a renewal keeps
/// the trust anchor the agent already has.
///
/// The files change together or not at all, even across a power cut:
/// 1. each file is staged beside its target as `.NAME.next` in the order
///    ca, key, cert, each fsynced and its directory fsynced before the next
///    one starts, so a staged certificate means everything before it is
///    staged and durable;
/// 2. the staged files are renamed into place in the same order, the
///    certificate last, and the directories fsynced.
///
/// A crash between two renames leaves the new key beside the old
/// certificate; [`recover_identity_files`], which the agent runs before it
/// loads its identity, completes the move from the staged files.
pub fn write_identity_files(
    cert: (&Path, &str),
    key: (&Path, &str),
    ca: Option<(&Path, &str)>,
) -> Result<(), Error> {
    let mut targets: Vec<((&Path, &str), u32)> = Vec::with_capacity(3);
    targets.extend(ca.map(|ca| (ca, CERT_MODE)));
    targets.push((key, KEY_MODE));
    targets.push((cert, CERT_MODE));
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::with_capacity(targets.len());
    for ((path, contents), mode) in targets {
        let (dir, name) = split_target(path)?;
        let next = dir.join(next_name(&name));
        let result = create_dir_synced(&dir)
            .and_then(|()| {
                stage_as(
                    &next,
                    &OutFile {
                        name: &name,
                        contents,
                        mode,
                    },
                )
            })
            .and_then(|()| sync_dir(&dir));
        if let Err(e) = result {
            // Nothing is renamed yet: the previous identity is whole.
            for (next, _) in &staged {
                let _ = fs::remove_file(next);
            }
            let _ = fs::remove_file(&next);
            return Err(e);
        }
        staged.push((next, path.to_owned()));
    }
    let last = staged.len() - 1;
    for (i, (next, target)) in staged.iter().enumerate() {
        if i == last {
            failpoint("identity-between-renames");
        }
        // On a failure here the staged files stay: the next start's
        // recovery finishes what was begun (some renames may be done).
        fs::rename(next, target).map_err(|source| Error::Io {
            action: "move into place",
            path: target.clone(),
            source,
        })?;
    }
    sync_dirs_of(staged.iter().map(|(_, target)| target.as_path()))
}

/// What [`recover_identity_files`] found beside the identity files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityRecovery {
    /// No staged files: the last write finished, or there was none.
    Clean,
    /// A write was cut after its files were staged: it is now complete, and
    /// the new identity is in place.
    RolledForward,
    /// A write was cut while it staged its files: they were removed, and
    /// the previous identity is in place.
    DiscardedPartial,
}

/// Finishes or undoes a [`write_identity_files`] that a crash or power cut
/// interrupted, so the certificate, its key and the CA on disk belong
/// together again. A staged certificate that matches the staged (or, if that
/// was already renamed, the installed) key means staging had completed: the
/// remaining renames are done. Anything else staged is an incomplete write
/// and is removed, leaving the previous identity.
pub fn recover_identity_files(
    cert: &Path,
    key: &Path,
    ca: Option<&Path>,
) -> Result<IdentityRecovery, Error> {
    let next_of = |path: &Path| -> Result<PathBuf, Error> {
        let (dir, name) = split_target(path)?;
        Ok(dir.join(next_name(&name)))
    };
    let mut pairs = Vec::with_capacity(3);
    if let Some(ca) = ca {
        pairs.push((next_of(ca)?, ca.to_owned()));
    }
    pairs.push((next_of(key)?, key.to_owned()));
    pairs.push((next_of(cert)?, cert.to_owned()));
    let present = |p: &Path| fs::symlink_metadata(p).is_ok();
    if !pairs.iter().any(|(next, _)| present(next)) {
        return Ok(IdentityRecovery::Clean);
    }
    let (cert_next, key_next) = (&pairs[pairs.len() - 1].0, &pairs[pairs.len() - 2].0);
    let key_now = if present(key_next) { key_next } else { key };
    let complete = match (fs::read_to_string(cert_next), fs::read_to_string(key_now)) {
        (Ok(c), Ok(k)) => enroll::check_pair(&c, &k).is_ok(),
        _ => false,
    };
    let outcome = if complete {
        for (next, target) in &pairs {
            if present(next) {
                fs::rename(next, target).map_err(|source| Error::Io {
                    action: "move into place",
                    path: target.clone(),
                    source,
                })?;
            }
        }
        IdentityRecovery::RolledForward
    } else {
        for (next, _) in &pairs {
            match fs::remove_file(next) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Io {
                        action: "remove",
                        path: next.clone(),
                        source,
                    });
                }
            }
        }
        IdentityRecovery::DiscardedPartial
    };
    sync_dirs_of(pairs.iter().map(|(_, target)| target.as_path()))?;
    Ok(outcome)
}

/// The staging name of an identity file: hidden, and never a valid target
/// name itself ([`validate_file_stem`] refuses a leading '.').
fn next_name(name: &str) -> String {
    format!(".{name}.next")
}

/// Pauses the calling thread for good when the environment variable
/// `DCS_TEST_FAILPOINT` names this point, after saying so on stderr. The
/// power-cut tests use it to cut the power at an exact moment; nothing sets
/// it in production.
fn failpoint(name: &str) {
    if std::env::var_os("DCS_TEST_FAILPOINT").is_some_and(|v| v == name) {
        eprintln!("failpoint {name}: reached, pausing");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Io {
            action: "sync directory",
            path: dir.to_owned(),
            source,
        })
}

/// Fsyncs the directory of each path once.
fn sync_dirs_of<'a>(paths: impl Iterator<Item = &'a Path>) -> Result<(), Error> {
    let mut synced: Vec<&Path> = Vec::new();
    for path in paths {
        // A bare file name ("agent.pem") has the empty path as its parent,
        // which cannot be opened: it means the current directory.
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !synced.contains(&dir) {
            sync_dir(dir)?;
            synced.push(dir);
        }
    }
    Ok(())
}

/// The directory and file name of a target path, refusing a path without a
/// usable file name (a directory, `..`, a non-UTF-8 name).
fn split_target(path: &Path) -> Result<(PathBuf, String), Error> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::InvalidFileName {
            name: path.display().to_string(),
            reason: "must end in a UTF-8 file name",
        })?;
    validate_file_stem(name)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name.to_owned()))
}

fn validate_file_stem(name: &str) -> Result<(), Error> {
    let invalid = |reason| Error::InvalidFileName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if name.contains(['/', '\0']) {
        return Err(invalid("must not contain '/' or NUL"));
    }
    if name.starts_with('.') {
        // Also keeps it clear of our own ".NAME.tmp-*" staging files.
        return Err(invalid("must not start with '.'"));
    }
    Ok(())
}

/// The parameters of every leaf this CA issues, whoever made its key.
fn leaf_params(
    common_name: &str,
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
    validity: Validity,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    validity.apply(&mut params)?;
    params.distinguished_name = common_name_only(common_name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    // ECDSA keys only sign during the handshake; keyEncipherment is an
    // RSA key-transport usage and would be wrong here.
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    // Lets verifiers pick the right CA key if the CA is ever rotated.
    params.use_authority_key_identifier_extension = true;
    // Random rather than rcgen's default (a hash of the public key): a key
    // certified twice (an agent re-enrolling with the same CSR) must still
    // get two serials, or revoking one serial would revoke both.
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// 16 random bytes with the top bit clear (a positive INTEGER, RFC 5280
/// allows at most 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the operating system's random number generator works");
    bytes[0] &= 0x7f;
    // A leading zero byte would be stripped by DER and shorten the serial;
    // keep it at full length so serials compare as fixed-width hex.
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn common_name_only(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn ia5(value: &str) -> Result<Ia5String, Error> {
    Ok(Ia5String::try_from(value)?)
}

fn read_to_string(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

struct OutFile<'a> {
    name: &'a str,
    contents: &'a str,
    mode: u32,
}

impl<'a> OutFile<'a> {
    fn cert(name: &'a str, contents: &'a str) -> Self {
        OutFile {
            name,
            contents,
            mode: CERT_MODE,
        }
    }

    fn key(name: &'a str, contents: &'a str) -> Self {
        OutFile {
            name,
            contents,
            mode: KEY_MODE,
        }
    }
}

/// Stages every file under a temporary name in `dir`, then renames them all
/// into place. Staging everything first means a failure (disk full, bad
/// permissions) leaves the previous files untouched and no stray temporary
/// files; the renames themselves are atomic per file.
fn write_files(dir: &Path, files: &[OutFile<'_>]) -> Result<(), Error> {
    create_dir_synced(dir)?;

    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::with_capacity(files.len());
    let cleanup = |staged: &[(PathBuf, PathBuf)]| {
        for (tmp, _) in staged {
            let _ = fs::remove_file(tmp);
        }
    };
    for file in files {
        match stage(dir, file) {
            Ok(tmp) => staged.push((tmp, dir.join(file.name))),
            Err(e) => {
                cleanup(&staged);
                return Err(e);
            }
        }
    }
    move_into_place(&staged)
}

/// Creates `dir` and its missing parents (0700), then fsyncs the parent of
/// each directory it created: a new directory's entry would otherwise be
/// lost in a power cut together with the files renamed into it.
fn create_dir_synced(dir: &Path) -> Result<(), Error> {
    let mut missing: Vec<&Path> = Vec::new();
    let mut at = Some(dir);
    while let Some(p) = at {
        if p.as_os_str().is_empty() || p.exists() {
            break;
        }
        missing.push(p);
        at = p.parent();
    }
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| Error::Io {
            action: "create directory",
            path: dir.to_owned(),
            source,
        })?;
    for created in missing.iter().rev() {
        let parent = match created.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|source| Error::Io {
                action: "sync directory",
                path: parent.to_owned(),
                source,
            })?;
    }
    Ok(())
}

/// Renames staged files (temporary name, target) onto their targets, then
/// syncs each target's directory: without that a crash could lose the
/// renames even though the contents were synced. A failed rename removes
/// the files not yet moved.
fn move_into_place(staged: &[(PathBuf, PathBuf)]) -> Result<(), Error> {
    for (i, (tmp, target)) in staged.iter().enumerate() {
        if let Err(source) = fs::rename(tmp, target) {
            for (tmp, _) in &staged[i..] {
                let _ = fs::remove_file(tmp);
            }
            return Err(Error::Io {
                action: "move into place",
                path: target.clone(),
                source,
            });
        }
    }
    sync_dirs_of(staged.iter().map(|(_, target)| target.as_path()))
}

/// Writes one file under a fresh temporary name and returns that name.
fn stage(dir: &Path, file: &OutFile<'_>) -> Result<PathBuf, Error> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut tmp_name = OsString::from(".");
    tmp_name.push(file.name);
    tmp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);
    stage_as(&tmp, file)?;
    Ok(tmp)
}

/// Writes one file at `tmp`, replacing what an interrupted earlier write
/// left there, with its final mode, and fsyncs it.
fn stage_as(tmp: &Path, file: &OutFile<'_>) -> Result<(), Error> {
    let io_err = |action| {
        let path = tmp.to_owned();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    };
    // remove_file removes a symlink planted at the name, never its target.
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove")(e)),
    }
    // The mode applies at creation, so a private key is never readable by
    // others, not even for an instant. create_new refuses to follow a
    // symlink planted at the temporary name.
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(file.mode)
        .open(tmp)
        .map_err(io_err("create"))?;
    let result = (|| {
        // The umask may have stripped bits (a 0644 certificate created under
        // umask 077); set the exact mode on the still-empty file. This can
        // only widen a certificate, never a key beyond 0600.
        out.set_permissions(Permissions::from_mode(file.mode))
            .map_err(io_err("set permissions on"))?;
        out.write_all(file.contents.as_bytes())
            .map_err(io_err("write"))?;
        out.sync_all().map_err(io_err("sync"))
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn parse(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
        pem.contents
    }

    fn ca() -> Ca {
        Ca::generate("Test CA", Validity::days_from_now(30)).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn identifiers_follow_the_aggregator_rule() {
        let max = "a".repeat(64);
        for ok in ["t1", "a", "0", "edge-01.site_a", "9abc", max.as_str()] {
            validate_identifier("agent", ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        let too_long = "a".repeat(65);
        for bad in [
            "",
            too_long.as_str(),
            "Upper",
            "-lead",
            ".lead",
            "_lead",
            "a/b",
            "a b",
            "a:b",
            "é",
            "aé",
        ] {
            assert!(
                validate_identifier("agent", bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn identifier_error_names_the_kind_the_value_and_the_reason() {
        let err = validate_identifier("tenant", "Bad").unwrap_err();
        let Error::InvalidIdentifier {
            kind,
            value,
            reason,
        } = &err
        else {
            panic!("unexpected error {err:?}");
        };
        assert_eq!(*kind, "tenant");
        assert_eq!(value, "Bad");
        assert!(reason.contains("lowercase"), "{reason}");
        assert!(err.to_string().contains("tenant"), "{err}");
    }

    #[test]
    fn dns_names_that_no_client_could_match_are_rejected() {
        for ok in [
            "localhost",
            "aggregator",
            "dcs_aggregator",
            "a.example.com",
            "*.example.com",
        ] {
            validate_dns_name(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in [
            "", "10.0.0.1", "::1", "a..b", "-a.com", "a b", "a/b", "é.com", "a.*.com",
        ] {
            assert!(
                validate_dns_name(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn empty_or_reversed_validity_is_rejected() {
        let now = OffsetDateTime::now_utc();
        assert!(Validity::new(now, now).is_err());
        assert!(Validity::new(now, now - Duration::hours(1)).is_err());
        let reversed = Validity {
            not_before: now,
            not_after: now - Duration::days(1),
        };
        assert!(matches!(
            Ca::generate("x", reversed),
            Err(Error::InvalidValidity { .. })
        ));
        assert!(matches!(
            ca().issue_agent("t1", "a1", reversed),
            Err(Error::InvalidValidity { .. })
        ));
    }

    #[test]
    fn days_from_now_tolerates_clock_skew_and_never_panics() {
        let v = Validity::days_from_now(1);
        let now = OffsetDateTime::now_utc();
        assert!(v.not_before <= now - Duration::minutes(4));
        assert!(v.not_after > now + Duration::hours(23));
        let huge = Validity::days_from_now(u32::MAX);
        assert!(huge.not_after > huge.not_before);
    }

    #[test]
    fn expired_validity_produces_a_certificate_that_has_already_expired() {
        let now = OffsetDateTime::now_utc();
        let past = Validity::new(now - Duration::days(10), now - Duration::days(1)).unwrap();
        let pem = ca().issue_agent("t1", "a1", past).unwrap();
        let der = parse(&pem.cert);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(cert.validity().not_after.to_datetime() < now);
        assert!(!cert.validity().is_valid());
    }

    #[test]
    fn leaves_chain_to_the_ca_that_issued_them() {
        let ca = ca();
        let ca_der = parse(ca.cert_pem());
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        assert!(ca_cert.is_ca());
        ca_cert.verify_signature(None).expect("CA is self-signed");

        let server = ca
            .issue_server(&["localhost".into()], &[], Validity::days_from_now(1))
            .unwrap();
        let der = parse(&server.cert);
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        leaf.verify_signature(Some(ca_cert.public_key()))
            .expect("signed by the CA");
        assert_eq!(leaf.issuer(), ca_cert.subject());
        assert!(!leaf.is_ca());
    }

    #[test]
    fn a_reloaded_ca_issues_certificates_that_verify_against_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let original = ca();
        original.write(dir.path()).unwrap();
        let loaded = Ca::load(dir.path()).unwrap();
        assert_eq!(loaded.cert_pem(), original.cert_pem());
        assert_eq!(loaded.key_pem(), original.key_pem());

        let agent = loaded
            .issue_agent("t1", "a1", Validity::days_from_now(1))
            .unwrap();
        let ca_der = parse(original.cert_pem());
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        let der = parse(&agent.cert);
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
        let sans = &leaf.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(sans.general_names, vec![GeneralName::URI("dcs://t1/a1")]);
    }

    #[test]
    fn loading_refuses_a_key_that_does_not_belong_to_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        ca().write(dir.path()).unwrap();
        let other = ca();
        fs::write(dir.path().join(CA_KEY_FILE), other.key_pem()).unwrap();
        let err = Ca::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn loading_refuses_a_leaf_certificate_posing_as_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let leaf = ca()
            .issue_agent("t1", "a1", Validity::days_from_now(1))
            .unwrap();
        fs::write(dir.path().join(CA_CERT_FILE), &leaf.cert).unwrap();
        fs::write(dir.path().join(CA_KEY_FILE), &leaf.key).unwrap();
        let err = Ca::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn loading_a_missing_or_half_present_ca_says_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Ca::load(dir.path()),
            Err(Error::CaNotFound { .. })
        ));
        assert!(matches!(
            Ca::load(&dir.path().join("nope")),
            Err(Error::CaNotFound { .. })
        ));
        fs::write(dir.path().join(CA_CERT_FILE), ca().cert_pem()).unwrap();
        assert!(matches!(
            Ca::load(dir.path()),
            Err(Error::CaIncomplete {
                missing: CA_KEY_FILE,
                ..
            })
        ));
    }

    #[test]
    fn writing_a_ca_never_replaces_an_existing_one_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let first = ca();
        first.write(dir.path()).unwrap();
        let second = ca();
        assert!(matches!(
            second.write(dir.path()),
            Err(Error::CaExists { .. })
        ));
        assert_eq!(Ca::load(dir.path()).unwrap().cert_pem(), first.cert_pem());
        second.write_replacing(dir.path()).unwrap();
        assert_eq!(Ca::load(dir.path()).unwrap().cert_pem(), second.cert_pem());
    }

    #[test]
    fn written_keys_are_private_and_certificates_public() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("nested/out");
        let ca = ca();
        ca.write(&out).unwrap();
        assert_eq!(mode(&out.join(CA_CERT_FILE)), 0o644);
        assert_eq!(mode(&out.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&out), 0o700);

        let pem = ca
            .issue_server(
                &[],
                &["127.0.0.1".parse().unwrap()],
                Validity::days_from_now(1),
            )
            .unwrap();
        write_pair(&out, "server", &pem).unwrap();
        assert_eq!(mode(&out.join("server.pem")), 0o644);
        assert_eq!(mode(&out.join("server-key.pem")), 0o600);
        assert_eq!(
            fs::read_to_string(out.join("server-key.pem")).unwrap(),
            pem.key
        );
    }

    #[test]
    fn leaf_files_may_be_replaced_and_no_temporary_files_remain() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca();
        let first = ca
            .issue_agent("t1", "a1", Validity::days_from_now(1))
            .unwrap();
        let second = ca
            .issue_agent("t1", "a1", Validity::days_from_now(1))
            .unwrap();
        write_agent_bundle(dir.path(), &first, ca.cert_pem()).unwrap();
        write_agent_bundle(dir.path(), &second, ca.cert_pem()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("agent.pem")).unwrap(),
            second.cert
        );
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["agent-key.pem", "agent.pem", "ca.pem"]);
    }

    #[test]
    fn write_pair_refuses_names_that_escape_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let pem = Pem {
            cert: "c".into(),
            key: "k".into(),
        };
        for bad in ["", "../x", "a/b", ".hidden"] {
            assert!(matches!(
                write_pair(dir.path(), bad, &pem),
                Err(Error::InvalidFileName { .. })
            ));
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn debug_output_never_contains_private_keys() {
        let ca = ca();
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
        let pem = ca
            .issue_agent("t1", "a1", Validity::days_from_now(1))
            .unwrap();
        assert!(!format!("{pem:?}").contains("PRIVATE KEY"));
    }

    /// A CSR for a fresh key whose every field asks for more than an agent
    /// may have: another identity, a CA flag, server auth, extra names.
    fn greedy_csr() -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![
            "aggregator.example.net".to_owned(),
            "10.0.0.1".to_owned(),
        ])
        .unwrap();
        params.distinguished_name = common_name_only("root");
        params
            .subject_alt_names
            .push(SanType::URI(ia5("dcs://other-tenant/admin").unwrap()));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    #[test]
    fn a_signed_csr_carries_only_the_identity_the_ca_was_given() {
        let ca = ca();
        let (key, csr) = greedy_csr();
        let pem = ca
            .sign_agent_csr(&csr, "t1", "a1", Validity::days_from_now(1))
            .unwrap();
        let der = parse(&pem);
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();

        let sans = &leaf.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(sans.general_names, vec![GeneralName::URI("dcs://t1/a1")]);
        assert!(!leaf.is_ca(), "a CSR must not make itself a CA");
        let bc = leaf.basic_constraints().unwrap().map(|e| e.value.ca);
        assert_ne!(bc, Some(true));
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth && !eku.any);
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let cn: Vec<_> = leaf
            .subject()
            .iter_common_name()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(cn, ["a1"]);
        // The agent's own key, signed by our CA.
        assert_eq!(
            leaf.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        let ca_der = parse(ca.cert_pem());
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn a_csr_is_signed_with_the_requested_validity_and_a_fresh_serial_each_time() {
        let ca = ca();
        let (_, csr) = greedy_csr();
        let now = OffsetDateTime::now_utc();
        let validity = Validity::new(now, now + Duration::seconds(45)).unwrap();
        let first = ca.sign_agent_csr(&csr, "t1", "a1", validity).unwrap();
        let second = ca.sign_agent_csr(&csr, "t1", "a1", validity).unwrap();
        let (d1, d2) = (parse(&first), parse(&second));
        let (_, c1) = X509Certificate::from_der(&d1).unwrap();
        let (_, c2) = X509Certificate::from_der(&d2).unwrap();
        let lifetime =
            c1.validity().not_after.to_datetime() - c1.validity().not_before.to_datetime();
        assert!(lifetime <= Duration::seconds(46), "{lifetime}");
        assert_ne!(
            c1.raw_serial(),
            c2.raw_serial(),
            "the same key, certified twice"
        );
        assert_eq!(c1.raw_serial().len(), 16);
    }

    #[test]
    fn a_csr_whose_signature_does_not_match_its_key_is_refused() {
        // Someone else's public key in a CSR signed by another key: signing
        // it would certify a key whose holder never asked for it.
        let (key, csr) = greedy_csr();
        let other = KeyPair::generate().unwrap();
        let mut der = parse_csr(&csr);
        let at = der
            .windows(key.public_key_raw().len())
            .position(|w| w == key.public_key_raw())
            .expect("public key in the CSR");
        der[at..at + other.public_key_raw().len()].copy_from_slice(other.public_key_raw());
        let parsed = CertificateSigningRequestParams::from_der(&der.into());
        let err = ca()
            .sign_parsed_csr(parsed, "t1", "a1", Validity::days_from_now(1))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidCsr(_)), "{err}");
        assert!(err.to_string().contains("signature"), "{err}");
    }

    #[test]
    fn garbage_and_bad_identities_are_refused_before_signing() {
        let ca = ca();
        for bad in ["", "not a csr", ca.cert_pem()] {
            assert!(matches!(
                ca.sign_agent_csr(bad, "t1", "a1", Validity::days_from_now(1)),
                Err(Error::InvalidCsr(_))
            ));
        }
        let (_, csr) = greedy_csr();
        assert!(matches!(
            ca.sign_agent_csr(&csr, "T1", "a1", Validity::days_from_now(1)),
            Err(Error::InvalidIdentifier { kind: "tenant", .. })
        ));
    }

    #[test]
    fn identity_files_land_at_their_paths_with_safe_modes() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("certs/agent.pem");
        let key = dir.path().join("private/agent-key.pem");
        let ca_path = dir.path().join("ca.pem");
        write_identity_files((&cert, "C1"), (&key, "K1"), Some((&ca_path, "CA"))).unwrap();
        write_identity_files((&cert, "C2"), (&key, "K2"), None).unwrap();
        assert_eq!(fs::read_to_string(&cert).unwrap(), "C2");
        assert_eq!(fs::read_to_string(&key).unwrap(), "K2");
        assert_eq!(mode(&cert), 0o644);
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&ca_path), 0o644);
        for sub in ["certs", "private"] {
            let names: Vec<_> = fs::read_dir(dir.path().join(sub))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(
                names.len(),
                1,
                "no temporary files left in {sub}: {names:?}"
            );
        }
    }

    /// The identity files of one agent in `dir`, and a second identity (a
    /// renewal) staged beside them the way [`write_identity_files`] stages.
    struct CutRenewal {
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
        old: Pem,
        new: Pem,
    }

    impl CutRenewal {
        fn new(dir: &Path) -> CutRenewal {
            let ca = ca();
            let old = ca
                .issue_agent("t1", "a1", Validity::days_from_now(1))
                .unwrap();
            let new = ca
                .issue_agent("t1", "a1", Validity::days_from_now(2))
                .unwrap();
            let r = CutRenewal {
                cert: dir.join("agent.pem"),
                key: dir.join("agent-key.pem"),
                ca: dir.join("ca.pem"),
                old,
                new,
            };
            write_identity_files(
                (&r.cert, &r.old.cert),
                (&r.key, &r.old.key),
                Some((&r.ca, ca.cert_pem())),
            )
            .unwrap();
            r
        }

        fn next(path: &Path) -> PathBuf {
            path.with_file_name(next_name(path.file_name().unwrap().to_str().unwrap()))
        }

        fn recover(&self) -> IdentityRecovery {
            recover_identity_files(&self.cert, &self.key, Some(&self.ca)).unwrap()
        }

        fn installed(&self) -> (String, String) {
            (
                fs::read_to_string(&self.cert).unwrap(),
                fs::read_to_string(&self.key).unwrap(),
            )
        }

        fn leftovers(&self) -> Vec<PathBuf> {
            [&self.cert, &self.key, &self.ca]
                .iter()
                .map(|p| CutRenewal::next(p))
                .filter(|p| p.exists())
                .collect()
        }
    }

    #[test]
    fn a_cut_while_staging_leaves_the_previous_identity() {
        // Cut after the key was staged, before the certificate was.
        let dir = tempfile::tempdir().unwrap();
        let r = CutRenewal::new(dir.path());
        fs::write(CutRenewal::next(&r.key), &r.new.key).unwrap();
        assert_eq!(r.recover(), IdentityRecovery::DiscardedPartial);
        assert_eq!(r.installed(), (r.old.cert.clone(), r.old.key.clone()));
        assert!(r.leftovers().is_empty());

        // Cut while the certificate was written: half of it on disk.
        fs::write(CutRenewal::next(&r.key), &r.new.key).unwrap();
        fs::write(
            CutRenewal::next(&r.cert),
            &r.new.cert[..r.new.cert.len() / 2],
        )
        .unwrap();
        assert_eq!(r.recover(), IdentityRecovery::DiscardedPartial);
        assert_eq!(r.installed(), (r.old.cert.clone(), r.old.key.clone()));
        assert!(r.leftovers().is_empty());
    }

    #[test]
    fn a_cut_after_staging_completes_the_new_identity() {
        // Everything staged, nothing renamed yet.
        let dir = tempfile::tempdir().unwrap();
        let r = CutRenewal::new(dir.path());
        fs::write(CutRenewal::next(&r.key), &r.new.key).unwrap();
        fs::write(CutRenewal::next(&r.cert), &r.new.cert).unwrap();
        assert_eq!(r.recover(), IdentityRecovery::RolledForward);
        assert_eq!(r.installed(), (r.new.cert.clone(), r.new.key.clone()));
        assert!(r.leftovers().is_empty());
    }

    #[test]
    fn a_cut_between_the_renames_completes_the_new_identity() {
        // The worst moment: the new key is in place beside the old
        // certificate, which no TLS handshake can use.
        let dir = tempfile::tempdir().unwrap();
        let r = CutRenewal::new(dir.path());
        fs::write(&r.key, &r.new.key).unwrap();
        fs::write(CutRenewal::next(&r.cert), &r.new.cert).unwrap();
        assert!(enroll::check_pair(&r.old.cert, &r.new.key).is_err());
        assert_eq!(r.recover(), IdentityRecovery::RolledForward);
        assert_eq!(r.installed(), (r.new.cert.clone(), r.new.key.clone()));
        assert_eq!(mode(&r.key), 0o600);
        assert!(r.leftovers().is_empty());
        assert_eq!(r.recover(), IdentityRecovery::Clean, "idempotent");
    }

    #[test]
    fn identity_writes_leave_no_staged_files_behind() {
        let dir = tempfile::tempdir().unwrap();
        let r = CutRenewal::new(dir.path());
        write_identity_files((&r.cert, &r.new.cert), (&r.key, &r.new.key), None).unwrap();
        assert!(r.leftovers().is_empty());
        assert_eq!(r.recover(), IdentityRecovery::Clean);
        assert_eq!(r.installed(), (r.new.cert.clone(), r.new.key.clone()));
    }

    fn parse_csr(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
        pem.contents
    }

    #[test]
    fn server_without_any_name_is_refused() {
        assert!(matches!(
            ca().issue_server(&[], &[], Validity::days_from_now(1)),
            Err(Error::NoServerNames)
        ));
    }
}
