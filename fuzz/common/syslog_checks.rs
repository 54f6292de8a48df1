//! The body of the `syslog_parse` fuzz target: bytes from a syslog socket,
//! split by every framing and turned into records by the agent's syslog
//! path (`syslog_loose` underneath). Included by `fuzz_targets/syslog_parse.rs`
//! (nightly, libFuzzer) and `tests/tests/fuzz_corpus.rs` (stable), like
//! `checks.rs`.
//!
//! Must hold for every input: no panic; frames lie inside the input and in
//! order, none longer than the limit; every record the path makes has a
//! valid stream and a JSON object payload within the payload limit, and is
//! accepted by the record checks again (what the agent buffers, the
//! aggregator takes).

use dcs_edge::schema::Schemas;
use dcs_edge::syslog::framing::{self, Framing};
use dcs_edge::syslog::message::{self, Outcome, Recipe, StreamTemplate};
use dcs_shared::record::{self, Limits};

/// Small, so that long inputs reach the size checks.
const MAX_MESSAGE: usize = 2048;

pub fn syslog_parse(data: &[u8]) {
    let recipe = Recipe {
        stream: StreamTemplate::compile("syslog.${appname}.${severity}").expect("template"),
        fallback_stream: "syslog".into(),
        limits: Limits {
            max_payload_bytes: 4 * MAX_MESSAGE,
        },
    };
    let schemas = Schemas::default();
    let sender = "192.0.2.1:514".parse().expect("address");
    for framing in [Framing::Auto, Framing::OctetCounting, Framing::Lf] {
        let (frames, used, _error) = framing::split(data, framing, MAX_MESSAGE);
        assert!(used <= data.len(), "split consumed more than its input");
        let mut end = 0;
        for frame in &frames {
            assert!(
                frame.start >= end && frame.end <= used,
                "frames overlap or run past the consumed bytes"
            );
            assert!(
                frame.len() <= MAX_MESSAGE,
                "a frame is longer than the limit"
            );
            end = frame.end;
            check_message(&data[frame.clone()], sender, &recipe, &schemas);
        }
    }
    // A datagram is the whole input.
    if data.len() <= MAX_MESSAGE {
        check_message(data, sender, &recipe, &schemas);
    }
}

fn check_message(raw: &[u8], sender: std::net::SocketAddr, recipe: &Recipe, schemas: &Schemas) {
    match message::to_record(raw, &sender.to_string(), recipe, schemas) {
        Outcome::Record { record: r, .. } => {
            assert!(
                record::validate_stream(&r.stream).is_ok(),
                "invalid stream {:?}",
                r.stream
            );
            assert!(
                record::validate_payload(&r.payload, &recipe.limits).is_ok(),
                "payload refused by the record checks"
            );
            let value: serde_json::Value =
                serde_json::from_str(&r.payload).expect("payload is JSON");
            assert!(value.is_object(), "payload is not an object");
            assert!(value.get("sender").is_some(), "payload has no sender");
        }
        Outcome::Invalid(errors) => assert!(!errors.is_empty(), "refused without a reason"),
    }
}
