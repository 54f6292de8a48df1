//! The producers' side: the data set as request bodies (NDJSON or OTLP),
//! cached when small enough, and their concurrent push to an agent.
//!
//! Invariant: a large data set is generated while it is sent, a small one
//! before any timing, so the generator's CPU stays out of small figures.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;

use crate::otlp;
use crate::records::Generator;

/// Data sets up to this many raw bytes are generated once, before any timing;
/// larger ones are generated while they are sent.
/// 2 GiB: a 20-second ingest step at 350,000 records/s is 7M records (1.4 GB);
/// generating them while sending would put the generator's CPU into the figure.
pub(crate) const CACHE_LIMIT: u64 = 2 << 30;

/// The request bodies of the data set: generated once up front when small
/// enough, else on demand.
#[derive(Clone)]
pub(crate) struct Bodies {
    pub(crate) generator: Generator,
    pub(crate) records: u64,
    pub(crate) per_request: u64,
    pub(crate) cache: Option<Arc<Vec<Bytes>>>,
    /// OTLP protobuf for `/v1/logs` instead of NDJSON for `/v1/records`.
    pub(crate) otlp: bool,
}

impl Bodies {
    pub(crate) fn new(generator: Generator, records: u64, per_request: u64) -> (Bodies, f64) {
        let mut b = Bodies {
            generator,
            records,
            per_request,
            cache: None,
            otlp: false,
        };
        // Raw size from a sample, to decide whether to cache.
        let sample = records.min(1000);
        let raw: u64 = (0..sample)
            .map(|i| generator.record(i).line.len() as u64)
            .sum();
        let raw_per_record = raw as f64 / sample.max(1) as f64;
        if (raw_per_record * records as f64) as u64 <= CACHE_LIMIT {
            b.cache = Some(Arc::new((0..b.count()).map(|k| b.generate(k)).collect()));
        }
        (b, raw_per_record)
    }

    pub(crate) fn count(&self) -> u64 {
        self.records.div_ceil(self.per_request)
    }

    /// The first `n` records (a whole number of requests, see [`Sizes`]),
    /// sharing the cache.
    pub(crate) fn prefix(&self, n: u64) -> Bodies {
        debug_assert!(n <= self.records && n.is_multiple_of(self.per_request));
        Bodies {
            records: n.min(self.records),
            ..self.clone()
        }
    }

    pub(crate) fn generate(&self, k: u64) -> Bytes {
        let start = k * self.per_request;
        let end = (start + self.per_request).min(self.records);
        if self.otlp {
            Bytes::from(otlp::request(&self.generator, start, end))
        } else {
            Bytes::from(self.generator.ndjson(start, end).0)
        }
    }

    /// The same records as OTLP protobuf log batches, cached like these.
    pub(crate) fn as_otlp(&self) -> Bodies {
        let mut b = Bodies {
            otlp: true,
            cache: None,
            ..self.clone()
        };
        if self.cache.is_some() {
            b.cache = Some(Arc::new((0..b.count()).map(|k| b.generate(k)).collect()));
        }
        b
    }

    pub(crate) fn path_and_type(&self) -> (&'static str, &'static str) {
        if self.otlp {
            ("/v1/logs", "application/x-protobuf")
        } else {
            ("/v1/records", "application/x-ndjson")
        }
    }

    pub(crate) fn get(&self, k: u64) -> Bytes {
        match &self.cache {
            Some(c) => c[k as usize].clone(),
            None => self.generate(k),
        }
    }
}

pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("HTTP client")
}

pub(crate) struct PushStats {
    pub(crate) secs: f64,
    pub(crate) latencies_ms: Vec<f64>,
}

/// Sends every body to the agent from `clients` concurrent connections;
/// fails on any non-2xx answer.
pub(crate) async fn push_all(
    agent_url: &str,
    bodies: &Bodies,
    clients: usize,
) -> anyhow::Result<PushStats> {
    let next = Arc::new(AtomicU64::new(0));
    let (path, content_type) = bodies.path_and_type();
    let url = format!("{agent_url}{path}");
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients.max(1) {
        let (next, url, bodies) = (next.clone(), url.clone(), bodies.clone());
        tasks.spawn(async move {
            let client = http_client();
            let mut latencies = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= bodies.count() {
                    return anyhow::Ok(latencies);
                }
                let body = bodies.get(k);
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .header("content-type", content_type)
                    .body(body)
                    .send()
                    .await
                    .with_context(|| format!("POST request {k} to the agent"))?;
                let status = response.status();
                if !status.is_success() {
                    let text = response.text().await.unwrap_or_default();
                    bail!("agent answered {status} to request {k}: {text}");
                }
                if bodies.otlp {
                    otlp::check_fully_accepted(&response.bytes().await?, k)?;
                }
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
        });
    }
    let mut latencies_ms = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies_ms.extend(done.context("producer task")??);
    }
    Ok(PushStats {
        secs: t0.elapsed().as_secs_f64(),
        latencies_ms,
    })
}
