//! Untrusted records: bytes → UTF-8 → `IncomingRecord` → `validate_incoming`
//! (the agent's ingest path), `validate_payload` on any well-formed JSON, and
//! the field validators on arbitrary text. An accepted record must also pass
//! the aggregator's checks after a trip through the batch wire format.
//! The body lives in `common/checks.rs`, which `tests/tests/fuzz_corpus.rs`
//! replays on stable Rust.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../common/checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::record_validate(data));
