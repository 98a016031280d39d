//! Process groups: workers are spawned as leaders of their own group, so a
//! timeout or a stop reaches everything they started (`sh -c` pipelines,
//! grandchildren), not only the direct child.
//!
//! A group is only signalled while its leader has not been reaped: until then
//! the leader's pid (the group id) cannot be reused by an unrelated process.

use rustix::process::{Pid, Signal, kill_process_group};
use std::sync::atomic::{AtomicBool, Ordering};

/// Sends `signal` to the process group led by `pid`. Errors (the group is
/// already gone) are ignored: the caller only wants it gone.
pub fn signal_group(pid: u32, signal: Signal) {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return;
    };
    // Never signal group 1: `kill(-1, ..)` would reach every process we may signal.
    if pid == Pid::INIT {
        return;
    }
    if let Err(err) = kill_process_group(pid, signal) {
        tracing::debug!(
            pid = pid.as_raw_nonzero().get(),
            "signal to process group: {err}"
        );
    }
}

/// Kills a task process's group when dropped (a cancelled or timed-out
/// task), unless [`disarm`](GroupGuard::disarm)ed once the leader was reaped.
#[derive(Debug)]
pub struct GroupGuard {
    /// The group id (the leader's pid); `None` if the child had no pid.
    pgid: Option<u32>,
    /// Cleared once the group was killed or the leader reaped, so the group
    /// id is never signalled after it may have been reused.
    armed: AtomicBool,
}

impl GroupGuard {
    /// Guards the group led by `pid`.
    pub fn new(pid: Option<u32>) -> Self {
        Self {
            pgid: pid,
            armed: AtomicBool::new(pid.is_some()),
        }
    }

    /// SIGKILLs the whole group now (at most once).
    pub fn kill(&self) {
        if self.armed.swap(false, Ordering::SeqCst)
            && let Some(pgid) = self.pgid
        {
            signal_group(pgid, Signal::KILL);
        }
    }

    /// The leader was reaped: never signal this group id again.
    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
