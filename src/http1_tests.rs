use super::*;

fn decode(buf: &[u8]) -> Result<Chunked, ProtocolError> {
    decode_chunked(buf, MAX_RESPONSE_BYTES)
}

#[test]
fn chunked_bodies_decode_with_extensions_and_trailers() {
    // RFC 9112 §7.1: chunk extensions are ignored, the trailer section ends at an empty line.
    let wire = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
    assert_eq!(
        decode(wire),
        Ok(Chunked::Complete {
            body: b"Wikipedia".to_vec(),
            consumed: wire.len() - 4
        })
    );
}

#[test]
fn every_prefix_of_a_valid_body_is_partial_never_an_error_or_a_short_body() {
    let wire = b"4\r\nWiki\r\n5\r\npedia\r\n0\r\nx: 1\r\n\r\n";
    for cut in 0..wire.len() {
        assert_eq!(decode(&wire[..cut]), Ok(Chunked::Partial), "cut at {cut}");
    }
}

#[test]
fn malformed_or_oversized_chunks_are_protocol_errors() {
    for bad in [
        &b"ZZ\r\n"[..],
        b"4\r\nWikiXX",
        b"-1\r\n",
        b"ffffffffffffffffffff\r\n",
    ] {
        assert_eq!(
            decode(bad),
            Err(ProtocolError),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(
        decode_chunked(b"5\r\nhello\r\n0\r\n\r\n", 4),
        Err(ProtocolError)
    );
    assert_eq!(
        decode_chunked(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n", 5),
        Err(ProtocolError)
    );
    // A trailer section that never ends is refused once it is over the line limit.
    let mut endless = b"0\r\n".to_vec();
    endless.extend(std::iter::repeat_n(b'a', MAX_LINE_BYTES + 1));
    assert_eq!(decode(&endless), Err(ProtocolError));
}

#[test]
fn heads_frame_bodies_as_rfc_9112_says() {
    let frame = |raw: &str, head_request| match parse_head(raw.as_bytes(), head_request) {
        Ok(Some((_, Parsed::Final(h)))) => Ok(h.framing),
        Ok(Some((_, Parsed::Interim))) => panic!("interim"),
        Ok(None) => panic!("partial"),
        Err(e) => Err(e),
    };
    assert_eq!(
        frame("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false),
        Ok(Framing::Length(5))
    );
    assert_eq!(
        frame("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true),
        Ok(Framing::Empty)
    );
    assert_eq!(
        frame("HTTP/1.1 204 No Content\r\n\r\n", false),
        Ok(Framing::Empty)
    );
    assert_eq!(
        frame(
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            false
        ),
        Ok(Framing::Empty)
    );
    // Transfer-Encoding wins over Content-Length (§6.3 item 3); chunked must be last.
    assert_eq!(
        frame(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n",
            false
        ),
        Ok(Framing::Chunked)
    );
    assert_eq!(
        frame(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            false
        ),
        Ok(Framing::UntilClose)
    );
    assert_eq!(
        frame("HTTP/1.0 200 OK\r\n\r\n", false),
        Ok(Framing::UntilClose)
    );
    // Differing repeated lengths, and 101 (credlock never asks for an upgrade).
    assert_eq!(
        frame(
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            false
        ),
        Err(ProtocolError)
    );
    assert_eq!(
        frame(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
            false
        ),
        Err(ProtocolError)
    );
    assert!(matches!(
        parse_head(b"HTTP/1.1 100 Continue\r\n\r\n", false),
        Ok(Some((_, Parsed::Interim)))
    ));
}

#[test]
fn the_one_hop_by_hop_table_covers_rfc_9110_and_the_framing_headers() {
    for name in [
        "Connection",
        "keep-alive",
        "Proxy-Connection",
        "TE",
        "trailer",
        "Transfer-Encoding",
        "upgrade",
        "proxy-authenticate",
        "Proxy-Authorization",
    ] {
        assert!(is_not_forwarded(name), "{name}");
    }
    for name in [
        "x-aws-ec2-metadata-token",
        "content-length",
        "server",
        "x-forwarded-for",
    ] {
        assert!(!is_not_forwarded(name), "{name}");
    }
}
