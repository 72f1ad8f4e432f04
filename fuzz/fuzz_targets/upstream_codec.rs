//! Any bytes from the upstream: the response-head parser and the chunked decoder never panic,
//! keep every header span inside the head, never take more than they were given, never decode
//! more than the limit, and agree with themselves when the same bytes arrive in two pieces
//! (a prefix is Partial or the same error, never a different body).
#![no_main]

use credlock::http1::{Chunked, Framing, Parsed, decode_chunked, parse_head};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    for head_request in [false, true] {
        if let Ok(Some((len, parsed))) = parse_head(data, head_request) {
            assert!(len <= data.len());
            if let Parsed::Final(head) = parsed {
                for span in &head.lines {
                    assert!(span.name.end <= len && span.value.end <= len);
                    assert!(span.name.start < span.name.end);
                }
                if head_request {
                    assert_eq!(head.framing, Framing::Empty);
                }
                if head.framing == Framing::Chunked {
                    chunked(&data[len..]);
                }
            }
        }
    }
    chunked(data);
});

fn chunked(data: &[u8]) {
    match decode_chunked(data, MAX) {
        Ok(Chunked::Complete { body, consumed }) => {
            assert!(consumed <= data.len() && body.len() <= MAX);
            // Every strict prefix of a complete body is incomplete or refused; never complete
            // with another body.
            for cut in [0, consumed / 2, consumed.saturating_sub(1)] {
                if cut < consumed
                    && let Ok(Chunked::Complete { .. }) = decode_chunked(&data[..cut], MAX)
                {
                    panic!("a prefix of {consumed} bytes completed at {cut}");
                }
            }
        }
        Ok(Chunked::Partial) | Err(_) => {}
    }
}
