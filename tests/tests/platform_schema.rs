//! The schema behind the platform API: the application's database role and
//! what it may do to the audit trail.

use dcs_tests::aggregator::with_user;
use dcs_tests::pg::TestDb;
use sqlx::Connection as _;

/// The role the migrations create for the aggregator.
const APP_ROLE: &str = "dcs_app";

#[tokio::test]
async fn the_application_role_appends_to_the_audit_trail_but_cannot_rewrite_it() {
    let db = TestDb::new().await;
    // What a DBA does once per cluster (see the migration): the role logs in.
    sqlx::query(sqlx::AssertSqlSafe(format!("ALTER ROLE {APP_ROLE} LOGIN")))
        .execute(&db.pool)
        .await
        .expect("let the application role log in");
    let mut app = sqlx::PgConnection::connect(&with_user(&db.url, APP_ROLE))
        .await
        .expect("connect as the application role");
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut app)
        .await
        .unwrap();
    assert_eq!(user, APP_ROLE);

    sqlx::query("INSERT INTO audit (actor, action, outcome) VALUES ('cli:ops', 'test', 'ok')")
        .execute(&mut app)
        .await
        .expect("the application role appends");
    for statement in [
        "UPDATE audit SET actor = 'nobody'",
        "DELETE FROM audit",
        "TRUNCATE audit",
        "DELETE FROM records",
    ] {
        let error = sqlx::query(statement)
            .execute(&mut app)
            .await
            .expect_err(statement);
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        // 42501: insufficient_privilege.
        assert_eq!(code.as_deref(), Some("42501"), "{statement}: {error}");
    }
    let actors: Vec<String> = sqlx::query_scalar("SELECT actor FROM audit")
        .fetch_all(&mut app)
        .await
        .expect("the application role reads the trail");
    assert_eq!(actors, ["cli:ops"]);
    app.close().await.ok();
}
