//! Certificates for tests, issued with `dcs-certs` into a temp dir: one CA, the
//! aggregator's server certificate for `localhost` and 127.0.0.1, and agent
//! certificates on demand, including the ones the aggregator must refuse
//! (expired, issued by another CA). [`Pki::cached`] keeps the CA and agent
//! certificates on disk across runs instead (the fleet generator).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use dcs_certs::{Ca, Pem, Validity};
use tempfile::TempDir;

/// Test certificates live a day: long enough for any test, short enough that
/// nobody mistakes them for real ones.
const VALIDITY_DAYS: u32 = 1;
/// A cached CA and its agent certificates ([`Pki::cached`]) live this long...
const CACHE_VALIDITY_DAYS: u32 = 30;
/// ...and are issued again once the cache is this old.
const CACHE_REISSUE_DAYS: u32 = 20;

pub struct Pki {
    /// Where every file lives: a temp dir, or the cache of [`Pki::cached`].
    root: PathBuf,
    /// Removed on drop; `None` for a cache, which outlives the run.
    _temp: Option<TempDir>,
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
        let root = dir.path().to_owned();
        let authority =
            Ca::generate("DCS test CA", Validity::days_from_now(VALIDITY_DAYS)).expect("CA");
        authority.write(&root).expect("write CA");
        Pki::with_authority(root, Some(dir), authority)
    }

    /// A CA kept in `root` across runs (the fleet generator issues a
    /// thousand agent certificates; signing them again every run would
    /// dominate a short run). A cache older than [`CACHE_REISSUE_DAYS`] is
    /// replaced, so its certificates never expire during a run.
    pub fn cached(root: &Path) -> Pki {
        let fresh = std::fs::metadata(root.join(dcs_certs::CA_CERT_FILE))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() < u64::from(CACHE_REISSUE_DAYS) * 86_400);
        let authority = match fresh.then(|| Ca::load(root).ok()).flatten() {
            Some(ca) => ca,
            None => {
                let _ = std::fs::remove_dir_all(root);
                let ca = Ca::generate("DCS fleet CA", Validity::days_from_now(CACHE_VALIDITY_DAYS))
                    .expect("CA");
                ca.write(root).expect("write CA");
                ca
            }
        };
        Pki::with_authority(root.to_owned(), None, authority)
    }

    fn with_authority(root: PathBuf, temp: Option<TempDir>, authority: Ca) -> Pki {
        let server = authority
            .issue_server(
                &["localhost".to_owned()],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
                Validity::days_from_now(VALIDITY_DAYS),
            )
            .expect("server certificate");
        dcs_certs::write_pair(&root, "server", &server).expect("write server pair");
        Pki {
            ca: root.join(dcs_certs::CA_CERT_FILE),
            server_cert: root.join("server.pem"),
            server_key: root.join("server-key.pem"),
            root,
            _temp: temp,
            authority,
        }
    }

    /// [`Pki::agent`], reusing the files a previous run of a cached `Pki`
    /// issued for the same identity.
    pub fn agent_cached(&self, tenant: &str, agent: &str) -> AgentCert {
        let name = format!("agent-{tenant}-{agent}");
        let cert = AgentCert {
            cert: self.root.join(format!("{name}.pem")),
            key: self.root.join(format!("{name}-key.pem")),
            ca: self.ca.clone(),
        };
        if cert.cert.is_file() && cert.key.is_file() {
            return cert;
        }
        let pem = self
            .authority
            .issue_agent(tenant, agent, Validity::days_from_now(CACHE_VALIDITY_DAYS))
            .expect("agent certificate");
        self.write_agent(&name, &pem)
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
        &self.root
    }

    fn write_agent(&self, name: &str, pem: &Pem) -> AgentCert {
        dcs_certs::write_pair(&self.root, name, pem).expect("write agent pair");
        AgentCert {
            cert: self.root.join(format!("{name}.pem")),
            key: self.root.join(format!("{name}-key.pem")),
            ca: self.ca.clone(),
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}
