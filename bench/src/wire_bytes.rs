//! The wire step: compressed bytes per record at each gzip level, and how
//! fast batches are encoded.

use std::time::Instant;

use dcs_shared::wire::{self, Backlog, OutRecord};

use crate::records::{self, Generator};
use crate::results::{LevelResult, WireResult};

/// Records per batch in the wire-size step (the agent's default batch size).
const WIRE_BATCH: usize = dcs_edge::config::DEFAULT_BATCH_MAX_RECORDS;

pub(crate) fn encode(epoch: uuid::Uuid, recs: &[(i64, records::Rec)], level: u32) -> Vec<u8> {
    let backlog = Backlog::default();
    wire::encode_batch(
        epoch,
        Some(&backlog),
        recs.iter().map(|(seq, r)| OutRecord {
            seq: *seq,
            id: &r.id,
            stream: r.stream,
            ts_us: r.ts_us,
            payload: &r.payload,
            received: None,
        }),
        level,
    )
}

/// The wire format's JSON (as `wire::encode_batch` writes it) rendered into a
/// Vec first, then gzipped with one `write_all`: the reference for how fast
/// encoding is when the compressor is not fed a few bytes at a time.
fn encode_one_shot(epoch: uuid::Uuid, recs: &[(i64, records::Rec)], level: u32) -> Vec<u8> {
    use std::io::Write as _;
    let mut json = Vec::with_capacity(recs.len() * 256);
    let _ = write!(
        json,
        r#"{{"v":{},"epoch":"{epoch}","backlog":"#,
        wire::FORMAT_VERSION
    );
    let _ = serde_json::to_writer(&mut json, &Backlog::default());
    json.extend_from_slice(br#","records":["#);
    for (i, (seq, r)) in recs.iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        let _ = write!(json, r#"{{"seq":{seq},"id":"#);
        let _ = serde_json::to_writer(&mut json, &r.id);
        json.extend_from_slice(br#","stream":"#);
        let _ = serde_json::to_writer(&mut json, r.stream);
        let _ = write!(json, r#","ts":{},"payload":"#, r.ts_us);
        json.extend_from_slice(r.payload.as_bytes());
        json.push(b'}');
    }
    json.extend_from_slice(b"]}");
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(json.len() / 4),
        flate2::Compression::new(level),
    );
    let _ = gz.write_all(&json);
    gz.finish().unwrap_or_default()
}

/// 7. Compressed bytes on the wire per record vs the raw JSON the producer sent.
pub(crate) fn step_wire(generator: Generator, n: u64, level: u32) -> WireResult {
    let epoch = uuid::Uuid::new_v4();
    let measure = |n: u64, level: u32| -> (u64, u64, f64, f64) {
        let (mut raw, mut wire) = (0u64, 0u64);
        let (mut encode_secs, mut one_shot_secs) = (0.0, 0.0);
        let mut start = 0u64;
        while start < n {
            let end = (start + WIRE_BATCH as u64).min(n);
            let recs: Vec<_> = (start..end)
                .map(|i| (i as i64 + 1, generator.record(i)))
                .collect();
            raw += recs.iter().map(|(_, r)| r.line.len() as u64).sum::<u64>();
            let t = Instant::now();
            let body = encode(epoch, &recs, level);
            encode_secs += t.elapsed().as_secs_f64();
            let t = Instant::now();
            std::hint::black_box(encode_one_shot(epoch, &recs, level));
            one_shot_secs += t.elapsed().as_secs_f64();
            wire += body.len() as u64;
            start = end;
        }
        (raw, wire, encode_secs, one_shot_secs)
    };
    let (raw, wire_bytes, _, _) = measure(n, level);
    let sample = n.min(200_000);
    let levels = [0u32, 1, 2, 3, 6, 9]
        .into_iter()
        .map(|l| {
            let (raw, wire_bytes, secs, one_shot_secs) = measure(sample, l);
            LevelResult {
                level: l,
                records: sample,
                wire_bytes_per_record: wire_bytes as f64 / sample as f64,
                ratio_to_raw: wire_bytes as f64 / raw as f64,
                // Input rate: the raw JSON the encoder consumed per second.
                encode_mib_per_s: raw as f64 / secs / (1 << 20) as f64,
                one_shot_mib_per_s: raw as f64 / one_shot_secs / (1 << 20) as f64,
            }
        })
        .collect();
    WireResult {
        records: n,
        batch_records: WIRE_BATCH,
        level,
        raw_bytes_per_record: raw as f64 / n as f64,
        wire_bytes_per_record: wire_bytes as f64 / n as f64,
        ratio_to_raw: wire_bytes as f64 / raw as f64,
        levels,
    }
}
