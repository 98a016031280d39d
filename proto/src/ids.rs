//! Validated identifiers: namespaces, stages, tasks and agents.
//!
//! Every identifier that reaches a broker name, a URL path or a metric label
//! passes through one of these types, so the rules live in one place. They
//! deserialize through the same validation, so a decoded event can never
//! carry a stage name that would be an illegal queue name.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// Why a string was refused as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {rule}")]
pub struct InvalidId {
    /// Which identifier was being parsed ("stage", "task id", ...).
    pub kind: &'static str,
    /// The refused value, truncated to 80 characters for log lines.
    pub value: String,
    /// The rule it broke, in words a user can act on.
    pub rule: &'static str,
}

/// Which characters an identifier kind allows after its first, which is
/// always an ASCII letter or digit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Chars {
    /// [`Namespace`], [`Stage`]: A-Z a-z 0-9 _ -.
    Name,
    /// [`TaskId`], [`AgentId`]: A-Z a-z 0-9 _ - . : @.
    Id,
}

/// Whether `b` is an ASCII letter or digit. No byte of a multi-byte UTF-8
/// character passes (they are all >= 0x80), nor does any test below.
#[inline(always)]
const fn is_alnum(b: u8) -> bool {
    // `| 0x20` folds A-Z onto a-z and maps nothing else into a-z.
    (b | 0x20).wrapping_sub(b'a') < 26 || b.wrapping_sub(b'0') < 10
}

/// Whether byte `b` may appear in an identifier of kind `chars`. Written
/// without branches so that checking a whole value compiles to SIMD.
#[inline(always)]
const fn allowed(b: u8, chars: Chars) -> bool {
    let name = is_alnum(b) | (b == b'_') | (b == b'-');
    let id = (b == b'.') | (b == b':') | (b == b'@');
    name | (id & matches!(chars, Chars::Id))
}

/// [`allowed`] for every byte, for checking the few bytes left over after
/// the 16-byte blocks, where a lookup is cheaper than the arithmetic.
const fn table(chars: Chars) -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = allowed(b as u8, chars);
        b += 1;
    }
    t
}

static NAME_TABLE: [bool; 256] = table(Chars::Name);
static ID_TABLE: [bool; 256] = table(Chars::Id);

/// Whether `value` is 1 to `max` bytes allowed by `chars`, starting with an
/// ASCII letter or digit. Only ASCII bytes are ever allowed, so a value that
/// passes is ASCII (hence UTF-8 with one char per byte): checking bytes
/// accepts exactly what checking chars would.
#[inline(always)]
fn is_valid(value: &[u8], max: usize, chars: Chars) -> bool {
    let Some((&first, rest)) = value.split_first() else {
        return false;
    };
    if value.len() > max || !is_alnum(first) {
        return false;
    }
    // No early exit inside a block: a fold over 16 bytes compiles to SIMD.
    let mut blocks = rest.chunks_exact(16);
    let mut ok = true;
    for block in &mut blocks {
        ok &= block.iter().fold(true, |ok, &b| ok & allowed(b, chars));
    }
    let table = match chars {
        Chars::Name => &NAME_TABLE,
        Chars::Id => &ID_TABLE,
    };
    ok & blocks
        .remainder()
        .iter()
        .fold(true, |ok, &b| ok & table[b as usize])
}

#[inline(always)]
fn check(
    kind: &'static str,
    value: &str,
    max: usize,
    chars: Chars,
    rule: &'static str,
) -> Result<(), InvalidId> {
    if is_valid(value.as_bytes(), max, chars) {
        Ok(())
    } else {
        Err(refused(kind, value, rule))
    }
}

#[cold]
#[inline(never)]
fn refused(kind: &'static str, value: &str, rule: &'static str) -> InvalidId {
    InvalidId {
        kind,
        value: value.chars().take(80).collect(),
        rule,
    }
}

/// Deserializes an identifier from any string the format offers, borrowed,
/// transient or owned, validating it before copying it (once) into its
/// shared string.
/// Accepts and refuses exactly what `String` followed by `TryFrom<String>`
/// would, with the same errors.
struct IdVisitor<T>(std::marker::PhantomData<T>);

/// An identifier type built by [`validated_string!`].
trait ValidatedString: Sized {
    /// Validates `value` without taking it.
    fn check_str(value: &str) -> Result<(), InvalidId>;
    /// Wraps an already validated value.
    fn wrap_checked(value: &str) -> Self;
    /// Validates and wraps a value read from the wire.
    #[inline]
    fn from_wire(value: &str) -> Result<Self, InvalidId> {
        Self::check_str(value)?;
        Ok(Self::wrap_checked(value))
    }
}

/// How many names [`Recent`] keeps.
const RECENT: usize = 8;

/// The last few distinct names of one kind decoded on a thread. Events
/// name few stages, over and over: a name read lately is cloned from here
/// (a reference count), not validated and copied again.
struct Recent {
    /// The names, validated when they came in.
    names: [Option<Arc<str>>; RECENT],
    /// The entry the next new name replaces.
    next: usize,
}

impl Recent {
    const fn new() -> Self {
        Self {
            names: [const { None }; RECENT],
            next: 0,
        }
    }

    /// `value` as one of the names kept, if it is one.
    fn get(&self, value: &str) -> Option<Arc<str>> {
        self.names
            .iter()
            .flatten()
            .find(|name| name.len() == value.len() && ***name == *value)
            .cloned()
    }

    /// Keeps `name`, validated, in place of the oldest.
    fn put(&mut self, name: &Arc<str>) {
        self.names[self.next] = Some(name.clone());
        self.next = (self.next + 1) % RECENT;
    }
}

thread_local! {
    /// Stage names decoded lately on this thread.
    static RECENT_STAGES: std::cell::RefCell<Recent> = const { std::cell::RefCell::new(Recent::new()) };
}

impl<'de, T: ValidatedString> serde::de::Visitor<'de> for IdVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        T::from_wire(v).map_err(E::custom)
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<T, E> {
        T::check_str(&v).map_err(E::custom)?;
        Ok(T::wrap_checked(&v))
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<T, E> {
        match std::str::from_utf8(v) {
            Ok(s) => self.visit_str(s),
            Err(_) => Err(E::invalid_value(serde::de::Unexpected::Bytes(v), &self)),
        }
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<T, E> {
        match String::from_utf8(v) {
            Ok(s) => self.visit_str(&s),
            Err(e) => Err(E::invalid_value(
                serde::de::Unexpected::Bytes(&e.into_bytes()),
                &self,
            )),
        }
    }
}

macro_rules! validated_string {
    ($(#[$meta:meta])* $name:ident, $kind:literal, $max:expr, $allowed:expr, $rule:literal $(, recent: $recent:ident)?) => {
        $(#[$meta])*
        ///
        /// The text is shared (`Arc<str>`): a clone is a reference count, so
        /// the coordinator's many copies of one id (a map key, a record, a
        /// row per stage attempt) cost one allocation between them.
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Longest accepted value, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidId> {
                let value = value.into();
                check($kind, &value, $max, $allowed, $rule)?;
                Ok(Self(Arc::from(value)))
            }

            /// Whether `other` is a clone of this very value (one allocation
            /// between them), not merely equal.
            pub fn shares_text_with(&self, other: &Self) -> bool {
                Arc::ptr_eq(&self.0, &other.0)
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl ValidatedString for $name {
            #[inline]
            fn check_str(value: &str) -> Result<(), InvalidId> {
                check($kind, value, $max, $allowed, $rule)
            }

            #[inline]
            fn wrap_checked(value: &str) -> Self {
                Self(Arc::from(value))
            }

            $(
            /// A name decoded lately on this thread is shared, not copied.
            fn from_wire(value: &str) -> Result<Self, InvalidId> {
                $recent.with(|recent| {
                    if let Ok(recent) = recent.try_borrow()
                        && let Some(name) = recent.get(value)
                    {
                        return Ok(Self(name));
                    }
                    Self::check_str(value)?;
                    let name: Arc<str> = Arc::from(value);
                    if let Ok(mut recent) = recent.try_borrow_mut() {
                        recent.put(&name);
                    }
                    Ok(Self(name))
                })
            }
            )?
        }

        /// Written as a plain string, without the copy `into = "String"` made.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        /// Read through the same validation as [`new`](Self::new), copying
        /// the string once (see [`IdVisitor`]).
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_string(IdVisitor::<Self>(std::marker::PhantomData))
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(value: String) -> Result<Self, InvalidId> {
                Self::new(value)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(value: &str) -> Result<Self, InvalidId> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                String::from(&*value.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
    };
}

validated_string!(
    /// A deployment's namespace: the prefix of every broker name (`<ns>.tasks`, ...).
    Namespace,
    "namespace",
    64,
    Chars::Name,
    "1-64 characters of A-Z a-z 0-9 _ -, starting with a letter or digit"
);

validated_string!(
    /// A pipeline stage, such as `build`. Becomes part of queue names and a metric label.
    Stage,
    "stage",
    64,
    Chars::Name,
    "1-64 characters of A-Z a-z 0-9 _ -, starting with a letter or digit",
    recent: RECENT_STAGES
);

validated_string!(
    /// A task's id, kept through every stage: a user's own (`CODE-1234`) or a UUIDv7.
    TaskId,
    "task id",
    128,
    Chars::Id,
    "1-128 characters of A-Z a-z 0-9 _ - . : @, starting with a letter or digit"
);

validated_string!(
    /// An agent's id; its AMQP connection is named `guildhall-agent/<namespace>/<id>`.
    AgentId,
    "agent id",
    128,
    Chars::Id,
    "1-128 characters of A-Z a-z 0-9 _ - . : @, starting with a letter or digit"
);

impl Default for Namespace {
    fn default() -> Self {
        Namespace(Arc::from(crate::names::DEFAULT_NAMESPACE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_reasonable_names() {
        for ok in ["build", "task_worker", "pm-worker", "A1"] {
            assert!(Stage::new(ok).is_ok(), "{ok}");
        }
        for ok in [
            "CODE-1234",
            "0190b2c4-7d1e-7c3a-9b8f-1234567890ab",
            "a.b:c@d",
        ] {
            assert!(TaskId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_names_that_would_break_brokers_urls_or_labels() {
        for bad in ["", "-x", "a.b", "a b", "a/b", "é", "#", "*"] {
            assert!(Stage::new(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "a/b", "a b", "a?b", "<script>", ".x"] {
            assert!(TaskId::new(bad).is_err(), "{bad:?}");
        }
        assert!(Stage::new("s".repeat(65)).is_err());
        assert!(TaskId::new("t".repeat(128)).is_ok());
        assert!(TaskId::new("t".repeat(129)).is_err());
    }

    #[test]
    fn error_names_the_rule_and_truncates_the_value() {
        let err = Stage::new(format!("bad stage{}", "x".repeat(200))).unwrap_err();
        assert_eq!(err.kind, "stage");
        assert_eq!(err.value.chars().count(), 80);
        assert!(err.to_string().contains("starting with a letter or digit"));
    }

    #[test]
    fn stages_decoded_lately_share_their_text_and_are_still_validated() {
        let wire = |s: &str| postcard::to_allocvec(&s.to_string()).unwrap();
        let decode = |s: &str| postcard::from_bytes::<Stage>(&wire(s));
        let first = decode("build").unwrap();
        let again = decode("build").unwrap();
        assert!(again.shares_text_with(&first), "a recent name is shared");
        assert!(!decode("build2").unwrap().shares_text_with(&first));
        // What was refused stays refused, even next to a known name.
        assert!(decode("build ").is_err());
        assert!(decode("").is_err());
        // Only the last few names are kept: the memory is bounded.
        for i in 0..RECENT {
            decode(&format!("other{i}")).unwrap();
        }
        assert!(!decode("build").unwrap().shares_text_with(&first));
        // Other id kinds are copied as before (task ids rarely repeat).
        let t = postcard::from_bytes::<TaskId>(&wire("t-1")).unwrap();
        let u = postcard::from_bytes::<TaskId>(&wire("t-1")).unwrap();
        assert!(!t.shares_text_with(&u));
    }

    #[test]
    fn deserializing_validates() {
        let bytes = postcard::to_allocvec(&"a b".to_string()).unwrap();
        assert!(postcard::from_bytes::<Stage>(&bytes).is_err());
        let bytes = postcard::to_allocvec(&"ab".to_string()).unwrap();
        assert_eq!(
            postcard::from_bytes::<Stage>(&bytes).unwrap().as_str(),
            "ab"
        );
    }
}
