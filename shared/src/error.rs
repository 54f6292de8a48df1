use std::path::PathBuf;

/// Every failure `dcs-shared` reports. Variants are split by what a caller does
/// with them: the batch variants map to distinct HTTP statuses at the aggregator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found")]
    NoPrivateKey { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("certificate identity: {0}")]
    Identity(String),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
}
