//! Producers: NDJSON requests of unique ids pushed to the agent, each answer
//! noted in the ledger.
//!
//! Invariant: a request without a definitive answer is retried with the same
//! ids, so every id ends acknowledged, refused or (past the deadline)
//! unknown, never silently forgotten.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Ledger, Plan, STREAM};

/// One producer: pushes NDJSON requests of unique ids until `until`. A request
/// without a definitive answer (the agent died mid-request) is retried with
/// the same ids, which the agent deduplicates, so every id ends acknowledged
/// or refused.
pub async fn produce(
    url: String,
    producer: usize,
    plan: Plan,
    until: Instant,
    ledger: Arc<Ledger>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut next = 0usize;
    while Instant::now() < until {
        let ids: Vec<String> = (next..next + plan.chunk)
            .map(|i| format!("p{producer}-{i}"))
            .collect();
        next += plan.chunk;
        let body: String = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                format!(
                    "{{\"stream\":\"{STREAM}\",\"id\":\"{id}\",\"payload\":{{\"producer\":{producer},\"n\":{i},\"note\":\"chaos record\"}}}}\n"
                )
            })
            .collect();
        let give_up = until + Duration::from_secs(60);
        loop {
            let answer = client
                .post(format!("{url}/v1/records"))
                .header("content-type", "application/x-ndjson")
                .body(body.clone())
                .send()
                .await;
            match answer {
                Ok(r) if r.status().is_success() => {
                    ledger
                        .acked
                        .lock()
                        .expect("ledger")
                        .extend(ids.iter().cloned());
                    break;
                }
                Ok(r) if r.status().is_client_error() || r.status().is_server_error() => {
                    ledger
                        .refused
                        .lock()
                        .expect("ledger")
                        .extend(ids.iter().cloned());
                    break;
                }
                _ if Instant::now() > give_up => {
                    ledger
                        .unknown
                        .lock()
                        .expect("ledger")
                        .extend(ids.iter().cloned());
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        tokio::time::sleep(plan.pace).await;
    }
}

/// Pushes exactly `count` records (in requests of `chunk`) as producer `producer`.
pub(super) async fn produce_count(
    url: String,
    producer: usize,
    chunk: usize,
    count: usize,
    ledger: Arc<Ledger>,
) {
    for offset in (0..count).step_by(chunk) {
        produce_offset(&url, producer, chunk.min(count - offset), offset, &ledger).await;
    }
}

/// One request of `chunk` records starting at `offset` (same id scheme as
/// [`produce`]), retried until the agent gives a definitive answer.
async fn produce_offset(url: &str, producer: usize, chunk: usize, offset: usize, ledger: &Ledger) {
    let client = reqwest::Client::new();
    let ids: Vec<String> = (offset..offset + chunk)
        .map(|i| format!("p{producer}-{i}"))
        .collect();
    let body: String = ids
        .iter()
        .map(|id| {
            format!(
                "{{\"stream\":\"{STREAM}\",\"id\":\"{id}\",\"payload\":{{\"producer\":{producer},\"note\":\"backlog record with some text\"}}}}\n"
            )
        })
        .collect();
    for _ in 0..100 {
        match client
            .post(format!("{url}/v1/records"))
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                ledger.acked.lock().expect("ledger").extend(ids);
                return;
            }
            Ok(_) => {
                ledger.refused.lock().expect("ledger").extend(ids);
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    ledger.unknown.lock().expect("ledger").extend(ids);
}
