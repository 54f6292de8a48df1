//! `dcs-certs`: create the DCS CA, the aggregator's server certificate and
//! agent client certificates. A thin shell over the `dcs_certs` library.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{ArgGroup, Parser, Subcommand};
use dcs_certs::{Ca, Validity, write_agent_bundle, write_pair};

/// Upper bound for --days. Nobody needs a certificate for more than a
/// century, and a bound keeps typos like an extra digit from going unnoticed.
const MAX_DAYS: u32 = 36_500;

/// Same exit code clap uses for usage errors, so scripts see one code for
/// "you asked for something that cannot be done".
const EXIT_ERROR: u8 = 2;

#[derive(Parser)]
#[command(name = "dcs-certs", version, about = "Certificates for DCS mutual TLS")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new CA: DIR/ca.pem and DIR/ca-key.pem.
    Init {
        /// Directory for the CA files (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, value_name = "N", default_value_t = 3650, value_parser = days())]
        days: u32,
        /// Common name of the CA certificate.
        #[arg(long, value_name = "NAME", default_value = "DCS Root CA", value_parser = common_name)]
        cn: String,
        /// Replace an existing CA. Every certificate it issued stops verifying.
        #[arg(long)]
        force: bool,
    },
    /// Issue the aggregator's server certificate: DIR/server.pem and DIR/server-key.pem.
    #[command(group(ArgGroup::new("names").args(["dns", "ip"]).required(true).multiple(true)))]
    Server {
        /// Directory holding the CA (from `init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Directory for the server files (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// DNS name clients use to reach the aggregator (repeatable).
        #[arg(long, value_name = "NAME", value_parser = dns_name)]
        dns: Vec<String>,
        /// IP address clients use to reach the aggregator (repeatable).
        #[arg(long, value_name = "ADDR")]
        ip: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, value_name = "N", default_value_t = 825, value_parser = days())]
        days: u32,
    },
    /// Issue an agent's client certificate: DIR/agent.pem, DIR/agent-key.pem and DIR/ca.pem.
    Agent {
        /// Directory holding the CA (from `init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Tenant id: 1-64 of [a-z0-9_.-], starting with [a-z0-9].
        #[arg(long, value_name = "TENANT", value_parser = tenant_id)]
        tenant: String,
        /// Agent id: 1-64 of [a-z0-9_.-], starting with [a-z0-9].
        #[arg(long, value_name = "AGENT_ID", value_parser = agent_id)]
        agent: String,
        /// Directory for the agent files (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, value_name = "N", default_value_t = 365, value_parser = days())]
        days: u32,
    },
}

// Validation happens in clap's value parsers so that the error message names
// the offending argument and nothing runs (or is written) after a bad one.

fn days() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i64::from(MAX_DAYS))
}

fn tenant_id(value: &str) -> Result<String, dcs_certs::Error> {
    dcs_certs::validate_identifier("tenant", value).map(|()| value.to_owned())
}

fn agent_id(value: &str) -> Result<String, dcs_certs::Error> {
    dcs_certs::validate_identifier("agent", value).map(|()| value.to_owned())
}

fn dns_name(value: &str) -> Result<String, dcs_certs::Error> {
    dcs_certs::validate_dns_name(value).map(|()| value.to_owned())
}

fn common_name(value: &str) -> Result<String, &'static str> {
    if value.trim().is_empty() {
        Err("must not be empty")
    } else {
        Ok(value.to_owned())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Returns the one line reporting what was written.
fn run(command: Command) -> Result<String> {
    match command {
        Command::Init {
            out,
            days,
            cn,
            force,
        } => {
            let ca = Ca::generate(&cn, Validity::days_from_now(days))?;
            if force {
                ca.write_replacing(&out)?;
            } else {
                ca.write(&out)?;
            }
            Ok(format!(
                "wrote CA {:?} to {} and {}",
                cn,
                show(&out, dcs_certs::CA_CERT_FILE),
                show(&out, dcs_certs::CA_KEY_FILE)
            ))
        }
        Command::Server {
            ca,
            out,
            dns,
            ip,
            days,
        } => {
            let ca = Ca::load(&ca)?;
            let pem = ca.issue_server(&dns, &ip, Validity::days_from_now(days))?;
            write_pair(&out, "server", &pem)?;
            let names: Vec<String> = dns
                .iter()
                .cloned()
                .chain(ip.iter().map(IpAddr::to_string))
                .collect();
            Ok(format!(
                "wrote server certificate for {} to {} and {}",
                names.join(", "),
                show(&out, "server.pem"),
                show(&out, "server-key.pem")
            ))
        }
        Command::Agent {
            ca,
            tenant,
            agent,
            out,
            days,
        } => {
            let ca = Ca::load(&ca)?;
            let pem = ca.issue_agent(&tenant, &agent, Validity::days_from_now(days))?;
            write_agent_bundle(&out, &pem, ca.cert_pem())?;
            Ok(format!(
                "wrote agent certificate for dcs://{tenant}/{agent} to {}, {} and {}",
                show(&out, "agent.pem"),
                show(&out, "agent-key.pem"),
                show(&out, dcs_certs::CA_CERT_FILE)
            ))
        }
    }
}

fn show(dir: &Path, file: &str) -> String {
    dir.join(file).display().to_string()
}
