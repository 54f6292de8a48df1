//! The deny list: which agents may not write, checked on every batch.
//!
//! Design constraints:
//! - **Checked on each request, read from memory.** The batch path must not
//!   pay a query per batch, so each aggregator keeps the list in memory and a
//!   background task re-reads it every `revocation.refresh_interval` (2 s by
//!   default). A revocation made through this aggregator's platform API
//!   reloads the list before the API answers, so the agent's next batch is
//!   refused; one made on another replica or with the CLI takes effect within
//!   the interval.
//! - **Fail closed until the first load.** Before the list has been read once
//!   (PostgreSQL down at start-up) batches are answered 503, so a revoked
//!   agent cannot slip a batch in while the list is unknown. A failed refresh
//!   later keeps the last list: it is at most one outage old.
//! - Three ways to be refused: the agent (tenant + id) is revoked, the serial
//!   of the certificate it presents is revoked, or its tenant is disabled.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dcs_shared::identity::AgentIdentity;
use sqlx::PgPool;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The client certificate an agent connected with, read once per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCertificate {
    /// SHA-256 of the DER certificate, lower-case hex.
    pub fingerprint: String,
    /// Serial number, lower-case hex without separators or leading zero bytes.
    pub serial: String,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
}

impl AgentCertificate {
    /// Reads the fields from a (verified) DER certificate.
    pub fn from_der(der: &[u8]) -> Option<AgentCertificate> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let fingerprint = hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
        Some(AgentCertificate {
            fingerprint,
            serial: normalize_serial(&hex(cert.raw_serial()))?,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A serial as an operator may type it (`0A:1b:...`, `0x0a1b`) in the one
/// form the list stores: lower-case hex, no separators, no leading zeros.
/// `None` for something that is not hex.
pub fn normalize_serial(input: &str) -> Option<String> {
    let s = input.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let digits: String = s
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | ' '))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let trimmed = digits.trim_start_matches('0');
    Some(if trimmed.is_empty() { "0" } else { trimmed }.to_owned())
}

/// A change to the deny list made on this replica; see [`DenyList::apply`].
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    Tenant {
        id: &'a str,
        disabled: bool,
    },
    Agent {
        tenant: &'a str,
        agent: &'a str,
        revoked: bool,
    },
    /// Only the serial itself: its descendants come with the reload.
    Serial {
        serial: &'a str,
        revoked: bool,
    },
}

/// Why an agent is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    Agent,
    Serial,
    TenantDisabled,
}

impl Denied {
    pub fn as_str(self) -> &'static str {
        match self {
            Denied::Agent => "agent revoked",
            Denied::Serial => "certificate revoked",
            Denied::TenantDisabled => "tenant disabled",
        }
    }
}

#[derive(Debug, Default)]
struct Snapshot {
    agents: HashSet<(String, String)>,
    serials: HashSet<String>,
    tenants: HashSet<String>,
}

/// The in-memory deny list, shared by the batch path, the platform API and
/// the refresh task.
#[derive(Clone)]
pub struct DenyList(Arc<Inner>);

struct Inner {
    /// `None` until the first successful load.
    current: RwLock<Option<Arc<Snapshot>>>,
}

/// The answer for one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied(Denied),
    /// The list has never been loaded.
    Unknown,
}

impl DenyList {
    pub fn new() -> Self {
        DenyList(Arc::new(Inner {
            current: RwLock::new(None),
        }))
    }

    pub fn check(&self, agent: &AgentIdentity, cert: Option<&AgentCertificate>) -> Verdict {
        let snapshot = self
            .0
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let Some(s) = snapshot else {
            return Verdict::Unknown;
        };
        if s.tenants.contains(&agent.tenant) {
            Verdict::Denied(Denied::TenantDisabled)
        } else if s
            .agents
            .contains(&(agent.tenant.clone(), agent.agent.clone()))
        {
            Verdict::Denied(Denied::Agent)
        } else if cert.is_some_and(|c| s.serials.contains(&c.serial)) {
            Verdict::Denied(Denied::Serial)
        } else {
            Verdict::Allowed
        }
    }

    /// Re-reads the list from the database now.
    pub async fn load(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let agents: Vec<(String, String)> =
            sqlx::query_as("SELECT tenant_id, name FROM agents WHERE revoked")
                .fetch_all(pool)
                .await?;
        // A revoked serial takes every certificate renewed from it along,
        // however many renewals down.
        let serials: Vec<String> = sqlx::query_scalar(
            "WITH RECURSIVE revoked(serial) AS ( \
                 SELECT serial FROM revoked_serials \
                 UNION \
                 SELECT c.serial FROM issued_certificates c \
                 JOIN revoked r ON c.parent_serial = r.serial) \
             SELECT serial FROM revoked",
        )
        .fetch_all(pool)
        .await?;
        let tenants: Vec<String> = sqlx::query_scalar("SELECT id FROM tenants WHERE disabled")
            .fetch_all(pool)
            .await?;
        metrics::gauge!("dcs_aggregator_deny_list_entries")
            .set((agents.len() + serials.len() + tenants.len()) as f64);
        let snapshot = Snapshot {
            agents: agents.into_iter().collect(),
            serials: serials.into_iter().collect(),
            tenants: tenants.into_iter().collect(),
        };
        *self
            .0
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(snapshot));
        Ok(())
    }

    /// Applies a change just committed here to the list in memory, so it
    /// holds for every batch checked from now on even if the reload that
    /// follows fails. On a list never loaded there is nothing to change: it
    /// refuses everything until its first load anyway.
    pub fn apply(&self, change: Change<'_>) {
        let mut current = self
            .0
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(old) = current.as_ref() else {
            return;
        };
        let mut next = Snapshot {
            agents: old.agents.clone(),
            serials: old.serials.clone(),
            tenants: old.tenants.clone(),
        };
        let set = |on: bool, set: &mut HashSet<_>, key| {
            if on {
                set.insert(key);
            } else {
                set.remove(&key);
            }
        };
        match change {
            Change::Tenant { id, disabled } => set(disabled, &mut next.tenants, id.to_owned()),
            Change::Agent {
                tenant,
                agent,
                revoked,
            } => {
                let key = (tenant.to_owned(), agent.to_owned());
                if revoked {
                    next.agents.insert(key);
                } else {
                    next.agents.remove(&key);
                }
            }
            Change::Serial { serial, revoked } => {
                set(revoked, &mut next.serials, serial.to_owned())
            }
        }
        *current = Some(Arc::new(next));
    }

    /// Reloads after a change made here, so the change applies to the very
    /// next batch. A failure is left to the background refresh.
    pub async fn reload_after_change(&self, pool: &PgPool) {
        if let Err(error) = self.load(pool).await {
            tracing::warn!(message = "reload deny list after a revocation; the next refresh will", %error);
        }
    }

    /// Keeps the list fresh until the returned task is aborted.
    pub(crate) fn spawn_refresh(
        &self,
        pool: PgPool,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let list = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                match list.load(&pool).await {
                    Ok(()) if failing => {
                        tracing::info!(message = "deny list refreshed again");
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(error) => {
                        // Logged once per outage, not every tick.
                        if !failing {
                            tracing::warn!(message = "refresh deny list; keeping the last one", %error);
                        }
                        failing = true;
                    }
                }
                tokio::time::sleep(every).await;
            }
        })
    }
}

impl Default for DenyList {
    fn default() -> Self {
        DenyList::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_compared_in_one_canonical_form() {
        assert_eq!(normalize_serial("0A:1B:ff").as_deref(), Some("a1bff"));
        assert_eq!(normalize_serial("0x00a1bff").as_deref(), Some("a1bff"));
        assert_eq!(normalize_serial("00").as_deref(), Some("0"));
        assert_eq!(normalize_serial("xyz"), None);
        assert_eq!(normalize_serial(""), None);
    }

    #[test]
    fn an_unloaded_list_neither_allows_nor_denies() {
        let list = DenyList::new();
        let agent = AgentIdentity::new("acme", "edge-1").unwrap();
        assert_eq!(list.check(&agent, None), Verdict::Unknown);
    }

    #[test]
    fn each_kind_of_entry_refuses_its_agents_only() {
        let list = DenyList::new();
        *list.0.current.write().unwrap() = Some(Arc::new(Snapshot {
            agents: [("acme".to_owned(), "edge-1".to_owned())].into(),
            serials: ["abc".to_owned()].into(),
            tenants: ["globex".to_owned()].into(),
        }));
        let cert = |serial: &str| AgentCertificate {
            fingerprint: String::new(),
            serial: serial.into(),
            not_before: 0,
            not_after: 0,
        };
        let id = |t: &str, a: &str| AgentIdentity::new(t, a).unwrap();
        assert_eq!(
            list.check(&id("acme", "edge-1"), None),
            Verdict::Denied(Denied::Agent)
        );
        assert_eq!(
            list.check(&id("acme", "edge-2"), Some(&cert("abc"))),
            Verdict::Denied(Denied::Serial)
        );
        assert_eq!(
            list.check(&id("globex", "edge-2"), None),
            Verdict::Denied(Denied::TenantDisabled)
        );
        assert_eq!(
            list.check(&id("acme", "edge-2"), Some(&cert("abd"))),
            Verdict::Allowed
        );
    }

    #[test]
    fn a_change_made_here_applies_at_once() {
        let list = DenyList::new();
        let id = |t: &str, a: &str| AgentIdentity::new(t, a).unwrap();
        list.apply(Change::Tenant {
            id: "acme",
            disabled: true,
        });
        assert_eq!(list.check(&id("acme", "edge-1"), None), Verdict::Unknown);
        *list.0.current.write().unwrap() = Some(Arc::new(Snapshot::default()));
        list.apply(Change::Tenant {
            id: "acme",
            disabled: true,
        });
        assert_eq!(
            list.check(&id("acme", "edge-1"), None),
            Verdict::Denied(Denied::TenantDisabled)
        );
        list.apply(Change::Agent {
            tenant: "globex",
            agent: "edge-9",
            revoked: true,
        });
        assert_eq!(
            list.check(&id("globex", "edge-9"), None),
            Verdict::Denied(Denied::Agent)
        );
        list.apply(Change::Tenant {
            id: "acme",
            disabled: false,
        });
        assert_eq!(list.check(&id("acme", "edge-1"), None), Verdict::Allowed);
    }
}
