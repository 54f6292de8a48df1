//! Unit tests of loading: defaults, file values under environment
//! overrides, and every bad key named, section by section.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["ca.pem", "agent.pem", "agent-key.pem"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    dir
}

fn base_env(dir: &Path) -> Vec<(String, String)> {
    env(&[
        ("DCS_EDGE_AGGREGATOR__URL", "https://agg.example:8443"),
        (
            "DCS_EDGE_AGGREGATOR__CA",
            &dir.join("ca.pem").to_string_lossy(),
        ),
        (
            "DCS_EDGE_AGGREGATOR__CERT",
            &dir.join("agent.pem").to_string_lossy(),
        ),
        (
            "DCS_EDGE_AGGREGATOR__KEY",
            &dir.join("agent-key.pem").to_string_lossy(),
        ),
    ])
}

#[test]
fn environment_alone_is_a_complete_config_with_defaults() {
    let dir = files();
    let c = Config::load_from(None, base_env(dir.path())).unwrap();
    let c = c.config();
    assert_eq!(c.listen.address, DEFAULT_LISTEN);
    assert_eq!(c.buffer.overflow, Overflow::Reject);
    assert_eq!(c.buffer.durability, Durability::PowerLoss);
    assert_eq!(c.batch.max_records, DEFAULT_BATCH_MAX_RECORDS);
}

#[test]
fn file_values_are_overridden_by_the_environment() {
    let dir = files();
    let file = dir.path().join("edge.toml");
    std::fs::write(
        &file,
        "[buffer]\noverflow = \"drop-oldest\"\ndurability = \"process-crash\"\n[batch]\nmax_records = 10\nlinger = \"5ms\"\n",
    )
    .unwrap();
    let mut e = base_env(dir.path());
    e.extend(env(&[("DCS_EDGE_BATCH__MAX_RECORDS", "20")]));
    let c = Config::load_from(Some(&file), e).unwrap();
    let c = c.config();
    assert_eq!(c.buffer.overflow, Overflow::DropOldest);
    assert_eq!(c.buffer.durability, Durability::ProcessCrash);
    assert_eq!(c.batch.max_records, 20);
    assert_eq!(c.batch.linger, Duration::from_millis(5));
}

#[test]
fn every_bad_key_is_named() {
    let dir = files();
    let mut e = base_env(dir.path());
    e.extend(env(&[
        ("DCS_EDGE_AGGREGATOR__URL", "http://plain.example"),
        ("DCS_EDGE_LISTEN__ADDRESS", "nowhere"),
        ("DCS_EDGE_BATCH__MAX_IN_FLIGHT", "0"),
    ]));
    let err = Config::load_from(None, e).unwrap_err().to_string();
    for key in ["aggregator.url", "listen.address", "batch.max_in_flight"] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
}

#[test]
fn an_unknown_overflow_policy_is_refused() {
    let dir = files();
    let mut e = base_env(dir.path());
    e.extend(env(&[("DCS_EDGE_BUFFER__OVERFLOW", "drop-newest")]));
    let err = Config::load_from(None, e).unwrap_err().to_string();
    assert!(err.contains("buffer.overflow"), "{err}");
}

#[test]
fn sources_are_read_from_the_file_and_each_bad_key_is_named() {
    let dir = files();
    let file = dir.path().join("edge.toml");
    std::fs::write(
        &file,
        r#"
[jobs]
retention = "2d"
[[sources]]
name = "app"
kind = "file"
stream = "app.logs"
schedule = "30s"
jitter = "5s"
[sources.file]
paths = ["/var/log/app/*.log"]
format = "csv"
"#,
    )
    .unwrap();
    let c = Config::load_from(Some(&file), base_env(dir.path())).unwrap();
    assert_eq!(c.sources.len(), 1);
    assert_eq!(c.sources[0].jitter, Duration::from_secs(5));
    assert_eq!(c.config.jobs.retention, Duration::from_secs(2 * 24 * 3600));

    std::fs::write(
        &file,
        r#"
[[sources]]
name = "app"
kind = "file"
stream = "App Logs"
schedule = "0 * * 13 *"
[sources.file]
paths = ["logs/*.log", "/var/*/x.log"]
format = "lines"
[[sources]]
name = "app"
kind = "http"
stream = "db"
jitter = "2m"
[sources.http]
url = "ftp://nope"
"#,
    )
    .unwrap();
    let err = Config::load_from(Some(&file), base_env(dir.path()))
        .unwrap_err()
        .to_string();
    for key in [
        "sources[0].stream",
        "sources[0].schedule.cron",
        "sources[0].file.paths[0]",
        "sources[0].file.paths[1]",
        "sources[1].name",
        "sources[1].http.url",
        "sources[1].jitter",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    assert!(err.contains("cron"), "{err}");
}

#[test]
fn a_source_without_the_section_of_its_kind_is_refused_naming_both_sections() {
    let dir = files();
    let file = dir.path().join("edge.toml");
    std::fs::write(
        &file,
        r#"
[[sources]]
name = "app"
kind = "file"
stream = "app.logs"
[sources.file]
paths = ["/var/log/app/*.log"]
format = "lines"
[[sources]]
name = "db"
kind = "database"
stream = "db"
[sources.http]
url = "https://api.example/items"
"#,
    )
    .unwrap();
    let err = Config::load_from(Some(&file), base_env(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("sources[1]: "), "{err}");
    assert!(
        err.contains(r#"a [sources.database] section is required when kind = "database""#),
        "{err}"
    );
    assert!(
        err.contains(r#"[sources.http] is only allowed when kind = "http""#),
        "{err}"
    );
}

#[test]
fn cron_schedules_transforms_and_stream_schemas_are_read_from_the_file() {
    let dir = files();
    let file = dir.path().join("edge.toml");
    let schema = dir.path().join("readings.json");
    std::fs::write(&schema, r#"{"type":"object","required":["value"]}"#).unwrap();
    std::fs::write(
        &file,
        format!(
            r#"
[[sources]]
name = "readings"
kind = "file"
stream = "plant.readings"
schedule = "0 */15 * * * *"
timezone = "Europe/Berlin"
jitter = "10s"
[sources.file]
paths = ["/var/log/plant/*.ndjson"]
format = "ndjson"
[sources.transform]
rename = {{ "temp_c" = "temperature", "/meta/site" = "site" }}
drop = ["secret"]
set = {{ plant = "berlin-3", version = 2 }}

[streams."plant.readings"]
schema_file = "{}"
[streams."app.logs"]
schema = '{{"type": "object"}}'
"#,
            schema.display()
        ),
    )
    .unwrap();
    let c = Config::load_from(Some(&file), base_env(dir.path())).unwrap();
    assert!(matches!(
        c.sources[0].schedule,
        crate::sources::Schedule::Cron(_)
    ));
    assert!(c.sources[0].transform.is_some());
    assert!(c.schemas.has("plant.readings") && c.schemas.has("app.logs"));

    std::fs::write(&schema, "{\"type\": 12}").unwrap();
    let err = Config::load_from(Some(&file), base_env(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(r#"streams."plant.readings".schema_file"#),
        "{err}"
    );
}

#[test]
fn an_unknown_source_setting_is_refused() {
    let dir = files();
    let file = dir.path().join("edge.toml");
    std::fs::write(
        &file,
        "[[sources]]\nname = \"a\"\nkind = \"file\"\nstream = \"a\"\n[sources.file]\npaths = [\"/x/*\"]\nformat = \"lines\"\nfollow = true\n",
    )
    .unwrap();
    let err = Config::load_from(Some(&file), base_env(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("follow"), "{err}");
}

#[test]
fn syslog_listeners_are_read_from_the_file_and_each_bad_key_is_named() {
    let dir = files();
    let file = dir.path().join("edge.toml");
    std::fs::write(
        &file,
        r#"
[[syslog]]
protocol = "tcp"
listen = "0.0.0.0:1514"
stream = "syslog.${appname}"
[[syslog]]
protocol = "udp"
listen = "0.0.0.0:1514"
receive_buffer = "4MiB"
"#,
    )
    .unwrap();
    let c = Config::load_from(Some(&file), base_env(dir.path())).unwrap();
    assert_eq!(c.syslog.len(), 2);

    std::fs::write(
        &file,
        r#"
[[syslog]]
protocol = "tcp"
listen = "somewhere"
stream = "syslog.${program}"
fallback_stream = "Syslog"
max_message_bytes = "1MiB"
[[syslog]]
protocol = "udp"
listen = "0.0.0.0:1514"
framing = "lf"
frame_timeout = "0s"
[[syslog]]
protocol = "tls"
listen = "0.0.0.0:6514"
[[syslog]]
protocol = "tcp"
listen = "0.0.0.0:6515"
max_connections = 0
[syslog.tls]
cert = "/nonexistent/cert.pem"
key = "/nonexistent/key.pem"
"#,
    )
    .unwrap();
    let err = Config::load_from(Some(&file), base_env(dir.path()))
        .unwrap_err()
        .to_string();
    for key in [
        "syslog[0].listen",
        "syslog[0].stream",
        "syslog[0].fallback_stream",
        "syslog[0].max_message_bytes",
        "syslog[1].framing",
        "syslog[1].frame_timeout",
        "syslog[2].tls",
        "syslog[3].max_connections",
        "syslog[3].tls",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    assert!(err.contains("${program}"), "{err}");
}

#[test]
fn two_syslog_listeners_on_one_address_and_transport_are_refused() {
    let dir = files();
    let file = dir.path().join("edge.toml");
    std::fs::write(
        &file,
        "[[syslog]]\nprotocol = \"tcp\"\nlisten = \"0.0.0.0:1514\"\n[[syslog]]\nprotocol = \"tls\"\nlisten = \"0.0.0.0:1514\"\nname = \"tcp:0.0.0.0:1514\"\n[syslog.tls]\ncert = \"/etc/hostname\"\nkey = \"/etc/hostname\"\n",
    )
    .unwrap();
    let err = Config::load_from(Some(&file), base_env(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("syslog[1].listen"), "{err}");
    assert!(err.contains("syslog[1].name"), "{err}");
}

#[test]
fn a_missing_certificate_file_is_named() {
    let dir = files();
    std::fs::remove_file(dir.path().join("agent-key.pem")).unwrap();
    let err = Config::load_from(None, base_env(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("aggregator.key"), "{err}");
}

#[test]
fn a_certificate_path_of_the_wrong_type_or_a_misspelt_one_is_named() {
    let dir = files();
    let mut e = base_env(dir.path());
    e.extend(env(&[("DCS_EDGE_AGGREGATOR__CERT", "5")]));
    let err = Config::load_from(None, e).unwrap_err().to_string();
    assert!(err.contains("aggregator.cert"), "{err}");
    let mut e = base_env(dir.path());
    e.extend(env(&[("DCS_EDGE_AGGREGATOR__CERTS", "x")]));
    let err = Config::load_from(None, e).unwrap_err().to_string();
    assert!(err.contains("aggregator.certs"), "{err}");
}

#[test]
fn an_empty_log_level_is_refused() {
    let dir = files();
    let mut e = base_env(dir.path());
    e.extend(env(&[("DCS_EDGE_LOG__LEVEL", "\"\"")]));
    let err = Config::load_from(None, e).unwrap_err();
    assert_eq!(err.issues[0].key, "log.level", "{err}");
}

#[test]
fn a_partly_written_section_keeps_the_other_defaults() {
    let dir = files();
    let mut e = base_env(dir.path());
    e.extend(env(&[("DCS_EDGE_BATCH__MAX_RECORDS", "10")]));
    let c = Config::load_from(None, e).unwrap();
    let c = c.config();
    assert_eq!(c.batch.max_records, 10);
    assert_eq!(c.batch.linger, DEFAULT_LINGER);
    assert_eq!(c.batch.heartbeat, DEFAULT_HEARTBEAT);
    assert_eq!(c.batch.max_bytes, ByteSize(DEFAULT_BATCH_MAX_BYTES));
    assert_eq!(c.buffer.durability, DEFAULT_DURABILITY);
    assert!(c.buffer.encryption.key_file.is_none());
    assert!(c.buffer.retain_delivered.is_zero());
}

#[test]
fn the_encryption_key_is_read_once_by_the_check_and_kept() {
    let dir = files();
    let key = dir.path().join("buffer.key");
    std::fs::write(&key, "00".repeat(32)).unwrap();
    let mut e = base_env(dir.path());
    e.extend(env(&[(
        "DCS_EDGE_BUFFER__ENCRYPTION__KEY_FILE",
        &key.to_string_lossy(),
    )]));
    let compiled = Config::load_from(None, e).unwrap();
    // Gone after the check: the buffer still opens with the key it read.
    std::fs::remove_file(&key).unwrap();
    assert!(compiled.buffer_options().keyring.is_enabled());
    assert!(compiled.config().buffer_options().is_err());
}
