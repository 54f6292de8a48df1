//! UDP listeners: one datagram is one message. Datagrams are read until
//! the socket has no more ready (or [`UDP_BATCH`]) and committed together.
//!
//! The kernel drops datagrams when the agent reads too slowly; it counts
//! them per socket in the `drops` column of `/proc/net/udp` and
//! `/proc/net/udp6`, which is exported as `dcs_agent_syslog_udp_drops_total`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use super::{Sink, Spec, UDP_BATCH, commit, count, count_invalid, records};

/// Batches read but not yet committed; beyond this, reading waits.
const PENDING_BATCHES: usize = 8;
/// How often the kernel's drop count is read.
const DROPS_INTERVAL: Duration = Duration::from_secs(1);
/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

pub(super) fn bind(spec: &Spec) -> std::io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(spec.listen)?;
    socket.set_nonblocking(true)?;
    if let Some(size) = spec.receive_buffer {
        set_receive_buffer(&socket, size)?;
    }
    UdpSocket::from_std(socket)
}

fn set_receive_buffer(socket: &std::net::UdpSocket, size: usize) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::RcvBuf, &size)
        .map_err(std::io::Error::from)
}

pub(super) async fn serve(
    socket: UdpSocket,
    spec: Arc<Spec>,
    sink: Sink,
    mut stop: watch::Receiver<bool>,
) {
    tracing::info!(message = "syslog listener started", listener = %spec.name, protocol = "udp", address = %spec.listen);
    // Reading and committing run side by side: while one batch commits (an
    // fsync), the next is read, so the socket's queue drains at the speed
    // of reading, not of the disk. When commits fall [`PENDING_BATCHES`]
    // behind, reading waits and the kernel drops (and counts) the excess.
    let (batches, mut pending) = mpsc::channel::<Batch>(PENDING_BATCHES);
    let committer = {
        let (spec, sink) = (spec.clone(), sink.clone());
        tokio::spawn(async move {
            while let Some(batch) = pending.recv().await {
                commit_batch(&spec, &sink, batch).await;
            }
        })
    };
    let inode = socket_inode(&socket);
    let mut drops_tick = tokio::time::interval(DROPS_INTERVAL);
    let mut datagram = vec![0u8; MAX_DATAGRAM];
    loop {
        let first = tokio::select! {
            _ = stop.changed() => break,
            _ = drops_tick.tick() => {
                export_drops(&spec, inode);
                continue;
            }
            received = socket.recv_from(&mut datagram) => received,
        };
        let mut batch: Batch = Vec::new();
        match first {
            Ok((n, from)) => batch.push((datagram[..n].to_vec(), from)),
            Err(error) => {
                tracing::debug!(message = "syslog UDP receive failed", listener = %spec.name, %error);
                continue;
            }
        }
        while batch.len() < UDP_BATCH {
            match socket.try_recv_from(&mut datagram) {
                Ok((n, from)) => batch.push((datagram[..n].to_vec(), from)),
                Err(_) => break,
            }
        }
        if batches.send(batch).await.is_err() {
            break;
        }
    }
    // What was read is committed before the listener reports stopped.
    drop(batches);
    let _ = committer.await;
    export_drops(&spec, inode);
}

/// Datagrams read together, with their senders.
type Batch = Vec<(Vec<u8>, SocketAddr)>;

async fn commit_batch(spec: &Spec, sink: &Sink, batch: Batch) {
    let mut out = Vec::with_capacity(batch.len());
    for (raw, from) in &batch {
        if raw.len() > spec.max_message {
            count("dcs_agent_syslog_messages_received_total", spec, 1);
            count_invalid(spec, "framing", 1);
            continue;
        }
        out.extend(records(spec, sink, *from, std::iter::once(raw.as_slice())));
    }
    if let Err(error) = commit(spec, sink, out, false).await {
        tracing::warn!(message = "syslog UDP datagrams not written", listener = %spec.name, %error);
    }
}

/// The socket's inode, which names it in `/proc/net/udp`.
fn socket_inode(socket: &UdpSocket) -> Option<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let fd = socket.as_raw_fd();
    std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|m| m.ino())
}

fn export_drops(spec: &Spec, inode: Option<u64>) {
    let Some(inode) = inode else { return };
    if let Some(drops) = kernel_drops(inode) {
        metrics::counter!("dcs_agent_syslog_udp_drops_total", "listener" => spec.name.clone())
            .absolute(drops);
    }
}

/// The `drops` column of the socket with `inode` in `/proc/net/udp{,6}`.
fn kernel_drops(inode: u64) -> Option<u64> {
    ["/proc/net/udp", "/proc/net/udp6"].iter().find_map(|path| {
        let table = std::fs::read_to_string(path).ok()?;
        drops_of(&table, inode)
    })
}

/// Columns: sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref
/// pointer drops.
fn drops_of(table: &str, inode: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.get(9)?.parse::<u64>().ok()? == inode)
            .then(|| cols.get(12)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drop_count_is_read_from_the_line_of_the_socket_inode() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  123: 0100007F:0202 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 0\n\
  124: 0100007F:0203 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 777 2 0000000000000000 31\n";
        assert_eq!(drops_of(table, 777), Some(31));
        assert_eq!(drops_of(table, 4242), Some(0));
        assert_eq!(drops_of(table, 1), None);
    }

    #[tokio::test]
    async fn a_bound_socket_is_found_in_proc_net_udp() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let inode = socket_inode(&socket).unwrap();
        assert_eq!(kernel_drops(inode), Some(0));
    }
}
