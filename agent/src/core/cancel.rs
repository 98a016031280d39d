//! Cancelled tasks: the set of ids an agent holds for a bounded time (from
//! `Command::Cancel` on the control exchange), dropping a cancelled task
//! when it is delivered and stopping it when it runs.

use super::AgentCore;
use super::commands::Verdict;
use guildhall_proto::TaskId;

impl AgentCore {
    /// Applies `Command::Cancel`.
    pub fn handle_cancel(&mut self, _now: u64, _task_ids: &[TaskId], _hold_ms: u64) -> Verdict {
        Verdict::refused("this agent does not support cancel yet")
    }
}
