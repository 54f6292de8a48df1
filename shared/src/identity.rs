//! Who an agent is, read from its verified client certificate.
//!
//! An agent certificate carries exactly one URI SAN `dcs://TENANT/AGENT_ID`
//! (written by `dcs-certs agent`). The aggregator reads identity from the
//! certificate only, never from a body or header, so an agent can only ever write
//! as itself.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::Error;

pub const URI_SCHEME: &str = "dcs://";
pub const MAX_IDENTIFIER_LEN: usize = 64;

/// A tenant and an agent id, both valid identifiers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentIdentity {
    pub tenant: String,
    pub agent: String,
}

impl AgentIdentity {
    pub fn new(tenant: &str, agent: &str) -> Result<Self, Error> {
        validate_identifier("tenant", tenant)?;
        validate_identifier("agent", agent)?;
        Ok(AgentIdentity {
            tenant: tenant.to_owned(),
            agent: agent.to_owned(),
        })
    }

    /// Parses `dcs://TENANT/AGENT_ID`.
    pub fn from_uri(uri: &str) -> Result<Self, Error> {
        let rest = uri
            .strip_prefix(URI_SCHEME)
            .ok_or_else(|| Error::Identity(format!("{uri:?} is not a {URI_SCHEME} URI")))?;
        let (tenant, agent) = rest
            .split_once('/')
            .ok_or_else(|| Error::Identity(format!("{uri:?} is not dcs://TENANT/AGENT_ID")))?;
        Self::new(tenant, agent)
    }

    /// Reads the identity from a DER certificate (the verified leaf).
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, Error> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| Error::Identity(format!("parse certificate: {e}")))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| Error::Identity(format!("parse subjectAltName: {e}")))?
            .ok_or_else(|| Error::Identity("certificate has no subjectAltName".into()))?;
        let mut uris = san.value.general_names.iter().filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with(URI_SCHEME) => Some(*u),
            _ => None,
        });
        let uri = uris
            .next()
            .ok_or_else(|| Error::Identity("certificate has no dcs:// URI SAN".into()))?;
        if uris.next().is_some() {
            return Err(Error::Identity(
                "certificate has more than one dcs:// URI SAN".into(),
            ));
        }
        Self::from_uri(uri)
    }

    pub fn uri(&self) -> String {
        format!("{URI_SCHEME}{}/{}", self.tenant, self.agent)
    }
}

impl fmt::Display for AgentIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.agent)
    }
}

/// Checks a tenant or agent id: 1 to 64 characters, each in `[a-z0-9_.-]`,
/// the first in `[a-z0-9]`. The one copy of the rule: the aggregator applies
/// it to the URI SAN it reads, `dcs-certs` (through [`identifier_problem`])
/// to the ids it writes, and the platform API to the ids it is given.
///
/// The restricted alphabet keeps ids safe in URIs, file names and log
/// lines, and the alphanumeric first character rules out `.`/`..` and
/// option-like `-x`. `kind` names the id ("tenant", "agent") in the error.
pub fn validate_identifier(kind: &str, value: &str) -> Result<(), Error> {
    match identifier_problem(value) {
        None => Ok(()),
        Some(reason) => Err(Error::Identity(format!(
            "invalid {kind} id {value:?}: {reason}"
        ))),
    }
}

/// Why `value` is not a valid tenant or agent id, or `None` when it is.
pub fn identifier_problem(value: &str) -> Option<String> {
    let Some(first) = value.chars().next() else {
        return Some("must not be empty".to_owned());
    };
    let len = value.chars().count();
    if len > MAX_IDENTIFIER_LEN {
        return Some(format!(
            "is {len} characters long; at most {MAX_IDENTIFIER_LEN} are allowed"
        ));
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Some(format!(
            "must start with a lowercase letter or digit, not {first:?}"
        ));
    }
    let allowed =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-');
    value
        .chars()
        .enumerate()
        .find(|&(_, c)| !allowed(c))
        .map(|(pos, bad)| {
            format!(
                "character {bad:?} at position {} is not allowed (allowed: a-z, 0-9, '_', '.', '-')",
                pos + 1
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip() {
        let id = AgentIdentity::from_uri("dcs://acme/edge-01").unwrap();
        assert_eq!(id.tenant, "acme");
        assert_eq!(id.agent, "edge-01");
        assert_eq!(id.uri(), "dcs://acme/edge-01");
        assert_eq!(id.to_string(), "acme/edge-01");
    }

    #[test]
    fn malformed_uris_are_refused() {
        for uri in [
            "https://acme/edge",
            "dcs://acme",
            "dcs://acme/edge/extra",
            "dcs:///edge",
            "dcs://acme/",
            "dcs://ACME/edge",
            "dcs://-acme/edge",
        ] {
            assert!(AgentIdentity::from_uri(uri).is_err(), "{uri} accepted");
        }
    }
}
