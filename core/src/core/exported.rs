//! What the core hands the runtime's metrics just before a scrape: the
//! gauges that describe its state now ([`Core::refresh_metrics`]) and the
//! per-worker rows ([`Core::worker_series`]), both in a fixed order (stage
//! names, then worker ids), so the same state gives the same data.

use super::telemetry::{Gauge, WORKER_STATUSES};
use super::{Core, eta, stages};
use guildhall_proto::AgentId;
use std::collections::BTreeMap;

/// One worker's per-worker series, copied out of the core under its lock
/// and written out by the runtime after it is released.
///
/// **Per-worker series are not in the registry**: with 10,000 workers they
/// are most of a scrape, and the registry's gather-then-encode took over
/// 100 ms for them; written straight from these rows they take a few.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSeries {
    /// The `worker` label (agent id).
    pub worker: String,
    /// The `stage` label.
    pub stage: String,
    /// `guildhall_worker_up`.
    pub up: bool,
    /// `guildhall_worker_tasks_in_hand`.
    pub in_hand: u64,
    /// `guildhall_worker_tasks_total`: per stage the worker has served,
    /// attempts succeeded and failed there.
    pub tasks: Vec<(String, u64, u64)>,
    /// `guildhall_worker_cpu_ratio` and `guildhall_worker_memory_bytes`,
    /// when the agent reports its worker process.
    pub worker_proc: Option<(f64, u64)>,
    /// `guildhall_agent_cpu_ratio` and `guildhall_agent_memory_bytes`,
    /// when the agent reports itself.
    pub agent_proc: Option<(f64, u64)>,
}

impl Core {
    /// Hands the gauges that describe state to the telemetry, just before a
    /// scrape: stages in name order, statuses in display order.
    pub fn refresh_metrics(&mut self, now_ms: u64) {
        let mut counts: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        for w in self.workers.values() {
            *counts.entry((w.stage.as_str(), w.status())).or_default() += 1;
        }
        let t = &mut self.telemetry;
        for stage in self.stages.keys() {
            for status in WORKER_STATUSES {
                let n = counts.get(&(stage.as_str(), status)).copied().unwrap_or(0);
                t.set(Gauge::Workers {
                    stage: stage.as_str(),
                    status,
                    n,
                });
            }
        }
        let loads = stages::loads(&self.stages, &self.workers, now_ms);
        let bottleneck = stages::bottleneck(&loads).map(|(s, _)| s);
        let queues = eta::QueueIndex::build(self.tasks.iter(), now_ms);
        for (name, s) in &self.stages {
            let stage = name.as_str();
            if let Some((q, _)) = s.queue {
                t.set(Gauge::QueueMessages {
                    stage,
                    state: "ready",
                    n: clamp_i64(q.ready),
                });
                if let Some(unacked) = q.unacked {
                    t.set(Gauge::QueueMessages {
                        stage,
                        state: "unacked",
                        n: clamp_i64(unacked),
                    });
                }
                t.set(Gauge::Consumers {
                    stage,
                    n: clamp_i64(q.consumers),
                });
            }
            let in_flight = loads.get(name).map(|l| l.in_flight).unwrap_or(0);
            t.set(Gauge::InFlight {
                stage,
                n: in_flight as i64,
            });
            t.set(Gauge::Bottleneck {
                stage,
                is: bottleneck.as_ref() == Some(name),
            });
            if let Some(l) = loads.get(name) {
                t.set(Gauge::ArrivalRate {
                    stage,
                    rate: l.arrival_rate,
                });
                if let Some(ratio) = l.utilisation {
                    t.set(Gauge::Utilisation { stage, ratio });
                }
            }
            let seconds = queues
                .oldest(name)
                .map_or(0.0, |t| now_ms.saturating_sub(t) as f64 / 1000.0);
            t.set(Gauge::BacklogAge { stage, seconds });
            t.set(Gauge::ScheduledTasks {
                stage,
                n: queues.scheduled(name) as i64,
            });
            for band in guildhall_proto::schedule::Band::ALL {
                let priority = band.label();
                if let Some(q) = s.bands.depth[band.index()] {
                    t.set(Gauge::BandQueueMessages {
                        stage,
                        priority,
                        n: clamp_i64(q.ready),
                    });
                }
                let waits = &s.bands.waits[band.index()];
                if let Some(ps) = waits.percentiles([0.5, 0.95, 0.99]) {
                    for (quantile, ms) in ["0.5", "0.95", "0.99"].into_iter().zip(ps) {
                        t.set(Gauge::BandQueueWait {
                            stage,
                            priority,
                            quantile,
                            seconds: ms as f64 / 1000.0,
                        });
                    }
                }
            }
        }
        t.set(Gauge::TasksTracked {
            state: "in_flight",
            n: self.tasks.in_flight() as i64,
        });
        t.set(Gauge::TasksTracked {
            state: "completed",
            n: self.tasks.finished() as i64,
        });
        for (reason, n) in self.flows.held_counts() {
            t.set(Gauge::HeldTasks {
                reason: reason.as_str(),
                n: n as i64,
            });
        }
    }

    /// The per-worker series (empty when they are off), by worker id,
    /// copied out so the text is written after the core's lock is released.
    pub fn worker_series(&self) -> Vec<WorkerSeries> {
        if !self.telemetry.per_worker() {
            return Vec::new();
        }
        let proc = |p: Option<guildhall_proto::ProcStats>| {
            p.map(|p| (f64::from(p.cpu_ratio), p.rss_bytes))
        };
        let mut ids: Vec<&AgentId> = self.workers.keys().collect();
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|id| self.workers.get(id))
            .map(|w| WorkerSeries {
                worker: w.id.as_str().to_owned(),
                stage: w.stage.as_str().to_owned(),
                up: w.is_alive(),
                in_hand: w.in_hand.len() as u64,
                tasks: w
                    .task_counters()
                    .into_iter()
                    .map(|(stage, ok, failed)| (stage.as_str().to_owned(), ok, failed))
                    .collect(),
                worker_proc: proc(w.worker_proc),
                agent_proc: proc(w.agent_proc),
            })
            .collect()
    }

    /// Feeds per-worker counters by the growth of the agents' own counts.
    /// Separate from [`Core::refresh_metrics`] because it remembers what it
    /// exported.
    pub fn export_worker_counters(&mut self) {
        if !self.telemetry.per_worker() {
            return;
        }
        for w in self.workers.values_mut() {
            w.export_counts();
        }
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
