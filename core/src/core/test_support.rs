//! Shared by the core's test modules: a start time and id constructors.

use guildhall_proto::{AgentId, Stage, TaskId};

/// The virtual clock's start in every core test.
pub const T0: u64 = 1_700_000_000_000;

/// A stage from a literal.
pub fn st(s: &str) -> Stage {
    s.parse().unwrap()
}

/// A task id from a literal.
pub fn tid(s: &str) -> TaskId {
    s.parse().unwrap()
}

/// An agent id from a literal.
pub fn aid(s: &str) -> AgentId {
    s.parse().unwrap()
}
