//! Flows (issue 19): tasks that wait for other tasks (dependencies), and
//! tasks whose worker produced several child tasks (fan-out) that a join
//! stage takes back (fan-in). The types and limits every party shares;
//! where the state lives is in ARCHITECTURE.md ("Flows").
//!
//! - A **dependent** task is held until every task it runs `after` has
//!   finished. It is written to the events stream as a [`TaskHeld`]
//!   (payload included) by whoever accepted it (the coordinator's API, or
//!   the agent that sorted a message carrying `x-guildhall-after`), and
//!   published to its stage by the coordinator when its last dependency
//!   finished ([`TaskReleased`]).
//! - A **fan-out**: a worker's success lists children, one per line; the
//!   agent publishes them (`<parent>:<n>`, confirmed) and reports
//!   [`TaskFannedOut`]. A child's last stage reports its result
//!   ([`TaskResult`]): inline up to [`MAX_INLINE_RESULT`], else stored in
//!   the `<ns>.results` stream first (confirmed) and referred to by its
//!   SHA-256. When every child has finished, the coordinator publishes the
//!   parent to its join stage with the results (or the references) as
//!   payload.
//!
//! [`TaskHeld`]: crate::TaskHeld
//! [`TaskReleased`]: crate::TaskReleased
//! [`TaskFannedOut`]: crate::TaskFannedOut
//! [`TaskResult`]: crate::TaskResult

use crate::ids::{InvalidId, TaskId};
use serde::{Deserialize, Serialize};

/// Most dependencies one task may have.
pub const MAX_AFTER: usize = 64;

/// Largest payload of a held task (it is written into the events stream).
pub const MAX_HELD_PAYLOAD: usize = 256 * 1024;

/// Most children one fan-out may have (an agent may be configured lower).
pub const MAX_CHILDREN: u32 = 10_000;

/// Largest child result carried to its join inline; a larger one is stored
/// in the `<ns>.results` stream and the join's entry refers to it
/// (`result_ref`: the stream, the child's id, the SHA-256, a URL of the
/// coordinator's API that returns it).
pub const MAX_INLINE_RESULT: usize = 64 * 1024;

/// Largest join payload: inline results that would take it past this limit
/// (in child order, those that no longer fit) are left out and marked
/// `result_omitted`, with their size.
pub const MAX_JOIN_PAYLOAD: usize = 16 * 1024 * 1024;

/// Lower-case hex of a stored result's SHA-256, as references show it.
pub fn digest_hex(digest: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

/// A SHA-256 from 64 hex digits (either case); `None` for anything else.
pub fn parse_digest_hex(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// The coordinator API's URL of a stored result (`GET /api/results/{id}`);
/// task ids need no escaping in a path (letters, digits and `_-.:@`).
pub fn result_url(child: &TaskId, digest: &[u8; 32]) -> String {
    format!("/api/results/{child}?sha256={}", digest_hex(digest))
}

/// What a dependent task does when a task it waits for is dead-lettered or
/// cancelled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DependencyPolicy {
    /// It fails too: dead-lettered at its stage with the reason.
    #[default]
    Fail,
    /// It runs anyway once every dependency has finished, however.
    Run,
}

impl DependencyPolicy {
    /// The name in the API, the CLI and the `x-guildhall-on-dependency-failure` header.
    pub fn as_str(self) -> &'static str {
        match self {
            DependencyPolicy::Fail => "fail",
            DependencyPolicy::Run => "run",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s names.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "fail" => Some(DependencyPolicy::Fail),
            "run" => Some(DependencyPolicy::Run),
            _ => None,
        }
    }
}

/// What a join does when one of its children ends dead-lettered or
/// cancelled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChildPolicy {
    /// The parent fails: dead-lettered at its join stage, the partial
    /// results as the dead letter's payload.
    #[default]
    Fail,
    /// The join runs with the results there are; failed children are
    /// marked in its payload.
    Continue,
}

impl ChildPolicy {
    /// The name in the `x-guildhall-on-child-failure` header and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ChildPolicy::Fail => "fail",
            ChildPolicy::Continue => "continue",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s names.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "fail" => Some(ChildPolicy::Fail),
            "continue" => Some(ChildPolicy::Continue),
            _ => None,
        }
    }
}

/// Why the coordinator held a task back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HoldReason {
    /// It waits for its dependencies (`after`).
    Dependency,
    /// It waits for its children, to continue at its join stage.
    Join,
}

impl HoldReason {
    /// Both reasons, for metric labels that exist from the start.
    pub const ALL: [HoldReason; 2] = [HoldReason::Dependency, HoldReason::Join];

    /// Lower-case name used in the API and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldReason::Dependency => "dependency",
            HoldReason::Join => "join",
        }
    }
}

/// The id of child `index` of `parent`: `<parent>:<index>`. Fails when the
/// parent's id is too long to have children (ids are at most 128 bytes).
pub fn child_id(parent: &TaskId, index: u32) -> Result<TaskId, InvalidId> {
    TaskId::new(format!("{parent}:{index}"))
}

/// The parent and index a child id names, if it has the shape of one
/// (`<parent>:<n>`, `n` a decimal number without leading zeros). Whether it
/// is a child is for whoever knows the parent's fan-out to say.
pub fn split_child_id(id: &str) -> Option<(&str, u32)> {
    let (parent, n) = id.rsplit_once(':')?;
    if parent.is_empty() || n.is_empty() || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    if !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((parent, n.parse().ok()?))
}

/// Why an `after` list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AfterError {
    /// An entry is not a valid task id.
    #[error("dependency {0}")]
    Id(#[from] InvalidId),
    /// More than [`MAX_AFTER`] entries.
    #[error("more than {MAX_AFTER} dependencies")]
    TooMany,
    /// An empty list (a header or field that names nothing).
    #[error("no dependency named")]
    Empty,
}

/// Parses the `x-guildhall-after` header's text: task ids separated by
/// commas (spaces around them ignored). Duplicates are kept once, in first
/// order.
pub fn parse_after(text: &str) -> Result<Vec<TaskId>, AfterError> {
    after_list(text.split(','))
}

/// Validates a list of dependency ids (from the API, the CLI or a header):
/// each a task id, at most [`MAX_AFTER`], at least one; duplicates kept
/// once, in first order.
pub fn after_list<'a>(ids: impl IntoIterator<Item = &'a str>) -> Result<Vec<TaskId>, AfterError> {
    let mut out: Vec<TaskId> = Vec::new();
    for id in ids {
        let id = TaskId::new(id.trim())?;
        if !out.contains(&id) {
            if out.len() == MAX_AFTER {
                return Err(AfterError::TooMany);
            }
            out.push(id);
        }
    }
    if out.is_empty() {
        return Err(AfterError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {

    #[test]
    fn digests_are_written_and_read_as_64_hex_digits() {
        let mut d = [0u8; 32];
        d[0] = 0x0a;
        d[31] = 0xf1;
        let hex = digest_hex(&d);
        assert_eq!(hex.len(), 64);
        assert!(hex.starts_with("0a") && hex.ends_with("f1"));
        assert_eq!(parse_digest_hex(&hex), Some(d));
        assert_eq!(parse_digest_hex(&hex.to_uppercase()), Some(d));
        for bad in [
            "",
            "0a",
            &"g0".repeat(32),
            &"0".repeat(65),
            &"+1".repeat(32),
            &"é".repeat(32),
            &"0".repeat(63),
        ] {
            assert_eq!(parse_digest_hex(bad), None, "{bad}");
        }
        let child = TaskId::new("P:3").unwrap();
        assert_eq!(
            result_url(&child, &d),
            format!("/api/results/P:3?sha256={hex}")
        );
    }

    use super::*;

    #[test]
    fn child_ids_are_the_parent_and_the_index() {
        let p = TaskId::new("CODE-1").unwrap();
        let c = child_id(&p, 7).unwrap();
        assert_eq!(c.as_str(), "CODE-1:7");
        assert_eq!(split_child_id(c.as_str()), Some(("CODE-1", 7)));
        let gc = child_id(&c, 0).unwrap();
        assert_eq!(split_child_id(gc.as_str()), Some(("CODE-1:7", 0)));
        assert!(child_id(&TaskId::new("a".repeat(128)).unwrap(), 1).is_err());
    }

    #[test]
    fn ids_that_are_not_children_are_not_split() {
        for id in [
            "CODE-1",
            "a:",
            ":1",
            "a:01",
            "a:1x",
            "a:-1",
            "a:99999999999",
        ] {
            assert_eq!(split_child_id(id), None, "{id}");
        }
    }

    #[test]
    fn after_lists_are_validated() {
        let ids = parse_after(" A-1, B-2 ,A-1").unwrap();
        assert_eq!(ids.len(), 2);
        assert!(matches!(parse_after(""), Err(AfterError::Id(_))));
        assert!(matches!(parse_after("a b"), Err(AfterError::Id(_))));
        assert!(matches!(after_list([]), Err(AfterError::Empty)));
        let many: Vec<String> = (0..=MAX_AFTER).map(|i| format!("t{i}")).collect();
        assert!(matches!(
            after_list(many.iter().map(String::as_str)),
            Err(AfterError::TooMany)
        ));
    }

    #[test]
    fn policies_round_trip_their_names() {
        for p in [DependencyPolicy::Fail, DependencyPolicy::Run] {
            assert_eq!(DependencyPolicy::parse(p.as_str()), Some(p));
        }
        for p in [ChildPolicy::Fail, ChildPolicy::Continue] {
            assert_eq!(ChildPolicy::parse(p.as_str()), Some(p));
        }
        assert_eq!(DependencyPolicy::parse("maybe"), None);
    }
}
