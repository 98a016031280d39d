//! Guildhall's agent: the sidecar beside each worker.
//!
//! An agent consumes one stage's queue (`<ns>.stage.<stage>`), hands each
//! task to its worker (HTTP POST, one process per task, or a built-in
//! simulation), forwards the result to the next stage, retries or
//! dead-letters failures, and reports everything (hello, heartbeats, task
//! stage changes) on the events stream. It obeys commands from the control
//! exchange (pause, resume, drain, concurrency, worker restart, logs) and can
//! start and supervise the worker process itself.
//!
//! **Nothing is acked before what it depends on is confirmed** by the broker:
//! the next stage's message, the retry or dead-letter message, and the task's
//! events. Anything that fails on the way gives the task back to the queue.
//!
//! # Use
//!
//! From the command line, `guildhall-agent --stage build --next report
//! --exec 'tr a-z A-Z'`. In process (the coordinator's demo):
//!
//! ```no_run
//! # async fn demo() -> Result<(), guildhall_agent::AgentError> {
//! use guildhall_agent::{AgentConfig, WorkerSpec};
//! let config = AgentConfig::new("build".parse().unwrap(), WorkerSpec::Simulated(Default::default()))
//!     .with_next(Some("report".parse().unwrap()))
//!     .with_concurrency(4);
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
//!   [`WorkerSpec`], [`RetryPolicy`] and the validation with one-line errors.
//! - [`cli`]: the clap command line and its conversion into an `AgentConfig`.
//! - `runner`: the main loop: connect, declare, consume, commands, stop.
//! - `task`: one delivery from receipt to ack (publish, confirm, events).
//! - [`handoff`]: the worker modes ([`handoff::http`], [`handoff::exec`],
//!   [`handoff::simulated`]) and the [`handoff::Outcome`] they produce.
//! - `control`: the command queue and what each command does.
//! - `supervisor`: the supervised worker process: restarts, backoff, log lines.
//! - `heartbeat`: `Hello` and the periodic `Heartbeat`.
//! - `procstats`: CPU and memory of a process from `/proc`.
//! - `declare`: lazy, cached declarations of next stages and retry queues.
//! - `state`: tasks in hand, counters and state shared across the agent.
//! - `pgroup`: signalling worker process groups.

pub mod cli;
pub mod config;
mod control;
mod declare;
pub mod handoff;
mod heartbeat;
mod pgroup;
mod procstats;
mod runner;
mod state;
mod supervisor;
mod task;

pub use config::{AgentConfig, ConfigError, RetryPolicy, WorkerSpec};
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
    /// The broker could not be reached or refused the set-up.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The connection or a consumer was lost while running.
    #[error("lost the broker ({what}): {reason}")]
    Lost {
        /// What failed.
        what: &'static str,
        /// The error, on one line.
        reason: String,
    },
    /// The agent's task panicked or was aborted (only from [`AgentHandle::join`]).
    #[error("the agent task failed: {0}")]
    Task(String),
}

impl AgentError {
    pub(crate) fn lost(what: &'static str, reason: impl std::fmt::Display) -> Self {
        AgentError::Lost {
            what,
            reason: config::one_line(&reason.to_string()),
        }
    }
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
    /// Tasks given back to the queue unprocessed (stop timeout, worker exit,
    /// broker errors).
    pub requeued: u64,
}

/// Runs an agent until `shutdown` resolves or a `Drain` command arrives,
/// then stops gracefully (see [`run_until`]).
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
/// closes the connection.
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
    /// The agent's id (its connection is `guildhall-agent/<id>`).
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
