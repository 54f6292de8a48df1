//! Prometheus metrics plumbing shared by both tiers: one recorder per process,
//! histogram buckets chosen for our latencies, and process metrics read from
//! `/proc` at scrape time (so they cost nothing between scrapes).

use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock};

pub use metrics_exporter_prometheus::PrometheusHandle;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Latency buckets in seconds: from a local SQLite commit (sub-millisecond)
/// to a batch retried through a slow link (tens of seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder on first call and returns the handle
/// that renders the text exposition. Later calls (tests that start several
/// services in one process) share it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("non-empty buckets");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may exist only in tests that installed their own.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Renders every metric, refreshing the process metrics first.
pub fn render(handle: &PrometheusHandle) -> String {
    record_process_metrics();
    handle.render()
}

/// `process_*` metrics in the Prometheus client convention, from `/proc/self`.
pub fn record_process_metrics() {
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 (1-based) of the whole line.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
            if let (Some(u), Some(s)) = (ticks(11), ticks(12)) {
                // Linux reports in USER_HZ, which is 100 on every mainstream build.
                metrics::counter!("process_cpu_seconds_total").absolute(((u + s) / 100.0) as u64);
            }
            if let Some(rss_pages) = ticks(21) {
                metrics::gauge!("process_resident_memory_bytes").set(rss_pages * 4096.0);
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(dir.count() as f64);
    }
}

/// Bounds a label's distinct values: the first `limit` values seen are kept,
/// later ones become `"other"`, so a producer inventing stream names cannot
/// blow up the series count.
pub struct LabelCap {
    limit: usize,
    seen: Mutex<BTreeSet<String>>,
}

impl LabelCap {
    pub const fn new(limit: usize) -> LabelCap {
        LabelCap {
            limit,
            seen: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn label(&self, value: &str) -> String {
        let mut seen = self.seen.lock().expect("label cap lock");
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() < self.limit {
            seen.insert(value.to_owned());
            return value.to_owned();
        }
        "other".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_cap_folds_new_values_into_other() {
        let cap = LabelCap::new(2);
        assert_eq!(cap.label("a"), "a");
        assert_eq!(cap.label("b"), "b");
        assert_eq!(cap.label("c"), "other");
        assert_eq!(cap.label("a"), "a");
    }
}
