//! Estimated completion of in-flight tasks, with a low/high range.
//!
//! A task's time left is the rest of its current stage plus, for every stage
//! after it, the expected wait there and the service time. At the current
//! stage a queued task waits for the tasks ahead of it (its position in the
//! queue) to be served by the stage's capacity. The range comes from the
//! spread of service times: the same sum with every stage's 10th and 90th
//! percentile instead of its mean.

use super::stats::Reservoir;
use super::tasks::{TaskRef, TaskStatus};
use guildhall_proto::Stage;
use guildhall_proto::schedule::Band;
use std::collections::BTreeMap;

/// Longest chain of stages an ETA follows (guards against cycles).
pub const MAX_ETA_STAGES: usize = 32;
/// Service-time samples needed before percentiles stand for the spread.
const MIN_SAMPLES_FOR_RANGE: usize = 5;

/// Service time of a stage: a low, a central and a high estimate (ms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServiceTimes {
    /// 10th percentile.
    pub low: f64,
    /// Mean.
    pub mean: f64,
    /// 90th percentile.
    pub high: f64,
}

impl ServiceTimes {
    /// From recent samples; `None` without any.
    pub fn from_samples(r: &Reservoir) -> Option<Self> {
        let mean = r.mean()?;
        if r.len() < MIN_SAMPLES_FOR_RANGE {
            return Some(Self {
                low: mean,
                mean,
                high: mean,
            });
        }
        let [low, high] = r.percentiles([0.1, 0.9])?;
        Some(Self {
            low: low as f64,
            mean,
            high: high as f64,
        })
    }

    fn pick(&self, which: Which) -> f64 {
        match which {
            Which::Low => self.low,
            Which::Mean => self.mean,
            Which::High => self.high,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Which {
    Low,
    Mean,
    High,
}

/// What an ETA needs to know about a stage.
#[derive(Debug, Clone, PartialEq)]
pub struct StageTiming {
    /// Service time estimates.
    pub service: ServiceTimes,
    /// Tasks the stage's consuming workers can hold at once.
    pub servers: u32,
    /// Tasks held now.
    pub in_flight: usize,
    /// Ready messages in the stage queue, as the broker counts them: it
    /// includes tasks the coordinator has not seen (producers outside
    /// Guildhall), which are taken to be ahead.
    pub ready: u64,
    /// Ready messages in each band's queue ([`Band::index`]), when the
    /// broker was asked: tasks it counts that the coordinator never saw
    /// are ahead only of tasks of their band or lower.
    pub band_ready: Option<[u64; 3]>,
    /// Expected wait of a task joining the queue now, at the mean service time.
    pub wait_ms: f64,
    /// The stage its results go to.
    pub next: Option<Stage>,
}

/// Estimated time left, with its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eta {
    /// Central estimate.
    pub in_ms: u64,
    /// Optimistic end of the range.
    pub low_in_ms: u64,
    /// Pessimistic end of the range.
    pub high_in_ms: u64,
}

/// Every stage's queued tasks in enqueue order, by priority band, to find a
/// task's position; and its scheduled tasks by due time.
#[derive(Debug, Default)]
pub struct QueueIndex {
    /// Per stage and band ([`Band::index`]), the enqueue times of its
    /// queued tasks, sorted.
    by_stage: BTreeMap<Stage, [Vec<u64>; 3]>,
    /// Per stage, the due times of its scheduled tasks, sorted.
    scheduled: BTreeMap<Stage, Vec<u64>>,
}

impl QueueIndex {
    /// Indexes the queued tasks of `tasks` (retrying ones whose delay is over
    /// count as queued; scheduled ones are indexed apart).
    pub fn build<'a>(tasks: impl Iterator<Item = TaskRef<'a>>, now_ms: u64) -> Self {
        let mut by_stage: BTreeMap<Stage, [Vec<u64>; 3]> = BTreeMap::new();
        let mut scheduled: BTreeMap<Stage, Vec<u64>> = BTreeMap::new();
        for rec in tasks {
            if rec.is_scheduled(now_ms) {
                if let Some(due) = rec.due_at_ms() {
                    scheduled.entry(rec.stage().clone()).or_default().push(due);
                }
            } else if let Some(at) = queued_since(rec, now_ms) {
                by_stage.entry(rec.stage().clone()).or_default()[rec.band().index()].push(at);
            }
        }
        for bands in by_stage.values_mut() {
            for times in bands {
                times.sort_unstable();
            }
        }
        for times in scheduled.values_mut() {
            times.sort_unstable();
        }
        Self {
            by_stage,
            scheduled,
        }
    }

    /// Tasks queued at `stage` ahead of one of `band` queued at `since_ms`:
    /// every task of a higher band, and those of its own band queued before
    /// it (agents take the bands highest first).
    pub fn ahead_of(&self, stage: &Stage, band: Band, since_ms: u64) -> usize {
        let Some(bands) = self.by_stage.get(stage) else {
            return 0;
        };
        let higher: usize = bands[..band.index()].iter().map(Vec::len).sum();
        higher + bands[band.index()].partition_point(|&q| q < since_ms)
    }

    /// Tasks queued at `stage` that a task of `band` joining now would wait
    /// for: its band and every higher one.
    pub fn ahead_of_new(&self, stage: &Stage, band: Band) -> usize {
        self.by_stage
            .get(stage)
            .map_or(0, |bands| bands[..=band.index()].iter().map(Vec::len).sum())
    }

    /// Tasks queued at `stage`.
    pub fn len(&self, stage: &Stage) -> usize {
        self.by_stage
            .get(stage)
            .map_or(0, |bands| bands.iter().map(Vec::len).sum())
    }

    /// Tasks queued at `stage` in `band`.
    pub fn band_len(&self, stage: &Stage, band: Band) -> usize {
        self.by_stage
            .get(stage)
            .map_or(0, |bands| bands[band.index()].len())
    }

    /// When the oldest task queued at `stage` was enqueued.
    pub fn oldest(&self, stage: &Stage) -> Option<u64> {
        self.by_stage
            .get(stage)
            .and_then(|bands| bands.iter().filter_map(|t| t.first().copied()).min())
    }

    /// Scheduled tasks of `stage` (held in the delay ladder).
    pub fn scheduled(&self, stage: &Stage) -> usize {
        self.scheduled.get(stage).map_or(0, Vec::len)
    }

    /// When the next scheduled task of `stage` falls due.
    pub fn next_due(&self, stage: &Stage) -> Option<u64> {
        self.scheduled.get(stage).and_then(|t| t.first().copied())
    }

    /// Scheduled tasks of `stage` due at or before `until_ms`.
    pub fn due_by(&self, stage: &Stage, until_ms: u64) -> usize {
        self.scheduled
            .get(stage)
            .map_or(0, |t| t.partition_point(|&d| d <= until_ms))
    }
}

/// What the planner needs of one stage's tasks (its hints).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BandCounts {
    /// Tasks queued in each band ([`Band::index`]): [`QueueIndex::band_len`].
    pub queued: [usize; 3],
    /// Scheduled tasks due at or before the given time:
    /// [`QueueIndex::due_by`].
    pub due_by: usize,
}

impl BandCounts {
    /// Per stage, what an index of `tasks` at `now_ms` would count in each
    /// band and as due by `until_ms`, in one pass, with no lists and no
    /// sort (the planner asks every planning tick). Stages without a
    /// queued or scheduled task are left out.
    pub fn of<'a>(
        tasks: impl Iterator<Item = TaskRef<'a>>,
        now_ms: u64,
        until_ms: u64,
    ) -> BTreeMap<&'a Stage, BandCounts> {
        let mut out: BTreeMap<&'a Stage, BandCounts> = BTreeMap::new();
        for rec in tasks {
            if rec.is_scheduled(now_ms) {
                if let Some(due) = rec.due_at_ms() {
                    let c = out.entry(rec.stage()).or_default();
                    c.due_by += usize::from(due <= until_ms);
                }
            } else if queued_since(rec, now_ms).is_some() {
                out.entry(rec.stage()).or_default().queued[rec.band().index()] += 1;
            }
        }
        out
    }
}

/// When `rec` joined its stage's queue, if it is waiting there now.
fn queued_since(rec: TaskRef<'_>, now_ms: u64) -> Option<u64> {
    // The status first: most records are running or finished, and finding
    // the current row compares stage names (this runs over every record
    // at each scrape).
    if !matches!(rec.status(), TaskStatus::Queued | TaskStatus::Retrying) {
        return None;
    }
    let row = rec.current_row()?;
    let at = row.queued_at_ms().unwrap_or(rec.updated_at_ms());
    match rec.status() {
        // A task that was held in the delay ladder joined the queue when
        // it fell due.
        TaskStatus::Queued => Some(at.max(rec.due_at_ms().unwrap_or(0))),
        TaskStatus::Retrying if at <= now_ms => Some(at),
        _ => None,
    }
}

/// The ETA of `rec`, if it is in flight and every stage ahead is known and
/// served.
pub fn eta(
    rec: TaskRef<'_>,
    timings: &BTreeMap<Stage, StageTiming>,
    queues: &QueueIndex,
    now_ms: u64,
) -> Option<Eta> {
    Eta::of(|which| left_ms(rec, timings, queues, now_ms, which))
}

fn left_ms(
    rec: TaskRef<'_>,
    timings: &BTreeMap<Stage, StageTiming>,
    queues: &QueueIndex,
    now_ms: u64,
    which: Which,
) -> Option<f64> {
    let here = timings.get(rec.stage())?;
    let service = here.service.pick(which);
    let row = rec.current_row()?;
    let band = rec.band();
    // Tasks the broker holds that the coordinator never saw (third-party
    // producers) are ahead: with band counts, only those of this band or
    // higher.
    let unseen = match here.band_ready {
        Some(ready) => Band::ALL[..=band.index()]
            .iter()
            .map(|b| ready[b.index()].saturating_sub(queues.band_len(rec.stage(), *b) as u64))
            .sum::<u64>(),
        None => here.ready.saturating_sub(queues.len(rec.stage()) as u64),
    };
    let unseen = usize::try_from(unseen).unwrap_or(usize::MAX);
    // Time until a server is free for a task with `ahead` tasks before it.
    let start_wait = |ahead: usize| -> Option<f64> {
        if here.servers == 0 {
            return None; // nobody serves the stage: no estimate
        }
        let idle = (here.servers as usize).saturating_sub(here.in_flight);
        let waiting_for = (ahead + 1).saturating_sub(idle) as f64;
        Some(waiting_for / f64::from(here.servers) * service)
    };
    let left = match rec.status() {
        TaskStatus::Running => {
            let elapsed = row.started_at_ms().map_or(0, |s| now_ms.saturating_sub(s)) as f64;
            (service - elapsed).max(0.0)
        }
        TaskStatus::Queued if rec.is_scheduled(now_ms) => {
            // Held in the delay ladder: due time, then what is queued at
            // its band or higher (as it is now) ahead of it.
            let due = rec.due_at_ms().map_or(0, |d| d.saturating_sub(now_ms)) as f64;
            due + start_wait(queues.ahead_of_new(rec.stage(), band) + unseen)? + service
        }
        TaskStatus::Queued => {
            let since = queued_since(rec, now_ms)?;
            start_wait(queues.ahead_of(rec.stage(), band, since) + unseen)? + service
        }
        TaskStatus::Retrying => {
            let due = row.queued_at_ms().map_or(0, |q| q.saturating_sub(now_ms)) as f64;
            due + start_wait(queues.ahead_of_new(rec.stage(), band) + unseen)? + service
        }
        TaskStatus::Succeeded
        | TaskStatus::DeadLettered
        | TaskStatus::Scheduled
        | TaskStatus::Cancelled
        | TaskStatus::Held
        | TaskStatus::Waiting => return None,
    };
    Some(left + stages_from(here.next.clone(), timings, which)?)
}

/// The expected wait and service of `first` and every stage after it, for
/// a task entering `first`'s queue now; `None` if a stage on the way is
/// unknown or not served, or the chain loops.
fn stages_from(
    first: Option<Stage>,
    timings: &BTreeMap<Stage, StageTiming>,
    which: Which,
) -> Option<f64> {
    let mut left = 0.0;
    let mut next = first;
    for _ in 0..MAX_ETA_STAGES {
        let Some(stage) = next else {
            return Some(left);
        };
        let t = timings.get(&stage)?;
        if t.servers == 0 {
            return None;
        }
        let s = t.service.pick(which);
        // The stage's expected wait scales with its service time.
        left += t.wait_ms * s / t.service.mean.max(1e-9) + s;
        next = t.next.clone();
    }
    None // a cycle, or a chain longer than any real pipeline
}

impl Eta {
    /// The estimate from its three ends (each `None` if unknown).
    fn of(est: impl Fn(Which) -> Option<f64>) -> Option<Eta> {
        let (low, mean, high) = (est(Which::Low)?, est(Which::Mean)?, est(Which::High)?);
        Some(Eta {
            in_ms: mean.round() as u64,
            low_in_ms: low.min(mean).round() as u64,
            high_in_ms: high.max(mean).round() as u64,
        })
    }
}

/// The time a task entering `stage`'s queue now would take to finish its
/// pipeline (the stage's expected wait and service, then each later
/// stage's), with its range: a held task's or a join's own part of a
/// flow's ETA (issue 19). `None` if a stage on the way is unknown or not
/// served.
pub fn path_from(stage: &Stage, timings: &BTreeMap<Stage, StageTiming>) -> Option<Eta> {
    Eta::of(|which| stages_from(Some(stage.clone()), timings, which))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tasks::{Attempt, TaskStore};
    use guildhall_proto::{AgentId, TaskId};

    fn st(s: &str) -> Stage {
        s.parse().unwrap()
    }

    fn timing(
        servers: u32,
        in_flight: usize,
        low: f64,
        mean: f64,
        high: f64,
        next: Option<&str>,
    ) -> StageTiming {
        StageTiming {
            service: ServiceTimes { low, mean, high },
            servers,
            in_flight,
            ready: 0,
            band_ready: None,
            wait_ms: 0.0,
            next: next.map(st),
        }
    }

    /// Five tasks queued at `a` at t=1000..1004, one running.
    fn store() -> TaskStore {
        let mut s = TaskStore::new(100, 60_000);
        for i in 0..5u64 {
            let id: TaskId = format!("Q{i}").parse().unwrap();
            s.submitted(&id, &st("a"), 1_000 + i);
        }
        let (r, w): (TaskId, AgentId) = ("R".parse().unwrap(), "w".parse().unwrap());
        s.started(
            Attempt::new(&r, &st("a"), 1, &w),
            900,
            Some(800),
            None,
            false,
        );
        s
    }

    #[test]
    fn a_queued_task_waits_for_those_ahead_then_every_later_stage() {
        let s = store();
        let now = 1_010;
        let queues = QueueIndex::build(s.iter(), now);
        assert_eq!(queues.len(&st("a")), 5);
        assert_eq!(queues.oldest(&st("a")), Some(1_000));
        let mut timings = BTreeMap::new();
        // a: 2 slots, both busy; b: expected wait 20 ms, service 50 ms.
        timings.insert(st("a"), timing(2, 2, 60.0, 100.0, 150.0, Some("b")));
        let mut b = timing(1, 0, 40.0, 50.0, 70.0, None);
        b.wait_ms = 20.0;
        timings.insert(st("b"), b);
        let q3 = s.get_ref("Q3").unwrap();
        // 3 ahead + itself = 4 to serve before it starts, 2 at a time.
        let e = eta(q3, &timings, &queues, now).unwrap();
        assert_eq!(e.in_ms, (4.0 / 2.0 * 100.0 + 100.0 + 20.0 + 50.0) as u64);
        assert_eq!(
            e.low_in_ms,
            (4.0 / 2.0 * 60.0 + 60.0 + 20.0 * 40.0 / 50.0 + 40.0) as u64
        );
        assert_eq!(
            e.high_in_ms,
            (4.0 / 2.0 * 150.0 + 150.0 + 20.0 * 70.0 / 50.0 + 70.0) as u64
        );
        // The first in line starts as soon as a slot frees up.
        let q0 = eta(s.get_ref("Q0").unwrap(), &timings, &queues, now).unwrap();
        assert_eq!(q0.in_ms, (1.0 / 2.0 * 100.0 + 100.0 + 70.0) as u64);
        // The running one started at 900: 110 ms in, past a's mean, so
        // nothing is left at a (90 at the high end), then b.
        let r = eta(s.get_ref("R").unwrap(), &timings, &queues, now).unwrap();
        assert_eq!((r.in_ms, r.low_in_ms, r.high_in_ms), (70, 56, 40 + 28 + 70));
    }

    #[test]
    fn band_counts_are_what_the_index_counts() {
        let mut s = store();
        let stages = [st("a"), st("b")];
        for i in 0..12u64 {
            let id: TaskId = format!("P{i}").parse().unwrap();
            let stage = &stages[(i % 2) as usize];
            let due = (i % 3 == 0).then_some(1_000 + i * 500);
            s.queued(&id, stage, 1_000 + i, (i % 10) as u8, due);
        }
        for (now, until) in [(1_010, 1_010), (1_010, 4_000), (3_000, 9_000)] {
            let index = QueueIndex::build(s.iter(), now);
            let counts = BandCounts::of(s.iter(), now, until);
            for stage in &stages {
                let want = BandCounts {
                    queued: Band::ALL.map(|b| index.band_len(stage, b)),
                    due_by: index.due_by(stage, until),
                };
                assert_eq!(counts.get(stage).copied().unwrap_or_default(), want);
            }
        }
    }

    #[test]
    fn tasks_the_broker_counts_but_the_coordinator_never_saw_are_ahead() {
        let s = store();
        let queues = QueueIndex::build(s.iter(), 1_010);
        let mut timings = BTreeMap::new();
        let mut a = timing(1, 1, 100.0, 100.0, 100.0, None);
        a.ready = 15; // 5 known + 10 unseen
        timings.insert(st("a"), a);
        let e = eta(s.get_ref("Q0").unwrap(), &timings, &queues, 1_010).unwrap();
        assert_eq!(e.in_ms, (11.0 * 100.0 + 100.0) as u64);
    }

    #[test]
    fn no_estimate_without_a_server_or_service_times() {
        let s = store();
        let queues = QueueIndex::build(s.iter(), 1_010);
        let mut timings = BTreeMap::new();
        timings.insert(st("a"), timing(0, 0, 1.0, 1.0, 1.0, None));
        assert_eq!(
            eta(s.get_ref("Q0").unwrap(), &timings, &queues, 1_010),
            None
        );
        timings.insert(st("a"), timing(1, 0, 1.0, 1.0, 1.0, Some("unknown")));
        assert_eq!(
            eta(s.get_ref("Q0").unwrap(), &timings, &queues, 1_010),
            None
        );
        // A cycle a -> a is not followed forever.
        timings.insert(st("a"), timing(1, 0, 1.0, 1.0, 1.0, Some("a")));
        assert_eq!(
            eta(s.get_ref("Q0").unwrap(), &timings, &queues, 1_010),
            None
        );
    }
}
