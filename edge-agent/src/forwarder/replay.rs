//! The forwarder's side of a replay ([`crate::replay`]): an answer naming
//! a replay request starts one, and a task resends the retained records
//! batch by batch; the same task sends the heartbeat of an idle agent.
//!
//! Invariants: a replay acks nothing and changes no key (its records stay
//! retained whatever the answer); a newer request replaces one in progress.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use dcs_shared::wire;

use super::attempt::Outcome;
use super::{Backoff, Inner};
use crate::buffer::Buffered;

impl Inner {
    /// An answer named a replay request: a new one is stored as pending and
    /// the replay task woken.
    pub(super) async fn notice_replay(&self, replay: Option<wire::Replay>) {
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
    pub(super) async fn run_replays(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
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

/// Exported at 0 from the start, so a dashboard shows a replay's first batch.
pub(super) fn register_metrics() {
    for outcome in ["restored", "duplicate", "refused"] {
        metrics::counter!("dcs_agent_replayed_records_total", "outcome" => outcome).increment(0);
    }
}
