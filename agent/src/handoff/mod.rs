//! Handing one task to the worker and reading back what happened.
//!
//! Every mode turns a [`TaskInput`] into an [`Outcome`]: success with the
//! next payload (and maybe another next stage), a fan-out (child tasks
//! instead of one result, issue 19), or a failure with an error, a short
//! bounded class and whether another attempt may help. The modes know
//! nothing of the broker; [`crate::task`] acts on the outcome.
//!
//! - [`http`]: POST to a worker URL.
//! - [`fanout`]: reading a fan-out answer (child lines, join, policy), for
//!   both HTTP and exec workers.
//! - [`quickack`]: the connector of `http://` workers (TCP_NODELAY, TCP_QUICKACK).
//! - [`exec`]: one `sh -c` process per task, payload on stdin.
//! - [`simulated`]: a built-in worker with a lognormal service time.

pub mod exec;
pub mod fanout;
pub mod http;
pub mod quickack;
pub mod simulated;

use crate::config::{AgentConfig, ConfigError, WorkerSpec};
use guildhall_proto::{Stage, TaskId};
use std::sync::Arc;

/// What the worker gets for one stage attempt.
#[derive(Debug, Clone)]
pub struct TaskInput {
    /// The task's id (the same at every stage).
    pub task_id: TaskId,
    /// The stage being processed.
    pub stage: Stage,
    /// Attempt number at this stage, from 1.
    pub attempt: u32,
    /// `<task id>/<stage>/<attempt>`: lets the worker make side effects idempotent.
    pub idempotency_key: String,
    /// W3C trace context of this stage attempt's span.
    pub traceparent: Option<String>,
    /// The task's priority, 0-9 (`x-guildhall-priority`,
    /// `GUILDHALL_PRIORITY`), so a worker can tell urgent work.
    pub priority: guildhall_proto::Priority,
    /// The payload, opaque bytes.
    pub payload: Vec<u8>,
    /// On a child task (issue 19): its parent's id (`x-guildhall-parent`,
    /// `GUILDHALL_PARENT`).
    pub parent: Option<TaskId>,
}

impl TaskInput {
    /// The input of attempt `meta.attempt` of `meta.id` at `stage`, with its
    /// idempotency key.
    pub fn new(
        meta: &guildhall_broker::TaskMeta,
        stage: &Stage,
        traceparent: Option<String>,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            task_id: meta.id.clone(),
            stage: stage.clone(),
            attempt: meta.attempt,
            idempotency_key: guildhall_proto::headers::idempotency_key(
                meta.id.as_str(),
                stage.as_str(),
                meta.attempt,
            ),
            traceparent,
            priority: meta.priority,
            payload,
            parent: meta.parent.clone(),
        }
    }
}

/// Where a successful result goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStage {
    /// The agent's `--next` (or the end of the pipeline if it has none).
    Default,
    /// A stage the worker named.
    Stage(Stage),
    /// The worker ended the pipeline here (`-`).
    End,
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong, for people; truncated before it is published.
    pub error: String,
    /// A short bounded class for metrics: `timeout`, `http_503`, `exit_3`...
    pub class: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
    /// The worker gave no answer within the task timeout. A supervised
    /// worker process is then judged hung and restarted (and the task given
    /// back) instead of the task being retried. Not inferred from `class`,
    /// which a worker may set to `timeout` itself.
    pub timed_out: bool,
}

impl Failure {
    /// A failure another attempt may fix.
    pub fn retryable(class: impl Into<String>, error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            class: class.into(),
            retryable: true,
            timed_out: false,
        }
    }

    /// A failure no retry will fix (bad input).
    pub fn permanent(class: impl Into<String>, error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            class: class.into(),
            retryable: false,
            timed_out: false,
        }
    }

    /// No answer within the task timeout: retryable, class `timeout`.
    pub fn timeout(error: impl Into<String>) -> Self {
        Self {
            timed_out: true,
            ..Self::retryable(TIMEOUT_CLASS, error)
        }
    }
}

/// The error class of a task that hit the task timeout.
pub const TIMEOUT_CLASS: &str = "timeout";

/// What a stage attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The worker produced a result.
    Success {
        /// The payload for the next stage.
        payload: Vec<u8>,
        /// Where it goes.
        next: NextStage,
        /// The priority the next stage gets, if the worker set one
        /// (`x-guildhall-priority`); else the task keeps its own.
        priority: Option<guildhall_proto::Priority>,
    },
    /// The worker listed child tasks instead of a result (issue 19): they
    /// are published, and the parent continues at its join once they have
    /// all finished.
    FanOut(fanout::FanOut),
    /// The worker failed.
    Failure(Failure),
}

/// Progress a worker reported for the task it is processing.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Done share, 0.0 to 1.0, if given.
    pub fraction: Option<f32>,
    /// Free text, if given.
    pub message: Option<String>,
}

/// Where a mode reports progress (the runner turns it into `TaskProgress` events).
pub type ProgressSink = Arc<dyn Fn(Progress) + Send + Sync>;

/// Whether `class` is an acceptable worker-given error class: `[a-z0-9_]{1,40}`.
pub fn valid_error_class(class: &str) -> bool {
    (1..=40).contains(&class.len())
        && class
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The worker, in whichever mode was configured.
#[derive(Debug)]
pub enum Worker {
    /// HTTP POST per task.
    Http(http::HttpWorker),
    /// A process per task.
    Exec(exec::ExecWorker),
    /// Built-in simulation.
    Simulated(simulated::SimulatedWorker),
}

impl Worker {
    /// Builds the worker for `config`.
    pub fn from_config(config: &AgentConfig) -> Result<Self, ConfigError> {
        Ok(match &config.worker {
            WorkerSpec::Http { url } => {
                Worker::Http(http::HttpWorker::new(url, config.task_timeout)?)
            }
            WorkerSpec::Exec { command } => {
                Worker::Exec(exec::ExecWorker::new(command.clone(), config.task_timeout))
            }
            WorkerSpec::Simulated(spec) => Worker::Simulated(simulated::SimulatedWorker::new(
                spec.clone(),
                config.task_timeout,
            )),
        })
    }

    /// The `(host, port)` a supervised HTTP worker must accept connections
    /// on before it counts as ready; `None` for the other modes.
    pub fn ready_addr(&self) -> Option<(String, u16)> {
        match self {
            Worker::Http(w) => w.ready_addr(),
            Worker::Exec(_) | Worker::Simulated(_) => None,
        }
    }

    /// Processes one task, bounded by the task timeout.
    pub async fn handle(&self, task: &TaskInput, progress: &ProgressSink) -> Outcome {
        match self {
            Worker::Http(w) => w.handle(task).await,
            Worker::Exec(w) => w.handle(task, progress).await,
            Worker::Simulated(w) => w.handle(task).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes_are_short_lower_case_words() {
        for ok in ["db_timeout", "e1", &"x".repeat(40)] {
            assert!(valid_error_class(ok), "{ok}");
        }
        for bad in ["", "DB", "a-b", "a b", "é", &"x".repeat(41)] {
            assert!(!valid_error_class(bad), "{bad}");
        }
    }
}
