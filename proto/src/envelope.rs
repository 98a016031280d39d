//! The versioned envelope that carries a batch of events in one broker message.
//!
//! # Wire format (version 2)
//!
//! All integers are postcard varints; strings are a varint length and UTF-8.
//!
//! ```text
//! v: u16 | sender: str | incarnation: u64 | seq: u64 | sent_at_ms: u64 | count: u32 | count x (len: u32, postcard(Event))
//! ```
//!
//! Version 1 (still read, never written) has no `incarnation`: it reads as 0,
//! "unknown". The incarnation is a random number a sender draws when it
//! starts: with it a reader tells a restarted sender (a new incarnation,
//! counting from 1 again) from a batch forged under its name.
//!
//! Each event is framed on its own so a reader skips an event kind it does
//! not know (a newer agent) and keeps the rest of the batch. The version comes
//! first and is checked before anything else is read.
//!
//! # Guarantees
//!
//! [`decode`] never panics, refuses input over [`MAX_ENVELOPE_BYTES`], and
//! allocates only in proportion to the bytes it actually decodes, plus one
//! up-front reservation for the event list, bounded by the input (one event
//! per 4 bytes) and to 1024 events whatever the event count claims.

use crate::event::Event;
use crate::ids::AgentId;
use serde::{Deserialize, Serialize};

/// The version of control messages (commands and replies), and of the
/// envelopes written before they carried an incarnation.
pub const PROTOCOL_VERSION: u16 = 1;

/// The envelope version this crate writes (it reads 1 and 2).
pub const ENVELOPE_VERSION: u16 = 2;

/// Largest envelope a reader accepts, and that [`EnvelopeBuilder`] users
/// should flush before reaching.
pub const MAX_ENVELOPE_BYTES: usize = 1 << 20;

/// Why an envelope could not be read. Readers count these by [`DecodeError::reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_ENVELOPE_BYTES`].
    #[error("envelope of {0} bytes exceeds the {MAX_ENVELOPE_BYTES}-byte limit")]
    Oversized(usize),
    /// Written by a version this reader does not speak.
    #[error(
        "unknown message version {0} (this reader speaks {PROTOCOL_VERSION} and {ENVELOPE_VERSION})"
    )]
    UnknownVersion(u16),
    /// Not a valid envelope: truncated, bad varint, bad sender id, trailing bytes...
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
}

impl DecodeError {
    /// A bounded label for metrics: `oversized`, `version`, `malformed`.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Oversized(_) => "oversized",
            DecodeError::UnknownVersion(_) => "version",
            DecodeError::Malformed(_) => "malformed",
        }
    }
}

/// Why an envelope could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// postcard refused a value (never expected for these types).
    #[error("cannot encode event: {0}")]
    Postcard(String),
    /// The batch grew past [`MAX_ENVELOPE_BYTES`]; flush earlier.
    #[error("envelope would be {0} bytes, over the {MAX_ENVELOPE_BYTES}-byte limit")]
    TooLarge(usize),
}

/// A decoded or to-be-encoded batch of events from one sender.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Who sent it; events are attributed to this agent.
    pub sender: AgentId,
    /// The sending process's random start id (0: unknown, an envelope of
    /// version 1): tells a restart (a new incarnation) from a forgery.
    pub incarnation: u64,
    /// The sender's batch counter, +1 per envelope: gaps and repeats reveal
    /// lost or duplicated batches.
    pub seq: u64,
    /// When the batch was published, on the sender's clock.
    pub sent_at_ms: u64,
    /// The events, in the order they happened.
    pub events: Vec<Event>,
}

/// The result of [`decode`]: the envelope and how many event frames in it
/// could not be read (unknown kinds from newer senders, or corrupt frames).
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Everything that could be read.
    pub envelope: Envelope,
    /// Frames skipped; callers count them as malformed events.
    pub skipped: u32,
}

/// The header of a version 1 envelope.
#[derive(Serialize, Deserialize)]
struct HeaderV1<'a> {
    sender: &'a str,
    seq: u64,
    sent_at_ms: u64,
}

/// The header of a version 2 envelope.
#[derive(Serialize, Deserialize)]
struct Header<'a> {
    sender: &'a str,
    incarnation: u64,
    seq: u64,
    sent_at_ms: u64,
}

impl Envelope {
    /// Encodes the whole envelope at once.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut builder = EnvelopeBuilder::default();
        for event in &self.events {
            builder.push(event)?;
        }
        builder.finish(&self.sender, self.incarnation, self.seq, self.sent_at_ms)
    }
}

/// Accumulates encoded events for one envelope; agents keep one per batch.
#[derive(Debug, Default)]
pub struct EnvelopeBuilder {
    /// The framed events so far (length prefix + postcard bytes each).
    frames: Vec<u8>,
    /// How many events `frames` holds.
    count: u32,
    /// Reused buffer for one event's encoding, to avoid an allocation per push.
    scratch: Vec<u8>,
}

impl EnvelopeBuilder {
    /// Appends one event.
    pub fn push(&mut self, event: &Event) -> Result<(), EncodeError> {
        self.scratch.clear();
        let scratch = std::mem::take(&mut self.scratch);
        let scratch = postcard::to_extend(event, scratch)
            .map_err(|e| EncodeError::Postcard(e.to_string()))?;
        let len = u32::try_from(scratch.len()).map_err(|_| EncodeError::TooLarge(scratch.len()))?;
        self.frames = postcard::to_extend(&len, std::mem::take(&mut self.frames))
            .map_err(|e| EncodeError::Postcard(e.to_string()))?;
        self.frames.extend_from_slice(&scratch);
        self.scratch = scratch;
        self.count += 1;
        Ok(())
    }

    /// Events pushed since the last [`finish`](Self::finish).
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether nothing was pushed since the last finish.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the events take so far (the header adds fewer than 160).
    pub fn encoded_len(&self) -> usize {
        self.frames.len()
    }

    /// Writes the envelope and empties the builder for the next batch.
    pub fn finish(
        &mut self,
        sender: &AgentId,
        incarnation: u64,
        seq: u64,
        sent_at_ms: u64,
    ) -> Result<Vec<u8>, EncodeError> {
        let header = Header {
            sender: sender.as_str(),
            incarnation,
            seq,
            sent_at_ms,
        };
        let mut out = Vec::with_capacity(self.frames.len() + 32 + sender.as_str().len());
        let map = |e: postcard::Error| EncodeError::Postcard(e.to_string());
        out = postcard::to_extend(&ENVELOPE_VERSION, out).map_err(map)?;
        out = postcard::to_extend(&header, out).map_err(map)?;
        out = postcard::to_extend(&self.count, out).map_err(map)?;
        out.extend_from_slice(&self.frames);
        self.frames.clear();
        self.count = 0;
        if out.len() > MAX_ENVELOPE_BYTES {
            return Err(EncodeError::TooLarge(out.len()));
        }
        Ok(out)
    }
}

/// Checks the size limit and the version that starts every message
/// (envelopes and control messages alike); returns what follows it.
pub(crate) fn check_version(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(DecodeError::Oversized(bytes.len()));
    }
    let (v, rest) = postcard::take_from_bytes::<u16>(bytes)
        .map_err(|_| DecodeError::Malformed("no version"))?;
    if v != PROTOCOL_VERSION {
        return Err(DecodeError::UnknownVersion(v));
    }
    Ok(rest)
}

/// The fewest bytes a frame holding a decodable [`Event`] takes: a length,
/// the variant index and at least two fields of at least a byte each. Only
/// bounds the up-front reservation of [`decode`]; nothing relies on it.
const MIN_EVENT_FRAME: usize = 4;

/// Most events [`decode`] reserves room for before decoding any (about
/// 220 KB); a larger batch grows the list as its events are decoded.
const MAX_RESERVED_EVENTS: usize = 1024;

/// Reads a postcard varint `u32` off the front of `bytes`, as
/// `postcard::take_from_bytes::<u32>` does (at most 5 bytes, the 5th at most
/// `0x0f`), without setting up a deserializer for each frame.
#[inline]
fn take_u32(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let mut out = 0u32;
    for (i, &byte) in bytes.iter().take(5).enumerate() {
        out |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if i == 4 && byte > 0x0f {
                return None;
            }
            return Some((out, &bytes[i + 1..]));
        }
    }
    None
}

/// Reads an envelope (version 1 or 2). Never panics; see the module docs
/// for the guarantees.
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(DecodeError::Oversized(bytes.len()));
    }
    let (v, rest) = postcard::take_from_bytes::<u16>(bytes)
        .map_err(|_| DecodeError::Malformed("no version"))?;
    let bad_header = |_| DecodeError::Malformed("bad header");
    let (header, rest) = match v {
        ENVELOPE_VERSION => postcard::take_from_bytes::<Header<'_>>(rest).map_err(bad_header)?,
        PROTOCOL_VERSION => {
            let (h, rest) = postcard::take_from_bytes::<HeaderV1<'_>>(rest).map_err(bad_header)?;
            let h = Header {
                sender: h.sender,
                incarnation: 0,
                seq: h.seq,
                sent_at_ms: h.sent_at_ms,
            };
            (h, rest)
        }
        other => return Err(DecodeError::UnknownVersion(other)),
    };
    let sender =
        AgentId::new(header.sender).map_err(|_| DecodeError::Malformed("bad sender id"))?;
    let (count, mut rest) = postcard::take_from_bytes::<u32>(rest)
        .map_err(|_| DecodeError::Malformed("bad event count"))?;
    // Every frame takes at least one byte: a larger count is a lie.
    if count as usize > rest.len() {
        return Err(DecodeError::Malformed("event count exceeds input"));
    }
    // Reserve once rather than grow (and copy) the batch several times, but
    // never more than the input could hold (see the module docs).
    let reserve = (count as usize)
        .min(rest.len() / MIN_EVENT_FRAME)
        .min(MAX_RESERVED_EVENTS);
    let mut events = Vec::with_capacity(reserve);
    let mut skipped = 0u32;
    for _ in 0..count {
        let (len, after) = take_u32(rest).ok_or(DecodeError::Malformed("bad frame length"))?;
        let len = len as usize;
        if len > after.len() {
            return Err(DecodeError::Malformed("frame exceeds input"));
        }
        let (frame, after) = after.split_at(len);
        match postcard::from_bytes::<Event>(frame) {
            Ok(event) => events.push(event),
            Err(_) => skipped += 1,
        }
        rest = after;
    }
    if !rest.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(Decoded {
        envelope: Envelope {
            sender,
            incarnation: header.incarnation,
            seq: header.seq,
            sent_at_ms: header.sent_at_ms,
            events,
        },
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_u32_reads_what_postcard_reads() {
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0x80],
            vec![0xff; 5],
            vec![0xff; 6],
            vec![0xff, 0xff, 0xff, 0xff, 0x0f],
            vec![0xff, 0xff, 0xff, 0xff, 0x10],
            vec![0x80, 0x80, 0x80, 0x80, 0x00, 7],
            vec![0x80, 0x00],
        ];
        for v in [
            0u32,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX / 2,
            u32::MAX,
        ] {
            let mut bytes = postcard::to_allocvec(&v).unwrap();
            bytes.extend_from_slice(&[1, 2, 3]);
            cases.push(bytes);
        }
        // Every one- and two-byte input, and three-byte ones ending high.
        for a in 0..=255u8 {
            cases.push(vec![a]);
            for b in 0..=255u8 {
                cases.push(vec![a, b]);
                cases.push(vec![a, b, 0x81]);
            }
        }
        for bytes in cases {
            let ours = take_u32(&bytes);
            let theirs = postcard::take_from_bytes::<u32>(&bytes).ok();
            assert_eq!(ours, theirs, "{bytes:02x?}");
        }
    }

    #[test]
    fn a_count_larger_than_the_frames_reserves_within_bounds() {
        // 2000 empty frames claimed and present: all skipped; the reservation
        // was capped by the input (2000 / MIN_EVENT_FRAME), not the count.
        let mut bytes = postcard::to_allocvec(&PROTOCOL_VERSION).unwrap();
        bytes.extend(postcard::to_allocvec(&("a", 1u64, 2u64, 2000u32)).unwrap());
        bytes.extend(std::iter::repeat_n(0u8, 2000));
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.skipped, 2000);
        assert!(decoded.envelope.events.capacity() <= MAX_RESERVED_EVENTS);
        assert!(decoded.envelope.events.capacity() <= 2000 / MIN_EVENT_FRAME);
    }
}
