//! Untrusted syslog bytes: TCP framing (auto, octet counting, LF), then each
//! message through the agent's syslog path (`syslog_loose`, the stream
//! template, the record checks). The body lives in `common/syslog_checks.rs`,
//! which `tests/tests/fuzz_corpus.rs` replays on stable Rust.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/syslog_checks.rs"]
mod syslog_checks;

fuzz_target!(|data: &[u8]| syslog_checks::syslog_parse(data));
