//! The headline over several runs: each figure's median and min-max, the
//! targets judged on the medians, and the markdown table of
//! docs/PERFORMANCE.md generated from `bench.json` (`dcs-bench report FILE`).

use serde::Serialize;

use crate::results::Results;

/// One headline figure and how to read it from a run.
struct Metric {
    key: &'static str,
    name: &'static str,
    unit: &'static str,
    get: fn(&Results) -> Option<f64>,
}

fn copy(r: &Results, table: &str, connections: usize) -> Option<f64> {
    r.copy
        .iter()
        .find(|c| c.table == table && c.connections == connections)
        .map(|c| c.records_per_s)
}

fn ingest(r: &Results, durability: &str) -> Option<f64> {
    r.ingest
        .iter()
        .find(|i| i.durability == durability)
        .map(|i| i.records_per_s)
}

fn fresh(r: &Results) -> Option<&crate::freshness::FreshnessResult> {
    r.freshness.iter().find(|f| f.setting == "defaults")
}

/// PostgreSQL CPU per record in end to end over that of the best COPY.
fn pg_ratio(r: &Results) -> Option<f64> {
    let e = r.e2e.as_ref()?.cpu.postgres_us?;
    let c = r.best_copy()?.cpu.postgres_us?;
    Some(e / c)
}

const METRICS: &[Metric] = &[
    Metric {
        key: "copy_1",
        name: "COPY into `records`, 1 connection",
        unit: "rec/s",
        get: |r| copy(r, "records", 1),
    },
    Metric {
        key: "copy_2",
        name: "COPY into `records`, 2 connections",
        unit: "rec/s",
        get: |r| copy(r, "records", 2),
    },
    Metric {
        key: "copy_4",
        name: "COPY into `records`, 4 connections",
        unit: "rec/s",
        get: |r| copy(r, "records", 4),
    },
    Metric {
        key: "copy_best",
        name: "physical limit (best parallel COPY)",
        unit: "rec/s",
        get: |r| r.best_copy().map(|c| c.records_per_s),
    },
    Metric {
        key: "copy_bare",
        name: "COPY into a bare table (no keys), same connections",
        unit: "rec/s",
        get: |r| {
            r.copy
                .iter()
                .find(|c| c.table != "records")
                .map(|c| c.records_per_s)
        },
    },
    Metric {
        key: "ingest_pc",
        name: "edge ingest, `process-crash`",
        unit: "rec/s",
        get: |r| ingest(r, "process-crash"),
    },
    Metric {
        key: "syslog",
        name: "syslog TCP ingest (octet-counted RFC 5424)",
        unit: "msg/s",
        get: |r| r.syslog.as_ref().map(|s| s.messages_per_s),
    },
    Metric {
        key: "syslog_ratio",
        name: "syslog TCP ingest / NDJSON ingest at the same durability",
        unit: "x",
        get: |r| {
            let s = r.syslog.as_ref()?;
            Some(s.messages_per_s / ingest(r, &s.durability)?)
        },
    },
    Metric {
        key: "otlp",
        name: "edge ingest, OTLP/HTTP protobuf (`process-crash`)",
        unit: "rec/s",
        get: |r| r.otlp.as_ref().map(|o| o.records_per_s),
    },
    Metric {
        key: "ingest_pl",
        name: "edge ingest, `power-loss`",
        unit: "rec/s",
        get: |r| ingest(r, "power-loss"),
    },
    Metric {
        key: "e2e",
        name: "end to end",
        unit: "rec/s",
        get: |r| r.e2e.as_ref().map(|e| e.records_per_s),
    },
    Metric {
        key: "e2e_ratio",
        name: "end to end / physical limit",
        unit: "x",
        get: |r| Some(r.e2e.as_ref()?.records_per_s / r.best_copy()?.records_per_s),
    },
    Metric {
        key: "drain",
        name: "backlog drain",
        unit: "rec/s",
        get: |r| r.drain.as_ref().map(|d| d.records_per_s),
    },
    Metric {
        key: "fresh_p50",
        name: "freshness (2xx to visible row) p50, half load",
        unit: "ms",
        get: |r| fresh(r).map(|f| f.p50_ms),
    },
    Metric {
        key: "fresh_p90",
        name: "freshness p90",
        unit: "ms",
        get: |r| fresh(r).map(|f| f.p90_ms),
    },
    Metric {
        key: "fresh_p99",
        name: "freshness p99",
        unit: "ms",
        get: |r| fresh(r).map(|f| f.p99_ms),
    },
    Metric {
        key: "fresh_max",
        name: "freshness max",
        unit: "ms",
        get: |r| fresh(r).map(|f| f.max_ms),
    },
    Metric {
        key: "ack_p50",
        name: "batch ack p50 (1,000-record batches to the aggregator, half load)",
        unit: "ms",
        get: |r| r.latency.as_ref().map(|l| l.p50_ms),
    },
    Metric {
        key: "ack_p99",
        name: "batch ack p99",
        unit: "ms",
        get: |r| r.latency.as_ref().map(|l| l.p99_ms),
    },
    Metric {
        key: "wire",
        name: "wire bytes / raw JSON",
        unit: "x",
        get: |r| r.wire.as_ref().map(|w| w.ratio_to_raw),
    },
    Metric {
        key: "cpu_ingest_agent",
        name: "CPU per record, ingest: agent",
        unit: "µs",
        get: |r| {
            r.ingest
                .iter()
                .find(|i| i.durability == "process-crash")?
                .cpu
                .agent_us
        },
    },
    Metric {
        key: "cpu_e2e_agent",
        name: "CPU per record, end to end: agent",
        unit: "µs",
        get: |r| r.e2e.as_ref()?.cpu.agent_us,
    },
    Metric {
        key: "cpu_e2e_agg",
        name: "CPU per record, end to end: aggregator",
        unit: "µs",
        get: |r| r.e2e.as_ref()?.cpu.aggregator_us,
    },
    Metric {
        key: "cpu_e2e_pg",
        name: "CPU per record, end to end: PostgreSQL",
        unit: "µs",
        get: |r| r.e2e.as_ref()?.cpu.postgres_us,
    },
    Metric {
        key: "cpu_drain_agent",
        name: "CPU per record, drain: agent",
        unit: "µs",
        get: |r| r.drain.as_ref()?.cpu.agent_us,
    },
    Metric {
        key: "cpu_drain_agg",
        name: "CPU per record, drain: aggregator",
        unit: "µs",
        get: |r| r.drain.as_ref()?.cpu.aggregator_us,
    },
    Metric {
        key: "cpu_drain_pg",
        name: "CPU per record, drain: PostgreSQL",
        unit: "µs",
        get: |r| r.drain.as_ref()?.cpu.postgres_us,
    },
    Metric {
        key: "cpu_copy_pg",
        name: "CPU per record, best COPY: PostgreSQL",
        unit: "µs",
        get: |r| r.best_copy()?.cpu.postgres_us,
    },
    Metric {
        key: "pg_ratio",
        name: "PostgreSQL CPU per record, end to end / COPY",
        unit: "x",
        get: pg_ratio,
    },
    Metric {
        key: "rss_idle",
        name: "agent RSS, idle",
        unit: "MB",
        get: |r| r.e2e.as_ref()?.agent_idle.rss_mb,
    },
    Metric {
        key: "rss_e2e",
        name: "agent peak RSS, end to end",
        unit: "MB",
        get: |r| r.e2e.as_ref()?.agent_peak_rss_mb,
    },
    Metric {
        key: "rss_drain",
        name: "agent peak RSS, drain",
        unit: "MB",
        get: |r| r.drain.as_ref()?.agent_peak_rss_mb,
    },
    Metric {
        key: "drain_records",
        name: "records in the drain",
        unit: "records",
        get: |r| r.drain.as_ref().map(|d| d.records as f64),
    },
    Metric {
        key: "fds_idle",
        name: "agent open fds, idle",
        unit: "fds",
        get: |r| r.e2e.as_ref()?.agent_idle.fds.map(|v| v as f64),
    },
    Metric {
        key: "fds_e2e",
        name: "agent open fds, end to end (max)",
        unit: "fds",
        get: |r| r.e2e.as_ref()?.agent_busy.fds.map(|v| v as f64),
    },
    Metric {
        key: "threads_e2e",
        name: "agent threads, end to end (max)",
        unit: "threads",
        get: |r| r.e2e.as_ref()?.agent_busy.threads.map(|v| v as f64),
    },
    Metric {
        key: "binary",
        name: "agent binary, stripped",
        unit: "MB",
        get: |r| r.dcs_edge_stripped_bytes.map(|b| b as f64 / 1e6),
    },
];

#[derive(Debug, Clone, Serialize)]
pub struct Headline {
    pub key: String,
    pub name: String,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub values: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetLine {
    pub name: String,
    pub target: String,
    /// The figure the verdict is on (median of the runs) and its spread.
    pub median: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub unit: String,
    pub pass: Option<bool>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

pub fn headline(runs: &[Results]) -> Vec<Headline> {
    METRICS
        .iter()
        .filter_map(|m| {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(m.get)
                .filter(|v| v.is_finite())
                .collect();
            (!values.is_empty()).then(|| Headline {
                key: m.key.to_owned(),
                name: m.name.to_owned(),
                unit: m.unit.to_owned(),
                median: median(&values),
                min: values.iter().copied().fold(f64::INFINITY, f64::min),
                max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                values,
            })
        })
        .collect()
}

/// The targets of issue 19 and the earlier ones still in force, on medians.
pub fn targets(h: &[Headline]) -> Vec<TargetLine> {
    let get = |k: &str| h.iter().find(|x| x.key == k);
    let line = |name: &str, target: &str, key: &str, ok: &dyn Fn(f64) -> bool| {
        let m = get(key);
        TargetLine {
            name: name.to_owned(),
            target: target.to_owned(),
            median: m.map(|m| m.median),
            min: m.map(|m| m.min),
            max: m.map(|m| m.max),
            unit: m.map_or(String::new(), |m| m.unit.clone()),
            pass: m.map(|m| ok(m.median)),
        }
    };
    // Ratios of two medians, for the targets that compare two steps.
    let ratio = |a: &str, b: &str| Some(get(a)?.median / get(b)?.median);
    let ratio_line = |name: &str, target: &str, a: &str, b: &str, ok: &dyn Fn(f64) -> bool| {
        let r = ratio(a, b);
        TargetLine {
            name: name.to_owned(),
            target: target.to_owned(),
            median: r,
            min: None,
            max: None,
            unit: "x".into(),
            pass: r.map(ok),
        }
    };
    vec![
        line(
            "end to end >= 0.8 x best parallel COPY",
            ">= 0.80 x",
            "e2e_ratio",
            &|v| v >= 0.8,
        ),
        line(
            "PostgreSQL CPU/record, end to end <= 1.1 x COPY's",
            "<= 1.10 x",
            "pg_ratio",
            &|v| v <= 1.1,
        ),
        line(
            "freshness p99 at half load <= 1 s",
            "<= 1000 ms",
            "fresh_p99",
            &|v| v <= 1000.0,
        ),
        line("agent idle RSS <= 15 MB", "<= 15 MB", "rss_idle", &|v| {
            v <= 15.0
        }),
        line(
            "agent peak RSS while draining <= 32 MB",
            "<= 32 MB",
            "rss_drain",
            &|v| v <= 32.0,
        ),
        line(
            "agent binary, stripped <= 15 MB",
            "<= 15 MB",
            "binary",
            &|v| v <= 15.0,
        ),
        ratio_line(
            "edge ingest (process-crash) >= 2 x end to end",
            ">= 2.00 x",
            "ingest_pc",
            "e2e",
            &|v| v >= 2.0,
        ),
        ratio_line(
            "drain rate >= end-to-end rate",
            ">= 1.00 x",
            "drain",
            "e2e",
            &|v| v >= 1.0,
        ),
        line(
            "syslog TCP ingest >= 0.5 x NDJSON ingest",
            ">= 0.50 x",
            "syslog_ratio",
            &|v| v >= 0.5,
        ),
        ratio_line(
            "OTLP ingest (protobuf) >= 0.5 x NDJSON ingest",
            ">= 0.50 x",
            "otlp",
            "ingest_pc",
            &|v| v >= 0.5,
        ),
        line("wire bytes <= 0.2 x raw JSON", "<= 0.200 x", "wire", &|v| {
            v <= 0.2
        }),
        line(
            "batch ack p99 at half load <= 50 ms",
            "<= 50 ms",
            "ack_p99",
            &|v| v <= 50.0,
        ),
    ]
}

pub fn verdict(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "PASS",
        Some(false) => "FAIL",
        None => "not measured",
    }
}

/// A figure with as many decimals as its size calls for.
pub fn num(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let digits = match unit {
        "x" => 2,
        _ if v.abs() >= 100.0 => 0,
        _ => 1,
    };
    let s = format!("{v:.digits$}");
    // Thousands separators for the big integers (rates, counts).
    if digits == 0 && v.abs() >= 10_000.0 {
        let (sign, d) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
        let mut out = String::new();
        for (i, c) in d.chars().enumerate() {
            if i > 0 && (d.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        return format!("{sign}{out}");
    }
    s
}

/// The headline and targets of a `bench.json` as markdown (what
/// docs/PERFORMANCE.md carries between its `bench:headline` markers).
pub fn markdown(doc: &serde_json::Value) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let headline: Vec<serde_json::Value> = doc["headline"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(
        !headline.is_empty(),
        "no headline in this file (a --sweep file?)"
    );
    let runs = doc["runs"].as_array().map_or(0, |r| r.len());
    let loads: Vec<String> = doc["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{:.2}–{:.2}",
                r["load_avg_1m_start"].as_f64().unwrap_or(f64::NAN),
                r["load_avg_1m_end"].as_f64().unwrap_or(f64::NAN)
            )
        })
        .collect();
    let mut out = String::new();
    writeln!(
        out,
        "Commit `{}`, run {} UTC, {} run(s) of every step (each about {} s), \
         machine {} cores, 1-minute load average at start–end of each run: {}. \
         Generated by `dcs-bench report` from `bench.json`.",
        doc["commit"].as_str().unwrap_or("unknown"),
        doc["date_utc"].as_str().unwrap_or("unknown"),
        runs,
        doc["config"]["duration_s"].as_f64().unwrap_or(f64::NAN),
        doc["machine"]["cores"].as_u64().unwrap_or(0),
        loads.join(", ")
    )?;
    writeln!(out)?;
    writeln!(out, "| measurement | median | min–max | unit |")?;
    writeln!(out, "| --- | --- | --- | --- |")?;
    for h in &headline {
        let unit = h["unit"].as_str().unwrap_or("");
        let f = |k: &str| num(h[k].as_f64().unwrap_or(f64::NAN), unit);
        writeln!(
            out,
            "| {} | {} | {}–{} | {} |",
            h["name"].as_str().unwrap_or(""),
            f("median"),
            f("min"),
            f("max"),
            unit
        )?;
    }
    writeln!(out)?;
    writeln!(out, "| target | median (min–max) | target | verdict |")?;
    writeln!(out, "| --- | --- | --- | --- |")?;
    for t in doc["targets"].as_array().into_iter().flatten() {
        let unit = t["unit"].as_str().unwrap_or("");
        let f = |k: &str| t[k].as_f64().map(|v| num(v, unit));
        let value = match (f("median"), f("min"), f("max")) {
            (Some(m), Some(lo), Some(hi)) => format!("{m} ({lo}–{hi}) {unit}"),
            (Some(m), _, _) => format!("{m} {unit}"),
            _ => "not measured".into(),
        };
        writeln!(
            out,
            "| {} | {} | {} | **{}** |",
            t["name"].as_str().unwrap_or(""),
            value,
            t["target"].as_str().unwrap_or(""),
            verdict(t["pass"].as_bool())
        )?;
    }
    Ok(out)
}

/// Replaces what lies between the `<!-- bench:headline:begin -->` and
/// `<!-- bench:headline:end -->` lines of `doc` with `table`.
pub fn splice(doc: &str, table: &str) -> anyhow::Result<String> {
    const BEGIN: &str = "<!-- bench:headline:begin -->";
    const END: &str = "<!-- bench:headline:end -->";
    use anyhow::Context as _;
    let a = doc
        .find(BEGIN)
        .with_context(|| format!("no {BEGIN} line in the document"))?
        + BEGIN.len();
    let b = doc
        .find(END)
        .with_context(|| format!("no {END} line in the document"))?;
    anyhow::ensure!(a <= b, "{END} comes before {BEGIN}");
    Ok(format!("{}\n{}{}", &doc[..a], table, &doc[b..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_headline_median_is_the_middle_run_or_the_mean_of_the_middle_two() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn big_figures_get_thousands_separators_and_ratios_two_decimals() {
        assert_eq!(num(91_769.4, "rec/s"), "91,769");
        assert_eq!(num(0.8049, "x"), "0.80");
        assert_eq!(num(12.34, "ms"), "12.3");
        assert_eq!(num(f64::NAN, "ms"), "-");
    }

    #[test]
    fn splice_replaces_only_what_lies_between_the_markers() {
        let doc = "a\n<!-- bench:headline:begin -->\nold\n<!-- bench:headline:end -->\nb\n";
        let out = splice(doc, "new\n").unwrap();
        assert_eq!(
            out,
            "a\n<!-- bench:headline:begin -->\nnew\n<!-- bench:headline:end -->\nb\n"
        );
        assert!(splice("no markers", "x").is_err());
    }
}
