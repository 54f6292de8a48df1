//! The mutual-TLS HTTP client the forwarders post with.
//!
//! Invariant: it trusts only the DCS CA; a renewal swaps it between
//! requests, so a request in flight finishes on the connection (and
//! certificate) it started with.

use std::sync::Arc;
use std::time::Duration;

use crate::Error;
use crate::config::Config;

/// The mutual-TLS client every forwarder of this process posts with,
/// replaceable while they run (certificate renewal). Cloning shares it.
#[derive(Clone, Debug)]
pub struct SharedClient(Arc<std::sync::RwLock<reqwest::Client>>);

impl SharedClient {
    pub fn new(client: reqwest::Client) -> Self {
        SharedClient(Arc::new(std::sync::RwLock::new(client)))
    }

    /// The client to use for the next request (a cheap handle).
    pub fn current(&self) -> reqwest::Client {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Makes `client` the one every later request uses. Requests already
    /// sent keep the old one until they finish; its idle connections close
    /// when the last handle is dropped.
    pub fn replace(&self, client: reqwest::Client) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = client;
    }
}

/// Builds the mutual-TLS HTTP client. Trusts only the DCS CA; uses the
/// configured proxy, else `HTTPS_PROXY`/`ALL_PROXY` from the environment.
pub fn http_client(config: &Config) -> Result<reqwest::Client, Error> {
    let agg = &config.aggregator;
    let tls = agg.tls_files().client_config()?;
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(agg.connect_timeout)
        .timeout(agg.request_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_while_idle(true)
        .no_proxy();
    let from_env = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
    if let Some(proxy) = agg.proxy.clone().or(from_env) {
        let proxy = reqwest::Proxy::all(&proxy)
            .map_err(Error::Http)?
            .no_proxy(reqwest::NoProxy::from_env());
        builder = builder.proxy(proxy);
    }
    builder.build().map_err(Error::Http)
}
