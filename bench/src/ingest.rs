//! The ingest steps: the agent acking to disk with the aggregator
//! unreachable, for NDJSON, OTLP/HTTP protobuf and syslog over TCP.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use dcs_tests::process::free_port;

use crate::bodies::{Bodies, push_all};
use crate::meter::{CpuPerRecord, Meter, kib_to_mb, percentile, sorted};
use crate::results::{IngestResult, SyslogResult};
use crate::sys;
use crate::world::{World, delivery_timeout, start_agent};

/// 3. Edge ingest with the aggregator unreachable: only acking to disk.
pub(crate) async fn step_ingest(
    w: &World,
    bodies: &Bodies,
    durability: &str,
) -> anyhow::Result<IngestResult> {
    step_ingest_of(w, durability, bodies, "ingest").await
}

/// Like [`step_ingest`], with `bodies` (NDJSON or OTLP) under `name`.
pub(crate) async fn step_ingest_of(
    w: &World,
    durability: &str,
    bodies: &Bodies,
    name: &str,
) -> anyhow::Result<IngestResult> {
    // Nothing listens on this port: the forwarder fails fast and backs off.
    let dead_port = free_port();
    let mut agent = w.agent_service(&format!("{name}-{durability}"), dead_port, durability);
    let url = start_agent(&mut agent).await?;
    let pid = agent.pid().context("agent pid")?;
    let meter = Meter::start(Some(pid), None);
    let pushed = push_all(&url, bodies, w.args.clients).await?;
    let usage = meter.stop();
    let peak = kib_to_mb(sys::peak_rss_kib(pid));
    agent.kill();
    w.remove_buffer(&format!("{name}-{durability}"));
    let lat = sorted(pushed.latencies_ms);
    Ok(IngestResult {
        durability: durability.to_owned(),
        records: bodies.records,
        secs: pushed.secs,
        records_per_s: bodies.records as f64 / pushed.secs,
        request_p50_ms: percentile(&lat, 50.0),
        request_p99_ms: percentile(&lat, 99.0),
        agent_peak_rss_mb: peak,
        cpu: CpuPerRecord::of(&usage, bodies.records),
        usage,
    })
}

/// 2b. Syslog ingest: `--clients` TCP connections stream octet-counted
/// RFC 5424 messages (the data set's payloads as message text) into a
/// syslog listener; timed until the agent has committed all of them
/// (`dcs_agent_syslog_messages_accepted_total`), the aggregator unreachable
/// as in the NDJSON ingest step.
pub(crate) async fn step_syslog(
    w: &World,
    durability: &str,
    n: u64,
) -> anyhow::Result<SyslogResult> {
    let dead_port = free_port();
    let syslog_port = free_port();
    let name = format!("syslog-{durability}");
    let listener = format!(
        "[{{ name = \"bench\", protocol = \"tcp\", listen = \"127.0.0.1:{syslog_port}\", stream = \"bench.${{appname}}\" }}]"
    );
    let mut agent = w.agent_service_with(&name, dead_port, durability, &[("SYSLOG", listener)]);
    let url = start_agent(&mut agent).await?;
    let pid = agent.pid().context("agent pid")?;
    let connections = w.args.clients.max(1);
    // Each connection's whole stream, built before the clock starts.
    let streams: Vec<Vec<u8>> = (0..connections as u64)
        .map(|c| {
            let mut bytes = Vec::new();
            let mut k = c;
            while k < n {
                // The record's payload as the message text: the same
                // bytes per message as the NDJSON step carries per record.
                let record = w.generator.record(k);
                let text = format!(
                    "<14>1 2026-12-06T00:00:00.000000Z bench-host app{} {k} - - {}",
                    k % 4,
                    record.payload
                );
                bytes.extend_from_slice(format!("{} ", text.len()).as_bytes());
                bytes.extend_from_slice(text.as_bytes());
                k += connections as u64;
            }
            bytes
        })
        .collect();
    let meter = Meter::start(Some(pid), None);
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for bytes in streams {
        let address = format!("127.0.0.1:{syslog_port}");
        senders.spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let mut stream = tokio::net::TcpStream::connect(&address).await?;
            stream.write_all(&bytes).await?;
            stream.shutdown().await?;
            anyhow::Ok(())
        });
    }
    while let Some(sent) = senders.join_next().await {
        sent??;
    }
    let deadline = Instant::now() + delivery_timeout(n);
    loop {
        let accepted = dcs_tests::agent::metric_sample(
            &url,
            "dcs_agent_syslog_messages_accepted_total",
            &[("listener", "bench")],
        )
        .await
        .unwrap_or(0.0) as u64;
        if accepted >= n {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "syslog step: only {accepted} of {n} messages committed; log:\n{}",
            agent.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let usage = meter.stop();
    let peak = kib_to_mb(sys::peak_rss_kib(pid));
    agent.kill();
    w.remove_buffer(&name);
    Ok(SyslogResult {
        durability: durability.to_owned(),
        messages: n,
        connections,
        secs,
        messages_per_s: n as f64 / secs,
        agent_peak_rss_mb: peak,
        usage,
    })
}
