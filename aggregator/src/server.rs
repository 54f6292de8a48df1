//! The aggregator's listeners: TCP accept, TLS handshake (agents and the
//! platform API; the admin listener is plain HTTP), HTTP/1.1 or HTTP/2.
//!
//! Design constraints:
//! - Mutual TLS is enforced in the handshake (rustls verifies the client chain
//!   against our CA), so a peer without a valid certificate never reaches HTTP.
//! - The agent's identity is read once per connection from the verified leaf
//!   and attached to every request on it; nothing in a request can change it.
//! - Nothing a peer does can stall the accept loop or panic the process: every
//!   connection runs in its own task, the handshake has a deadline, and
//!   handshake failures are logged with the peer address and forgotten.
//! - Shutdown stops accepting at once, sends every connection a graceful
//!   close (GOAWAY on HTTP/2, `Connection: close` on HTTP/1.1), lets requests
//!   in flight finish (their batches commit), and cuts what is left after
//!   `[shutdown] grace`.
//! - No agent connection outlives `limits.max_connection_age` (±10 %) plus
//!   its grace: an L4 balancer only places new connections, so connections
//!   must end for a restarted or added replica to get its share of agents.
//!   The close is graceful, so no batch is cut in the middle.
//! - No client can exhaust a listener: connections are capped per listener and
//!   per source address, and every phase has a deadline (handshake, headers,
//!   body rate, idle). Each refusal is counted by reason.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use dcs_shared::identity::AgentIdentity;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tower::util::BoxCloneService;
use tracing::{debug, info, warn};

use crate::config::{BODY_RATE_GRACE, ConnectionsConfig, LimitsConfig, MAX_CONNECTION_AGE_JITTER};
use crate::connection::{PeerAddr, PresentedCertificate, SlowBody};
use crate::revocation::AgentCertificate;
use dcs_shared::wire::{ErrorBody, ErrorCode};

/// Pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// HTTP/2 pings on an idle connection find agents that vanished without a
/// FIN (a cut link), so their connection tasks do not linger for hours.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// The whole-body deadline on top of `limits.request_timeout`: the batch
/// handler's own timeout (408) fires first; this one bounds the platform
/// API's bodies, which have no deadline of their own.
const BODY_DEADLINE_SLACK: Duration = Duration::from_secs(1);

/// Why a connection ended, for `dcs_aggregator_connections_closed_total`.
const CLOSE_REASONS: [&str; 5] = ["max_age", "drain", "idle", "client", "error"];
/// Why a connection or request was refused, for
/// `dcs_aggregator_connections_refused_total`.
const REFUSAL_REASONS: [&str; 6] = [
    "max_connections",
    "per_address",
    "handshake_timeout",
    "header_timeout",
    "body_timeout",
    "body_rate",
];

/// Who connects to a listener, which decides what each request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Agents over mutual TLS: every request carries the [`AgentIdentity`]
    /// read from the verified certificate.
    Agents,
    /// The platform API over server TLS: requests carry the [`PeerAddr`] for
    /// the audit trail and authenticate with a bearer token.
    Platform,
    /// The admin listener (metrics, health, `/agents`) over plain HTTP: the
    /// same connection limits, so a flood of it cannot take the process's
    /// descriptors from the other two.
    Admin,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Agents => "agents",
            Kind::Platform => "platform",
            Kind::Admin => "admin",
        }
    }
}

/// Exports every close and refusal reason at 0, so dashboards and alerts see
/// the series before the first event.
pub(crate) fn register_metrics() {
    for reason in HANDSHAKE_FAILURE_REASONS {
        metrics::counter!("dcs_aggregator_tls_handshake_failures_total", "reason" => reason)
            .increment(0);
    }
    for reason in CLOSE_REASONS {
        metrics::counter!("dcs_aggregator_connections_closed_total", "reason" => reason)
            .increment(0);
    }
    for kind in [Kind::Agents, Kind::Platform, Kind::Admin] {
        for reason in REFUSAL_REASONS {
            metrics::counter!("dcs_aggregator_connections_refused_total", "listener" => kind.label(), "reason" => reason)
                .increment(0);
        }
    }
}

fn refused(kind: Kind, reason: &'static str) {
    metrics::counter!("dcs_aggregator_connections_refused_total", "listener" => kind.label(), "reason" => reason)
        .increment(1);
}

/// Everything one listener's connections share besides their sockets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub kind: Kind,
    pub handshake_timeout: Duration,
    /// The smaller of `connections.header_timeout` and
    /// `limits.handshake_timeout`, which has always bounded headers too.
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    /// `None`: connections live as long as they work (the platform API).
    pub max_age: Option<Duration>,
    pub max_age_grace: Duration,
    pub connections: ConnectionsConfig,
    /// How long requests in flight get after the listener stops.
    pub shutdown_grace: Duration,
}

impl Policy {
    pub(crate) fn new(
        kind: Kind,
        limits: &LimitsConfig,
        connections: ConnectionsConfig,
        shutdown_grace: Duration,
    ) -> Self {
        let max_age = (kind == Kind::Agents && !limits.max_connection_age.is_zero())
            .then_some(limits.max_connection_age);
        Policy {
            kind,
            handshake_timeout: limits.handshake_timeout,
            header_timeout: connections.header_timeout.min(limits.handshake_timeout),
            request_timeout: limits.request_timeout,
            max_age,
            max_age_grace: limits.max_connection_age_grace,
            connections,
            shutdown_grace,
        }
    }

    /// This connection's age limit: the configured one ±10 %, at random.
    fn jittered_max_age(&self) -> Option<Duration> {
        self.max_age.map(|age| {
            let factor = 1.0 + MAX_CONNECTION_AGE_JITTER * (2.0 * fastrand::f64() - 1.0);
            age.mul_f64(factor)
        })
    }
}

/// Open connections per source address of one listener.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

/// Holds one of an address's connection slots until dropped.
struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    fn admit(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<AddressSlot> {
        let mut table = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let open = table.entry(ip).or_insert(0);
        if cap != 0 && *open >= cap {
            return None;
        }
        *open += 1;
        Some(AddressSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut table = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = table.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                table.remove(&self.ip);
            }
        }
    }
}

/// Serves `listener` until `stop` completes, then closes every connection
/// gracefully and waits up to the policy's shutdown grace for requests in
/// flight. `tls` is `None` for the plain-HTTP admin listener.
pub(crate) async fn run(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    policy: Policy,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let builder = Arc::new(http_builder(&policy));
    let slots = Arc::new(Semaphore::new(policy.connections.max_connections));
    let per_address = Arc::new(PerAddress::default());
    let (drain, draining) = watch::channel(false);
    let mut connections = JoinSet::new();
    let kind = policy.kind;
    if let Ok(addr) = listener.local_addr() {
        info!(message = "listening", listener = ?kind, %addr);
    }

    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            // Reap finished connection tasks so the set does not grow forever.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // Refused connections are closed at once: nothing is read
                    // from them, so they cost one descriptor for a moment.
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        refused(kind, "max_connections");
                        debug!(message = "connection refused: listener at connections.max_connections", %peer);
                        continue;
                    };
                    let Some(address_slot) = per_address
                        .admit(peer.ip(), policy.connections.max_connections_per_address)
                    else {
                        refused(kind, "per_address");
                        debug!(message = "connection refused: address at connections.max_connections_per_address", %peer);
                        continue;
                    };
                    let draining = draining.clone();
                    let acceptor = acceptor.clone();
                    let app = app.clone();
                    let builder = builder.clone();
                    connections.spawn(async move {
                        connection(tcp, peer, acceptor, app, builder, draining, policy).await;
                        drop((slot, address_slot));
                    });
                }
                Err(error) => {
                    warn!(message = "accept failed", %error);
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }

    drop(listener);
    let open = connections.len();
    info!(message = "stopping: no new connections, closing open ones gracefully", listener = ?kind, open);
    let _ = drain.send(true);
    let finished = tokio::time::timeout(policy.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        warn!(
            message = "requests still in flight after the grace period; closing their connections",
            listener = ?kind,
            grace_secs = policy.shutdown_grace.as_secs_f64(),
        );
    }
    // Connections still open here are cut; batch writes run in their own
    // tasks and still commit or roll back.
    connections.shutdown().await;
    info!(message = "listener stopped", listener = ?kind);
}

fn http_builder(policy: &Policy) -> auto::Builder<TokioExecutor> {
    let c = &policy.connections;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(policy.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(c.max_concurrent_streams)
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(policy.header_timeout);
    builder
}

/// Requests in flight on one connection and when the last one ended, for the
/// idle timeout.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
    /// Set by the first request (see `connection`).
    first_request: Notify,
    seen: AtomicBool,
}

/// Counts one request in flight until dropped.
struct InFlight(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            first_request: Notify::new(),
            seen: AtomicBool::new(false),
        })
    }

    fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if !self.seen.swap(true, Ordering::SeqCst) {
            self.first_request.notify_one();
        }
        InFlight(self.clone())
    }

    /// When the connection becomes idle past the timeout, if nothing starts.
    fn idle_deadline(&self, timeout: Duration) -> Instant {
        let now = Instant::now();
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return now + timeout;
        }
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) + timeout
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

type ConnService = BoxCloneService<hyper::Request<Incoming>, axum::response::Response, Infallible>;

/// The router for one connection: the identity (or peer address) attached to
/// every request, bodies held to the minimum rate, requests counted for the
/// idle timeout.
fn service_for(
    app: Router,
    kind: Kind,
    peer: SocketAddr,
    identity: Result<AgentIdentity, String>,
    presented: Option<PresentedCertificate>,
    activity: Arc<Activity>,
    policy: &Policy,
) -> ConnService {
    let inner: BoxCloneService<hyper::Request<Body>, axum::response::Response, Infallible> =
        match identity {
            _ if kind != Kind::Agents => app
                .map_request(move |mut request: hyper::Request<Body>| {
                    request.extensions_mut().insert(PeerAddr(peer));
                    request
                })
                .boxed_clone(),
            Ok(agent) => {
                debug!(message = "agent connected", %peer, agent = %agent);
                app.map_request(move |mut request: hyper::Request<Body>| {
                    request.extensions_mut().insert(agent.clone());
                    // Renewal audit rows name the caller's address.
                    request.extensions_mut().insert(PeerAddr(peer));
                    if let Some(presented) = &presented {
                        request.extensions_mut().insert(presented.clone());
                    }
                    request
                })
                .boxed_clone()
            }
            Err(reason) => {
                info!(message = "verified certificate without a usable identity; refusing its requests", %peer, %reason);
                ServiceExt::<hyper::Request<Body>>::boxed_clone(forbidden_router(reason))
            }
        };
    let min_rate = policy.connections.min_body_rate.0;
    let deadline = policy.request_timeout + BODY_DEADLINE_SLACK;
    inner
        .map_request(move |request: hyper::Request<Incoming>| {
            request.map(|incoming| Body::new(PacedBody::new(incoming, kind, min_rate, deadline)))
        })
        .map_future(move |response| {
            let in_flight = activity.start();
            async move {
                // The request counts as in flight until its response body
                // is sent (a long NDJSON export is not idle).
                let response: Result<axum::response::Response, Infallible> = response.await;
                response.map(|r| {
                    r.map(|body| {
                        Body::new(TrackedBody {
                            inner: body,
                            _in_flight: in_flight,
                        })
                    })
                })
            }
        })
        .boxed_clone()
}

/// A response body that keeps its request counted as in flight until it is
/// dropped (sent, or abandoned with its connection).
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Answers every request of a connection whose verified certificate holds
/// no usable identity: 403 `bad_identity`, naming why.
fn forbidden_router(reason: String) -> Router {
    let body = ErrorBody::new(
        ErrorCode::BadIdentity.as_str(),
        format!("the client certificate carries no valid dcs:// identity: {reason}"),
    );
    Router::new()
        .fallback(move || {
            let body = body.clone();
            async move { (hyper::StatusCode::FORBIDDEN, axum::Json(body)) }
        })
        .layer(axum::middleware::from_fn(crate::error_shape::json_errors))
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    draining: watch::Receiver<bool>,
    policy: Policy,
) {
    let Policy {
        handshake_timeout,
        kind,
        ..
    } = policy;
    let _ = tcp.set_nodelay(true);
    let Some(acceptor) = acceptor else {
        // Plain HTTP (the admin listener): no identity to read.
        let activity = Activity::new();
        let identity = Err("plain HTTP".to_owned());
        let service = service_for(app, kind, peer, identity, None, activity.clone(), &policy);
        serve(tcp, peer, service, activity, builder, draining, policy).await;
        return;
    };
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
            refused(kind, "handshake_timeout");
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
    let activity = Activity::new();
    let service = service_for(
        app,
        kind,
        peer,
        identity,
        presented,
        activity.clone(),
        &policy,
    );
    serve(stream, peer, service, activity, builder, draining, policy).await;
}

/// Serves HTTP on an accepted (and, for TLS listeners, handshaken)
/// connection until it ends, enforcing the header deadline, the idle
/// timeout, the age limit and the listener's drain.
async fn serve<I>(
    stream: I,
    peer: SocketAddr,
    service: ConnService,
    activity: Arc<Activity>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut draining: watch::Receiver<bool>,
    policy: Policy,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let kind = policy.kind;
    let io = TokioIo::new(stream);
    let conn = builder.serve_connection(io, TowerToHyperService::new(service));
    tokio::pin!(conn);
    let open = metrics::gauge!("dcs_aggregator_connections_open");
    open.increment(1.0);
    let opened = Instant::now();
    let max_age = policy.jittered_max_age();
    let idle_timeout = policy.connections.idle_timeout;
    // Until the first request nothing else bounds the wait: hyper-util reads
    // until it can tell HTTP/1 from the HTTP/2 preface with no deadline, and
    // HTTP/2 has no header timeout, so a peer that stalls there would hold its
    // connection forever.
    let header_deadline = opened + policy.header_timeout;
    // Why this side began closing the connection; `None` while it has not.
    let mut closing: Option<&'static str> = None;
    let mut cut_at: Option<Instant> = None;
    let result = loop {
        let age_deadline = match (closing, max_age) {
            (None, Some(age)) => Some(opened + age),
            _ => None,
        };
        let idle_deadline = if closing.is_none() && activity.seen.load(Ordering::SeqCst) {
            Some(activity.idle_deadline(idle_timeout))
        } else {
            None
        };
        let seen = activity.seen.load(Ordering::SeqCst);
        tokio::select! {
            result = conn.as_mut() => break result,
            () = activity.first_request.notified(), if !seen => {}
            () = tokio::time::sleep_until(header_deadline), if !seen && closing.is_none() => {
                refused(kind, "header_timeout");
                info!(message = "no request within connections.header_timeout of connecting; closing", %peer);
                open.decrement(1.0);
                return;
            }
            () = sleep_until_some(age_deadline) => {
                debug!(message = "connection reached its max age; closing gracefully", %peer);
                closing = Some("max_age");
                cut_at = Some(Instant::now() + policy.max_age_grace);
                conn.as_mut().graceful_shutdown();
            }
            () = sleep_until_some(idle_deadline) => {
                if activity.in_flight.load(Ordering::SeqCst) == 0
                    && activity.idle_deadline(idle_timeout) <= Instant::now()
                {
                    debug!(message = "idle connection; closing", %peer);
                    closing = Some("idle");
                    cut_at = Some(Instant::now() + policy.max_age_grace);
                    conn.as_mut().graceful_shutdown();
                }
            }
            // The listener's stop: the run loop bounds the wait with its
            // shutdown grace and cuts what is left.
            Ok(_) = draining.wait_for(|d| *d), if closing.is_none() || closing == Some("idle") => {
                closing = Some("drain");
                conn.as_mut().graceful_shutdown();
            }
            () = sleep_until_some(cut_at), if closing != Some("drain") => {
                info!(message = "requests still in flight after the grace; cutting the connection", %peer, reason = closing.unwrap_or("max_age"));
                break Ok(());
            }
        }
    };
    let reason = match (closing, &result) {
        (Some(reason), _) => reason,
        (None, Ok(())) => "client",
        (None, Err(error)) => {
            // hyper's own header deadline (HTTP/1.1 requests after the first,
            // or a first request whose headers raced the deadline above).
            if is_timeout(error.as_ref()) {
                refused(kind, "header_timeout");
            }
            debug!(message = "connection ended with an error", %peer, %error);
            "error"
        }
    };
    metrics::counter!("dcs_aggregator_connections_closed_total", "reason" => reason).increment(1);
    open.decrement(1.0);
}

/// Whether `error` (or anything it wraps) is hyper's header read timeout.
fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        cause = error.source();
    }
    false
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A request body that fails once it falls below the minimum rate: after
/// [`BODY_RATE_GRACE`], `received` bytes must have arrived by
/// `start + grace + received / rate`.
struct PacedBody {
    inner: Incoming,
    kind: Kind,
    min_rate: u64,
    started: Instant,
    deadline: Instant,
    received: u64,
    timer: Pin<Box<Sleep>>,
}

impl PacedBody {
    fn new(inner: Incoming, kind: Kind, min_rate: u64, deadline: Duration) -> Self {
        let started = Instant::now();
        let mut body = PacedBody {
            inner,
            kind,
            min_rate,
            started,
            deadline: started + deadline,
            received: 0,
            timer: Box::pin(tokio::time::sleep_until(started + deadline)),
        };
        body.rearm();
        body
    }

    /// The moment the next byte is due.
    fn due(&self) -> Instant {
        if self.min_rate == 0 {
            return self.deadline;
        }
        let owed = Duration::from_secs_f64(self.received as f64 / self.min_rate as f64);
        (self.started + BODY_RATE_GRACE + owed).min(self.deadline)
    }

    fn rearm(&mut self) {
        let due = self.due();
        self.timer.as_mut().reset(due);
    }
}

impl hyper::body::Body for PacedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received += data.len() as u64;
                    self.rearm();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(()) => {
                    let (reason, message) = if Instant::now() >= self.deadline {
                        ("body_timeout", "the request body was not received in time")
                    } else {
                        (
                            "body_rate",
                            "the request body arrived slower than connections.min_body_rate",
                        )
                    };
                    refused(self.kind, reason);
                    // Re-arming far ahead keeps a caller that polls again
                    // from seeing the error twice.
                    let later = Instant::now() + Duration::from_secs(3600);
                    self.timer.as_mut().reset(later);
                    Poll::Ready(Some(Err(Box::new(SlowBody(message)))))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Every value of `dcs_aggregator_tls_handshake_failures_total{reason}`.
const HANDSHAKE_FAILURE_REASONS: [&str; 5] = [
    "timeout",
    "no_certificate",
    "unknown_ca",
    "expired",
    "other",
];

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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_certificate_without_identity_gets_403_on_every_route() {
        use http_body_util::BodyExt as _;
        use tower::ServiceExt as _;
        for path in ["/health", dcs_shared::wire::BATCHES_PATH, "/anything"] {
            let response = forbidden_router("no dcs:// URI SAN".into())
                .oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(response.status(), hyper::StatusCode::FORBIDDEN, "{path}");
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let body: ErrorBody = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body.error, "bad_identity");
            assert!(
                body.message.contains("no dcs:// URI SAN"),
                "{}",
                body.message
            );
        }
    }
}
