//! `dcs-aggregator`: serve agents, check a configuration, migrate the schema,
//! or administer agents, tenants and tokens directly in the database.

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
    /// Create the coming days' record partitions and drop those older than
    /// retention.days (or --days).
    Retention {
        /// Only list the partitions that would be dropped.
        #[arg(long)]
        dry_run: bool,
        /// Override retention.days for this run.
        #[arg(long)]
        days: Option<u32>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the platform API's OpenAPI document (also served at
    /// /openapi.json), for validators and client generators.
    Openapi,
    /// List, revoke or reinstate agents.
    Agents {
        #[command(subcommand)]
        command: AgentsCommand,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke or reinstate a single certificate by serial number.
    Serial {
        #[command(subcommand)]
        command: SerialCommand,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Create, list, disable or enable tenants.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Create, list or revoke platform API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Create, list or disable one-time agent enrollment tokens.
    EnrollmentToken {
        #[command(subcommand)]
        command: EnrollmentTokenCommand,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Ask every agent to send again the records it acknowledged since a
    /// time (after restoring PostgreSQL to that point in time). Agents that
    /// retain delivered records (buffer.retain_delivered) resend them once;
    /// what the database still holds is answered as a duplicate.
    Replay {
        /// RFC 3339, e.g. 2026-12-06T01:00:00Z: the restore's target time.
        #[arg(long, value_parser = parse_rfc3339)]
        since: time::OffsetDateTime,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn parse_rfc3339(text: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time ({e}); e.g. 2026-12-06T01:00:00Z"))
}

#[derive(Subcommand)]
enum EnrollmentTokenCommand {
    /// Print a new one-time enrollment token on stdout for `dcs-edge enroll`.
    /// It is shown this once and stored only as a hash.
    Create {
        #[arg(long)]
        tenant: String,
        /// The agent id the certificate will carry.
        #[arg(long)]
        agent: String,
        /// Lifetime such as 2h (default 24h, at most enrollment.max_token_ttl).
        #[arg(long)]
        expires_in: Option<String>,
    },
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    Disable {
        id: i64,
    },
}

#[derive(Subcommand)]
enum AgentsCommand {
    /// Every agent with its last contact, backlog, certificate and state.
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Refuse the agent's batches (within revocation.refresh_interval on
    /// every aggregator). An agent never seen is registered revoked.
    Revoke { tenant: String, agent: String },
    /// Accept the agent's batches again.
    Unrevoke { tenant: String, agent: String },
}

#[derive(Subcommand)]
enum SerialCommand {
    /// Refuse the certificate with this serial (hex, colons allowed).
    Revoke {
        serial: String,
        #[arg(long)]
        reason: Option<String>,
    },
    Unrevoke {
        serial: String,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    Create {
        id: String,
        #[arg(long)]
        display_name: Option<String>,
    },
    List,
    /// Refuse every token and agent of the tenant.
    Disable {
        id: String,
    },
    Enable {
        id: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new token on stdout. It is shown this once and stored only as
    /// a hash.
    Create {
        #[arg(long)]
        name: String,
        /// admin or reader.
        #[arg(long)]
        role: String,
        /// Scope the token to one tenant; without it the token sees all.
        #[arg(long)]
        tenant: Option<String>,
        /// Lifetime such as 90d or 12h; without it the token does not expire.
        #[arg(long)]
        expires_in: Option<String>,
    },
    List,
    Revoke {
        id: i64,
    },
}

#[derive(clap::Args)]
struct ConfigArg {
    /// TOML configuration; `DCS_AGG_SECTION__KEY` variables override it.
    #[arg(long, short, global = true, env = dcs_aggregator::config::ENV_CONFIG_FILE)]
    config: Option<PathBuf>,
    /// Who is acting, for the audit trail; recorded as claimed, beside the
    /// operating-system user, which is what the trail relies on.
    #[arg(long, global = true, value_name = "NAME")]
    actor: Option<String>,
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
            config.log.init();
            let pool = dcs_aggregator::connect(&config.database).await?;
            dcs_aggregator::migrate(&pool).await?;
            tracing::info!(message = "migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Retention {
            dry_run,
            days,
            config,
        } => {
            let loaded = match Config::load(config.config.as_deref(), std::env::vars()) {
                Ok(loaded) => loaded,
                Err(error) => return Ok(bad_config(&error)),
            };
            let retention = loaded.retention;
            admin(config, |pool, actor| async move {
                let days = days.unwrap_or(retention.days);
                if days == 0 {
                    anyhow::bail!("retention.days is 0 (keep everything); pass --days N to drop");
                }
                let report = dcs_aggregator::retention::run(
                    &pool,
                    days,
                    retention.partitions_ahead,
                    dry_run,
                    &actor,
                )
                .await
                .context("run retention")?;
                print_json(&report)
            })
            .await
        }
        Command::Openapi => {
            print_json(&dcs_aggregator::platform::openapi::document())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agents { command, config } => {
            admin(config, |pool, actor| async move {
                use dcs_aggregator::platform::agents;
                match command {
                    AgentsCommand::List { tenant } => {
                        print_json(&agents::list_agents(&pool, tenant.as_deref()).await?)
                    }
                    AgentsCommand::Revoke { tenant, agent } => print_json(
                        &agents::set_agent_revoked(&pool, &tenant, &agent, true, actor, None)
                            .await?,
                    ),
                    AgentsCommand::Unrevoke { tenant, agent } => print_json(
                        &agents::set_agent_revoked(&pool, &tenant, &agent, false, actor, None)
                            .await?,
                    ),
                }
            })
            .await
        }
        Command::Replay {
            since,
            reason,
            config,
        } => {
            admin(config, |pool, actor| async move {
                let request = dcs_aggregator::replay::request(&pool, since, actor, &reason).await?;
                print_json(&request)
            })
            .await
        }
        Command::Serial { command, config } => {
            admin(config, |pool, actor| async move {
                use dcs_aggregator::platform::agents;
                match command {
                    SerialCommand::Revoke { serial, reason } => {
                        let new = agents::NewRevokedSerial { serial, reason };
                        print_json(&agents::revoke_serial_as(&pool, &new, actor, None).await?)
                    }
                    SerialCommand::Unrevoke { serial } => {
                        agents::unrevoke_serial_as(&pool, &serial, actor, None).await?;
                        Ok(())
                    }
                }
            })
            .await
        }
        Command::Tenant { command, config } => {
            admin(config, |pool, actor| async move {
                use dcs_aggregator::platform::tenants;
                match command {
                    TenantCommand::Create { id, display_name } => {
                        let new = tenants::NewTenant { id, display_name };
                        print_json(&tenants::create_tenant(&pool, &new, actor, None).await?)
                    }
                    TenantCommand::List => print_json(&tenants::list_tenants(&pool, None).await?),
                    TenantCommand::Disable { id } => {
                        print_json(&tenants::set_disabled(&pool, &id, true, actor, None).await?)
                    }
                    TenantCommand::Enable { id } => {
                        print_json(&tenants::set_disabled(&pool, &id, false, actor, None).await?)
                    }
                }
            })
            .await
        }
        Command::Token { command, config } => {
            admin(config, |pool, actor| async move {
                use dcs_aggregator::platform::tokens;
                match command {
                    TokenCommand::Create {
                        name,
                        role,
                        tenant,
                        expires_in,
                    } => {
                        let new = tokens::NewToken {
                            name,
                            role,
                            tenant,
                            expires_in,
                        };
                        let created = tokens::create_token(&pool, &new, actor, None).await?;
                        eprintln!("token {} created; it is shown only now:", created.info.id);
                        println!("{}", created.token);
                        Ok(())
                    }
                    TokenCommand::List => print_json(&tokens::list_tokens(&pool, None).await?),
                    TokenCommand::Revoke { id } => {
                        print_json(&tokens::revoke_token(&pool, id, None, actor, None).await?)
                    }
                }
            })
            .await
        }
        Command::EnrollmentToken { command, config } => {
            let loaded = match Config::load(config.config.as_deref(), std::env::vars()) {
                Ok(loaded) => loaded,
                Err(error) => return Ok(bad_config(&error)),
            };
            let max_ttl = loaded.enrollment.max_token_ttl;
            admin(config, |pool, actor| async move {
                use dcs_aggregator::platform::enrollment;
                match command {
                    EnrollmentTokenCommand::Create {
                        tenant,
                        agent,
                        expires_in,
                    } => {
                        let new = enrollment::NewEnrollmentToken {
                            tenant: Some(tenant),
                            agent,
                            expires_in,
                        };
                        let created =
                            enrollment::create_enrollment_token(&pool, &new, max_ttl, actor, None)
                                .await?;
                        eprintln!(
                            "enrollment token {} for dcs://{}/{} created, valid until {}; it is shown only now:",
                            created.info.id,
                            created.info.tenant,
                            created.info.agent,
                            created.info.expires_at
                        );
                        println!("{}", created.token);
                        Ok(())
                    }
                    EnrollmentTokenCommand::List { tenant } => print_json(
                        &enrollment::list_enrollment_tokens(&pool, tenant.as_deref()).await?,
                    ),
                    EnrollmentTokenCommand::Disable { id } => print_json(
                        &enrollment::disable_enrollment_token(&pool, id, None, actor, None).await?,
                    ),
                }
            })
            .await
        }
        Command::Serve(arg) => {
            let config = match Config::load(arg.config.as_deref(), std::env::vars()) {
                Ok(config) => config,
                Err(error) => return Ok(bad_config(&error)),
            };
            config.log.init();
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

/// Runs an operator command against the configured database, as
/// `cli:<login name>` in the audit trail.
async fn admin<F, Fut>(arg: ConfigArg, command: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(sqlx::PgPool, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let config = match Config::load(arg.config.as_deref(), std::env::vars()) {
        Ok(config) => config,
        Err(error) => return Ok(bad_config(&error)),
    };
    let pool = dcs_aggregator::connect(&config.database).await?;
    let actor = cli_actor(arg.actor.as_deref());
    let result = command(pool.clone(), actor).await;
    pool.close().await;
    result.map(|()| ExitCode::SUCCESS)
}

/// `cli:<user>` for the real user id of this process (`$USER` is whatever the
/// caller sets), plus ` (claims NAME)` with `--actor NAME`.
fn cli_actor(claimed: Option<&str>) -> String {
    let uid = nix::unistd::getuid();
    let user = match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => user.name,
        _ => format!("uid:{uid}"),
    };
    match claimed {
        // Bounded and on one line, so a claim cannot forge another entry.
        Some(name) => {
            let name: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
            format!("cli:{user} (claims {name})")
        }
        None => format!("cli:{user}"),
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("render JSON")?
    );
    Ok(())
}

fn bad_config(error: &ConfigError) -> ExitCode {
    eprintln!("{error}");
    ExitCode::from(EXIT_BAD_CONFIG)
}
