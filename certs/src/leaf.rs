//! Leaf certificates: the aggregator's server certificate and the agents'
//! client certificates, issued with a fresh key or signed from an agent's
//! CSR, and the rules for the names they carry.
//!
//! Invariants: an agent's identity is only ever the URI SAN
//! `dcs://TENANT/AGENT` written through [`dcs_shared::identity`], with ids
//! checked by its rule; nothing of a CSR but its public key is used; every
//! leaf gets a random serial, so a key certified twice has two.

use std::net::IpAddr;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, string::Ia5String,
};

use crate::ca::common_name_only;
use crate::{Ca, DEFAULT_SERVER_CN, Error, Pem, Validity};

impl Ca {
    /// Issues the aggregator's server certificate (EKU serverAuth).
    ///
    /// DNS names and IP addresses are kept apart, because a TLS client
    /// connecting to an IP only matches an IP SAN, never a DNS SAN spelling
    /// the same address. The CN is the first DNS name, or
    /// [`DEFAULT_SERVER_CN`] if there is none.
    pub fn issue_server(
        &self,
        dns: &[String],
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<Pem, Error> {
        if dns.is_empty() && ips.is_empty() {
            return Err(Error::NoServerNames);
        }
        let mut sans = Vec::with_capacity(dns.len() + ips.len());
        for name in dns {
            validate_dns_name(name)?;
            sans.push(SanType::DnsName(ia5(name)?));
        }
        sans.extend(ips.iter().copied().map(SanType::IpAddress));
        let cn = dns.first().map_or(DEFAULT_SERVER_CN, String::as_str);
        self.issue_leaf(cn, sans, ExtendedKeyUsagePurpose::ServerAuth, validity)
    }

    /// Issues an agent's client certificate (EKU clientAuth) with the URI SAN
    /// `dcs://TENANT/AGENT` and CN = AGENT.
    ///
    /// The aggregator derives the agent's identity from that URI alone, so
    /// both ids are validated here with the aggregator's rule.
    pub fn issue_agent(&self, tenant: &str, agent: &str, validity: Validity) -> Result<Pem, Error> {
        validate_identifier("tenant", tenant)?;
        validate_identifier("agent", agent)?;
        let uri = ia5(&agent_uri(tenant, agent))?;
        self.issue_leaf(
            agent,
            vec![SanType::URI(uri)],
            ExtendedKeyUsagePurpose::ClientAuth,
            validity,
        )
    }

    /// Signs an agent's certificate signing request (enrollment, renewal):
    /// the agent made its key pair itself and only its public key travels.
    ///
    /// Only the CSR's public key (and its self-signature, checked by rcgen)
    /// is used. Its subject, SANs, key usages and basic constraints are
    /// ignored, never copied: the identity is `dcs://TENANT/AGENT` from the
    /// caller (an enrollment token, or the client certificate that asks for a
    /// renewal), and the certificate is always a clientAuth leaf, so a CSR
    /// cannot smuggle in another identity, a CA flag or extra names.
    /// Returns the certificate's PEM.
    pub fn sign_agent_csr(
        &self,
        csr_pem: &str,
        tenant: &str,
        agent: &str,
        validity: Validity,
    ) -> Result<String, Error> {
        self.sign_parsed_csr(
            CertificateSigningRequestParams::from_pem(csr_pem),
            tenant,
            agent,
            validity,
        )
    }

    pub(crate) fn sign_parsed_csr(
        &self,
        parsed: Result<CertificateSigningRequestParams, rcgen::Error>,
        tenant: &str,
        agent: &str,
        validity: Validity,
    ) -> Result<String, Error> {
        validate_identifier("tenant", tenant)?;
        validate_identifier("agent", agent)?;
        let csr = parsed.map_err(|e| {
            Error::InvalidCsr(match e {
                rcgen::Error::InvalidCertificationRequestSignature => {
                    "its signature does not verify with its own public key".to_owned()
                }
                rcgen::Error::UnsupportedExtension => {
                    "it requests an extension this CA does not handle".to_owned()
                }
                other => other.to_string(),
            })
        })?;
        let uri = ia5(&agent_uri(tenant, agent))?;
        let params = leaf_params(
            agent,
            vec![SanType::URI(uri)],
            ExtendedKeyUsagePurpose::ClientAuth,
            validity,
        )?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.pem())
    }

    fn issue_leaf(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        eku: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<Pem, Error> {
        let params = leaf_params(common_name, sans, eku, validity)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// Checks a tenant or agent id by the rule of
/// [`dcs_shared::identity::validate_identifier`] (the one copy of it).
/// `kind` names the id ("tenant", "agent") in the error.
pub fn validate_identifier(kind: &'static str, value: &str) -> Result<(), Error> {
    match dcs_shared::identity::identifier_problem(value) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidIdentifier {
            kind,
            value: value.to_owned(),
            reason,
        }),
    }
}

/// The URI SAN of an agent certificate, as the aggregator reads it back.
fn agent_uri(tenant: &str, agent: &str) -> String {
    dcs_shared::identity::AgentIdentity {
        tenant: tenant.to_owned(),
        agent: agent.to_owned(),
    }
    .uri()
}

/// Checks a DNS name for a server certificate: ASCII labels of letters,
/// digits, `-` and `_`, 1 to 63 characters each, at most 253 in total, with
/// an optional leading `*.` wildcard label.
///
/// An IP address is refused with a hint, because as a DNS SAN it would never
/// match a connection to that address.
pub fn validate_dns_name(value: &str) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidDnsName {
        value: value.to_owned(),
        reason,
    };
    if value.parse::<IpAddr>().is_ok() {
        return Err(invalid(
            "is an IP address; pass it as an IP address (--ip) instead".to_owned(),
        ));
    }
    if value.is_empty() {
        return Err(invalid("must not be empty".to_owned()));
    }
    if value.len() > 253 {
        return Err(invalid("is longer than 253 characters".to_owned()));
    }
    let rest = value.strip_prefix("*.").unwrap_or(value);
    for label in rest.split('.') {
        if label.is_empty() {
            return Err(invalid("contains an empty label".to_owned()));
        }
        if label.len() > 63 {
            return Err(invalid(format!(
                "label {label:?} is longer than 63 characters"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid(format!("label {label:?} starts or ends with '-'")));
        }
        // Underscores are not valid in hostnames but are common in container
        // service names, and rustls accepts them.
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(invalid(format!(
                "character {bad:?} is not allowed (allowed: letters, digits, '-', '_', and '.' between labels)"
            )));
        }
    }
    Ok(())
}

/// The parameters of every leaf this CA issues, whoever made its key.
fn leaf_params(
    common_name: &str,
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
    validity: Validity,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    validity.apply(&mut params)?;
    params.distinguished_name = common_name_only(common_name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    // ECDSA keys only sign during the handshake; keyEncipherment is an
    // RSA key-transport usage and would be wrong here.
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    // Lets verifiers pick the right CA key if the CA is ever rotated.
    params.use_authority_key_identifier_extension = true;
    // Random rather than rcgen's default (a hash of the public key): a key
    // certified twice (an agent re-enrolling with the same CSR) must still
    // get two serials, or revoking one serial would revoke both.
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// 16 random bytes with the top bit clear (a positive INTEGER, RFC 5280
/// allows at most 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the operating system's random number generator works");
    bytes[0] &= 0x7f;
    // A leading zero byte would be stripped by DER and shorten the serial;
    // keep it at full length so serials compare as fixed-width hex.
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

pub(crate) fn ia5(value: &str) -> Result<Ia5String, Error> {
    Ok(Ia5String::try_from(value)?)
}
