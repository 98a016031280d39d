//! Deserialization helpers that never allocate ahead of the input.
//!
//! serde's default `Vec` visitor pre-allocates from the length prefix (up to
//! 1 MiB), so ten hostile bytes could make a reader reserve a megabyte. These
//! helpers grow a `Vec` only as elements are actually decoded; every element
//! consumes at least one input byte, so memory stays proportional to input.

use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};
use std::fmt;
use std::marker::PhantomData;

/// `#[serde(deserialize_with = "crate::bounded::vec")]` for `Vec<T>` fields.
pub fn vec<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct BoundedVec<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for BoundedVec<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a sequence")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element()? {
                out.push(item);
            }
            Ok(out)
        }
    }

    deserializer.deserialize_seq(BoundedVec(PhantomData))
}

/// Longest name-like text read off the wire: hostnames, versions, error
/// classes, reasons given as labels. Longer text is cut at decode.
pub const MAX_NAME_BYTES: usize = 255;

/// Longest free text read off the wire (error messages, reasons, worker
/// URLs and commands, progress messages): [`crate::MAX_ERROR_LEN`].
pub const MAX_TEXT_BYTES: usize = crate::MAX_ERROR_LEN;

/// Most entries of a list that grows with a worker's work (its tasks in
/// hand, the stages it can serve) a reader keeps; the rest are read and
/// dropped. Concurrency is at most 1024 and stages at most 256.
pub const MAX_LIST_LEN: usize = 1024;

/// Cuts `s` to at most `max` bytes, on a character boundary.
pub fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A string cut to `N` bytes as it is decoded: only the kept part is copied.
struct CutString<const N: usize>;

impl<'de, const N: usize> Visitor<'de> for CutString<N> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        let mut end = v.len().min(N);
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        Ok(v[..end].to_owned())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
        Ok(cut(v, N))
    }
}

/// `#[serde(deserialize_with = "crate::bounded::name")]`: a `String` cut to
/// [`MAX_NAME_BYTES`].
pub fn name<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    deserializer.deserialize_str(CutString::<MAX_NAME_BYTES>)
}

/// `#[serde(deserialize_with = "crate::bounded::text")]`: a `String` cut to
/// [`MAX_TEXT_BYTES`].
pub fn text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    deserializer.deserialize_str(CutString::<MAX_TEXT_BYTES>)
}

/// `#[serde(deserialize_with = "crate::bounded::opt_text")]`: an
/// `Option<String>` cut to [`MAX_TEXT_BYTES`].
pub fn opt_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    #[derive(serde::Deserialize)]
    struct Text(#[serde(deserialize_with = "text")] String);
    Ok(Option::<Text>::deserialize(deserializer)?.map(|Text(s)| s))
}

/// `#[serde(deserialize_with = "crate::bounded::short_vec")]`: like [`vec`],
/// and keeps at most [`MAX_LIST_LEN`] elements (the rest are decoded and
/// dropped, so the input is still read to its end).
pub fn short_vec<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct ShortVec<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for ShortVec<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a sequence")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element::<T>()? {
                if out.len() < MAX_LIST_LEN {
                    out.push(item);
                }
            }
            Ok(out)
        }
    }

    deserializer.deserialize_seq(ShortVec(PhantomData))
}
