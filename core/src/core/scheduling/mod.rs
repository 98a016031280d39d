//! When and in what order work runs (issue 18), as the coordinator sees it:
//! task priorities and due times, cancellations, cron schedules and
//! per-stage rate limits. Each feature keeps its state in a file of its
//! own; all of it is saved in the snapshot as one [`Scheduling`] value.
//!
//! # Layout
//!
//! - [`queued`]: `TaskQueued` events (priority, due time), what the stage
//!   views and the ETA need from them.
//! - [`cancels`]: cancel requests, and what agents reported.
//! - [`schedules`]: cron schedules and their ticks.
//! - [`rate_limits`]: stage rate limits and their split among live agents.
//!
//! Control-plane events (`TaskCancelRequested`, `ScheduleChanged`,
//! `ScheduleFired`, `RateLimitSet`) are applied only from a coordinator's
//! sender ([`guildhall_proto::names::is_coordinator_sender`]), checked by
//! `Core::sent_by_coordinator`: any other is counted as malformed and
//! dropped.

pub mod cancels;
pub mod queued;
pub mod rate_limits;
pub mod schedules;

use crate::core::Core;
use guildhall_proto::{AgentId, names};
use serde::{Deserialize, Serialize};

/// Every scheduling state the core keeps, saved in the snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Scheduling {
    /// Cancel requests (see [`cancels`]).
    pub cancels: cancels::Cancels,
    /// Cron schedules (see [`schedules`]).
    pub schedules: schedules::Schedules,
    /// Stage rate limits (see [`rate_limits`]).
    pub rate_limits: rate_limits::RateLimits,
}

impl Core {
    /// Whether a control-plane event from `sender` may be applied: only a
    /// coordinator's may. Any other is counted as malformed with `reason`
    /// and logged at debug (a forger must not flood the log); the caller
    /// counts it in its own state and drops the event.
    pub(crate) fn sent_by_coordinator(&mut self, sender: &AgentId, reason: &'static str) -> bool {
        if names::is_coordinator_sender(sender) {
            return true;
        }
        self.handle_malformed(reason);
        tracing::debug!(%sender, reason, "dropped a control-plane event from a sender that is not a coordinator");
        false
    }
}
