//! The forwarder's half of the epoch rule ([`crate::epochs`]): the
//! aggregator's high-water mark checked before the first batch and in every
//! answer, and the move to a new epoch when this buffer went back in time.
//!
//! Invariant: a seq the aggregator already holds under the current epoch is
//! never sent again under it.

use tokio::sync::watch;
use uuid::Uuid;

use super::attempt::Outcome;
use super::{Backoff, Inner};

impl Inner {
    /// Asks the aggregator, with an empty batch, how far it holds the
    /// current epoch, and moves to a new epoch if that is past this buffer.
    /// Retries like a batch; returns false if stopped first.
    pub(super) async fn check_high_water(&self, stop: &mut watch::Receiver<bool>) -> bool {
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
    pub(super) async fn notice_high_water(&self, epoch: Uuid, high_seq: Option<i64>) {
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

    pub(super) async fn rotate(&self, from: Uuid, reason: &str) {
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
}
