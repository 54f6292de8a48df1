//! What the machine and its processes did: `/proc` readings (CPU ticks, peak
//! RSS) and the machine description printed at the top of a run.

use std::sync::OnceLock;

use serde::Serialize;

/// Clock ticks per second for `/proc/*/stat` times: `getconf CLK_TCK`, else 100.
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// Fields of `/proc/PID/stat` after the command name: index 0 is field 3
/// (state), so field N is at index N - 3.
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0))
            .collect(),
    )
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(11)? + f.get(12)?)
}

/// CPU seconds of a process so far.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    cpu_ticks(pid).map(|t| t as f64 / clk_tck())
}

/// CPU seconds of this (the bench client's) process so far.
pub fn own_cpu_secs() -> f64 {
    cpu_secs(std::process::id()).unwrap_or(0.0)
}

/// `VmHWM` (peak resident set) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Resets a process's `VmHWM` to its current RSS (`echo 5 > clear_refs`), so a
/// later reading is the peak of one phase only. Returns whether it worked.
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// CPU seconds used by every PostgreSQL process on the machine: live
/// `postgres` processes' own time plus the postmaster's reaped children
/// (backends that exited). The shared server is used by other people's tests
/// too, so this is an upper bound for our share.
pub fn postgres_cpu_secs() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut pids = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "postgres" {
            pids.push(pid);
        }
    }
    let mut ticks = 0u64;
    for &pid in &pids {
        let Some(f) = stat_fields(pid) else { continue };
        ticks += f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        // field 4 = ppid; a postgres whose parent is not postgres is a postmaster.
        let ppid = f.get(1).copied().unwrap_or(0) as u32;
        if !pids.contains(&ppid) {
            ticks += f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0);
        }
    }
    ticks as f64 / clk_tck()
}

/// Busy and total jiffies of the whole machine (`/proc/stat`, all CPUs).
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    pub fn now() -> MachineCpu {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
            return MachineCpu::default();
        };
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal (guest is inside user).
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        MachineCpu {
            busy: total - idle,
            total,
        }
    }

    /// Share of all cores busy since `earlier`, 0–100 %.
    pub fn busy_pct_since(&self, earlier: &MachineCpu) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        100.0 * self.busy.saturating_sub(earlier.busy) as f64 / total as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub memory_mib: u64,
    pub kernel: String,
    pub postgres: String,
    pub load_avg_1m_at_start: f64,
    pub clk_tck: f64,
}

impl Machine {
    pub fn probe(postgres: String) -> Machine {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_mib = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024;
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        Machine {
            cores,
            cpu_model,
            memory_mib,
            kernel,
            postgres,
            load_avg_1m_at_start: load_avg_1m(),
            clk_tck: clk_tck(),
        }
    }
}

pub fn load_avg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Other processes that used noticeable CPU during a step (a second sample of
/// `/proc`, compared with `before`), so a noisy figure says why.
pub struct ProcSnapshot(Vec<(u32, String, u64, bool)>);

impl ProcSnapshot {
    pub fn take() -> ProcSnapshot {
        let mut out = Vec::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                // Kernel threads have an empty command line.
                let kernel = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| c.is_empty())
                    .unwrap_or(false);
                if let Some(t) = cpu_ticks(pid) {
                    out.push((pid, comm, t, kernel));
                }
            }
        }
        ProcSnapshot(out)
    }

    /// CPU seconds of kernel threads (I/O writeback, journalling: mostly work
    /// our own writes cause) since `self`.
    pub fn kernel_secs_since(&self, later: &ProcSnapshot) -> f64 {
        let mut ticks = 0;
        for (pid, comm, t, kernel) in &later.0 {
            if *kernel {
                ticks += t.saturating_sub(self.before(*pid, comm));
            }
        }
        ticks as f64 / clk_tck()
    }

    fn before(&self, pid: u32, comm: &str) -> u64 {
        self.0
            .iter()
            .find(|(p, c, _, _)| *p == pid && c == comm)
            .map_or(0, |(_, _, t, _)| *t)
    }

    /// User processes outside `ours` (pids) and outside PostgreSQL that used
    /// more than `min_secs` of CPU since `self`, busiest first. Processes that
    /// started and ended in between (short compiler runs) are not seen here.
    pub fn others_since(&self, later: &ProcSnapshot, ours: &[u32], min_secs: f64) -> Vec<String> {
        let mut by_comm: std::collections::BTreeMap<String, u64> = Default::default();
        for (pid, comm, t, kernel) in &later.0 {
            if *kernel || ours.contains(pid) || comm == "postgres" {
                continue;
            }
            *by_comm.entry(comm.clone()).or_default() += t.saturating_sub(self.before(*pid, comm));
        }
        let mut v: Vec<(String, f64)> = by_comm
            .into_iter()
            .map(|(c, t)| (c, t as f64 / clk_tck()))
            .filter(|(_, s)| *s >= min_secs)
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v.into_iter().map(|(c, s)| format!("{c} {s:.1}s")).collect()
    }
}

/// A field of `/proc/PID/status` in its own unit (kB for `Vm*`, a count for
/// `Threads`).
fn status_field(pid: u32, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// `VmRSS` (resident set now) of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS")
}

/// Threads of a process.
pub fn threads(pid: u32) -> Option<u64> {
    status_field(pid, "Threads")
}

/// Open file descriptors of a process (sockets, the SQLite files, pipes).
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// CPU ticks of every live PostgreSQL backend serving database `db`, by pid.
/// A backend's process title (`postgres: USER DB ADDR STATE`) names its
/// database, so this leaves out other people's work on a shared server and the
/// server's own background processes (WAL writer, checkpointer), which no
/// single database can be charged for.
pub fn postgres_backend_ticks(db: &str) -> std::collections::HashMap<u32, u64> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "postgres" {
            continue;
        }
        let title = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let title = String::from_utf8_lossy(&title);
        // `postgres: [CLUSTER: ]USER DB ADDR STATE`; Debian names its clusters.
        if title.split_whitespace().take(5).any(|t| t == db)
            && let Some(t) = cpu_ticks(pid)
        {
            out.insert(pid, t);
        }
    }
    out
}
