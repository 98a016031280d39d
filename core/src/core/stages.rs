//! Per-stage state (queue depth from the broker, rates and times from
//! events) and the load analysis behind the bottleneck verdict and ETAs.

use super::stats::{RateWindow, Reservoir};
use super::telemetry::StageCounts;
use super::workers::Worker;
use guildhall_proto::Stage;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// How long backlog samples are kept to judge whether it grows.
const BACKLOG_HISTORY_MS: u64 = 60_000;
/// Backlog history needed before a trend is trusted.
const BACKLOG_MIN_SPAN_MS: u64 = 10_000;

/// A stage queue's counts as the broker reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QueueStats {
    /// Ready messages.
    pub ready: u64,
    /// Delivered, not acked; `None` when only a passive declare was possible.
    pub unacked: Option<u64>,
    /// Consumers attached.
    pub consumers: u64,
}

/// One stage's state. Saved whole in a snapshot, but for its metric counts
/// not yet handed over (none, between inputs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageState {
    /// The stage.
    pub name: Stage,
    /// Where its results go, as its workers report.
    pub next: Option<Stage>,
    /// Last counts from the broker, and when they came.
    pub queue: Option<(QueueStats, u64)>,
    /// `(time, ready + unacked)` samples, to see whether the backlog grows.
    pub backlog_history: VecDeque<(u64, u64)>,
    /// Tasks entering the queue per second (submissions, hand-offs, retries).
    pub arrivals: RateWindow,
    /// Attempts finished per second (any outcome).
    pub completions: RateWindow,
    /// Recent processing times.
    pub durations: Reservoir,
    /// Recent queue waits.
    pub waits: Reservoir,
    /// Attempts that succeeded.
    pub succeeded: u64,
    /// Attempts that failed (retried or dead-lettered).
    pub failed: u64,
    /// Attempts retried.
    pub retried: u64,
    /// Tasks dead-lettered here.
    pub dead_lettered: u64,
    /// Its priority bands: depth, waits, traffic (issue 18).
    pub bands: crate::core::scheduling::queued::BandState,
    /// Metric counts of this stage not yet handed to the telemetry (at the
    /// end of the input that made them). Not saved: empty between inputs.
    #[serde(skip)]
    pub pending: StageCounts,
}

impl StageState {
    /// A stage first heard of at `now_ms`.
    pub fn new(name: Stage, now_ms: u64, rate_window_s: u32) -> Self {
        Self {
            name,
            next: None,
            queue: None,
            backlog_history: VecDeque::new(),
            arrivals: RateWindow::new(rate_window_s, now_ms),
            completions: RateWindow::new(rate_window_s, now_ms),
            durations: Reservoir::new(1024),
            waits: Reservoir::new(1024),
            succeeded: 0,
            failed: 0,
            retried: 0,
            dead_lettered: 0,
            bands: Default::default(),
            pending: StageCounts::default(),
        }
    }

    /// Records the broker's counts.
    pub fn set_queue(&mut self, stats: QueueStats, now_ms: u64) {
        self.queue = Some((stats, now_ms));
        let backlog = stats.ready + stats.unacked.unwrap_or(0);
        self.backlog_history.push_back((now_ms, backlog));
        while let Some((t, _)) = self.backlog_history.front() {
            if now_ms.saturating_sub(*t) > BACKLOG_HISTORY_MS {
                self.backlog_history.pop_front();
            } else {
                break;
            }
        }
    }

    /// Change of the backlog per second over the recent history, once long enough.
    pub fn backlog_growth_per_s(&self) -> Option<f64> {
        let (t0, b0) = *self.backlog_history.front()?;
        let (t1, b1) = *self.backlog_history.back()?;
        let span = t1.saturating_sub(t0);
        (span >= BACKLOG_MIN_SPAN_MS).then(|| (b1 as f64 - b0 as f64) * 1000.0 / span as f64)
    }

    /// Share of finished attempts that succeeded.
    pub fn success_rate(&self) -> Option<f64> {
        let total = self.succeeded + self.failed;
        (total > 0).then(|| self.succeeded as f64 / total as f64)
    }
}

/// A stage's load at one moment, derived from its state and its workers.
#[derive(Debug, Clone, PartialEq)]
pub struct StageLoad {
    /// Tasks the stage's live, consuming workers can hold at once.
    pub servers: u32,
    /// Live workers on the stage (any state but dead/stopped).
    pub workers_alive: usize,
    /// Tasks held by workers now.
    pub in_flight: usize,
    /// Mean processing time of recent attempts.
    pub mean_service_ms: Option<f64>,
    /// Tasks entering per second.
    pub arrival_rate: f64,
    /// Attempts finished per second.
    pub completion_rate: f64,
    /// Arrival rate times mean service time over servers: above 1 the queue grows.
    pub utilisation: Option<f64>,
    /// Ready messages (broker's count).
    pub ready: u64,
    /// Backlog change per second.
    pub backlog_growth_per_s: Option<f64>,
    /// Expected wait for a task joining the queue now.
    pub expected_wait_ms: Option<f64>,
}

/// Computes every stage's load.
pub fn loads(
    stages: &BTreeMap<Stage, StageState>,
    workers: &HashMap<guildhall_proto::AgentId, Worker>,
    now_ms: u64,
) -> BTreeMap<Stage, StageLoad> {
    let mut servers: HashMap<&Stage, (u32, usize, usize)> = HashMap::new();
    for w in workers.values().filter(|w| w.is_alive()) {
        let entry = servers.entry(&w.stage).or_default();
        if matches!(w.status(), "idle" | "processing") {
            entry.0 += w.concurrency;
        }
        entry.1 += 1;
        entry.2 += w.in_hand.len();
    }
    stages
        .iter()
        .map(|(name, s)| {
            let (c, alive, in_flight) = servers.get(name).copied().unwrap_or_default();
            let mean = s.durations.mean();
            let arrival_rate = s.arrivals.rate(now_ms);
            let utilisation = match (mean, c) {
                (Some(m), c) if c > 0 => Some(arrival_rate * m / 1000.0 / f64::from(c)),
                _ => None,
            };
            let ready = s.queue.map(|(q, _)| q.ready).unwrap_or(0);
            let expected_wait_ms = match (mean, c) {
                (_, 0) => None,
                (Some(m), c) => Some(ready as f64 * m / f64::from(c)),
                (None, _) => (ready == 0).then_some(0.0),
            };
            let load = StageLoad {
                servers: c,
                workers_alive: alive,
                in_flight,
                mean_service_ms: mean,
                arrival_rate,
                completion_rate: s.completions.rate(now_ms),
                utilisation,
                ready,
                backlog_growth_per_s: s.backlog_growth_per_s(),
                expected_wait_ms,
            };
            (name.clone(), load)
        })
        .collect()
}

/// The stage holding the pipeline back, with the reason in words.
pub fn bottleneck(loads: &BTreeMap<Stage, StageLoad>) -> Option<(Stage, String)> {
    // Work waiting where nobody serves it beats everything.
    if let Some((name, l)) = loads.iter().find(|(_, l)| l.servers == 0 && l.ready > 0) {
        return Some((
            name.clone(),
            format!("{} task(s) waiting and no worker consuming", l.ready),
        ));
    }
    // Then a backlog that keeps growing.
    let growing = loads
        .iter()
        .filter_map(|(n, l)| Some((n, l, l.backlog_growth_per_s?)))
        .filter(|(_, l, g)| *g > 0.2 && l.ready > 0)
        .max_by(|a, b| a.2.total_cmp(&b.2));
    if let Some((name, l, g)) = growing {
        return Some((
            name.clone(),
            format!("backlog growing by {g:.1}/s ({} waiting)", l.ready),
        ));
    }
    // Otherwise the busiest stage.
    let (name, l, u) = loads
        .iter()
        .filter_map(|(n, l)| Some((n, l, l.utilisation?)))
        .filter(|(_, _, u)| *u > 0.0)
        .max_by(|a, b| a.2.total_cmp(&b.2))?;
    Some((
        name.clone(),
        format!(
            "highest utilisation {u:.2}: {:.2} tasks/s arriving, capacity {:.2}/s",
            l.arrival_rate,
            l.mean_service_ms
                .map(|m| f64::from(l.servers) * 1000.0 / m.max(1e-9))
                .unwrap_or(0.0)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(servers: u32, ready: u64, utilisation: Option<f64>, growth: Option<f64>) -> StageLoad {
        StageLoad {
            servers,
            workers_alive: servers as usize,
            in_flight: 0,
            mean_service_ms: Some(100.0),
            arrival_rate: 1.0,
            completion_rate: 1.0,
            utilisation,
            ready,
            backlog_growth_per_s: growth,
            expected_wait_ms: None,
        }
    }

    fn st(s: &str) -> Stage {
        s.parse().unwrap()
    }

    #[test]
    fn the_busiest_stage_is_the_bottleneck() {
        let mut l = BTreeMap::new();
        l.insert(st("a"), load(2, 0, Some(0.3), None));
        l.insert(st("b"), load(2, 0, Some(0.9), None));
        let (name, reason) = bottleneck(&l).unwrap();
        assert_eq!(name.as_str(), "b");
        assert!(reason.contains("0.90"), "{reason}");
    }

    #[test]
    fn a_growing_backlog_beats_utilisation_and_no_workers_beats_both() {
        let mut l = BTreeMap::new();
        l.insert(st("a"), load(2, 50, Some(0.5), Some(3.0)));
        l.insert(st("b"), load(2, 0, Some(0.9), None));
        assert_eq!(bottleneck(&l).unwrap().0.as_str(), "a");
        l.insert(st("c"), load(0, 7, None, None));
        let (name, reason) = bottleneck(&l).unwrap();
        assert_eq!(name.as_str(), "c");
        assert!(reason.contains("no worker"), "{reason}");
    }

    #[test]
    fn an_idle_pipeline_has_no_bottleneck() {
        let mut l = BTreeMap::new();
        l.insert(st("a"), load(2, 0, Some(0.0), None));
        assert_eq!(bottleneck(&l), None);
    }
}
