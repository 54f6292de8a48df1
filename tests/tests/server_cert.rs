//! The aggregator swaps its server certificate on SIGHUP without a restart:
//! new handshakes get the new certificate, open connections carry on, and a
//! broken file leaves the certificate in use in place.
//!
//! Its own test binary: it sends SIGHUP to the test process, which only the
//! aggregator's handler may receive.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dcs_certs::Validity;
use dcs_tests::aggregator::{agent_client, start_aggregator};
use dcs_tests::pg::TestDb;
use dcs_tests::pki::{AgentCert, Pki};
use nix::sys::signal::{Signal, raise};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

/// The leaf certificate (DER) the aggregator presents to a new handshake.
async fn served_certificate(addr: SocketAddr, agent: &AgentCert) -> Vec<u8> {
    let config = dcs_shared::tls::client_config(&agent.ca, &agent.cert, &agent.key)
        .expect("client TLS config");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake");
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("server certificate")[0]
        .to_vec()
}

fn issue_server_cert(pki: &Pki) {
    let pem = pki
        .authority()
        .issue_server(
            &["localhost".to_owned()],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            Validity::days_from_now(1),
        )
        .expect("server certificate");
    dcs_certs::write_pair(pki.path(), "server", &pem).expect("write server pair");
}

#[tokio::test]
async fn sighup_swaps_the_server_certificate_for_new_handshakes_only() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let agg = start_aggregator(&pki, &db.url).await;
    let agent = pki.agent("acme", "edge-1");
    let client = agent_client(&agent);
    let health = agg.endpoint("/health");
    assert!(
        client
            .get(&health)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let first = served_certificate(agg.addr, &agent).await;

    issue_server_cert(&pki);
    raise(Signal::SIGHUP).expect("send SIGHUP to ourselves");
    let started = Instant::now();
    let second = loop {
        let served = served_certificate(agg.addr, &agent).await;
        if served != first {
            break served;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The client's pooled connection (old certificate) still works.
    assert!(
        client
            .get(&health)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );

    // A broken file on the next SIGHUP: the certificate in use stays.
    std::fs::write(pki.server_cert.clone(), "not a certificate").unwrap();
    raise(Signal::SIGHUP).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served_certificate(agg.addr, &agent).await, second);
    assert!(
        agent_client(&agent)
            .get(&health)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    agg.stop().await;
}
