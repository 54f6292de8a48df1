//! What a step measures beside its rate: CPU of each tier and of the rest of
//! the machine, resident memory, descriptors and threads, and percentiles.
//!
//! Invariant: per-record PostgreSQL CPU counts only the backends of the
//! step's own database, so COPY and end to end are measured alike.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sys::{self, MachineCpu, ProcSnapshot};

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Usage {
    pub(crate) wall_s: f64,
    pub(crate) agent_cpu_s: Option<f64>,
    pub(crate) aggregator_cpu_s: Option<f64>,
    /// Every `postgres` process on the machine (reaped backends included):
    /// on a shared server also other people's work.
    pub(crate) postgres_cpu_s: f64,
    /// The backends serving the step's own database only (see
    /// [`sys::postgres_backend_ticks`]): the figure per-record PostgreSQL CPU
    /// is computed from, so COPY and end to end are measured alike.
    pub(crate) postgres_db_cpu_s: Option<f64>,
    pub(crate) bench_cpu_s: f64,
    pub(crate) machine_busy_pct: f64,
    /// Kernel threads (writeback, journal): mostly caused by our own writes.
    pub(crate) kernel_cpu_s: f64,
    /// Machine CPU seconds used by none of the agent, aggregator, PostgreSQL,
    /// the bench or kernel threads: other people's work on a shared machine.
    pub(crate) other_cpu_s: f64,
    pub(crate) other_processes: Vec<String>,
}

impl Usage {
    pub(crate) fn noisy(&self, cores: usize) -> bool {
        self.wall_s > 0.0 && self.other_cpu_s / (self.wall_s * cores as f64) > 0.10
    }
}

pub(crate) struct Meter {
    t0: Instant,
    agent: Option<(u32, f64)>,
    aggregator: Option<(u32, f64)>,
    /// The step's database and its backends' CPU ticks at the start.
    db: Option<(String, std::collections::HashMap<u32, u64>)>,
    pg0: f64,
    bench0: f64,
    machine0: MachineCpu,
    procs0: ProcSnapshot,
}

impl Meter {
    pub(crate) fn start(agent: Option<u32>, aggregator: Option<u32>) -> Meter {
        let at = |pid: Option<u32>| pid.map(|p| (p, sys::cpu_secs(p).unwrap_or(0.0)));
        Meter {
            agent: at(agent),
            aggregator: at(aggregator),
            db: None,
            pg0: sys::postgres_cpu_secs(),
            bench0: sys::own_cpu_secs(),
            machine0: MachineCpu::now(),
            procs0: ProcSnapshot::take(),
            t0: Instant::now(),
        }
    }

    /// Also charges the backends of database `db` (those that connect later
    /// from 0). Call right after [`Meter::start`].
    pub(crate) fn with_db(mut self, db: &str) -> Meter {
        self.db = Some((db.to_owned(), sys::postgres_backend_ticks(db)));
        self
    }

    /// Also counts a process that started after [`Meter::start`] (from 0).
    pub(crate) fn add_aggregator(&mut self, pid: u32) {
        self.aggregator = Some((pid, 0.0));
    }

    pub(crate) fn stop(&self) -> Usage {
        let wall_s = self.t0.elapsed().as_secs_f64();
        let machine = MachineCpu::now();
        let delta =
            |p: Option<(u32, f64)>| p.map(|(pid, c0)| sys::cpu_secs(pid).unwrap_or(c0) - c0);
        let agent = delta(self.agent);
        let aggregator = delta(self.aggregator);
        let pg = sys::postgres_cpu_secs() - self.pg0;
        let pg_db = self.db.as_ref().map(|(name, before)| {
            let ticks: u64 = sys::postgres_backend_ticks(name)
                .into_iter()
                .map(|(pid, t)| t.saturating_sub(before.get(&pid).copied().unwrap_or(0)))
                .sum();
            ticks as f64 / sys::clk_tck()
        });
        let bench = sys::own_cpu_secs() - self.bench0;
        let busy_pct = machine.busy_pct_since(&self.machine0);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let busy_s = busy_pct / 100.0 * wall_s * cores;
        let later = ProcSnapshot::take();
        let kernel = self.procs0.kernel_secs_since(&later);
        let ours = agent.unwrap_or(0.0) + aggregator.unwrap_or(0.0) + pg + bench + kernel;
        let mut pids = vec![std::process::id()];
        pids.extend(self.agent.map(|p| p.0));
        pids.extend(self.aggregator.map(|p| p.0));
        Usage {
            wall_s,
            agent_cpu_s: agent,
            aggregator_cpu_s: aggregator,
            postgres_cpu_s: pg,
            postgres_db_cpu_s: pg_db,
            bench_cpu_s: bench,
            machine_busy_pct: busy_pct,
            kernel_cpu_s: kernel,
            other_cpu_s: (busy_s - ours).max(0.0),
            other_processes: self.procs0.others_since(&later, &pids, 0.5),
        }
    }
}

/// CPU microseconds per record of each tier over one step: the
/// machine-independent figure (wall-clock rates depend on the machine and on
/// who else uses it; CPU per record much less).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct CpuPerRecord {
    pub(crate) agent_us: Option<f64>,
    pub(crate) aggregator_us: Option<f64>,
    /// Backends of the step's own database (`Usage::postgres_db_cpu_s`).
    pub(crate) postgres_us: Option<f64>,
}

impl CpuPerRecord {
    pub(crate) fn of(u: &Usage, n: u64) -> CpuPerRecord {
        let per = |s: Option<f64>| s.map(|s| s * 1e6 / n.max(1) as f64);
        CpuPerRecord {
            agent_us: per(u.agent_cpu_s),
            aggregator_us: per(u.aggregator_cpu_s),
            postgres_us: per(u.postgres_db_cpu_s),
        }
    }
}

/// Resident memory, open file descriptors and threads of a process at one
/// moment (or the maximum of several moments, see [`ProcSample::max`]).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct ProcSample {
    pub(crate) rss_mb: Option<f64>,
    pub(crate) fds: Option<u64>,
    pub(crate) threads: Option<u64>,
}

impl ProcSample {
    pub(crate) fn take(pid: u32) -> ProcSample {
        ProcSample {
            rss_mb: kib_to_mb(sys::rss_kib(pid)),
            fds: sys::open_fds(pid),
            threads: sys::threads(pid),
        }
    }

    pub(crate) fn max(self, other: ProcSample) -> ProcSample {
        fn m<T: PartialOrd>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(if b > a { b } else { a }),
                (a, b) => a.or(b),
            }
        }
        ProcSample {
            rss_mb: m(self.rss_mb, other.rss_mb),
            fds: m(self.fds, other.fds),
            threads: m(self.threads, other.threads),
        }
    }
}

/// Samples a process every 200 ms until dropped; [`Sampler::finish`] gives
/// the maximum of each field.
pub(crate) struct Sampler(
    tokio::task::JoinHandle<ProcSample>,
    Arc<std::sync::atomic::AtomicBool>,
);

impl Sampler {
    pub(crate) fn start(pid: u32) -> Sampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        Sampler(
            tokio::spawn(async move {
                let mut max = ProcSample::take(pid);
                while !flag.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    max = max.max(ProcSample::take(pid));
                }
                max
            }),
            stop,
        )
    }

    pub(crate) async fn finish(self) -> ProcSample {
        self.1.store(true, Ordering::Relaxed);
        self.0.await.unwrap_or_default()
    }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub(crate) fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

pub(crate) fn kib_to_mb(kib: Option<u64>) -> Option<f64> {
    kib.map(|k| k as f64 * 1024.0 / 1e6)
}
