//! The local API's HTTP listener.
//!
//! `axum::serve` puts no deadline on a client: a producer (or anything else
//! on the network the API is bound to) that opens connections and never
//! finishes its request headers holds each one, and its file descriptor,
//! forever, until the agent can accept no one. This listener bounds every
//! stage a client controls:
//! - **Before the first request:** hyper-util reads until it can tell
//!   HTTP/1 from the HTTP/2 preface with no deadline of its own, so a
//!   connection that sends nothing is closed after `header_timeout`.
//! - **Request headers:** HTTP/1 `header_read_timeout`, the same bound,
//!   for every request of a keep-alive connection.
//! - **Request bodies** are bounded by the ingest router (`body_timeout`),
//!   which answers 408 with a JSON error instead of cutting the connection.
//!
//! Shutdown is graceful: no new connections, requests in flight finish
//! within [`SHUTDOWN_GRACE`], then the rest are closed.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// Longest wait for requests in flight at shutdown; producers whose request
/// is cut retry, and their ids make the retry idempotent.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(header_timeout))
        .keep_alive_timeout(header_timeout);
    let builder = std::sync::Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connection tasks so the set does not grow forever.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // Producers wait on each answer; Nagle's algorithm must
                    // never hold one back for a delayed ACK.
                    if let Err(error) = tcp.set_nodelay(true) {
                        tracing::debug!(message = "could not set TCP_NODELAY", %error);
                    }
                    let (builder, watcher, app) = (builder.clone(), graceful.watcher(), app.clone());
                    connections.spawn(async move {
                        let first_request = std::sync::Arc::new(tokio::sync::Notify::new());
                        let seen = first_request.clone();
                        let service = app.map_request(move |request: hyper::Request<Incoming>| {
                            seen.notify_one();
                            request
                        });
                        let conn = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service));
                        let served = watcher.watch(conn);
                        tokio::pin!(served);
                        let result = tokio::select! {
                            result = &mut served => result,
                            () = first_request.notified() => served.await,
                            () = tokio::time::sleep(header_timeout) => {
                                tracing::debug!(message = "no request within the header timeout; closing", %peer);
                                return;
                            }
                        };
                        if let Err(error) = result {
                            tracing::debug!(message = "connection ended with an error", %peer, %error);
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(message = "accept failed", %error);
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }

    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            message = "requests still in flight after the grace period; closing their connections",
            grace_secs = SHUTDOWN_GRACE.as_secs(),
        );
    }
    connections.shutdown().await;
}
