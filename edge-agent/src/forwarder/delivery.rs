//! One batch from its first POST until the buffer settles it: acked,
//! re-keyed into a new epoch, halved to isolate the records the aggregator
//! blames, dead-lettered, or kept and retried.
//!
//! Invariants: `ack(first, last)` deletes exactly the confirmed rows, only
//! after a 2xx; a transient failure is retried forever (401/403 at
//! `retry.max`); only a single record, or a batch the aggregator refused as
//! a whole, is dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::attempt::Outcome;
use super::{Backoff, Inner};
use crate::buffer::{Buffer, Buffered};

impl Inner {
    /// Delivers one batch until acknowledged, dead-lettered, or stopped.
    pub(super) async fn deliver(
        self: Arc<Self>,
        batch: Vec<Buffered>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut pending = vec![batch];
        while let Some(batch) = pending.pop() {
            // Halves split off before the stop are not encoded for nothing.
            if *stop.borrow() {
                return;
            }
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
                // No new attempt once stopping; but an attempt already on the
                // wire is not dropped at the signal: it may be committed, and
                // `run` gives it `retry.shutdown_grace` to be acknowledged
                // (and the buffer updated) before abandoning it.
                if *stop.borrow() {
                    return;
                }
                let started = std::time::Instant::now();
                let outcome = self.post(body.clone()).await;
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

    /// How long to wait after an answer worth retrying (see
    /// [`Outcome::is_retry`]), noting the link's state on the way.
    pub(super) fn wait_after(&self, outcome: Outcome, backoff: &mut Backoff) -> Duration {
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
