//! The agents' listener: TCP accept, TLS handshake, HTTP/1.1 or HTTP/2.
//!
//! Design constraints:
//! - Mutual TLS is enforced in the handshake (rustls verifies the client chain
//!   against our CA), so a peer without a valid certificate never reaches HTTP.
//! - The agent's identity is read once per connection from the verified leaf
//!   and attached to every request on it; nothing in a request can change it.
//! - Nothing a peer does can stall the accept loop or panic the process: every
//!   connection runs in its own task, the handshake has a deadline, and
//!   handshake failures are logged with the peer address and forgotten.
//! - Shutdown stops accepting at once, lets requests in flight finish (their
//!   batches commit), and cuts what is left after a bounded grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use dcs_shared::identity::AgentIdentity;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::config::LimitsConfig;
use crate::http;
use crate::revocation::AgentCertificate;

/// How long shutdown waits for requests in flight. Long enough for a batch
/// that is being written to commit; a request cut after it is retried by its
/// agent, which is safe because writes are idempotent.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// HTTP/2 pings on an idle connection find agents that vanished without a
/// FIN (a cut link), so their connection tasks do not linger for hours.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Who connects to a listener, which decides what each request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Agents over mutual TLS: every request carries the [`AgentIdentity`]
    /// read from the verified certificate.
    Agents,
    /// The platform API over server TLS: requests carry the [`PeerAddr`] for
    /// the audit trail and authenticate with a bearer token.
    Platform,
}

/// What every connection of one listener shares besides its sockets.
#[derive(Debug, Clone, Copy)]
struct Policy {
    handshake_timeout: Duration,
    kind: Kind,
}

/// The certificate an agent's connection presented, attached to each of its
/// requests for the deny list, and whether the agents table already has it.
#[derive(Debug, Clone)]
pub(crate) struct PresentedCertificate {
    pub cert: Arc<AgentCertificate>,
    /// Set once a batch on this connection stored the certificate's details,
    /// so they are written once per connection, not once per batch.
    pub recorded: Arc<std::sync::atomic::AtomicBool>,
}

impl PresentedCertificate {
    fn new(cert: AgentCertificate) -> Self {
        PresentedCertificate {
            cert: Arc::new(cert),
            recorded: Arc::default(),
        }
    }
}

/// The TCP peer of a platform API connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(pub SocketAddr);

pub(crate) async fn run(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    limits: &LimitsConfig,
    kind: Kind,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let acceptor = TlsAcceptor::from(tls);
    let builder = Arc::new(http_builder(limits));
    let handshake_timeout = limits.handshake_timeout;
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    if let Ok(addr) = listener.local_addr() {
        info!(message = "listening", listener = ?kind, %addr);
    }

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connection tasks so the set does not grow forever.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    connections.spawn(connection(
                        tcp,
                        peer,
                        acceptor.clone(),
                        app.clone(),
                        builder.clone(),
                        graceful.watcher(),
                        Policy { handshake_timeout, kind },
                    ));
                }
                Err(error) => {
                    warn!(message = "accept failed", %error);
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }

    drop(listener);
    info!(message = "shutting down: no new connections, finishing requests in flight");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            message = "requests still in flight after the grace period; closing their connections",
            grace_secs = SHUTDOWN_GRACE.as_secs(),
        );
    }
    // Connections still open here are cut; batch writes run in their own
    // tasks and still commit or roll back.
    connections.shutdown().await;
    info!(message = "listener stopped");
}

fn http_builder(limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // A client gets as long to send its request headers as it got for the
        // handshake; the body is bounded separately by request_timeout.
        .header_read_timeout(limits.handshake_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(limits.handshake_timeout);
    builder
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    policy: Policy,
) {
    let Policy {
        handshake_timeout,
        kind,
    } = policy;
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            metrics::counter!("dcs_aggregator_tls_handshake_failures_total", "reason" => handshake_failure_reason(&error))
                .increment(1);
            // InvalidData carries a TLS-level refusal (no, expired or foreign
            // certificate): worth an operator's attention. Anything else is a
            // peer that merely hung up (port scans, TCP health checks).
            if error.kind() == std::io::ErrorKind::InvalidData {
                info!(message = "TLS handshake refused", %peer, %error);
            } else {
                debug!(message = "TLS handshake failed", %peer, %error);
            }
            return;
        }
        Err(_) => {
            metrics::counter!("dcs_aggregator_tls_handshake_failures_total", "reason" => "timeout")
                .increment(1);
            info!(message = "TLS handshake timed out", %peer, timeout_secs = handshake_timeout.as_secs());
            return;
        }
    };

    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first());
    let identity = match leaf {
        Some(der) => AgentIdentity::from_certificate_der(der).map_err(|e| e.to_string()),
        // Unreachable with a verifier that requires a certificate; refuse anyway.
        None => Err("no client certificate".to_owned()),
    };
    let presented = leaf
        .and_then(|der| AgentCertificate::from_der(der))
        .map(PresentedCertificate::new);
    // Set by the first request. Until then nothing bounds the wait: hyper-util
    // reads until it can tell HTTP/1 from the HTTP/2 preface with no deadline,
    // and HTTP/2 has no handshake timeout, so a peer that stalls there would
    // hold its connection forever.
    let first_request = Arc::new(tokio::sync::Notify::new());
    let seen = first_request.clone();
    let mark = move |request: hyper::Request<Incoming>| {
        seen.notify_one();
        request
    };
    let service = match identity {
        _ if kind == Kind::Platform => app
            .map_request(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(PeerAddr(peer));
                mark(request)
            })
            .boxed_clone(),
        Ok(agent) => {
            debug!(message = "agent connected", %peer, agent = %agent);
            app.map_request(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(agent.clone());
                if let Some(presented) = &presented {
                    request.extensions_mut().insert(presented.clone());
                }
                mark(request)
            })
            .boxed_clone()
        }
        Err(reason) => {
            info!(message = "verified certificate without a usable identity; refusing its requests", %peer, %reason);
            ServiceExt::<hyper::Request<Incoming>>::boxed_clone(
                http::forbidden_router(reason).map_request(mark),
            )
        }
    };

    let io = TokioIo::new(stream);
    let conn = builder.serve_connection(io, TowerToHyperService::new(service));
    let open = metrics::gauge!("dcs_aggregator_connections_open");
    open.increment(1.0);
    let served = watcher.watch(conn);
    tokio::pin!(served);
    let outcome = tokio::select! {
        result = &mut served => Some(result),
        () = first_request.notified() => None,
        () = tokio::time::sleep(handshake_timeout) => {
            info!(message = "no request within the handshake timeout after TLS; closing", %peer);
            open.decrement(1.0);
            return;
        }
    };
    let result = match outcome {
        Some(result) => result,
        None => served.await,
    };
    if let Err(error) = result {
        debug!(message = "connection ended with an error", %peer, %error);
    }
    open.decrement(1.0);
}

/// A bounded label for why a handshake failed, from rustls's error text.
fn handshake_failure_reason(error: &std::io::Error) -> &'static str {
    let text = error.to_string().to_ascii_lowercase();
    if text.contains("expired") {
        "expired"
    } else if text.contains("unknownissuer")
        || text.contains("unknown issuer")
        || text.contains("unknownca")
    {
        "unknown_ca"
    } else if text.contains("certificaterequired")
        || text.contains("no certificate")
        || text.contains("peer sent no certificates")
    {
        "no_certificate"
    } else {
        "other"
    }
}
