//! The DCS aggregator: accepts batches from edge agents over mutual TLS and
//! writes each record to PostgreSQL exactly once.
//!
//! Design constraints:
//! - **Identity comes from the certificate only.** The tenant and agent a batch
//!   is stored under are read from the verified client certificate; nothing in
//!   the request can name another agent.
//! - **Exactly once.** A record's key is (agent, epoch, seq), and agents resend
//!   until they get a 200. Each batch first claims its seq range in the
//!   `record_ranges` ledger (claims of one agent and epoch never overlap) and
//!   is then `COPY`ed straight into `records`. Only a batch whose claim
//!   overlaps (a resend, or a reused seq) goes through a staging table: keys
//!   already stored with the same content count as duplicates, keys not stored
//!   yet are inserted (`WHERE NOT EXISTS`) and their uncovered ranges claimed,
//!   and a key stored with other content refuses the whole batch (409). 200 is
//!   sent only after the transaction committed.
//! - **Never a false 2xx, never an endless retry.** A database that is down
//!   answers 503 with `Retry-After` (the agent keeps the batch and retries); a
//!   batch that can never be stored answers 4xx. The agent dead-letters it,
//!   except that a 422 that blames records (`invalid_records`,
//!   `rejected_by_database`) makes it halve the batch until only the blamed
//!   records are dead-lettered, a 413 makes it halve the batch, and a 409
//!   `content_conflict` makes it re-key the named records into a new epoch.
//! - **Bounded work per request.** Compressed size, decompressed size, record
//!   count, payload size and body read time are all capped before anything
//!   touches the database.
//!
//! # Layout
//! - [`config`]: TOML + `DCS_AGG_*` environment, validated.
//! - `server`: the TLS accept loop and graceful shutdown.
//! - `http`: routes, request checks and the error-to-status mapping.
//! - `store`: the PostgreSQL write path (claim the seq range in
//!   `record_ranges`, then COPY straight into `records`; through a staging
//!   table only when the claim overlaps).
//! - `agent_gauges`: the per-agent gauges, rebuilt from the `agents` table
//!   at start-up and every `metrics.agents_refresh_interval`.
//! - [`retention`]: daily partitions of `records`, created ahead and dropped
//!   past retention.
//! - [`server_cert`]: the server certificate, reloaded on SIGHUP or when its
//!   files change.
//! - [`revocation`]: the in-memory deny list every batch is checked against.
//! - [`platform`]: the platform API (`/api/v1`): bearer tokens, RBAC, records,
//!   agents, tenants, tokens and the audit trail.

mod admission;
mod agent_gauges;
pub mod config;
mod connection;
mod error_shape;
mod http;
pub mod platform;
pub mod replay;
pub mod retention;
pub mod revocation;
mod server;
pub mod server_cert;
mod store;

use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::TcpListener;

pub use config::{Config, DatabaseConfig};
pub use dcs_shared::config::ConfigError;

/// Shown in `pg_stat_activity`, so a DBA can tell whose connections these are.
const APPLICATION_NAME: &str = "dcs-aggregator";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Every failure of the aggregator outside a single request (requests answer
/// with an HTTP status instead, see the `http` module).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Loading the PEM files or building the rustls configuration.
    #[error("TLS setup: {0}")]
    Tls(#[source] dcs_shared::Error),
    #[error("read database URL from {}: {source}", path.display())]
    UrlFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The URL itself is unusable. The URL is not repeated: it may hold a password.
    #[error("database.url is not a valid PostgreSQL URL: {0}")]
    DatabaseUrl(#[source] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("bind admin listener on {address}: {source}")]
    AdminBind {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("bind platform API listener on {address}: {source}")]
    PlatformBind {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The platform API's own thread or runtime could not be started.
    #[error("start the platform API's runtime: {0}")]
    PlatformRuntime(#[source] std::io::Error),
    #[error("install the SIGHUP handler: {0}")]
    Signal(#[source] std::io::Error),
    /// A database call outside a request (the CLI, maintenance tasks).
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// An operator's request that cannot be carried out (unknown tenant, ...).
    #[error("{0}")]
    Refused(String),
}

/// The sockets [`serve_all`] serves. Listeners left `None` are bound from the
/// configuration (or not at all: the platform API only when enabled).
pub struct Listeners {
    pub agents: TcpListener,
    pub admin: Option<TcpListener>,
    pub platform: Option<TcpListener>,
}

/// Creates the connection pool. Connections are opened on first use, so an
/// aggregator started while PostgreSQL is down comes up, answers 503 until the
/// database is back, and `/ready` says so; run [`migrate`] first to fail fast
/// instead.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, Error> {
    let url = config.resolve_url()?;
    let options = PgConnectOptions::from_str(&url)
        .map_err(Error::DatabaseUrl)?
        .application_name(APPLICATION_NAME);
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        // Behind HAProxy or a DNS name that follows the primary, a new
        // connection may still land on a standby or a demoted primary for a
        // moment after a failover; it is refused, and retried until the
        // acquire timeout, so batches see 503 rather than 25006 errors.
        .after_connect(|conn, _meta| Box::pin(store::is_writable(conn)))
        .connect_lazy_with(options))
}

/// A pool of `max_connections` to the database `pool` connects to, with the
/// same checks, for callers that must not compete with batches for `pool`'s
/// connections (the platform API).
pub fn sibling_pool(pool: &PgPool, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(pool.options().get_acquire_timeout())
        .after_connect(|conn, _meta| Box::pin(store::is_writable(conn)))
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// Applies the migrations in `migrations/` that this database has not seen.
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// How many steps lower (Linux nice) the platform API's threads run than
/// ingest's. Under contention a nice-5 thread gets about a third of the CPU
/// time a nice-0 one gets, so a flood of API callers (TLS handshakes, refused
/// tokens, heavy queries) delays agents' batches by little, while an idle
/// ingest path leaves the API all the CPU it wants.
pub const PLATFORM_NICE: i32 = 5;

/// What the platform API's runtime takes over from the main one.
struct PlatformParts {
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    pool: PgPool,
    max_db_connections: u32,
    deny: revocation::DenyList,
    signer: Option<Arc<platform::enrollment::Signer>>,
    policy: server::Policy,
}

/// Serves the platform API on a runtime of its own whose threads run at
/// [`PLATFORM_NICE`]: its handshakes, requests and database waits are then
/// scheduled by the kernel below the agents' batches, instead of queueing
/// among them on the same workers. The receiver completes once the listener
/// has stopped (after `stopped`) and its connections are closed.
fn spawn_platform(
    parts: PlatformParts,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> Result<tokio::sync::oneshot::Receiver<()>, Error> {
    let listener = parts.listener.into_std().map_err(Error::PlatformRuntime)?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let nice = platform_nice();
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("dcs-platform".into())
        .spawn(move || {
            // This thread runs the accept loop; the workers the connections.
            set_thread_nice(nice);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("dcs-platform")
                .on_thread_start(move || set_thread_nice(nice))
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            tracing::error!(message = "platform listener lost", %error);
                            return;
                        }
                    };
                    // Its own pool, made on this runtime: no API caller can
                    // hold a connection a batch waits for.
                    let pool = sibling_pool(&parts.pool, parts.max_db_connections);
                    let state = platform::PlatformState::new(pool, parts.deny);
                    let app = platform::router(state.with_signer(parts.signer));
                    server::run(listener, Some(parts.tls), app, parts.policy, stopped).await;
                }),
                Err(error) => {
                    tracing::error!(message = "platform API runtime did not start", %error);
                }
            }
            let _ = done.send(());
        })
        .map_err(Error::PlatformRuntime)?;
    Ok(finished)
}

/// The nice value the platform API's threads run at: [`PLATFORM_NICE`]
/// above the calling thread's (that of the process, unless it was changed).
fn platform_nice() -> i32 {
    // SAFETY: getpriority(2) reads this thread's priority and nothing else.
    let own = unsafe { nix::libc::getpriority(nix::libc::PRIO_PROCESS, 0) };
    (own + PLATFORM_NICE).min(19)
}

/// Sets the calling thread's nice value to `nice` (on Linux, nice values
/// are per thread; new threads inherit their creator's, so each thread sets
/// the absolute value rather than adding to what it inherited). A failure
/// leaves the thread as it was.
fn set_thread_nice(nice: i32) {
    // SAFETY: setpriority(2) on the calling thread (id 0) changes only its
    // scheduling priority.
    let result = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, nice) };
    if result != 0 {
        tracing::debug!(message = "could not lower the platform API's priority", error = %std::io::Error::last_os_error());
    }
}

/// Serves agents on `listener` until `shutdown` completes, then drains:
/// `/ready` fails at once, batches are accepted for `shutdown.drain_delay`,
/// then every connection is closed gracefully and requests in flight get up
/// to `shutdown.grace` to finish (see `server`).
///
/// `pool` may come from [`connect`] or anywhere else; the schema must be
/// migrated.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    pool: PgPool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let listeners = Listeners {
        agents: listener,
        admin: None,
        platform: None,
    };
    serve_all(listeners, config, pool, shutdown).await
}

/// [`serve`] with every listener chosen by the caller (tests bind port 0).
pub async fn serve_all(
    listeners: Listeners,
    config: Config,
    pool: PgPool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    config.validate()?;
    let tls = config.tls.files().server_config().map_err(Error::Tls)?;
    let agents_cert = server_cert::ReloadableCert::load(&config.tls.cert, &config.tls.key)
        .map_err(Error::Refused)?;
    let tls = agents_cert.install(tls);
    let mut reloadable = vec![agents_cert];
    let platform_tls = if config.platform.enabled {
        let (cert, key) = config.platform.cert_and_key(&config.tls);
        let tls = dcs_shared::tls::server_config_no_client_auth(cert, key).map_err(Error::Tls)?;
        let platform_cert = server_cert::ReloadableCert::load(cert, key).map_err(Error::Refused)?;
        let tls = platform_cert.install(tls);
        reloadable.push(platform_cert);
        Some(tls)
    } else {
        None
    };
    let signer = platform::enrollment::Signer::load(&config).map_err(Error::Refused)?;
    let cert_watch =
        server_cert::spawn_reload_on_change(reloadable.clone(), config.tls.watch_interval);
    let cert_reload = server_cert::spawn_reload_on_sighup(reloadable).map_err(Error::Signal)?;
    let deny = revocation::DenyList::new();
    // Loaded before the first batch is accepted; if PostgreSQL is down now,
    // batches get 503 until the refresh task succeeds (fail closed).
    if let Err(error) = deny.load(&pool).await {
        tracing::warn!(message = "load deny list; batches wait for the database", %error);
    }
    let deny_refresh = deny.spawn_refresh(pool.clone(), config.revocation.refresh_interval);
    let maintenance = retention::spawn(pool.clone(), config.retention);
    // The recorder first: everything below may export at 0 from the start.
    let metrics = dcs_shared::metrics::install();
    server::register_metrics();
    http::register_metrics();
    let agent_gauges = agent_gauges::AgentGauges::new(config.metrics);
    let gauge_refresh = agent_gauges
        .clone()
        .spawn_refresh(pool.clone(), config.metrics.agents_refresh_interval);
    let state = http::AppState::new(
        &config,
        pool.clone(),
        deny.clone(),
        signer.clone(),
        agent_gauges,
    );
    if let Err(error) = state.replay_notice().load(&pool).await {
        tracing::warn!(message = "load the replay notice; the refresh will retry", %error);
    }
    let replay_refresh = state
        .replay_notice()
        .spawn_refresh(pool.clone(), config.revocation.refresh_interval);
    let admin = match listeners.admin {
        Some(admin) => admin,
        None => tokio::net::TcpListener::bind(config.admin.address)
            .await
            .map_err(|source| Error::AdminBind {
                address: config.admin.address,
                source,
            })?,
    };
    let platform = match (platform_tls, listeners.platform) {
        (None, _) => None,
        (Some(tls), Some(listener)) => Some((tls, listener)),
        (Some(tls), None) => Some((
            tls,
            tokio::net::TcpListener::bind(config.platform.address)
                .await
                .map_err(|source| Error::PlatformBind {
                    address: config.platform.address,
                    source,
                })?,
        )),
    };
    if let Ok(address) = admin.local_addr() {
        tracing::info!(message = "admin listener (metrics, health) on plain HTTP", %address);
    }
    let admin_app = http::admin_router(state.clone(), metrics);
    // Stopping takes three steps, so that a balancer stops sending new
    // connections before this replica stops taking work: readiness fails at
    // once while batches are still accepted for drain_delay; then the TLS
    // listeners close every connection gracefully (GOAWAY) and wait up to
    // shutdown.grace for requests in flight; the admin listener goes last so
    // the failing /ready stays visible throughout.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (admin_stop, admin_stopped) = tokio::sync::watch::channel(false);
    let drain_delay = config.shutdown.drain_delay;
    let draining = state.clone();
    tokio::spawn(async move {
        shutdown.await;
        draining.start_draining();
        tracing::info!(
            message = "draining: /ready answers 503, batches still accepted",
            drain_delay_secs = drain_delay.as_secs_f64(),
        );
        tokio::time::sleep(drain_delay).await;
        let _ = stop.send(true);
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let admin_policy = server::Policy::new(
        server::Kind::Admin,
        &config.limits,
        config.connections,
        config.shutdown.grace,
    );
    let admin_task = tokio::spawn(server::run(
        admin,
        None,
        admin_app,
        admin_policy,
        wait(admin_stopped),
    ));
    let platform_task = match platform {
        Some((tls, listener)) => {
            let policy = server::Policy::new(
                server::Kind::Platform,
                &config.limits,
                config.connections,
                config.shutdown.grace,
            );
            let parts = PlatformParts {
                listener,
                tls,
                pool: pool.clone(),
                max_db_connections: config.platform.max_db_connections,
                deny,
                signer,
                policy,
            };
            Some(spawn_platform(parts, wait(stopped.clone()))?)
        }
        None => None,
    };
    let app = http::router(state);
    let policy = server::Policy::new(
        server::Kind::Agents,
        &config.limits,
        config.connections,
        config.shutdown.grace,
    );
    server::run(listeners.agents, Some(tls), app, policy, wait(stopped)).await;
    if let Some(finished) = platform_task {
        let _ = finished.await;
    }
    let _ = admin_stop.send(true);
    let _ = admin_task.await;
    deny_refresh.abort();
    replay_refresh.abort();
    gauge_refresh.abort();
    cert_reload.abort();
    if let Some(watch) = cert_watch {
        watch.abort();
    }
    maintenance.abort();
    Ok(())
}
