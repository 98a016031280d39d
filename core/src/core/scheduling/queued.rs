//! `TaskQueued` events: a task's priority and, while it waits in the delay
//! ladder, its due time.

use crate::core::Core;
use guildhall_proto::{AgentId, TaskQueued};

impl Core {
    /// Applies a `TaskQueued` event.
    pub(crate) fn apply_task_queued(&mut self, _now_ms: u64, _sender: &AgentId, _e: TaskQueued) {}
}
