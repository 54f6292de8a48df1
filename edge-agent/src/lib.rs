//! The DCS edge agent: producers push records to a local HTTP API, the agent
//! commits them to a SQLite buffer before answering, and a forwarder delivers
//! them in gzip batches over mutual TLS to the aggregator.
//!
//! # Layout
//! - [`config`]: typed configuration (TOML + `DCS_EDGE_*`), validated at start.
//! - [`buffer`]: the durable SQLite buffer: group commit, acks, dead letters.
//! - [`ingest`]: the local HTTP API (records, status, health).
//! - [`forwarder`]: batches, delivery, retries with backoff and jitter.
//!
//! **Architecture invariant:** the only path from a producer to the network
//! goes through a committed buffer row; the forwarder never sees a record that
//! was not durably stored first.

pub mod buffer;
pub mod config;
pub mod forwarder;
pub mod ingest;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Buffer(#[from] buffer::BufferError),
    #[error("TLS: {0}")]
    Tls(#[from] dcs_shared::Error),
    #[error("HTTP client: {0}")]
    Http(reqwest::Error),
    #[error("serve ingest API: {0}")]
    Serve(std::io::Error),
    #[error("{0}")]
    Startup(String),
}

/// Runs the agent on `listener` until `shutdown` completes: opens the buffer,
/// starts the forwarder, serves the ingest API; on shutdown stops accepting,
/// lets in-flight requests finish, gives in-flight batches a grace period and
/// closes the buffer cleanly.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let opts = config.buffer_options();
    let buffer = tokio::task::spawn_blocking(move || buffer::Buffer::open(opts))
        .await
        .map_err(|e| Error::Startup(format!("open buffer: {e}")))??;
    let stats = buffer.stats();
    tracing::info!(
        message = "buffer open",
        path = %buffer.path().display(),
        epoch = %buffer.epoch(),
        records = stats.records,
        bytes = stats.bytes
    );
    let link = Arc::new(forwarder::Link::default());
    let forwarder = forwarder::Forwarder::new(&config, buffer.clone(), link.clone())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let forwarding = tokio::spawn(forwarder.run(stop_rx));

    let app = ingest::router(ingest::AppState {
        buffer: buffer.clone(),
        link,
        limits: dcs_shared::record::Limits {
            max_payload_bytes: config.ingest.max_payload_bytes.as_usize(),
        },
        max_request_bytes: config.ingest.max_request_bytes.as_usize(),
        metrics: dcs_shared::metrics::install(),
    });
    tracing::info!(
        message = "ingest API listening",
        address = %listener.local_addr().map_err(Error::Serve)?,
        aggregator = %config.aggregator.url
    );
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = stop_tx.send(true);
    let _ = forwarding.await;
    buffer.close().await;
    tracing::info!(message = "agent stopped");
    served.map_err(Error::Serve)
}
