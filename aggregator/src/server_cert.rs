//! The aggregator's own server certificate, replaceable while it runs.
//!
//! Design constraints:
//! - **Renewal without a restart.** Both listeners resolve their certificate
//!   per handshake from a [`ReloadableCert`]; SIGHUP re-reads the PEM files
//!   and swaps it, and so does a change of either file (size, mtime, inode,
//!   polled every `tls.watch_interval`: a deployment tool that renames a new
//!   certificate into place needs no signal). Connections already open keep
//!   the session they negotiated and are never dropped; new handshakes get
//!   the new certificate.
//! - **A half-replaced pair is waited out.** A tool that writes the
//!   certificate and then the key makes the first poll see a key that does
//!   not match; that attempt is logged once and retried when a file changes
//!   again, so the second write completes the reload.
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

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    // metadata follows symlinks, so a Kubernetes-style `..data` symlink swap
    // shows as a new inode.
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

impl ReloadableCert {
    fn stamps(&self) -> (Option<FileStamp>, Option<FileStamp>) {
        (stamp(&self.cert), stamp(&self.key))
    }
}

/// Reloads a certificate whose files changed, checking every `interval`
/// (`None` when the interval is zero: SIGHUP only). Until aborted.
pub(crate) fn spawn_reload_on_change(
    certs: Vec<Arc<ReloadableCert>>,
    interval: std::time::Duration,
) -> Option<tokio::task::JoinHandle<()>> {
    if interval.is_zero() {
        return None;
    }
    // The versions last loaded or last tried: a pair that failed to load is
    // tried again only after one of its files changes once more.
    let mut seen: Vec<_> = certs.iter().map(|c| c.stamps()).collect();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            for (cert, last) in certs.iter().zip(seen.iter_mut()) {
                let now = cert.stamps();
                if now == *last {
                    continue;
                }
                *last = now;
                report(cert, cert.reload(), "file change");
            }
        }
    }))
}

fn report(cert: &ReloadableCert, result: Result<(), String>, trigger: &'static str) {
    match result {
        Ok(()) => {
            metrics::counter!("dcs_aggregator_server_cert_reloads_total", "outcome" => "ok")
                .increment(1);
            tracing::info!(message = "server certificate reloaded", path = %cert.cert.display(), trigger);
        }
        Err(error) => {
            metrics::counter!("dcs_aggregator_server_cert_reloads_total", "outcome" => "failed")
                .increment(1);
            tracing::error!(message = "reload server certificate; keeping the one in use", %error, trigger);
        }
    }
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
                report(cert, cert.reload(), "SIGHUP");
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
