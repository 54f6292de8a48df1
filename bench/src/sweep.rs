//! `--sweep`: the effect of the tuning knobs on end-to-end throughput (and of
//! `synchronous_commit` on batch ack latency), each setting measured several
//! times, interleaved so that a burst of other load on a shared machine hits
//! every setting alike; medians are reported.

use serde::Serialize;

use crate::bodies::Bodies;
use crate::e2e::{step_e2e, step_latency};
use crate::records::Generator;
use crate::results::E2eResult;
use crate::world::World;
use crate::{Args, progress};

/// One knob setting: a name and what it changes.
struct Setting {
    name: &'static str,
    apply: fn(&mut Args),
}

const SETTINGS: &[Setting] = &[
    Setting {
        name: "defaults",
        apply: |_| {},
    },
    Setting {
        name: "batch.max_in_flight=1",
        apply: |a| a.max_in_flight = Some(1),
    },
    Setting {
        name: "batch.max_in_flight=4",
        apply: |a| a.max_in_flight = Some(4),
    },
    Setting {
        name: "batch.compression_level=3",
        apply: |a| a.compression_level = Some(3),
    },
    Setting {
        name: "batch.compression_level=6",
        apply: |a| a.compression_level = Some(6),
    },
    Setting {
        name: "batch.max_records=1000",
        apply: |a| a.max_records = Some(1000),
    },
    Setting {
        name: "batch.max_records=20000",
        apply: |a| a.max_records = Some(20_000),
    },
    Setting {
        name: "batch.linger=5ms",
        apply: |a| a.linger_ms = Some(5),
    },
    Setting {
        name: "pg synchronous_commit=off",
        apply: |a| a.pg_synchronous_commit = Some("off".into()),
    },
];

#[derive(Debug, Clone, Serialize)]
pub struct SettingResult {
    pub name: String,
    pub e2e_records_per_s: Vec<f64>,
    pub median_records_per_s: f64,
    pub vs_defaults: f64,
    /// Median CPU microseconds per record.
    pub agent_us_per_record: f64,
    pub aggregator_us_per_record: f64,
    pub postgres_us_per_record: f64,
    pub kernel_us_per_record: f64,
    pub max_other_cpu_share: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyRow {
    pub name: String,
    pub rate: f64,
    pub p50_ms: Vec<f64>,
    pub p99_ms: Vec<f64>,
    pub median_p50_ms: f64,
    pub median_p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    pub repeats: usize,
    pub settings: Vec<SettingResult>,
    pub latency: Vec<LatencyRow>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[s.len() / 2]
}

fn world(
    args: &Args,
    pg_admin: &str,
    bodies: &Bodies,
    generator: Generator,
) -> anyhow::Result<World> {
    World::new(args, pg_admin, bodies, generator)
}

pub async fn run(
    base: &Args,
    pg_admin: &str,
    bodies: &Bodies,
    generator: Generator,
) -> anyhow::Result<Sweep> {
    let n = bodies.records as f64;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
    let mut runs: Vec<Vec<E2eResult>> = vec![Vec::new(); SETTINGS.len()];
    for rep in 0..base.sweep_repeats {
        for (i, setting) in SETTINGS.iter().enumerate() {
            let mut args = base.clone();
            (setting.apply)(&mut args);
            progress(&format!(
                "sweep {}/{}: {}",
                rep + 1,
                base.sweep_repeats,
                setting.name
            ));
            let w = world(&args, pg_admin, bodies, generator)?;
            let e = step_e2e(&w, bodies, None).await?;
            progress(&format!("  {:.0} rec/s", e.records_per_s));
            runs[i].push(e);
        }
    }
    let per = |v: &[E2eResult], f: fn(&E2eResult) -> f64| {
        median(&v.iter().map(f).collect::<Vec<_>>()) / n * 1e6
    };
    let base_median = median(&runs[0].iter().map(|e| e.records_per_s).collect::<Vec<_>>());
    let settings: Vec<SettingResult> = SETTINGS
        .iter()
        .zip(&runs)
        .map(|(s, v)| {
            let rates: Vec<f64> = v.iter().map(|e| e.records_per_s).collect();
            let m = median(&rates);
            SettingResult {
                name: s.name.to_owned(),
                median_records_per_s: m,
                vs_defaults: m / base_median,
                e2e_records_per_s: rates,
                agent_us_per_record: per(v, |e| e.usage.agent_cpu_s.unwrap_or(0.0)),
                aggregator_us_per_record: per(v, |e| e.usage.aggregator_cpu_s.unwrap_or(0.0)),
                postgres_us_per_record: per(v, |e| e.usage.postgres_cpu_s),
                kernel_us_per_record: per(v, |e| e.usage.kernel_cpu_s),
                max_other_cpu_share: v
                    .iter()
                    .map(|e| e.usage.other_cpu_s / (e.usage.wall_s * cores))
                    .fold(0.0, f64::max),
            }
        })
        .collect();

    // synchronous_commit on/off at the same paced rate: half the default e2e rate.
    let rate = base.ack_rate.unwrap_or(base_median / 2.0);
    let mut latency = Vec::new();
    for (name, mode) in [
        ("pg synchronous_commit=on", None),
        ("pg synchronous_commit=off", Some("off")),
    ] {
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        for rep in 0..base.sweep_repeats {
            let mut args = base.clone();
            args.pg_synchronous_commit = mode.map(str::to_owned);
            progress(&format!(
                "sweep latency {}/{}: {name}",
                rep + 1,
                base.sweep_repeats
            ));
            let w = world(&args, pg_admin, bodies, generator)?;
            let l = step_latency(&w, rate).await?;
            p50.push(l.p50_ms);
            p99.push(l.p99_ms);
        }
        latency.push(LatencyRow {
            name: name.to_owned(),
            rate,
            median_p50_ms: median(&p50),
            median_p99_ms: median(&p99),
            p50_ms: p50,
            p99_ms: p99,
        });
    }

    println!();
    println!(
        "== Knob sweep: end to end, {} records, median of {} ==",
        bodies.records, base.sweep_repeats
    );
    println!(
        "{:<28} {:>12} {:>8} {:>26} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "setting", "rec/s", "vs def", "runs", "agent us", "agg us", "pg us", "kern us", "other"
    );
    for s in &settings {
        let runs: Vec<String> = s
            .e2e_records_per_s
            .iter()
            .map(|r| format!("{:.0}", r))
            .collect();
        println!(
            "{:<28} {:>12.0} {:>7.2}x {:>26} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>6.0}%",
            s.name,
            s.median_records_per_s,
            s.vs_defaults,
            runs.join(" "),
            s.agent_us_per_record,
            s.aggregator_us_per_record,
            s.postgres_us_per_record,
            s.kernel_us_per_record,
            100.0 * s.max_other_cpu_share
        );
    }
    println!();
    println!("== Batch ack latency at {rate:.0} rec/s (batches of 1000), median of runs ==");
    for l in &latency {
        println!(
            "{:<28} p50 {:>7.1} ms  p99 {:>7.1} ms   (p99 runs: {})",
            l.name,
            l.median_p50_ms,
            l.median_p99_ms,
            l.p99_ms
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(Sweep {
        repeats: base.sweep_repeats,
        settings,
        latency,
    })
}
