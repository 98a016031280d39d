//! Broker names, all derived from one namespace so that several deployments
//! (and parallel tests) share one broker without touching each other.
//!
//! | what | name | kind |
//! |---|---|---|
//! | task exchange | `<ns>.tasks` | direct, routing key = stage (its intake) or `<stage>.p<lo>-<hi>` (a band) |
//! | stage intake queue | `<ns>.stage.<stage>` | quorum; what producers publish to (key `<stage>`); agents sort it into the bands |
//! | stage band queue | `<ns>.stage.<stage>.p<lo>-<hi>` | quorum, one per priority band (key `<stage>.p<lo>-<hi>`) |
//! | delay ladder level | `<ns>.delay.<n>` | topic exchange + quorum queue with TTL `2^n` s, n = 0..22 |
//! | delay delivery | `<ns>.delay.deliver` | topic, bound to every band queue with `#.<stage>.p<lo>-<hi>` |
//! | retry queue | `<ns>.retry.<stage>.<delay_ms>` | quorum, for retry delays under a second; TTL dead-letters back to `<ns>.tasks` |
//! | dead-letter exchange | `<ns>.dead` | direct, routing key = stage |
//! | dead-letter queue | `<ns>.dead.<stage>` | quorum |
//! | events | `<ns>.events` | stream |
//! | stored results | `<ns>.results` | stream; a fan-out child's result over the inline limit (message id = the child's id) |
//! | control exchange | `<ns>.control` | topic |
//! | coordinators' lock | `<ns>.coordinator.lock` | classic, exclusive, auto-delete: held by the leading coordinator's connection (issue 20) |
//! | an agent's command queue | `<ns>.agent.<agent id>` | classic, exclusive |
//! | an agent's AMQP connection | `guildhall-agent/<ns>/<agent id>` | connection name |

use crate::ids::{AgentId, Namespace, Stage};
use crate::schedule::{Band, DELAY_LEVELS};

/// The namespace used when none is given.
pub const DEFAULT_NAMESPACE: &str = "guildhall";

/// Prefix of every agent's AMQP connection name.
pub const AGENT_CONNECTION_PREFIX: &str = "guildhall-agent/";

/// Prefix of a coordinator's sender id on the events stream
/// (`coordinator-<random>`). Control-plane events (cancel requests,
/// schedules, rate limits) are applied only from such a sender; with
/// `--require-user-id` its broker user must also be the coordinator's own or
/// a trusted one.
pub const COORDINATOR_SENDER_PREFIX: &str = "coordinator-";

/// Whether `sender` names a coordinator (see [`COORDINATOR_SENDER_PREFIX`]).
pub fn is_coordinator_sender(sender: &AgentId) -> bool {
    sender.as_str().starts_with(COORDINATOR_SENDER_PREFIX)
}

/// Routing key that reaches every agent on the control exchange.
pub const CONTROL_KEY_ALL: &str = "all";

/// Names derived from one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Names {
    /// The namespace every name starts with.
    ns: Namespace,
}

impl Names {
    /// Names for `ns`.
    pub fn new(ns: Namespace) -> Self {
        Self { ns }
    }

    /// The namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// Prefix shared by every queue and exchange of this namespace (`<ns>.`).
    pub fn prefix(&self) -> String {
        format!("{}.", self.ns)
    }

    /// The direct exchange every task is published to, keyed by stage.
    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.ns)
    }

    /// A stage's work queue.
    pub fn stage_queue(&self, stage: &Stage) -> String {
        format!("{}.stage.{stage}", self.ns)
    }

    /// A stage's queue for one priority band.
    pub fn band_queue(&self, stage: &Stage, band: Band) -> String {
        format!("{}.stage.{stage}.p{}", self.ns, band.label())
    }

    /// The routing key of a stage's band on the task exchange (and the tail
    /// of a delay-ladder routing key).
    pub fn band_key(stage: &Stage, band: Band) -> String {
        format!("{stage}.p{}", band.label())
    }

    /// The delay ladder's exchange and queue of level `level` (`0..DELAY_LEVELS`).
    pub fn delay_level(&self, level: u32) -> String {
        format!("{}.delay.{level}", self.ns)
    }

    /// The ladder's entry: the exchange of its top level.
    pub fn delay_entry(&self) -> String {
        self.delay_level(DELAY_LEVELS - 1)
    }

    /// The exchange the ladder's last level hands due messages to.
    pub fn delay_deliver_exchange(&self) -> String {
        format!("{}.delay.deliver", self.ns)
    }

    /// A stage's retry queue for one delay; its TTL sends tasks back.
    pub fn retry_queue(&self, stage: &Stage, delay_ms: u64) -> String {
        format!("{}.retry.{stage}.{delay_ms}", self.ns)
    }

    /// The exchange that dead-lettered tasks go through, keyed by stage.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.ns)
    }

    /// A stage's dead-letter queue.
    pub fn dead_queue(&self, stage: &Stage) -> String {
        format!("{}.dead.{stage}", self.ns)
    }

    /// The events stream.
    pub fn events_stream(&self) -> String {
        format!("{}.events", self.ns)
    }

    /// The stream of flow results too large to travel inline (issue 19):
    /// one message per stored result, its message id the child's id.
    pub fn results_stream(&self) -> String {
        format!("{}.results", self.ns)
    }

    /// The exclusive queue whose holder leads the namespace's coordinators
    /// (issue 20).
    pub fn coordinator_lock_queue(&self) -> String {
        format!("{}.coordinator.lock", self.ns)
    }

    /// The topic exchange for commands.
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.ns)
    }

    /// An agent's own command queue.
    pub fn agent_control_queue(&self, agent: &AgentId) -> String {
        format!("{}.agent.{agent}", self.ns)
    }

    /// Routing key that reaches one agent.
    pub fn control_key_agent(agent: &AgentId) -> String {
        format!("agent.{agent}")
    }

    /// Routing key that reaches every agent of a stage.
    pub fn control_key_stage(stage: &Stage) -> String {
        format!("stage.{stage}")
    }

    /// The AMQP connection name an agent of this namespace uses, so the
    /// coordinator can find (and close) it in the management API. It names
    /// the namespace: a coordinator closes only its own namespace's agents,
    /// even when an agent of another namespace on the same vhost has the
    /// same id.
    pub fn agent_connection_name(&self, agent: &AgentId) -> String {
        format!("{AGENT_CONNECTION_PREFIX}{}/{agent}", self.ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_namespace() {
        let names = Names::new("t-1".parse().unwrap());
        let stage: Stage = "build".parse().unwrap();
        assert_eq!(names.tasks_exchange(), "t-1.tasks");
        assert_eq!(names.stage_queue(&stage), "t-1.stage.build");
        assert_eq!(names.retry_queue(&stage, 2000), "t-1.retry.build.2000");
        assert_eq!(names.band_queue(&stage, Band::High), "t-1.stage.build.p7-9");
        assert_eq!(Names::band_key(&stage, Band::Low), "build.p0-3");
        assert_eq!(names.delay_entry(), "t-1.delay.22");
        assert_eq!(names.delay_deliver_exchange(), "t-1.delay.deliver");
        assert_eq!(names.dead_queue(&stage), "t-1.dead.build");
        assert_eq!(names.events_stream(), "t-1.events");
        assert_eq!(names.results_stream(), "t-1.results");
        assert_eq!(names.control_exchange(), "t-1.control");
        let agent: AgentId = "a1".parse().unwrap();
        assert_eq!(
            names.agent_connection_name(&agent),
            "guildhall-agent/t-1/a1"
        );
        assert!(names.stage_queue(&stage).starts_with(&names.prefix()));
        assert_eq!(Names::default().events_stream(), "guildhall.events");
    }
}
