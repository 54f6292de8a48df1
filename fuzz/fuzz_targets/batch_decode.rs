//! Untrusted batch bodies: gzip → `gunzip_limited` (1 MiB) → `parse_batch` →
//! the aggregator's per-record checks; the same bytes also go straight to the
//! parser, so mutations reach it without first having to fix a gzip CRC.
//! The body lives in `common/checks.rs`, which `tests/tests/fuzz_corpus.rs`
//! replays on stable Rust.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../common/checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::batch_decode(data));
