//! The agent's typed configuration: TOML file, then `DCS_EDGE_*` overrides
//! (`DCS_EDGE_BATCH__MAX_RECORDS=500` sets `batch.max_records`), then
//! [`Config::compile`], which names every bad key at once.
//!
//! Checking a value and working it out are one step: [`Config::compile`]
//! keeps what it parsed, read and compiled (schedules, transforms, stream
//! schemas, syslog listeners, record limits, the buffer's encryption keys)
//! in a [`CompiledConfig`], the only thing the agent runs on
//! ([`crate::run`]). Nothing is parsed or read a second time, so what runs
//! is what was checked.
//!
//! Defaults are written once, as `DEFAULT_*` consts taken by each section's
//! `impl Default`, which serde fills missing keys from
//! (`#[serde(deny_unknown_fields, default)]` on the section), as the
//! aggregator's configuration does. Only `[aggregator]`, whose `url`, `ca`,
//! `cert` and `key` are required, names a default per field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use dcs_shared::config::{ByteSize, ConfigError, Issues, duration};
use dcs_shared::record::{DEFAULT_MAX_PAYLOAD_BYTES, Limits};
pub use dcs_shared::telemetry::LogConfig;
use dcs_shared::tls::TlsFiles;

use crate::buffer::{BufferOptions, Durability, Overflow};
use crate::schema::Schemas;
use crate::seal::Keyring;
use crate::sources::{Source, SourceKind};

pub const ENV_PREFIX: &str = "DCS_EDGE_";

/// Loopback only by default: producers run on the same VM, and the ingest API
/// has no authentication of its own.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8780";
pub const DEFAULT_BUFFER_PATH: &str = "/var/lib/dcs-edge/buffer.db";
/// 1 GiB holds several million typical records: days of a busy site's output.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;
/// Refusing (507) loses nothing a producer was told is safe; evicting the
/// oldest records is an operator's choice (`drop-oldest`).
pub const DEFAULT_OVERFLOW: Overflow = Overflow::Reject;
/// `power-loss`: a record acknowledged with 2xx survives a power cut
/// (issue 24 measured 14 % of acknowledged records lost on a cut under
/// `process-crash`, for a few percent of throughput at realistic requests).
pub const DEFAULT_DURABILITY: Durability = Durability::PowerLoss;
/// Room for deleting several full batches (WAL frames) even when producers
/// have filled the disk: without it a full disk could never drain.
pub const DEFAULT_MIN_FREE_DISK: u64 = 64 << 20;
/// Enough producer ids to cover any retry a producer would sensibly make.
pub const DEFAULT_DEDUP_WINDOW: i64 = 1_000_000;
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 16 << 20;
/// Large enough to amortise the TLS round trip and PostgreSQL commit, small
/// enough that a retry resends little and memory stays flat.
pub const DEFAULT_BATCH_MAX_RECORDS: usize = 5_000;
pub const DEFAULT_BATCH_MAX_BYTES: u64 = 4 << 20;
/// Short enough to keep delivery latency low, long enough to fill batches
/// under a steady trickle.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(50);
/// gzip level 3: about 29% fewer bytes on the wire than level 1 for about
/// 1.3 µs more CPU per record; levels above 3 gain a few percent for several
/// times the CPU (docs/PERFORMANCE.md, "Tuning knobs").
pub const DEFAULT_COMPRESSION_LEVEL: u32 = 3;
/// Two batches in flight keep the link busy while the aggregator commits.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 2;
/// An idle agent shows up as alive, and hears of a replay request, within a
/// minute, for one small request a minute.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(60);
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_millis(200);
/// The longest a healed link waits before the agent notices.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// A producer on a LAN sends headers in milliseconds; ten seconds only ends
/// connections that were never going to send any.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Enough for the largest request body (`ingest.max_request_bytes`) over a
/// slow link, short enough that stalled uploads cannot pile up.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub buffer: BufferConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    /// The OTLP/HTTP logs receiver (`POST /v1/logs`), see [`crate::otlp`].
    #[serde(default)]
    pub otlp: OtlpConfig,
    pub aggregator: AggregatorConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Pull sources (`[[sources]]`), see [`crate::sources`].
    #[serde(default)]
    pub sources: Vec<crate::sources::SourceConfig>,
    #[serde(default)]
    pub jobs: JobsConfig,
    /// Per-stream settings (`[streams."NAME"]`): the JSON Schema its
    /// payloads must match, see [`crate::schema`].
    #[serde(default)]
    pub streams: std::collections::BTreeMap<String, crate::schema::StreamConfig>,
    /// Syslog listeners (`[[syslog]]`), see [`crate::syslog`].
    #[serde(default)]
    pub syslog: Vec<crate::syslog::SyslogConfig>,
}

/// A week of run history answers "did last night's runs work" on Monday
/// morning without letting the table grow without bound.
pub const DEFAULT_JOBS_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The history of source runs kept for `GET /api/v1/jobs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Finished jobs older than this are deleted.
    #[serde(with = "duration")]
    pub retention: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            retention: DEFAULT_JOBS_RETENTION,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    pub address: String,
    /// Time a client has to send a request's headers (and, on a new
    /// connection, to start its first request) before it is disconnected.
    #[serde(with = "duration")]
    pub header_timeout: Duration,
    /// Time a client has to send a whole request body; a slower one gets 408.
    #[serde(with = "duration")]
    pub body_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    pub path: PathBuf,
    pub capacity: ByteSize,
    pub overflow: Overflow,
    pub durability: Durability,
    pub dedup_window: i64,
    /// Refuse new records (507) while the filesystem has less free space than
    /// this, keeping room for the deletes that drain the buffer.
    pub min_free_disk: ByteSize,
    /// Where damaged buffer files are moved (default: `quarantine/` beside
    /// the buffer); their readable records are salvaged and delivered.
    pub quarantine_dir: Option<PathBuf>,
    pub encryption: EncryptionConfig,
    /// Keep acknowledged records this long (within `capacity`, always
    /// yielding to undelivered ones) so they can be sent again after the
    /// central database is restored to an earlier point in time
    /// (`dcs-aggregator replay`). "0s" (the default) deletes them at once.
    #[serde(with = "duration")]
    pub retain_delivered: Duration,
}

/// Encryption at rest of buffered payloads (AES-256-GCM), off unless a key is
/// named. The key itself is never in this file: only where to read it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// A file holding the active key: 32 raw bytes, 64 hex digits or base64.
    pub key_file: Option<PathBuf>,
    /// Or the name of an environment variable holding it (not a `DCS_EDGE_`
    /// name: those are configuration overrides).
    pub key_env: Option<String>,
    /// Keys of earlier rotations, so records they sealed can still be read.
    pub previous_key_files: Vec<PathBuf>,
}

impl EncryptionConfig {
    pub fn keyring(&self) -> Result<Keyring, crate::seal::SealError> {
        Keyring::load(
            self.key_file.as_deref(),
            self.key_env.as_deref(),
            &self.previous_key_files,
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub max_request_bytes: ByteSize,
    pub max_payload_bytes: ByteSize,
    /// Whether a request without `?partial=` is answered with partial
    /// acceptance (valid records committed, invalid ones dead-lettered)
    /// instead of all-or-nothing.
    pub partial: bool,
}

/// The stream of a log record is the value of this attribute (the log
/// record's own attributes first, then its resource's) when it has one.
pub const DEFAULT_OTLP_STREAM_ATTRIBUTE: &str = "dcs.stream";
/// Stream of log records without the stream attribute: named after the
/// signal so OTLP logs are easy to find and never mixed with pushed JSON.
pub const DEFAULT_OTLP_STREAM: &str = "otlp.logs";

/// `[otlp]`: how OTLP log records become DCS records.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    pub stream_attribute: String,
    pub default_stream: String,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            stream_attribute: DEFAULT_OTLP_STREAM_ATTRIBUTE.into(),
            default_stream: DEFAULT_OTLP_STREAM.into(),
        }
    }
}

impl OtlpConfig {
    fn validate(&self, issues: &mut Issues) {
        issues.check(
            !self.stream_attribute.is_empty(),
            "otlp.stream_attribute",
            "must not be empty",
        );
        if let Err(reason) = dcs_shared::record::validate_stream(&self.default_stream) {
            issues.check(false, "otlp.default_stream", reason);
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    /// e.g. `https://aggregator.example.com:8443`
    pub url: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `http://proxy:3128`; when absent `HTTPS_PROXY`/`https_proxy` is honoured.
    #[serde(default)]
    pub proxy: Option<String>,
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    #[serde(default = "default_request_timeout", with = "duration")]
    pub request_timeout: Duration,
}

impl AggregatorConfig {
    /// `ca`, `cert` and `key`, which the agent checks and builds its
    /// client TLS from.
    pub fn tls_files(&self) -> TlsFiles<'_> {
        TlsFiles {
            ca: &self.ca,
            cert: &self.cert,
            key: &self.key,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub max_records: usize,
    pub max_bytes: ByteSize,
    #[serde(with = "duration")]
    pub linger: Duration,
    pub compression_level: u32,
    pub max_in_flight: usize,
    /// An agent with nothing to send posts an empty batch this often, so
    /// the aggregator sees it alive and the agent learns of a replay request
    /// (`dcs-aggregator replay`) without waiting for its next record.
    #[serde(with = "duration")]
    pub heartbeat: Duration,
}

/// Retries never give up: an outage of days must not lose data. These bound
/// only how fast and how slowly the agent knocks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    #[serde(with = "duration")]
    pub initial: Duration,
    #[serde(with = "duration")]
    pub max: Duration,
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
}

fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_request_timeout() -> Duration {
    DEFAULT_REQUEST_TIMEOUT
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            address: DEFAULT_LISTEN.into(),
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
        }
    }
}
impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            path: DEFAULT_BUFFER_PATH.into(),
            capacity: ByteSize(DEFAULT_CAPACITY),
            overflow: DEFAULT_OVERFLOW,
            durability: DEFAULT_DURABILITY,
            dedup_window: DEFAULT_DEDUP_WINDOW,
            min_free_disk: ByteSize(DEFAULT_MIN_FREE_DISK),
            quarantine_dir: None,
            encryption: EncryptionConfig::default(),
            retain_delivered: Duration::ZERO,
        }
    }
}
impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_request_bytes: ByteSize(DEFAULT_MAX_REQUEST_BYTES),
            max_payload_bytes: ByteSize(DEFAULT_MAX_PAYLOAD_BYTES as u64),
            partial: false,
        }
    }
}
impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: DEFAULT_BATCH_MAX_RECORDS,
            max_bytes: ByteSize(DEFAULT_BATCH_MAX_BYTES),
            linger: DEFAULT_LINGER,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            heartbeat: DEFAULT_HEARTBEAT,
        }
    }
}
impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: DEFAULT_RETRY_INITIAL,
            max: DEFAULT_RETRY_MAX,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// A [`Config`] that passed every check, with what the checks worked out.
/// Made only by [`Config::compile`].
#[derive(Debug)]
pub struct CompiledConfig {
    pub(crate) config: Config,
    /// `[[sources]]`, schedules parsed and transforms compiled.
    pub(crate) sources: Vec<Source>,
    /// `[streams]`, schema files read and compiled.
    pub(crate) schemas: Arc<Schemas>,
    /// `[[syslog]]`.
    pub(crate) syslog: Vec<crate::syslog::Spec>,
    /// The record limits every ingest path enforces.
    pub(crate) limits: Limits,
    /// `[buffer]`, with the encryption keys read.
    pub(crate) buffer: BufferOptions,
}

impl CompiledConfig {
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What the buffer opens with, keys included.
    pub fn buffer_options(&self) -> &BufferOptions {
        &self.buffer
    }
}

impl Config {
    /// Reads the file (if any) and the process environment, then compiles.
    pub fn load(file: Option<&Path>) -> Result<CompiledConfig, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<CompiledConfig, ConfigError> {
        let config: Config = dcs_shared::config::load(file, ENV_PREFIX, env)?;
        config.compile()
    }

    /// A config with every default, for tests and the demo.
    pub fn with_aggregator(aggregator: AggregatorConfig) -> Config {
        Config {
            listen: ListenConfig::default(),
            buffer: BufferConfig::default(),
            ingest: IngestConfig::default(),
            otlp: OtlpConfig::default(),
            aggregator,
            batch: BatchConfig::default(),
            retry: RetryConfig::default(),
            log: LogConfig::default(),
            sources: Vec::new(),
            jobs: JobsConfig::default(),
            streams: Default::default(),
            syslog: Vec::new(),
        }
    }

    /// Checks without keeping the result; the agent runs on
    /// [`Config::compile`]'s.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.clone().compile().map(drop)
    }

    /// Checks every key, naming each bad one, and keeps what the checks
    /// parsed, read and compiled.
    pub fn compile(self) -> Result<CompiledConfig, ConfigError> {
        let mut issues = Issues::default();
        issues.check(
            self.listen.address.parse::<SocketAddr>().is_ok(),
            "listen.address",
            format!(
                "{:?} is not an address like 127.0.0.1:8780",
                self.listen.address
            ),
        );
        issues.check(
            !self.listen.header_timeout.is_zero(),
            "listen.header_timeout",
            "must be greater than 0s",
        );
        issues.check(
            !self.listen.body_timeout.is_zero(),
            "listen.body_timeout",
            "must be greater than 0s",
        );
        issues.check(
            !self.buffer.path.as_os_str().is_empty(),
            "buffer.path",
            "must not be empty",
        );
        issues.check(
            self.buffer.capacity.0 >= 1 << 20,
            "buffer.capacity",
            "must be at least 1MiB",
        );
        issues.check(
            self.buffer.dedup_window >= 0,
            "buffer.dedup_window",
            "must not be negative",
        );
        let enc = &self.buffer.encryption;
        issues.check(
            enc.key_file.is_none() || enc.key_env.is_none(),
            "buffer.encryption.key_env",
            "set key_file or key_env, not both",
        );
        issues.check(
            !enc.key_env
                .as_deref()
                .is_some_and(|v| v.starts_with("DCS_EDGE_")),
            "buffer.encryption.key_env",
            "must not start with DCS_EDGE_ (those variables are configuration overrides)",
        );
        issues.check(
            enc.key_file.is_some() || enc.key_env.is_some() || enc.previous_key_files.is_empty(),
            "buffer.encryption.previous_key_files",
            "needs an active key (key_file or key_env) to go with it",
        );
        // Read once: what the check read is what the buffer opens with.
        let keyring = enc.keyring().unwrap_or_else(|error| {
            let key = if enc.key_env.is_some() && enc.key_file.is_none() {
                "buffer.encryption.key_env"
            } else {
                "buffer.encryption.key_file"
            };
            issues.check(false, key, error.to_string());
            // Never used: the issue just recorded fails the compile.
            Keyring::disabled()
        });
        issues.check(
            self.ingest.max_payload_bytes.0 >= 2,
            "ingest.max_payload_bytes",
            "must be at least 2 bytes",
        );
        issues.check(
            self.ingest.max_request_bytes >= self.ingest.max_payload_bytes,
            "ingest.max_request_bytes",
            "must be at least ingest.max_payload_bytes",
        );
        self.otlp.validate(&mut issues);
        let url_ok = self.aggregator.url.starts_with("https://")
            && reqwest::Url::parse(&self.aggregator.url).is_ok_and(|u| u.host().is_some());
        issues.check(
            url_ok,
            "aggregator.url",
            format!(
                "{:?} is not an https:// URL (agents only speak mutual TLS)",
                self.aggregator.url
            ),
        );
        self.aggregator
            .tls_files()
            .check_readable("aggregator", &mut issues);
        if let Some(proxy) = &self.aggregator.proxy {
            issues.check(
                reqwest::Proxy::all(proxy).is_ok(),
                "aggregator.proxy",
                format!("{proxy:?} is not a proxy URL like http://proxy:3128"),
            );
        }
        issues.check(
            (1..=1_000_000).contains(&self.batch.max_records),
            "batch.max_records",
            "must be between 1 and 1000000",
        );
        issues.check(
            self.batch.max_bytes.0 >= self.ingest.max_payload_bytes.0,
            "batch.max_bytes",
            "must be at least ingest.max_payload_bytes, or a large record could never be sent",
        );
        issues.check(
            self.batch.compression_level <= 9,
            "batch.compression_level",
            "must be 0 to 9",
        );
        issues.check(
            (1..=64).contains(&self.batch.max_in_flight),
            "batch.max_in_flight",
            "must be between 1 and 64",
        );
        issues.check(
            self.batch.heartbeat >= Duration::from_millis(100),
            "batch.heartbeat",
            "must be at least 100ms",
        );
        issues.check(
            !self.retry.initial.is_zero(),
            "retry.initial",
            "must be greater than zero",
        );
        issues.check(
            self.retry.max >= self.retry.initial,
            "retry.max",
            "must be at least retry.initial",
        );
        issues.check(
            !self.jobs.retention.is_zero(),
            "jobs.retention",
            "must be greater than zero",
        );
        self.log.check(&mut issues);
        let sources = crate::sources::compile(&self.sources, &mut issues);
        // Here, not in `sources`: this module owns the override prefix.
        for (i, source) in self.sources.iter().enumerate() {
            let url_env = match &source.kind {
                SourceKind::Database(d) => d.url_env.as_deref(),
                SourceKind::File(_) | SourceKind::Http(_) => None,
            };
            issues.check(
                !url_env.is_some_and(|v| v.starts_with(ENV_PREFIX)),
                &format!("sources[{i}].database.url_env"),
                format!(
                    "must not start with {ENV_PREFIX} (those variables are configuration overrides)"
                ),
            );
        }
        let schemas = Schemas::compile(&self.streams, &mut issues);
        let limits = Limits {
            max_payload_bytes: self.ingest.max_payload_bytes.as_usize(),
        };
        let syslog = crate::syslog::compile(&self.syslog, limits, &mut issues);
        issues.into_result()?;
        Ok(CompiledConfig {
            buffer: self.buffer_options_with(keyring),
            config: self,
            sources,
            schemas: Arc::new(schemas),
            syslog,
            limits,
        })
    }

    /// Reads the encryption keys too, hence fallible. The agent itself
    /// opens its buffer with [`CompiledConfig::buffer_options`], whose keys
    /// are the ones [`Config::compile`] checked.
    pub fn buffer_options(&self) -> Result<BufferOptions, crate::seal::SealError> {
        Ok(self.buffer_options_with(self.buffer.encryption.keyring()?))
    }

    fn buffer_options_with(&self, keyring: Keyring) -> BufferOptions {
        BufferOptions {
            path: self.buffer.path.clone(),
            capacity_bytes: self.buffer.capacity.0,
            overflow: self.buffer.overflow,
            durability: self.buffer.durability,
            dedup_window: self.buffer.dedup_window,
            min_free_disk: self.buffer.min_free_disk.0,
            quarantine_dir: self.quarantine_dir(),
            keyring,
            retain_delivered: self.buffer.retain_delivered,
        }
    }

    /// Where damaged buffer files go: `buffer.quarantine_dir`, or
    /// `quarantine/` beside the buffer file.
    pub fn quarantine_dir(&self) -> PathBuf {
        self.buffer.quarantine_dir.clone().unwrap_or_else(|| {
            self.buffer
                .path
                .parent()
                .unwrap_or(Path::new("."))
                .join("quarantine")
        })
    }
}

#[cfg(test)]
mod tests;
