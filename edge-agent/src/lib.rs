//! The DCS edge agent: producers push records to a local HTTP API, the agent
//! commits them to a SQLite buffer before answering, and a forwarder delivers
//! them in gzip batches over mutual TLS to the aggregator.
//!
//! # Layout
//! - [`config`]: typed configuration (TOML + `DCS_EDGE_*`), checked and
//!   compiled once at start; the agent runs on the compiled result.
//! - [`buffer`]: the durable SQLite buffer: group commit, acks, dead letters.
//! - [`ingest`]: the local HTTP API (records, status, health).
//! - [`body_encoding`]: gzip and zstd request bodies, with size bounds.
//! - [`otlp`]: the OTLP/HTTP logs receiver (`POST /v1/logs`).
//! - [`forwarder`]: batches, delivery, retries with backoff and jitter.
//! - [`enroll`]: `dcs-edge enroll`, the first certificate from a one-time
//!   token; [`identity`]: its renewal over mutual TLS while the agent runs.
//! - [`recovery`]: start-up integrity check, quarantine and salvage.
//! - [`fsck`]: `dcs-edge buffer check|stats|salvage|export`, offline.
//! - [`seal`]: encryption at rest of buffered payloads.
//! - [`sources`]: pull sources (files, databases, HTTP APIs) that read
//!   records into the buffer, with checkpoints committed together with the
//!   records.
//! - [`jobs`]: runs of those sources (scheduled or triggered), their history
//!   and the `/api/v1/jobs` API.
//! - [`transform`]: per-source field mappings applied to pulled records.
//! - [`schema`]: per-stream JSON Schemas checked on pushed and pulled records.
//! - [`syslog`]: syslog listeners (TCP, UDP, TLS); each message becomes a
//!   record through the push API's checks.
//! - `counters`: every documented counter, exported at 0 at start-up.
//!
//! **Architecture invariant:** the only path from a producer to the network
//! goes through a committed buffer row; the forwarder never sees a record that
//! was not durably stored first.

pub mod body_encoding;
pub mod buffer;
pub mod config;
mod counters;
pub mod durable;
pub mod enroll;
pub mod epochs;
pub mod file_mode;
pub mod forwarder;
pub mod fsck;
pub mod identity;
pub mod ingest;
pub mod jobs;
pub mod listener;
pub mod otlp;
pub mod recovery;
pub mod replay;
pub mod schema;
pub mod seal;
pub mod sources;
pub mod syslog;
pub mod transform;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::{CompiledConfig, Config};

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
    config: CompiledConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let CompiledConfig {
        config,
        sources,
        schemas,
        syslog: syslog_listeners,
        limits,
        buffer: opts,
    } = config;
    // Installed before the buffer is checked, so the quarantine and salvage
    // counts recorded at start-up are exported.
    let metrics_handle = dcs_shared::metrics::install();
    counters::register(&config.sources);
    let prepared = {
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || recovery::prepare(&opts))
            .await
            .map_err(|e| Error::Startup(format!("check buffer: {e}")))??
    };
    let buffer = {
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || buffer::Buffer::open(opts))
            .await
            .map_err(|e| Error::Startup(format!("open buffer: {e}")))??
    };
    let stats = buffer.stats();
    tracing::info!(
        message = "buffer open",
        path = %buffer.path().display(),
        epoch = %buffer.epoch(),
        records = stats.records,
        bytes = stats.bytes
    );
    let link = Arc::new(forwarder::Link::default());
    identity::recover_files(&config)
        .map_err(|e| Error::Startup(format!("recover the agent's certificate files: {e}")))?;
    // One client for every forwarder, so a renewed certificate reaches all.
    let client = forwarder::SharedClient::new(forwarder::http_client(&config)?);
    let forwarder =
        forwarder::Forwarder::with_client(&config, buffer.clone(), link.clone(), client.clone())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let forwarding = tokio::spawn(forwarder.run(stop_rx.clone()));
    let renewing = tokio::spawn(identity::run_renewal(
        config.clone(),
        client.clone(),
        stop_rx.clone(),
    ));
    // Opened before the API serves, so `/v1/status` counts salvaged records
    // waiting for delivery from the first request on.
    let waiting = recovery::Waiting::default();
    let mut draining = Vec::new();
    for path in &prepared.recovered {
        let opts = buffer::BufferOptions {
            path: path.clone(),
            ..opts.clone()
        };
        let opened = tokio::task::spawn_blocking(move || buffer::Buffer::open(opts)).await;
        let recovered = match opened {
            Ok(Ok(buffer)) => buffer,
            Ok(Err(error)) => {
                tracing::error!(message = "cannot open recovered buffer", path = %path.display(), %error);
                continue;
            }
            Err(error) => {
                tracing::error!(message = "cannot open recovered buffer", path = %path.display(), %error);
                continue;
            }
        };
        waiting.add(recovered.clone());
        draining.push(tokio::spawn(drain_recovered(
            config.clone(),
            recovered,
            waiting.clone(),
            link.clone(),
            client.clone(),
            stop_rx.clone(),
        )));
    }

    let jobs = jobs::Jobs::start(
        sources,
        config.jobs.retention,
        buffer.clone(),
        limits,
        schemas.clone(),
    )
    .await?;
    let syslog = syslog::Listeners::start(
        syslog_listeners,
        syslog::Sink {
            buffer: buffer.clone(),
            schemas: schemas.clone(),
        },
    )
    .await
    .map_err(Error::Startup)?;
    let app = ingest::router(ingest::AppState {
        buffer: buffer.clone(),
        link,
        limits,
        max_request_bytes: config.ingest.max_request_bytes.as_usize(),
        metrics: metrics_handle,
        quarantine: Arc::new(prepared.reports),
        recovered: waiting,
        schemas,
        partial: config.ingest.partial,
        otlp: Arc::new(config.otlp.clone()),
    })
    .merge(jobs::router(jobs.clone()))
    .layer(axum::middleware::from_fn_with_state(
        ingest::BodyLimits {
            deadline: config.listen.body_timeout,
            max_bytes: config.ingest.max_request_bytes.as_usize(),
        },
        ingest::read_body_within,
    ));
    tracing::info!(
        message = "ingest API listening",
        address = %listener.local_addr().map_err(Error::Serve)?,
        aggregator = %config.aggregator.url
    );
    listener::serve(listener, app, config.listen.header_timeout, shutdown).await;
    // Syslog connections finish the commit in flight, then close.
    syslog.shutdown().await;
    // Collectors hold buffer handles: they must be done before it closes.
    jobs.shutdown().await;
    drop(jobs);
    let _ = stop_tx.send(true);
    let _ = forwarding.await;
    // A renewal request in flight is not worth waiting for; file writes run
    // on the blocking pool and complete regardless.
    renewing.abort();
    let _ = renewing.await;
    for task in draining {
        let _ = task.await;
    }
    buffer.close().await;
    tracing::info!(message = "agent stopped");
    Ok(())
}

/// Delivers the records salvaged from a damaged buffer (a recovered buffer
/// file, see [`recovery`]) with their original delivery keys, then deletes the
/// file. A file that still holds dead letters is kept for inspection.
async fn drain_recovered(
    config: Config,
    buffer: buffer::Buffer,
    waiting: recovery::Waiting,
    link: Arc<forwarder::Link>,
    client: forwarder::SharedClient,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let path = buffer.path().to_owned();
    tracing::info!(
        message = "delivering salvaged records",
        path = %path.display(),
        epoch = %buffer.epoch(),
        records = buffer.stats().records
    );
    let forwarder = match forwarder::Forwarder::with_client(&config, buffer.clone(), link, client) {
        Ok(forwarder) => forwarder,
        Err(error) => {
            tracing::error!(message = "cannot deliver recovered buffer", %error);
            return;
        }
    };
    let (own_stop, own_stop_rx) = tokio::sync::watch::channel(false);
    let forwarding = tokio::spawn(forwarder.run(own_stop_rx));
    let delivered = loop {
        if buffer.stats().records == 0 {
            break true;
        }
        tokio::select! {
            _ = stop.changed() => break false,
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    };
    let _ = own_stop.send(true);
    let _ = forwarding.await;
    let dead_letters = buffer.dead_letter_summary().map(|d| d.records).unwrap_or(1);
    waiting.remove(&path);
    buffer.close().await;
    if delivered && dead_letters == 0 {
        recovery::remove_buffer_files(&path);
        tracing::info!(message = "salvaged records delivered; recovered buffer removed", path = %path.display());
    } else if delivered {
        tracing::warn!(
            message = "salvaged records delivered; recovered buffer kept for its dead letters",
            path = %path.display(),
            dead_letters
        );
    }
}
