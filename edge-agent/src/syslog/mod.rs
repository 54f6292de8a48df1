//! Syslog listeners (`[[syslog]]`): RFC 5424 and RFC 3164 messages over TCP
//! (octet counting or LF framing), UDP and TLS, each message turned into a
//! record through the push API's checks and written to the same buffer.
//!
//! # Design constraints
//! - **Commit before reading further (TCP, TLS).** A connection reads at
//!   most [`READ_CHUNK`] bytes, turns every complete frame in them into
//!   records, and commits those records to the buffer (at the buffer's
//!   durability) before it reads again. What a SIGKILL can lose is
//!   therefore bounded: the frames of one read being committed, a partial
//!   frame, and what the kernel has received but the agent not yet read
//!   (at most the socket's receive buffer, `receive_buffer` when set).
//!   docs/GUARANTEES.md states the bound.
//! - **Backpressure, not loss, on a full buffer (TCP, TLS).** A commit the
//!   buffer refuses for space is retried until it succeeds; meanwhile the
//!   connection reads nothing, the kernel window fills and the sender waits.
//! - **UDP has no backpressure.** A datagram the buffer cannot take is
//!   counted (`reason="buffer"`); datagrams the kernel dropped because the
//!   agent did not read them in time are counted from `/proc/net/udp{,6}`.
//! - **One bad sender harms only itself.** Framing errors (an octet count
//!   that lies or exceeds `max_message_bytes`) close that connection; a
//!   frame that does not complete within `frame_timeout` (slowloris) closes
//!   it; `max_connections` caps the connections of a listener.
//! - **Text that is not syslog is kept**, raw, as `protocol: "unparsed"`;
//!   `syslog_loose` is lenient, so that is rare.
//!
//! # Layout
//! - [`message`]: parse one message, expand the stream template, build and
//!   check the record.
//! - [`framing`]: split a TCP byte stream into messages.
//! - `tcp`, `udp`: the socket loops.

pub mod framing;
pub mod message;
mod tcp;
mod udp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dcs_shared::config::{ByteSize, Issues, duration};
use dcs_shared::record::{Limits, Record};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::buffer::{Buffer, BufferError};
use crate::schema::Schemas;
use framing::Framing;
use message::{Outcome, Recipe, StreamTemplate};

/// The most a TCP or TLS connection reads before it commits what it read:
/// a few hundred typical messages per commit at full speed, and the bound
/// on a connection's uncommitted messages.
pub const READ_CHUNK: usize = 64 << 10;
/// The most datagrams a UDP listener commits at once.
const UDP_BATCH: usize = 1024;
/// RFC 5425 asks receivers to take messages of at least 2 KiB and says 8 KiB
/// is common; 32 KiB holds long stack traces and, with the payload's other
/// fields, still fits the default `ingest.max_payload_bytes` (64 KiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 32 << 10;
/// A frame that takes longer than this to arrive is a stalled or hostile
/// sender; an idle connection (between frames) is never closed.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// Far more senders than one agent's host and neighbours run; each costs a
/// task and a descriptor.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Wait between retries of a commit the buffer refused for space.
const FULL_BUFFER_RETRY: Duration = Duration::from_millis(200);
pub const DEFAULT_STREAM: &str = "syslog";

/// The transport of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Tls,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Tls => "tls",
        }
    }
}

/// One `[[syslog]]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// The `listener` label of this listener's metrics; default
    /// `PROTOCOL:ADDRESS`.
    #[serde(default)]
    pub name: Option<String>,
    pub protocol: Protocol,
    /// Address to bind, like `0.0.0.0:6514`.
    pub listen: String,
    /// TCP and TLS only; `auto` by default.
    #[serde(default)]
    pub framing: Option<Framing>,
    /// Stream template: text and `${appname}`, `${hostname}`, `${facility}`,
    /// `${severity}`, `${msgid}`.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Stream of messages whose template expansion is not a valid name.
    #[serde(default = "default_stream")]
    pub fallback_stream: String,
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: ByteSize,
    /// TCP and TLS: time a started frame has to arrive in full.
    #[serde(default = "default_frame_timeout", with = "duration")]
    pub frame_timeout: Duration,
    /// TCP and TLS: connections served at once; more are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// The socket's kernel receive buffer (SO_RCVBUF; Linux doubles it).
    /// Smaller narrows what a crash can lose on TCP; larger rides out
    /// bursts on UDP. Default: the kernel's.
    #[serde(default)]
    pub receive_buffer: Option<ByteSize>,
    /// Required with `protocol = "tls"`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, senders must present a certificate from this CA.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

fn default_stream() -> String {
    DEFAULT_STREAM.into()
}
fn default_max_message_bytes() -> ByteSize {
    ByteSize(DEFAULT_MAX_MESSAGE_BYTES)
}
fn default_frame_timeout() -> Duration {
    DEFAULT_FRAME_TIMEOUT
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

/// A listener's settings, compiled and checked.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    name: String,
    protocol: Protocol,
    listen: SocketAddr,
    framing: Framing,
    recipe: Recipe,
    max_message: usize,
    frame_timeout: Duration,
    max_connections: usize,
    receive_buffer: Option<usize>,
    tls: Option<TlsConfig>,
}

impl SyslogConfig {
    fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{}:{}", self.protocol.as_str(), self.listen))
    }

    /// Checks every key of `syslog[index]`, recording each problem.
    fn compile(&self, index: usize, limits: Limits, issues: &mut Issues) -> Option<Spec> {
        let key = |k: &str| format!("syslog[{index}].{k}");
        let before = issues.len();
        let listen = self.listen.parse::<SocketAddr>();
        issues.check(
            listen.is_ok(),
            &key("listen"),
            format!("{:?} is not an address like 0.0.0.0:6514", self.listen),
        );
        if let Some(name) = &self.name {
            issues.check(
                !name.is_empty() && name.len() <= 64,
                &key("name"),
                "must be 1 to 64 characters",
            );
        }
        let stream = StreamTemplate::compile(&self.stream);
        if let Err(reason) = &stream {
            issues.check(false, &key("stream"), reason.clone());
        }
        if let Err(reason) = dcs_shared::record::validate_stream(&self.fallback_stream) {
            issues.check(false, &key("fallback_stream"), reason);
        }
        issues.check(
            (16..=limits.max_payload_bytes as u64).contains(&self.max_message_bytes.0),
            &key("max_message_bytes"),
            "must be at least 16 bytes and at most ingest.max_payload_bytes",
        );
        let stream_based = self.protocol != Protocol::Udp;
        issues.check(
            stream_based || self.framing.is_none(),
            &key("framing"),
            "applies to tcp and tls listeners only",
        );
        issues.check(
            !self.frame_timeout.is_zero(),
            &key("frame_timeout"),
            "must be greater than 0s",
        );
        issues.check(
            (1..=65_536).contains(&self.max_connections),
            &key("max_connections"),
            "must be between 1 and 65536",
        );
        if let Some(size) = self.receive_buffer {
            issues.check(
                (4096..=1 << 30).contains(&size.0),
                &key("receive_buffer"),
                "must be between 4KiB and 1GiB",
            );
        }
        match (&self.tls, self.protocol) {
            (None, Protocol::Tls) => issues.check(
                false,
                &key("tls"),
                "is required with protocol = \"tls\" (cert and key)",
            ),
            (Some(_), Protocol::Tcp | Protocol::Udp) => {
                issues.check(false, &key("tls"), "applies to protocol = \"tls\" only")
            }
            (Some(tls), Protocol::Tls) => {
                let files = [
                    ("tls.cert", Some(&tls.cert)),
                    ("tls.key", Some(&tls.key)),
                    ("tls.client_ca", tls.client_ca.as_ref()),
                ];
                for (k, path) in files {
                    if let Some(path) = path {
                        dcs_shared::tls::check_readable_file(path, &key(k), issues);
                    }
                }
            }
            (None, _) => {}
        }
        if issues.len() > before {
            return None;
        }
        Some(Spec {
            name: self.name(),
            protocol: self.protocol,
            listen: listen.ok()?,
            framing: self.framing.unwrap_or_default(),
            recipe: Recipe {
                stream: stream.ok()?,
                fallback_stream: self.fallback_stream.clone(),
                limits,
            },
            max_message: self.max_message_bytes.as_usize(),
            frame_timeout: self.frame_timeout,
            max_connections: self.max_connections,
            receive_buffer: self.receive_buffer.map(ByteSize::as_usize),
            tls: self.tls.clone(),
        })
    }
}

/// Checks every `[[syslog]]` section: keys, files, and that no two
/// listeners share a name or an address and protocol.
pub(crate) fn compile(configs: &[SyslogConfig], limits: Limits, issues: &mut Issues) -> Vec<Spec> {
    let specs: Vec<Spec> = configs
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.compile(i, limits, issues))
        .collect();
    for (i, spec) in specs.iter().enumerate() {
        let earlier = &specs[..i];
        issues.check(
            !earlier.iter().any(|s| s.name == spec.name),
            &format!("syslog[{i}].name"),
            format!("{:?} is the name of another listener", spec.name),
        );
        issues.check(
            !earlier.iter().any(|s| {
                s.listen == spec.listen
                    && (s.protocol == Protocol::Udp) == (spec.protocol == Protocol::Udp)
            }),
            &format!("syslog[{i}].listen"),
            format!("{} is the address of another listener", spec.listen),
        );
    }
    specs
}

/// What every listener writes with.
#[derive(Clone)]
pub(crate) struct Sink {
    pub buffer: Buffer,
    pub schemas: Arc<Schemas>,
}

/// Running listeners; [`Listeners::shutdown`] stops them after each
/// connection's commit in flight.
pub struct Listeners {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// The bound address of each listener, in configuration order.
    pub addresses: Vec<SocketAddr>,
}

impl Listeners {
    /// Binds every listener (an error names the one that failed) and starts
    /// serving.
    pub(crate) async fn start(specs: Vec<Spec>, sink: Sink) -> Result<Listeners, String> {
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut addresses = Vec::new();
        for spec in specs {
            register_counters(&spec);
            let spec = Arc::new(spec);
            let name = spec.name.clone();
            let failed = |e: &dyn std::fmt::Display| format!("syslog listener {name:?}: {e}");
            if spec.protocol == Protocol::Udp {
                let socket = udp::bind(&spec).map_err(|e| failed(&e))?;
                addresses.push(socket.local_addr().map_err(|e| failed(&e))?);
                tasks.spawn(udp::serve(socket, spec, sink.clone(), stop_rx.clone()));
            } else {
                let acceptor = tcp::acceptor(&spec).map_err(|e| failed(&e))?;
                let listener = tcp::bind(&spec).map_err(|e| failed(&e))?;
                addresses.push(listener.local_addr().map_err(|e| failed(&e))?);
                tasks.spawn(tcp::serve(
                    listener,
                    acceptor,
                    spec,
                    sink.clone(),
                    stop_rx.clone(),
                ));
            }
        }
        Ok(Listeners {
            stop,
            tasks,
            addresses,
        })
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Exports every counter of a listener at 0 (docs/OBSERVABILITY.md).
fn register_counters(spec: &Spec) {
    let listener = spec.name.clone();
    for name in [
        "dcs_agent_syslog_messages_received_total",
        "dcs_agent_syslog_messages_accepted_total",
        "dcs_agent_syslog_messages_unparsed_total",
        "dcs_agent_syslog_stream_fallbacks_total",
    ] {
        metrics::counter!(name, "listener" => listener.clone()).increment(0);
    }
    for reason in INVALID_REASONS {
        metrics::counter!("dcs_agent_syslog_messages_invalid_total", "listener" => listener.clone(), "reason" => reason)
            .increment(0);
    }
    if spec.protocol == Protocol::Udp {
        metrics::counter!("dcs_agent_syslog_udp_drops_total", "listener" => listener).increment(0);
    } else {
        for reason in CLOSE_REASONS {
            metrics::counter!("dcs_agent_syslog_connections_closed_total", "listener" => listener.clone(), "reason" => reason)
                .increment(0);
        }
    }
}

/// Why a message was not written: the record checks refused it, its
/// framing was broken, or (UDP) the buffer had no room.
const INVALID_REASONS: [&str; 3] = ["record", "framing", "buffer"];
/// Why the agent closed a connection (a sender's own close is not counted).
const CLOSE_REASONS: [&str; 4] = ["framing", "frame_timeout", "max_connections", "tls"];

fn count(name: &'static str, spec: &Spec, n: u64) {
    if n > 0 {
        metrics::counter!(name, "listener" => spec.name.clone()).increment(n);
    }
}

fn count_invalid(spec: &Spec, reason: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!("dcs_agent_syslog_messages_invalid_total", "listener" => spec.name.clone(), "reason" => reason)
            .increment(n);
    }
}

fn count_closed(spec: &Spec, reason: &'static str) {
    metrics::counter!("dcs_agent_syslog_connections_closed_total", "listener" => spec.name.clone(), "reason" => reason)
        .increment(1);
}

/// Turns messages into records, counting each outcome.
fn records<'a>(
    spec: &Spec,
    sink: &Sink,
    sender: SocketAddr,
    messages: impl Iterator<Item = &'a [u8]>,
) -> Vec<Record> {
    let (mut received, mut invalid, mut unparsed, mut fallbacks) = (0, 0, 0, 0);
    let mut out = Vec::new();
    let sender_text = sender.to_string();
    for raw in messages {
        received += 1;
        match message::to_record(raw, &sender_text, &spec.recipe, &sink.schemas) {
            Outcome::Record {
                record,
                fell_back,
                parsed,
            } => {
                unparsed += u64::from(!parsed);
                fallbacks += u64::from(fell_back);
                out.push(record);
            }
            Outcome::Invalid(errors) => {
                invalid += 1;
                tracing::debug!(message = "syslog message refused", listener = %spec.name, %sender, ?errors);
            }
        }
    }
    count("dcs_agent_syslog_messages_received_total", spec, received);
    count("dcs_agent_syslog_messages_unparsed_total", spec, unparsed);
    count("dcs_agent_syslog_stream_fallbacks_total", spec, fallbacks);
    count_invalid(spec, "record", invalid);
    out
}

/// Commits `records`; with `wait_for_room`, a buffer refusal for space is
/// retried until it succeeds (TCP backpressure). Errors only when the
/// buffer is closing, or (UDP) full.
async fn commit(
    spec: &Spec,
    sink: &Sink,
    records: Vec<Record>,
    wait_for_room: bool,
) -> Result<(), BufferError> {
    if records.is_empty() {
        return Ok(());
    }
    let n = records.len() as u64;
    let mut records = records;
    loop {
        // Only a commit that may be retried needs its records kept.
        let attempt = if wait_for_room {
            records.clone()
        } else {
            std::mem::take(&mut records)
        };
        match sink.buffer.append(attempt).await {
            Ok(_) => {
                count("dcs_agent_syslog_messages_accepted_total", spec, n);
                return Ok(());
            }
            Err(BufferError::Full { .. } | BufferError::DiskFull) if wait_for_room => {
                tokio::time::sleep(FULL_BUFFER_RETRY).await;
            }
            Err(error) => {
                if !wait_for_room {
                    count_invalid(spec, "buffer", n);
                }
                return Err(error);
            }
        }
    }
}
