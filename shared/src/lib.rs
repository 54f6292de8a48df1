//! Code shared by both DCS tiers: the record model and its validator, the batch
//! wire format, agent identity, TLS and configuration loading, telemetry and
//! shutdown.
//!
//! # Layout
//! - [`record`]: what a record is and the one validator both tiers apply.
//! - [`wire`]: the gzip-compressed batch an agent sends and the aggregator's replies;
//!   the only place that knows the bytes on the network.
//! - [`identity`]: tenant and agent id read from a verified client certificate.
//! - [`tls`]: loading PEM files and building the rustls configurations.
//! - [`config`]: TOML file plus `DCS_*` environment overrides into typed config.
//! - [`telemetry`]: structured JSON logs.
//! - [`metrics`]: the Prometheus recorder and process metrics.
//! - [`shutdown`]: one future for SIGINT/SIGTERM.
//!
//! **Architecture invariant:** this crate does no I/O on its own beyond reading the
//! files it is asked to read; it knows nothing of SQLite, PostgreSQL or HTTP routing.

pub mod config;
mod error;
pub mod identity;
pub mod metrics;
pub mod record;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod wire;

pub use error::Error;
