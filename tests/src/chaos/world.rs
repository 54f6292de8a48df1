//! The system under test: a real agent process, an aggregator process, a
//! PostgreSQL cluster the test may stop, and a fault proxy between agent and
//! aggregator.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Ledger, Plan, Report, produce, verify_at};
use crate::agent::{self, AgentProcess};
use crate::faultproxy::FaultProxy;
use crate::pg::PgCluster;
use crate::pki::Pki;
use crate::process::{Service, free_port};

/// One agent, one aggregator, one test-owned PostgreSQL, a fault proxy on
/// the link between agent and aggregator.
pub struct World {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub cluster: PgCluster,
    pub aggregator: Service,
    pub proxy: FaultProxy,
    pub agent: AgentProcess,
    pub agent_config: dcs_edge::Config,
}

impl World {
    pub async fn new(adjust_agent: impl FnOnce(&mut dcs_edge::Config)) -> World {
        dcs_shared::tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::new();
        let cluster = PgCluster::start_migrated().await;

        let agg_port = free_port();
        let env = [
            ("LISTEN__ADDRESS", format!("127.0.0.1:{agg_port}")),
            ("ADMIN__ADDRESS", "127.0.0.1:0".into()),
            ("TLS__CA", pki.ca.display().to_string()),
            ("TLS__CERT", pki.server_cert.display().to_string()),
            ("TLS__KEY", pki.server_key.display().to_string()),
            ("DATABASE__URL", cluster.url()),
            ("DATABASE__MIGRATE_ON_START", "false".into()),
            ("DATABASE__ACQUIRE_TIMEOUT", "\"1s\"".into()),
            ("DATABASE__MAX_CONNECTIONS", "4".into()),
            ("LIMITS__RETRY_AFTER", "\"1s\"".into()),
            ("LOG__FORMAT", "json".into()),
        ];
        let mut aggregator = Service::aggregator(env, agg_port, &dir.path().join("aggregator.log"));
        aggregator.start().await;
        let proxy = FaultProxy::start(([127, 0, 0, 1], agg_port).into()).await;

        let mut agent_config = agent::test_config(
            &pki.agent("acme", "chaos-1"),
            &format!("https://localhost:{}", proxy.addr.port()),
            &dir.path().join("buffer.db"),
        );
        agent_config.batch.max_records = 500;
        agent_config.retry.max = Duration::from_secs(1);
        adjust_agent(&mut agent_config);
        let agent = AgentProcess::spawn(&agent_config, &dir.path().join("agent.log")).await;
        World {
            dir,
            pki,
            cluster,
            aggregator,
            proxy,
            agent,
            agent_config,
        }
    }

    /// The agent's `/v1/status`, or `Null` while it is down.
    pub async fn agent_status(&self) -> Value {
        crate::agent::status(&self.agent.url).await
    }

    /// Runs `plan.producers` producers against the agent until `plan.duration`
    /// has passed, while `faults` runs; returns the ledger once both are done.
    pub async fn run(
        &mut self,
        plan: Plan,
        faults: impl AsyncFnOnce(&mut World, Instant),
    ) -> Arc<Ledger> {
        let ledger = Arc::new(Ledger::default());
        let until = Instant::now() + plan.duration;
        let producers: Vec<_> = (0..plan.producers)
            .map(|p| {
                tokio::spawn(produce(
                    self.agent.url.clone(),
                    p,
                    plan,
                    until,
                    ledger.clone(),
                ))
            })
            .collect();
        faults(self, until).await;
        for p in producers {
            p.await.expect("producer panicked");
        }
        ledger
    }

    /// Waits for every acknowledged record to arrive (bounded), then compares
    /// PostgreSQL with the ledger.
    pub async fn check(&self, scenario: &str, ledger: &Ledger) -> Report {
        verify_at(&self.cluster.url(), &self.agent.url, scenario, ledger).await
    }
}
