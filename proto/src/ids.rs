//! Validated identifiers: namespaces, stages, tasks and agents.
//!
//! Every identifier that reaches a broker name, a URL path or a metric label
//! passes through one of these types, so the rules live in one place. They
//! deserialize through the same validation, so a decoded event can never
//! carry a stage name that would be an illegal queue name.

use serde::{Deserialize, Serialize};
use std::fmt;

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

fn check(
    kind: &'static str,
    value: &str,
    max: usize,
    allowed: fn(char) -> bool,
    rule: &'static str,
) -> Result<(), InvalidId> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && value.chars().all(allowed);
    if ok {
        Ok(())
    } else {
        Err(InvalidId {
            kind,
            value: value.chars().take(80).collect(),
            rule,
        })
    }
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@')
}

macro_rules! validated_string {
    ($(#[$meta:meta])* $name:ident, $kind:literal, $max:expr, $allowed:expr, $rule:literal) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Longest accepted value, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidId> {
                let value = value.into();
                check($kind, &value, $max, $allowed, $rule)?;
                Ok(Self(value))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
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
                value.0
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
    name_char,
    "1-64 characters of A-Z a-z 0-9 _ -, starting with a letter or digit"
);

validated_string!(
    /// A pipeline stage, such as `build`. Becomes part of queue names and a metric label.
    Stage,
    "stage",
    64,
    name_char,
    "1-64 characters of A-Z a-z 0-9 _ -, starting with a letter or digit"
);

validated_string!(
    /// A task's id, kept through every stage: a user's own (`CODE-1234`) or a UUIDv7.
    TaskId,
    "task id",
    128,
    id_char,
    "1-128 characters of A-Z a-z 0-9 _ - . : @, starting with a letter or digit"
);

validated_string!(
    /// An agent's id; its AMQP connection is named `guildhall-agent/<id>`.
    AgentId,
    "agent id",
    128,
    id_char,
    "1-128 characters of A-Z a-z 0-9 _ - . : @, starting with a letter or digit"
);

impl Default for Namespace {
    fn default() -> Self {
        Namespace(crate::names::DEFAULT_NAMESPACE.to_owned())
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
