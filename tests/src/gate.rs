//! An HTTP-level gate in front of the aggregator, for faults a TCP proxy cannot
//! make: it terminates mutual TLS like the aggregator, answers some requests
//! itself (429/503 with `Retry-After`, as an overloaded aggregator or a load
//! balancer would) and forwards the rest to the real aggregator with the
//! agent's own certificate. It logs when each request arrived and what it got,
//! so a test can check that the agent honoured `Retry-After`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::aggregator::agent_client;
use crate::pki::{AgentCert, Pki};

/// Which requests the gate refuses. (Named for its first use; it also
/// produces permanent refusals: any status works.)
#[derive(Debug, Clone, Copy)]
pub struct Overload {
    /// Status to answer with (429 or 503).
    pub status: u16,
    pub retry_after_secs: u64,
    /// Refuse all requests but every `pass_every`-th (1 = refuse none).
    pub pass_every: u64,
}

/// One request the gate saw: when, and what it answered.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub at: Instant,
    pub status: u16,
}

pub struct Gate {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    policy: Arc<Mutex<Option<Overload>>>,
    /// Bodies larger than this get 413, as a proxy with a body limit answers.
    max_body: Arc<Mutex<Option<usize>>>,
    /// A batch holding a record with this id gets 422 `invalid_records`
    /// naming that record, as an aggregator whose validator is stricter
    /// than the agent's would answer.
    blame: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl Gate {
    /// Listens on 127.0.0.1 with the aggregator's certificate from `pki` and
    /// forwards to `upstream` (an aggregator URL) as `agent`.
    pub async fn start(pki: &Pki, agent: &AgentCert, upstream: &str) -> Gate {
        dcs_shared::tls::install_crypto_provider();
        let tls = dcs_shared::tls::server_config(&pki.ca, &pki.server_cert, &pki.server_key)
            .expect("gate TLS");
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind gate");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let policy: Arc<Mutex<Option<Overload>>> = Arc::new(Mutex::new(None));
        let max_body: Arc<Mutex<Option<usize>>> = Arc::new(Mutex::new(None));
        let blame: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let counter = Arc::new(AtomicU64::new(0));
        let client = agent_client(agent);
        let upstream = format!("{upstream}{}", dcs_shared::wire::BATCHES_PATH);
        let task = tokio::spawn({
            let seen = seen.clone();
            let policy = policy.clone();
            let max_body = max_body.clone();
            let blame = blame.clone();
            async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let acceptor = acceptor.clone();
                    let (seen, policy, counter, client, upstream) = (
                        seen.clone(),
                        policy.clone(),
                        counter.clone(),
                        client.clone(),
                        upstream.clone(),
                    );
                    let max_body = max_body.clone();
                    let blame = blame.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let (seen, policy, counter, client, upstream) = (
                                seen.clone(),
                                policy.clone(),
                                counter.clone(),
                                client.clone(),
                                upstream.clone(),
                            );
                            let max_body = *max_body.lock().expect("max body");
                            let blame = blame.lock().expect("blame").clone();
                            async move {
                                let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                                let at = Instant::now();
                                let refuse = (*policy.lock().expect("policy"))
                                    .filter(|o| o.pass_every == 0 || n % o.pass_every != 0);
                                let response = match refuse {
                                    Some(o) => Response::builder()
                                        .status(o.status)
                                        .header("retry-after", o.retry_after_secs.to_string())
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from_static(
                                            br#"{"error":"overloaded","message":"try later"}"#,
                                        )))
                                        .expect("response"),
                                    None => forward(&client, &upstream, req, max_body, blame).await,
                                };
                                seen.lock().expect("seen").push(Seen {
                                    at,
                                    status: response.status().as_u16(),
                                });
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        });
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    });
                }
            }
        });
        Gate {
            addr,
            seen,
            policy,
            max_body,
            blame,
            task,
        }
    }

    /// Answer 422 for any batch holding the record `id` (None: forward all).
    pub fn blame(&self, id: Option<&str>) {
        *self.blame.lock().expect("blame") = id.map(str::to_owned);
    }

    /// `https://localhost:PORT`
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn overload(&self, o: Option<Overload>) {
        *self.policy.lock().expect("policy") = o;
    }

    /// Refuse bodies over `limit` bytes with 413 (None: no limit).
    pub fn max_body(&self, limit: Option<usize>) {
        *self.max_body.lock().expect("max body") = limit;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    client: &reqwest::Client,
    upstream: &str,
    req: Request<Incoming>,
    max_body: Option<usize>,
    blame: Option<String>,
) -> Response<Full<Bytes>> {
    let headers = req.headers().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return bad_gateway(),
    };
    if max_body.is_some_and(|limit| body.len() > limit) {
        return Response::builder()
            .status(StatusCode::PAYLOAD_TOO_LARGE)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"error":"batch_too_large","message":"body over the gate's limit"}"#,
            )))
            .expect("response");
    }
    if let Some(seq) = blame.and_then(|id| blamed_seq(&body, &id)) {
        return Response::builder()
            .status(StatusCode::UNPROCESSABLE_ENTITY)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(
                r#"{{"error":"invalid_records","message":"1 problems in the batch's records; nothing was written","details":[{{"index":{seq},"field":"payload","reason":"blamed by the test gate"}}]}}"#
            ))))
            .expect("response");
    }
    let mut out = client.post(upstream).body(body);
    for name in ["content-type", "content-encoding"] {
        if let Some(v) = headers.get(name) {
            out = out.header(name, v.as_bytes());
        }
    }
    match out.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").cloned();
            let body = r.bytes().await.unwrap_or_default();
            let mut b = Response::builder().status(status);
            if let Some(v) = retry_after {
                b = b.header("retry-after", v.as_bytes());
            }
            b.body(Full::new(body)).expect("response")
        }
        Err(_) => bad_gateway(),
    }
}

/// The seq of the record with id `id` in a gzip batch body, if it holds one.
fn blamed_seq(body: &[u8], id: &str) -> Option<i64> {
    let json = dcs_shared::wire::gunzip_limited(body, 1 << 30).ok()?;
    let batch = dcs_shared::wire::parse_batch(&json).ok()?;
    batch.records.iter().find(|r| r.id == id).map(|r| r.seq)
}

fn bad_gateway() -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::BAD_GATEWAY)
        .body(Full::new(Bytes::new()))
        .expect("response")
}
