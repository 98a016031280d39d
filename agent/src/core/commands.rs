//! What each command from the control exchange does to the core.
//!
//! | command | effect |
//! |---|---|
//! | `Pause` | stop consuming; tasks in hand finish |
//! | `Resume` | consume again |
//! | `Drain` | stop consuming, finish tasks in hand, stop the agent |
//! | `SetConcurrency` | new concurrency, 1 to 1024; the prefetch follows if it was below (consumer re-created; tasks in hand kept) |
//! | `SetPrefetch` | new prefetch, 1 to 10,000, in effect never below the concurrency (consumer re-created; tasks in hand kept) |
//! | `Assign` | serve another of the agent's stages: the stages are declared (by the driver, [`Step::Declare`]), then [`AgentCore::assign`] moves the command queue's stage binding, cancels the consumer (tasks in hand finish as tasks of their stage) and consumes the new stage |
//! | `RestartWorker`, `Logs` | the supervised worker's: the driver's ([`Step::Supervisor`]) |

use super::{Action, AgentCore, Mode};
use crate::config::{MAX_CONCURRENCY, MAX_PREFETCH, StageRoute};
use guildhall_proto::{Command, Event, Reassigned, Stage};

/// The verdict on one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether it was carried out.
    pub ok: bool,
    /// What happened.
    pub message: String,
    /// Log lines for `Logs`.
    pub lines: Vec<String>,
}

impl Verdict {
    /// Carried out.
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: message.into(),
            lines: Vec::new(),
        }
    }

    /// Refused.
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: message.into(),
            lines: Vec::new(),
        }
    }
}

/// What a command comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Done (or refused).
    Done(Verdict),
    /// An `Assign` the core accepts: the driver declares `route`'s stage
    /// and its next stage, then calls [`AgentCore::assign`] (or refuses if
    /// a declaration failed).
    Declare {
        /// The stage to serve.
        route: StageRoute,
        /// Why, truncated.
        reason: String,
    },
    /// A command about the supervised worker, for the driver.
    Supervisor,
}

impl AgentCore {
    /// Applies one command.
    pub fn handle_command(&mut self, now: u64, command: &Command) -> Step {
        let stopping = matches!(self.mode, Mode::Stopping { .. });
        let in_hand = self.tasks.len();
        Step::Done(match command {
            Command::Pause if stopping => Verdict::refused("the agent is stopping"),
            Command::Pause if self.mode == Mode::Paused => Verdict::ok("already paused"),
            Command::Pause => {
                self.mode = Mode::Paused;
                self.reconcile();
                Verdict::ok(format!("paused; {in_hand} task(s) in hand will finish"))
            }
            Command::Resume if stopping => Verdict::refused("the agent is stopping"),
            Command::Resume if self.mode == Mode::Running => Verdict::ok("already running"),
            Command::Resume => {
                self.mode = Mode::Running;
                self.reconcile();
                Verdict::ok("resumed")
            }
            Command::Drain => {
                self.handle_stop(now, "drain".into());
                Verdict::ok(format!(
                    "draining: stopping after {in_hand} task(s) in hand"
                ))
            }
            Command::SetConcurrency { concurrency } => {
                if !(1..=MAX_CONCURRENCY).contains(concurrency) {
                    Verdict::refused(format!(
                        "concurrency must be between 1 and {MAX_CONCURRENCY} (got {concurrency})"
                    ))
                } else {
                    let (old, old_prefetch) = (self.concurrency, self.prefetch());
                    self.concurrency = *concurrency;
                    let prefetch = self.prefetch();
                    if prefetch != old_prefetch {
                        self.restart_consumer();
                    }
                    self.actions.push_back(Action::Heartbeat);
                    Verdict::ok(format!(
                        "concurrency {old} -> {concurrency}{}",
                        prefetch_change(old_prefetch, prefetch)
                    ))
                }
            }
            Command::SetPrefetch { prefetch } => {
                if !(1..=MAX_PREFETCH).contains(prefetch) {
                    Verdict::refused(format!(
                        "prefetch must be between 1 and {MAX_PREFETCH} (got {prefetch})"
                    ))
                } else {
                    let old = self.prefetch();
                    self.prefetch_asked = *prefetch;
                    let new = self.prefetch();
                    if new != old {
                        self.restart_consumer();
                    }
                    let floor = if new > *prefetch {
                        format!(" ({prefetch} asked, never below the concurrency)")
                    } else {
                        String::new()
                    };
                    Verdict::ok(format!("prefetch {old} -> {new}{floor}"))
                }
            }
            Command::Assign { .. } if stopping => Verdict::refused("the agent is stopping"),
            Command::Assign { stage, .. } if *stage == self.route.stage => {
                Verdict::ok(format!("already serving {stage}"))
            }
            Command::Assign { stage, reason } => {
                match self.config.routes.iter().find(|r| r.stage == *stage) {
                    None => Verdict::refused(format!(
                        "this agent cannot serve stage {stage} (it serves {})",
                        self.config
                            .routes
                            .iter()
                            .map(|r| r.stage.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                    Some(_) if !self.link.up => Verdict::refused("the broker is unreachable"),
                    Some(to) => {
                        return Step::Declare {
                            route: to.clone(),
                            reason: guildhall_proto::truncate_error(reason.clone()),
                        };
                    }
                }
            }
            Command::RestartWorker | Command::Logs { .. } => return Step::Supervisor,
            Command::Cancel { task_ids, hold_ms } => self.handle_cancel(now, task_ids, *hold_ms),
            Command::SetRateLimit { limit } => self.handle_rate_limit(now, *limit),
        })
    }

    /// Moves the agent to `to` (its stages declared), one of the stages it
    /// can serve, without losing a task: moves the command queue's stage
    /// binding, cancels the current consumer (deliveries it held and had
    /// not handed out go back to the queue; tasks in hand carry on as tasks
    /// of their stage), then consumes `to`'s queue if the mode and the
    /// worker allow, emits `Reassigned` and a heartbeat.
    pub fn assign(&mut self, now: u64, to: StageRoute, reason: &str) -> Verdict {
        let in_hand = self.tasks.len();
        if matches!(self.mode, Mode::Stopping { .. }) {
            return Verdict::refused("the agent is stopping");
        }
        if !self.link.up {
            return Verdict::refused("the broker is unreachable");
        }
        let from: Stage = self.route.stage.clone();
        self.route = to.clone();
        self.actions.push_back(Action::Route(to.clone()));
        self.actions.push_back(Action::Rebind {
            from: from.clone(),
            to: to.stage.clone(),
        });
        if self.link.consuming {
            self.link.consuming = false;
            self.actions.push_back(Action::CancelConsume);
        }
        tracing::info!(
            from = %from,
            to = %to.stage,
            next = to.next.as_ref().map_or("-", |n| n.as_str()),
            %reason,
            in_hand,
            "serving another stage"
        );
        self.reconcile();
        self.actions
            .push_back(Action::Emit(Event::Reassigned(Reassigned {
                at_ms: now,
                from: from.clone(),
                to: to.stage.clone(),
                reason: reason.to_owned(),
            })));
        self.actions.push_back(Action::Heartbeat);
        Verdict::ok(format!(
            "serving {} (was {from}); {in_hand} task(s) in hand will finish as tasks of their stage",
            to.stage
        ))
    }
}

/// `, prefetch A -> B` when the prefetch changed, else nothing.
fn prefetch_change(old: u32, new: u32) -> String {
    if old == new {
        String::new()
    } else {
        format!(", prefetch {old} -> {new}")
    }
}
