//! One run of every step, in the order they run, and which steps were
//! disturbed by other processes on the machine.

use std::collections::BTreeSet;

use anyhow::Context as _;

use crate::copy::step_copy;
use crate::e2e::{step_drain, step_e2e, step_latency};
use crate::ingest::{step_ingest, step_ingest_of, step_syslog};
use crate::results::Results;
use crate::wire_bytes::step_wire;
use crate::world::World;
use crate::{Sizes, freshness, progress, sys};

/// Records the wire step encodes (at most): a CPU-bound computation, not timed.
const WIRE_RECORDS: u64 = 200_000;

/// Every step once; the caller repeats it `--runs` times.
pub(crate) async fn run_once(world: &World, sizes: &Sizes) -> anyhow::Result<Results> {
    let args = &world.args;
    let mut results = Results {
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        load_avg_1m_start: sys::load_avg_1m(),
        load_avg_1m_end: 0.0,
        copy: Vec::new(),
        ingest: Vec::new(),
        syslog: None,
        otlp: None,
        e2e: None,
        drain: None,
        freshness: Vec::new(),
        latency: None,
        wire: None,
        dcs_edge_binary_bytes: 0,
        dcs_aggregator_binary_bytes: 0,
        dcs_edge_stripped_bytes: None,
        dcs_aggregator_stripped_bytes: None,
        noisy_steps: Vec::new(),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut noisy = BTreeSet::new();

    if args.wants("copy") {
        let counts: &[usize] = if args.wants("copy-parallel") {
            &[1, 2, 4]
        } else {
            &[1]
        };
        for &conns in counts {
            progress(&format!("COPY into records over {conns} connection(s)"));
            let c = step_copy(world, sizes.copy, conns, false)
                .await
                .context("step copy")?;
            progress(&format!("COPY x{conns}: {:.0} rec/s", c.records_per_s));
            if c.usage.noisy(cores) {
                noisy.insert(format!("copy x{conns}"));
            }
            results.copy.push(c);
        }
        let best = results.best_copy().map_or(1, |c| c.connections);
        progress(&format!("COPY into a bare table over {best} connection(s)"));
        let c = step_copy(world, sizes.copy, best, true)
            .await
            .context("step copy (bare)")?;
        progress(&format!("COPY bare x{best}: {:.0} rec/s", c.records_per_s));
        results.copy.push(c);
    }
    if args.wants("ingest") {
        for durability in ["process-crash", "power-loss"] {
            if durability == "power-loss" && !args.wants("power-loss") {
                continue;
            }
            progress(&format!("edge ingest at {durability}"));
            let i = step_ingest(world, &world.bodies.prefix(sizes.ingest), durability)
                .await
                .with_context(|| format!("step ingest ({durability})"))?;
            progress(&format!(
                "ingest {durability}: {:.0} rec/s",
                i.records_per_s
            ));
            if i.usage.noisy(cores) {
                noisy.insert(format!("ingest {durability}"));
            }
            results.ingest.push(i);
        }
    }
    if args.wants("syslog") {
        // Compared with the NDJSON ingest at the same durability: the
        // default power-loss one when it ran, else process-crash.
        let durability =
            if args.wants("ingest") && args.wants("power-loss") || !args.wants("ingest") {
                "power-loss"
            } else {
                "process-crash"
            };
        progress(&format!("syslog TCP ingest at {durability}"));
        let sl = step_syslog(world, durability, sizes.ingest)
            .await
            .context("step syslog")?;
        progress(&format!("syslog: {:.0} msg/s", sl.messages_per_s));
        if sl.usage.noisy(cores) {
            noisy.insert("syslog".to_owned());
        }
        results.syslog = Some(sl);
    }
    if args.wants("otlp") {
        progress("edge ingest of OTLP/HTTP protobuf log batches");
        let bodies = world.bodies.prefix(sizes.ingest).as_otlp();
        let o = step_ingest_of(world, "process-crash", &bodies, "otlp")
            .await
            .context("step otlp")?;
        progress(&format!("otlp: {:.0} rec/s", o.records_per_s));
        if o.usage.noisy(cores) {
            noisy.insert("otlp".to_owned());
        }
        results.otlp = Some(o);
    }
    if args.wants("e2e") {
        progress("end to end");
        let copy_rate = results.best_copy().map(|c| c.records_per_s);
        let e = step_e2e(world, &world.bodies.prefix(sizes.e2e), copy_rate)
            .await
            .context("step e2e")?;
        progress(&format!("e2e: {:.0} rec/s", e.records_per_s));
        if e.usage.noisy(cores) {
            noisy.insert("e2e".to_owned());
        }
        results.e2e = Some(e);
    }
    if args.wants("drain") {
        progress("backlog drain");
        let d = step_drain(world, &world.bodies.prefix(sizes.e2e))
            .await
            .context("step drain")?;
        progress(&format!("drain: {:.0} rec/s", d.records_per_s));
        if d.usage.noisy(cores) {
            noisy.insert("drain".to_owned());
        }
        results.drain = Some(d);
    }
    let half_load = match (args.ack_rate, &results.e2e) {
        (Some(r), _) => r,
        (None, Some(e)) => e.records_per_s / 2.0,
        (None, None) => {
            progress("no e2e rate measured and no --ack-rate; half load taken as 5000 rec/s");
            5_000.0
        }
    };
    if args.wants("freshness") {
        for (k, setting) in freshness::SETTINGS.iter().enumerate() {
            if k > 0 && !args.wants("freshness-sweep") {
                break;
            }
            // The sweep's points run half as long: they show a trend, the
            // defaults carry the target.
            let secs = if k == 0 {
                args.duration
            } else {
                args.duration / 2.0
            };
            progress(&format!(
                "freshness at {half_load:.0} rec/s, {}",
                setting.name
            ));
            let f = freshness::step(world, setting, half_load, secs)
                .await
                .with_context(|| format!("step freshness ({})", setting.name))?;
            if f.usage.noisy(cores) {
                noisy.insert(format!("freshness {}", setting.name));
            }
            results.freshness.push(f);
        }
    }
    if args.wants("latency") {
        progress(&format!("batch ack latency at {half_load:.0} rec/s"));
        let l = step_latency(world, half_load)
            .await
            .context("step latency")?;
        progress(&format!(
            "latency: p50 {:.1} ms p99 {:.1} ms",
            l.p50_ms, l.p99_ms
        ));
        if l.usage.noisy(cores) {
            noisy.insert("latency".to_owned());
        }
        results.latency = Some(l);
    }
    if args.wants("wire") {
        progress("wire bytes");
        let (g, level) = (world.generator, args.compression_level());
        let n = sizes.e2e.min(WIRE_RECORDS);
        results.wire = Some(tokio::task::spawn_blocking(move || step_wire(g, n, level)).await?);
    }
    results.noisy_steps = noisy.into_iter().collect();
    results.load_avg_1m_end = sys::load_avg_1m();
    Ok(results)
}
