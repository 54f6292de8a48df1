//! The `dcs-certs` command line, exercised through the built binary.
//!
//! Every refusal is checked for three things: a non-zero exit (2), a message
//! that names the problem, and an output directory left untouched, because a
//! half-finished run that leaves a key without its certificate (or the other
//! way round) is worse than no run at all.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

fn dcs_certs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dcs-certs"))
        .args(args)
        .output()
        .expect("run dcs-certs")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "expected success, got {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "each command reports what it wrote in exactly one line"
    );
}

/// Asserts exit code 2 and that stderr mentions every one of `needles`.
#[track_caller]
fn assert_refused(out: &Output, needles: &[&str]) {
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit code 2\nstderr: {}",
        stderr(out)
    );
    let err = stderr(out);
    for needle in needles {
        assert!(
            err.contains(needle),
            "stderr should mention {needle:?}:\n{err}"
        );
    }
}

#[track_caller]
fn assert_nothing_written(dir: &Path) {
    if dir.exists() {
        let entries: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(entries.is_empty(), "{} holds {entries:?}", dir.display());
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn der(pem_path: &Path) -> Vec<u8> {
    let text = fs::read(pem_path).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&text).expect("PEM certificate");
    assert_eq!(pem.label, "CERTIFICATE");
    pem.contents
}

/// A temp dir holding a CA made by `dcs-certs init` in `<tmp>/ca`.
fn with_ca() -> (TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    assert_success(&dcs_certs(&["init", "--out", path(&ca)]));
    (tmp, ca)
}

#[test]
fn init_creates_a_self_signed_ca_with_a_private_key_readable_only_by_its_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("new/ca");
    let run = dcs_certs(&["init", "--out", path(&out), "--cn", "Test Root"]);
    assert_success(&run);
    assert!(String::from_utf8_lossy(&run.stdout).contains("ca.pem"));

    let der = der(&out.join("ca.pem"));
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(cert.is_ca());
    assert_eq!(cert.subject().to_string(), "CN=Test Root");
    cert.verify_signature(None).expect("self-signed");
    let days_left =
        (cert.validity().not_after.to_datetime() - time::OffsetDateTime::now_utc()).whole_days();
    assert!((3648..=3650).contains(&days_left), "{days_left}");

    assert!(
        fs::read_to_string(out.join("ca-key.pem"))
            .unwrap()
            .contains("PRIVATE KEY")
    );
    assert_eq!(mode(&out.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&out.join("ca.pem")), 0o644);
}

#[test]
fn init_refuses_to_overwrite_an_existing_ca_without_force() {
    let (_tmp, ca) = with_ca();
    let before = fs::read(ca.join("ca-key.pem")).unwrap();

    let run = dcs_certs(&["init", "--out", path(&ca)]);
    assert_refused(&run, &["already exists", "--force"]);
    assert_eq!(fs::read(ca.join("ca-key.pem")).unwrap(), before);
}

#[test]
fn init_refuses_a_directory_holding_only_half_a_ca() {
    let (_tmp, ca) = with_ca();
    fs::remove_file(ca.join("ca.pem")).unwrap();
    let before = fs::read(ca.join("ca-key.pem")).unwrap();

    assert_refused(&dcs_certs(&["init", "--out", path(&ca)]), &["ca-key.pem"]);
    assert_eq!(fs::read(ca.join("ca-key.pem")).unwrap(), before);
    assert!(!ca.join("ca.pem").exists());
}

#[test]
fn init_with_force_replaces_the_ca() {
    let (_tmp, ca) = with_ca();
    let before = fs::read(ca.join("ca-key.pem")).unwrap();

    assert_success(&dcs_certs(&["init", "--out", path(&ca), "--force"]));
    assert_ne!(fs::read(ca.join("ca-key.pem")).unwrap(), before);
    assert_eq!(mode(&ca.join("ca-key.pem")), 0o600);
}

#[test]
fn server_certificate_carries_the_requested_dns_names_and_ips_for_server_auth() {
    let (tmp, ca) = with_ca();
    let out = tmp.path().join("server");
    let run = dcs_certs(&[
        "server",
        "--ca",
        path(&ca),
        "--out",
        path(&out),
        "--dns",
        "aggregator.example",
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
        "--ip",
        "::1",
    ]);
    assert_success(&run);

    let der = der(&out.join("server.pem"));
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(cert.subject().to_string(), "CN=aggregator.example");
    let names = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert!(names.contains(&GeneralName::DNSName("aggregator.example")));
    assert!(names.contains(&GeneralName::DNSName("localhost")));
    assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
    let v6: IpAddr = "::1".parse().unwrap();
    let IpAddr::V6(v6) = v6 else { unreachable!() };
    assert!(names.contains(&GeneralName::IPAddress(&v6.octets())));

    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth);
    assert!(!eku.client_auth);
    assert!(!cert.is_ca());

    let ca_der = self::der(&ca.join("ca.pem"));
    let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
    cert.verify_signature(Some(ca_cert.public_key()))
        .expect("signed by the CA");

    assert_eq!(mode(&out.join("server-key.pem")), 0o600);
}

#[test]
fn server_certificate_for_an_ip_alone_is_named_dcs_aggregator() {
    let (tmp, ca) = with_ca();
    let out = tmp.path().join("server");
    let run = dcs_certs(&[
        "server",
        "--ca",
        path(&ca),
        "--out",
        path(&out),
        "--ip",
        "10.1.2.3",
    ]);
    assert_success(&run);

    let der = der(&out.join("server.pem"));
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(cert.subject().to_string(), "CN=dcs-aggregator");
    let names = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(
        names,
        &vec![GeneralName::IPAddress(&Ipv4Addr::new(10, 1, 2, 3).octets())]
    );
}

#[test]
fn server_certificate_may_be_reissued_over_an_existing_one() {
    let (tmp, ca) = with_ca();
    let out = tmp.path().join("server");
    let args = [
        "server",
        "--ca",
        path(&ca),
        "--out",
        path(&out),
        "--dns",
        "localhost",
    ];
    assert_success(&dcs_certs(&args));
    let first = fs::read(out.join("server-key.pem")).unwrap();
    assert_success(&dcs_certs(&args));
    assert_ne!(fs::read(out.join("server-key.pem")).unwrap(), first);
}

#[test]
fn agent_certificate_names_tenant_and_agent_in_a_uri_for_client_auth() {
    let (tmp, ca) = with_ca();
    let out = tmp.path().join("agent");
    let run = dcs_certs(&[
        "agent",
        "--ca",
        path(&ca),
        "--tenant",
        "t1",
        "--agent",
        "a1",
        "--out",
        path(&out),
    ]);
    assert_success(&run);

    let der = der(&out.join("agent.pem"));
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(cert.subject().to_string(), "CN=a1");
    let names = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(names, &vec![GeneralName::URI("dcs://t1/a1")]);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth);
    assert!(!eku.server_auth);
    let days_left =
        (cert.validity().not_after.to_datetime() - time::OffsetDateTime::now_utc()).whole_days();
    assert!((363..=365).contains(&days_left), "{days_left}");

    assert_eq!(mode(&out.join("agent-key.pem")), 0o600);
}

#[test]
fn agent_bundle_includes_the_ca_certificate_but_never_the_ca_key() {
    let (tmp, ca) = with_ca();
    let out = tmp.path().join("agent");
    assert_success(&dcs_certs(&[
        "agent",
        "--ca",
        path(&ca),
        "--tenant",
        "t1",
        "--agent",
        "a1",
        "--out",
        path(&out),
    ]));

    assert_eq!(
        fs::read(out.join("ca.pem")).unwrap(),
        fs::read(ca.join("ca.pem")).unwrap()
    );
    let mut files: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["agent-key.pem", "agent.pem", "ca.pem"]);
}

#[test]
fn agent_without_ca_is_refused_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-ca");
    let out = tmp.path().join("agent");
    let run = dcs_certs(&[
        "agent",
        "--ca",
        path(&missing),
        "--tenant",
        "t1",
        "--agent",
        "a1",
        "--out",
        path(&out),
    ]);
    let hint = format!("run `dcs-certs init --out {}` first", path(&missing));
    assert_refused(&run, &["CA not found at", path(&missing), &hint]);
    assert_nothing_written(&out);
}

#[test]
fn server_without_ca_is_refused_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let empty_ca_dir = tmp.path().join("ca");
    fs::create_dir(&empty_ca_dir).unwrap();
    let out = tmp.path().join("server");
    let run = dcs_certs(&[
        "server",
        "--ca",
        path(&empty_ca_dir),
        "--out",
        path(&out),
        "--dns",
        "localhost",
    ]);
    assert_refused(&run, &["CA not found at", path(&empty_ca_dir)]);
    assert_nothing_written(&out);
    assert_nothing_written(&empty_ca_dir);
}

#[test]
fn agent_with_a_ca_whose_key_is_missing_is_refused_and_writes_nothing() {
    let (tmp, ca) = with_ca();
    fs::remove_file(ca.join("ca-key.pem")).unwrap();
    let out = tmp.path().join("agent");
    let run = dcs_certs(&[
        "agent",
        "--ca",
        path(&ca),
        "--tenant",
        "t1",
        "--agent",
        "a1",
        "--out",
        path(&out),
    ]);
    assert_refused(&run, &["ca-key.pem", "missing"]);
    assert_nothing_written(&out);
}

#[test]
fn agent_with_an_invalid_tenant_or_agent_id_is_refused_and_writes_nothing() {
    let (tmp, ca) = with_ca();
    let out = tmp.path().join("agent");
    let too_long = "a".repeat(65);
    let cases: &[(&str, &str, &str)] = &[
        // (tenant, agent, argument the message must name)
        ("T1", "a1", "--tenant"),
        ("", "a1", "--tenant"),
        ("-t1", "a1", "--tenant"),
        ("t1/x", "a1", "--tenant"),
        (&too_long, "a1", "--tenant"),
        ("t1", "A1", "--agent"),
        ("t1", ".a1", "--agent"),
        ("t1", "a 1", "--agent"),
        ("t1", "a1é", "--agent"),
        ("t1", &too_long, "--agent"),
    ];
    for &(tenant, agent, arg) in cases {
        let tenant_arg = format!("--tenant={tenant}");
        let agent_arg = format!("--agent={agent}");
        let run = dcs_certs(&[
            "agent",
            "--ca",
            path(&ca),
            &tenant_arg,
            &agent_arg,
            "--out",
            path(&out),
        ]);
        let kind = arg.trim_start_matches('-');
        assert_refused(&run, &[arg, &format!("invalid {kind} id")]);
        assert_nothing_written(&out);
    }
}

#[test]
fn agent_ids_at_the_limits_of_the_rule_are_accepted() {
    let (tmp, ca) = with_ca();
    let out = tmp.path().join("agent");
    let longest = "z".repeat(64);
    assert_success(&dcs_certs(&[
        "agent",
        "--ca",
        path(&ca),
        "--tenant",
        "0",
        "--agent",
        &format!("9{}", &longest[1..]),
        "--out",
        path(&out),
    ]));
    assert_success(&dcs_certs(&[
        "agent",
        "--ca",
        path(&ca),
        "--tenant",
        "site-a.prod_1",
        "--agent",
        "edge.01-x_y",
        "--out",
        path(&out),
    ]));
}

#[test]
fn zero_days_is_refused_by_every_command_and_writes_nothing() {
    let (tmp, ca) = with_ca();
    let out = tmp.path().join("out");
    let commands: [Vec<&str>; 3] = [
        vec!["init", "--out", path(&out)],
        vec![
            "server",
            "--ca",
            path(&ca),
            "--out",
            path(&out),
            "--dns",
            "localhost",
        ],
        vec![
            "agent",
            "--ca",
            path(&ca),
            "--tenant",
            "t1",
            "--agent",
            "a1",
            "--out",
            path(&out),
        ],
    ];
    for mut args in commands {
        args.extend(["--days", "0"]);
        assert_refused(&dcs_certs(&args), &["--days", "0"]);
        assert_nothing_written(&out);
    }
}

#[test]
fn invalid_ip_is_refused_and_writes_nothing() {
    let (tmp, ca) = with_ca();
    let out = tmp.path().join("server");
    for bad in ["300.1.1.1", "localhost", "10.0.0.1/8", ""] {
        let ip_arg = format!("--ip={bad}");
        let run = dcs_certs(&[
            "server",
            "--ca",
            path(&ca),
            "--out",
            path(&out),
            "--dns",
            "localhost",
            &ip_arg,
        ]);
        assert_refused(&run, &["--ip"]);
        assert_nothing_written(&out);
    }
}

#[test]
fn ip_address_given_as_dns_name_is_refused_with_a_hint() {
    let (tmp, ca) = with_ca();
    let out = tmp.path().join("server");
    let run = dcs_certs(&[
        "server",
        "--ca",
        path(&ca),
        "--out",
        path(&out),
        "--dns",
        "127.0.0.1",
    ]);
    assert_refused(&run, &["--dns", "--ip"]);
    assert_nothing_written(&out);
}

#[test]
fn server_without_any_dns_name_or_ip_is_refused_and_writes_nothing() {
    let (tmp, ca) = with_ca();
    let out = tmp.path().join("server");
    let run = dcs_certs(&["server", "--ca", path(&ca), "--out", path(&out)]);
    assert_refused(&run, &["--dns", "--ip"]);
    assert_nothing_written(&out);
}

#[test]
fn refused_commands_leave_an_existing_out_directory_untouched() {
    let (tmp, ca) = with_ca();
    let out = tmp.path().join("existing");
    fs::create_dir(&out).unwrap();
    let run = dcs_certs(&[
        "agent",
        "--ca",
        path(&ca),
        "--tenant",
        "t1",
        "--agent",
        "a1",
        "--out",
        path(&out),
        "--days",
        "0",
    ]);
    assert_refused(&run, &["--days"]);
    assert_nothing_written(&out);
}
