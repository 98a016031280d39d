//! Guildhall's agent: the sidecar beside each worker.
//!
//! An agent consumes one stage's queue (`<ns>.stage.<stage>`), hands each
//! task to its worker (HTTP POST, one process per task, or a built-in
//! simulation), forwards the result to the next stage, retries or
//! dead-letters failures, and reports everything (hello, heartbeats, task
//! stage changes, moves between stages) on the events stream. It obeys
//! commands from the control exchange (pause, resume, drain, concurrency,
//! prefetch, assign a stage, worker restart, logs) and can start and
//! supervise the worker process itself.
//!
//! An agent may be able to serve several stages (`--stages
//! 'build>report,report'`: each stage with where its results go); it
//! consumes one at a time, and an `Assign` command moves it to another
//! without losing a task: the tasks in hand finish as tasks of the stage
//! they came from. Its heartbeats report its broker round trip (`rtt_ms`),
//! from which the coordinator sizes its prefetch (`SetPrefetch`).
//!
//! **Nothing is acked before what it depends on is confirmed** by the broker:
//! the next stage's message, the retry or dead-letter message, and the task's
//! events. Anything that fails on the way gives the task back to the queue.
//!
//! **An agent never gives up and never loses a task or an event** when the
//! broker, its connection or its worker process fails:
//!
//! - a lost connection (or channel) is reopened with backoff, forever, and
//!   everything declared again; only a refusal no retry can fix ends the
//!   run ([`AgentError::Refused`]). The first connection must succeed.
//! - tasks in hand when the connection dies cannot be acked any more (the
//!   broker has requeued them): their results are discarded and a
//!   `TaskAbandoned` event says so. A worker process that exits, fails its
//!   health checks or lets a task time out is restarted, and its tasks are
//!   given back the same way.
//! - events wait in the event publisher's buffer while the broker is away,
//!   and are resent in order, with their sequence numbers, once it is back.
//!
//! **Flows** (issue 19): a worker may answer with child tasks instead of a
//! result (a fan-out, [`handoff::fanout`]): the agent publishes them all
//! (`<parent>:<i>`, confirmed) before reporting `TaskFannedOut` and acking
//! the parent; a child whose pipeline ends reports `TaskResult` for its
//! parent's join. A third party's message with `x-guildhall-after` is held
//! (`TaskHeld`, confirmed) instead of queued, for the coordinator to
//! publish once its dependencies have finished.
//!
//! The tables in [`core::settle`] (what an outcome calls for),
//! [`core::task`] (when a task is given up) and `runner` (the reconnect
//! loop) are the reference.
//!
//! # Use
//!
//! From the command line, `guildhall-agent --stage build --next report
//! --exec 'tr a-z A-Z'`, or for an agent that can be moved between two
//! stages (starting with the first), `guildhall-agent --stages
//! 'build>report,report' --exec ...`. In process (the coordinator's demo):
//!
//! ```no_run
//! # async fn demo() -> Result<(), guildhall_agent::AgentError> {
//! use guildhall_agent::{AgentConfig, WorkerSpec};
//! let config = AgentConfig::new("build".parse().unwrap(), WorkerSpec::Simulated(Default::default()))
//!     .with_next(Some("report".parse().unwrap()))
//!     .with_concurrency(4);
//! // Or able to serve two stages, starting with build:
//! let flexible = AgentConfig::new("build".parse().unwrap(), WorkerSpec::Simulated(Default::default()))
//!     .with_stages(guildhall_agent::config::parse_stages("build>report,report")?);
//! # drop(flexible);
//! let agent = guildhall_agent::spawn(config);
//! println!("started {}", agent.id());
//! // ... later:
//! let exit = agent.stop_and_join().await?;
//! println!("{} tasks done", exit.done);
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`config`]: [`AgentConfig`] (a plain struct with defaults and setters),
//!   [`WorkerSpec`], [`RetryPolicy`], [`StageRoute`] and the `--stages`
//!   syntax ([`config::parse_stages`]), and the validation with one-line
//!   errors.
//! - [`cli`]: the clap command line and its conversion into an `AgentConfig`.
//! - [`core`]: the agent's decisions as a sans-IO state machine
//!   ([`core::AgentCore`]: inputs with `now`, actions, deadlines): consumption,
//!   each task from delivery to ack or `TaskAbandoned` ([`core::task`]), the
//!   settle table as a pure function ([`core::settle`]), commands
//!   ([`core::commands`]). No tokio, lapin or clock; tested on virtual time.
//! - `runner`: the driver: connect, reconnect, feed the core and carry out
//!   its actions, the round-trip probe, the graceful stop.
//! - `link`: one connection and everything declared on it, noticing its
//!   loss, the reconnect backoff, and which broker errors are fatal.
//! - `task`: the IO of one task for the driver (read a delivery, call the
//!   worker, publish with declarations, a fan-out's children, confirmed
//!   events, ack / nack / reject); each confirmed publish is a round-trip
//!   sample.
//! - `intake`: the intake mover (a stage's intake sorted into its bands,
//!   the delay ladder or the dead-letter queue; a message with
//!   `x-guildhall-after` held with a `TaskHeld` event).
//! - [`handoff`]: the worker modes ([`handoff::http`], [`handoff::exec`],
//!   [`handoff::simulated`]), the [`handoff::Outcome`] they produce, and
//!   the fan-out reader both HTTP and exec share ([`handoff::fanout`]).
//! - `control`: the command queue (its stage binding follows the stage
//!   served), reading a command and sending the reply.
//! - `supervisor`: the supervised worker process: restarts, backoff, health
//!   checks, hung workers, log lines.
//! - `heartbeat`: `Hello` (with every stage the agent can serve) and the
//!   periodic `Heartbeat` (the stage served now, the round trip).
//! - `procstats`: CPU and memory of a process from `/proc`.
//! - `declare`: lazy, cached (per connection) declarations of assigned and
//!   next stages and retry queues, and which next stages a worker may name.
//! - `dead`: dead-letter messages (the reason headers, kept within a frame)
//!   and deliveries that cannot be tasks (poison messages).
//! - `ratelog`: log lines that a hostile producer could otherwise repeat
//!   without bound, at most one per interval.
//! - `state`: tasks in hand, counters, the stage served, the window of
//!   round-trip samples: state shared across the agent.
//! - `pgroup`: signalling worker process groups.
//! - [`probe`]: `/livez` and `/readyz` for an orchestrator (`--probe-listen`).

mod bands;
pub mod cli;
pub mod config;
mod control;
pub mod core;
mod dead;
mod declare;
pub mod handoff;
mod heartbeat;
mod intake;
mod link;
mod pgroup;
pub mod probe;
mod procstats;
mod ratelog;
mod runner;
mod state;
mod supervisor;
mod task;

pub use config::{AgentConfig, ConfigError, RetryPolicy, StageRoute, WorkerSpec};
pub use handoff::simulated::SimulateSpec;

use guildhall_broker::BrokerError;
use guildhall_proto::AgentId;
use std::future::Future;
use tokio_util::sync::CancellationToken;

/// Why an agent could not run (or stopped without being asked to).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker could not be reached at start, or refused the set-up.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// After a lost connection, the broker refused what the agent needs in a
    /// way no retry can fix (a queue declared with other arguments, refused
    /// credentials or permissions).
    #[error("the broker refused the agent's set-up, retrying cannot help: {0}")]
    Refused(BrokerError),
    /// The agent's task panicked or was aborted (only from [`AgentHandle::join`]).
    #[error("the agent task failed: {0}")]
    Task(String),
}

/// How a graceful stop went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentExit {
    /// The agent.
    pub id: AgentId,
    /// Why it stopped: `drain`, `shutdown`, `SIGTERM`, ...
    pub reason: String,
    /// Stage attempts that succeeded.
    pub done: u64,
    /// Stage attempts that failed (retried or dead-lettered).
    pub failed: u64,
    /// Tasks given up and left to the broker to deliver again (each one a
    /// `TaskAbandoned` event): lost connection, worker exit, hang or failed
    /// health checks, stop timeout, a publish that was not confirmed.
    pub requeued: u64,
    /// Deliveries that could not be tasks (an invalid `message_id`): each
    /// dead-lettered with its reason, or rejected without requeue, and
    /// reported in a `DeliveryRejected` event.
    pub rejected: u64,
    /// Enqueue or submit times in task messages that could not be right
    /// (before 2000, over an hour ahead, overflowing), read as absent.
    pub implausible_times: u64,
    /// Task messages whose `x-guildhall-parent` header was not a task id,
    /// read as absent (issue 19).
    pub malformed_parents: u64,
    /// Times the link to the broker was lost (and reopened).
    pub links_lost: u64,
}

/// Runs an agent until `shutdown` resolves or a `Drain` command arrives,
/// then stops gracefully (see [`run_until`]). Fails at once if the broker
/// cannot be reached or refuses the set-up at start; once running, it only
/// fails on a refusal no reconnect can fix ([`AgentError::Refused`]).
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<AgentExit, AgentError> {
    run_until(config, async {
        shutdown.await;
        "shutdown".to_owned()
    })
    .await
}

/// Runs an agent until `stop` resolves (with the reason to report, such as
/// `SIGTERM`) or a `Drain` command arrives. A stop cancels the consumer,
/// waits up to `shutdown_timeout` for the tasks in hand (then gives the rest
/// back to the queue), emits `AgentStopping`, stops the supervised worker and
/// closes the connection. A stop while the broker is away waits for it up to
/// `shutdown_timeout`, so that the buffered events get out.
pub async fn run_until(
    config: AgentConfig,
    stop: impl Future<Output = String>,
) -> Result<AgentExit, AgentError> {
    runner::Runner::start(config).await?.run(stop).await
}

/// An agent running on its own tokio task.
#[derive(Debug)]
pub struct AgentHandle {
    /// The agent's id.
    id: AgentId,
    /// Cancelled to ask for a graceful stop.
    stop: CancellationToken,
    /// The agent's task.
    task: tokio::task::JoinHandle<Result<AgentExit, AgentError>>,
}

/// Starts an agent on a tokio task of its own (must be called in a runtime).
pub fn spawn(config: AgentConfig) -> AgentHandle {
    let id = config.id.clone();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(run(config, async move { token.cancelled().await }));
    AgentHandle { id, stop, task }
}

impl AgentHandle {
    /// The agent's id (its connection is `guildhall-agent/<namespace>/<id>`).
    pub fn id(&self) -> &AgentId {
        &self.id
    }

    /// Asks for a graceful stop; returns at once.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Whether the agent has ended (stopped, drained or failed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the agent to end.
    pub async fn join(self) -> Result<AgentExit, AgentError> {
        self.task
            .await
            .unwrap_or_else(|e| Err(AgentError::Task(e.to_string())))
    }

    /// Asks for a graceful stop and waits for it.
    pub async fn stop_and_join(self) -> Result<AgentExit, AgentError> {
        self.stop();
        self.join().await
    }
}
