//! Unit tests of the CA, the leaves it issues, CSR signing and the files
//! written, identity files cut at every step included.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;
use crate::ca::common_name_only;
use crate::identity_files::next_name;
use crate::leaf::ia5;

fn parse(pem: &str) -> Vec<u8> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    pem.contents
}

fn ca() -> Ca {
    Ca::generate("Test CA", Validity::days_from_now(30)).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn identifiers_follow_the_aggregator_rule() {
    let max = "a".repeat(64);
    for ok in ["t1", "a", "0", "edge-01.site_a", "9abc", max.as_str()] {
        validate_identifier("agent", ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
    }
    let too_long = "a".repeat(65);
    for bad in [
        "",
        too_long.as_str(),
        "Upper",
        "-lead",
        ".lead",
        "_lead",
        "a/b",
        "a b",
        "a:b",
        "é",
        "aé",
    ] {
        assert!(
            validate_identifier("agent", bad).is_err(),
            "{bad:?} should be rejected"
        );
    }
}

#[test]
fn identifier_error_names_the_kind_the_value_and_the_reason() {
    let err = validate_identifier("tenant", "Bad").unwrap_err();
    let Error::InvalidIdentifier {
        kind,
        value,
        reason,
    } = &err
    else {
        panic!("unexpected error {err:?}");
    };
    assert_eq!(*kind, "tenant");
    assert_eq!(value, "Bad");
    assert!(reason.contains("lowercase"), "{reason}");
    assert!(err.to_string().contains("tenant"), "{err}");
}

#[test]
fn dns_names_that_no_client_could_match_are_rejected() {
    for ok in [
        "localhost",
        "aggregator",
        "dcs_aggregator",
        "a.example.com",
        "*.example.com",
    ] {
        validate_dns_name(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
    }
    for bad in [
        "", "10.0.0.1", "::1", "a..b", "-a.com", "a b", "a/b", "é.com", "a.*.com",
    ] {
        assert!(
            validate_dns_name(bad).is_err(),
            "{bad:?} should be rejected"
        );
    }
}

#[test]
fn empty_or_reversed_validity_is_rejected() {
    let now = OffsetDateTime::now_utc();
    assert!(Validity::new(now, now).is_err());
    assert!(Validity::new(now, now - Duration::hours(1)).is_err());
    let reversed = Validity {
        not_before: now,
        not_after: now - Duration::days(1),
    };
    assert!(matches!(
        Ca::generate("x", reversed),
        Err(Error::InvalidValidity { .. })
    ));
    assert!(matches!(
        ca().issue_agent("t1", "a1", reversed),
        Err(Error::InvalidValidity { .. })
    ));
}

#[test]
fn days_from_now_tolerates_clock_skew_and_never_panics() {
    let v = Validity::days_from_now(1);
    let now = OffsetDateTime::now_utc();
    assert!(v.not_before <= now - Duration::minutes(4));
    assert!(v.not_after > now + Duration::hours(23));
    let huge = Validity::days_from_now(u32::MAX);
    assert!(huge.not_after > huge.not_before);
}

#[test]
fn expired_validity_produces_a_certificate_that_has_already_expired() {
    let now = OffsetDateTime::now_utc();
    let past = Validity::new(now - Duration::days(10), now - Duration::days(1)).unwrap();
    let pem = ca().issue_agent("t1", "a1", past).unwrap();
    let der = parse(&pem.cert);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(cert.validity().not_after.to_datetime() < now);
    assert!(!cert.validity().is_valid());
}

#[test]
fn leaves_chain_to_the_ca_that_issued_them() {
    let ca = ca();
    let ca_der = parse(ca.cert_pem());
    let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
    assert!(ca_cert.is_ca());
    ca_cert.verify_signature(None).expect("CA is self-signed");

    let server = ca
        .issue_server(&["localhost".into()], &[], Validity::days_from_now(1))
        .unwrap();
    let der = parse(&server.cert);
    let (_, leaf) = X509Certificate::from_der(&der).unwrap();
    leaf.verify_signature(Some(ca_cert.public_key()))
        .expect("signed by the CA");
    assert_eq!(leaf.issuer(), ca_cert.subject());
    assert!(!leaf.is_ca());
}

#[test]
fn a_reloaded_ca_issues_certificates_that_verify_against_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let original = ca();
    original.write(dir.path()).unwrap();
    let loaded = Ca::load(dir.path()).unwrap();
    assert_eq!(loaded.cert_pem(), original.cert_pem());
    assert_eq!(loaded.key_pem(), original.key_pem());

    let agent = loaded
        .issue_agent("t1", "a1", Validity::days_from_now(1))
        .unwrap();
    let ca_der = parse(original.cert_pem());
    let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
    let der = parse(&agent.cert);
    let (_, leaf) = X509Certificate::from_der(&der).unwrap();
    leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
    let sans = &leaf.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(sans.general_names, vec![GeneralName::URI("dcs://t1/a1")]);
}

#[test]
fn loading_refuses_a_key_that_does_not_belong_to_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    ca().write(dir.path()).unwrap();
    let other = ca();
    fs::write(dir.path().join(CA_KEY_FILE), other.key_pem()).unwrap();
    let err = Ca::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
}

#[test]
fn loading_refuses_a_leaf_certificate_posing_as_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = ca()
        .issue_agent("t1", "a1", Validity::days_from_now(1))
        .unwrap();
    fs::write(dir.path().join(CA_CERT_FILE), &leaf.cert).unwrap();
    fs::write(dir.path().join(CA_KEY_FILE), &leaf.key).unwrap();
    let err = Ca::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");
}

#[test]
fn loading_a_missing_or_half_present_ca_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Ca::load(dir.path()),
        Err(Error::CaNotFound { .. })
    ));
    assert!(matches!(
        Ca::load(&dir.path().join("nope")),
        Err(Error::CaNotFound { .. })
    ));
    fs::write(dir.path().join(CA_CERT_FILE), ca().cert_pem()).unwrap();
    assert!(matches!(
        Ca::load(dir.path()),
        Err(Error::CaIncomplete {
            missing: CA_KEY_FILE,
            ..
        })
    ));
}

#[test]
fn writing_a_ca_never_replaces_an_existing_one_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let first = ca();
    first.write(dir.path()).unwrap();
    let second = ca();
    assert!(matches!(
        second.write(dir.path()),
        Err(Error::CaExists { .. })
    ));
    assert_eq!(Ca::load(dir.path()).unwrap().cert_pem(), first.cert_pem());
    second.write_replacing(dir.path()).unwrap();
    assert_eq!(Ca::load(dir.path()).unwrap().cert_pem(), second.cert_pem());
}

#[test]
fn written_keys_are_private_and_certificates_public() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/out");
    let ca = ca();
    ca.write(&out).unwrap();
    assert_eq!(mode(&out.join(CA_CERT_FILE)), 0o644);
    assert_eq!(mode(&out.join(CA_KEY_FILE)), 0o600);
    assert_eq!(mode(&out), 0o700);

    let pem = ca
        .issue_server(
            &[],
            &["127.0.0.1".parse().unwrap()],
            Validity::days_from_now(1),
        )
        .unwrap();
    write_pair(&out, "server", &pem).unwrap();
    assert_eq!(mode(&out.join("server.pem")), 0o644);
    assert_eq!(mode(&out.join("server-key.pem")), 0o600);
    assert_eq!(
        fs::read_to_string(out.join("server-key.pem")).unwrap(),
        pem.key
    );
}

#[test]
fn leaf_files_may_be_replaced_and_no_temporary_files_remain() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let first = ca
        .issue_agent("t1", "a1", Validity::days_from_now(1))
        .unwrap();
    let second = ca
        .issue_agent("t1", "a1", Validity::days_from_now(1))
        .unwrap();
    write_agent_bundle(dir.path(), &first, ca.cert_pem()).unwrap();
    write_agent_bundle(dir.path(), &second, ca.cert_pem()).unwrap();
    assert_eq!(
        fs::read_to_string(dir.path().join("agent.pem")).unwrap(),
        second.cert
    );
    let mut names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["agent-key.pem", "agent.pem", "ca.pem"]);
}

#[test]
fn write_pair_refuses_names_that_escape_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let pem = Pem {
        cert: "c".into(),
        key: "k".into(),
    };
    for bad in ["", "../x", "a/b", ".hidden"] {
        assert!(matches!(
            write_pair(dir.path(), bad, &pem),
            Err(Error::InvalidFileName { .. })
        ));
    }
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn debug_output_never_contains_private_keys() {
    let ca = ca();
    assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    let pem = ca
        .issue_agent("t1", "a1", Validity::days_from_now(1))
        .unwrap();
    assert!(!format!("{pem:?}").contains("PRIVATE KEY"));
}

/// A CSR for a fresh key whose every field asks for more than an agent
/// may have: another identity, a CA flag, server auth, extra names.
fn greedy_csr() -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![
        "aggregator.example.net".to_owned(),
        "10.0.0.1".to_owned(),
    ])
    .unwrap();
    params.distinguished_name = common_name_only("root");
    params
        .subject_alt_names
        .push(SanType::URI(ia5("dcs://other-tenant/admin").unwrap()));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

#[test]
fn a_signed_csr_carries_only_the_identity_the_ca_was_given() {
    let ca = ca();
    let (key, csr) = greedy_csr();
    let pem = ca
        .sign_agent_csr(&csr, "t1", "a1", Validity::days_from_now(1))
        .unwrap();
    let der = parse(&pem);
    let (_, leaf) = X509Certificate::from_der(&der).unwrap();

    let sans = &leaf.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(sans.general_names, vec![GeneralName::URI("dcs://t1/a1")]);
    assert!(!leaf.is_ca(), "a CSR must not make itself a CA");
    let bc = leaf.basic_constraints().unwrap().map(|e| e.value.ca);
    assert_ne!(bc, Some(true));
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && !eku.any);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let cn: Vec<_> = leaf
        .subject()
        .iter_common_name()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(cn, ["a1"]);
    // The agent's own key, signed by our CA.
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    let ca_der = parse(ca.cert_pem());
    let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
    leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
}

#[test]
fn a_csr_is_signed_with_the_requested_validity_and_a_fresh_serial_each_time() {
    let ca = ca();
    let (_, csr) = greedy_csr();
    let now = OffsetDateTime::now_utc();
    let validity = Validity::new(now, now + Duration::seconds(45)).unwrap();
    let first = ca.sign_agent_csr(&csr, "t1", "a1", validity).unwrap();
    let second = ca.sign_agent_csr(&csr, "t1", "a1", validity).unwrap();
    let (d1, d2) = (parse(&first), parse(&second));
    let (_, c1) = X509Certificate::from_der(&d1).unwrap();
    let (_, c2) = X509Certificate::from_der(&d2).unwrap();
    let lifetime = c1.validity().not_after.to_datetime() - c1.validity().not_before.to_datetime();
    assert!(lifetime <= Duration::seconds(46), "{lifetime}");
    assert_ne!(
        c1.raw_serial(),
        c2.raw_serial(),
        "the same key, certified twice"
    );
    assert_eq!(c1.raw_serial().len(), 16);
}

#[test]
fn a_csr_whose_signature_does_not_match_its_key_is_refused() {
    // Someone else's public key in a CSR signed by another key: signing
    // it would certify a key whose holder never asked for it.
    let (key, csr) = greedy_csr();
    let other = KeyPair::generate().unwrap();
    let mut der = parse_csr(&csr);
    let at = der
        .windows(key.public_key_raw().len())
        .position(|w| w == key.public_key_raw())
        .expect("public key in the CSR");
    der[at..at + other.public_key_raw().len()].copy_from_slice(other.public_key_raw());
    let parsed = CertificateSigningRequestParams::from_der(&der.into());
    let err = ca()
        .sign_parsed_csr(parsed, "t1", "a1", Validity::days_from_now(1))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidCsr(_)), "{err}");
    assert!(err.to_string().contains("signature"), "{err}");
}

#[test]
fn garbage_and_bad_identities_are_refused_before_signing() {
    let ca = ca();
    for bad in ["", "not a csr", ca.cert_pem()] {
        assert!(matches!(
            ca.sign_agent_csr(bad, "t1", "a1", Validity::days_from_now(1)),
            Err(Error::InvalidCsr(_))
        ));
    }
    let (_, csr) = greedy_csr();
    assert!(matches!(
        ca.sign_agent_csr(&csr, "T1", "a1", Validity::days_from_now(1)),
        Err(Error::InvalidIdentifier { kind: "tenant", .. })
    ));
}

#[test]
fn identity_files_land_at_their_paths_with_safe_modes() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("certs/agent.pem");
    let key = dir.path().join("private/agent-key.pem");
    let ca_path = dir.path().join("ca.pem");
    write_identity_files((&cert, "C1"), (&key, "K1"), Some((&ca_path, "CA"))).unwrap();
    write_identity_files((&cert, "C2"), (&key, "K2"), None).unwrap();
    assert_eq!(fs::read_to_string(&cert).unwrap(), "C2");
    assert_eq!(fs::read_to_string(&key).unwrap(), "K2");
    assert_eq!(mode(&cert), 0o644);
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&ca_path), 0o644);
    for sub in ["certs", "private"] {
        let names: Vec<_> = fs::read_dir(dir.path().join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names.len(),
            1,
            "no temporary files left in {sub}: {names:?}"
        );
    }
}

/// The identity files of one agent in `dir`, and a second identity (a
/// renewal) staged beside them the way [`write_identity_files`] stages.
struct CutRenewal {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    old: Pem,
    new: Pem,
}

impl CutRenewal {
    fn new(dir: &Path) -> CutRenewal {
        let ca = ca();
        let old = ca
            .issue_agent("t1", "a1", Validity::days_from_now(1))
            .unwrap();
        let new = ca
            .issue_agent("t1", "a1", Validity::days_from_now(2))
            .unwrap();
        let r = CutRenewal {
            cert: dir.join("agent.pem"),
            key: dir.join("agent-key.pem"),
            ca: dir.join("ca.pem"),
            old,
            new,
        };
        write_identity_files(
            (&r.cert, &r.old.cert),
            (&r.key, &r.old.key),
            Some((&r.ca, ca.cert_pem())),
        )
        .unwrap();
        r
    }

    fn next(path: &Path) -> PathBuf {
        path.with_file_name(next_name(path.file_name().unwrap().to_str().unwrap()))
    }

    fn recover(&self) -> IdentityRecovery {
        recover_identity_files(&self.cert, &self.key, Some(&self.ca)).unwrap()
    }

    fn installed(&self) -> (String, String) {
        (
            fs::read_to_string(&self.cert).unwrap(),
            fs::read_to_string(&self.key).unwrap(),
        )
    }

    fn leftovers(&self) -> Vec<PathBuf> {
        [&self.cert, &self.key, &self.ca]
            .iter()
            .map(|p| CutRenewal::next(p))
            .filter(|p| p.exists())
            .collect()
    }
}

#[test]
fn a_cut_while_staging_leaves_the_previous_identity() {
    // Cut after the key was staged, before the certificate was.
    let dir = tempfile::tempdir().unwrap();
    let r = CutRenewal::new(dir.path());
    fs::write(CutRenewal::next(&r.key), &r.new.key).unwrap();
    assert_eq!(r.recover(), IdentityRecovery::DiscardedPartial);
    assert_eq!(r.installed(), (r.old.cert.clone(), r.old.key.clone()));
    assert!(r.leftovers().is_empty());

    // Cut while the certificate was written: half of it on disk.
    fs::write(CutRenewal::next(&r.key), &r.new.key).unwrap();
    fs::write(
        CutRenewal::next(&r.cert),
        &r.new.cert[..r.new.cert.len() / 2],
    )
    .unwrap();
    assert_eq!(r.recover(), IdentityRecovery::DiscardedPartial);
    assert_eq!(r.installed(), (r.old.cert.clone(), r.old.key.clone()));
    assert!(r.leftovers().is_empty());
}

#[test]
fn a_cut_after_staging_completes_the_new_identity() {
    // Everything staged, nothing renamed yet.
    let dir = tempfile::tempdir().unwrap();
    let r = CutRenewal::new(dir.path());
    fs::write(CutRenewal::next(&r.key), &r.new.key).unwrap();
    fs::write(CutRenewal::next(&r.cert), &r.new.cert).unwrap();
    assert_eq!(r.recover(), IdentityRecovery::RolledForward);
    assert_eq!(r.installed(), (r.new.cert.clone(), r.new.key.clone()));
    assert!(r.leftovers().is_empty());
}

#[test]
fn a_cut_between_the_renames_completes_the_new_identity() {
    // The worst moment: the new key is in place beside the old
    // certificate, which no TLS handshake can use.
    let dir = tempfile::tempdir().unwrap();
    let r = CutRenewal::new(dir.path());
    fs::write(&r.key, &r.new.key).unwrap();
    fs::write(CutRenewal::next(&r.cert), &r.new.cert).unwrap();
    assert!(enroll::check_pair(&r.old.cert, &r.new.key).is_err());
    assert_eq!(r.recover(), IdentityRecovery::RolledForward);
    assert_eq!(r.installed(), (r.new.cert.clone(), r.new.key.clone()));
    assert_eq!(mode(&r.key), 0o600);
    assert!(r.leftovers().is_empty());
    assert_eq!(r.recover(), IdentityRecovery::Clean, "idempotent");
}

#[test]
fn identity_writes_leave_no_staged_files_behind() {
    let dir = tempfile::tempdir().unwrap();
    let r = CutRenewal::new(dir.path());
    write_identity_files((&r.cert, &r.new.cert), (&r.key, &r.new.key), None).unwrap();
    assert!(r.leftovers().is_empty());
    assert_eq!(r.recover(), IdentityRecovery::Clean);
    assert_eq!(r.installed(), (r.new.cert.clone(), r.new.key.clone()));
}

fn parse_csr(pem: &str) -> Vec<u8> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    pem.contents
}

#[test]
fn server_without_any_name_is_refused() {
    assert!(matches!(
        ca().issue_server(&[], &[], Validity::days_from_now(1)),
        Err(Error::NoServerNames)
    ));
}
