//! The steps through the whole pipeline: end to end, the backlog drain, and
//! batch ack latency at a paced rate straight to the aggregator.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;

use dcs_shared::wire;
use dcs_tests::process::free_port;

use crate::bodies::{Bodies, push_all};
use crate::meter::{CpuPerRecord, Meter, ProcSample, Sampler, kib_to_mb, percentile, sorted};
use crate::results::{DrainResult, E2eResult, LatencyResult, ServerActivity};
use crate::wire_bytes::encode;
use crate::world::{World, delivery_timeout, start_agent, wait_for_rows};
use crate::{progress, sys};

/// Records per pre-encoded batch in the latency step.
const LATENCY_BATCH: usize = 1_000;
/// Requests sent (unmeasured) before the latency measurement starts.
const LATENCY_WARMUP: usize = 3;

/// 4. End to end: producers → agent → aggregator → PostgreSQL.
pub(crate) async fn step_e2e(
    w: &World,
    bodies: &Bodies,
    copy_rate: Option<f64>,
) -> anyhow::Result<E2eResult> {
    let db = w.database().await?;
    let agg_port = free_port();
    let mut aggregator = w.aggregator_service("e2e-aggregator", agg_port, &db.url);
    aggregator.start().await;
    let mut agent = w.agent_service("e2e-agent", agg_port, "process-crash");
    let url = start_agent(&mut agent).await?;
    let (agent_pid, agg_pid) = (
        agent.pid().context("agent pid")?,
        aggregator.pid().context("aggregator pid")?,
    );
    let n = bodies.records;
    progress(&format!(
        "e2e: agent pid {agent_pid}, aggregator pid {agg_pid}"
    ));
    // Idle: started, connected to nothing yet, no traffic; settled for 2 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agent_idle = ProcSample::take(agent_pid);
    let perf = match &w.args.perf_dir {
        Some(dir) => Some(start_perf(dir, "e2e")?),
        None => None,
    };
    let meter = Meter::start(Some(agent_pid), Some(agg_pid)).with_db(db.name());
    let sampler = Sampler::start(agent_pid);
    let t0 = Instant::now();
    let pool = db.pool.clone();
    let waiter = tokio::spawn(async move { wait_for_rows(&pool, n, delivery_timeout(n)).await });
    let pushed = push_all(&url, bodies, w.args.clients).await;
    let committed = waiter.await.context("waiter")?;
    let usage = meter.stop();
    let agent_busy = sampler.finish().await;
    if let Some(perf) = perf {
        stop_perf(perf);
    }
    let (pushed, committed) = match (pushed, committed) {
        (Ok(p), Ok(c)) => (p, c),
        (Err(e), _) | (_, Err(e)) => {
            bail!(
                "{e:#}\nagent log:\n{}\naggregator log:\n{}",
                agent.log_tail(),
                aggregator.log_tail()
            )
        }
    };
    let secs = committed.duration_since(t0).as_secs_f64();
    let result = E2eResult {
        records: n,
        secs,
        ingest_secs: pushed.secs,
        records_per_s: n as f64 / secs,
        ratio_to_copy: copy_rate.map(|c| n as f64 / secs / c),
        agent_peak_rss_mb: kib_to_mb(sys::peak_rss_kib(agent_pid)),
        aggregator_peak_rss_mb: kib_to_mb(sys::peak_rss_kib(agg_pid)),
        agent_idle,
        agent_busy,
        cpu: CpuPerRecord::of(&usage, n),
        usage,
    };
    agent.kill();
    aggregator.kill();
    w.remove_buffer("e2e-agent");
    drop(db);
    Ok(result)
}

/// Starts `perf record` on the whole machine, writing DIR/NAME.perf.data.
fn start_perf(dir: &Path, name: &str) -> anyhow::Result<std::process::Child> {
    std::fs::create_dir_all(dir)?;
    let out = dir.join(format!("{name}.perf.data"));
    let child = std::process::Command::new("perf")
        .args(["record", "-e", "cpu-clock", "-F", "499", "-a", "-g", "-o"])
        .arg(&out)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("start perf (apt-get install linux-perf)")?;
    // perf needs a moment before it samples.
    std::thread::sleep(Duration::from_millis(500));
    progress(&format!("perf recording to {}", out.display()));
    Ok(child)
}

/// SIGINT makes perf write its file and exit.
fn stop_perf(mut perf: std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    let _ = perf.wait();
}

/// Step 5, backlog drain: all records buffered while the aggregator is down, then
/// the time to deliver them once it is up.
pub(crate) async fn step_drain(w: &World, bodies: &Bodies) -> anyhow::Result<DrainResult> {
    let db = w.database().await?;
    let agg_port = free_port();
    let mut agent = w.agent_service("drain-agent", agg_port, "process-crash");
    let url = start_agent(&mut agent).await?;
    let agent_pid = agent.pid().context("agent pid")?;
    let pushed = push_all(&url, bodies, w.args.clients).await?;
    let lifetime_before = sys::peak_rss_kib(agent_pid);
    let reset = sys::reset_peak_rss(agent_pid);
    let n = bodies.records;
    let mut aggregator = w.aggregator_service("drain-aggregator", agg_port, &db.url);
    let mut meter = Meter::start(Some(agent_pid), None).with_db(db.name());
    let sampler = Sampler::start(agent_pid);
    let spawned = Instant::now();
    aggregator.start().await;
    // From here the aggregator accepts connections; the agent notices at its
    // next retry (retry.max is 100 ms here).
    let t0 = Instant::now();
    meter.add_aggregator(aggregator.pid().context("aggregator pid")?);
    let committed = match wait_for_rows(&db.pool, n, delivery_timeout(n)).await {
        Ok(c) => c,
        Err(e) => bail!(
            "{e:#}\nagent log:\n{}\naggregator log:\n{}",
            agent.log_tail(),
            aggregator.log_tail()
        ),
    };
    let usage = meter.stop();
    let agent_busy = sampler.finish().await;
    let secs = committed.duration_since(t0).as_secs_f64();
    let drain_peak = sys::peak_rss_kib(agent_pid);
    let result = DrainResult {
        records: n,
        secs,
        records_per_s: n as f64 / secs,
        agent_peak_rss_mb: if reset { kib_to_mb(drain_peak) } else { None },
        agent_peak_rss_mb_lifetime: kib_to_mb(lifetime_before.max(drain_peak)),
        fill_secs: pushed.secs,
        aggregator_start_secs: t0.duration_since(spawned).as_secs_f64(),
        agent_busy,
        cpu: CpuPerRecord::of(&usage, n),
        usage,
    };
    agent.kill();
    aggregator.kill();
    w.remove_buffer("drain-agent");
    drop(db);
    Ok(result)
}

/// 6. Batch ack latency at a paced rate, straight to the aggregator over mTLS.
pub(crate) async fn step_latency(w: &World, rate: f64) -> anyhow::Result<LatencyResult> {
    let db = w.database().await?;
    let port = free_port();
    let mut aggregator = w.aggregator_service("latency-aggregator", port, &db.url);
    aggregator.start().await;
    let client = dcs_tests::aggregator::agent_client(&w.pki.agent("bench", "latency-1"));
    let url = format!("https://localhost:{port}{}", wire::BATCHES_PATH);

    let batches_per_s = rate / LATENCY_BATCH as f64;
    // Not capped by --records: the batches are generated here, and a p99 of
    // the default run's 200 batches was just its second-slowest, which one
    // start-up hiccup decided. A whole --latency-secs gives about 900.
    let measured =
        ((batches_per_s * w.args.latency_secs.unwrap_or(w.args.duration)).ceil() as usize).max(30);
    let total = measured + LATENCY_WARMUP;
    let (generator, level) = (w.generator, w.args.compression_level());
    let epoch = uuid::Uuid::new_v4();
    let bodies: Vec<Bytes> = tokio::task::spawn_blocking(move || {
        (0..total)
            .map(|k| {
                let recs: Vec<_> = (k * LATENCY_BATCH..(k + 1) * LATENCY_BATCH)
                    .map(|i| (i as i64 + 1, generator.record(i as u64)))
                    .collect();
                Bytes::from(encode(epoch, &recs, level))
            })
            .collect()
    })
    .await?;
    let post = |body: Bytes| {
        client
            .post(&url)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(body)
            .send()
    };
    for body in &bodies[..LATENCY_WARMUP] {
        let r = post(body.clone()).await?;
        ensure!(r.status().is_success(), "warm-up batch: {}", r.status());
    }
    let interval = Duration::from_secs_f64(1.0 / batches_per_s);
    // Counters are best effort: a server that hides them still gets measured.
    let server_before = ServerActivity::snapshot(&w.pg_admin).await.ok();
    let meter = Meter::start(None, aggregator.pid()).with_db(db.name());
    let t0 = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (k, body) in bodies[LATENCY_WARMUP..].iter().enumerate() {
        let scheduled = t0 + interval * k as u32;
        tokio::time::sleep_until(scheduled).await;
        let request = post(body.clone());
        // Open loop: latency counts from the scheduled send time, so a slow
        // answer cannot hide the queueing it causes behind it.
        tasks.spawn(async move {
            let ok = match request.await {
                Ok(r) => r.status().is_success(),
                Err(_) => false,
            };
            (k, ok, scheduled.elapsed().as_secs_f64() * 1000.0)
        });
    }
    let mut latencies = Vec::with_capacity(measured);
    let mut series = vec![f64::NAN; measured];
    let mut errors = 0;
    while let Some(done) = tasks.join_next().await {
        let (k, ok, ms) = done?;
        if ok {
            latencies.push(ms);
            series[k] = ms;
        } else {
            errors += 1;
        }
    }
    if let Some(dir) = &w.args.perf_dir {
        // With --perf-dir, keep the aggregator log (server-side times at debug).
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::copy(
            w.dir.path().join("latency-aggregator.log"),
            dir.join("latency-aggregator.log"),
        );
    }
    let usage = meter.stop();
    let server = match server_before {
        Some(before) => ServerActivity::snapshot(&w.pg_admin)
            .await
            .ok()
            .map(|after| after.since(&before)),
        None => None,
    };
    aggregator.kill();
    drop(db);
    let mean = latencies.iter().sum::<f64>() / latencies.len().max(1) as f64;
    let slow_batches = latencies.iter().filter(|&&ms| ms > 50.0).count();
    let lat = sorted(latencies);
    Ok(LatencyResult {
        target_records_per_s: rate,
        batch_records: LATENCY_BATCH,
        batches: measured,
        p50_ms: percentile(&lat, 50.0),
        p90_ms: percentile(&lat, 90.0),
        p99_ms: percentile(&lat, 99.0),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        mean_ms: mean,
        errors,
        slow_batches,
        series_ms: series,
        server,
        usage,
    })
}
