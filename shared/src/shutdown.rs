//! One future that completes on SIGINT or SIGTERM, so every server and loop can
//! take `impl Future` for its shutdown trigger and tests can pass their own.

/// Completes when the process is asked to stop (Ctrl-C or SIGTERM).
pub async fn signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(message = "cannot listen for Ctrl-C", %error);
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(error) => {
                tracing::warn!(message = "cannot listen for SIGTERM", %error);
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!(message = "received SIGINT, shutting down"),
        () = term => tracing::info!(message = "received SIGTERM, shutting down"),
    }
}
