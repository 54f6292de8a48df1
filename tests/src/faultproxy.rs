//! A TCP fault proxy between agent and aggregator. It forwards bytes untouched
//! (TLS stays end to end) and, on command, breaks the link the ways real
//! networks do. The kernel here has no `netem`, so this is how loss of
//! connectivity, latency, throttling and the lost acknowledgement are injected.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Reset every connection at once (as a refused or broken link looks).
    Refuse,
    /// Accept and swallow: nothing is forwarded either way, nothing answers.
    Blackhole,
    /// Forward the start of each request, then reset both sides mid-request.
    ResetMidRequest,
    /// Forward the whole request to the aggregator, wait for its answer, and
    /// reset the client instead of delivering it: the aggregator committed,
    /// the agent never hears so. The classic lost acknowledgement.
    LostAck,
    /// Delay every chunk by this many milliseconds.
    Latency(u64),
    /// Limit each direction to this many bytes per second.
    Throttle(u64),
}

/// Client bytes after which a connection is taken to be carrying a batch
/// (past the TLS handshake, which is a few KiB).
const REQUEST_THRESHOLD: u64 = 16 * 1024;

pub struct FaultProxy {
    pub addr: SocketAddr,
    fault: watch::Sender<Fault>,
    /// Answers swallowed in `LostAck` mode: proof the fault really happened.
    pub acks_dropped: Arc<AtomicU64>,
    /// Connections the upstream closed or reset while a batch sent through
    /// them still awaited its answer: proof that a killed aggregator had
    /// batches in flight.
    pub answers_cut: Arc<AtomicU64>,
    pub connections: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (port 0) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), upstream).await
    }

    pub async fn start_on(listen: SocketAddr, upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind(listen).await.expect("bind fault proxy");
        let addr = listener.local_addr().expect("local addr");
        let (fault, rx) = watch::channel(Fault::Pass);
        let acks_dropped = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let answers_cut = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let acks_dropped = acks_dropped.clone();
            let answers_cut = answers_cut.clone();
            let connections = connections.clone();
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    connections.fetch_add(1, Ordering::Relaxed);
                    let rx = rx.clone();
                    let acks_dropped = acks_dropped.clone();
                    let answers_cut = answers_cut.clone();
                    tokio::spawn(async move {
                        let _ = handle(client, upstream, rx, acks_dropped, answers_cut).await;
                    });
                }
            }
        });
        FaultProxy {
            addr,
            fault,
            acks_dropped,
            answers_cut,
            connections,
            task,
        }
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn reset(stream: &TcpStream) {
    // Linger 0 turns the close into an RST, as a broken link looks.
    let _ = stream.set_zero_linger();
}

async fn handle(
    client: TcpStream,
    upstream: SocketAddr,
    mut rx: watch::Receiver<Fault>,
    acks_dropped: Arc<AtomicU64>,
    answers_cut: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let fault = *rx.borrow_and_update();
    match fault {
        Fault::Refuse => {
            reset(&client);
            return Ok(());
        }
        Fault::Blackhole => return swallow(client, rx).await,
        _ => {}
    }
    let server = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(_) => {
            reset(&client);
            return Ok(());
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut cbuf = vec![0u8; 16 * 1024];
    let mut sbuf = vec![0u8; 16 * 1024];
    let mut sent_up = 0u64;
    // Request bytes went up since the last answer bytes came down.
    let mut awaiting_answer = false;
    loop {
        let fault = *rx.borrow();
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() { break; }
                let now = *rx.borrow();
                match now {
                    // A partition cuts live connections too.
                    Fault::Refuse | Fault::ResetMidRequest => break,
                    Fault::Blackhole => {
                        // Stall: keep the sockets open, forward nothing.
                        let client = cr.reunite(cw).expect("same stream");
                        drop((sr, sw));
                        return swallow(client, rx).await;
                    }
                    _ => {}
                }
            }
            n = cr.read(&mut cbuf) => {
                let n = n?;
                if n == 0 { let _ = sw.shutdown().await; break; }
                sent_up += n as u64;
                if fault == Fault::ResetMidRequest && sent_up > REQUEST_THRESHOLD {
                    // Send half of this chunk, then cut.
                    let _ = sw.write_all(&cbuf[..n / 2]).await;
                    break;
                }
                pace(fault, n).await;
                sw.write_all(&cbuf[..n]).await?;
                awaiting_answer = true;
            }
            n = sr.read(&mut sbuf) => {
                let n = match n {
                    Ok(n) if n > 0 => n,
                    ended => {
                        if awaiting_answer && sent_up > REQUEST_THRESHOLD {
                            answers_cut.fetch_add(1, Ordering::Relaxed);
                        }
                        if ended.is_ok() { let _ = cw.shutdown().await; }
                        break;
                    }
                };
                awaiting_answer = false;
                if fault == Fault::LostAck && sent_up > REQUEST_THRESHOLD {
                    // The answer to a batch: let the aggregator finish, drop
                    // what it says, and cut the agent off.
                    let _ = tokio::time::timeout(Duration::from_millis(200), async {
                        while sr.read(&mut sbuf).await.map(|n| n > 0).unwrap_or(false) {}
                    }).await;
                    acks_dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                pace(fault, n).await;
                cw.write_all(&sbuf[..n]).await?;
            }
        }
    }
    if let (Ok(client), Ok(server)) = (cr.reunite(cw), sr.reunite(sw)) {
        reset(&client);
        reset(&server);
    }
    Ok(())
}

async fn pace(fault: Fault, n: usize) {
    match fault {
        Fault::Latency(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        Fault::Throttle(bps) if bps > 0 => {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / bps as f64)).await
        }
        _ => {}
    }
}

/// Reads and discards until the fault changes away from a blackhole; then
/// resets, so the client sees a dead link rather than a clean close.
async fn swallow(mut client: TcpStream, mut rx: watch::Receiver<Fault>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() || *rx.borrow() != Fault::Blackhole { break; }
            }
            n = client.read(&mut buf) => {
                if n? == 0 { break; }
            }
        }
    }
    reset(&client);
    Ok(())
}
