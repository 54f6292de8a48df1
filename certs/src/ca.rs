//! The private CA every DCS certificate chains to: generated, loaded and
//! written.
//!
//! Invariants: the CA has path length 0 (it signs only leaves); a loaded CA
//! is a CA certificate whose key belongs to it, checked at load rather than
//! at the first failed handshake; an existing CA is replaced only when asked.

use std::fmt;
use std::fs;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::files::{OutFile, write_files};
use crate::{CA_CERT_FILE, CA_KEY_FILE, Error, Validity};

/// A certificate authority able to issue DCS server and agent certificates.
///
/// Holds the PEM text alongside the parsed signing state so that [`Ca::write`]
/// reproduces exactly what was loaded or generated.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    /// Signs leaves ([`crate::leaf`]).
    pub(crate) issuer: Issuer<'static, KeyPair>,
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
}

pub(crate) fn common_name_only(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn read_to_string(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}
