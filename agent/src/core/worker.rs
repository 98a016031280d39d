//! The supervised worker's runs as the core sees them: which run a task was
//! handed to, whether tasks may be handed, and why a run ended. Plain data:
//! the supervisor (`crate::supervisor`) produces it, the core reads it.

/// Why a run ended: the process exited by itself.
pub const WORKER_EXITED: &str = "worker exited";
/// Why a run ended: its health checks failed.
pub const WORKER_UNHEALTHY: &str = "worker unhealthy";
/// Why a run ended: a task hit the task timeout.
pub const WORKER_HUNG: &str = "worker hung: task timeout";
/// Why a run ended: a `RestartWorker` command.
pub const WORKER_RESTARTED: &str = "worker restarted";
/// Why a run ended: the agent is stopping.
pub const AGENT_STOPPING: &str = "agent stopping";

/// The supervised process as the rest of the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkerStatus {
    /// +1 at each start: a task knows which run of the worker it was handed to.
    pub generation: u64,
    /// The running process, `None` between runs.
    pub pid: Option<u32>,
    /// Whether tasks may be handed to it.
    pub ready: bool,
    /// The last run that ended or is being ended, and why: tasks handed to
    /// that run are given back with this reason. Kept until the next end.
    pub ended: Option<Ended>,
}

/// A run of the worker that ended (or is being stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The run's generation.
    pub generation: u64,
    /// Why: [`WORKER_EXITED`], [`WORKER_UNHEALTHY`], [`WORKER_HUNG`]...
    pub reason: &'static str,
}

impl WorkerStatus {
    /// Why run `generation` ended, if it has (or is being ended).
    pub fn end_of(&self, generation: u64) -> Option<&'static str> {
        match self.ended {
            Some(e) if e.generation == generation => Some(e.reason),
            // A later run ended, so this one did too (by itself).
            Some(e) if e.generation > generation => Some(WORKER_EXITED),
            _ => None,
        }
    }
}
