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
//! sender ([`guildhall_proto::names::is_coordinator_sender`]).

pub mod cancels;
pub mod queued;
pub mod rate_limits;
pub mod schedules;

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
