//! Certificate renewal while the agent runs.
//!
//! Design constraints:
//! - **Renew at two thirds of the lifetime.** When less than a third of the
//!   certificate's validity is left, the agent makes a new key pair and a
//!   CSR and posts it to the aggregator's `POST /v1/renew` over mutual TLS
//!   with its current certificate. The aggregator takes the identity from
//!   that certificate only, so an agent can renew only as itself, and a
//!   revoked agent is refused. A third of a 30-day certificate is ten days
//!   for an agent that is offline to come back and still renew in time.
//! - **No restart, no gap, no duplicate.** The new certificate is checked
//!   against the new key, both files are written staged and renamed into
//!   place, and only then is the forwarders' [`SharedClient`] replaced.
//!   Batches never depend on the client (see `forwarder`), so records are
//!   neither lost nor sent twice by a swap; a batch in flight finishes on its
//!   old connection, whose certificate is still valid.
//! - **Checks are cheap and bounded.** The certificate file is re-read every
//!   min(validity / 10, 1 h) (or sooner, when the renewal time comes); a
//!   failed renewal is retried with backoff and jitter, capped at that
//!   interval, until it succeeds or the agent stops.
//! - **A cut mid-write is finished at the next start.** [`recover_files`]
//!   runs before anything loads the identity: files that a power cut left
//!   half renamed (the new key beside the old certificate) are completed
//!   from their staged copies, and an incomplete staging is discarded
//!   ([`dcs_certs::write_identity_files`]).
//! - The private key is never logged; the log line names the serials and the
//!   new expiry.

use std::time::Duration;

use dcs_certs::enroll::{CertificateInfo, RENEW_PATH, RenewRequest};
use tokio::sync::watch;

use crate::config::Config;
use crate::enroll::{CertRequestError, endpoint, post_for_certificate};
use crate::forwarder::{Backoff, SharedClient, http_client};

/// Upper bound of the check interval: a certificate replaced by an operator
/// (or a long validity) is looked at again within the hour.
const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
/// Lower bound, so a very short validity cannot turn the loop into a spin.
const MIN_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// First retry after a failed renewal.
const RETRY_INITIAL: Duration = Duration::from_secs(1);

/// When a certificate should be renewed: when a third of its lifetime is
/// left. Seconds since the Unix epoch.
pub fn renew_at(info: &CertificateInfo) -> i64 {
    let lifetime = (info.not_after - info.not_before).max(0);
    info.not_after - lifetime / 3
}

/// Completes or undoes a certificate write (enrollment or renewal) that a
/// crash or power cut interrupted, so the agent loads a certificate and key
/// that belong together.
pub fn recover_files(config: &Config) -> Result<(), dcs_certs::Error> {
    let a = &config.aggregator;
    let outcome = dcs_certs::recover_identity_files(&a.cert, &a.key, Some(&a.ca))?;
    match outcome {
        dcs_certs::IdentityRecovery::Clean => {}
        dcs_certs::IdentityRecovery::RolledForward => tracing::warn!(
            message = "a certificate write was cut short (crash or power cut); completed it from the staged files",
            cert = %a.cert.display()
        ),
        dcs_certs::IdentityRecovery::DiscardedPartial => tracing::warn!(
            message = "a certificate write was cut short while staging (crash or power cut); kept the previous certificate",
            cert = %a.cert.display()
        ),
    }
    Ok(())
}

/// How often the certificate file is re-read.
pub fn check_interval(info: &CertificateInfo) -> Duration {
    let lifetime = Duration::from_secs((info.not_after - info.not_before).max(0) as u64);
    (lifetime / 10).clamp(MIN_CHECK_INTERVAL, MAX_CHECK_INTERVAL)
}

/// Runs until `stop` turns true: renews the certificate of
/// `config.aggregator` when it is due and switches `client` to it.
pub async fn run_renewal(config: Config, client: SharedClient, mut stop: watch::Receiver<bool>) {
    let mut backoff: Option<Backoff> = None;
    loop {
        let delay = match check(&config).await {
            Err(error) => {
                tracing::error!(message = "read the agent certificate to schedule its renewal", %error);
                MAX_CHECK_INTERVAL.min(Duration::from_secs(60))
            }
            Ok(info) => {
                let now = now_secs();
                let due = renew_at(&info);
                let interval = check_interval(&info);
                if now < due {
                    backoff = None;
                    interval.min(Duration::from_secs((due - now) as u64).max(MIN_CHECK_INTERVAL))
                } else {
                    match renew(&config, &client, &info).await {
                        Ok(()) => {
                            backoff = None;
                            continue;
                        }
                        Err(error) => {
                            metrics::counter!("dcs_agent_cert_renewals_total", "outcome" => "failed")
                                .increment(1);
                            let delay = backoff
                                .get_or_insert_with(|| Backoff::new(RETRY_INITIAL, interval))
                                .next_delay()
                                .max(MIN_CHECK_INTERVAL);
                            tracing::warn!(
                                message = "certificate renewal failed; will retry",
                                %error,
                                expires_in_secs = info.not_after - now,
                                retry_in_ms = delay.as_millis() as u64
                            );
                            delay
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Reads the certificate file and exports its expiry.
async fn check(config: &Config) -> Result<CertificateInfo, CertRequestError> {
    let path = config.aggregator.cert.clone();
    let pem = tokio::fs::read_to_string(&path)
        .await
        .map_err(|e| CertRequestError::Url(format!("read {}: {e}", path.display())))?;
    let info = dcs_certs::enroll::certificate_info(&pem)?;
    metrics::gauge!("dcs_agent_cert_expiry_timestamp_seconds").set(info.not_after as f64);
    Ok(info)
}

/// One renewal: new key and CSR, `POST /v1/renew` with the current
/// certificate, check, write, switch.
async fn renew(
    config: &Config,
    client: &SharedClient,
    current: &CertificateInfo,
) -> Result<(), CertRequestError> {
    let (key, csr) = tokio::task::spawn_blocking(dcs_certs::enroll::new_key_and_csr)
        .await
        .map_err(|e| CertRequestError::Url(format!("generate a key pair: {e}")))??;
    let url = endpoint(&config.aggregator.url, RENEW_PATH)?;
    let issued = post_for_certificate(&client.current(), url, &RenewRequest { csr }).await?;
    let info = dcs_certs::enroll::check_pair(&issued.certificate, &key)?;
    let (cert_path, key_path) = (
        config.aggregator.cert.clone(),
        config.aggregator.key.clone(),
    );
    let cert = issued.certificate.clone();
    tokio::task::spawn_blocking(move || {
        dcs_certs::write_identity_files((&cert_path, &cert), (&key_path, &key), None)
    })
    .await
    .map_err(|e| CertRequestError::Url(format!("write the renewed identity: {e}")))?
    .map_err(|source| CertRequestError::Write {
        what: "the renewed identity",
        source,
    })?;
    // Built from the files just written, exactly as at start-up, so what the
    // agent uses now is what it would use after a restart.
    let fresh = http_client(config).map_err(|e| CertRequestError::Transport {
        url: config.aggregator.url.clone(),
        reason: format!("build the client for the renewed certificate: {e}"),
    })?;
    client.replace(fresh);
    metrics::counter!("dcs_agent_cert_renewals_total", "outcome" => "ok").increment(1);
    metrics::gauge!("dcs_agent_cert_expiry_timestamp_seconds").set(info.not_after as f64);
    tracing::info!(
        message = "certificate renewed; new connections use it",
        previous_serial = %current.serial,
        serial = %info.serial,
        not_after = %issued.not_after
    );
    Ok(())
}

fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(not_before: i64, not_after: i64) -> CertificateInfo {
        CertificateInfo {
            not_before,
            not_after,
            serial: "1".into(),
        }
    }

    #[test]
    fn renewal_is_due_when_a_third_of_the_lifetime_is_left() {
        assert_eq!(renew_at(&info(0, 30 * 86400)), 20 * 86400);
        assert_eq!(renew_at(&info(1000, 1045)), 1030);
    }

    #[test]
    fn checks_come_every_tenth_of_the_lifetime_within_bounds() {
        assert_eq!(check_interval(&info(0, 60)), Duration::from_secs(6));
        assert_eq!(check_interval(&info(0, 5)), MIN_CHECK_INTERVAL);
        assert_eq!(check_interval(&info(0, 30 * 86400)), MAX_CHECK_INTERVAL);
    }
}
