//! Splitting a syslog TCP byte stream into messages (RFC 6587): octet
//! counting (`LEN SP MSG`) or a line feed after each message. `auto`
//! decides per message, as rsyslog and syslog-ng do: a frame that starts
//! with a digit is octet-counted, anything else runs to the next LF.

use serde::Deserialize;

/// How a TCP listener finds message boundaries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Framing {
    #[default]
    Auto,
    OctetCounting,
    Lf,
}

/// Why a stream cannot be split any further. The connection is closed:
/// after a lie about a length no later boundary can be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("octet count {0} exceeds max_message_bytes")]
    TooLong(usize),
    #[error("octet count is not a number followed by a space")]
    BadCount,
    #[error("a line longer than max_message_bytes has no line feed")]
    LineTooLong,
}

/// Longest octet count prefix read before giving up on it ("10000000 ").
const MAX_COUNT_DIGITS: usize = 10;

/// Takes the complete frames from the front of `buf`. Returns the frames'
/// byte ranges and how many bytes of `buf` they consumed; a partial frame
/// at the end stays for the next read.
pub fn split(
    buf: &[u8],
    framing: Framing,
    max_message: usize,
) -> (Vec<std::ops::Range<usize>>, usize, Option<FramingError>) {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let rest = &buf[at..];
        let counted = match framing {
            Framing::OctetCounting => true,
            Framing::Lf => false,
            Framing::Auto => rest[0].is_ascii_digit(),
        };
        if counted {
            let Some(space) = rest
                .iter()
                .take(MAX_COUNT_DIGITS + 1)
                .position(|b| *b == b' ')
            else {
                if rest.len() > MAX_COUNT_DIGITS || !rest.iter().all(u8::is_ascii_digit) {
                    return (frames, at, Some(FramingError::BadCount));
                }
                break;
            };
            let len = std::str::from_utf8(&rest[..space])
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<usize>().ok());
            let Some(len) = len else {
                return (frames, at, Some(FramingError::BadCount));
            };
            if len > max_message {
                return (frames, at, Some(FramingError::TooLong(len)));
            }
            let start = at + space + 1;
            if buf.len() - start < len {
                break;
            }
            frames.push(start..start + len);
            at = start + len;
        } else {
            match rest.iter().position(|b| *b == b'\n') {
                Some(lf) => {
                    // A lone LF (a keep-alive, or CRLF leftovers) is no message.
                    if lf > 0 && lf <= max_message {
                        frames.push(at..at + lf);
                    } else if lf > max_message {
                        return (frames, at, Some(FramingError::LineTooLong));
                    }
                    at += lf + 1;
                }
                None if rest.len() > max_message => {
                    return (frames, at, Some(FramingError::LineTooLong));
                }
                None => break,
            }
        }
    }
    (frames, at, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(buf: &[u8], framing: Framing) -> (Vec<String>, usize, Option<FramingError>) {
        let (frames, used, err) = split(buf, framing, 64);
        let texts = frames
            .into_iter()
            .map(|r| String::from_utf8_lossy(&buf[r]).into_owned())
            .collect();
        (texts, used, err)
    }

    #[test]
    fn auto_framing_decides_per_message() {
        let buf = b"5 hello<13>line one\n11 hello world<14>partial";
        let (texts, used, err) = texts(buf, Framing::Auto);
        assert_eq!(texts, ["hello", "<13>line one", "hello world"]);
        assert_eq!(&buf[used..], b"<14>partial");
        assert_eq!(err, None);
    }

    #[test]
    fn a_partial_count_or_body_waits_for_more_bytes() {
        for buf in [&b"12"[..], b"12 ", b"12 abc"] {
            let (texts, used, err) = texts(buf, Framing::OctetCounting);
            assert!(texts.is_empty() && used == 0 && err.is_none(), "{buf:?}");
        }
    }

    #[test]
    fn lies_and_overlong_frames_are_framing_errors() {
        for (buf, framing, want) in [
            (
                &b"99999 x"[..],
                Framing::OctetCounting,
                FramingError::TooLong(99999),
            ),
            (b"12x4 abc", Framing::OctetCounting, FramingError::BadCount),
            (
                b"<13>no count",
                Framing::OctetCounting,
                FramingError::BadCount,
            ),
            (b"123456789012 abc", Framing::Auto, FramingError::BadCount),
            (&[b'a'; 100][..], Framing::Lf, FramingError::LineTooLong),
        ] {
            let (_, _, err) = texts(buf, framing);
            assert_eq!(err, Some(want), "{buf:?}");
        }
    }

    #[test]
    fn lf_framing_skips_empty_lines_and_keeps_digits_as_text() {
        let (texts, used, _) = texts(b"\n12 starts with digits\n\nnext\n", Framing::Lf);
        assert_eq!(texts, ["12 starts with digits", "next"]);
        assert_eq!(used, 29);
    }
}
