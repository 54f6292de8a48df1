//! The end-to-end and fault tests of DCS, linked as one test binary.
//!
//! Each module is one area, named after what it specifies (`faults`,
//! `fleet`, `hostile`, ...). They share one binary because every one of them
//! links the agent, the aggregator and their dependencies: thirty-odd
//! binaries spent most of a CI run in the linker and most of `target/` on
//! copies of the same code. Shared set-up lives in the `dcs_tests` library
//! (`tests/src/`), never copied between modules.
//!
//! Run one area with a module path as the filter, e.g.
//! `cargo test -p dcs-tests --test e2e -- e::2e -- faults::`; the suites that run in
//! their own step of `scripts/test.sh` are `#[ignore]`d and run with
//! `-- --ignored MODULE::`.

mod aggregator_api;
mod aggregator_failover;
mod buffer_recovery;
mod buffer_safety;
mod cli;
mod connections;
mod enrollment;
mod faults;
mod fleet;
mod fleet_metrics;
mod forwarder;
mod fuzz_corpus;
mod hostile;
mod hostile_neighbours;
mod ingest;
mod integrations;
mod netns;
mod otlp_recipe;
mod patroni;
mod pipeline;
mod platform_api;
mod platform_schema;
mod prometheus;
mod proxy;
mod replay;
mod retention;
mod revocation;
mod scaleout;
mod schemas;
mod server_cert;
mod shutdown;
mod source_cursor_nulls;
mod sources;
mod syslog;
