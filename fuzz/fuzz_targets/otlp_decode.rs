//! Untrusted OTLP/HTTP logs bodies: the same bytes go to the protobuf and
//! the JSON decoder of `POST /v1/logs`, then to the mapping into records.
//! The body lives in `common/checks.rs`, which `tests/tests/fuzz_corpus.rs`
//! replays on stable Rust.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../common/checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::otlp_decode(data));
