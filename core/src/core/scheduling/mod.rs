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
    /// The coordinator leading now, as the stream last said (issue 20): in
    /// the snapshot so that the next epoch is always higher.
    pub leader: Option<Leader>,
}

/// The leading coordinator, from its `LeaderElected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leader {
    /// Its sender id.
    pub id: AgentId,
    /// Its fencing epoch.
    pub epoch: u64,
    /// When it took the lead (its clock).
    pub since_ms: u64,
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

    /// A `LeaderElected`: `sender` leads from here on, unless its epoch is
    /// older than the leader's already read (a frozen leader that woke up
    /// and wrote before noticing it lost the lock: counted, ignored).
    pub(crate) fn apply_leader_elected(
        &mut self,
        sender: &AgentId,
        e: guildhall_proto::LeaderElected,
    ) {
        if !self.sent_by_coordinator(sender, "forged_control") {
            return;
        }
        if let Some(l) = self.scheduling.leader.clone()
            && e.epoch < l.epoch
        {
            self.handle_malformed("stale_leader");
            tracing::warn!(%sender, epoch = e.epoch, leader = %l.id, leader_epoch = l.epoch, "ignored a leader election older than the current leader's");
            return;
        }
        if self.caught_up {
            tracing::info!(%sender, epoch = e.epoch, "coordinator leading");
        }
        self.scheduling.leader = Some(Leader {
            id: sender.clone(),
            epoch: e.epoch,
            since_ms: e.at_ms,
        });
    }

    /// The leading coordinator, as the stream last said.
    pub fn leader(&self) -> Option<&Leader> {
        self.scheduling.leader.as_ref()
    }
}
