//! The HTTP/1.1 response codec of the upstream client, kept free of I/O so that it is part of
//! the pure core: the fuzz targets build it without the daemon, and property tests drive it
//! with any bytes.
//!
//! Why hand-written rather than hyper's client: credlock runs each upstream exchange in the
//! calling task on a pooled connection (no per-connection task and channel hand-offs, issue 7's
//! measurements in `benches/README.md`). The head is still parsed by `httparse`, the parser
//! hyper uses; this module adds the framing decision (RFC 9112 §6.3), the hop-by-hop header
//! table (RFC 9110 §7.6.1) and a chunked decoder (RFC 9112 §7.1), each tested against the
//! RFCs' rules and fuzzed (`fuzz/fuzz_targets/upstream_codec.rs`).

use std::ops::Range;

use http::StatusCode;

/// IMDS answers are small (user-data is at most 16 KiB); anything larger is not IMDS.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Header lines in one response head.
pub const MAX_HEADERS: usize = 64;
/// A chunk-size line or a trailer section longer than this is not IMDS.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The upstream's bytes are not an HTTP/1.1 answer credlock accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolError;

/// How the end of a response body is known (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

pub enum Parsed {
    /// A 1xx answer before the final one: skipped.
    Interim,
    Final(RawHead),
}

pub struct RawHead {
    pub status: StatusCode,
    pub keep_alive: bool,
    pub framing: Framing,
    /// The end-to-end header lines, as positions in the head.
    pub lines: Vec<HeaderSpan>,
}

/// Where one header line's name and value stand in the head's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderSpan {
    pub name: Range<usize>,
    pub value: Range<usize>,
}

/// Hop-by-hop header names (RFC 9110 §7.6.1) and the framing headers: consumed here, never
/// forwarded.
const NOT_FORWARDED: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Parses a response head at the start of `buf`, and decides from its raw lines how the body
/// ends (RFC 9112 §6.3) and whether the connection stays open; `None` while it is incomplete.
///
/// `head_request`: the request was HEAD (its answer has no body whatever it says).
pub fn parse_head(
    buf: &[u8],
    head_request: bool,
) -> Result<Option<(usize, Parsed)>, ProtocolError> {
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut lines);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ProtocolError),
    };
    let code = response.code.ok_or(ProtocolError)?;
    let status = StatusCode::from_u16(code).map_err(|_| ProtocolError)?;
    // 101: the connection would now speak another protocol. credlock never asks for an
    // upgrade and IMDS never offers one: refuse it rather than frame or reuse it.
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(ProtocolError);
    }
    if status.is_informational() {
        return Ok(Some((len, Parsed::Interim)));
    }
    let mut close = false;
    let mut keep_alive_token = false;
    // Connection naming other headers: keep it, strip_hop_by_hop removes what it names.
    let mut names_others = false;
    let mut last_coding: Option<&[u8]> = None;
    let mut length: Option<usize> = None;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive_token = true;
                } else if !token.is_empty() {
                    names_others = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let mut codings = h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii);
            if let Some(last) = codings.rfind(|t| !t.is_empty()) {
                last_coding = Some(last);
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            for part in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                let n = parse_length(part)?;
                // Repeated values must agree (RFC 9112 §6.3 item 5).
                if length.is_some_and(|l| l != n) {
                    return Err(ProtocolError);
                }
                length = Some(n);
            }
        }
    }
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if let Some(coding) = last_coding {
        if coding.eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match length {
            Some(n) if n > MAX_RESPONSE_BYTES => return Err(ProtocolError),
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let base = buf.as_ptr() as usize;
    let mut kept = Vec::with_capacity(response.headers.len());
    for h in response.headers.iter() {
        let hop = is_not_forwarded(h.name)
            && !(names_others && h.name.eq_ignore_ascii_case("connection"));
        // With a transfer coding the length is the decoded body's, set by the caller.
        let stale_length = last_coding.is_some() && h.name.eq_ignore_ascii_case("content-length");
        if hop || stale_length {
            continue;
        }
        // httparse hands out slices of `buf`: keep their offsets, to slice the frozen head.
        let name_at = h.name.as_ptr() as usize - base;
        let value_at = h.value.as_ptr() as usize - base;
        kept.push(HeaderSpan {
            name: name_at..name_at + h.name.len(),
            value: value_at..value_at + h.value.len(),
        });
    }
    let keep_alive = !close && (response.version == Some(1) || keep_alive_token);
    Ok(Some((
        len,
        Parsed::Final(RawHead {
            status,
            keep_alive,
            framing,
            lines: kept,
        }),
    )))
}

fn parse_length(digits: &[u8]) -> Result<usize, ProtocolError> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ProtocolError);
    }
    Ok(digits
        .iter()
        .fold(0usize, |n, d| n * 10 + usize::from(d - b'0')))
}

/// Whether a header is hop-by-hop or framing: consumed by whoever receives it, never
/// forwarded. The one table of them, for requests and answers alike.
pub fn is_not_forwarded(name: &str) -> bool {
    NOT_FORWARDED.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// A chunked body's state in a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunked {
    /// More bytes are needed.
    Partial,
    /// The decoded body, and how many bytes of the buffer the chunks and trailers took.
    Complete { body: Vec<u8>, consumed: usize },
}

/// Decodes a chunked body (RFC 9112 §7.1) from the start of `buf`, trailers read and dropped.
/// Stateless: called again with more bytes, it starts over (IMDS bodies are small). A body over
/// `max`, a chunk-size line or trailer section over [`MAX_LINE_BYTES`], or bytes that are not
/// chunked framing are a [`ProtocolError`].
pub fn decode_chunked(buf: &[u8], max: usize) -> Result<Chunked, ProtocolError> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let (consumed, size) = match httparse::parse_chunk_size(&buf[at..]) {
            Ok(httparse::Status::Complete(done)) => done,
            Ok(httparse::Status::Partial) if buf.len() - at < MAX_LINE_BYTES => {
                return Ok(Chunked::Partial);
            }
            _ => return Err(ProtocolError),
        };
        at += consumed;
        let size = usize::try_from(size).map_err(|_| ProtocolError)?;
        if size == 0 {
            break;
        }
        if size > max || body.len() + size > max {
            return Err(ProtocolError);
        }
        if buf.len() - at < size + 2 {
            return Ok(Chunked::Partial);
        }
        body.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err(ProtocolError);
        }
        at += size + 2;
    }
    // Trailer section: header lines up to an empty line.
    let trailers = at;
    loop {
        match buf[at..].windows(2).position(|w| w == b"\r\n") {
            Some(0) => {
                return Ok(Chunked::Complete {
                    body,
                    consumed: at + 2,
                });
            }
            Some(end) => at += end + 2,
            None if buf.len() - trailers < MAX_LINE_BYTES => return Ok(Chunked::Partial),
            None => return Err(ProtocolError),
        }
        if at - trailers >= MAX_LINE_BYTES {
            return Err(ProtocolError);
        }
    }
}

#[cfg(test)]
#[path = "http1_tests.rs"]
mod tests;
