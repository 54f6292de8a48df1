//! TCP and TLS listeners: one task per connection, reading at most
//! [`READ_CHUNK`] bytes, committing every complete frame in them, then
//! reading again (see the module doc of [`super`]).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::framing::{self, Framing};
use super::{READ_CHUNK, Sink, Spec, commit, count_closed, count_invalid, records};

/// Pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);
/// A TLS handshake longer than this is a stalled or hostile client.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub(super) fn bind(spec: &Spec) -> std::io::Result<TcpListener> {
    let socket = if spec.listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // Set on the listening socket so every accepted one inherits it, before
    // its window is advertised.
    if let Some(size) = spec.receive_buffer {
        socket.set_recv_buffer_size(size as u32)?;
    }
    socket.bind(spec.listen)?;
    socket.listen(1024)
}

/// The TLS acceptor of a `tls` listener; `None` for plain TCP.
pub(super) fn acceptor(spec: &Spec) -> Result<Option<TlsAcceptor>, dcs_shared::Error> {
    let Some(tls) = &spec.tls else {
        return Ok(None);
    };
    let config = match &tls.client_ca {
        Some(ca) => dcs_shared::tls::server_config(ca, &tls.cert, &tls.key)?,
        None => dcs_shared::tls::server_config_no_client_auth(&tls.cert, &tls.key)?,
    };
    // Syslog over TLS (RFC 5425) negotiates no application protocol; the
    // HTTP ALPN list would refuse a sender offering one.
    let mut config = Arc::unwrap_or_clone(config);
    config.alpn_protocols.clear();
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

pub(super) async fn serve(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    spec: Arc<Spec>,
    sink: Sink,
    mut stop: watch::Receiver<bool>,
) {
    tracing::info!(message = "syslog listener started", listener = %spec.name, protocol = ?spec.protocol, address = %spec.listen);
    let permits = Arc::new(Semaphore::new(spec.max_connections));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        count_closed(&spec, "max_connections");
                        tracing::warn!(message = "syslog connection refused: max_connections reached", listener = %spec.name, %peer);
                        continue;
                    };
                    let (spec, sink, stop, acceptor) = (spec.clone(), sink.clone(), stop.clone(), acceptor.clone());
                    connections.spawn(async move {
                        let _permit = permit;
                        match acceptor {
                            None => connection(tcp, peer, &spec, &sink, stop).await,
                            Some(acceptor) => {
                                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                    Ok(Ok(tls)) => connection(tls, peer, &spec, &sink, stop).await,
                                    Ok(Err(error)) => {
                                        count_closed(&spec, "tls");
                                        tracing::info!(message = "syslog TLS handshake failed", listener = %spec.name, %peer, %error);
                                    }
                                    Err(_) => {
                                        count_closed(&spec, "tls");
                                        tracing::info!(message = "syslog TLS handshake timed out", listener = %spec.name, %peer);
                                    }
                                }
                            }
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(message = "syslog accept failed", listener = %spec.name, %error);
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Reads, frames, commits, reads again, until the sender closes, breaks
/// the framing, stalls inside a frame, or the agent stops.
async fn connection<S: AsyncRead + Unpin>(
    mut stream: S,
    peer: SocketAddr,
    spec: &Spec,
    sink: &Sink,
    mut stop: watch::Receiver<bool>,
) {
    let mut pending: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut chunk = vec![0u8; READ_CHUNK];
    // When the partial frame at the front of `pending` started to arrive.
    let mut frame_started: Option<Instant> = None;
    loop {
        let deadline = frame_started.map(|t| t + spec.frame_timeout);
        let read = tokio::select! {
            _ = stop.changed() => return,
            read = stream.read(&mut chunk) => read,
            () = sleep_until(deadline) => {
                count_closed(spec, "frame_timeout");
                tracing::info!(message = "syslog frame not completed in time; closing", listener = %spec.name, %peer, pending_bytes = pending.len());
                return;
            }
        };
        let n = match read {
            Ok(0) => {
                finish(&pending, peer, spec, sink).await;
                return;
            }
            Ok(n) => n,
            Err(error) => {
                tracing::debug!(message = "syslog connection read failed", listener = %spec.name, %peer, %error);
                return;
            }
        };
        pending.extend_from_slice(&chunk[..n]);
        let (frames, used, error) = framing::split(&pending, spec.framing, spec.max_message);
        let batch = records(spec, sink, peer, frames.iter().map(|r| &pending[r.clone()]));
        pending.drain(..used);
        if used > 0 || pending.is_empty() {
            frame_started = (!pending.is_empty()).then(Instant::now);
        } else if frame_started.is_none() {
            frame_started = Some(Instant::now());
        }
        // The commit is not raced against `stop`: what was read is written.
        if commit(spec, sink, batch, true).await.is_err() {
            return;
        }
        if let Some(error) = error {
            count_invalid(spec, "framing", 1);
            count_closed(spec, "framing");
            tracing::warn!(message = "syslog framing error; closing the connection", listener = %spec.name, %peer, %error);
            return;
        }
    }
}

/// A sender may close right after its last LF-framed message without the
/// final LF; that text is a message too. A partial octet-counted frame is not.
async fn finish(pending: &[u8], peer: SocketAddr, spec: &Spec, sink: &Sink) {
    let counted = match spec.framing {
        Framing::OctetCounting => true,
        Framing::Lf => false,
        Framing::Auto => pending.first().is_some_and(u8::is_ascii_digit),
    };
    if pending.is_empty() || pending.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    if counted {
        count_invalid(spec, "framing", 1);
        return;
    }
    let batch = records(spec, sink, peer, std::iter::once(pending));
    let _ = commit(spec, sink, batch, true).await;
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
