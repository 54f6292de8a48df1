//! rustls configurations for both ends of the agent link, built once at start-up
//! so that a bad file fails the process immediately with the path in the error,
//! never during a handshake.
//!
//! Both ends speak TLS 1.3 only and trust nothing but the DCS CA: the agent does
//! not consult the system roots, and the aggregator requires a client certificate
//! chaining to the CA on every connection.
//!
//! [`TlsFiles`] is where a configuration's certificate paths are checked:
//! every tier and listener that names PEM files checks them here, so "is
//! not a readable file" means the same thing everywhere.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::Error;
use crate::config::Issues;

/// ALPN protocols offered by the aggregator: h2 first for multiplexed batches.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Installs ring as the process-wide rustls provider. Libraries built without a
/// default provider (reqwest, sqlx) panic without one; calling this again is a no-op.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| Error::NoCertificate {
            path: path.to_owned(),
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| Error::NoPrivateKey {
        path: path.to_owned(),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

fn roots(ca: &Path) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The aggregator's agent listener: TLS 1.3, client certificate required and
/// verified against the CA in `ca`.
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
        .build()
        .map_err(|e| Error::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A plain server-TLS configuration (no client certificate), for listeners that
/// authenticate by other means.
pub fn server_config_no_client_auth(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The agent's side: trusts only the CA in `ca` and presents `cert`/`key`.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<ClientConfig, Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The PEM files one end of a mutual-TLS link is configured with: the CA
/// bundle the peer's certificate must chain to, and this end's certificate
/// (chain) and private key.
///
/// Borrowed from the section that names them (the agent's `[aggregator]`,
/// the aggregator's `[tls]`), which keep `ca`, `cert` and `key` as fields of
/// their own: with `#[serde(flatten)]` a wrong type or a misspelt key would
/// be reported against the section (`aggregator`) instead of the key
/// (`aggregator.cert`), and the misspelling without the list of known keys.
/// A syslog listener's `[syslog.tls]` is not one: its CA (`client_ca`) is
/// optional, so it checks its files one by one with [`check_readable_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsFiles<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
}

impl<'a> TlsFiles<'a> {
    /// Each file with the key it is configured under, in reporting order.
    fn named(&self) -> [(&'static str, &'a Path); 3] {
        [("ca", self.ca), ("cert", self.cert), ("key", self.key)]
    }

    /// Records each of `SECTION.ca`, `SECTION.cert` and `SECTION.key` left
    /// empty, without touching the file system (where the files are checked
    /// later, or on another host).
    pub fn check_set(&self, section: &str, issues: &mut Issues) {
        for (name, path) in self.named() {
            issues.check(
                !path.as_os_str().is_empty(),
                &format!("{section}.{name}"),
                "is required",
            );
        }
    }

    /// Records each of `SECTION.ca`, `SECTION.cert` and `SECTION.key` that
    /// is not a file this process can read (see [`check_readable_file`]).
    pub fn check_readable(&self, section: &str, issues: &mut Issues) {
        for (name, path) in self.named() {
            check_readable_file(path, &format!("{section}.{name}"), issues);
        }
    }

    /// [`server_config`] of these files.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, Error> {
        server_config(self.ca, self.cert, self.key)
    }

    /// [`client_config`] of these files.
    pub fn client_config(&self) -> Result<ClientConfig, Error> {
        client_config(self.ca, self.cert, self.key)
    }
}

/// Records `key` unless `path` is a regular file this process can open for
/// reading. Opened, not only looked at: a file the service user may not
/// read would otherwise pass the check and fail at start-up. Only regular
/// files are opened, so a FIFO cannot block the check.
pub fn check_readable_file(path: &Path, key: &str, issues: &mut Issues) {
    let readable =
        std::fs::metadata(path).is_ok_and(|m| m.is_file()) && std::fs::File::open(path).is_ok();
    issues.check(
        readable,
        key,
        format!("{} is not a readable file", path.display()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(issues: Issues) -> Vec<String> {
        match issues.into_result() {
            Ok(()) => Vec::new(),
            Err(e) => e.issues.into_iter().map(|i| i.key).collect(),
        }
    }

    #[test]
    fn each_missing_or_unset_file_is_named_under_its_section() {
        let dir = std::env::temp_dir();
        let exists = dir.join(format!("dcs-tls-files-{}", std::process::id()));
        std::fs::write(&exists, "x").unwrap();
        let files = TlsFiles {
            ca: &exists,
            cert: Path::new("/nonexistent/cert.pem"),
            key: &dir,
        };
        let mut issues = Issues::default();
        files.check_readable("aggregator", &mut issues);
        assert_eq!(keys(issues), ["aggregator.cert", "aggregator.key"]);

        let unset = TlsFiles {
            ca: Path::new(""),
            cert: &exists,
            key: Path::new(""),
        };
        let mut issues = Issues::default();
        unset.check_set("tls", &mut issues);
        assert_eq!(keys(issues), ["tls.ca", "tls.key"]);
        std::fs::remove_file(&exists).unwrap();
    }
}
