//! Producers: NDJSON requests of unique ids pushed to the agent, each answer
//! noted in the ledger.
//!
//! Invariant: a request without a definitive answer is retried with the same
//! ids, so every id ends acknowledged, refused or (past the deadline)
//! unknown, never silently forgotten.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{Ledger, Plan, STREAM};

/// One NDJSON request: records `p{producer}-{i}` for each `i` of a range.
pub struct Request {
    ids: Vec<String>,
    body: String,
}

impl Request {
    /// Records `p{producer}-{i}` for `i` in `range`; `note` says which
    /// scenario wrote them, in each payload.
    pub fn new(producer: usize, range: Range<usize>, note: &str) -> Self {
        let ids: Vec<String> = range.map(|i| format!("p{producer}-{i}")).collect();
        let body = ids
            .iter()
            .enumerate()
            .map(|(n, id)| {
                format!(
                    "{{\"stream\":\"{STREAM}\",\"id\":\"{id}\",\"payload\":{{\"producer\":{producer},\"n\":{n},\"note\":\"{note}\"}}}}\n"
                )
            })
            .collect();
        Self { ids, body }
    }

    /// Sends the request until the agent answers it or `give_up` passes,
    /// `retry` apart, and notes the answer in `ledger`: a 2xx acknowledged,
    /// any other status refused, no answer at all unknown. The agent
    /// deduplicates the ids a retry repeats.
    pub async fn push(
        &self,
        client: &reqwest::Client,
        url: &str,
        give_up: Instant,
        retry: Duration,
        ledger: &Ledger,
    ) {
        loop {
            let answer = client
                .post(format!("{url}/v1/records"))
                .header("content-type", "application/x-ndjson")
                .body(self.body.clone())
                .send()
                .await;
            match answer {
                Ok(r) if r.status().is_success() => return ledger.add_acked(&self.ids),
                Ok(_) => return ledger.add_refused(&self.ids),
                Err(_) if Instant::now() > give_up => return ledger.add_unknown(&self.ids),
                Err(_) => tokio::time::sleep(retry).await,
            }
        }
    }
}

/// One producer: pushes requests of `plan.chunk` unique ids until `until`,
/// `plan.pace` apart.
pub async fn produce(
    url: String,
    producer: usize,
    plan: Plan,
    until: Instant,
    ledger: Arc<Ledger>,
) {
    let (_fixed, until) = watch::channel(until);
    produce_until(url, producer, plan, until, ledger).await
}

/// As [`produce`], with an end the scenario may bring forward once it has
/// seen what it waits for (a failover's recovery, say), so the load lasts
/// as long as the proof needs and no longer.
pub async fn produce_until(
    url: String,
    producer: usize,
    plan: Plan,
    until: watch::Receiver<Instant>,
    ledger: Arc<Ledger>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut next = 0usize;
    loop {
        let end = *until.borrow();
        if Instant::now() >= end {
            break;
        }
        let request = Request::new(producer, next..next + plan.chunk, "chaos record");
        next += plan.chunk;
        let give_up = end + Duration::from_secs(60);
        request
            .push(&client, &url, give_up, Duration::from_millis(100), &ledger)
            .await;
        tokio::time::sleep(plan.pace).await;
    }
}

/// Pushes exactly `count` records (in requests of `chunk`) as producer
/// `producer`; each request is given up after 10 s without an answer.
pub(super) async fn produce_count(
    url: String,
    producer: usize,
    chunk: usize,
    count: usize,
    ledger: Arc<Ledger>,
) {
    let client = reqwest::Client::new();
    for offset in (0..count).step_by(chunk) {
        let end = count.min(offset + chunk);
        let give_up = Instant::now() + Duration::from_secs(10);
        Request::new(producer, offset..end, "backlog record with some text")
            .push(&client, &url, give_up, Duration::from_millis(100), &ledger)
            .await;
    }
}
