//! The forwarder: reads the buffer in sequence order, cuts batches, and
//! delivers them to the aggregator over mutual TLS until each is acknowledged.
//!
//! # Design constraints
//! - Records are removed from the buffer only after the aggregator answered 2xx,
//!   which it does only after its PostgreSQL commit. A lost answer means the
//!   batch is sent again; the aggregator's `(agent, epoch, seq)` key makes that
//!   harmless.
//! - Transient failures (connection errors, timeouts, 408, 429, 5xx) are
//!   retried forever with capped exponential backoff and full jitter, honouring
//!   `Retry-After`. There is no give-up time: an outage of days loses nothing.
//! - 401/403 (revoked or unknown agent) keep the data and retry at the cap.
//! - A permanent refusal (400/415/422) moves the batch to the dead-letter table
//!   with the reason: visible in `/v1/status`, never silently dropped. A 413
//!   splits the batch in halves first; only a single record too large goes there.
//! - A key already taken at the aggregator (409 `content_conflict`, or an
//!   answer whose `high_seq` this buffer has not reached yet) means the
//!   buffer went back in time. The buffer then moves to a new epoch, the
//!   conflicting records are re-keyed into it and the rest of the batch is
//!   sent again: nothing the producer was told is safe goes to dead letters
//!   ([`crate::epochs`]). Before its first batch the forwarder asks for its
//!   epoch's high-water mark with an empty batch, so a reverted buffer moves
//!   on before it sends a reused seq.
//! - Memory stays bounded by `max_in_flight` batches whatever the backlog.
//! - The TLS identity can change while the forwarder runs: every attempt
//!   takes the client current at that moment from a [`SharedClient`], which
//!   certificate renewal ([`crate::identity`]) replaces. A batch in flight
//!   finishes on the connection it started on; its retry, and every later
//!   batch, presents the new certificate. Nothing about a batch (its rows,
//!   its `seq` range, its ack) depends on the client, so a swap can neither
//!   lose nor repeat a record.
//!
//! # Layout
//! The module root runs the forwarder: it reads and cuts batches and hands
//! each to `delivery`, which retries it until it is acknowledged,
//! re-keyed or dead-lettered. `attempt` is one POST and its answer,
//! `client` the mutual-TLS client, `backoff` the retry timing, `link`
//! what `/v1/status` shows, `high_water` the epoch checks and `replay`
//! the resend of retained records.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use dcs_shared::wire::{self, Backlog, OutRecord};
use uuid::Uuid;

use crate::Error;
use crate::buffer::{Buffer, Buffered};
use crate::config::Config;

mod attempt;
mod backoff;
mod client;
mod delivery;
mod high_water;
mod link;
mod replay;

pub use backoff::Backoff;
pub use client::{SharedClient, http_client};
pub use link::{Link, LinkState, LinkStatus};

struct Inner {
    buffer: Buffer,
    client: SharedClient,
    url: reqwest::Url,
    link: Arc<Link>,
    max_records: usize,
    max_bytes: u64,
    linger: Duration,
    compression_level: u32,
    retry_initial: Duration,
    retry_max: Duration,
    /// Whether delivered records are retained, so a replay can resend them.
    retains: bool,
    /// The replay state as last stored ([`crate::replay`]); `None` until
    /// read at start.
    replay: std::sync::Mutex<Option<crate::replay::State>>,
    /// Wakes the replay task when an answer starts a replay.
    replay_wake: tokio::sync::Notify,
    /// An idle agent posts an empty batch this often.
    heartbeat: Duration,
    /// When the aggregator last answered with a 2xx.
    last_answer: std::sync::Mutex<std::time::Instant>,
}

pub struct Forwarder {
    inner: Arc<Inner>,
    max_in_flight: usize,
    shutdown_grace: Duration,
}

impl Forwarder {
    pub fn new(config: &Config, buffer: Buffer, link: Arc<Link>) -> Result<Forwarder, Error> {
        Forwarder::with_client(
            config,
            buffer,
            link,
            SharedClient::new(http_client(config)?),
        )
    }

    /// Like [`Forwarder::new`], posting with `client`, which the caller may
    /// replace while the forwarder runs (see [`SharedClient`]).
    pub fn with_client(
        config: &Config,
        buffer: Buffer,
        link: Arc<Link>,
        client: SharedClient,
    ) -> Result<Forwarder, Error> {
        let base = reqwest::Url::parse(&config.aggregator.url)
            .map_err(|e| Error::Startup(format!("aggregator.url: {e}")))?;
        let url = base
            .join(wire::BATCHES_PATH)
            .map_err(|e| Error::Startup(format!("aggregator.url: {e}")))?;
        Ok(Forwarder {
            inner: Arc::new(Inner {
                buffer,
                client,
                url,
                link,
                max_records: config.batch.max_records,
                max_bytes: config.batch.max_bytes.0,
                linger: config.batch.linger,
                compression_level: config.batch.compression_level,
                retry_initial: config.retry.initial,
                retry_max: config.retry.max,
                retains: !config.buffer.retain_delivered.is_zero(),
                replay: std::sync::Mutex::new(None),
                replay_wake: tokio::sync::Notify::new(),
                heartbeat: config.batch.heartbeat,
                last_answer: std::sync::Mutex::new(std::time::Instant::now()),
            }),
            max_in_flight: config.batch.max_in_flight,
            shutdown_grace: config.retry.shutdown_grace,
        })
    }

    /// Runs until `stop` turns true; then waits up to the shutdown grace for
    /// batches in flight and abandons the rest (they stay buffered and are sent
    /// again after restart).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let inner = self.inner;
        inner.buffer.reset_claims();
        replay::register_metrics();
        let state = {
            let buffer = inner.buffer.clone();
            tokio::task::spawn_blocking(move || buffer.replay_state()).await
        };
        match state {
            Ok(Ok(state)) => *inner.replay.lock().expect("replay lock") = Some(state),
            Ok(Err(error)) => {
                tracing::error!(message = "read the replay state; replays wait for a restart", %error)
            }
            Err(error) => tracing::error!(message = "read the replay state", %error),
        }
        let replaying = tokio::spawn(inner.clone().run_replays(stop.clone()));
        if !inner.check_high_water(&mut stop).await {
            replaying.abort();
            return;
        }
        let slots = Arc::new(Semaphore::new(self.max_in_flight));
        let mut in_flight = JoinSet::new();
        let mut cursor = 0i64;
        loop {
            while in_flight.try_join_next().is_some() {}
            let permit = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            let batch = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                b = inner.next_batch(cursor) => b,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(error) => {
                    tracing::error!(message = "read buffer for forwarding", %error);
                    tokio::time::sleep(inner.retry_max.min(Duration::from_secs(5))).await;
                    continue;
                }
            };
            cursor = batch.last().expect("next_batch returns records").seq;
            let inner = inner.clone();
            let stop = stop.clone();
            in_flight.spawn(async move {
                inner.deliver(batch, stop).await;
                drop(permit);
            });
        }
        let drained = tokio::time::timeout(self.shutdown_grace, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::info!(
                message = "abandoning batches in flight at shutdown; they stay buffered",
                batches = in_flight.len()
            );
            in_flight.shutdown().await;
        }
        replaying.abort();
        let _ = replaying.await;
    }
}

impl Inner {
    /// Waits for records after `after` and returns the next batch, lingering
    /// briefly for a partial one to fill.
    async fn next_batch(&self, after: i64) -> Result<Vec<Buffered>, Error> {
        loop {
            let buffer = self.buffer.clone();
            let (max_records, max_bytes) = (self.max_records, self.max_bytes);
            let batch = tokio::task::spawn_blocking(move || {
                buffer.read_and_claim(after, max_records, max_bytes)
            })
            .await
            .map_err(|e| Error::Startup(format!("buffer reader panicked: {e}")))??;
            let Some(first) = batch.first() else {
                // A missed wake-up costs at most a second, never a stall.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.buffer.appended()).await;
                continue;
            };
            let bytes: u64 = batch.iter().map(|r| r.size).sum();
            let full = batch.len() >= self.max_records || bytes * 10 >= self.max_bytes * 9;
            let age_us = now_us().saturating_sub(first.received_us).max(0) as u128;
            let linger_us = self.linger.as_micros();
            if !full && age_us < linger_us {
                tokio::time::sleep(Duration::from_micros((linger_us - age_us) as u64)).await;
                continue;
            }
            return Ok(batch);
        }
    }

    /// The backlog behind `batch`: what stays buffered once it is delivered,
    /// so the center's view returns to zero when the last batch lands.
    fn backlog(&self, batch: &[Buffered]) -> Backlog {
        let stats = self.buffer.stats();
        let in_batch: u64 = batch.iter().map(|r| r.size).sum();
        let oldest_age_secs = self
            .buffer
            .oldest_received_us()
            .ok()
            .flatten()
            .map(|us| (now_us().saturating_sub(us).max(0) / 1_000_000) as u64)
            .unwrap_or(0);
        Backlog {
            records: stats.records.saturating_sub(batch.len() as u64),
            bytes: stats.bytes.saturating_sub(in_batch),
            oldest_age_secs,
            dropped_total: stats.dropped_total,
        }
    }

    fn encode(&self, batch: &[Buffered]) -> Bytes {
        let records = batch.iter().map(|r| OutRecord {
            seq: r.seq,
            id: &r.id,
            stream: &r.stream,
            ts_us: r.ts_us,
            payload: &r.payload,
            received: Some(r.received_us),
        });
        Bytes::from(wire::encode_batch(
            self.buffer.epochs().of(batch[0].seq),
            Some(&self.backlog(batch)),
            records,
            self.compression_level,
        ))
    }

    /// An empty batch of `epoch`: asks for the high-water mark and the
    /// replay request, writes nothing.
    fn empty_batch(&self, epoch: Uuid) -> Bytes {
        Bytes::from(wire::encode_batch(
            epoch,
            None,
            std::iter::empty(),
            self.compression_level,
        ))
    }
}

fn now_us() -> i64 {
    dcs_shared::record::unix_micros(time::OffsetDateTime::now_utc())
}
