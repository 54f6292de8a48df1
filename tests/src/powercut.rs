//! Power-cut scenarios: the real `dcs-edge` runs in a qemu VM whose data disk
//! is opened with `cache=none`, producers on the host push records through a
//! `hostfwd` port, and the power cut is a SIGKILL of qemu. What the guest had
//! fsynced is on the disk image; what sat in its page cache is gone. The VM
//! boots again, the aggregator (on the host, reached from the guest at
//! 10.0.2.2) drains the buffer, and acknowledged ids are compared with
//! PostgreSQL ([`crate::chaos::verify`]).
//!
//! `scripts/powercut.sh` builds the guest image (tests/powercut/) and runs
//! the `dcs-powercut` binary, which runs these scenarios.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::chaos::{Ledger, RecordKey, Report, Request, STREAM};
use crate::pg::TestDb;
use crate::pki::Pki;
use crate::process::{Service, binary, free_port};

pub const SCENARIOS: &[&str] = &[
    "power-cut",
    "power-cut-during-rotation",
    "power-cut-during-delivery",
    "power-cut-process-crash-mode",
    "power-cut-during-renewal",
    "power-cut-during-pull",
];

/// Where the pulled records are, in the guest.
const PULL_DIR: &str = "/data/in";

/// Where the agent pauses, in the renewal scenario, until the power is cut:
/// the renewed key is in place, the renewed certificate not yet
/// (`dcs_certs::write_identity_files`).
const RENEWAL_FAILPOINT: &str = "identity-between-renames";

/// The agent's port inside the guest.
const GUEST_AGENT_PORT: u16 = 8780;
/// The host as the guest sees it (slirp maps it to the host's loopback).
const HOST_FROM_GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// A TCG boot of a Debian kernel takes about 10 s; the agent's first start
/// under emulation adds more. Generous, for a loaded CI machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the drain after the reboot may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// The guest image built by `tests/powercut/build-image.sh`.
#[derive(Debug, Clone)]
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
}

impl Image {
    pub fn at(dir: &Path) -> anyhow::Result<Image> {
        let image = Image {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            rootfs: dir.join("rootfs.img"),
        };
        for p in [&image.kernel, &image.initrd, &image.rootfs] {
            if !p.is_file() {
                bail!(
                    "{} is missing: build the image with scripts/powercut.sh",
                    p.display()
                );
            }
        }
        Ok(image)
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub image: Image,
    /// Scratch space for disk images; must support O_DIRECT (not tmpfs).
    pub work: PathBuf,
    /// Records acknowledged before the cut.
    pub records: usize,
    /// tests/powercut/guest.sh
    pub guest_script: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u32,
}

/// Runs one scenario by name.
pub async fn run_named(name: &str, opts: &Options) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut report = match name {
        "power-cut" => power_cut(opts, Mode::default(), name).await?,
        "power-cut-during-rotation" => {
            power_cut(
                opts,
                Mode {
                    rotate: true,
                    ..Mode::default()
                },
                name,
            )
            .await?
        }
        "power-cut-during-delivery" => {
            power_cut(
                opts,
                Mode {
                    aggregator_up: true,
                    ..Mode::default()
                },
                name,
            )
            .await?
        }
        "power-cut-process-crash-mode" => {
            power_cut(
                opts,
                Mode {
                    process_crash: true,
                    ..Mode::default()
                },
                name,
            )
            .await?
        }
        "power-cut-during-renewal" => {
            power_cut(
                opts,
                Mode {
                    aggregator_up: true,
                    renewal: true,
                    ..Mode::default()
                },
                name,
            )
            .await?
        }
        "power-cut-during-pull" => {
            power_cut(
                opts,
                Mode {
                    pull: true,
                    ..Mode::default()
                },
                name,
            )
            .await?
        }
        other => bail!(
            "unknown scenario {other:?}; known: {}",
            SCENARIOS.join(", ")
        ),
    };
    report.note("seconds", started.elapsed().as_secs());
    Ok(report)
}

/// Whether a scenario's report passes: no acknowledged record missing, none
/// doubled; for the opt-in `process-crash` mode only none doubled (its loss
/// is what it measures).
pub fn passes(name: &str, report: &Report) -> bool {
    let pushed = report.acked > 0;
    let noted = |key: &str, value: &str| report.notes.iter().any(|(k, v)| k == key && v == value);
    if name == "power-cut-during-renewal" {
        pushed && report.ok() && noted("identity", "rolled-forward") && noted("renewed", "true")
    } else if name == "power-cut-process-crash-mode" {
        pushed && report.duplicated == 0 && report.refused_present == 0
    } else {
        pushed && report.ok()
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Mode {
    /// The aggregator runs while records are pushed (batches in flight at the
    /// cut); otherwise it starts only after the reboot.
    aggregator_up: bool,
    /// Encryption on; the key rotates half way, and the cut follows.
    rotate: bool,
    /// `buffer.durability = "process-crash"` instead of the default.
    process_crash: bool,
    /// The agent's certificate is due for renewal at boot, and the power is
    /// cut between the renames of the renewed key and certificate.
    renewal: bool,
    /// No producers: a file source reads a file of records, and the power
    /// is cut while it stores them with its checkpoint.
    pull: bool,
}

impl Mode {
    fn key(self) -> RecordKey {
        if self.pull {
            RecordKey::PayloadK
        } else {
            RecordKey::RecordId
        }
    }
}

async fn power_cut(opts: &Options, mode: Mode, name: &str) -> anyhow::Result<Report> {
    dcs_shared::tls::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(&opts.work)
        .context("scratch directory")?;
    let db = TestDb::try_new().await?;
    let pki = Pki::new();
    let agg_port = free_port();
    let mut aggregator = aggregator_service(&pki, &db, agg_port, dir.path(), mode)?;
    if mode.aggregator_up {
        aggregator.start().await;
    }

    let data = dir.path().join("data.img");
    let first_serial =
        stage_data_disk(opts, &pki, agg_port, mode, &dir.path().join("stage"), &data)?;
    let agent_port = free_port();
    let agent_url = format!("http://127.0.0.1:{agent_port}");
    let ctl = TcpListener::bind("127.0.0.1:0").await?;
    let ctl_port = ctl.local_addr()?.port();

    // Boot 1: push until enough records are acknowledged, then cut.
    let failpoint = mode.renewal.then_some(RENEWAL_FAILPOINT);
    let mut vm = Vm::boot(
        opts,
        &data,
        agent_port,
        ctl_port,
        failpoint,
        &dir.path().join("serial-1.log"),
    )?;
    let mut control = Control::accept(&ctl, &mut vm).await?;
    vm.wait_agent(&agent_url).await?;
    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = if mode.pull {
        // Every line of the file is owed to PostgreSQL exactly once.
        ledger.add_acked(&pulled_keys(opts.records));
        Vec::new()
    } else {
        (0..4)
            .map(|p| tokio::spawn(produce(agent_url.clone(), p, ledger.clone(), stop.clone())))
            .collect()
    };
    let before_rotation = if mode.rotate { opts.records / 2 } else { 0 };
    if mode.rotate {
        wait_acked(&ledger, before_rotation, &mut vm).await?;
        control.send("rotate").await?;
        control.expect("rotated", &mut vm).await?;
    }
    let stored_at_cut = if mode.pull {
        Some(wait_pull_started(&agent_url, &mut vm).await?)
    } else {
        wait_acked(&ledger, opts.records, &mut vm).await?;
        None
    };
    if let Some(point) = failpoint {
        vm.wait_console(&format!("failpoint {point}: reached"))
            .await?;
    }
    // The cut: producers still pushing, commits still being written.
    stop.store(true, Ordering::SeqCst);
    vm.cut();
    let acked_at_cut = ledger.acked();
    drop(control);

    // Boot 2: the same disk; the aggregator is up; drain and compare.
    if !aggregator.is_running() {
        aggregator.start().await;
    }
    let mut vm = Vm::boot(
        opts,
        &data,
        agent_port,
        ctl_port,
        None,
        &dir.path().join("serial-2.log"),
    )?;
    let _control = Control::accept(&ctl, &mut vm).await?;
    vm.wait_agent(&agent_url).await?;
    for p in producers {
        p.await.context("producer")?;
    }
    let report = drain_and_verify(&db, &agent_url, name, &ledger, mode.key(), &mut vm).await;
    let mut report = report?;
    if mode.process_crash {
        report.note("lost", report.missing);
    }
    report.note("acked_at_cut", acked_at_cut);
    if mode.rotate {
        report.note("acked_before_rotation", before_rotation);
    }
    if let Some(stored) = stored_at_cut {
        report.note("stored_at_cut", stored);
    }
    if mode.renewal {
        // The agent started on a whole identity: the renewal finished from
        // its staged files, and the aggregator now sees the renewed serial.
        let console = std::fs::read_to_string(dir.path().join("serial-2.log")).unwrap_or_default();
        let rolled = console.contains("completed it from the staged files");
        report.note(
            "identity",
            if rolled {
                "rolled-forward"
            } else {
                "unchanged"
            },
        );
        let serial: Option<String> =
            sqlx::query_scalar("SELECT cert_serial FROM agents WHERE name = $1")
                .bind(POWERCUT_AGENT)
                .fetch_optional(&db.pool)
                .await?
                .flatten();
        let renewed = serial.is_some_and(|s| s != first_serial);
        report.note("renewed", renewed);
    }
    vm.cut();
    // Killed, not stopped: the verdict is in, and a graceful stop would wait
    // out the aggregator's drain delay (5 s) in every scenario.
    aggregator.kill();
    if !passes(name, &report) {
        eprintln!(
            "{name}: serial console after the reboot:\n{}\naggregator log:\n{}",
            tail(&dir.path().join("serial-2.log"), 60),
            aggregator.log_tail()
        );
        // Keep the evidence.
        let kept = dir.keep();
        eprintln!("{name}: files kept in {}", kept.display());
    }
    Ok(report)
}

/// The aggregator on the host's loopback, with a server certificate that
/// also names 10.0.2.2 (the address the guest dials).
fn aggregator_service(
    pki: &Pki,
    db: &TestDb,
    port: u16,
    dir: &Path,
    mode: Mode,
) -> anyhow::Result<Service> {
    let server = pki.authority().issue_server(
        &["localhost".to_owned()],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V4(HOST_FROM_GUEST)],
        dcs_certs::Validity::days_from_now(30),
    )?;
    dcs_certs::write_pair(dir, "server", &server)?;
    let mut env = vec![
        ("LISTEN__ADDRESS", format!("127.0.0.1:{port}")),
        ("ADMIN__ADDRESS", "127.0.0.1:0".into()),
        ("TLS__CA", pki.ca.display().to_string()),
        ("TLS__CERT", dir.join("server.pem").display().to_string()),
        ("TLS__KEY", dir.join("server-key.pem").display().to_string()),
        ("DATABASE__URL", db.url.clone()),
        ("DATABASE__MIGRATE_ON_START", "false".into()),
        ("DATABASE__MAX_CONNECTIONS", "4".into()),
        ("LIMITS__RETRY_AFTER", "\"1s\"".into()),
        ("LOG__FORMAT", "json".into()),
    ];
    if mode.renewal {
        env.extend([
            ("ENROLLMENT__ENABLED", "true".into()),
            ("ENROLLMENT__CA_CERT", pki.ca.display().to_string()),
            (
                "ENROLLMENT__CA_KEY",
                pki.path()
                    .join(dcs_certs::CA_KEY_FILE)
                    .display()
                    .to_string(),
            ),
            ("ENROLLMENT__VALIDITY", "\"1h\"".into()),
        ]);
    }
    Ok(Service::aggregator(env, port, &dir.join("aggregator.log")))
}

/// The agent's configuration in the guest.
fn edge_toml(agg_port: u16, mode: Mode, keys: Option<(&str, &[&str])>) -> String {
    let mut toml = format!(
        r#"[listen]
address = "0.0.0.0:{GUEST_AGENT_PORT}"

[buffer]
path = "/data/var/buffer.db"
capacity = "256MiB"
min_free_disk = "16MiB"
"#
    );
    if mode.process_crash {
        toml.push_str("durability = \"process-crash\"\n");
    }
    if let Some((active, previous)) = keys {
        let previous: Vec<String> = previous.iter().map(|p| format!("{p:?}")).collect();
        toml.push_str(&format!(
            "\n[buffer.encryption]\nkey_file = {active:?}\nprevious_key_files = [{}]\n",
            previous.join(", ")
        ));
    }
    if mode.pull {
        toml.push_str(&format!(
            r#"
[[sources]]
name = "powercut-file"
kind = "file"
stream = "{STREAM}"
schedule = "1s"
[sources.file]
paths = ["{PULL_DIR}/*.ndjson"]
format = "ndjson"
"#
        ));
    }
    toml.push_str(&format!(
        r#"
[aggregator]
url = "https://{HOST_FROM_GUEST}:{agg_port}"
ca = "/data/etc/ca.pem"
cert = "/data/etc/agent.pem"
key = "/data/etc/agent-key.pem"
connect_timeout = "5s"
request_timeout = "30s"

[batch]
max_records = 500
linger = "10ms"

[retry]
initial = "50ms"
max = "1s"
shutdown_grace = "2s"

[log]
level = "warn"
"#
    ));
    toml
}

/// The agent's name in its certificate.
const POWERCUT_AGENT: &str = "powercut-1";

/// Writes the data disk: dcs-edge, its configuration and certificates, the
/// guest program, an empty buffer directory. Returns the serial of the
/// agent's certificate.
fn stage_data_disk(
    opts: &Options,
    pki: &Pki,
    agg_port: u16,
    mode: Mode,
    stage: &Path,
    image: &Path,
) -> anyhow::Result<String> {
    let etc = stage.join("etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::create_dir_all(stage.join("bin"))?;
    std::fs::create_dir_all(stage.join("var"))?;
    // The debug build without its debug info (a tenth of the size): the
    // same code, quicker onto the disk and into the guest's memory.
    let edge = stage.join("bin/dcs-edge");
    let stripped = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&edge)
        .arg(binary("dcs-edge"))
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(binary("dcs-edge"), &edge)?;
    }
    std::fs::copy(&opts.guest_script, stage.join("guest.sh"))?;
    let cert = if mode.renewal {
        pki.renewable_agent("acme", POWERCUT_AGENT)
    } else {
        pki.agent("acme", POWERCUT_AGENT)
    };
    let serial = dcs_certs::enroll::certificate_info(&std::fs::read_to_string(&cert.cert)?)?.serial;
    std::fs::copy(&cert.cert, etc.join("agent.pem"))?;
    std::fs::copy(&cert.key, etc.join("agent-key.pem"))?;
    std::fs::copy(&cert.ca, etc.join("ca.pem"))?;
    let config = if mode.rotate {
        let key: String = (0..32)
            .map(|_| format!("{:02x}", fastrand::u8(..)))
            .collect();
        std::fs::write(etc.join("buffer-a.key"), key)?;
        std::fs::write(
            etc.join("edge-rotated.toml"),
            edge_toml(
                agg_port,
                mode,
                Some(("/data/etc/buffer-b.key", &["/data/etc/buffer-a.key"])),
            ),
        )?;
        edge_toml(agg_port, mode, Some(("/data/etc/buffer-a.key", &[])))
    } else {
        edge_toml(agg_port, mode, None)
    };
    std::fs::write(etc.join("edge.toml"), config)?;
    if mode.pull {
        let dir = stage.join(PULL_DIR.trim_start_matches("/data/"));
        std::fs::create_dir_all(&dir)?;
        let lines: String = pulled_keys(opts.records)
            .iter()
            .map(|k| format!("{{\"k\":\"{k}\",\"note\":\"power-cut pulled record\"}}\n"))
            .collect();
        std::fs::write(dir.join("records.ndjson"), lines)?;
    }
    crate::process::run_checked(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "dcs-data", "-d"])
            .arg(stage)
            .arg(image)
            .arg("1G"),
    )
    .context("mkfs.ext4 -d (e2fsprogs) for the data disk")?;
    Ok(serial)
}

/// One boot of the guest.
struct Vm {
    child: Option<Child>,
    serial: PathBuf,
}

impl Vm {
    fn boot(
        opts: &Options,
        data: &Path,
        agent_port: u16,
        ctl_port: u16,
        failpoint: Option<&str>,
        serial: &Path,
    ) -> anyhow::Result<Vm> {
        let mut append = format!(
            "console=ttyS0 root=/dev/vda ro rootfstype=ext4 init=/sbin/dcs-powercut-init \
             panic=-1 quiet dcs.ctl={ctl_port}"
        );
        if let Some(point) = failpoint {
            append.push_str(&format!(" dcs.failpoint={point}"));
        }
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "1",
            ])
            .args(["-m", &opts.memory_mib.to_string()])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(&opts.image.kernel)
            .arg("-initrd")
            .arg(&opts.image.initrd)
            .args(["-append", &append])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,readonly=on",
                opts.image.rootfs.display()
            ))
            // cache=none: the guest's writes go to the image with O_DIRECT
            // and its flushes become fdatasync; nothing the guest did not
            // flush survives a SIGKILL of qemu in a host-side cache.
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,cache=none,aio=threads",
                data.display()
            ))
            .args(["-netdev"])
            .arg(format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{agent_port}-:{GUEST_AGENT_PORT}"
            ))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start qemu-system-x86_64 (Debian package qemu-system-x86)")?;
        Ok(Vm {
            child: Some(child),
            serial: serial.to_owned(),
        })
    }

    /// The power cut: SIGKILL of qemu.
    fn cut(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// An error with the console's tail if qemu is gone.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("the VM is off");
        };
        if let Some(status) = child.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read as _;
                let _ = e.read_to_string(&mut stderr);
            }
            self.child = None;
            bail!(
                "qemu exited with {status}: {}\nconsole:\n{}",
                stderr.trim(),
                tail(&self.serial, 40)
            );
        }
        Ok(())
    }

    /// Waits until the guest's console shows `text`.
    async fn wait_console(&mut self, text: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            self.check_alive()?;
            let console = std::fs::read(&self.serial).unwrap_or_default();
            if String::from_utf8_lossy(&console).contains(text) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the console did not show {text:?} within {BOOT_TIMEOUT:?}:\n{}",
                    tail(&self.serial, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the agent in the guest answers `/v1/status`.
    async fn wait_agent(&mut self, url: &str) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            self.check_alive()?;
            if let Ok(r) = client.get(format!("{url}/v1/status")).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent in the VM did not answer within {BOOT_TIMEOUT:?}; console:\n{}",
                    tail(&self.serial, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.cut();
    }
}

/// The guest's command line to the harness (see tests/powercut/guest.sh).
struct Control {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Control {
    async fn accept(listener: &TcpListener, vm: &mut Vm) -> anyhow::Result<Control> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let stream: TcpStream = loop {
            vm.check_alive()?;
            match tokio::time::timeout(Duration::from_secs(1), listener.accept()).await {
                Ok(accepted) => break accepted?.0,
                Err(_) if Instant::now() > deadline => bail!(
                    "the guest did not boot within {BOOT_TIMEOUT:?}; console:\n{}",
                    tail(&vm.serial, 40)
                ),
                Err(_) => {}
            }
        };
        let (read, writer) = stream.into_split();
        let mut control = Control {
            reader: BufReader::new(read),
            writer,
        };
        control.expect("booted", vm).await?;
        Ok(control)
    }

    async fn send(&mut self, command: &str) -> anyhow::Result<()> {
        self.writer
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        Ok(())
    }

    async fn expect(&mut self, word: &str, vm: &mut Vm) -> anyhow::Result<()> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut line = String::new();
        loop {
            vm.check_alive()?;
            match tokio::time::timeout(Duration::from_secs(1), self.reader.read_line(&mut line))
                .await
            {
                Ok(Ok(0)) => bail!("the guest closed the control connection"),
                Ok(Ok(_)) if line.trim() == word => return Ok(()),
                Ok(Ok(_)) => bail!("the guest said {:?}, expected {word:?}", line.trim()),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) if Instant::now() > deadline => bail!(
                    "no {word:?} from the guest within {BOOT_TIMEOUT:?}; console:\n{}",
                    tail(&vm.serial, 40)
                ),
                Err(_) => {}
            }
        }
    }
}

/// The keys of the file the pull scenario's source reads, one a line.
fn pulled_keys(records: usize) -> Vec<String> {
    (0..records).map(|i| format!("f-{i}")).collect()
}

/// Waits until the file source has stored its first records, and returns
/// how many: the cut follows at once, while it stores the rest.
async fn wait_pull_started(agent_url: &str, vm: &mut Vm) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        vm.check_alive()?;
        let stored = crate::agent::status(agent_url).await["buffer"]["records"]
            .as_u64()
            .unwrap_or(0);
        if stored > 0 {
            return Ok(stored);
        }
        if Instant::now() > deadline {
            bail!(
                "the file source stored nothing in 300 s; console:\n{}",
                tail(&vm.serial, 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_acked(ledger: &Ledger, target: usize, vm: &mut Vm) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while ledger.acked() < target {
        vm.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "only {} of {target} records acknowledged in 600 s; console:\n{}",
                ledger.acked(),
                tail(&vm.serial, 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One producer: NDJSON requests of 50 unique ids until `stop`. A request
/// without an answer (the power is off, the agent restarts) is retried with
/// the same ids until it gets one, which the agent deduplicates, so every
/// id pushed ends acknowledged or refused.
async fn produce(url: String, producer: usize, ledger: Arc<Ledger>, stop: Arc<AtomicBool>) {
    const CHUNK: usize = 50;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .no_proxy()
        .build()
        .expect("client");
    let mut next = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let request = Request::new(producer, next..next + CHUNK, "power-cut record");
        next += CHUNK;
        let give_up = Instant::now() + BOOT_TIMEOUT * 2;
        request
            .push(&client, &url, give_up, Duration::from_millis(200), &ledger)
            .await;
    }
}

async fn drain_and_verify(
    db: &TestDb,
    agent_url: &str,
    name: &str,
    ledger: &Ledger,
    key: RecordKey,
    vm: &mut Vm,
) -> anyhow::Result<Report> {
    // Drained: every acknowledged record arrived and the buffer is empty, or
    // (records were lost) the buffer is empty and nothing has arrived for
    // 20 s, or the time is up. The VM is watched meanwhile.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let (mut last, mut since) = (-1i64, Instant::now());
    loop {
        vm.check_alive()?;
        let present: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(DISTINCT {}) FROM records WHERE stream = $1",
            key.sql()
        )))
        .bind(STREAM)
        .fetch_one(&db.pool)
        .await
        .unwrap_or(0);
        if present != last {
            (last, since) = (present, Instant::now());
        }
        let empty = crate::agent::status(agent_url).await["buffer"]["records"] == 0;
        let all = present as usize >= ledger.acked();
        if (empty && (all || since.elapsed() > Duration::from_secs(20)))
            || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(crate::chaos::compare_on(&db.pool, name, ledger, key).await)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
