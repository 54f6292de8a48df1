//! Certificates for tests, issued with `dcs-certs` into a temp dir: one CA, the
//! aggregator's server certificate for `localhost` and 127.0.0.1, and agent
//! certificates on demand, including the ones the aggregator must refuse
//! (expired, issued by another CA).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use dcs_certs::{Ca, Pem, Validity};
use tempfile::TempDir;

/// Test certificates live a day: long enough for any test, short enough that
/// nobody mistakes them for real ones.
const VALIDITY_DAYS: u32 = 1;

pub struct Pki {
    pub dir: TempDir,
    /// The CA certificate both sides trust.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    authority: Ca,
}

/// Files an agent needs: its certificate and key, and the CA to verify the
/// aggregator with.
#[derive(Debug, Clone)]
pub struct AgentCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("dcs-pki-")
            .tempdir()
            .expect("temp dir");
        let authority =
            Ca::generate("DCS test CA", Validity::days_from_now(VALIDITY_DAYS)).expect("CA");
        authority.write(dir.path()).expect("write CA");
        let server = authority
            .issue_server(
                &["localhost".to_owned()],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
                Validity::days_from_now(VALIDITY_DAYS),
            )
            .expect("server certificate");
        dcs_certs::write_pair(dir.path(), "server", &server).expect("write server pair");
        Pki {
            ca: dir.path().join(dcs_certs::CA_CERT_FILE),
            server_cert: dir.path().join("server.pem"),
            server_key: dir.path().join("server-key.pem"),
            dir,
            authority,
        }
    }

    /// A valid certificate for `dcs://TENANT/AGENT`.
    pub fn agent(&self, tenant: &str, agent: &str) -> AgentCert {
        let pem = self
            .authority
            .issue_agent(tenant, agent, Validity::days_from_now(VALIDITY_DAYS))
            .expect("agent certificate");
        self.write_agent(&format!("agent-{tenant}-{agent}"), &pem)
    }

    /// A certificate from our CA whose validity ended yesterday.
    pub fn expired_agent(&self, tenant: &str, agent: &str) -> AgentCert {
        // Arithmetic on the fields of a fresh validity, so this crate needs
        // no direct `time` dependency.
        let now = Validity::days_from_now(0).not_after;
        let day = std::time::Duration::from_secs(24 * 60 * 60);
        let validity = Validity {
            not_before: now - 30 * day,
            not_after: now - day,
        };
        let pem = self
            .authority
            .issue_agent(tenant, agent, validity)
            .expect("expired agent certificate");
        self.write_agent(&format!("expired-{tenant}-{agent}"), &pem)
    }

    /// A valid certificate whose renewal window is open: issued 20 days ago,
    /// valid for 10 more (the aggregator renews once half the lifetime passed).
    pub fn renewable_agent(&self, tenant: &str, agent: &str) -> AgentCert {
        let now = Validity::days_from_now(0).not_after;
        let day = std::time::Duration::from_secs(24 * 60 * 60);
        let validity = Validity {
            not_before: now - 20 * day,
            not_after: now + 10 * day,
        };
        let pem = self
            .authority
            .issue_agent(tenant, agent, validity)
            .expect("renewable agent certificate");
        self.write_agent(&format!("renewable-{tenant}-{agent}"), &pem)
    }

    /// A well-formed agent certificate from an unrelated CA. The returned
    /// `ca` is still ours, so the agent trusts the real aggregator and only
    /// its own certificate is wrong.
    pub fn other_ca_agent(&self, tenant: &str, agent: &str) -> AgentCert {
        let stranger =
            Ca::generate("Some other CA", Validity::days_from_now(VALIDITY_DAYS)).expect("CA");
        let pem = stranger
            .issue_agent(tenant, agent, Validity::days_from_now(VALIDITY_DAYS))
            .expect("foreign agent certificate");
        self.write_agent(&format!("foreign-{tenant}-{agent}"), &pem)
    }

    /// The CA, for tests that issue unusual certificates themselves.
    pub fn authority(&self) -> &Ca {
        &self.authority
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write_agent(&self, name: &str, pem: &Pem) -> AgentCert {
        dcs_certs::write_pair(self.dir.path(), name, pem).expect("write agent pair");
        AgentCert {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}-key.pem")),
            ca: self.ca.clone(),
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}
