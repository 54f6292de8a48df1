//! Unit tests of loading: the documented defaults, environment overrides,
//! and every bad key named by its full name.

use super::*;
use dcs_shared::telemetry::LogFormat;

fn load_str(toml: &str) -> Result<Config, ConfigError> {
    load_with_env(toml, &[])
}

fn load_with_env(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aggregator.toml");
    std::fs::write(&path, toml).unwrap();
    Config::load(
        Some(&path),
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

fn keys(error: &ConfigError) -> Vec<&str> {
    error.issues.iter().map(|i| i.key.as_str()).collect()
}

const MINIMAL: &str = r#"
    [tls]
    ca = "/etc/dcs/ca.pem"
    cert = "/etc/dcs/server.pem"
    key = "/etc/dcs/server-key.pem"
    [database]
    url = "postgres://dcs@db/dcs"
"#;

#[test]
fn the_config_file_variable_is_not_taken_for_a_key() {
    let err = Config::load(
        None,
        vec![("DCS_AGG_CONFIG".to_string(), "x.toml".to_string())],
    )
    .unwrap_err()
    .to_string();
    assert!(!err.contains("unknown field"), "{err}");
}

#[test]
fn a_minimal_config_gets_the_documented_defaults() {
    let config = load_str(MINIMAL).unwrap();
    assert_eq!(config.listen.address, "0.0.0.0:8443".parse().unwrap());
    assert_eq!(config.database.max_connections, 16);
    assert_eq!(config.database.acquire_timeout, Duration::from_secs(3));
    assert!(config.database.migrate_on_start);
    assert_eq!(config.limits.max_compressed_bytes, ByteSize(16 << 20));
    assert_eq!(config.limits.max_decompressed_bytes, ByteSize(20 << 20));
    assert_eq!(config.admission.max_in_flight_per_agent, 4);
    assert_eq!(config.admission.max_in_flight_per_tenant, 8);
    assert_eq!(config.admission.memory_budget, ByteSize(512 << 20));
    assert_eq!(config.limits.max_records_per_batch, 100_000);
    assert_eq!(config.limits.max_payload_bytes, ByteSize(64 << 10));
    assert_eq!(config.limits.handshake_timeout, Duration::from_secs(10));
    assert_eq!(config.limits.request_timeout, Duration::from_secs(60));
    assert_eq!(config.limits.retry_after, Duration::from_secs(5));
    assert_eq!(config.limits.max_connection_age, Duration::from_secs(120));
    assert_eq!(
        config.limits.max_connection_age_grace,
        Duration::from_secs(30)
    );
    assert_eq!(config.shutdown.drain_delay, Duration::from_secs(5));
    assert_eq!(config.shutdown.grace, Duration::from_secs(30));
    assert_eq!(config.connections.max_connections, 8192);
    assert_eq!(config.connections.max_connections_per_address, 1024);
    assert_eq!(config.connections.header_timeout, Duration::from_secs(10));
    assert_eq!(config.connections.min_body_rate, ByteSize(1024));
    assert_eq!(config.connections.idle_timeout, Duration::from_secs(300));
    assert_eq!(config.connections.max_concurrent_streams, 32);
    assert_eq!(config.log.format, LogFormat::Json);
    assert_eq!(config.log.level, "info");
}

#[test]
fn every_key_can_be_set() {
    let config = load_str(
        r#"
        [listen]
        address = "127.0.0.1:9443"
        [tls]
        ca = "ca.pem"
        cert = "server.pem"
        key = "server-key.pem"
        [database]
        url_file = "/run/secrets/db-url"
        max_connections = 4
        acquire_timeout = "500ms"
        migrate_on_start = false
        [limits]
        max_compressed_bytes = "1MiB"
        max_decompressed_bytes = "8MiB"
        max_records_per_batch = 10
        max_payload_bytes = 1024
        handshake_timeout = "2s"
        request_timeout = "30s"
        retry_after = "1m"
        max_connection_age = "0s"
        max_connection_age_grace = "3s"
        [shutdown]
        drain_delay = "0s"
        grace = "10s"
        [connections]
        max_connections = 100
        max_connections_per_address = 10
        header_timeout = "3s"
        min_body_rate = "10KiB"
        idle_timeout = "1m"
        max_concurrent_streams = 4
        [admission]
        max_in_flight_per_agent = 2
        max_in_flight_per_tenant = 3
        memory_budget = "64MiB"
        [log]
        format = "text"
        level = "debug"
    "#,
    )
    .unwrap();
    assert_eq!(config.listen.address.port(), 9443);
    assert_eq!(
        config.database.url_file.as_deref(),
        Some(Path::new("/run/secrets/db-url"))
    );
    assert!(!config.database.migrate_on_start);
    assert_eq!(config.database.acquire_timeout, Duration::from_millis(500));
    assert_eq!(config.limits.max_decompressed_bytes, ByteSize(8 << 20));
    assert_eq!(config.limits.max_payload_bytes, ByteSize(1024));
    assert_eq!(config.limits.retry_after, Duration::from_secs(60));
    assert_eq!(config.admission.max_in_flight_per_agent, 2);
    assert_eq!(config.admission.max_in_flight_per_tenant, 3);
    assert_eq!(config.admission.memory_budget, ByteSize(64 << 20));
    assert_eq!(config.log.format, LogFormat::Text);
    assert!(config.limits.max_connection_age.is_zero());
    assert_eq!(
        config.limits.max_connection_age_grace,
        Duration::from_secs(3)
    );
    assert!(config.shutdown.drain_delay.is_zero());
    assert_eq!(config.shutdown.grace, Duration::from_secs(10));
    assert_eq!(config.connections.max_connections, 100);
    assert_eq!(config.connections.max_connections_per_address, 10);
    assert_eq!(config.connections.min_body_rate, ByteSize(10 << 10));
    assert_eq!(config.connections.idle_timeout, Duration::from_secs(60));
    assert_eq!(config.connections.max_concurrent_streams, 4);
}

#[test]
fn a_misspelt_key_is_refused_by_name() {
    let err = load_str(&format!("{MINIMAL}\n[limits]\nmax_record_per_batch = 5\n")).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("max_record_per_batch"), "{text}");
    assert!(text.contains("limits"), "{text}");
}

#[test]
fn a_misspelt_section_is_refused_by_name() {
    let err = load_str(&format!("{MINIMAL}\n[limit]\nretry_after = \"1s\"\n")).unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
}

#[test]
fn missing_tls_ca_is_named() {
    let err = load_str(
        r#"
        [tls]
        cert = "server.pem"
        key = "server-key.pem"
        [database]
        url = "postgres://dcs@db/dcs"
    "#,
    )
    .unwrap_err();
    assert_eq!(keys(&err), ["tls.ca"]);
}

#[test]
fn an_empty_file_reports_every_required_key_at_once() {
    let err = load_str("").unwrap_err();
    assert_eq!(
        keys(&err),
        ["tls.ca", "tls.cert", "tls.key", "database.url"]
    );
}

#[test]
fn inconsistent_limits_are_named() {
    let err = load_str(&format!(
        "{MINIMAL}\n[limits]\nmax_compressed_bytes = \"32MiB\"\nmax_decompressed_bytes = \"16MiB\"\nmax_records_per_batch = 0\nrequest_timeout = \"0s\"\n"
    ))
    .unwrap_err();
    assert_eq!(
        keys(&err),
        [
            "limits.max_decompressed_bytes",
            "limits.max_records_per_batch",
            "limits.request_timeout"
        ]
    );
}

#[test]
fn the_platform_listener_is_off_by_default_and_validated_when_on() {
    let config = load_str(MINIMAL).unwrap();
    assert!(!config.platform.enabled);
    assert_eq!(config.platform.address.port(), 8444);
    assert_eq!(config.revocation.refresh_interval, Duration::from_secs(2));
    let err = load_str(&format!(
        "{MINIMAL}\n[platform]\nenabled = true\naddress = \"0.0.0.0:8443\"\ncert = \"p.pem\"\n[revocation]\nrefresh_interval = \"0s\"\n"
    ))
    .unwrap_err();
    assert_eq!(
        keys(&err),
        [
            "platform.address",
            "platform.key",
            "revocation.refresh_interval"
        ]
    );
    let config = load_str(&format!(
        "{MINIMAL}\n[platform]\nenabled = true\naddress = \"127.0.0.1:9444\"\n"
    ))
    .unwrap();
    let (cert, _) = config.platform.cert_and_key(&config.tls);
    assert_eq!(cert, Path::new("/etc/dcs/server.pem"));
}

#[test]
fn enrollment_is_off_by_default_and_needs_the_ca_key_when_on() {
    let config = load_str(MINIMAL).unwrap();
    assert!(!config.enrollment.enabled);
    assert_eq!(config.enrollment.validity, DEFAULT_ENROLLMENT_VALIDITY);
    assert_eq!(config.tls.watch_interval, DEFAULT_TLS_WATCH_INTERVAL);
    assert_eq!(
        config.enrollment.ca_cert(&config.tls),
        Path::new("/etc/dcs/ca.pem")
    );
    let err = load_str(&format!(
        "{MINIMAL}\n[enrollment]\nenabled = true\nvalidity = \"5s\"\n"
    ))
    .unwrap_err();
    assert_eq!(keys(&err), ["enrollment.ca_key", "enrollment.validity"]);
    let config = load_str(&format!(
        "{MINIMAL}\n[enrollment]\nenabled = true\nca_key = \"/etc/dcs/ca-key.pem\"\nvalidity = \"45s\"\n"
    ))
    .unwrap();
    assert_eq!(config.enrollment.validity, Duration::from_secs(45));
}

#[test]
fn per_agent_gauges_are_on_by_default_and_can_be_dropped() {
    let config = load_str(MINIMAL).unwrap();
    assert!(config.metrics.per_agent);
    assert_eq!(
        config.metrics.agents_refresh_interval,
        DEFAULT_AGENTS_REFRESH_INTERVAL
    );
    let config = load_with_env(MINIMAL, &[("DCS_AGG_METRICS__PER_AGENT", "false")]).unwrap();
    assert!(!config.metrics.per_agent);
    let err = load_str(&format!(
        "{MINIMAL}\n[metrics]\nagents_refresh_interval = \"0s\"\n"
    ))
    .unwrap_err();
    assert_eq!(keys(&err), ["metrics.agents_refresh_interval"]);
}

#[test]
fn retention_keeps_everything_by_default_and_checks_its_keys() {
    let config = load_str(MINIMAL).unwrap();
    assert_eq!(config.retention.days, 0);
    assert_eq!(config.retention.partitions_ahead, 7);
    let err = load_str(&format!(
        "{MINIMAL}\n[retention]\ndays = 30\npartitions_ahead = 0\ninterval = \"0s\"\n"
    ))
    .unwrap_err();
    assert_eq!(
        keys(&err),
        ["retention.partitions_ahead", "retention.interval"]
    );
}

#[test]
fn a_bad_duration_names_its_key() {
    let err = load_str(&format!("{MINIMAL}\n[limits]\nretry_after = \"soon\"\n")).unwrap_err();
    assert!(err.to_string().contains("limits.retry_after"), "{err}");
}

#[test]
fn url_and_url_file_are_exclusive() {
    let err = load_str(&format!("{MINIMAL}\nurl_file = \"/x\"\n")).unwrap_err();
    assert_eq!(keys(&err), ["database.url_file"]);
}

#[test]
fn the_environment_overrides_the_file() {
    let config = load_with_env(
        MINIMAL,
        &[
            ("DCS_AGG_DATABASE__URL", "postgres://other@db2/dcs"),
            ("DCS_AGG_LIMITS__MAX_RECORDS_PER_BATCH", "7"),
        ],
    )
    .unwrap();
    assert_eq!(
        config.database.url.as_deref(),
        Some("postgres://other@db2/dcs")
    );
    assert_eq!(config.limits.max_records_per_batch, 7);
}

#[test]
fn the_url_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db-url");
    std::fs::write(&path, "postgres://dcs:secret@db/dcs\n").unwrap();
    let db = DatabaseConfig {
        url_file: Some(path),
        ..DatabaseConfig::default()
    };
    assert_eq!(db.resolve_url().unwrap(), "postgres://dcs:secret@db/dcs");
}

#[test]
fn debug_output_hides_the_database_url() {
    let db = DatabaseConfig::with_url("postgres://dcs:hunter2@db/dcs");
    let text = format!("{db:?}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[test]
fn check_files_names_unreadable_paths() {
    let mut config = load_str(MINIMAL).unwrap();
    config.database.url = None;
    config.database.url_file = Some("/nonexistent/db-url".into());
    let err = config.check_files().unwrap_err();
    assert_eq!(keys(&err), ["tls", "database.url_file"]);
    assert!(err.to_string().contains("/etc/dcs/ca.pem"), "{err}");
}

#[test]
fn a_certificate_path_of_the_wrong_type_is_named() {
    let err = load_with_env(MINIMAL, &[("DCS_AGG_TLS__CERT", "5")]).unwrap_err();
    assert!(err.to_string().contains("tls.cert"), "{err}");
}
