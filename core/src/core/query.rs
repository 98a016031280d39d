//! Building the API's views from the core's state, including ETAs.

use super::Core;
use super::eta::{self, QueueIndex, ServiceTimes, StageTiming};
use super::stages::{self, StageLoad};
use super::stats::Reservoir;
use super::tasks::{AttemptOutcome, TaskRecord, TaskRef, TaskStatus};
use super::views::*;
use super::workers::{Liveness, Worker};
use guildhall_proto::schedule::Band;
use guildhall_proto::{Stage, WorkerMode, WorkerResult};
use std::collections::BTreeMap;

/// Filter of `GET /api/tasks`.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only tasks with this status.
    pub status: Option<TaskStatus>,
    /// Only tasks currently at this stage.
    pub stage: Option<Stage>,
    /// Most tasks returned, newest first.
    pub limit: usize,
}

fn percentiles(r: &Reservoir) -> Option<Percentiles> {
    let [p50, p95, p99] = r.percentiles([0.5, 0.95, 0.99])?;
    Some(Percentiles {
        mean: r.mean()?,
        p50,
        p95,
        p99,
        samples: r.len(),
    })
}

impl Core {
    fn worker_view_of(&self, w: &Worker, now_ms: u64) -> WorkerView {
        let queue = self.stages.get(&w.stage).and_then(|s| s.queue);
        WorkerView {
            id: w.id.to_string(),
            stage: w.stage.to_string(),
            stages: w.stages.iter().map(ToString::to_string).collect(),
            next: w.next.as_ref().map(ToString::to_string),
            status: w.status(),
            concurrency: w.concurrency,
            prefetch_asked: w.prefetch_sent,
            rtt_ms: w.rtt_ms,
            current_tasks: w
                .in_hand
                .iter()
                .map(|t| CurrentTask {
                    task_id: t.task_id.to_string(),
                    attempt: t.attempt,
                    started_at_ms: t.started_at_ms,
                    running_ms: now_ms.saturating_sub(t.started_at_ms),
                })
                .collect(),
            queue_size: queue.map(|(q, _)| q.ready),
            queue_unacked: queue.and_then(|(q, _)| q.unacked),
            avg_processing_ms: w.durations.mean(),
            p95_processing_ms: w.durations.percentiles([0.95]).map(|[p]| p),
            last_completed_at_ms: w.last_completed_ms,
            last_completed_ago_ms: w.last_completed_ms.map(|t| now_ms.saturating_sub(t)),
            success_rate: w.success_rate(),
            throughput_per_s: w.completions.rate(now_ms),
            done: w.done,
            failed: w.failed,
            cpu_ratio: w.worker_proc.map(|p| p.cpu_ratio),
            memory_bytes: w.worker_proc.map(|p| p.rss_bytes),
            worker_pid: w.worker_proc.map(|p| p.pid),
            agent_cpu_ratio: w.agent_proc.map(|p| p.cpu_ratio),
            agent_memory_bytes: w.agent_proc.map(|p| p.rss_bytes),
            version: w.version.clone(),
            hostname: w.hostname.clone(),
            mode: w.mode.as_ref().map(|m| match m {
                WorkerMode::Http { .. } => "http",
                WorkerMode::Exec { .. } => "exec",
                WorkerMode::Simulated => "simulated",
            }),
            supervised: w.supervised,
            heartbeat_ms: w.heartbeat_ms,
            last_seen_at_ms: w.last_seen_ms,
            last_seen_ago_ms: now_ms.saturating_sub(w.last_seen_ms),
            first_seen_at_ms: w.first_seen_ms,
            dead_since_ms: match w.liveness {
                Liveness::Dead { since_ms, .. } => Some(since_ms),
                _ => None,
            },
            suspect_since_ms: match w.liveness {
                Liveness::Suspect { since_ms } => Some(since_ms),
                _ => None,
            },
            stopped_reason: match &w.liveness {
                Liveness::Stopped { reason, .. } => Some(reason.clone()),
                _ => None,
            },
            restarts: w.restarts,
        }
    }

    /// Every worker, by stage then id.
    pub fn workers_view(&self, now_ms: u64) -> Vec<WorkerView> {
        let mut list: Vec<&Worker> = self.workers.values().collect();
        list.sort_by(|a, b| (&a.stage, &a.id).cmp(&(&b.stage, &b.id)));
        list.into_iter()
            .map(|w| self.worker_view_of(w, now_ms))
            .collect()
    }

    /// One worker.
    pub fn worker_view(&self, id: &str, now_ms: u64) -> Option<WorkerView> {
        self.workers.get(id).map(|w| self.worker_view_of(w, now_ms))
    }

    /// Every stage's load (for views, ETAs and metrics).
    pub fn stage_loads(&self, now_ms: u64) -> BTreeMap<Stage, StageLoad> {
        stages::loads(&self.stages, &self.workers, now_ms)
    }

    /// Every stage, and the bottleneck.
    pub fn stages_view(&self, now_ms: u64) -> StagesView {
        let loads = self.stage_loads(now_ms);
        let bottleneck = stages::bottleneck(&loads);
        let queues = QueueIndex::build(self.tasks.iter(), now_ms);
        let mut by_stage: BTreeMap<&Stage, WorkerCounts> = BTreeMap::new();
        for w in self.workers.values() {
            let c = by_stage.entry(&w.stage).or_insert_with(|| WorkerCounts {
                total: 0,
                alive: 0,
                by_status: BTreeMap::new(),
            });
            c.total += 1;
            c.alive += usize::from(w.is_alive());
            *c.by_status.entry(w.status()).or_default() += 1;
        }
        let mut limits: BTreeMap<Stage, _> = self
            .rate_limits_view(now_ms)
            .into_iter()
            .map(|l| (l.stage.clone(), l))
            .collect();
        let stages = self
            .stages
            .iter()
            .map(|(name, s)| {
                let load = loads.get(name);
                StageView {
                    name: name.to_string(),
                    next: s.next.as_ref().map(ToString::to_string),
                    queue: s.queue.map(|(q, at)| QueueView {
                        ready: q.ready,
                        unacked: q.unacked,
                        consumers: q.consumers,
                        updated_ago_ms: now_ms.saturating_sub(at),
                    }),
                    workers: by_stage.remove(name).unwrap_or(WorkerCounts {
                        total: 0,
                        alive: 0,
                        by_status: BTreeMap::new(),
                    }),
                    in_flight: load.map(|l| l.in_flight).unwrap_or(0),
                    capacity: load.map(|l| l.servers).unwrap_or(0),
                    arrival_rate: load.map(|l| l.arrival_rate).unwrap_or(0.0),
                    completion_rate: load.map(|l| l.completion_rate).unwrap_or(0.0),
                    processing_ms: percentiles(&s.durations),
                    queue_wait_ms: percentiles(&s.waits),
                    success_rate: s.success_rate(),
                    succeeded: s.succeeded,
                    failed: s.failed,
                    retried: s.retried,
                    dead_lettered: s.dead_lettered,
                    utilisation: load.and_then(|l| l.utilisation),
                    backlog_growth_per_s: load.and_then(|l| l.backlog_growth_per_s),
                    backlog_age_ms: queues.oldest(name).map(|t| now_ms.saturating_sub(t)),
                    expected_wait_ms: load.and_then(|l| l.expected_wait_ms),
                    bottleneck: bottleneck.as_ref().is_some_and(|(b, _)| b == name),
                    recommended_workers: self.planner.stage(name).map(|p| p.recommended_workers),
                    intake: s
                        .bands
                        .intake
                        .map(|q| queue_view(q, s.queue.map_or(now_ms, |(_, at)| at), now_ms)),
                    bands: self.band_views(name, s, &queues, now_ms),
                    scheduled: queues.scheduled(name),
                    next_due_at_ms: queues.next_due(name),
                    rate_limit: limits.remove(name),
                }
            })
            .collect();
        StagesView {
            stages,
            bottleneck: bottleneck.map(|(stage, reason)| BottleneckView {
                stage: stage.to_string(),
                reason,
            }),
        }
    }

    /// What ETAs need to know about every stage that can be estimated.
    pub fn stage_timings(&self, now_ms: u64) -> BTreeMap<Stage, StageTiming> {
        let loads = self.stage_loads(now_ms);
        self.stages
            .iter()
            .filter_map(|(name, s)| {
                let load = loads.get(name)?;
                let service = ServiceTimes::from_samples(&s.durations)?;
                Some((
                    name.clone(),
                    StageTiming {
                        service,
                        servers: load.servers,
                        in_flight: load.in_flight,
                        ready: load.ready,
                        band_ready: s.bands.ready(),
                        // The queueing model's expected wait (Allen-Cunneen),
                        // once the stage is planned; the queue's length over
                        // its capacity before that.
                        wait_ms: self
                            .planner
                            .stage(name)
                            .and_then(|p| {
                                crate::capacity::queueing::expected_wait_ms(
                                    p.arrival_rate,
                                    p.service_mean_ms?,
                                    p.arrival_scv,
                                    p.service_scv.unwrap_or(1.0),
                                    load.servers,
                                )
                            })
                            .or(load.expected_wait_ms)
                            .unwrap_or(0.0),
                        next: s.next.clone(),
                    },
                ))
            })
            .collect()
    }

    /// One task's pipeline.
    pub fn task_view(&self, id: &str, now_ms: u64) -> Option<TaskView> {
        let task = self.tasks.get_ref(id)?;
        let timings = self.stage_timings(now_ms);
        let queues = QueueIndex::build(
            self.tasks.iter().filter(|r| r.stage() == task.stage()),
            now_ms,
        );
        let mut eta = eta::eta(task, &timings, &queues, now_ms);
        let rec = task.to_record();
        let flow = self.task_flow_view(&rec.id, now_ms);
        if matches!(task.status(), TaskStatus::Held | TaskStatus::Waiting) {
            eta = self.flow_eta(&rec.id, &self.eta_inputs(now_ms), now_ms);
        }
        let scheduled = task.is_scheduled(now_ms);
        let current = task.current_row().map(|r| (r.attempt(), r.queued_at_ms()));
        Some(TaskView {
            priority: task.priority(),
            band: task.band().label(),
            due_at_ms: task.due_at_ms(),
            id: rec.id.to_string(),
            status: display_status(task, now_ms).as_str(),
            stage: rec.stage.to_string(),
            submitted_at_ms: rec.submitted_at_ms,
            updated_at_ms: rec.updated_at_ms,
            finished_at_ms: rec.finished_at_ms,
            duration_ms: rec
                .submitted_at_ms
                .map(|s| rec.finished_at_ms.unwrap_or(now_ms).saturating_sub(s)),
            eta_at_ms: eta.map(|e| now_ms + e.in_ms),
            eta_in_ms: eta.map(|e| e.in_ms),
            eta_low_in_ms: eta.map(|e| e.low_in_ms),
            eta_high_in_ms: eta.map(|e| e.high_in_ms),
            attempts: rows_in_time_order(&rec)
                .into_iter()
                .map(|r| {
                    // The attempt a scheduled task waits for.
                    let waiting = scheduled
                        && r.stage == rec.stage
                        && r.outcome == AttemptOutcome::Queued
                        && current == Some((r.attempt, r.queued_at_ms));
                    AttemptView {
                        due_at_ms: waiting.then_some(task.due_at_ms()).flatten(),
                        stage: r.stage.to_string(),
                        attempt: r.attempt,
                        worker: r.worker.as_ref().map(ToString::to_string),
                        queued_at_ms: r.queued_at_ms,
                        started_at_ms: r.started_at_ms,
                        finished_at_ms: r.finished_at_ms,
                        wait_ms: match (r.queued_at_ms, r.started_at_ms) {
                            (Some(q), Some(s)) => Some(s.saturating_sub(q)),
                            _ => None,
                        },
                        duration_ms: r.started_at_ms.map(|s| {
                            let end = match r.outcome {
                                AttemptOutcome::Running => now_ms,
                                _ => r.finished_at_ms.unwrap_or(now_ms),
                            };
                            end.saturating_sub(s)
                        }),
                        outcome: if waiting {
                            "scheduled"
                        } else {
                            r.outcome.as_str()
                        },
                        error: r.error.as_deref().map(String::from),
                        error_class: r.error_class.as_deref().map(String::from),
                        redelivered: r.redelivered,
                        progress: r.progress,
                        stale_result: r.stale.map(|s| match s {
                            WorkerResult::Succeeded => "succeeded",
                            WorkerResult::Failed => "failed",
                            WorkerResult::Unfinished => "unfinished",
                        }),
                    }
                })
                .collect(),
            cancel: self.cancel_view(id),
            flow,
        })
    }

    /// Tasks matching `filter`, most recently updated first.
    pub fn tasks_view(&self, filter: &TaskFilter, now_ms: u64) -> Vec<TaskSummary> {
        let mut matching: Vec<TaskRef<'_>> = self
            .tasks
            .iter()
            .filter(|r| {
                filter
                    .status
                    .is_none_or(|s| display_status(*r, now_ms) == s)
            })
            .filter(|r| filter.stage.as_ref().is_none_or(|s| r.stage() == s))
            .collect();
        matching.sort_by(|a, b| {
            b.updated_at_ms()
                .cmp(&a.updated_at_ms())
                .then_with(|| a.cmp_id(b))
        });
        matching.truncate(filter.limit);
        let timings = self.stage_timings(now_ms);
        let queues = QueueIndex::build(self.tasks.iter(), now_ms);
        matching
            .into_iter()
            .map(|r| {
                let eta = eta::eta(r, &timings, &queues, now_ms);
                TaskSummary {
                    id: r.id().to_string(),
                    status: display_status(r, now_ms).as_str(),
                    stage: r.stage().to_string(),
                    worker: r
                        .current_row()
                        .filter(|row| row.outcome() == AttemptOutcome::Running)
                        .and_then(|row| row.worker().map(ToString::to_string)),
                    attempts: r.attempts(),
                    submitted_at_ms: r.submitted_at_ms(),
                    updated_at_ms: r.updated_at_ms(),
                    eta_at_ms: eta.map(|e| now_ms + e.in_ms),
                    eta_in_ms: eta.map(|e| e.in_ms),
                    eta_low_in_ms: eta.map(|e| e.low_in_ms),
                    eta_high_in_ms: eta.map(|e| e.high_in_ms),
                    priority: r.priority(),
                    due_at_ms: r.due_at_ms(),
                    flow_root: self
                        .in_flow(&r.id())
                        .then(|| self.flow_root(&r.id()).to_string()),
                }
            })
            .collect()
    }

    /// The coordinator's own state.
    pub fn overview(&self) -> Overview {
        Overview {
            caught_up: self.caught_up,
            batches: self.stats.batches,
            events: self.stats.events,
            malformed: self.stats.malformed,
            last_offset: self.stats.last_offset,
            workers: self.workers.len(),
            workers_alive: self.workers.values().filter(|w| w.is_alive()).count(),
            stages: self.stages.len(),
            tasks_in_flight: self.tasks.in_flight(),
            tasks_finished: self.tasks.finished(),
        }
    }

    /// Failures by stage and error class, by stage, then most failures
    /// first; rates, `rising` and `new` as of `now_ms`.
    pub fn errors_view(&self, now_ms: u64) -> ErrorsView {
        self.errors.view(now_ms)
    }
}

fn queue_view(q: super::stages::QueueStats, at_ms: u64, now_ms: u64) -> QueueView {
    QueueView {
        ready: q.ready,
        unacked: q.unacked,
        consumers: q.consumers,
        updated_ago_ms: now_ms.saturating_sub(at_ms),
    }
}

impl Core {
    /// The bands of stage `name` (state `s`), highest first.
    fn band_views(
        &self,
        name: &Stage,
        s: &super::stages::StageState,
        queues: &QueueIndex,
        now_ms: u64,
    ) -> Vec<BandView> {
        let polled_at = s.queue.map_or(now_ms, |(_, at)| at);
        let queued = Band::ALL.map(|b| queues.band_len(name, b));
        let traffic = s.bands.traffic(now_ms, queued);
        let capacity = self.planner.config();
        Band::ALL
            .into_iter()
            .map(|b| BandView {
                priority: b.label(),
                queue: s.bands.depth[b.index()].map(|q| queue_view(q, polled_at, now_ms)),
                queued: queued[b.index()],
                wait_ms: percentiles(&s.bands.waits[b.index()]),
                wait_target_ms: capacity.band_wait_target_for(name, b),
                active: traffic[b.index()],
            })
            .collect()
    }
}

/// A task's rows in the order they began (they are stored in arrival order,
/// which events from different agents can scramble).
fn rows_in_time_order(rec: &TaskRecord) -> Vec<&super::tasks::AttemptRow> {
    let mut rows: Vec<_> = rec.rows.iter().collect();
    rows.sort_by_key(|r| {
        r.queued_at_ms
            .or(r.started_at_ms)
            .or(r.finished_at_ms)
            .unwrap_or(u64::MAX)
    });
    rows
}

/// A retrying task whose delay is over is back in the queue; a queued one
/// whose due time is ahead is scheduled.
pub(crate) fn display_status(rec: TaskRef<'_>, now_ms: u64) -> TaskStatus {
    match rec.status() {
        TaskStatus::Queued if rec.is_scheduled(now_ms) => TaskStatus::Scheduled,
        TaskStatus::Retrying
            if rec
                .current_row()
                .and_then(|r| r.queued_at_ms())
                .is_some_and(|due| due <= now_ms) =>
        {
            TaskStatus::Queued
        }
        s => s,
    }
}
