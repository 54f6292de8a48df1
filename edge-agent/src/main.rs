use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use dcs_edge::Config;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (Command::Run { config } | Command::CheckConfig { config }) = &cli.command;
    let config = match Config::load(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dcs-edge: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::CheckConfig { .. } => {
            println!("configuration OK");
            ExitCode::SUCCESS
        }
        Command::Run { .. } => match run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(message = "agent failed", error = format!("{e:#}"));
                eprintln!("dcs-edge: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    dcs_shared::tls::install_crypto_provider();
    dcs_shared::telemetry::init(config.log.format, &config.log.level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&config.listen.address)
            .await
            .with_context(|| format!("bind ingest API on {}", config.listen.address))?;
        dcs_edge::run(config, listener, dcs_shared::shutdown::signal())
            .await
            .context("run agent")
    })
}
