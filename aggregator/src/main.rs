//! `dcs-aggregator`: serve agents, check a configuration, or migrate the schema.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use dcs_aggregator::{Config, ConfigError};

/// Exit status for a configuration that does not validate, so scripts can
/// tell "fix the config" from "something failed at run time" (1).
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(name = "dcs-aggregator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accept batches from agents (runs pending migrations first unless
    /// database.migrate_on_start = false).
    Serve(ConfigArg),
    /// Validate the configuration and the files it names, then exit.
    CheckConfig(ConfigArg),
    /// Apply pending database migrations, then exit.
    Migrate(ConfigArg),
}

#[derive(clap::Args)]
struct ConfigArg {
    /// TOML configuration; `DCS_AGG_SECTION__KEY` variables override it.
    #[arg(long, short, env = dcs_aggregator::config::ENV_CONFIG_FILE)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dcs-aggregator: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            tracing::error!(
                message = "dcs-aggregator failed",
                error = format!("{error:#}")
            );
            eprintln!("dcs-aggregator: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    dcs_shared::tls::install_crypto_provider();
    match command {
        Command::CheckConfig(arg) => {
            let result = Config::load(arg.config.as_deref(), std::env::vars())
                .and_then(|config| config.check_files());
            Ok(match result {
                Ok(()) => {
                    println!("configuration OK");
                    ExitCode::SUCCESS
                }
                Err(error) => bad_config(&error),
            })
        }
        Command::Migrate(arg) => {
            let config = match Config::load(arg.config.as_deref(), std::env::vars()) {
                Ok(config) => config,
                Err(error) => return Ok(bad_config(&error)),
            };
            dcs_shared::telemetry::init(config.log.format, &config.log.level);
            let pool = dcs_aggregator::connect(&config.database).await?;
            dcs_aggregator::migrate(&pool).await?;
            tracing::info!(message = "migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(arg) => {
            let config = match Config::load(arg.config.as_deref(), std::env::vars()) {
                Ok(config) => config,
                Err(error) => return Ok(bad_config(&error)),
            };
            dcs_shared::telemetry::init(config.log.format, &config.log.level);
            let pool = dcs_aggregator::connect(&config.database).await?;
            if config.database.migrate_on_start {
                dcs_aggregator::migrate(&pool).await?;
                tracing::info!(message = "migrations applied");
            }
            let listener = tokio::net::TcpListener::bind(config.listen.address)
                .await
                .with_context(|| format!("bind {}", config.listen.address))?;
            dcs_aggregator::serve(
                listener,
                config,
                pool.clone(),
                dcs_shared::shutdown::signal(),
            )
            .await?;
            pool.close().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn bad_config(error: &ConfigError) -> ExitCode {
    eprintln!("{error}");
    ExitCode::from(EXIT_BAD_CONFIG)
}
