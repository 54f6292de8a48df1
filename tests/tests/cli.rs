//! `dcs-aggregator`'s operator commands, run as a real process against a real
//! database with the same configuration file the server uses.
//! Needs `cargo build --workspace --bins` first.

use std::path::Path;
use std::process::Output;

use dcs_tests::pg::TestDb;
use dcs_tests::pki::Pki;
use dcs_tests::process::binary;
use serde_json::Value;

fn write_config(dir: &Path, pki: &Pki, db: &TestDb) -> std::path::PathBuf {
    let path = dir.join("aggregator.toml");
    std::fs::write(
        &path,
        format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[database]\nurl = {:?}\n",
            pki.ca, pki.server_cert, pki.server_key, db.url
        ),
    )
    .expect("write config");
    path
}

async fn run(config: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(binary("dcs-aggregator"))
        .args(args)
        .arg("--config")
        .arg(config)
        // Not who the trail records: the real user id's name is.
        .env("USER", "mallory")
        .args(["--actor", "alice"])
        .env_remove("DCS_AGG_CONFIG")
        .output()
        .await
        .expect("run dcs-aggregator")
}

#[track_caller]
fn json(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("JSON ({e}): {}", String::from_utf8_lossy(&output.stdout)))
}

#[tokio::test]
async fn operators_manage_tenants_tokens_and_agents_from_the_command_line() {
    let pki = Pki::new();
    let db = TestDb::new().await;
    let config = write_config(pki.path(), &pki, &db);

    let tenant = json(
        &run(
            &config,
            &["tenant", "create", "acme", "--display-name", "ACME"],
        )
        .await,
    );
    assert_eq!(tenant["id"], "acme");

    // The first admin token comes from the CLI: printed once, stored hashed.
    let created = run(
        &config,
        &[
            "token",
            "create",
            "--name",
            "ops",
            "--role",
            "admin",
            "--expires-in",
            "1d",
        ],
    )
    .await;
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let token = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("dcs_"), "{token}");
    let tokens = json(&run(&config, &["token", "list"]).await);
    assert_eq!(tokens[0]["name"], "ops");
    assert!(!tokens.to_string().contains(&token));

    // An agent can be refused before it ever connects.
    let agent = json(&run(&config, &["agents", "revoke", "acme", "edge-1"]).await);
    assert_eq!(agent["revoked"], true);
    let agents = json(&run(&config, &["agents", "list", "--tenant", "acme"]).await);
    assert_eq!(agents.as_array().unwrap().len(), 1);
    assert_eq!(agents[0]["agent"], "edge-1");
    json(&run(&config, &["agents", "unrevoke", "acme", "edge-1"]).await);
    json(&run(&config, &["serial", "revoke", "0A:FF", "--reason", "lost"]).await);
    let revoked = json(&run(&config, &["token", "revoke", "1"]).await);
    assert!(revoked["revoked_at"].is_string());

    let refused = run(&config, &["tenant", "create", "acme"]).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("exists"));

    let trail: Vec<(String, String)> =
        sqlx::query_as("SELECT actor, action FROM audit ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let expected = [
        "tenant.create",
        "token.create",
        "agent.revoke",
        "agent.unrevoke",
        "serial.revoke",
        "token.revoke",
    ];
    assert_eq!(
        trail.iter().map(|(_, a)| a.as_str()).collect::<Vec<_>>(),
        expected
    );
    let me = nix::unistd::User::from_uid(nix::unistd::getuid())
        .unwrap()
        .map_or_else(|| format!("uid:{}", nix::unistd::getuid()), |u| u.name);
    let expected_actor = format!("cli:{me} (claims alice)");
    assert!(
        trail.iter().all(|(actor, _)| *actor == expected_actor),
        "{trail:?}"
    );

    // Retention is off in this config (days = 0) unless asked for.
    assert!(
        !run(&config, &["retention", "--dry-run"])
            .await
            .status
            .success()
    );
    let report = json(&run(&config, &["retention", "--dry-run", "--days", "30"]).await);
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["dropped"], serde_json::json!([]));

    let bad = dir_with_bad_config(pki.path());
    let output = run(&bad, &["agents", "list"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "a bad config is exit status 2"
    );
}

fn dir_with_bad_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[database]\nurl = \"mysql://x\"\n").unwrap();
    path
}
