//! Declarations made lazily while tasks flow: next stages a worker names and
//! retry queues for each delay. Each is declared once per connection and
//! remembered (a new connection gets a new, empty [`Declarer`]: the broker
//! may have lost its queues, a restart of it being one reason to reconnect). Declarations run on a short-lived channel of their own, so a
//! refused one (arguments that differ from an existing queue's) closes only
//! that channel.
//!
//! # Which next stage a worker may name
//!
//! A worker may send its result to another stage than the default
//! (`x-guildhall-next-stage`). Declaring whatever it names would let one
//! typo (or one hostile answer) create a queue nobody consumes, where the
//! task would sit for ever. So ([`NextStages`]):
//!
//! | the stage named | what happens |
//! |---|---|
//! | one of the agent's own stages, or where one of them sends results (`--stage`, `--next`, `--stages`) | declared if missing, as at start |
//! | any other stage whose queue exists (the coordinator's submit, another agent or the operator declared it) | used |
//! | any other stage | the task fails permanently at its current stage with class `unknown_stage` (dead-lettered) |
//! | anything, with `--allow-new-stages` | declared if missing |
//!
//! A fan-out's children's stages and its join stage (issue 19) follow the
//! same rule, the agent's `--join` counting as one of its own stages; a
//! missing one dead-letters the parent with class `invalid_fan_out`.

use crate::config::StageRoute;
use guildhall_broker::BrokerError;
use guildhall_broker::topology::{declare_retry_queue, declare_stage, probe_queue};
use guildhall_proto::{Names, Stage};
use lapin::Connection;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// What to do with a next stage a worker named ([`NextStages::rule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStageRule {
    /// Declare it if missing (one of the agent's own, or new stages allowed).
    Declare,
    /// Use it only if its queue exists already.
    MustExist,
}

/// The next stages an agent declares on its own: those of its configuration
/// (see the module docs).
#[derive(Debug, Clone)]
pub struct NextStages {
    /// Every stage the agent can serve and every stage they send results to.
    configured: HashSet<Stage>,
    /// `--allow-new-stages`: declare any stage a worker names.
    allow_new: bool,
}

impl NextStages {
    /// The rule for an agent serving `routes`.
    pub fn new(routes: &[StageRoute], allow_new: bool) -> Self {
        let configured = routes
            .iter()
            .flat_map(|r| std::iter::once(&r.stage).chain(r.next.as_ref()))
            .cloned()
            .collect();
        Self {
            configured,
            allow_new,
        }
    }

    /// The same rule, with the agent's `--join` stage (issue 19) among its
    /// own: a fan-out's join stage and children's stages follow the rule of
    /// next stages.
    pub fn with_join(mut self, join: Option<&Stage>) -> Self {
        self.configured.extend(join.cloned());
        self
    }

    /// What to do with `stage`, named by a worker as the next stage.
    pub fn rule(&self, stage: &Stage) -> NextStageRule {
        if self.allow_new || self.configured.contains(stage) {
            NextStageRule::Declare
        } else {
            NextStageRule::MustExist
        }
    }
}

/// Declares stages and retry queues at most once each.
#[derive(Debug)]
pub struct Declarer {
    /// The agent's connection, for short-lived channels.
    conn: Arc<Connection>,
    /// Names of the namespace.
    names: Names,
    /// Queue names known to be declared.
    done: Mutex<HashSet<String>>,
}

impl Declarer {
    /// A declarer that already knows `declared` (the stages declared at start).
    pub fn new(conn: Arc<Connection>, names: Names, declared: &[&Stage]) -> Self {
        let done = declared.iter().map(|s| names.stage_queue(s)).collect();
        Self {
            conn,
            names,
            done: Mutex::new(done),
        }
    }

    fn known(&self, queue: &str) -> bool {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(queue)
    }

    fn remember(&self, queue: String) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(queue);
    }

    /// Forgets that `stage` was declared (its queue turned out to be gone),
    /// so the next use declares it again.
    pub fn forget_stage(&self, stage: &Stage) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.names.stage_queue(stage));
    }

    /// Makes sure `stage`'s queue (and dead-letter queue) exist.
    pub async fn stage(&self, stage: &Stage) -> Result<(), BrokerError> {
        let queue = self.names.stage_queue(stage);
        if self.known(&queue) {
            return Ok(());
        }
        declare_stage(&self.conn, &self.names, stage).await?;
        self.remember(queue);
        Ok(())
    }

    /// Whether `stage`'s queue exists (asked of the broker with a passive
    /// declare, on a channel of its own: the broker closes it for a missing
    /// queue). A stage found is remembered like a declared one.
    pub async fn exists(&self, stage: &Stage) -> Result<bool, BrokerError> {
        let queue = self.names.stage_queue(stage);
        if self.known(&queue) {
            return Ok(true);
        }
        let found = probe_queue(&self.conn, &queue).await?.is_some();
        if found {
            self.remember(queue);
        }
        Ok(found)
    }

    /// Makes sure the delay ladder exists (declared once per link).
    pub async fn ladder(&self) -> Result<(), BrokerError> {
        let entry = self.names.delay_entry();
        if self.known(&entry) {
            return Ok(());
        }
        guildhall_broker::topology::declare_delay_ladder(&self.conn, &self.names).await?;
        self.remember(entry);
        Ok(())
    }

    /// Makes sure the stream of stored flow results exists (declared once
    /// per link, with the default retention if this agent creates it).
    pub async fn results_stream(&self) -> Result<(), BrokerError> {
        let stream = self.names.results_stream();
        if self.known(&stream) {
            return Ok(());
        }
        guildhall_broker::topology::ensure_results_stream(
            &self.conn,
            &self.names,
            &guildhall_broker::topology::StreamRetention::default(),
        )
        .await?;
        self.remember(stream);
        Ok(())
    }

    /// Forgets that the delay ladder was declared (a move into it was
    /// refused), so the next use declares it again.
    pub fn forget_ladder(&self) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.names.delay_entry());
    }

    /// Makes sure the retry queue of `stage` for `delay_ms` exists; returns its name.
    pub async fn retry_queue(&self, stage: &Stage, delay_ms: u64) -> Result<String, BrokerError> {
        let queue = self.names.retry_queue(stage, delay_ms);
        if self.known(&queue) {
            return Ok(queue);
        }
        let queue = declare_retry_queue(&self.conn, &self.names, stage, delay_ms).await?;
        self.remember(queue.clone());
        Ok(queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(s: &str) -> Stage {
        s.parse().unwrap()
    }

    #[test]
    fn own_stages_and_their_next_stages_are_declared_others_must_exist() {
        let routes = crate::config::parse_stages("build>report,report,fix>deploy").unwrap();
        let rule = NextStages::new(&routes, false);
        for own in ["build", "report", "fix", "deploy"] {
            assert_eq!(rule.rule(&stage(own)), NextStageRule::Declare, "{own}");
        }
        for other in ["nosuchstage", "Build", "reports"] {
            assert_eq!(
                rule.rule(&stage(other)),
                NextStageRule::MustExist,
                "{other}"
            );
        }
        let open = NextStages::new(&routes, true);
        assert_eq!(open.rule(&stage("nosuchstage")), NextStageRule::Declare);
    }
}
