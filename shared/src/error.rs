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
    /// The decompressed batch would exceed the configured limit (a gzip bomb or a
    /// misconfigured agent); maps to 413.
    #[error("batch exceeds {limit} bytes once decompressed")]
    BatchTooLarge { limit: usize },
    /// Not gzip, truncated, or not the batch JSON shape; maps to 400.
    #[error("malformed batch: {0}")]
    MalformedBatch(String),
    #[error("unsupported batch format version {0} (this build speaks version 1)")]
    UnsupportedVersion(u32),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
}
