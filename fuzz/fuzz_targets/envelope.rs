//! `guildhall_proto::decode` (the events envelope) on arbitrary bytes.
//!
//! The coordinator decodes every message on the events stream with it, from
//! any agent or anyone who can publish there. Properties:
//!
//! - it never panics, whatever the bytes (libFuzzer reports a panic as a crash);
//! - what it decodes (version 1 or 2) re-encodes, and that encoding decodes
//!   to the same envelope with nothing skipped and encodes to the same bytes
//!   again (compared as bytes and as `Debug` text, because a NaN in an `f32`
//!   field is not `==` to itself). The input itself need not be what the
//!   encoder writes: postcard reads over-long varints, a frame may carry
//!   bytes after its event or an event kind this reader does not know
//!   (skipped), and text past its limit is cut as it is decoded.
//!
//! proto's proptests cover generated valid envelopes, their truncations and
//! one-byte corruptions; this explores the decoder from the byte side.

#![no_main]

use guildhall_proto::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = decode(data) else {
        return;
    };
    let envelope = decoded.envelope;
    let bytes = envelope
        .encode()
        .expect("a decoded envelope re-encodes (never larger than its input)");
    // Never larger, but for the incarnation (one byte, 0) that a version 1
    // envelope lacks and the version 2 written back carries.
    assert!(
        bytes.len() <= data.len() + 1,
        "re-encoding grew {} bytes to {}",
        data.len(),
        bytes.len()
    );
    let again = decode(&bytes).expect("a re-encoded envelope decodes");
    assert_eq!(
        again.skipped, 0,
        "a re-encoded envelope has no skipped frames"
    );
    assert_eq!(format!("{:?}", again.envelope), format!("{envelope:?}"));
    let bytes_again = again.envelope.encode().expect("and re-encodes again");
    assert_eq!(bytes_again, bytes, "encode(decode(x)) is not a fixed point");
});
