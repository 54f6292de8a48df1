//! The aggregator's configuration: a TOML file, then `DCS_AGG_*` environment
//! overrides (`DCS_AGG_DATABASE__URL`, `DCS_AGG_LIMITS__MAX_RECORDS_PER_BATCH`),
//! then [`Config::validate`], which names every bad key at once.
//!
//! Design constraints:
//! - Unknown keys are errors in every section: a misspelt limit silently falling
//!   back to its default is how an outage starts.
//! - Required values (`tls.*`, the database URL) are checked by `validate`
//!   rather than by serde, so one run reports all of them under their full key
//!   names (`tls.ca`), not only the first one serde trips over.
//! - The database URL usually holds a password, so it can come from a file
//!   (`database.url_file`) or the environment, and `Debug` never prints it.
//! - Every field is public and every section has a `Default`, so tests and
//!   embedders build a `Config` in code without a file. Serde fills missing
//!   keys from that `Default` (`#[serde(deny_unknown_fields, default)]` on
//!   each section), so every default is written once, from a `DEFAULT_*`
//!   const; the edge's configuration follows the same style.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dcs_shared::config::{ByteSize, ConfigError, Issue, Issues, duration};
pub use dcs_shared::telemetry::{DEFAULT_LOG_LEVEL, LogConfig};
use dcs_shared::tls::TlsFiles;
use serde::Deserialize;

use crate::Error;

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "DCS_AGG_";

/// Agents reach the aggregator on all interfaces; 8443 is the conventional
/// unprivileged HTTPS port, so the process needs no capability to bind it.
pub const DEFAULT_LISTEN_ADDRESS: &str = "0.0.0.0:8443";
/// Each batch holds one connection for one transaction; 16 keeps several
/// aggregator replicas well inside PostgreSQL's default `max_connections`
/// (100) while letting one replica write 16 batches in parallel.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;
/// Short on purpose: when the database is gone, agents should hear 503 within
/// seconds and back off, instead of holding requests until their own timeout.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// An agent's batch cap is far below this; 16 MiB of gzip is several hundred
/// MiB of JSON in the worst case, so the decompressed cap below is what binds.
pub const DEFAULT_MAX_COMPRESSED_BYTES: ByteSize = ByteSize(16 << 20);
/// Bounds the memory a single batch (or a gzip bomb) can claim while it is
/// parsed. The agent sends batches of at most 4 MiB of JSON (`batch.max_bytes`);
/// 20 MiB leaves room for a raised agent cap and is what OpenTelemetry's
/// collector settled on after CVE-2024-36129.
pub const DEFAULT_MAX_DECOMPRESSED_BYTES: ByteSize = ByteSize(20 << 20);
/// An agent sends `batch.max_in_flight` (default 2) batches at once; twice
/// that leaves room for a raised setting, and one agent still cannot take
/// more than a quarter of the default 16 database slots.
pub const DEFAULT_MAX_IN_FLIGHT_PER_AGENT: usize = 4;
/// Half of the default 16 database slots: the agents of one tenant can never
/// starve every other tenant.
pub const DEFAULT_MAX_IN_FLIGHT_PER_TENANT: usize = 8;
/// Every batch reserves its compressed body plus twice its decompressed size
/// (the JSON and the rows encoded for COPY) from this budget before it holds
/// them. 512 MiB keeps 16 full-size batches in memory and the aggregator's
/// RSS well under its 1 GiB budget.
pub const DEFAULT_MEMORY_BUDGET: ByteSize = ByteSize(512 << 20);
/// Keeps one transaction (and the time a batch holds its row locks) bounded;
/// COPY writes 100 000 rows in well under a second.
pub const DEFAULT_MAX_RECORDS_PER_BATCH: usize = 100_000;
/// The agent applies the same default; records are events, not files.
pub const DEFAULT_MAX_PAYLOAD_BYTES: ByteSize =
    ByteSize(dcs_shared::record::DEFAULT_MAX_PAYLOAD_BYTES as u64);
/// A TLS 1.3 handshake takes one round trip; 10 s tolerates a slow satellite or
/// cellular link and still frees a slot held by a silent peer quickly. Also
/// bounds how long an HTTP/1 client may take to send its request headers.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to receive a whole request body: 16 MiB at roughly 2 Mbit/s. A client
/// trickling bytes slower than that (slowloris) is cut off with 408.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// What a 503 tells the agent to wait: long enough for a PostgreSQL restart or
/// failover to make progress, short enough that the backlog drains promptly.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Agents keep one HTTP/2 connection for as long as it works, and an L4
/// balancer only places new connections: without an age limit a restarted or
/// added replica gets no agents. Two minutes moves a fleet within minutes at
/// the cost of one TLS handshake per agent per two minutes.
pub const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(120);
/// A batch in flight when the age limit is reached gets this long to finish
/// before its connection is cut (it is then resent, idempotently).
pub const DEFAULT_MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(30);
/// Fraction of the age limit each connection's age deviates by, at random, so
/// a fleet that connected together does not reconnect together.
pub const MAX_CONNECTION_AGE_JITTER: f64 = 0.10;
/// Long enough for a balancer's health check (e.g. HAProxy `inter 1s fall 2`)
/// to see the failing `/ready` and stop sending new connections.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);
/// Long enough for a batch that is being written to commit.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Far above what one replica serves (agents hold one connection each), and
/// far below the packaged `LimitNOFILE` (65536), so running out of descriptors
/// is refused at the door instead of failing accept().
pub const DEFAULT_MAX_CONNECTIONS_PER_LISTENER: usize = 8192;
/// One host rarely needs more. Behind a balancer without the PROXY protocol
/// every connection comes from the balancer's address: raise it there.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 1024;
/// From TLS established to the first request's headers, and for each later
/// HTTP/1.1 request's headers.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request body must average at least this many bytes per second once
/// [`BODY_RATE_GRACE`] has passed: a 1 byte/s trickle is cut long before
/// `limits.request_timeout`, a cellular link is not.
pub const DEFAULT_MIN_BODY_RATE: ByteSize = ByteSize(1024);
/// How long a body may start slowly before the minimum rate applies.
pub const BODY_RATE_GRACE: Duration = Duration::from_secs(5);
/// A connection with no request for this long is closed; the agent reconnects
/// for its next batch, which is not a failure.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// An agent sends one batch at a time; a few streams cover renewals and
/// probes alongside it.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 32;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub admission: AdmissionConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub platform: PlatformConfig,
    #[serde(default)]
    pub revocation: RevocationConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub enrollment: EnrollmentConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub connections: ConnectionsConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// The per-agent gauges (`dcs_aggregator_agent_*`) on `/metrics`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Export the `dcs_aggregator_agent_*` gauges, labelled `tenant` and
    /// `agent` (5 series per agent per replica). `false` drops them; the
    /// fleet-wide `dcs_aggregator_agents{link}` counts remain.
    pub per_agent: bool,
    /// How often each replica re-reads the `agents` table to rebuild the
    /// per-agent gauges (and at start-up), so an agent that went silent
    /// stays visible after a restart and on every replica.
    #[serde(with = "duration")]
    pub agents_refresh_interval: Duration,
}

/// One small indexed scan of `agents` per replica and interval; well inside
/// DcsAgentSilent's 5 minutes, so a restarted replica reports a silent agent
/// again within one Prometheus evaluation or two.
pub const DEFAULT_AGENTS_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            per_agent: true,
            agents_refresh_interval: DEFAULT_AGENTS_REFRESH_INTERVAL,
        }
    }
}

/// Daily partitions of `records` (see `retention`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Keep this many whole UTC days before today; older partitions are
    /// dropped. 0 keeps everything.
    pub days: u32,
    /// Create partitions this many days ahead, so a write never waits for DDL
    /// and a missed maintenance run does not push rows into the default
    /// partition.
    pub partitions_ahead: u32,
    /// How often each aggregator maintains the partitions.
    #[serde(with = "duration")]
    pub interval: Duration,
}

/// Keep everything unless an operator decides otherwise: dropping data is
/// not a default.
pub const DEFAULT_RETENTION_DAYS: u32 = 0;
/// A week of slack for a maintenance task that cannot reach the database.
pub const DEFAULT_PARTITIONS_AHEAD: u32 = 7;
/// Hourly: partitions are days, and the work is a few catalog lookups.
pub const DEFAULT_RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            days: DEFAULT_RETENTION_DAYS,
            partitions_ahead: DEFAULT_PARTITIONS_AHEAD,
            interval: DEFAULT_RETENTION_INTERVAL,
        }
    }
}

/// The platform API listener (`/api/v1/...`): HTTPS with a server certificate
/// only, callers authenticate with bearer tokens. Off by default, so an
/// upgrade does not open a new port nobody asked for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlatformConfig {
    pub enabled: bool,
    pub address: SocketAddr,
    /// Server certificate and key; empty means the agents' `tls.cert`/`tls.key`.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// PostgreSQL connections the platform API may hold, in a pool of its
    /// own: API callers (a slow records query, a flood of bad tokens) can
    /// never take a connection a batch is waiting for.
    pub max_db_connections: u32,
}

/// Enough for a handful of parallel API calls; the records query is the
/// only heavy one and it is bounded by `limit`.
pub const DEFAULT_PLATFORM_DB_CONNECTIONS: u32 = 4;

/// Next to the agents' 8443, so firewall rules for DCS stay one range.
pub const DEFAULT_PLATFORM_ADDRESS: &str = "0.0.0.0:8444";

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            enabled: false,
            address: DEFAULT_PLATFORM_ADDRESS
                .parse()
                .expect("valid default address"),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            max_db_connections: DEFAULT_PLATFORM_DB_CONNECTIONS,
        }
    }
}

impl PlatformConfig {
    /// The certificate and key the listener serves: its own, or the agents'.
    pub fn cert_and_key<'a>(&'a self, tls: &'a TlsConfig) -> (&'a Path, &'a Path) {
        if self.cert.as_os_str().is_empty() {
            (&tls.cert, &tls.key)
        } else {
            (&self.cert, &self.key)
        }
    }
}

/// How fast a revocation reaches the agents' listener.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RevocationConfig {
    /// How often each aggregator re-reads the deny list (revoked agents and
    /// serials, disabled tenants). A revocation made on another replica, or
    /// with the CLI, takes effect within this interval.
    #[serde(with = "duration")]
    pub refresh_interval: Duration,
}

/// A revoked agent may get a few more batches through within this window;
/// one small query every 2 s per replica costs the database nothing.
pub const DEFAULT_REVOCATION_REFRESH: Duration = Duration::from_secs(2);
/// Beyond a minute "revoke" stops meaning "now" to an operator.
pub const MAX_REVOCATION_REFRESH: Duration = Duration::from_secs(60);

impl Default for RevocationConfig {
    fn default() -> Self {
        RevocationConfig {
            refresh_interval: DEFAULT_REVOCATION_REFRESH,
        }
    }
}

/// The operators' plain-HTTP listener: `/metrics`, `/health`, `/ready`.
/// Separate from the agents' listener because scrapers and load-balancer
/// probes hold no agent certificate. Loopback by default: expose it only to
/// the monitoring network.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub address: SocketAddr,
    /// A file whose first line is the bearer token `GET /agents` requires
    /// (it lists every tenant's agents). Without one, `/agents` answers only
    /// on a loopback `address`.
    pub agents_token_file: Option<PathBuf>,
}

/// The environment variable that names the configuration file.
pub const ENV_CONFIG_FILE: &str = "DCS_AGG_CONFIG";

pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9464";

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: DEFAULT_ADMIN_ADDRESS
                .parse()
                .expect("valid default address"),
            agents_token_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// The agents' mutual-TLS listener.
    pub address: SocketAddr,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            address: DEFAULT_LISTEN_ADDRESS
                .parse()
                .expect("valid default address"),
        }
    }
}

/// PEM files. All three are required; an empty path means "not set".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The CA that issued the agents' client certificates.
    pub ca: PathBuf,
    /// The aggregator's server certificate (chain).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How often the server certificate and key files are checked for a
    /// change (size, mtime, inode); a change reloads them like SIGHUP does.
    /// 0 turns the check off (SIGHUP still works).
    #[serde(with = "duration")]
    pub watch_interval: Duration,
}

/// A renewed certificate written by a deployment tool is served within
/// seconds, and two `stat` calls every few seconds cost nothing.
pub const DEFAULT_TLS_WATCH_INTERVAL: Duration = Duration::from_secs(5);

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            ca: PathBuf::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            watch_interval: DEFAULT_TLS_WATCH_INTERVAL,
        }
    }
}

impl TlsConfig {
    /// `ca`, `cert` and `key`, which `validate` requires and the agents'
    /// listener is built from.
    pub fn files(&self) -> TlsFiles<'_> {
        TlsFiles {
            ca: &self.ca,
            cert: &self.cert,
            key: &self.key,
        }
    }
}

/// Agent enrollment and renewal: the aggregator signs agents' certificate
/// signing requests with the DCS CA. Off unless `enabled`; then the CA's key
/// must be readable by the aggregator, which makes this host as sensitive
/// as the CA itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnrollmentConfig {
    pub enabled: bool,
    /// The CA certificate that signs; empty means `tls.ca` (its first
    /// certificate).
    pub ca_cert: PathBuf,
    /// The CA's private key. Required when enabled.
    pub ca_key: PathBuf,
    /// Lifetime of the certificates issued to agents. Agents renew when a
    /// third of it is left.
    #[serde(with = "duration")]
    pub validity: Duration,
    /// Longest lifetime an admin may give an enrollment token.
    #[serde(with = "duration")]
    pub max_token_ttl: Duration,
}

/// 30 days: a stolen key is useful for at most a month after revocation is
/// forgotten, and agents renew after 20 days, so an agent offline for up to
/// 10 days still renews in time.
pub const DEFAULT_ENROLLMENT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// A week: time to ship a token to a site, not a standing credential.
pub const DEFAULT_MAX_ENROLLMENT_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Below this, renewal at a third of the validity would come round faster
/// than an agent's retry loop can react. Tests use tens of seconds.
pub const MIN_ENROLLMENT_VALIDITY: Duration = Duration::from_secs(15);

impl Default for EnrollmentConfig {
    fn default() -> Self {
        EnrollmentConfig {
            enabled: false,
            ca_cert: PathBuf::new(),
            ca_key: PathBuf::new(),
            validity: DEFAULT_ENROLLMENT_VALIDITY,
            max_token_ttl: DEFAULT_MAX_ENROLLMENT_TOKEN_TTL,
        }
    }
}

impl EnrollmentConfig {
    /// The signing CA certificate: its own, or `tls.ca`.
    pub fn ca_cert<'a>(&'a self, tls: &'a TlsConfig) -> &'a Path {
        if self.ca_cert.as_os_str().is_empty() {
            &tls.ca
        } else {
            &self.ca_cert
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:port/db`. Exactly one of `url` and
    /// `url_file` must be set.
    pub url: Option<String>,
    /// A file holding the URL, so the password stays out of the config file.
    pub url_file: Option<PathBuf>,
    pub max_connections: u32,
    #[serde(with = "duration")]
    pub acquire_timeout: Duration,
    /// Run pending migrations when `serve` starts.
    pub migrate_on_start: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            url_file: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            migrate_on_start: true,
        }
    }
}

impl DatabaseConfig {
    /// A configuration for `url` with every other key at its default.
    pub fn with_url(url: impl Into<String>) -> Self {
        DatabaseConfig {
            url: Some(url.into()),
            ..DatabaseConfig::default()
        }
    }

    /// The URL, read from `url_file` when that is the one set.
    pub fn resolve_url(&self) -> Result<String, Error> {
        match (&self.url, &self.url_file) {
            (Some(url), _) => Ok(url.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::UrlFile {
                    path: path.clone(),
                    source,
                })?;
                Ok(text.trim().to_owned())
            }
            (None, None) => Err(Error::Config(ConfigError {
                issues: vec![Issue {
                    key: "database.url".into(),
                    reason: "is required (or database.url_file)".into(),
                }],
            })),
        }
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("url_file", &self.url_file)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("migrate_on_start", &self.migrate_on_start)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_compressed_bytes: ByteSize,
    pub max_decompressed_bytes: ByteSize,
    pub max_records_per_batch: usize,
    pub max_payload_bytes: ByteSize,
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    #[serde(with = "duration")]
    pub retry_after: Duration,
    /// Agent connections older than this (±10 %) are closed gracefully:
    /// GOAWAY on HTTP/2, `Connection: close` on HTTP/1.1. Zero turns it off.
    #[serde(with = "duration")]
    pub max_connection_age: Duration,
    /// How long requests in flight on such a connection may still take.
    #[serde(with = "duration")]
    pub max_connection_age_grace: Duration,
}

/// How the aggregator stops on SIGTERM or Ctrl-C: readiness fails at once,
/// batches are still taken for `drain_delay`, then every connection gets a
/// GOAWAY and requests in flight get up to `grace` to finish.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    #[serde(with = "duration")]
    pub drain_delay: Duration,
    #[serde(with = "duration")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_delay: DEFAULT_DRAIN_DELAY,
            grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Protections each TLS listener (agents, platform API) applies on its own,
/// with its own counters. Every refusal is counted in
/// `dcs_aggregator_connections_refused_total{listener, reason}`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsConfig {
    /// Open connections per listener; more are closed right after accept.
    pub max_connections: usize,
    /// Open connections per source IP address and listener (0: no cap).
    pub max_connections_per_address: usize,
    /// From the end of the TLS handshake to the first request's headers, and
    /// for each later HTTP/1.1 request's headers. `limits.handshake_timeout`
    /// bounds them too: the smaller applies.
    #[serde(with = "duration")]
    pub header_timeout: Duration,
    /// Bytes per second a request body must average after the first 5 s
    /// (0: no minimum). The whole body is bounded by `limits.request_timeout`.
    pub min_body_rate: ByteSize,
    /// A connection without any request in flight for this long is closed.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS_PER_LISTENER,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            min_body_rate: DEFAULT_MIN_BODY_RATE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_compressed_bytes: DEFAULT_MAX_COMPRESSED_BYTES,
            max_decompressed_bytes: DEFAULT_MAX_DECOMPRESSED_BYTES,
            max_records_per_batch: DEFAULT_MAX_RECORDS_PER_BATCH,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            retry_after: DEFAULT_RETRY_AFTER,
            max_connection_age: DEFAULT_MAX_CONNECTION_AGE,
            max_connection_age_grace: DEFAULT_MAX_CONNECTION_AGE_GRACE,
        }
    }
}

/// What one agent, one tenant and all batches together may hold at once
/// (see the `admission` module).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Batches of one agent being read, parsed or written at once; one more
    /// is refused with 429 before its body is read.
    pub max_in_flight_per_agent: usize,
    /// Database slots the agents of one tenant hold at once.
    pub max_in_flight_per_tenant: usize,
    /// Bytes all batches in progress may hold in memory together.
    pub memory_budget: ByteSize,
    /// Batches of one agent inflated, parsed and written at once while other
    /// agents are active (an agent alone may use all its in-flight
    /// batches); 0 means half the CPU cores, at least 1.
    pub fair_share: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            max_in_flight_per_agent: DEFAULT_MAX_IN_FLIGHT_PER_AGENT,
            max_in_flight_per_tenant: DEFAULT_MAX_IN_FLIGHT_PER_TENANT,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            fair_share: 0,
        }
    }
}

impl Config {
    /// Reads `file` (if any), applies `DCS_AGG_*` variables from `env` and
    /// validates the result. Pass `std::env::vars()`; tests pass a list.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        // `DCS_AGG_CONFIG` names the file (`--config`), it is not a key.
        let env = env.into_iter().filter(|(k, _)| k != ENV_CONFIG_FILE);
        let config: Config = dcs_shared::config::load(file, ENV_PREFIX, env)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every key without touching the file system.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut issues = Issues::default();
        self.tls.files().check_set("tls", &mut issues);

        let db = &self.database;
        issues.check(
            db.url.is_some() || db.url_file.is_some(),
            "database.url",
            "is required (or database.url_file, a file holding the URL)",
        );
        issues.check(
            !(db.url.is_some() && db.url_file.is_some()),
            "database.url_file",
            "set either database.url or database.url_file, not both",
        );
        if let Some(url) = &db.url {
            issues.check(
                url.starts_with("postgres://") || url.starts_with("postgresql://"),
                "database.url",
                "must start with postgres:// or postgresql://",
            );
        }
        issues.check(
            db.max_connections >= 1,
            "database.max_connections",
            "must be at least 1",
        );
        issues.check(
            !db.acquire_timeout.is_zero(),
            "database.acquire_timeout",
            "must be greater than zero",
        );
        issues.check(
            self.platform.max_db_connections >= 1,
            "platform.max_db_connections",
            "must be at least 1",
        );

        let l = &self.limits;
        issues.check(
            l.max_compressed_bytes.0 > 0,
            "limits.max_compressed_bytes",
            "must be greater than zero",
        );
        issues.check(
            l.max_decompressed_bytes >= l.max_compressed_bytes,
            "limits.max_decompressed_bytes",
            format!(
                "must be at least limits.max_compressed_bytes ({})",
                l.max_compressed_bytes
            ),
        );
        issues.check(
            l.max_records_per_batch >= 1,
            "limits.max_records_per_batch",
            "must be at least 1",
        );
        issues.check(
            l.max_payload_bytes.0 >= 2,
            "limits.max_payload_bytes",
            "must be at least 2 (the size of {})",
        );
        issues.check(
            l.max_payload_bytes <= l.max_decompressed_bytes,
            "limits.max_payload_bytes",
            "must not exceed limits.max_decompressed_bytes",
        );
        let a = &self.admission;
        issues.check(
            a.max_in_flight_per_agent >= 1,
            "admission.max_in_flight_per_agent",
            "must be at least 1",
        );
        issues.check(
            a.max_in_flight_per_tenant >= 1,
            "admission.max_in_flight_per_tenant",
            "must be at least 1",
        );
        let largest_batch = l
            .max_compressed_bytes
            .0
            .saturating_add(l.max_decompressed_bytes.0.saturating_mul(2));
        issues.check(
            a.memory_budget.0 >= largest_batch,
            "admission.memory_budget",
            format!(
                "must hold at least one largest batch: limits.max_compressed_bytes plus twice limits.max_decompressed_bytes ({largest_batch} bytes)"
            ),
        );
        for (key, value) in [
            ("limits.handshake_timeout", l.handshake_timeout),
            ("limits.request_timeout", l.request_timeout),
            ("limits.retry_after", l.retry_after),
        ] {
            issues.check(!value.is_zero(), key, "must be greater than zero");
        }
        issues.check(
            l.max_connection_age.is_zero() || l.max_connection_age >= Duration::from_secs(1),
            "limits.max_connection_age",
            "must be \"0s\" (off) or at least 1s",
        );
        issues.check(
            !l.max_connection_age_grace.is_zero(),
            "limits.max_connection_age_grace",
            "must be greater than zero",
        );
        issues.check(
            !self.shutdown.grace.is_zero(),
            "shutdown.grace",
            "must be greater than zero",
        );
        let c = &self.connections;
        issues.check(
            c.max_connections >= 1,
            "connections.max_connections",
            "must be at least 1",
        );
        issues.check(
            c.max_connections_per_address <= c.max_connections,
            "connections.max_connections_per_address",
            "must not exceed connections.max_connections (0 turns it off)",
        );
        for (key, value) in [
            ("connections.header_timeout", c.header_timeout),
            ("connections.idle_timeout", c.idle_timeout),
        ] {
            issues.check(!value.is_zero(), key, "must be greater than zero");
        }
        issues.check(
            c.max_concurrent_streams >= 1,
            "connections.max_concurrent_streams",
            "must be at least 1",
        );
        let p = &self.platform;
        if p.enabled {
            for (other, address) in [
                ("listen.address", self.listen.address),
                ("admin.address", self.admin.address),
            ] {
                issues.check(
                    p.address.port() == 0 || p.address != address,
                    "platform.address",
                    format!("must differ from {other}"),
                );
            }
        }
        issues.check(
            p.cert.as_os_str().is_empty() == p.key.as_os_str().is_empty(),
            "platform.key",
            "set platform.cert and platform.key together, or neither (to use tls.cert and tls.key)",
        );
        let refresh = self.revocation.refresh_interval;
        issues.check(
            !refresh.is_zero() && refresh <= MAX_REVOCATION_REFRESH,
            "revocation.refresh_interval",
            format!(
                "must be greater than zero and at most {}s",
                MAX_REVOCATION_REFRESH.as_secs()
            ),
        );
        issues.check(
            !self.metrics.agents_refresh_interval.is_zero(),
            "metrics.agents_refresh_interval",
            "must be greater than zero",
        );
        let e = &self.enrollment;
        if e.enabled {
            issues.check(
                !e.ca_key.as_os_str().is_empty(),
                "enrollment.ca_key",
                "is required when enrollment.enabled = true",
            );
            issues.check(
                e.validity >= MIN_ENROLLMENT_VALIDITY,
                "enrollment.validity",
                format!("must be at least {}s", MIN_ENROLLMENT_VALIDITY.as_secs()),
            );
            issues.check(
                !e.max_token_ttl.is_zero(),
                "enrollment.max_token_ttl",
                "must be greater than zero",
            );
        }
        let r = &self.retention;
        issues.check(
            (1..=366).contains(&r.partitions_ahead),
            "retention.partitions_ahead",
            "must be between 1 and 366",
        );
        issues.check(
            !r.interval.is_zero(),
            "retention.interval",
            "must be greater than zero",
        );
        self.log.check(&mut issues);
        issues.into_result()
    }

    /// Opens what the configuration points at: the PEM files and the URL file.
    /// `check-config` runs this after [`Config::validate`] so a wrong path is
    /// reported before a deployment, not at start-up.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let mut issues = Issues::default();
        if let Err(error) = self.tls.files().server_config() {
            issues.check(false, "tls", error.to_string());
        }
        if self.platform.enabled {
            let (cert, key) = self.platform.cert_and_key(&self.tls);
            if let Err(error) = dcs_shared::tls::server_config_no_client_auth(cert, key) {
                issues.check(false, "platform", error.to_string());
            }
        }
        if self.enrollment.enabled
            && let Err(error) = dcs_certs::Ca::load_files(
                self.enrollment.ca_cert(&self.tls),
                &self.enrollment.ca_key,
            )
        {
            issues.check(false, "enrollment", error.to_string());
        }
        if self.database.url.is_none()
            && let Some(path) = &self.database.url_file
        {
            match std::fs::read_to_string(path) {
                Ok(text) => issues.check(
                    !text.trim().is_empty(),
                    "database.url_file",
                    format!("{} is empty", path.display()),
                ),
                Err(error) => issues.check(
                    false,
                    "database.url_file",
                    format!("cannot read {}: {error}", path.display()),
                ),
            }
        }
        issues.into_result()
    }
}

#[cfg(test)]
mod tests;
