//! The set-up most end-to-end tests begin with: a CA, a fresh database, an
//! in-process aggregator on it, and a directory for an agent's buffer.

use dcs_edge::Config;

use crate::agent::{self, RunningAgent, start_agent};
use crate::aggregator::{RunningAggregator, start_aggregator};
use crate::pg::TestDb;
use crate::pki::Pki;

/// One tenant's world: agent `edge-1` of tenant `acme` delivers to
/// `aggregator`, which writes to `db`.
pub struct Site {
    pub pki: Pki,
    pub db: TestDb,
    pub aggregator: RunningAggregator,
    /// Holds the agent's buffer (`buffer.db`) and whatever else a test
    /// writes; removed with the site.
    pub dir: tempfile::TempDir,
}

impl Site {
    pub async fn new() -> Site {
        let pki = Pki::new();
        let db = TestDb::new().await;
        let aggregator = start_aggregator(&pki, &db.url).await;
        Site {
            pki,
            db,
            aggregator,
            dir: tempfile::tempdir().expect("site directory"),
        }
    }

    /// The test configuration of agent `acme/edge-1`, buffering in the
    /// site's directory.
    pub fn agent_config(&self) -> Config {
        agent::test_config(
            &self.pki.agent("acme", "edge-1"),
            &self.aggregator.url,
            &self.dir.path().join("buffer.db"),
        )
    }

    /// An in-process agent on [`Site::agent_config`].
    pub async fn agent(&self) -> RunningAgent {
        start_agent(self.agent_config()).await
    }
}
