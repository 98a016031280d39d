//! What the agent is doing right now, shared by the runner (which changes
//! it), the task handlers (which hold tasks) and the heartbeat (which reports
//! it).

use crate::config::StageRoute;
use guildhall_proto::{AgentState, TaskInHand};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Round-trip samples kept for the median reported in heartbeats.
const RTT_SAMPLES: usize = 16;

/// Samples older than this no longer count (the broker's load changes).
const RTT_MAX_AGE: Duration = Duration::from_secs(120);

/// State shared across the agent's tasks. Cheap to read; locks are never
/// held across an await.
#[derive(Debug)]
pub struct Shared {
    /// Tasks being processed, by an internal slot number (a task id may be
    /// delivered twice, so it is not a key).
    in_hand: Mutex<HashMap<u64, TaskInHand>>,
    /// Source of slot numbers.
    next_slot: AtomicU64,
    /// Stage attempts that succeeded since start.
    done: AtomicU64,
    /// Stage attempts that failed since start.
    failed: AtomicU64,
    /// Tasks given back to the broker unprocessed (stop, worker exit, errors).
    requeued: AtomicU64,
    /// Deliveries that could not be tasks (an invalid `message_id`), set
    /// aside to the dead-letter queue or rejected: a poison message must
    /// show somewhere even when no coordinator runs.
    rejected: AtomicU64,
    /// Enqueue or submit times read as absent because they could not be
    /// right (a producer's clock or a forged header), see
    /// [`guildhall_broker::task::plausible_time`].
    implausible_times: AtomicU64,
    /// Malformed `x-guildhall-parent` headers read as absent.
    malformed_parents: AtomicU64,
    /// Links to the broker lost since start: a poison message or a hostile
    /// header must never be one of the causes.
    links_lost: AtomicU64,
    /// What the runner decided: `Idle` means "consuming"; `Processing` is
    /// derived from `in_hand` when read.
    mode: Mutex<AgentState>,
    /// Current concurrency (changes with `SetConcurrency`).
    concurrency: AtomicU32,
    /// Restarts of the supervised worker.
    worker_restarts: AtomicU32,
    /// The stage served now and where its results go (changes with
    /// `Assign`); heartbeats report it.
    route: Mutex<Arc<StageRoute>>,
    /// Recent broker round trips (publish to confirm), for heartbeats.
    rtt: Mutex<RttWindow>,
    /// Whether the agent has a live broker connection now; readiness
    /// (`/readyz`) needs it.
    connected: AtomicBool,
    /// When the agent started; `loop_ms` counts from it.
    started: Instant,
    /// Milliseconds after `started` at which the main loop last went round;
    /// liveness (`/livez`) fails when it stops going round.
    loop_ms: AtomicU64,
    /// Whether the main loop is waiting on the broker (a consume, a cancel,
    /// a command's declarations, a reconnect): a broker that blocks the
    /// connection (a memory or disk alarm) stalls the loop, and that is not
    /// the agent's fault, so liveness does not fail for it.
    broker_wait: AtomicBool,
}

impl Shared {
    /// Fresh state: starting, nothing in hand, serving `route`.
    pub fn new(concurrency: u32, route: StageRoute) -> Arc<Self> {
        Arc::new(Self {
            in_hand: Mutex::new(HashMap::new()),
            next_slot: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            requeued: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            implausible_times: AtomicU64::new(0),
            malformed_parents: AtomicU64::new(0),
            links_lost: AtomicU64::new(0),
            mode: Mutex::new(AgentState::Starting),
            concurrency: AtomicU32::new(concurrency),
            worker_restarts: AtomicU32::new(0),
            route: Mutex::new(Arc::new(route)),
            rtt: Mutex::new(RttWindow::default()),
            connected: AtomicBool::new(false),
            started: Instant::now(),
            loop_ms: AtomicU64::new(0),
            broker_wait: AtomicBool::new(false),
        })
    }

    /// Marks the main loop as waiting on the broker until the guard drops.
    pub fn waiting_on_broker(self: &Arc<Self>) -> BrokerWait {
        self.broker_wait.store(true, Ordering::Relaxed);
        BrokerWait(self.clone())
    }

    /// Whether the main loop is waiting on the broker now.
    pub fn is_waiting_on_broker(&self) -> bool {
        self.broker_wait.load(Ordering::Relaxed)
    }

    /// Records whether the agent has a broker connection now.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// Whether the agent has a broker connection now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Records that the main loop went round.
    pub fn touch_loop(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.loop_ms.store(ms, Ordering::Relaxed);
    }

    /// How long ago the main loop last went round.
    pub fn loop_age(&self) -> Duration {
        let last = Duration::from_millis(self.loop_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// The stage served now and its next stage.
    pub fn route(&self) -> Arc<StageRoute> {
        self.route.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Serves another stage from now on.
    pub fn set_route(&self, route: Arc<StageRoute>) {
        *self.route.lock().unwrap_or_else(|e| e.into_inner()) = route;
    }

    fn rtt_window(&self) -> MutexGuard<'_, RttWindow> {
        self.rtt.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one broker round trip (a publish until its confirm).
    pub fn record_rtt(&self, rtt: Duration) {
        self.rtt_window().record(Instant::now(), rtt);
    }

    /// The median of the recent round trips in ms (rounded up, so a measured
    /// round trip is never 0), or `None` without a recent one.
    pub fn rtt_ms(&self) -> Option<u32> {
        self.rtt_window().median_ms(Instant::now())
    }

    /// Whether no round trip was recorded within `age` (time for a probe).
    pub fn rtt_older_than(&self, age: Duration) -> bool {
        self.rtt_window()
            .newest()
            .is_none_or(|at| at.elapsed() >= age)
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<u64, TaskInHand>> {
        // A panic while holding this lock leaves the map consistent (single
        // inserts and removes), so a poisoned lock is still usable.
        self.in_hand.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a task as in hand until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>, task: TaskInHand) -> InHand {
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
        self.tasks().insert(slot, task);
        InHand {
            shared: self.clone(),
            slot,
        }
    }

    /// The tasks in hand, oldest first.
    pub fn in_hand(&self) -> Vec<TaskInHand> {
        let mut tasks: Vec<TaskInHand> = self.tasks().values().cloned().collect();
        tasks.sort_by_key(|t| t.started_at_ms);
        tasks
    }

    /// The state to report: the runner's mode, with `Idle` turned into
    /// `Processing` while tasks are in hand.
    pub fn state(&self) -> AgentState {
        let mode = self.mode();
        if mode == AgentState::Idle && !self.tasks().is_empty() {
            AgentState::Processing
        } else {
            mode
        }
    }

    /// The runner's mode.
    pub fn mode(&self) -> AgentState {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the runner's mode; returns whether it changed.
    pub fn set_mode(&self, mode: AgentState) -> bool {
        let mut current = self.mode.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *current, mode) != mode
    }

    /// Current concurrency.
    pub fn concurrency(&self) -> u32 {
        self.concurrency.load(Ordering::Relaxed)
    }

    /// Sets the concurrency.
    pub fn set_concurrency(&self, concurrency: u32) {
        self.concurrency.store(concurrency, Ordering::Relaxed);
    }

    /// Sets the task counters (the core keeps them).
    pub fn set_counts(&self, done: u64, failed: u64, requeued: u64, rejected: u64) {
        self.done.store(done, Ordering::Relaxed);
        self.failed.store(failed, Ordering::Relaxed);
        self.requeued.store(requeued, Ordering::Relaxed);
        self.rejected.store(rejected, Ordering::Relaxed);
    }

    /// Counts a successful stage attempt.
    pub fn count_done(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed stage attempt.
    pub fn count_failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a task given back to the broker.
    pub fn count_requeued(&self) {
        self.requeued.fetch_add(1, Ordering::Relaxed);
    }

    /// Successful stage attempts so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Failed stage attempts so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Tasks given back so far.
    pub fn requeued(&self) -> u64 {
        self.requeued.load(Ordering::Relaxed)
    }

    /// Counts a delivery set aside as unreadable.
    pub fn count_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Deliveries set aside as unreadable so far.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Counts a malformed `x-guildhall-parent` header read as absent.
    pub fn count_malformed_parent(&self) {
        self.malformed_parents.fetch_add(1, Ordering::Relaxed);
    }

    /// Malformed parent headers read as absent so far.
    pub fn malformed_parents(&self) -> u64 {
        self.malformed_parents.load(Ordering::Relaxed)
    }

    /// Counts `n` implausible times read as absent.
    pub fn count_implausible_times(&self, n: u64) {
        self.implausible_times.fetch_add(n, Ordering::Relaxed);
    }

    /// Implausible times read as absent so far.
    pub fn implausible_times(&self) -> u64 {
        self.implausible_times.load(Ordering::Relaxed)
    }

    /// Counts a lost link to the broker.
    pub fn count_link_lost(&self) {
        self.links_lost.fetch_add(1, Ordering::Relaxed);
    }

    /// Links to the broker lost so far.
    pub fn links_lost(&self) -> u64 {
        self.links_lost.load(Ordering::Relaxed)
    }

    /// Restarts of the supervised worker so far.
    pub fn worker_restarts(&self) -> u32 {
        self.worker_restarts.load(Ordering::Relaxed)
    }

    /// Counts a restart of the supervised worker; returns the new total.
    pub fn count_worker_restart(&self) -> u32 {
        self.worker_restarts.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// While alive, the main loop counts as waiting on the broker.
#[derive(Debug)]
pub struct BrokerWait(Arc<Shared>);

impl Drop for BrokerWait {
    fn drop(&mut self) {
        self.0.broker_wait.store(false, Ordering::Relaxed);
    }
}

/// The last [`RTT_SAMPLES`] round trips, each with when it was measured.
#[derive(Debug, Default)]
struct RttWindow {
    /// Oldest first.
    samples: VecDeque<(Instant, Duration)>,
}

impl RttWindow {
    fn record(&mut self, at: Instant, rtt: Duration) {
        if self.samples.len() == RTT_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((at, rtt));
    }

    fn newest(&self) -> Option<Instant> {
        self.samples.back().map(|(at, _)| *at)
    }

    /// The median (the upper one of an even count) of the samples younger
    /// than [`RTT_MAX_AGE`], in whole ms rounded up.
    fn median_ms(&self, now: Instant) -> Option<u32> {
        let mut recent: Vec<Duration> = self
            .samples
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) < RTT_MAX_AGE)
            .map(|(_, rtt)| *rtt)
            .collect();
        if recent.is_empty() {
            return None;
        }
        recent.sort_unstable();
        let median = recent[recent.len() / 2];
        let ms = median.as_micros().div_ceil(1000).max(1);
        Some(u32::try_from(ms).unwrap_or(u32::MAX))
    }
}

/// A task in hand; dropping it removes the task from [`Shared`].
#[derive(Debug)]
pub struct InHand {
    /// Where the task is recorded.
    shared: Arc<Shared>,
    /// Its slot there.
    slot: u64,
}

impl Drop for InHand {
    fn drop(&mut self) {
        self.shared.tasks().remove(&self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(stage: &str, next: Option<&str>) -> StageRoute {
        StageRoute {
            stage: stage.parse().unwrap(),
            next: next.map(|n| n.parse().unwrap()),
        }
    }

    #[test]
    fn tasks_in_hand_come_and_go_with_their_guards() {
        let shared = Shared::new(2, route("a", None));
        assert_eq!(shared.state(), AgentState::Starting);
        assert!(shared.set_mode(AgentState::Idle));
        assert!(!shared.set_mode(AgentState::Idle));
        let task = |id: &str, at| TaskInHand {
            task_id: id.parse().unwrap(),
            attempt: 1,
            started_at_ms: at,
        };
        let b = shared.hold(task("b", 20));
        let a = shared.hold(task("a", 10));
        assert_eq!(shared.state(), AgentState::Processing);
        let ids: Vec<_> = shared.in_hand().into_iter().map(|t| t.task_id).collect();
        assert_eq!(ids, ["a".parse().unwrap(), "b".parse().unwrap()]);
        drop((a, b));
        assert_eq!(shared.state(), AgentState::Idle);
        shared.set_mode(AgentState::Paused);
        assert_eq!(shared.state(), AgentState::Paused);
    }

    #[test]
    fn the_route_can_change() {
        let shared = Shared::new(1, route("a", Some("b")));
        assert_eq!(shared.route().stage.as_str(), "a");
        shared.set_route(Arc::new(route("c", None)));
        assert_eq!(*shared.route(), route("c", None));
    }

    #[test]
    fn the_round_trip_is_the_median_of_a_bounded_window_of_recent_samples() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut window = RttWindow::default();
        assert_eq!(window.median_ms(t0), None);
        window.record(t0, Duration::from_micros(300));
        assert_eq!(window.median_ms(t0), Some(1), "rounded up, never 0");
        for rtt in [ms(5), ms(3), ms(400), ms(4)] {
            window.record(t0, rtt);
        }
        assert_eq!(window.median_ms(t0), Some(4), "an outlier does not move it");
        for _ in 0..RTT_SAMPLES {
            window.record(t0 + ms(10), ms(9));
        }
        assert_eq!(window.samples.len(), RTT_SAMPLES, "bounded");
        assert_eq!(
            window.median_ms(t0 + ms(10)),
            Some(9),
            "the oldest went first"
        );
        assert_eq!(window.median_ms(t0 + RTT_MAX_AGE + ms(10)), None, "too old");
        assert_eq!(window.newest(), Some(t0 + ms(10)));
    }
}
