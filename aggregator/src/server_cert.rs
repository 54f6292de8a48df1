//! The aggregator's own server certificate, replaceable while it runs.
//!
//! Design constraints:
//! - **Renewal without a restart.** Both listeners resolve their certificate
//!   per handshake from a [`ReloadableCert`]; SIGHUP re-reads the PEM files
//!   and swaps it. Connections already open keep the session they negotiated
//!   and are never dropped; new handshakes get the new certificate.
//! - **A bad file never takes the service down.** A reload that cannot read
//!   the files, or whose key does not match the certificate, is logged and
//!   the previous certificate stays in use. Start-up still fails fast (the
//!   first load goes through `dcs_shared::tls`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// A certificate and key from two PEM files, re-read on [`ReloadableCert::reload`].
#[derive(Debug)]
pub struct ReloadableCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, String> {
        Ok(Arc::new(ReloadableCert {
            current: RwLock::new(Arc::new(read(cert, key)?)),
            cert: cert.to_owned(),
            key: key.to_owned(),
        }))
    }

    /// Re-reads the files; on failure keeps the certificate in use.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = read(&self.cert, &self.key)?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(fresh);
        Ok(())
    }

    /// `config` (built and checked by `dcs_shared::tls`) serving this
    /// certificate instead of its fixed one.
    pub fn install(
        self: &Arc<Self>,
        config: Arc<rustls::ServerConfig>,
    ) -> Arc<rustls::ServerConfig> {
        let mut config = (*config).clone();
        config.cert_resolver = self.clone();
        Arc::new(config)
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        )
    }
}

fn read(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = dcs_shared::tls::load_certs(cert).map_err(|e| e.to_string())?;
    let key_der = dcs_shared::tls::load_key(key).map_err(|e| e.to_string())?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "{} does not belong to {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(certified)
}

/// Reloads every certificate in `certs` on each SIGHUP, until aborted.
pub(crate) fn spawn_reload_on_sighup(
    certs: Vec<Arc<ReloadableCert>>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    // Registered before returning, so a SIGHUP right after start-up is
    // handled rather than killing the process.
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            for cert in &certs {
                match cert.reload() {
                    Ok(()) => {
                        metrics::counter!("dcs_aggregator_server_cert_reloads_total", "outcome" => "ok").increment(1);
                        tracing::info!(message = "server certificate reloaded", path = %cert.cert.display());
                    }
                    Err(error) => {
                        metrics::counter!("dcs_aggregator_server_cert_reloads_total", "outcome" => "failed").increment(1);
                        tracing::error!(message = "reload server certificate; keeping the one in use", %error);
                    }
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_files_are_named() {
        let err =
            ReloadableCert::load(Path::new("/nonexistent/c.pem"), Path::new("/x")).unwrap_err();
        assert!(err.contains("/nonexistent/c.pem"), "{err}");
    }
}
