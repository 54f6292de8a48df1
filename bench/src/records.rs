//! Deterministic record generator.
//!
//! Record `i` is a pure function of `(seed, i, record_bytes)`: every step can
//! regenerate any slice of the data set on its own, so nothing needs to hold
//! all N records in memory (`--records 10000000` streams), and two runs with
//! the same flags send byte-identical data.
//!
//! A record looks like a structured log event a producer on the edge sends:
//!
//! ```json
//! {"stream":"app.web","id":"rec-0000000042","ts":"2026-11-23T12:00:00.042311Z",
//!  "payload":{"host":"web-07","level":"info","status":200,"latency_ms":12.345,
//!             "bytes":5123,"msg":"GET /api/v1/orders completed for tenant ..."}}
//! ```
//!
//! Optional fields (`region`, `user_id`, `trace_id`, ...) are added while the
//! size budget allows; `msg` then fills the line to exactly `record_bytes`
//! bytes (or is kept short when the fixed part is already that long).

use std::fmt::Write as _;

/// The fixed seed: the data set is the same on every run and machine.
pub const SEED: u64 = 0x00DC_5BE4_C400_2026;

/// 2026-11-23T12:00:00Z in microseconds since the Unix epoch.
const BASE_TS_US: i64 = 1_795_435_200_000_000;
/// Shortest `msg` text kept even when the budget is spent.
const MIN_MSG: usize = 12;

const STREAMS: &[&str] = &[
    "app.web",
    "app.api",
    "app.worker",
    "sys.metrics",
    "sys.auth",
    "net.firewall",
];
const HOST_KINDS: &[&str] = &["web", "api", "db", "cache", "worker", "edge", "gw"];
const SITES: &[&str] = &["fra1", "ams2", "lon1", "par3", "waw1", "mad2"];
const REGIONS: &[&str] = &["eu-central-1", "eu-west-1", "eu-west-3", "eu-south-2"];
const SERVICES: &[&str] = &[
    "checkout",
    "catalog",
    "payments",
    "search",
    "accounts",
    "shipping",
    "inventory",
];
const METHODS: &[&str] = &["GET", "GET", "GET", "POST", "PUT", "DELETE"];
const PATHS: &[&str] = &[
    "/api/v1/orders",
    "/api/v1/cart",
    "/api/v1/items",
    "/api/v2/search",
    "/login",
    "/health",
    "/api/v1/users",
];
const WORDS: &[&str] = &[
    "request",
    "completed",
    "for",
    "tenant",
    "user",
    "session",
    "cache",
    "miss",
    "hit",
    "retry",
    "upstream",
    "timeout",
    "connection",
    "reset",
    "by",
    "peer",
    "slow",
    "query",
    "took",
    "ms",
    "queue",
    "depth",
    "worker",
    "started",
    "job",
    "finished",
    "token",
    "refreshed",
    "disk",
    "usage",
    "above",
    "threshold",
    "rotated",
    "log",
    "file",
    "backend",
    "healthy",
    "degraded",
    "payment",
    "authorised",
    "declined",
    "order",
    "shipped",
    "invoice",
    "created",
];

/// One generated record, in the parts every tier needs.
#[derive(Debug, Clone)]
pub struct Rec {
    pub id: String,
    pub stream: &'static str,
    pub ts_us: i64,
    /// The payload object's JSON text.
    pub payload: String,
    /// The whole record as the producer sends it (one NDJSON line, no newline).
    pub line: String,
}

#[derive(Debug, Clone, Copy)]
pub struct Generator {
    pub record_bytes: usize,
}

fn pick<'a>(rng: &mut fastrand::Rng, items: &[&'a str]) -> &'a str {
    items[rng.usize(..items.len())]
}

impl Generator {
    pub fn new(record_bytes: usize) -> Generator {
        Generator { record_bytes }
    }

    /// Record number `i` (0-based); its id is `rec-{i:010}`, so ids are distinct.
    pub fn record(&self, i: u64) -> Rec {
        let mut rng = fastrand::Rng::with_seed(SEED ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let stream = pick(&mut rng, STREAMS);
        let id = format!("rec-{i:010}");
        // Roughly 1,000 events per second, slightly out of order.
        let ts_us = BASE_TS_US + (i as i64) * 1_000 + rng.i64(0..5_000);
        let ts = dcs_shared::record::format_ts(ts_us);

        let level = match rng.u8(0..100) {
            0..=69 => "info",
            70..=84 => "debug",
            85..=95 => "warn",
            _ => "error",
        };
        let status = match rng.u8(0..100) {
            0..=84 => 200,
            85..=89 => 201,
            90..=94 => 404,
            95..=97 => 500,
            _ => 503,
        };
        let mut payload = String::with_capacity(self.record_bytes);
        let _ = write!(
            payload,
            r#"{{"host":"{}-{:02}","level":"{level}","status":{status},"latency_ms":{}.{:03},"bytes":{}"#,
            pick(&mut rng, HOST_KINDS),
            rng.u8(1..40),
            rng.u32(0..800),
            rng.u32(0..1000),
            rng.u32(100..200_000),
        );
        // `{"stream":"…","id":"…","ts":"…","payload":` + payload + `,"msg":"…"}}`
        let envelope = 10 + stream.len() + 8 + id.len() + 8 + ts.len() + 13;
        let msg_overhead = 10; // ,"msg":"" and the closing }}
        let optional: [String; 5] = [
            format!(r#","site":"{}""#, pick(&mut rng, SITES)),
            format!(r#","service":"{}""#, pick(&mut rng, SERVICES)),
            format!(r#","user_id":{}"#, rng.u32(1000..2_000_000)),
            format!(r#","region":"{}""#, pick(&mut rng, REGIONS)),
            format!(r#","trace_id":"{:016x}""#, rng.u64(..)),
        ];
        for field in &optional {
            if envelope + payload.len() + field.len() + msg_overhead + MIN_MSG <= self.record_bytes
            {
                payload.push_str(field);
            }
        }
        let budget = self
            .record_bytes
            .saturating_sub(envelope + payload.len() + msg_overhead)
            .max(MIN_MSG);
        let mut msg = format!(
            "{} {} {}",
            pick(&mut rng, METHODS),
            pick(&mut rng, PATHS),
            pick(&mut rng, WORDS)
        );
        while msg.len() < budget {
            msg.push(' ');
            msg.push_str(pick(&mut rng, WORDS));
        }
        // ASCII only, so any byte offset is a char boundary.
        msg.truncate(budget);
        let msg = msg.trim_end();
        let _ = write!(payload, r#","msg":"{msg}"}}"#);

        let line =
            format!(r#"{{"stream":"{stream}","id":"{id}","ts":"{ts}","payload":{payload}}}"#);
        Rec {
            id,
            stream,
            ts_us,
            payload,
            line,
        }
    }

    /// Records `[start, end)` as one NDJSON body (newline after each record);
    /// also returns the raw JSON bytes (lines without newlines).
    pub fn ndjson(&self, start: u64, end: u64) -> (Vec<u8>, u64) {
        let mut body = Vec::with_capacity((end - start) as usize * (self.record_bytes + 1));
        let mut raw = 0;
        for i in start..end {
            let r = self.record(i);
            raw += r.line.len() as u64;
            body.extend_from_slice(r.line.as_bytes());
            body.push(b'\n');
        }
        (body, raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_deterministic_distinct_and_valid() {
        let g = Generator::new(200);
        let a = g.record(7);
        assert_eq!(a.line, g.record(7).line);
        assert_ne!(a.id, g.record(8).id);
        let v: serde_json::Value = serde_json::from_str(&a.line).unwrap();
        assert_eq!(v["id"], "rec-0000000007");
        assert!(v["payload"]["status"].is_number());
        let p: serde_json::Value = serde_json::from_str(&a.payload).unwrap();
        assert!(p.is_object());
        assert!(dcs_shared::record::validate_stream(a.stream).is_ok());
    }

    #[test]
    fn lines_hit_the_requested_size() {
        for bytes in [200, 300, 1000] {
            let g = Generator::new(bytes);
            for i in 0..200 {
                let len = g.record(i).line.len();
                assert!(len.abs_diff(bytes) <= 2, "{bytes}: record {i} is {len}");
            }
        }
        // Too small a target keeps the record valid, just longer.
        assert!(Generator::new(50).record(1).line.len() > 50);
    }
}
