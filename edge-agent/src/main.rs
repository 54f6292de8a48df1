use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use dcs_edge::{CompiledConfig, Config};

/// DCS edge agent: buffers records durably and forwards them over mutual TLS.
#[derive(Parser)]
#[command(name = "dcs-edge", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// TOML configuration file; every key can be overridden by DCS_EDGE_*.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate the configuration and exit, naming every bad key.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Get this agent's certificate with a one-time enrollment token: makes
    /// the key pair here, sends only a CSR, writes key (0600), certificate
    /// and CA bundle. Paths default to the configuration's aggregator.cert,
    /// .key and .ca (with --config), else agent.pem, agent-key.pem and ca.pem
    /// in the current directory.
    Enroll {
        /// The aggregator's platform API, e.g. https://dcs.example.net:8444.
        #[arg(long)]
        url: String,
        /// The enrollment token (`dcse_...`); better passed in DCS_ENROLL_TOKEN
        /// than on the command line, where other users can see it.
        #[arg(long, env = "DCS_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// CA certificate(s) to verify the aggregator with (default: the
        /// configuration's aggregator.ca, if that file exists).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// Agent configuration to take the output paths from. It need not
        /// validate yet (its certificate does not exist).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Where to write the certificate.
        #[arg(long, value_name = "FILE")]
        cert_out: Option<PathBuf>,
        /// Where to write the private key (0600).
        #[arg(long, value_name = "FILE")]
        key_out: Option<PathBuf>,
        /// Where to write the CA bundle the aggregator returns.
        #[arg(long, value_name = "FILE")]
        ca_out: Option<PathBuf>,
    },
    /// Inspect or repair a buffer file offline. None of these changes the
    /// files it reads or creates any beside them; `salvage` writes only into
    /// its output directory. All but `salvage` are safe beside a running agent.
    Buffer {
        #[command(subcommand)]
        action: BufferAction,
    },
}

#[derive(Subcommand)]
enum BufferAction {
    /// Integrity check (SQLite and the agent's own invariants); exit 1 if damaged.
    Check(BufferArgs),
    /// Counts by stream and state, oldest and newest, dead letters, key ids (JSON).
    Stats(BufferArgs),
    /// Copy every readable record of a damaged file into a recovered buffer
    /// in DIR; put it in `recovered/` beside the agent's buffer to deliver it.
    Salvage {
        #[command(flatten)]
        args: BufferArgs,
        #[arg(long, value_name = "DIR")]
        into: PathBuf,
    },
    /// Write every record as NDJSON to stdout (buffered, then dead letters).
    Export(BufferArgs),
}

#[derive(clap::Args)]
struct BufferArgs {
    /// The buffer file (default: buffer.path of the configuration).
    #[arg(long)]
    path: Option<PathBuf>,
    /// Agent configuration, for buffer.path and the encryption keys.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl BufferArgs {
    /// The file and the keys to open it with. Only the `[buffer]` section of
    /// the configuration is needed, so a config whose other parts do not
    /// validate on this machine (certificates elsewhere) still works.
    fn resolve(&self) -> anyhow::Result<(PathBuf, dcs_edge::seal::Keyring)> {
        let buffer = match &self.config {
            Some(file) => Some(load_buffer_section(file)?),
            None => None,
        };
        let path = match (&self.path, &buffer) {
            (Some(path), _) => path.clone(),
            (None, Some(b)) => b.path.clone(),
            (None, None) => anyhow::bail!("give --path FILE or --config FILE"),
        };
        let keyring = match &buffer {
            Some(b) => b.encryption.keyring()?,
            None => dcs_edge::seal::Keyring::disabled(),
        };
        Ok((path, keyring))
    }
}

/// Allocations at least this large get their own mapping, returned to the
/// system when freed (glibc's starting threshold, kept fixed).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 128 * 1024;
/// malloc arenas shared by all threads (glibc's default is 8 per core, and
/// the agent has up to 18 threads). Two arenas saved 4 MB more but cost a
/// fifth of the ingest rate in lock waits; four cost nothing measurable.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENA_MAX: i32 = 4;

/// Keeps the agent's heap near what it uses. glibc raises its mmap threshold
/// to the size of each large block freed (up to 32 MiB), after which request
/// bodies and batch buffers of a few hundred KiB come from the arenas, one per
/// blocking thread, and each arena keeps its high-water mark: an agent with
/// 11 MB of live heap held 33 MB after filling and draining a backlog
/// (docs/PERFORMANCE.md). A fixed threshold and at most four arenas, with
/// batches streamed into gzip, took the drain's peak from 43 to about 30 MB
/// at the same rates. An operator's own malloc settings in the environment
/// are left alone.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    let operator_set = [
        "GLIBC_TUNABLES",
        "MALLOC_ARENA_MAX",
        "MALLOC_MMAP_THRESHOLD_",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some());
    if operator_set {
        return;
    }
    // SAFETY: mallopt only changes malloc's parameters; it runs first in
    // main, before any other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, ARENA_MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let config = match &cli.command {
        Command::Run { config } | Command::CheckConfig { config } => config,
        Command::Enroll { .. } => {
            let Command::Enroll {
                url,
                token,
                ca,
                config,
                cert_out,
                key_out,
                ca_out,
            } = cli.command
            else {
                unreachable!("matched above")
            };
            let outputs = Outputs {
                cert: cert_out,
                key: key_out,
                ca: ca_out,
            };
            return match enroll(&url, &token, ca, config.as_deref(), outputs) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dcs-edge: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Buffer { action } => {
            return match buffer_command(action) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("dcs-edge: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let config = match Config::load(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dcs-edge: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Buffer { .. } | Command::Enroll { .. } => unreachable!("handled above"),
        Command::CheckConfig { .. } => {
            println!("configuration OK");
            ExitCode::SUCCESS
        }
        Command::Run { config: file } => {
            // The configuration names the buffer's keys: like the key files
            // (fsynced as they are read), it must not roll back in a power
            // cut after records were sealed under it.
            if let Some(file) = file
                && let Err(e) = dcs_edge::durable::make_durable(&file)
            {
                eprintln!("dcs-edge: fsync {}: {e}", file.display());
                return ExitCode::from(2);
            }
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(message = "agent failed", error = format!("{e:#}"));
                    eprintln!("dcs-edge: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Async worker threads, whatever the number of cores: the agent runs on a
/// client's machine beside the producers it serves, and its work (HTTP
/// parsing, gzip, TLS) is done in a few tasks at a time; one worker per core
/// of a 64-core host would only add threads, stacks and allocator arenas.
const RUNTIME_WORKER_THREADS: usize = 2;
/// Threads for blocking work (SQLite reads, request parsing, batch encoding),
/// bounded so that a burst of producer requests queues instead of starting
/// tokio's default of up to 512 threads, each with its own malloc arena.
const RUNTIME_MAX_BLOCKING_THREADS: usize = 16;

fn run(config: CompiledConfig) -> anyhow::Result<()> {
    dcs_shared::tls::install_crypto_provider();
    config.config().log.init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKER_THREADS)
        .max_blocking_threads(RUNTIME_MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
        .context("start runtime")?;
    runtime.block_on(async {
        let address = config.config().listen.address.clone();
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("bind ingest API on {address}"))?;
        dcs_edge::run(config, listener, dcs_shared::shutdown::signal())
            .await
            .context("run agent")
    })
}

/// Output paths given on the command line.
struct Outputs {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
}

fn enroll(
    url: &str,
    token: &str,
    trust: Option<PathBuf>,
    config: Option<&std::path::Path>,
    outputs: Outputs,
) -> anyhow::Result<()> {
    dcs_shared::tls::install_crypto_provider();
    let from_config = match config {
        Some(file) => Some(load_aggregator_paths(file)?),
        None => None,
    };
    let pick = |given: Option<PathBuf>, configured: Option<&PathBuf>, default: &str| {
        given
            .or_else(|| configured.cloned())
            .unwrap_or_else(|| PathBuf::from(default))
    };
    let paths = dcs_edge::enroll::IdentityPaths {
        cert: pick(
            outputs.cert,
            from_config.as_ref().and_then(|p| p.cert.as_ref()),
            "agent.pem",
        ),
        key: pick(
            outputs.key,
            from_config.as_ref().and_then(|p| p.key.as_ref()),
            "agent-key.pem",
        ),
        ca: pick(
            outputs.ca,
            from_config.as_ref().and_then(|p| p.ca.as_ref()),
            "ca.pem",
        ),
    };
    let trust = match trust {
        Some(trust) => trust,
        None => match from_config.as_ref().and_then(|p| p.ca.clone()) {
            Some(ca) if ca.is_file() => ca,
            _ => anyhow::bail!(
                "give --ca FILE: the CA certificate that verifies the aggregator (it is not fetched over the network)"
            ),
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    let issued = runtime
        .block_on(dcs_edge::enroll::enroll(url, token, &trust, &paths))
        .context("enroll")?;
    // Never the key: only where it is.
    println!(
        "enrolled as dcs://{}/{} (serial {}, valid until {})",
        issued.tenant, issued.agent, issued.serial, issued.not_after
    );
    println!("certificate: {}", paths.cert.display());
    println!("private key: {} (0600)", paths.key.display());
    println!("CA bundle:   {}", paths.ca.display());
    Ok(())
}

/// `aggregator.cert`, `.key` and `.ca` of a configuration file, read without
/// validating it (before enrollment the certificate does not exist yet).
#[derive(Default)]
struct AggregatorPaths {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
}

fn load_aggregator_paths(file: &std::path::Path) -> anyhow::Result<AggregatorPaths> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("read configuration {}", file.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parse {}", file.display()))?;
    let Some(section) = table.get("aggregator").and_then(|s| s.as_table()) else {
        return Ok(AggregatorPaths::default());
    };
    let path = |key: &str| section.get(key).and_then(|v| v.as_str()).map(PathBuf::from);
    Ok(AggregatorPaths {
        cert: path("cert"),
        key: path("key"),
        ca: path("ca"),
    })
}

fn buffer_command(action: &BufferAction) -> anyhow::Result<ExitCode> {
    use dcs_edge::fsck;
    match action {
        BufferAction::Check(args) => {
            let (path, _) = args.resolve()?;
            Ok(match fsck::check(&path) {
                None => {
                    println!("ok: {}", path.display());
                    ExitCode::SUCCESS
                }
                Some(problem) => {
                    println!("damaged: {}: {problem}", path.display());
                    ExitCode::FAILURE
                }
            })
        }
        BufferAction::Stats(args) => {
            let (path, _) = args.resolve()?;
            let stats = fsck::stats(&path)?;
            println!("{}", serde_json::to_string_pretty(&stats)?);
            Ok(ExitCode::SUCCESS)
        }
        BufferAction::Salvage { args, into } => {
            let (path, keyring) = args.resolve()?;
            let report = fsck::salvage(&path, into, &keyring)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        BufferAction::Export(args) => {
            let (path, keyring) = args.resolve()?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let exported = fsck::export(&path, &keyring, &mut out, &mut std::io::stderr())?;
            std::io::Write::flush(&mut out)?;
            let unreadable = exported.unreadable.unwrap_or(exported.skipped);
            eprintln!(
                "exported {} records, skipped {} unreadable rows; \
                 buffered records that could not be read: {unreadable}",
                exported.written, exported.skipped
            );
            Ok(if exported.skipped == 0 && unreadable == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// The `[buffer]` section of a configuration file (defaults where absent).
fn load_buffer_section(file: &std::path::Path) -> anyhow::Result<dcs_edge::config::BufferConfig> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("read configuration {}", file.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parse {}", file.display()))?;
    match table.get("buffer") {
        Some(section) => section
            .clone()
            .try_into()
            .with_context(|| format!("{}: section [buffer]", file.display())),
        None => Ok(Default::default()),
    }
}
