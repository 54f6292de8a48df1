//! What a run prints: one table per run, the headline and targets over all
//! runs, and the `dcs-bench report` command that turns a `bench.json` into
//! the docs' markdown table.

use anyhow::{Context as _, bail};

use crate::meter::{CpuPerRecord, Usage};
use crate::results::{BenchDoc, Results};
use crate::summary;

/// Prints the markdown headline of a `bench.json`, or with `--doc FILE`
/// writes it into FILE between its `bench:headline` markers.
pub(crate) fn command(rest: &[String]) -> anyhow::Result<()> {
    let (file, doc) = match rest {
        [file] => (file, None),
        [file, flag, doc] if flag == "--doc" => (file, Some(doc)),
        _ => bail!("usage: dcs-bench report BENCH.json [--doc PERFORMANCE.md]"),
    };
    let text = std::fs::read_to_string(file).with_context(|| format!("read {file}"))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parse {file}"))?;
    let table = summary::markdown(&json)?;
    match doc {
        None => print!("{table}"),
        Some(doc) => {
            let old = std::fs::read_to_string(doc).with_context(|| format!("read {doc}"))?;
            std::fs::write(doc, summary::splice(&old, &table)?)
                .with_context(|| format!("write {doc}"))?;
            println!("updated the headline in {doc}");
        }
    }
    Ok(())
}

fn fmt_rate(r: f64) -> String {
    format!("{:.0} rec/s", r)
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}{unit}"))
}

fn print_usage_line(u: &Usage) {
    println!(
        "      cpu: agent {} aggregator {} postgres {:.1}s bench {:.1}s kernel {:.1}s | machine busy {:.0}% | other {:.1}s{}",
        opt(u.agent_cpu_s, "s"),
        opt(u.aggregator_cpu_s, "s"),
        u.postgres_cpu_s,
        u.bench_cpu_s,
        u.kernel_cpu_s,
        u.machine_busy_pct,
        u.other_cpu_s,
        if u.other_processes.is_empty() {
            String::new()
        } else {
            format!(" ({})", u.other_processes.join(", "))
        }
    );
}

pub(crate) fn print_report(r: &Results, run: usize) {
    println!();
    println!(
        "== Run {run} (load average 1m {:.2} at start, {:.2} at end) ==",
        r.load_avg_1m_start, r.load_avg_1m_end
    );
    println!(
        "{:<46} {:>16} {:>10} {:>10}",
        "measurement", "value", "secs", "vs"
    );
    let line = |name: &str, value: String, secs: f64, vs: String| {
        println!("{name:<46} {value:>16} {secs:>10.2} {vs:>10}");
    };
    let cpu_line = |c: &CpuPerRecord| {
        println!(
            "      cpu per record: agent {} us, aggregator {} us, postgres (own db) {} us",
            opt(c.agent_us, ""),
            opt(c.aggregator_us, ""),
            opt(c.postgres_us, "")
        );
    };
    for c in &r.copy {
        line(
            &format!("COPY into {} x{} connections", c.table, c.connections),
            fmt_rate(c.records_per_s),
            c.secs,
            format!("{:.0} MiB/s", c.mib_per_s),
        );
        cpu_line(&c.cpu);
        print_usage_line(&c.usage);
    }
    for i in &r.ingest {
        line(
            &format!("edge ingest, durability {}", i.durability),
            fmt_rate(i.records_per_s),
            i.secs,
            format!("p99 {:.0}ms", i.request_p99_ms),
        );
        cpu_line(&i.cpu);
        print_usage_line(&i.usage);
    }
    if let Some(sl) = &r.syslog {
        line(
            &format!("syslog TCP ingest, durability {}", sl.durability),
            fmt_rate(sl.messages_per_s),
            sl.secs,
            format!("{} conns", sl.connections),
        );
        print_usage_line(&sl.usage);
    }
    if let Some(o) = &r.otlp {
        line(
            "edge ingest, OTLP/HTTP protobuf (process-crash)",
            fmt_rate(o.records_per_s),
            o.secs,
            format!("p99 {:.0}ms", o.request_p99_ms),
        );
        print_usage_line(&o.usage);
    }
    if let Some(e) = &r.e2e {
        line(
            "end to end (first send -> last row committed)",
            fmt_rate(e.records_per_s),
            e.secs,
            e.ratio_to_copy
                .map_or("-".into(), |x| format!("{x:.2}xCOPY")),
        );
        println!(
            "      agent peak RSS {} MB, aggregator peak RSS {} MB, agent acked all after {:.2}s",
            opt(e.agent_peak_rss_mb, ""),
            opt(e.aggregator_peak_rss_mb, ""),
            e.ingest_secs
        );
        println!(
            "      agent idle: RSS {} MB, {} fds, {} threads; busy (max): RSS {} MB, {} fds, {} threads",
            opt(e.agent_idle.rss_mb, ""),
            e.agent_idle.fds.unwrap_or(0),
            e.agent_idle.threads.unwrap_or(0),
            opt(e.agent_busy.rss_mb, ""),
            e.agent_busy.fds.unwrap_or(0),
            e.agent_busy.threads.unwrap_or(0)
        );
        cpu_line(&e.cpu);
        print_usage_line(&e.usage);
    }
    if let Some(d) = &r.drain {
        line(
            "backlog drain (aggregator up -> last row)",
            fmt_rate(d.records_per_s),
            d.secs,
            format!("{} MB", opt(d.agent_peak_rss_mb, "")),
        );
        println!(
            "      agent peak RSS while draining {} MB (lifetime {} MB); buffering took {:.2}s",
            opt(d.agent_peak_rss_mb, ""),
            opt(d.agent_peak_rss_mb_lifetime, ""),
            d.fill_secs
        );
        cpu_line(&d.cpu);
        print_usage_line(&d.usage);
    }
    for f in &r.freshness {
        println!(
            "{:<46} {:>16} {:>10} {:>10}",
            format!(
                "freshness at {:.0} rec/s, {}",
                f.target_records_per_s, f.setting
            ),
            format!("p50 {:.0} ms", f.p50_ms),
            format!("p99 {:.0}", f.p99_ms),
            format!("max {:.0}", f.max_ms)
        );
        println!(
            "      {} records in requests of {}, p90 {:.0} ms, offered {:.0} rec/s, errors {}",
            f.records, f.request_records, f.p90_ms, f.offered_records_per_s, f.errors
        );
        cpu_line(&f.cpu);
        print_usage_line(&f.usage);
    }
    if let Some(l) = &r.latency {
        println!(
            "{:<46} {:>16} {:>10} {:>10}",
            format!("batch ack latency at {:.0} rec/s", l.target_records_per_s),
            format!("p50 {:.1} ms", l.p50_ms),
            format!("p99 {:.1}", l.p99_ms),
            format!("max {:.0}", l.max_ms)
        );
        println!(
            "      {} batches of {}, p90 {:.1} ms, mean {:.1} ms, {} over 50 ms, errors {}",
            l.batches, l.batch_records, l.p90_ms, l.mean_ms, l.slow_batches, l.errors
        );
        if let Some(s) = &l.server {
            println!(
                "      server: {} timed + {} requested checkpoints, {} pages written by backends, {:.0} MB WAL ({} full-page images, write {:.0} ms, sync {:.0} ms), WAL files {} -> {}",
                s.checkpoints_timed,
                s.checkpoints_requested,
                s.buffers_backend,
                s.wal_bytes as f64 / 1e6,
                s.wal_full_page_images,
                s.wal_write_ms,
                s.wal_sync_ms,
                s.wal_files_before,
                s.wal_files_after
            );
        }
        print_usage_line(&l.usage);
    }
    if let Some(w) = &r.wire {
        println!(
            "{:<46} {:>16} {:>10} {:>10}",
            format!(
                "wire bytes/record (gzip {}, batches of {})",
                w.level, w.batch_records
            ),
            format!("{:.1} B", w.wire_bytes_per_record),
            format!("{:.1} raw", w.raw_bytes_per_record),
            format!("{:.3}x", w.ratio_to_raw)
        );
        for l in &w.levels {
            println!(
                "      level {}: {:.1} B/record ({:.3} x raw), encode_batch {:.0} MiB/s of JSON (render-then-gzip {:.0} MiB/s)",
                l.level,
                l.wire_bytes_per_record,
                l.ratio_to_raw,
                l.encode_mib_per_s,
                l.one_shot_mib_per_s
            );
        }
    }
    let mb = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1e6));
    println!(
        "binary sizes: dcs-edge {} MB ({} stripped), dcs-aggregator {} MB ({} stripped)",
        mb(Some(r.dcs_edge_binary_bytes)),
        mb(r.dcs_edge_stripped_bytes),
        mb(Some(r.dcs_aggregator_binary_bytes)),
        mb(r.dcs_aggregator_stripped_bytes)
    );
    if !r.noisy_steps.is_empty() {
        println!();
        println!(
            "NOTE: other processes used more than 10% of the machine during: {} (figures are noisy)",
            r.noisy_steps.join(", ")
        );
    }
}

pub(crate) fn print_summary(doc: &BenchDoc) {
    println!();
    println!(
        "== Headline: median and min-max of {} run(s), commit {} ==",
        doc.runs.len(),
        doc.commit
    );
    for h in &doc.headline {
        println!(
            "{:<66} {:>12} {:>26} {}",
            h.name,
            summary::num(h.median, &h.unit),
            format!(
                "{} - {}",
                summary::num(h.min, &h.unit),
                summary::num(h.max, &h.unit)
            ),
            h.unit
        );
    }
    println!();
    println!("== Targets (on the medians) ==");
    for t in &doc.targets {
        let v = |x: Option<f64>| x.map_or("-".into(), |x| summary::num(x, &t.unit));
        println!(
            "{:<52} {:>10} ({} - {}) {:>12}  {}",
            t.name,
            v(t.median),
            v(t.min),
            v(t.max),
            t.target,
            summary::verdict(t.pass)
        );
    }
    let loads: Vec<String> = doc
        .runs
        .iter()
        .map(|r| format!("{:.2}-{:.2}", r.load_avg_1m_start, r.load_avg_1m_end))
        .collect();
    println!(
        "load average (1m) at start-end of each run: {}",
        loads.join(", ")
    );
}
