//! Every counter docs/OBSERVABILITY.md lists for the agent, exported at 0 when
//! the agent starts. A counter that first appears with its first increment
//! hides that event from `increase()` and `rate()` (there is no earlier
//! sample to compare with) and leaves dashboards at "No data" instead of 0.
//!
//! Label values are the closed sets the code uses; the only series that
//! still appear with traffic are those labelled with producer data
//! (`dcs_agent_records_received_total{stream}`) and request routes and
//! statuses beyond the ingest route's 200.

use crate::sources::SourceConfig;

/// Every value of `dcs_agent_batches_sent_total{outcome}` (see the
/// forwarder's `Outcome::label`).
pub(crate) const BATCH_OUTCOMES: [&str; 6] = [
    "delivered",
    "retry",
    "unauthorized",
    "too_large",
    "rejected",
    "conflict",
];

/// Counters without labels.
const PLAIN: [&str; 11] = [
    "dcs_agent_request_body_timeouts_total",
    "dcs_agent_epoch_rotations_total",
    "dcs_agent_records_rekeyed_total",
    "dcs_agent_delivery_retries_total",
    "dcs_agent_graceful_resends_total",
    "dcs_agent_sent_raw_bytes_total",
    "dcs_agent_sent_compressed_bytes_total",
    "dcs_agent_buffer_quarantines_total",
    "dcs_agent_buffer_salvaged_records_total",
    "dcs_agent_buffer_unsalvageable_records_total",
    "dcs_agent_buffer_unreadable_records_total",
];

/// Call once the recorder is installed, before serving.
pub(crate) fn register(sources: &[SourceConfig]) {
    for name in PLAIN {
        metrics::counter!(name).increment(0);
    }
    for outcome in BATCH_OUTCOMES {
        metrics::counter!("dcs_agent_batches_sent_total", "outcome" => outcome).increment(0);
    }
    for outcome in ["ok", "failed"] {
        metrics::counter!("dcs_agent_cert_renewals_total", "outcome" => outcome).increment(0);
    }
    metrics::counter!("dcs_agent_records_dropped_total", "reason" => "drop_oldest").increment(0);
    metrics::counter!("dcs_agent_records_delivered_total").increment(0);
    metrics::counter!("dcs_agent_requests_total", "route" => "/v1/records", "status" => "200")
        .increment(0);
    metrics::counter!("dcs_agent_requests_total", "route" => "/v1/logs", "status" => "200")
        .increment(0);
    for reason in ["too_large", "corrupt"] {
        metrics::counter!("dcs_agent_decompression_refused_total", "reason" => reason).increment(0);
    }
    for source in sources {
        let name = source.name.clone();
        for state in ["succeeded", "failed"] {
            metrics::counter!("dcs_agent_source_runs_total", "source" => name.clone(), "state" => state)
                .increment(0);
        }
        for result in ["collected", "rejected"] {
            metrics::counter!("dcs_agent_source_records_total", "source" => name.clone(), "result" => result)
                .increment(0);
        }
        metrics::counter!("dcs_agent_source_errors_total", "source" => name).increment(0);
    }
}
