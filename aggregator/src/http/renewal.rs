//! What an agent does with its own certificate over its batch connection:
//! renewal (`POST /v1/renew`), and the certificate it presented recorded on
//! its row.
//!
//! Invariant: the identity is the verified client certificate's, never the
//! CSR's, so an agent can only ever renew as itself.

use axum::Json;
use axum::extract::{Extension, State};
use dcs_shared::identity::AgentIdentity;
use sqlx::PgPool;
use tracing::{debug, info};

use super::AppState;
use crate::connection::PresentedCertificate;
use crate::platform::enrollment::{self, EnrollError};

/// Renews the calling agent's certificate: the identity is the verified
/// client certificate's, so an agent can only ever renew as itself, and the
/// deny list is checked first (a revoked agent or certificate gets 403).
pub(super) async fn renew(
    state: State<AppState>,
    agent: Extension<AgentIdentity>,
    presented: Option<Extension<PresentedCertificate>>,
    peer: Option<Extension<crate::connection::PeerAddr>>,
    request: Result<Json<dcs_certs::enroll::RenewRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<dcs_certs::enroll::IssuedCertificate>, EnrollError> {
    let Json(request) = request.map_err(enrollment::bad_body)?;
    let inner = &state.0.0;
    let presented = presented.map(|Extension(p)| p.cert);
    let remote = peer.map(|Extension(p)| p.0.to_string());
    let issued = enrollment::renew(
        &inner.pool,
        inner.signer.as_deref(),
        &inner.deny,
        &inner.renewals,
        enrollment::Renewal {
            identity: &agent,
            presented: presented.as_deref(),
            remote,
            csr: &request.csr,
        },
    )
    .await
    .inspect_err(|error| {
        info!(message = "certificate renewal refused", agent = %agent.0, ?error);
    })?;
    Ok(Json(issued))
}

/// Stores the certificate an agent's connection presented on its row, once
/// per connection and only when it changed, so operators see fingerprints,
/// serials and expiry without the batch path paying for it on every batch.
pub(super) async fn record_certificate(
    pool: &PgPool,
    agent: &AgentIdentity,
    presented: &PresentedCertificate,
) {
    use std::sync::atomic::Ordering;
    if presented.recorded.load(Ordering::Relaxed) {
        return;
    }
    let cert = &presented.cert;
    let result = sqlx::query(
        "UPDATE agents SET cert_fingerprint = $3, cert_serial = $4, \
             cert_not_after = to_timestamp($5) \
         WHERE tenant_id = $1 AND name = $2 AND cert_fingerprint IS DISTINCT FROM $3",
    )
    .bind(&agent.tenant)
    .bind(&agent.agent)
    .bind(&cert.fingerprint)
    .bind(&cert.serial)
    .bind(cert.not_after as f64)
    .execute(pool)
    .await;
    match result {
        Ok(_) => presented.recorded.store(true, Ordering::Relaxed),
        // Retried with the connection's next batch.
        Err(error) => debug!(message = "record agent certificate", %error, agent = %agent),
    }
}
