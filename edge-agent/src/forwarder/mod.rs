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
//! Retry timing is our own ten lines ([`Backoff`]) rather than a crate: the
//! `backoff` crate is unmaintained (RUSTSEC-2025-0012), and per-attempt
//! `Retry-After` plus "retry forever" fit a plain loop better than a combinator.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use dcs_shared::wire::{self, Backlog, BatchAck, ErrorBody, ErrorCode, OutRecord};
use uuid::Uuid;

use crate::Error;
use crate::buffer::{Buffer, Buffered};
use crate::config::Config;

/// Exponential backoff with full jitter: each delay is uniform in
/// `[0, min(max, initial * 2^attempt)]`, which spreads a fleet of agents
/// reconnecting after a shared outage instead of having them knock in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(fastrand::f64())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// Nothing sent yet since start.
    Unknown,
    Up,
    Down,
}

/// What operators see of the link in `/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub link: LinkState,
    pub last_success: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub batches_sent: u64,
    pub retries: u64,
}

/// Shared, lock-protected [`LinkStatus`]; updated by the forwarder, read by the API.
#[derive(Debug)]
pub struct Link(Mutex<LinkStatus>);

impl Default for Link {
    fn default() -> Self {
        Link(Mutex::new(LinkStatus {
            link: LinkState::Unknown,
            last_success: None,
            last_error: None,
            last_error_at: None,
            batches_sent: 0,
            retries: 0,
        }))
    }
}

impl Link {
    pub fn snapshot(&self) -> LinkStatus {
        self.0.lock().expect("link lock").clone()
    }

    fn success(&self) {
        metrics::gauge!("dcs_agent_last_delivery_timestamp_seconds").set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        self.up();
        let mut s = self.0.lock().expect("link lock");
        s.last_success = Some(now_rfc3339());
        s.batches_sent += 1;
    }

    /// The aggregator answered, though no batch was delivered.
    fn up(&self) {
        metrics::gauge!("dcs_agent_link_up").set(1.0);
        self.0.lock().expect("link lock").link = LinkState::Up;
    }

    fn failure(&self, reason: &str, link_down: bool) {
        metrics::counter!("dcs_agent_delivery_retries_total").increment(1);
        let mut s = self.0.lock().expect("link lock");
        if link_down {
            metrics::gauge!("dcs_agent_link_up").set(0.0);
            s.link = LinkState::Down;
        }
        s.last_error = Some(reason.to_owned());
        s.last_error_at = Some(now_rfc3339());
        s.retries += 1;
    }
}

fn now_rfc3339() -> String {
    dcs_shared::record::format_ts(dcs_shared::record::unix_micros(
        time::OffsetDateTime::now_utc(),
    ))
}

/// How one delivery attempt ended.
#[derive(Debug)]
enum Outcome {
    Delivered(BatchAck),
    /// Worth retrying after a delay; the link is down if `link_down`.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
        link_down: bool,
    },
    /// The aggregator does not accept this agent right now.
    Unauthorized(String),
    TooLarge(String),
    /// Refused for good. `per_record` when the aggregator blamed some of the
    /// batch's records (invalid or refused by PostgreSQL), so the others can
    /// still be delivered.
    Permanent {
        reason: String,
        per_record: bool,
    },
    /// These seqs' keys hold other records at the aggregator.
    Conflict {
        seqs: Vec<i64>,
        reason: String,
    },
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered(_) => "delivered",
            Outcome::Retry { .. } => "retry",
            Outcome::Unauthorized(_) => "unauthorized",
            Outcome::TooLarge(_) => "too_large",
            Outcome::Permanent { .. } => "rejected",
            Outcome::Conflict { .. } => "conflict",
        }
    }

    /// Worth sending again after a wait: the batch was not refused for good.
    fn is_retry(&self) -> bool {
        matches!(self, Outcome::Retry { .. } | Outcome::Unauthorized(_))
    }
}

/// The mutual-TLS client every forwarder of this process posts with,
/// replaceable while they run (certificate renewal). Cloning shares it.
#[derive(Clone, Debug)]
pub struct SharedClient(Arc<std::sync::RwLock<reqwest::Client>>);

impl SharedClient {
    pub fn new(client: reqwest::Client) -> Self {
        SharedClient(Arc::new(std::sync::RwLock::new(client)))
    }

    /// The client to use for the next request (a cheap handle).
    pub fn current(&self) -> reqwest::Client {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Makes `client` the one every later request uses. Requests already
    /// sent keep the old one until they finish; its idle connections close
    /// when the last handle is dropped.
    pub fn replace(&self, client: reqwest::Client) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = client;
    }
}

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

/// Builds the mutual-TLS HTTP client. Trusts only the DCS CA; uses the
/// configured proxy, else `HTTPS_PROXY`/`ALL_PROXY` from the environment.
pub fn http_client(config: &Config) -> Result<reqwest::Client, Error> {
    let agg = &config.aggregator;
    let tls = dcs_shared::tls::client_config(&agg.ca, &agg.cert, &agg.key)?;
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(agg.connect_timeout)
        .timeout(agg.request_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_while_idle(true)
        .no_proxy();
    let from_env = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
    if let Some(proxy) = agg.proxy.clone().or(from_env) {
        let proxy = reqwest::Proxy::all(&proxy)
            .map_err(Error::Http)?
            .no_proxy(reqwest::NoProxy::from_env());
        builder = builder.proxy(proxy);
    }
    builder.build().map_err(Error::Http)
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
        register_replay_metrics();
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

    /// Asks the aggregator, with an empty batch, how far it holds the
    /// current epoch, and moves to a new epoch if that is past this buffer.
    /// Retries like a batch; returns false if stopped first.
    async fn check_high_water(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max);
        loop {
            let epoch = self.buffer.epoch();
            let delay = match self.post(self.empty_batch(epoch)).await {
                Outcome::Delivered(ack) => {
                    self.link.up();
                    self.notice_high_water(epoch, ack.high_seq).await;
                    self.notice_replay(ack.replay).await;
                    return true;
                }
                other if other.is_retry() => self.wait_after(other, &mut backoff),
                // An aggregator that refuses empty batches predates the
                // high-water mark; batches still learn it from their answers.
                other => {
                    tracing::debug!(
                        message = "high-water check not answered",
                        outcome = other.label()
                    );
                    return true;
                }
            };
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return false,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// An answer says the aggregator holds `high_seq` of `epoch`: if this
    /// buffer has not handed that seq out yet, it went back in time, and new
    /// records must not reuse the seqs in between.
    async fn notice_high_water(&self, epoch: Uuid, high_seq: Option<i64>) {
        let Some(high_seq) = high_seq else { return };
        let next_seq = self.buffer.next_seq();
        if epoch != self.buffer.epoch() || high_seq < next_seq {
            return;
        }
        self.rotate(
            epoch,
            &format!(
                "the aggregator holds seq {high_seq} of epoch {epoch}, this buffer's next seq is {next_seq}"
            ),
        )
        .await;
    }

    async fn rotate(&self, from: Uuid, reason: &str) {
        match self.buffer.rotate_epoch(from, reason).await {
            Ok(to) if to != from => {
                metrics::counter!("dcs_agent_epoch_rotations_total").increment(1);
                tracing::warn!(
                    message = "buffer went back in time (snapshot revert, restored backup, lost WAL or power cut); continuing under a new epoch",
                    from = %from,
                    to = %to,
                    %reason
                );
            }
            Ok(_) => {}
            Err(error) => tracing::error!(message = "move buffer to a new epoch", %error),
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

    /// Delivers one batch until acknowledged, dead-lettered, or stopped.
    async fn deliver(self: Arc<Self>, batch: Vec<Buffered>, mut stop: watch::Receiver<bool>) {
        let mut pending = vec![batch];
        while let Some(batch) = pending.pop() {
            let (first, last) = (batch[0].seq, batch[batch.len() - 1].seq);
            let epoch = self.buffer.epochs().of(first);
            let body = {
                let me = self.clone();
                match tokio::task::spawn_blocking(move || (me.encode(&batch), batch)).await {
                    Ok(pair) => pair,
                    Err(_) => return,
                }
            };
            let (body, batch) = body;
            let mut backoff = Backoff::new(self.retry_initial, self.retry_max);
            loop {
                let started = std::time::Instant::now();
                let outcome = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    o = self.post(body.clone()) => o,
                };
                metrics::histogram!("dcs_agent_batch_send_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("dcs_agent_batches_sent_total", "outcome" => outcome.label())
                    .increment(1);
                let delay = match outcome {
                    Outcome::Delivered(ack) => {
                        self.link.success();
                        metrics::counter!("dcs_agent_sent_raw_bytes_total")
                            .increment(batch.iter().map(|r| r.payload.len() as u64).sum());
                        metrics::counter!("dcs_agent_sent_compressed_bytes_total")
                            .increment(body.len() as u64);
                        tracing::debug!(
                            message = "batch delivered",
                            first_seq = first,
                            last_seq = last,
                            accepted = ack.accepted,
                            duplicates = ack.duplicates
                        );
                        self.settle(&mut stop, |b| async move { b.ack(first, last).await })
                            .await;
                        self.notice_high_water(epoch, ack.high_seq).await;
                        self.notice_replay(ack.replay).await;
                        break;
                    }
                    Outcome::Conflict { seqs, reason } => {
                        // Seqs the aggregator named that are not in this
                        // batch say nothing about it: fall back to halving.
                        // Batches are in seq order, so both lookups below
                        // are binary searches.
                        let in_batch =
                            |seq: &i64| batch.binary_search_by_key(seq, |r| r.seq).is_ok();
                        let mut taken: Vec<i64> = seqs.into_iter().filter(in_batch).collect();
                        taken.sort_unstable();
                        let taken = if taken.is_empty() && batch.len() == 1 {
                            vec![first]
                        } else {
                            taken
                        };
                        if taken.is_empty() {
                            let mut batch = batch;
                            let upper = batch.split_off(batch.len() / 2);
                            pending.push(upper);
                            pending.push(batch);
                            break;
                        }
                        self.rotate(epoch, &reason).await;
                        let moved = taken.clone();
                        self.settle(&mut stop, move |b| {
                            let seqs = moved.clone();
                            async move { b.rekey(seqs).await }
                        })
                        .await;
                        metrics::counter!("dcs_agent_records_rekeyed_total")
                            .increment(taken.len() as u64);
                        tracing::warn!(
                            message = "records re-keyed into the new epoch: their keys hold other records at the aggregator",
                            records = taken.len(),
                            first_seq = taken[0],
                            %reason
                        );
                        let rest: Vec<Buffered> = batch
                            .into_iter()
                            .filter(|r| taken.binary_search(&r.seq).is_err())
                            .collect();
                        if !rest.is_empty() {
                            pending.push(rest);
                        }
                        break;
                    }
                    Outcome::TooLarge(reason)
                    | Outcome::Permanent {
                        reason,
                        per_record: true,
                    } if batch.len() > 1 => {
                        // Halving until the refused records stand alone costs
                        // about 2 log2(n) requests per bad record, and keeps
                        // one bad record from dead-lettering thousands of
                        // good ones.
                        tracing::warn!(
                            message = "aggregator refused batch; splitting it to isolate the cause",
                            first_seq = first,
                            last_seq = last,
                            %reason
                        );
                        let mut batch = batch;
                        let upper = batch.split_off(batch.len() / 2);
                        // Pop order sends the lower half first.
                        pending.push(upper);
                        pending.push(batch);
                        break;
                    }
                    Outcome::TooLarge(reason) | Outcome::Permanent { reason, .. } => {
                        tracing::error!(
                            message = "aggregator refused batch permanently; moved to dead letters",
                            first_seq = first,
                            last_seq = last,
                            %reason
                        );
                        self.link.failure(&reason, false);
                        let reason2 = reason.clone();
                        self.settle(&mut stop, move |b| {
                            let reason = reason2.clone();
                            async move { b.dead_letter(first, last, reason).await }
                        })
                        .await;
                        break;
                    }
                    Outcome::Unauthorized(reason) => {
                        tracing::warn!(message = "aggregator refused this agent; keeping data", %reason);
                        self.link.failure(&reason, true);
                        self.retry_max
                    }
                    Outcome::Retry {
                        reason,
                        retry_after,
                        link_down,
                    } => {
                        let d = self.retry_wait(&reason, retry_after, link_down, &mut backoff);
                        tracing::info!(
                            message = "delivery failed; will retry",
                            first_seq = first,
                            last_seq = last,
                            %reason,
                            retry_in_ms = d.as_millis() as u64
                        );
                        d
                    }
                };
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    /// Applies a buffer change after the aggregator's answer, retrying if the
    /// local disk refuses it (the records then simply stay and are resent).
    async fn settle<F, Fut>(&self, stop: &mut watch::Receiver<bool>, op: F)
    where
        F: Fn(Buffer) -> Fut,
        Fut: std::future::Future<Output = Result<u64, crate::buffer::BufferError>>,
    {
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max);
        loop {
            match op(self.buffer.clone()).await {
                Ok(_) => return,
                Err(error) => {
                    tracing::error!(message = "update buffer after delivery", %error);
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    async fn post(&self, body: Bytes) -> Outcome {
        let mut response = self.send(body.clone()).await;
        // The aggregator closes connections gracefully (max connection age,
        // drain before stop) so a balancer can move agents. A batch caught by
        // that close is resent at once on a new connection: it is not a
        // failure, so no retry is counted, no backoff taken, the link stays
        // up. The (agent, epoch, seq) key makes the resend harmless. Bounded,
        // so a replica that closes every connection is a failure again.
        for _ in 0..GRACEFUL_CLOSE_RESENDS {
            match &response {
                Err(e) if closed_gracefully(e) => {
                    tracing::debug!(message = "connection closed by the aggregator; resending on a new one", error = %error_chain(e));
                    metrics::counter!("dcs_agent_graceful_resends_total").increment(1);
                    response = self.send(body.clone()).await;
                }
                _ => break,
            }
        }
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Retry {
                    reason: format!("send batch: {}", error_chain(&e)),
                    retry_after: None,
                    link_down: true,
                };
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response.text().await.unwrap_or_default();
        if status.is_success() {
            // A 2xx means committed; an unreadable body does not change that.
            let ack = serde_json::from_str(&text).unwrap_or(BatchAck::new(0, 0));
            return Outcome::Delivered(ack);
        }
        let body = serde_json::from_str::<ErrorBody>(&text).ok();
        let (reason, per_record) = match &body {
            Some(body) => (
                format!("{status}: {}: {}", body.error, body.message),
                ErrorCode::parse(&body.error).is_some_and(ErrorCode::blames_records),
            ),
            None => (
                format!("{status}: {}", text.chars().take(200).collect::<String>()),
                false,
            ),
        };
        if let Some(body) = body
            && ErrorCode::parse(&body.error) == Some(ErrorCode::ContentConflict)
        {
            let seqs = body
                .details
                .iter()
                .filter(|d| d.field == "seq")
                .map(|d| d.index)
                .collect();
            return Outcome::Conflict { seqs, reason };
        }
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Outcome::Unauthorized(reason),
            StatusCode::PAYLOAD_TOO_LARGE => Outcome::TooLarge(reason),
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => Outcome::Retry {
                reason,
                retry_after,
                link_down: false,
            },
            s if s.is_server_error() => Outcome::Retry {
                reason,
                retry_after,
                link_down: false,
            },
            _ => Outcome::Permanent { reason, per_record },
        }
    }
}

/// Immediate resends of a batch whose connection the aggregator closed
/// gracefully; more in a row means something else is wrong.
const GRACEFUL_CLOSE_RESENDS: usize = 3;

impl Inner {
    async fn send(&self, body: Bytes) -> reqwest::Result<reqwest::Response> {
        self.client
            .current()
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::CONTENT_ENCODING, "gzip")
            .body(body)
            .send()
            .await
    }
}

/// Whether a send failed only because the server closed its connection on
/// purpose: an HTTP/2 GOAWAY without an error (or the stream it refused), or
/// an HTTP/1.1 connection closed after `Connection: close` before our request
/// got an answer. Timeouts, refused connections and TLS errors are not.
fn closed_gracefully(e: &reqwest::Error) -> bool {
    if e.is_timeout() || e.is_connect() {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = source {
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>()
            && (hyper.is_incomplete_message() || hyper.is_canceled())
        {
            return true;
        }
        // h2's errors are not reachable by type from here; their text is
        // stable: GOAWAY with NO_ERROR, and a stream refused before any
        // processing (both safe to resend by the protocol's definition).
        let text = cause.to_string();
        if text.contains("not a result of an error")
            || text.contains("refused stream before processing")
        {
            return true;
        }
        source = cause.source();
    }
    false
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

fn now_us() -> i64 {
    dcs_shared::record::unix_micros(time::OffsetDateTime::now_utc())
}

/// Replays of retained records ([`crate::replay`]).
impl Inner {
    /// An answer named a replay request: a new one is stored as pending and
    /// the replay task woken.
    async fn notice_replay(&self, replay: Option<wire::Replay>) {
        *self.last_answer.lock().expect("answer lock") = std::time::Instant::now();
        let Some(replay) = replay else { return };
        let started = {
            let mut guard = self.replay.lock().expect("replay lock");
            let Some(state) = guard.as_mut() else { return };
            let Some(pending) = state.begin(replay.id, replay.since_us) else {
                return;
            };
            state.pending = Some(pending);
            *state
        };
        if !self.retains {
            tracing::warn!(
                message = "the aggregator asks for a replay (its database was restored), but buffer.retain_delivered is 0: nothing delivered was kept to send again",
                replay_id = replay.id
            );
        } else {
            tracing::warn!(
                message = "the aggregator asks for a replay (its database was restored): sending retained records again",
                replay_id = replay.id,
                since_us = replay.since_us
            );
        }
        if let Err(error) = self.buffer.set_replay_state(started).await {
            tracing::error!(message = "store the replay state", %error);
        }
        self.replay_wake.notify_one();
    }

    /// Sends the pending replay's records, batch by batch, until none is
    /// left or `stop`; then waits for the next request.
    async fn run_replays(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let pending = self
                .replay
                .lock()
                .expect("replay lock")
                .and_then(|s| s.pending);
            let Some(pending) = pending else {
                let idle_for = self.last_answer.lock().expect("answer lock").elapsed();
                let next_beat = self.heartbeat.saturating_sub(idle_for);
                let beat = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    () = self.replay_wake.notified() => false,
                    () = tokio::time::sleep(next_beat) => true,
                };
                if beat && self.last_answer.lock().expect("answer lock").elapsed() >= self.heartbeat
                {
                    self.beat().await;
                }
                continue;
            };
            let buffer = self.buffer.clone();
            let (max_records, max_bytes) = (self.max_records, self.max_bytes);
            let batch = tokio::task::spawn_blocking(move || {
                buffer.read_retained(pending.after_seq, pending.since_us, max_records, max_bytes)
            })
            .await;
            let batch = match batch {
                Ok(Ok(batch)) => batch,
                Ok(Err(error)) => {
                    tracing::error!(message = "read retained records to replay", %error);
                    tokio::time::sleep(self.retry_max.min(Duration::from_secs(5))).await;
                    continue;
                }
                Err(_) => return,
            };
            let next = match batch.last() {
                None => crate::replay::State {
                    done: pending.id,
                    pending: None,
                },
                Some(last) => {
                    if !self.replay_batch(&batch, &mut stop).await {
                        return;
                    }
                    crate::replay::State {
                        done: self
                            .replay
                            .lock()
                            .expect("replay lock")
                            .map_or(0, |s| s.done),
                        pending: Some(crate::replay::Pending {
                            after_seq: last.seq,
                            ..pending
                        }),
                    }
                }
            };
            if next.pending.is_none() {
                tracing::info!(message = "replay complete", replay_id = pending.id);
            }
            // A newer request that arrived meanwhile wins.
            {
                let mut guard = self.replay.lock().expect("replay lock");
                if guard.and_then(|s| s.pending).map(|p| p.id) != Some(pending.id) {
                    continue;
                }
                *guard = Some(next);
            }
            if let Err(error) = self.buffer.set_replay_state(next).await {
                tracing::error!(message = "store the replay state", %error);
            }
        }
    }

    /// One empty batch, answered like any other (high-water mark, replay
    /// request); a failure waits for the next beat (the queue's own retries
    /// report the link).
    async fn beat(&self) {
        let epoch = self.buffer.epoch();
        match self.post(self.empty_batch(epoch)).await {
            Outcome::Delivered(ack) => {
                self.notice_high_water(epoch, ack.high_seq).await;
                self.notice_replay(ack.replay).await;
            }
            other => {
                // Not again before the next interval.
                *self.last_answer.lock().expect("answer lock") = std::time::Instant::now();
                tracing::debug!(message = "heartbeat not answered", outcome = other.label());
            }
        }
    }

    /// Sends one batch of retained records until answered for good; they
    /// stay retained whatever the answer. False if stopped first.
    async fn replay_batch(&self, batch: &[Buffered], stop: &mut watch::Receiver<bool>) -> bool {
        let body = self.encode(batch);
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max);
        loop {
            let outcome = tokio::select! {
                _ = stop.wait_for(|s| *s) => return false,
                o = self.post(body.clone()) => o,
            };
            let delay = match outcome {
                Outcome::Delivered(ack) => {
                    self.link.success();
                    metrics::counter!("dcs_agent_replayed_records_total", "outcome" => "restored")
                        .increment(ack.accepted);
                    metrics::counter!("dcs_agent_replayed_records_total", "outcome" => "duplicate")
                        .increment(ack.duplicates);
                    return true;
                }
                other if other.is_retry() => self.wait_after(other, &mut backoff),
                other => {
                    // Delivered once already; a refusal now (a conflict, a
                    // record the aggregator no longer accepts) is logged and
                    // the replay moves on.
                    metrics::counter!("dcs_agent_replayed_records_total", "outcome" => "refused")
                        .increment(batch.len() as u64);
                    tracing::warn!(
                        message = "replayed batch refused; skipped",
                        outcome = other.label(),
                        first_seq = batch[0].seq,
                        records = batch.len()
                    );
                    return true;
                }
            };
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return false,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

impl Inner {
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

    /// How long to wait after an answer worth retrying (see
    /// [`Outcome::is_retry`]), noting the link's state on the way.
    fn wait_after(&self, outcome: Outcome, backoff: &mut Backoff) -> Duration {
        match outcome {
            Outcome::Retry {
                reason,
                retry_after,
                link_down,
            } => self.retry_wait(&reason, retry_after, link_down, backoff),
            Outcome::Unauthorized(reason) => {
                self.link.failure(&reason, true);
                self.retry_max
            }
            _ => backoff.next_delay(),
        }
    }

    /// The next backoff delay, or the aggregator's Retry-After when longer
    /// (capped at `retry.max`); the failure is noted on the link.
    fn retry_wait(
        &self,
        reason: &str,
        retry_after: Option<Duration>,
        link_down: bool,
        backoff: &mut Backoff,
    ) -> Duration {
        self.link.failure(reason, link_down);
        let d = backoff.next_delay();
        retry_after.map_or(d, |ra| ra.min(self.retry_max).max(d))
    }
}

/// Exported at 0 from the start, so a dashboard shows a replay's first batch.
fn register_replay_metrics() {
    for outcome in ["restored", "duplicate", "refused"] {
        metrics::counter!("dcs_agent_replayed_records_total", "outcome" => outcome).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_stays_within_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..50 {
            let d = b.next_delay();
            let ceiling = Duration::from_millis(100)
                .saturating_mul(1 << attempt.min(20))
                .min(Duration::from_secs(2));
            assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
        }
    }

    #[test]
    fn backoff_is_jittered() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let delays: std::collections::HashSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 10, "delays are not spread: {delays:?}");
    }
}
