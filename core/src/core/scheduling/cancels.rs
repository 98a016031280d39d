//! Cancel requests the coordinator has recorded.

use serde::{Deserialize, Serialize};

/// Cancel requests the coordinator has recorded.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Cancels {}

use crate::core::Core;
use guildhall_proto::{AgentId, TaskCancelRequested, TaskCancelled};

impl Core {
    /// Applies a coordinator's `TaskCancelRequested`.
    pub(crate) fn apply_cancel_requested(
        &mut self,
        _now_ms: u64,
        _sender: &AgentId,
        _e: TaskCancelRequested,
    ) {
    }

    /// Applies an agent's `TaskCancelled`.
    pub(crate) fn apply_task_cancelled(
        &mut self,
        _now_ms: u64,
        _sender: &AgentId,
        _e: TaskCancelled,
    ) {
    }
}
