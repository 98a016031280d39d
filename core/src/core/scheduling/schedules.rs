//! Cron schedules and the ticks they fired.

use serde::{Deserialize, Serialize};

/// Cron schedules and the ticks they fired.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Schedules {}

use crate::core::Core;
use guildhall_proto::{AgentId, ScheduleChanged, ScheduleFired};

impl Core {
    /// Applies a coordinator's `ScheduleChanged`.
    pub(crate) fn apply_schedule_changed(
        &mut self,
        _now_ms: u64,
        _sender: &AgentId,
        _e: ScheduleChanged,
    ) {
    }

    /// Applies a coordinator's `ScheduleFired`.
    pub(crate) fn apply_schedule_fired(
        &mut self,
        _now_ms: u64,
        _sender: &AgentId,
        _e: ScheduleFired,
    ) {
    }
}
