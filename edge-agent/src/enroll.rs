//! `dcs-edge enroll`: get this agent's first certificate with a one-time
//! enrollment token, without its private key ever leaving the machine.
//!
//! The key pair is generated here ([`dcs_certs::enroll::new_key_and_csr`]);
//! only the CSR goes to the aggregator's platform listener (server TLS,
//! verified against the CA file the operator names), together with the
//! token. The answer is the signed certificate and the CA bundle. All three
//! files are written staged and renamed into place (key 0600, certificate
//! and CA 0644), and only after the certificate was checked to belong to
//! the key. The key is never printed or logged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dcs_certs::enroll::{ENROLL_PATH, EnrollRequest, IssuedCertificate};
use dcs_shared::wire::ErrorBody;
use serde::Serialize;

/// Enrollment is one small request; a minute covers a slow satellite link.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why getting or renewing a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum CertRequestError {
    #[error("{0}")]
    Certs(#[from] dcs_certs::Error),
    #[error("TLS: {0}")]
    Tls(#[from] dcs_shared::Error),
    #[error("{0}")]
    Url(String),
    /// The request did not get an answer (connection, TLS, timeout).
    #[error("send request to {url}: {reason}")]
    Transport { url: String, reason: String },
    /// The aggregator answered with an error body: `code` says why
    /// (`token_used`, `token_expired`, `revoked`, `enrollment_disabled`...).
    #[error("refused by the aggregator ({status} {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the aggregator ({status}): {body}")]
    BadAnswer { status: u16, body: String },
    /// Checked before the token is sent, so a failure leaves it unspent.
    #[error("cannot write {what} to {}: {source} (the token was not used)", path.display())]
    NotWritable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write {what}: {source}")]
    Write {
        what: &'static str,
        #[source]
        source: dcs_certs::Error,
    },
}

/// Where the agent's identity is written.
#[derive(Debug, Clone)]
pub struct IdentityPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Enrolls at the platform listener `url` with `token`, trusting only the CA
/// certificates in `trust`, and writes the new identity to `paths`.
/// Returns what was issued (certificate and CA, never the key).
pub async fn enroll(
    url: &str,
    token: &str,
    trust: &Path,
    paths: &IdentityPaths,
) -> Result<IssuedCertificate, CertRequestError> {
    let client = server_tls_client(trust)?;
    // The token is spent by the request: find out first that the answer can
    // be written, or a retry would only hear "token used".
    for (what, path) in [
        ("the certificate", &paths.cert),
        ("the private key", &paths.key),
        ("the CA bundle", &paths.ca),
    ] {
        check_writable(path).map_err(|source| CertRequestError::NotWritable {
            what,
            path: path.clone(),
            source,
        })?;
    }
    let (key, csr) = dcs_certs::enroll::new_key_and_csr()?;
    let endpoint = endpoint(url, ENROLL_PATH)?;
    let request = EnrollRequest {
        token: token.to_owned(),
        csr,
    };
    let issued = post_for_certificate(&client, endpoint, &request).await?;
    dcs_certs::enroll::check_pair(&issued.certificate, &key)?;
    let paths = paths.clone();
    let (cert, ca) = (issued.certificate.clone(), issued.ca.clone());
    tokio::task::spawn_blocking(move || {
        dcs_certs::write_identity_files(
            (&paths.cert, &cert),
            (&paths.key, &key),
            Some((&paths.ca, &ca)),
        )
    })
    .await
    .map_err(|e| CertRequestError::Url(format!("write identity: {e}")))?
    .map_err(|source| CertRequestError::Write {
        what: "the new identity",
        source,
    })?;
    Ok(issued)
}

/// Creates, syncs and removes a probe file in `path`'s directory (or, when
/// that does not exist yet, in its nearest existing ancestor, where the
/// directories would be created) and syncs that directory: what writing the
/// identity will do, without leaving anything behind or touching an
/// existing file at `path`.
fn check_writable(path: &Path) -> std::io::Result<()> {
    let mut dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    while !dir.exists() {
        dir = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
    }
    if !dir.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            format!("{} is not a directory", dir.display()),
        ));
    }
    if path.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "is a directory",
        ));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let probe = dir.join(format!(".{name}.probe-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|f| f.sync_all());
    let _ = std::fs::remove_file(&probe);
    written?;
    std::fs::File::open(&dir)?.sync_all()
}

/// `base` (an `https://` URL, any path) with its path replaced by `path`.
pub(crate) fn endpoint(base: &str, path: &str) -> Result<reqwest::Url, CertRequestError> {
    let base =
        reqwest::Url::parse(base).map_err(|e| CertRequestError::Url(format!("{base}: {e}")))?;
    if base.scheme() != "https" {
        return Err(CertRequestError::Url(format!(
            "{base}: must be https:// (the token and the certificate travel over it)"
        )));
    }
    base.join(path)
        .map_err(|e| CertRequestError::Url(format!("{base}: {e}")))
}

/// A client that verifies the server against `trust` only and presents no
/// certificate (the agent has none yet).
fn server_tls_client(trust: &Path) -> Result<reqwest::Client, CertRequestError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in dcs_shared::tls::load_certs(trust)? {
        roots
            .add(cert)
            .map_err(|e| CertRequestError::Url(format!("{}: {e}", trust.display())))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertRequestError::Url(format!("TLS 1.3: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(ENROLL_TIMEOUT)
        .no_proxy()
        .build()
        .map_err(|e| CertRequestError::Transport {
            url: String::new(),
            reason: e.to_string(),
        })
}

/// POSTs `body` as JSON and reads an [`IssuedCertificate`] or an error body.
pub(crate) async fn post_for_certificate(
    client: &reqwest::Client,
    url: reqwest::Url,
    body: &impl Serialize,
) -> Result<IssuedCertificate, CertRequestError> {
    let body = serde_json::to_vec(body).expect("request bodies serialise");
    let transport = |e: reqwest::Error| CertRequestError::Transport {
        url: url.to_string(),
        reason: error_chain(&e),
    };
    let response = client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(transport)?;
    let status = response.status();
    let text = response.text().await.map_err(transport)?;
    if status.is_success() {
        return serde_json::from_str(&text).map_err(|_| CertRequestError::BadAnswer {
            status: status.as_u16(),
            body: text.chars().take(200).collect(),
        });
    }
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(error) => Err(CertRequestError::Refused {
            status: status.as_u16(),
            code: error.error,
            message: error.message,
        }),
        Err(_) => Err(CertRequestError::BadAnswer {
            status: status.as_u16(),
            body: text.chars().take(200).collect(),
        }),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_paths_are_checked_without_leaving_anything_behind() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("new/sub/agent.pem");
        check_writable(&nested).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "neither the probe nor a directory is left behind"
        );
        assert!(
            check_writable(dir.path()).is_err(),
            "a directory is no file"
        );
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, "x").unwrap();
        assert!(check_writable(&blocked.join("agent.pem")).is_err());
    }

    #[test]
    fn endpoints_replace_the_path_and_must_be_https() {
        assert_eq!(
            endpoint("https://agg.example:8444", ENROLL_PATH)
                .unwrap()
                .as_str(),
            "https://agg.example:8444/api/v1/enroll"
        );
        assert_eq!(
            endpoint("https://agg.example:8444/anything", ENROLL_PATH)
                .unwrap()
                .as_str(),
            "https://agg.example:8444/api/v1/enroll"
        );
        assert!(endpoint("http://agg.example:8444", ENROLL_PATH).is_err());
        assert!(endpoint("not a url", ENROLL_PATH).is_err());
    }
}
