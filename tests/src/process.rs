//! Workspace binaries run as real processes, so tests can SIGKILL them and
//! start them again on the same port, files and database.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary (`dcs-edge`, `dcs-aggregator`) built beside the
/// test executable. `cargo build --workspace --bins` builds them; the test
/// command in the README does that first.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>; a binary of this
    // crate (dcs-chaos) sits in target/<profile> itself.
    let candidates = [
        exe.parent().and_then(Path::parent).map(|d| d.join(name)),
        exe.parent().map(|d| d.join(name)),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} not found beside the test binary: run `cargo build --workspace --bins` first")
        })
}

/// A free port on 127.0.0.1 (bound and released; a tiny race is acceptable in tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// One service process: its command line, environment and log file survive
/// kills so that [`Service::start`] brings up the same service again.
pub struct Service {
    pub port: u16,
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    /// A command the binary runs under, e.g. `ip netns exec NS`.
    prefix: Vec<String>,
    /// Where [`Service::start`] waits for a listener; `127.0.0.1:port` when `None`.
    ready: Option<SocketAddr>,
    pub starts: u32,
}

impl Service {
    pub fn new(
        binary_name: &str,
        args: &[&str],
        env: Vec<(String, String)>,
        port: u16,
        log: &Path,
    ) -> Service {
        Service {
            port,
            binary: binary(binary_name),
            args: args.iter().map(|s| s.to_string()).collect(),
            env,
            log: log.to_owned(),
            child: None,
            prefix: Vec::new(),
            ready: None,
            starts: 0,
        }
    }

    /// `dcs-aggregator serve`, configured only through the environment:
    /// `settings` are its `DCS_AGG_` variables named without the prefix, e.g.
    /// `("DATABASE__URL", url)`.
    pub fn aggregator<K: AsRef<str>>(
        settings: impl IntoIterator<Item = (K, String)>,
        port: u16,
        log: &Path,
    ) -> Service {
        let env = settings
            .into_iter()
            .map(|(k, v)| {
                (
                    format!("{}{}", dcs_aggregator::config::ENV_PREFIX, k.as_ref()),
                    v,
                )
            })
            .collect();
        Service::new("dcs-aggregator", &["serve"], env, port, log)
    }

    /// Runs the binary under `prefix` (e.g. `["ip", "netns", "exec", "ns1"]`).
    pub fn with_prefix(mut self, prefix: &[&str]) -> Service {
        self.prefix = prefix.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Makes [`Service::start`] wait until `addr` accepts connections instead
    /// of `127.0.0.1:port` (a service inside a network namespace is reached
    /// at an address of that namespace).
    pub fn with_ready_addr(mut self, addr: SocketAddr) -> Service {
        self.ready = Some(addr);
        self
    }

    /// Starts the process and waits until its port (or the address given to
    /// [`Service::with_ready_addr`]) accepts connections.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut command = match self.prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        };
        let child = command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.binary.display()));
        self.child = Some(child);
        self.starts += 1;
        let ready = self
            .ready
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], self.port)));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(ready).await.is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited with {status} at start; log:\n{}",
                    self.binary.display(),
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on {ready} within 30 s; log:\n{}",
                self.binary.display(),
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: no shutdown code runs, exactly like a crash or an OOM kill.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// Peak resident memory (VmHWM) of the running process, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `command` to completion; an error with its output if it failed.
pub fn run_checked(command: &mut Command) -> anyhow::Result<()> {
    let out = command
        .output()
        .map_err(|e| anyhow::anyhow!("run {command:?}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
