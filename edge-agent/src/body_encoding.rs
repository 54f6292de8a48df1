//! `Content-Encoding` of ingest request bodies: identity, gzip and zstd.
//!
//! # Bounds
//! - The compressed body is bounded by `ingest.max_request_bytes` before this
//!   module sees it ([`crate::ingest::read_body_within`]).
//! - The decompressed body is bounded by the same `ingest.max_request_bytes`:
//!   inflating stops one byte past it (413), so a bomb costs at most that much
//!   memory and the CPU to produce it.
//! - A size the stream states up front is checked before any byte is
//!   inflated: the gzip trailer (ISIZE, when deflate could reach it from
//!   the body's length) and the zstd frame header's content size. A body
//!   that states more than the limit is refused at once (413).
//! - A zstd frame may ask for a window of up to [`ZSTD_WINDOW_LOG_MAX`] (the
//!   zstd CLI's default ceiling without `--long`): a frame header asking for
//!   more would make the decoder allocate it, so it is refused (400).
//!
//! A corrupt or truncated stream is a 400 naming the encoding; an encoding
//! other than these three is a 415 listing the ones accepted.

use std::io::Read;

use axum::http::{HeaderMap, StatusCode, header};

use crate::ingest::ApiError;

/// 2^27 = 128 MiB: what `zstd` and libzstd decode by default. Frames made
/// with `--long=28` or more need the sender to stay below it.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// Deflate expands at most about 1032:1 (a 258-byte match in under two
/// bits); a gzip trailer stating more than that for its body is not a trailer.
const DEFLATE_MAX_RATIO: u64 = 1032;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

impl Encoding {
    /// Reads `Content-Encoding`; several codings (`gzip, zstd`) are refused,
    /// no producer we know of stacks them.
    pub fn from_headers(headers: &HeaderMap) -> Result<Encoding, ApiError> {
        let Some(value) = headers.get(header::CONTENT_ENCODING) else {
            return Ok(Encoding::Identity);
        };
        let text = value.to_str().unwrap_or("").trim().to_ascii_lowercase();
        match text.as_str() {
            "" | "identity" => Ok(Encoding::Identity),
            "gzip" | "x-gzip" => Ok(Encoding::Gzip),
            "zstd" => Ok(Encoding::Zstd),
            _ => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_encoding",
                format!(
                    "Content-Encoding {:?} is not supported; send gzip, zstd or identity",
                    String::from_utf8_lossy(value.as_bytes())
                ),
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
            Encoding::Zstd => "zstd",
        }
    }
}

/// Decodes `body` into at most `limit` bytes. Blocking (it inflates): call
/// from `spawn_blocking` for compressed bodies.
pub fn decode(
    encoding: Encoding,
    body: axum::body::Bytes,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    match encoding {
        Encoding::Identity => Ok(body),
        Encoding::Gzip => {
            // A trailer no complete stream of this length could have (a cut
            // body ends in compressed data) is left to the inflater, which
            // finds the stream broken (400) rather than too large.
            if let Some(stated) = gzip_stated_size(&body)
                && stated > limit as u64
                && stated <= (body.len() as u64).saturating_mul(DEFLATE_MAX_RATIO)
            {
                return Err(too_large(encoding, limit));
            }
            inflate(
                encoding,
                flate2::read::MultiGzDecoder::new(&body[..]),
                limit,
            )
        }
        Encoding::Zstd => {
            if let Ok(Some(stated)) = zstd::zstd_safe::get_frame_content_size(&body)
                && stated > limit as u64
            {
                return Err(too_large(encoding, limit));
            }
            let mut decoder =
                zstd::stream::read::Decoder::new(&body[..]).map_err(|e| corrupt(encoding, &e))?;
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(|e| corrupt(encoding, &e))?;
            inflate(encoding, decoder, limit)
        }
    }
}

/// The decompressed size a single-member gzip body states in its last four
/// bytes (modulo 2^32, so only a hint; the inflate cap is the bound).
fn gzip_stated_size(body: &[u8]) -> Option<u64> {
    if body.len() < 18 || !body.starts_with(&[0x1f, 0x8b]) {
        return None;
    }
    let tail: [u8; 4] = body[body.len() - 4..].try_into().ok()?;
    Some(u64::from(u32::from_le_bytes(tail)))
}

fn inflate(
    encoding: Encoding,
    reader: impl Read,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| corrupt(encoding, &e))?;
    if out.len() > limit {
        return Err(too_large(encoding, limit));
    }
    Ok(out.into())
}

fn too_large(encoding: Encoding, limit: usize) -> ApiError {
    metrics::counter!("dcs_agent_decompression_refused_total", "reason" => "too_large")
        .increment(1);
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        format!(
            "the {} body exceeds ingest.max_request_bytes ({limit} bytes) once decompressed",
            encoding.name()
        ),
    )
}

fn corrupt(encoding: Encoding, error: &std::io::Error) -> ApiError {
    metrics::counter!("dcs_agent_decompression_refused_total", "reason" => "corrupt").increment(1);
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "malformed_body",
        format!(
            "the body is not a complete {} stream: {error}",
            encoding.name()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    fn status(r: Result<axum::body::Bytes, ApiError>) -> u16 {
        match r {
            Ok(_) => 200,
            Err(e) => e.status().as_u16(),
        }
    }

    #[test]
    fn each_encoding_decodes_within_the_limit_and_refuses_past_it() {
        let data = vec![b'x'; 10_000];
        let gz = gzip(&data);
        let zs = zstd::encode_all(&data[..], 3).unwrap();
        for (encoding, body) in [
            (Encoding::Identity, data.clone()),
            (Encoding::Gzip, gz),
            (Encoding::Zstd, zs),
        ] {
            let ok = decode(encoding, body.clone().into(), 10_000).unwrap();
            assert_eq!(ok.len(), 10_000, "{encoding:?}");
            if encoding != Encoding::Identity {
                assert_eq!(
                    status(decode(encoding, body.into(), 9_999)),
                    413,
                    "{encoding:?}"
                );
            }
        }
    }

    #[test]
    fn truncated_and_corrupt_streams_are_400() {
        let data = vec![b'y'; 50_000];
        let gz = gzip(&data);
        let zs = zstd::encode_all(&data[..], 3).unwrap();
        for (encoding, body) in [
            (Encoding::Gzip, gz[..gz.len() / 2].to_vec()),
            (Encoding::Zstd, zs[..zs.len() / 2].to_vec()),
            (Encoding::Gzip, b"not gzip at all".to_vec()),
            (Encoding::Zstd, b"not zstd at all".to_vec()),
        ] {
            assert_eq!(
                status(decode(encoding, body.into(), 1 << 20)),
                400,
                "{encoding:?}"
            );
        }
    }

    #[test]
    fn unknown_encodings_are_415() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, "br".parse().unwrap());
        let e = Encoding::from_headers(&headers).unwrap_err();
        assert_eq!(e.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
