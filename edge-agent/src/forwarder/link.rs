//! The link to the aggregator as operators see it in `/v1/status` and the
//! `dcs_agent_link_up` and `dcs_agent_last_delivery_*` metrics.
//!
//! Invariant: only the forwarder changes it, and only after an answer (or a
//! failed attempt); the API reads a consistent snapshot.

use std::sync::Mutex;

use serde::Serialize;

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

    pub(super) fn success(&self) {
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
    pub(super) fn up(&self) {
        metrics::gauge!("dcs_agent_link_up").set(1.0);
        self.0.lock().expect("link lock").link = LinkState::Up;
    }

    pub(super) fn failure(&self, reason: &str, link_down: bool) {
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
