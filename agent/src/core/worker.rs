//! The supervised worker's runs as the core sees them: which run a task was
//! handed to, whether tasks may be handed, and why a run ended. Plain data:
//! the supervisor (`crate::supervisor`) produces it, the core reads it.
//! And the supervisor's restart rule, [`RestartBackoff`], on virtual time.

use std::time::Duration;

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

/// First delay before restarting a worker that exited.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(500);

/// A run this long resets the backoff.
pub const HEALTHY_UPTIME: Duration = Duration::from_secs(60);

/// When the supervisor starts the worker again after a run ended by itself
/// (an exit, or a kill for a failed health check or a hang): 500 ms, then
/// twice the last delay up to `--restart-backoff-max`, and 500 ms again once
/// a run lasted [`HEALTHY_UPTIME`]. A restart asked for by a command starts
/// at once and does not lengthen the next delay. Pure: the supervisor hands
/// it each run's uptime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartBackoff {
    /// The delay the next failed run gets.
    next: Duration,
    /// `--restart-backoff-max`: no delay grows past it.
    max: Duration,
}

impl RestartBackoff {
    /// A worker that has not failed yet.
    pub fn new(max: Duration) -> Self {
        Self {
            next: INITIAL_BACKOFF,
            max,
        }
    }

    /// A run that lasted `uptime` ended by itself: the delay before the
    /// next start.
    pub fn after_failed_run(&mut self, uptime: Duration) -> Duration {
        self.forgive(uptime);
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// A run that lasted `uptime` was restarted on request: no delay, and a
    /// long run still earns the reset.
    pub fn after_restart(&mut self, uptime: Duration) {
        self.forgive(uptime);
    }

    fn forgive(&mut self, uptime: Duration) {
        if uptime >= HEALTHY_UPTIME {
            self.next = INITIAL_BACKOFF;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn failed_runs_wait_twice_as_long_each_time_up_to_the_max() {
        let mut backoff = RestartBackoff::new(Duration::from_secs(5));
        let delays: Vec<Duration> = (0..6).map(|_| backoff.after_failed_run(SHORT)).collect();
        assert_eq!(
            delays,
            [ms(500), ms(1000), ms(2000), ms(4000), ms(5000), ms(5000)]
        );
    }

    #[test]
    fn a_run_of_a_minute_resets_the_backoff() {
        let mut backoff = RestartBackoff::new(Duration::from_secs(30));
        for _ in 0..4 {
            backoff.after_failed_run(SHORT);
        }
        assert_eq!(backoff.after_failed_run(SHORT), ms(8000));
        // Just under a minute is not enough.
        assert_eq!(backoff.after_failed_run(HEALTHY_UPTIME - ms(1)), ms(16000));
        assert_eq!(backoff.after_failed_run(HEALTHY_UPTIME), ms(500));
        assert_eq!(backoff.after_failed_run(SHORT), ms(1000));
    }

    #[test]
    fn a_requested_restart_neither_waits_nor_lengthens_the_next_delay() {
        let mut backoff = RestartBackoff::new(Duration::from_secs(30));
        backoff.after_failed_run(SHORT);
        backoff.after_restart(SHORT);
        backoff.after_restart(SHORT);
        assert_eq!(backoff.after_failed_run(SHORT), ms(1000));
        // A long run that ends on request still earns the reset.
        backoff.after_restart(HEALTHY_UPTIME);
        assert_eq!(backoff.after_failed_run(SHORT), ms(500));
    }

    #[test]
    fn a_max_below_the_first_delay_still_waits_the_first_delay_once() {
        let mut backoff = RestartBackoff::new(ms(100));
        assert_eq!(backoff.after_failed_run(SHORT), ms(500));
        assert_eq!(backoff.after_failed_run(SHORT), ms(100));
    }
}
