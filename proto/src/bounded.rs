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
